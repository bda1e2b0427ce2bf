"""Griffe extension: show the docstrings' Sphinx roles as code in the API reference.

The docstrings cross-reference with Sphinx roles (``:func:`bnorm.recalibrate```,
``:class:`~torch.nn.BatchNorm2d```), which Markdown would print literally. This turns each
into inline code (the target, without Sphinx's ``~``); the docstrings stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|data|meth|attr|mod|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
