"""The study's networks are tiny: one torch thread is faster than two and does not
stall when other processes share the cores. Restored after each test module. And the
small study the `--jobs` tests compare against, run sequentially once per module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from jobs_common import study


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The small study (jobs_common.SMALL) run sequentially: the metrics to match."""
    return study(tmp_path_factory.mktemp("seq"), "run")
