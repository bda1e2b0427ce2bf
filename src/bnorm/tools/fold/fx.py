"""Graph source: each parent module's forward traced symbolically with ``torch.fx``, its
submodules as leaves. A pair must be siblings in that parent; single use is read from the
parent's graph(s) and from where the other graphs call the same modules. No example
input is needed; forwards with data-dependent control flow or Python arithmetic on shapes
(``int()`` of a traced value) do not trace."""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from .rules import (
    Findings,
    ProvenPair,
    bn_problem,
    has_hooks,
    is_any_batch_norm,
    is_consumer,
    is_producer,
    module_pair_problem,
)

#: A call site: (parent name, index of the parent's graph); index -1: nn.Sequential order.
Site = tuple[str, int]

CONTAINERS = (nn.ModuleList, nn.ModuleDict)


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Trace one module's own forward: every submodule call is a leaf node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _defaults(parent: nn.Module) -> dict[str, Any]:
    """The forward's parameters that have default values (keyword-able ones)."""
    try:
        parameters = inspect.signature(parent.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in parameters
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


class RestoredAttributes:
    """Undo whatever a traced forward assigns to the attributes of ``module``'s modules,
    and list the attributes it stored traced values in (``stored``, names): a value
    kept on a module is a use the graph does not show. ``traced`` says which values
    count (fx proxies; tensors for torch.export)."""

    def __init__(self, module: nn.Module, traced: Callable[[Any], bool]) -> None:
        self.saved = {m: dict(m.__dict__) for m in module.modules()}
        # the contents of dict/list attributes too (a cache filled during tracing)
        self.contents = [
            (v, copy.copy(v))
            for before in self.saved.values()
            for k, v in before.items()
            if isinstance(v, (dict, list)) and not k.startswith("_")
        ]
        self.traced = traced
        self.stored: list[str] = []

    def __enter__(self) -> RestoredAttributes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stored = [
            k
            for m, before in self.saved.items()
            for k, v in m.__dict__.items()
            if (k not in before or before[k] is not v) and _holds(v, self.traced)
        ]
        for container, content in self.contents:
            if isinstance(container, dict) and not _same_items(container, content):
                container.clear()
                container.update(content)  # type: ignore[arg-type]
            elif isinstance(container, list) and not _same_items(container, content):
                container[:] = content
        for m, before in self.saved.items():
            now = m.__dict__
            if len(now) != len(before) or any(before.get(k, now) is not v for k, v in now.items()):
                now.clear()
                now.update(before)


def _same_items(now: Any, before: Any) -> bool:
    """Whether a dict or list holds the very same items as its earlier copy."""
    if len(now) != len(before):
        return False
    if isinstance(now, dict):
        return all(k in before and before[k] is v for k, v in now.items())
    return all(a is b for a, b in zip(now, before))


def _holds(value: Any, traced: Callable[[Any], bool], depth: int = 0) -> bool:
    if traced(value):
        return True
    if depth < 2 and isinstance(value, (list, tuple, set)):
        return any(_holds(v, traced, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return any(_holds(v, traced, depth + 1) for v in value.values())
    return False


def _trace_once(parent: nn.Module, concrete: dict[str, Any] | None) -> torch.fx.Graph:
    with RestoredAttributes(parent, lambda v: isinstance(v, torch.fx.Proxy)) as restored:
        graph = _ChildrenAsLeaves().trace(parent, concrete_args=concrete)
    if restored.stored:
        raise RuntimeError(
            f"forward stores intermediate values on the module ({restored.stored[0]!r})"
        )
    return graph


def _trace(parent: nn.Module) -> list[torch.fx.Graph]:
    """The graphs of ``parent.forward`` with its submodules as leaves: one with every
    argument symbolic and, if the forward has defaulted arguments, one with those at
    their defaults (``if mask is None:`` takes a different branch in each). A fold must
    be safe in both. Raises if either does not trace, or if the forward stores traced
    values on a module (then the graph would not show every use)."""
    graphs = [_trace_once(parent, None)]
    defaults = _defaults(parent)
    if defaults:
        try:
            graphs.append(_trace_once(parent, defaults))
        except Exception as err:
            raise type(err)(f"with its default arguments: {err}") from err
    return graphs


def owned(parent: nn.Module, target: str) -> bool:
    """Whether ``parent.<target>`` is a child of ``parent`` or sits in ModuleList/
    ModuleDict children of it (containers without a forward: only ``parent`` can call
    what they hold)."""
    module = parent
    for part in target.split(".")[:-1]:
        module = module.get_submodule(part)
        if not isinstance(module, CONTAINERS):
            return False
    return True


def qualified(parent_name: str, target: str) -> str:
    return f"{parent_name}.{target}" if parent_name else target


def parents(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose forward may pair their children: those with children, but
    ModuleList/ModuleDict (which have no forward)."""
    return [
        (name, m)
        for name, m in root.named_modules()
        if m._modules and not isinstance(m, CONTAINERS)
    ]


@dataclass
class Uses:
    """Where each module of the model is registered and called, as the traced graphs
    show; :meth:`problem` says why a module may be used elsewhere than at ``site``."""

    names: dict[int, str]
    registrations: Counter[int]
    calls: dict[int, list[Site]] = field(default_factory=dict)
    attribute_reads: set[int] = field(default_factory=set)

    def problem(self, module: nn.Module, site: Site) -> str | None:
        name = self.names[id(module)]
        if self.registrations[id(module)] > 1:
            return f"{name} is registered at more than one place in the model (shared)"
        sites = self.calls.get(id(module), [])
        if sites.count(site) > 1:
            return f"{name} is called more than once"
        others = sorted({parent for parent, _ in sites if parent != site[0]})
        if others:
            return f"{name} is also called from {others[0] or 'the model'}.forward"
        if id(module) in self.attribute_reads:
            return f"{name}'s parameters are also read directly by the forward"
        if has_hooks(module):
            return f"{name} has hooks"
        return None


@dataclass
class Traces:
    """The fx graphs of every parent that traces, the error of every one that does not,
    and the uses of the modules they show."""

    graphs: dict[str, list[torch.fx.Graph]]
    errors: dict[str, str]
    uses: Uses


def trace_parents(root: nn.Module) -> Traces:
    uses = Uses(
        {id(m): name for name, m in root.named_modules()},
        Counter(id(m) for _, m in root.named_modules(remove_duplicate=False)),
    )
    graphs: dict[str, list[torch.fx.Graph]] = {}
    errors: dict[str, str] = {}
    for name, parent in parents(root):
        try:
            traced = _trace(parent)
        except Exception as err:  # any failure means: cannot prove anything here
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            errors[name] = f"{type(err).__name__}: {text[:160]}"
            continue
        graphs[name] = traced
        for index, graph in enumerate(traced):
            for node in graph.nodes:
                if node.op == "call_module":
                    module = parent.get_submodule(str(node.target))
                    uses.calls.setdefault(id(module), []).append((name, index))
                elif node.op == "get_attr":
                    owner, _, _ = str(node.target).rpartition(".")
                    try:
                        uses.attribute_reads.add(id(parent.get_submodule(owner)))
                    except AttributeError:
                        pass
    return Traces(graphs, errors, uses)


def flat_args(node: torch.fx.Node) -> list[Any]:
    out: list[Any] = []

    def keep(n: torch.fx.Node) -> torch.fx.Node:
        out.append(n)
        return n

    torch.fx.node.map_arg((node.args, node.kwargs), keep)
    return out


def _consumers(node: torch.fx.Node) -> str:
    return ", ".join("the output" if u.op == "output" else u.name for u in node.users)


def _graph_pair(
    parent_name: str,
    parent: nn.Module,
    node: torch.fx.Node,
    side: str,
    site: Site,
    uses: Uses,
    found: Findings,
) -> str | None:
    """Plan the fold of ``node``'s batch norm on ``side`` into ``found``; else why not."""
    bn = parent.get_submodule(str(node.target))
    bn_name = qualified(parent_name, str(node.target))
    problem = bn_problem(bn) or uses.problem(bn, site)
    if problem:
        return problem
    if side == "after":
        source = node.args[0] if node.args else node.kwargs.get("input")
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"):
            return "its input is not the output of a submodule"
        target = str(source.target)
        layer = parent.get_submodule(target)
        if not owned(parent, target):
            return f"{target} is not a sibling in {parent_name or 'the model'}"
        if not is_producer(layer):
            return (
                f"its input comes from a {type(layer).__name__} (not a Conv/ConvTranspose/Linear)"
            )
        if len(source.users) > 1 or flat_args(node).count(source) > 1:
            return (
                f"its input, the output of {qualified(parent_name, target)}, "
                f"has other consumers ({_consumers(source)})"
            )
        if len(source.args) != 1 or source.kwargs:
            return f"{target} is called with extra arguments"
    else:
        users = list(node.users)
        if len(users) != 1:
            return (
                f"its output has several consumers ({_consumers(node)})"
                if users
                else "its output is unused"
            )
        source = users[0]
        if source.op == "output":
            return "its output is the forward's output"
        target = str(source.target)
        if source.op != "call_module" or not owned(parent, target):
            return f"its output goes to {source.name} (not a sibling Conv/Linear)"
        layer = parent.get_submodule(target)
        if not is_consumer(layer):
            return f"its output goes to a {type(layer).__name__} (not a Conv/Linear)"
        if len(source.args) != 1 or source.kwargs or source.args[0] is not node:
            return f"{target} is called with extra arguments"
        if found.absorbs_before(qualified(parent_name, target)):
            return f"{qualified(parent_name, target)} already absorbs another batch norm"
    problem = uses.problem(layer, site) or module_pair_problem(bn, layer, side)  # type: ignore[arg-type]
    if problem:
        return problem
    found.add(ProvenPair(bn_name, qualified(parent_name, target), side, "torch.fx"))
    return None


def _graph_findings(
    parent_name: str, parent: nn.Module, graph: torch.fx.Graph, site: Site, uses: Uses
) -> Findings:
    found = Findings()
    bn_nodes = [
        n
        for n in graph.nodes
        if n.op == "call_module"
        and owned(parent, str(n.target))
        and is_any_batch_norm(parent.get_submodule(str(n.target)))
    ]
    for side in ("after", "before"):
        for node in bn_nodes:
            bn_name = qualified(parent_name, str(node.target))
            if bn_name in found.pairs:
                continue
            reason = _graph_pair(parent_name, parent, node, side, site, uses, found)
            if reason is not None:
                found.note(bn_name, reason)
    return found


def find(root: nn.Module, traces: Traces) -> Findings:
    """The pairs proven by the graphs of every traced parent: a pair holds only if every
    graph of its parent (symbolic, and at the defaults) makes it."""
    result = Findings()
    for name, parent in parents(root):
        graphs = traces.graphs.get(name)
        if graphs is None:
            continue
        agreed: dict[str, ProvenPair] | None = None
        where = f"{name or 'the model'}.forward"
        for index, graph in enumerate(graphs):
            found = _graph_findings(name, parent, graph, (name, index), traces.uses)
            for bn_name, reasons in found.reasons.items():
                if bn_name not in found.pairs:
                    for reason in reasons:
                        result.note(bn_name, reason)
            if agreed is None:
                agreed = dict(found.pairs)
                continue
            for bn_name, pair in list(agreed.items()):
                if found.pairs.get(bn_name) != pair:
                    del agreed[bn_name]
                    if bn_name in found.pairs:
                        result.note(
                            bn_name,
                            f"it would fold differently depending on the arguments of {where}",
                        )
                    elif bn_name not in result.reasons:
                        result.note(bn_name, f"it is called on some paths of {where} only")
        result.pairs.update(agreed or {})
    return result
