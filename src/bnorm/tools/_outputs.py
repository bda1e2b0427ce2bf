"""What a model returns, read by the tools: the one way to find its logits.

Models return a Tensor, a tuple/list (``(logits, aux)``), a dict, or an object such as
Hugging Face's ``ModelOutput`` (an ordered dict that also has attributes). Every tool that
reads a model's predictions (:func:`bnorm.adapt`'s Tent) finds them with
:func:`find_logits`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["find_logits"]

_MAX_DEPTH = 4


def _first_floating(value: Any, depth: int = 0) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_floating(item, depth + 1)
            if found is not None:
                return found
    return None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} Tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {[str(k) for k in value]}"
    return f"a {type(value).__name__}"


def find_logits(output: Any, who: str = "the model (or forward)") -> Tensor:
    """The logits in ``output``, what a model returned:

    1. ``output`` itself if it is a Tensor;
    2. its ``logits`` entry (``output["logits"]`` of a dict, which covers Hugging Face's
       ``ModelOutput``) or attribute (``output.logits``), if that is a Tensor;
    3. the first floating-point Tensor found in it, depth first in order (tuple/list
       items, dict values; nested up to four levels).

    Raises TypeError ("expected {who} to return logits ... (got ...)") when none is
    found; pass the tool a ``forward=`` that returns the logits then.
    """
    if isinstance(output, Tensor):
        return output
    named = output.get("logits") if isinstance(output, Mapping) else None
    if named is None and not isinstance(output, (Mapping, tuple, list)):
        named = getattr(output, "logits", None)
    if isinstance(named, Tensor):
        return named
    found = _first_floating(output)
    if found is None:
        raise TypeError(
            f"expected {who} to return logits: a Tensor, an object or dict with a 'logits' "
            "Tensor, or a tuple/list/dict holding a floating-point Tensor "
            f"(got {_describe(output)}); pass forward=lambda model, batch: ... returning "
            "the logits"
        )
    return found
