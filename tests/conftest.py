"""Test-suite setup: bnorm's fused kernels run eagerly (no torch.compile, which costs
seconds per kernel variant) unless a test asks for compilation — see the ``compiled``
fixture of tests/test_kernels.py. Set BNORM_NO_COMPILE=0 to run everything compiled."""

import os

os.environ.setdefault("BNORM_NO_COMPILE", "1")
