"""Graph source for a parent whose forward does not trace: the order of a plain
``nn.Sequential`` (its forward is known: each child feeds the next, once)."""

from __future__ import annotations

from torch import nn

from .fx import Site, Uses, qualified
from .rules import (
    Findings,
    ProvenPair,
    bn_problem,
    is_any_batch_norm,
    is_consumer,
    is_producer,
    module_pair_problem,
)


def is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _sequence_pair(
    parent_name: str,
    bn_name: str,
    bn: nn.Module,
    other: nn.Module | None,
    other_name: str,
    side: str,
    site: Site,
    uses: Uses,
    found: Findings,
) -> str | None:
    if other is None:
        return "its neighbour is None"
    layer_name = qualified(parent_name, other_name)
    if side == "after":
        if not is_producer(other):
            return f"it follows a {type(other).__name__} (not a Conv/ConvTranspose/Linear)"
    else:
        if not is_consumer(other):
            return f"it is followed by a {type(other).__name__} (not a Conv/Linear)"
        if found.absorbs_before(layer_name):
            return f"{layer_name} already absorbs another batch norm"
    problem = uses.problem(other, site) or module_pair_problem(bn, other, side)  # type: ignore[arg-type]
    if problem:
        return problem
    found.add(ProvenPair(bn_name, layer_name, side, "nn.Sequential"))
    return None


def find(parent_name: str, parent: nn.Sequential, uses: Uses) -> Findings:
    """The pairs of neighbours in ``parent`` (a plain nn.Sequential)."""
    found = Findings()
    site: Site = (parent_name, -1)
    children = list(parent._modules.items())
    for side in ("after", "before"):
        for i, (child_name, child) in enumerate(children):
            if child is None or not is_any_batch_norm(child):
                continue
            bn_name = qualified(parent_name, child_name)
            if bn_name in found.pairs:
                continue
            problem = bn_problem(child) or uses.problem(child, site)
            if problem is None:
                index = i - 1 if side == "after" else i + 1
                if 0 <= index < len(children):
                    other_name, other = children[index]
                    problem = _sequence_pair(
                        parent_name, bn_name, child, other, other_name, side, site, uses, found
                    )
                else:
                    problem = "no neighbour in its nn.Sequential on that side"
            if problem:
                found.note(bn_name, problem)
    for bn_name in found.pairs:
        found.reasons.pop(bn_name, None)
    return found
