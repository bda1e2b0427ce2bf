"""Test-suite setup: bnorm's fused kernels run eagerly (no torch.compile, which costs
seconds per kernel variant) unless a test asks for compilation with the ``compiled``
fixture below. Set BNORM_NO_COMPILE=0 to run everything compiled.

Helpers that tests share with the benchmarks live in :mod:`bnorm.testing`."""

import os

import pytest

os.environ.setdefault("BNORM_NO_COMPILE", "1")


@pytest.fixture
def eager_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels' eager fallback even where BNORM_NO_COMPILE=0 was asked for (a
    module opts in with ``pytestmark = pytest.mark.usefixtures("eager_fallback")``)."""
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")


@pytest.fixture
def compiled(eager_fallback: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels compiled with torch.compile; skipped where it is unavailable.
    (It requests ``eager_fallback`` so as to undo it, whatever order pytest sets up a
    module's fixtures in.)"""
    from bnorm import kernels

    monkeypatch.delenv("BNORM_NO_COMPILE", raising=False)
    if not kernels.compile_enabled():
        pytest.skip("torch.compile is not available here")
