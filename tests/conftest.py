"""Test-suite setup: bnorm's fused kernels run eagerly (``BNORM_NO_COMPILE=1``: no
torch.compile, which costs seconds per kernel variant) unless a test asks for compilation
with the ``compiled`` fixture below, or pytest runs with ``--compiled-kernels``: the
configuration users get, where the kernels are compiled and a test module's
``eager_fallback`` mark is ignored. ``make test`` runs the suite, then the tests marked
``compiled_kernels`` again with ``--compiled-kernels`` (the compile contract,
tests/test_compile.py, traces the layers in that configuration in the suite itself).
Tests of the fallback itself use ``forced_eager_fallback``.

Helpers that tests share with the benchmarks live in :mod:`bnorm.testing`."""

import os

import pytest
import torch

_COMPILED_KERNELS = "--compiled-kernels"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        _COMPILED_KERNELS,
        action="store_true",
        help="run bnorm's fused kernels compiled (BNORM_NO_COMPILE=0), as users get them; "
        "eager_fallback marks are ignored",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption(_COMPILED_KERNELS):
        os.environ["BNORM_NO_COMPILE"] = "0"
    else:
        os.environ.setdefault("BNORM_NO_COMPILE", "1")


@pytest.fixture(autouse=True)
def _restore_torch_global_modes():  # type: ignore[no-untyped-def]
    """Torch's process-wide deterministic-algorithms mode as it was before each test:
    Lightning's ``Trainer(deterministic=True)`` (tests/test_lightning.py) turns it on and
    leaves it, and a later test on the same worker (ATen's quantized ops in FX QAT,
    tests/test_ecosystem.py) then fails."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture
def forced_eager_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels' eager fallback, whatever the configuration (tests of the
    fallback itself): neither compiled nor native kernels."""
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")
    monkeypatch.setenv("BNORM_NO_NATIVE", "1")


@pytest.fixture
def eager_fallback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels' eager fallback (a module opts in with ``pytestmark =
    pytest.mark.usefixtures("eager_fallback")``), except under ``--compiled-kernels``."""
    if not request.config.getoption(_COMPILED_KERNELS):
        monkeypatch.setenv("BNORM_NO_COMPILE", "1")


@pytest.fixture
def compiled(eager_fallback: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels compiled with torch.compile (Inductor), the native CPU kernels
    off (tests of the compiled kernels themselves); skipped where it is unavailable.
    (It requests ``eager_fallback`` so as to undo it, whatever order pytest sets up a
    module's fixtures in.)"""
    from bnorm import kernels

    monkeypatch.delenv("BNORM_NO_COMPILE", raising=False)
    monkeypatch.setenv("BNORM_NO_NATIVE", "1")
    if not kernels.compile_enabled():
        pytest.skip("torch.compile is not available here")


@pytest.fixture
def fused_at_every_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused BN + activation Function at every input size, for tests of the fused
    kernels themselves on small tensors (a module opts in with ``pytestmark =
    pytest.mark.usefixtures("fused_at_every_size")``). Everywhere else the suite runs what
    users get: small CPU inputs take ATen's batch norm, add and activation
    (:func:`bnorm.kernels.fused_pays`). Tests of that size dispatch in such a module keep
    the real threshold with ``@pytest.mark.size_dispatch``."""
    if request.node.get_closest_marker("size_dispatch") is None:
        from bnorm.kernels import bn_act

        monkeypatch.setattr(bn_act, "FUSED_MIN_NUMEL", 0)
        monkeypatch.setattr(bn_act, "NATIVE_MIN_NUMEL", 0)
