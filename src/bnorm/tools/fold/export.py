"""Graph source: the whole model captured with ``torch.export`` from an example input.

One graph of ATen ops for the whole forward, with shapes: it sees through Python the
symbolic tracer cannot follow (``int()`` of a shape, data-independent control flow), and
through ops that only move data (reshape, flatten, view, permute, transpose, reflect or
replicate padding, averages over other axes), following the channel axis from the shapes.
Nodes map back to modules through the parameters and buffers they read (the program's
signature, or the ``get_attr`` targets of an unlifted graph): a pair's modules are those
owning the weights its ops read.

Single use is proven on the graph: the layer's output (or the batch norm's) feeds the
other alone, through a chain of single-use data moves, and each parameter and buffer of
the pair is read by its one op (a module called twice, or whose weights are read
elsewhere, reads them twice). The proof holds for the path the example input takes:
inputs of other shapes that take other branches of shape-dependent Python are not
covered (as for ``torch.export`` itself).
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.operator_schemas import normalize_function

from .fx import RestoredAttributes, flat_args
from .rules import (
    Findings,
    LayerView,
    NormView,
    ProvenPair,
    Side,
    axes_through_permute,
    axes_through_reduce,
    axes_through_reshape,
    bn_problem,
    has_hooks,
    is_any_batch_norm,
    module_pair_problem,
    padding_is_zero,
    pair_problem,
)

aten = torch.ops.aten

_BATCH_NORM_OPS = {
    aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default,
    aten.native_batch_norm.default,
}
_CONV_OPS = {
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv1d.padding,
    aten.conv2d.padding,
    aten.conv3d.padding,
    aten.convolution.default,
}
_CONV_T_OPS = {
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
}
_RESHAPES = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.reshape_as.default,
    aten.view_as.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.unsqueeze.default,
}
_SAME_LAYOUT = {
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
}
_AVERAGES = {
    aten.adaptive_avg_pool1d.default: 1,
    aten.adaptive_avg_pool2d.default: 2,
    aten.adaptive_avg_pool3d.default: 3,
}
_COPY_PADS = {
    aten.reflection_pad1d.default,
    aten.reflection_pad2d.default,
    aten.reflection_pad3d.default,
    aten.replication_pad1d.default,
    aten.replication_pad2d.default,
    aten.replication_pad3d.default,
}
# Ops whose second argument only lends its shape.
_SHAPE_ONLY = {aten.reshape_as.default, aten.view_as.default, aten.expand_as.default}


def _kwargs(node: torch.fx.Node) -> dict[str, Any] | None:
    """``node``'s arguments by schema name, defaults filled in (None if not an op)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    pair = normalize_function(
        node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True
    )
    return None if pair is None else dict(pair.kwargs)


def _shape(node: Any) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(value, Tensor):
        return None
    try:
        return tuple(int(d) for d in value.shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read ``node``'s values, once per reading argument (an op that only
    takes its shape, as ``reshape_as``'s second argument, does not count)."""
    out: list[torch.fx.Node] = []
    for user in node.users:
        count = flat_args(user).count(node)
        if user.target in _SHAPE_ONLY and user.args and user.args[0] is not node:
            count = 0
        if user.target is aten.sym_size.int:
            count = 0
        out.extend([user] * count)
    return out


def _through(node: torch.fx.Node, axes: frozenset[int]) -> frozenset[int] | None:
    """Where the ``axes`` of ``node``'s first input are in its output, if ``node`` only
    moves data (or averages over other axes); None if it is not such an op."""
    target = node.target
    if target in _SAME_LAYOUT or (
        target is aten.dropout.default and not (_kwargs(node) or {}).get("train", True)
    ):
        return axes
    source = node.args[0] if node.args else None
    before, after = _shape(source), _shape(node)
    if before is None or after is None:
        return None
    if target in _RESHAPES:
        return axes_through_reshape(before, after, axes)
    if target is aten.permute.default:
        return axes_through_permute(node.args[1], axes)  # type: ignore[arg-type]
    if target is aten.transpose.int:
        dims = list(range(len(before)))
        i, j = (int(d) % len(before) for d in node.args[1:3])  # type: ignore[arg-type]
        dims[i], dims[j] = dims[j], dims[i]
        return axes_through_permute(dims, axes)
    if target is aten.mean.dim:
        kwargs = _kwargs(node) or {}
        if kwargs.get("dtype") is not None or kwargs.get("dim") in (None, []):
            return None
        return axes_through_reduce(len(before), kwargs["dim"], bool(kwargs["keepdim"]), axes)
    if target is aten.pad.default or target in _COPY_PADS:
        # reflect/replicate/circular padding copies values within each channel (a constant
        # pad would put a value the batch norm's map does not match at the border)
        kwargs = _kwargs(node) or {}
        if target is aten.pad.default and kwargs.get("mode", "constant") == "constant":
            return None
        padded = len(kwargs.get("pad", kwargs.get("padding", []))) // 2
        return frozenset(a for a in axes if a < len(before) - padded)
    if target in _AVERAGES:
        k = _AVERAGES[target]  # type: ignore[index]
        return axes_through_reduce(len(before), range(len(before) - k, len(before)), True, axes)
    return None


@dataclass(frozen=True)
class LayerOp:
    """A convolution or linear op in the graph, with the names (FQNs) of its weights."""

    node: torch.fx.Node
    input: Any
    weight: str
    bias: str | None
    view: LayerView


@dataclass(frozen=True)
class NormOp:
    """A batch-norm op in the graph: its input and output nodes and tensor names."""

    node: torch.fx.Node
    input: Any
    output: torch.fx.Node | None  # None: the output is not read as a single tensor
    names: dict[str, str | None]  # weight, bias, running_mean, running_var -> FQN
    view: NormView


@dataclass(frozen=True)
class NodePair:
    norm: NormOp
    layer: LayerOp
    side: Side


class GraphTensors:
    """The parameters and buffers an ATen graph reads: which node is which tensor (by
    its name in the model, a FQN), and how many reads each tensor has in the graph."""

    def __init__(
        self,
        graph: torch.fx.Graph,
        names: dict[torch.fx.Node, str],
        tensor: Callable[[str], Tensor],
    ) -> None:
        self.names = names
        self.tensor = tensor
        self.reads: Counter[str] = Counter()
        for node, name in names.items():
            self.reads[name] += len(value_users(node))

    @classmethod
    def of_program(cls, program: torch.export.ExportedProgram) -> GraphTensors:
        signature = program.graph_signature
        by_input = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        names = {
            n: by_input[n.name]
            for n in program.graph.nodes
            if n.op == "placeholder" and n.name in by_input
        }
        state = program.state_dict
        constants = program.constants
        return cls(
            program.graph,
            names,
            lambda fqn: state[fqn] if fqn in state else constants[fqn],  # type: ignore[return-value]
        )

    @classmethod
    def of_module(cls, module: torch.fx.GraphModule) -> GraphTensors:
        names = {n: str(n.target) for n in module.graph.nodes if n.op == "get_attr"}

        def tensor(fqn: str) -> Tensor:
            owner, _, attr = fqn.rpartition(".")
            return getattr(module.get_submodule(owner), attr)  # type: ignore[no-any-return]

        return cls(module.graph, names, tensor)

    def name(self, value: Any) -> str | None:
        return self.names.get(value) if isinstance(value, torch.fx.Node) else None


def _norm_op(node: torch.fx.Node, tensors: GraphTensors) -> NormOp | str:
    kwargs = _kwargs(node) or {}
    names = {
        k: tensors.name(kwargs.get(k)) for k in ("weight", "bias", "running_mean", "running_var")
    }
    if (
        kwargs.get("training", False)
        or names["running_mean"] is None
        or names["running_var"] is None
    ):
        return "it normalizes with batch statistics in the exported graph (training mode)"
    for key in ("weight", "bias"):
        if kwargs.get(key) is not None and names[key] is None:
            return f"its {key} is computed in the graph, not a parameter"
    output: torch.fx.Node | None = node
    if node.target is not aten.batch_norm.default:  # a tuple: (output, save_mean, save_invstd)
        getters = list(node.users)
        firsts = [u for u in getters if u.target is operator.getitem and u.args[1] == 0]
        output = firsts[0] if len(firsts) == 1 and len(getters) == 1 else None
    shape = _shape(kwargs["input"])
    view = NormView(
        "batch_norm",
        tensors.tensor(names["running_mean"]),  # type: ignore[arg-type]
        tensors.tensor(names["running_var"]),  # type: ignore[arg-type]
        tensors.tensor(names["weight"]) if names["weight"] else None,
        tensors.tensor(names["bias"]) if names["bias"] else None,
        float(kwargs["eps"]),
        1,
        None if shape is None else (len(shape),),
    )
    return NormOp(node, kwargs["input"], output, names, view)


def _layer_op(node: torch.fx.Node, tensors: GraphTensors) -> LayerOp | None:
    if node.target not in _CONV_OPS | _CONV_T_OPS | {aten.linear.default}:
        return None
    kwargs = _kwargs(node) or {}
    weight = tensors.name(kwargs.get("weight"))
    bias = tensors.name(kwargs.get("bias"))
    if weight is None or (kwargs.get("bias") is not None and bias is None):
        return None  # weights computed in the graph: nothing to fold them into
    w = tensors.tensor(weight)
    linear = node.target is aten.linear.default
    transposed = node.target in _CONV_T_OPS or bool(kwargs.get("transposed", False))
    zero_pads = False
    if not linear and not transposed:
        kernel = list(w.shape[2:])
        dilation = kwargs.get("dilation", 1)
        dilation = [dilation] * len(kernel) if isinstance(dilation, int) else list(dilation)
        zero_pads = not padding_is_zero(kwargs.get("padding", 0), kernel, dilation)
    view = LayerView(
        str(node.target).split(".")[1] if "." in str(node.target) else str(node.target),
        w,
        tensors.tensor(bias) if bias else None,
        linear=linear,
        transposed=transposed,
        groups=int(kwargs.get("groups", 1) or 1),
        zero_pads=zero_pads,
    )
    return LayerOp(node, kwargs["input"], weight, bias, view)


def _single(node: torch.fx.Node, reader: torch.fx.Node) -> str | None:
    users = value_users(node)
    if users == [reader]:
        return None
    shown = ", ".join(sorted({"the output" if u.op == "output" else u.name for u in users}))
    return f"{node.name} has other consumers ({shown})" if users else f"{node.name} is unused"


def _after(norm: NormOp, tensors: GraphTensors) -> NodePair | str:
    chain: list[torch.fx.Node] = []
    current = norm.input
    while isinstance(current, torch.fx.Node) and _layer_op(current, tensors) is None:
        if _through(current, frozenset({0})) is None:
            what = current.target if current.op == "call_function" else current.op
            return f"its input comes from {what} (not a Conv/ConvTranspose/Linear)"
        chain.append(current)
        current = current.args[0]  # type: ignore[assignment]
    if not isinstance(current, torch.fx.Node):
        return "its input is not computed in the graph"
    layer = _layer_op(current, tensors)
    assert layer is not None
    readers = [*reversed(chain), norm.node]
    for node, reader in zip([current, *reversed(chain)], readers):
        problem = _single(node, reader)
        if problem:
            return f"its input, the output of {layer.weight.rpartition('.')[0]}: {problem}"
    shape = _shape(current)
    if shape is None:
        return "the graph has no static shape for its input"
    axes = frozenset({layer.view.channel_axis(len(shape))})
    for node in reversed(chain):
        axes = _through(node, axes) or frozenset()
    if 1 not in axes:
        return "its channel axis is not the output-channel axis of the layer before it"
    return NodePair(norm, layer, "after")


def _before(norm: NormOp, tensors: GraphTensors) -> NodePair | str:
    if norm.output is None:
        return "its op's other outputs are read"
    current = norm.output
    shape = _shape(norm.input)
    if shape is None:
        return "the graph has no static shape for its input"
    axes = frozenset({1})
    while True:
        users = value_users(current)
        if len(users) != 1:
            shown = ", ".join(sorted({"the output" if u.op == "output" else u.name for u in users}))
            return (
                f"its output has several consumers ({shown})" if users else "its output is unused"
            )
        user = users[0]
        layer = _layer_op(user, tensors)
        if layer is not None:
            break
        moved = _through(user, axes) if user.args and user.args[0] is current else None
        if moved is None:
            what = user.target if user.op == "call_function" else "the output"
            return f"its output goes to {what} (not a Conv/Linear)"
        axes, current = moved, user
    if layer.input is not current:
        return "its output is not the input of the layer after it"
    if layer.view.transposed:
        return "its output goes to a ConvTranspose (not a Conv/Linear)"
    rank = _shape(current)
    if rank is None or layer.view.channel_axis(len(rank)) not in axes:
        return "its channel axis is not the input-channel axis of the layer after it"
    return NodePair(norm, layer, "before")


def _reads_once(names: list[str | None], tensors: GraphTensors) -> str | None:
    for name in names:
        if name is not None and tensors.reads[name] != 1:
            owner = name.rpartition(".")[0]
            return f"{owner} is called more than once or its tensors are read elsewhere ({name})"
    return None


def owner(norm: NormOp) -> str:
    """The batch-norm module's name: the owner of its running mean."""
    return str(norm.names["running_mean"]).rpartition(".")[0]


def find_pairs(
    graph: torch.fx.Graph, tensors: GraphTensors
) -> tuple[list[NodePair], dict[str, list[str]]]:
    """Every provable pair of ``graph``, and why each other batch-norm op is kept (by the
    name of its module)."""
    pairs: list[NodePair] = []
    reasons: dict[str, list[str]] = {}
    norms: list[NormOp] = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _BATCH_NORM_OPS:
            norm = _norm_op(node, tensors)
            if isinstance(norm, str):
                name = next((tensors.name(a) for a in node.args[3:5] if tensors.name(a)), node.name)
                reasons.setdefault(str(name).rpartition(".")[0], []).append(norm)
            else:
                norms.append(norm)
    taken: set[tuple[str, str]] = set()  # (layer weight, side)
    for side in ("after", "before"):
        for norm in norms:
            if any(p.norm is norm for p in pairs):
                continue
            found = _after(norm, tensors) if side == "after" else _before(norm, tensors)
            if isinstance(found, NodePair):
                problem = (
                    _reads_once(
                        [*norm.names.values(), found.layer.weight, found.layer.bias], tensors
                    )
                    or pair_problem(norm.view, found.layer.view, found.side, axis_proven=True)
                    or (
                        "it shares its layer with another batch norm"
                        if (found.layer.weight, side) in taken
                        else None
                    )
                )
                if problem is None:
                    taken.add((found.layer.weight, side))
                    pairs.append(found)
                    continue
                found = problem
            reasons.setdefault(owner(norm), []).append(found)
    for pair in pairs:
        reasons.pop(owner(pair.norm), None)
    return pairs, reasons


# --------------------------------------------------------------------------------------
# Capturing a model, and mapping pairs back to its modules


def capture(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.export.ExportedProgram | None, str]:
    """``torch.export`` of ``model`` (non-strict, then strict); (program, "") or (None,
    why it failed)."""
    errors = []
    for strict in (False, True):
        mode = "strict" if strict else "non-strict"
        try:
            with _quiet() as caught, RestoredAttributes(model, _is_tensor) as restored:
                program = torch.export.export(model, args, kwargs, strict=strict)
        except Exception as err:  # any failure: try the other mode, then report
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            errors.append(f"{mode}: {type(err).__name__}: {text[:160]}")
            continue
        stored = restored.stored + _assigned_attributes(caught)
        if stored:
            return None, f"forward stores intermediate values on the module ({stored[0]})"
        return program, ""
    return None, "; ".join(errors)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Record the warnings of an export and silence logging meanwhile (a failed export
    logs whole graphs; the report gives the error's first line)."""
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("always")
            yield caught
    finally:
        logging.disable(disabled)


_ASSIGNED = re.compile(r"tensor attributes? (.*?) (?:was|were) assigned during export")


def _assigned_attributes(caught: list[warnings.WarningMessage]) -> list[str]:
    """The plain attributes (``self.x``) that torch.export saw the forward assign
    tensors to: values kept for later, which the graph does not show. Entries put into a
    container attribute (``self.cache['cpu']``, e.g. LeViT's attention-bias cache, computed
    from parameters) are not counted."""
    names: list[str] = []
    for warning in caught:
        found = _ASSIGNED.search(str(warning.message))
        if found:
            names += [n.strip() for n in found.group(1).split(",") if "[" not in n]
    return names


def _module(root: nn.Module, fqn: str | None) -> tuple[str, nn.Module | None]:
    if fqn is None:
        return "", None
    name = fqn.rpartition(".")[0]
    try:
        return name, root.get_submodule(name)
    except AttributeError:
        return name, None


def find(root: nn.Module, program: torch.export.ExportedProgram) -> Findings:
    """The pairs of ``program`` (an export of ``root``) as proven pairs of ``root``'s modules."""
    registrations = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    pairs, reasons = find_pairs(program.graph, GraphTensors.of_program(program))
    found = Findings()
    for name, why in reasons.items():
        for reason in why:
            found.note(name, reason)
    for pair in pairs:
        bn_name, bn = _module(root, pair.norm.names["running_mean"])
        layer_name, layer = _module(root, pair.layer.weight)
        problem = None
        if bn is None or not is_any_batch_norm(bn):
            continue  # a batch_norm op on tensors that are not a batch-norm module's
        if (
            layer is None
            or pair.layer.weight != f"{layer_name}.weight"
            or (pair.layer.bias not in (None, f"{layer_name}.bias"))
        ):
            problem = (
                "the weights of its neighbour are not a module's weight and bias "
                f"({pair.layer.weight})"
            )
        expected = {k: f"{bn_name}.{k}" for k in pair.norm.names}
        if any(v is not None and v != expected[k] for k, v in pair.norm.names.items()):
            problem = problem or "its op reads tensors of other modules"
        for module, name in ((bn, bn_name), (layer, layer_name)):
            if module is not None and registrations[id(module)] > 1:
                problem = (
                    problem or f"{name} is registered at more than one place in the model (shared)"
                )
            if module is not None and has_hooks(module):
                problem = problem or f"{name} has hooks"
        problem = (
            problem or bn_problem(bn) or module_pair_problem(bn, layer, pair.side, axis_proven=True)
        )
        if problem:
            found.note(bn_name, problem)
        else:
            found.add(ProvenPair(bn_name, layer_name, pair.side, "torch.export"))
    for name in found.pairs:
        found.reasons.pop(name, None)
    return found
