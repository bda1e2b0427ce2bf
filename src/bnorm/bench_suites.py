"""The suites of ``bnorm bench``; each registers itself with :func:`bnorm.bench.register`."""

from __future__ import annotations
