"""Folding an ``ExportedProgram``: the pairs of its graph (the export source's rules)
folded into an unlifted copy of it, which is exported again."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .api import FoldedLayer, FoldReport, NotFoldedLayer
from .export import GraphTensors, NodePair, find_pairs, owner
from .rules import LayerView, folded_weights


def _set_tensor(module: torch.fx.GraphModule, fqn: str, value: Tensor) -> None:
    parent_name, _, attr = fqn.rpartition(".")
    parent = module.get_submodule(parent_name)
    if attr in parent._buffers:
        parent._buffers[attr] = value
    else:
        parent._parameters.pop(attr, None)
        parent.register_parameter(attr, nn.Parameter(value, requires_grad=False))


def _bias_node(module: torch.fx.GraphModule, pair: NodePair, bias: Tensor) -> Any:
    """The node that reads the layer's (new) bias; a new parameter if it had none."""
    if pair.layer.bias is not None:
        _set_tensor(module, pair.layer.bias, bias)
        return next(
            n for n in module.graph.nodes if n.op == "get_attr" and n.target == pair.layer.bias
        )
    parent_name, _, _ = pair.layer.weight.rpartition(".")
    name = "bias"
    parent = module.get_submodule(parent_name)
    while hasattr(parent, name):
        name = f"{name}_folded"
    fqn = f"{parent_name}.{name}" if parent_name else name
    parent.register_parameter(name, nn.Parameter(bias, requires_grad=False))
    with module.graph.inserting_before(pair.layer.node):
        return module.graph.get_attr(fqn)


def _rewrite(module: torch.fx.GraphModule, pairs: list[NodePair]) -> None:
    """Compute every new weight first, then set them and drop the batch-norm ops."""
    views: dict[str, tuple[NodePair, LayerView]] = {}
    for pair in pairs:
        first, view = views.get(pair.layer.weight, (pair, pair.layer.view))
        weight, bias = folded_weights(pair.norm.view, view, pair.side)
        views[pair.layer.weight] = (
            first,
            LayerView(
                view.kind, weight, bias, view.linear, view.transposed, view.groups, view.zero_pads
            ),
        )
    for fqn, (pair, view) in views.items():
        assert view.bias is not None
        _set_tensor(module, fqn, view.weight)
        bias_node = _bias_node(module, pair, view.bias)
        node = pair.layer.node
        kwargs = dict(node.kwargs)
        args = list(node.args)
        if len(args) > 2:
            args[2] = bias_node
        else:
            kwargs["bias"] = bias_node
        node.args, node.kwargs = tuple(args), kwargs
    for pair in pairs:
        norm = pair.norm
        assert norm.output is not None
        norm.output.replace_all_uses_with(norm.input)
        if norm.output is not norm.node:
            module.graph.erase_node(norm.output)
        module.graph.erase_node(norm.node)
    module.graph.eliminate_dead_code()
    used = {str(n.target) for n in module.graph.nodes if n.op == "get_attr"}
    for pair in pairs:  # the batch norm's tensors (num_batches_tracked too) go
        name = owner(pair.norm)
        parent = module.get_submodule(name)
        for attr in [*parent._parameters, *parent._buffers]:
            if (f"{name}.{attr}" if name else attr) not in used:
                parent._parameters.pop(attr, None)
                parent._buffers.pop(attr, None)
    module.recompile()


def fold_program(
    program: torch.export.ExportedProgram,
    example: tuple[tuple[Any, ...], dict[str, Any]] | None,
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold the provable pairs of ``program``'s graph and export the result again from
    ``example`` (default: the program's own example inputs)."""
    if example is None:
        example = program.example_inputs
        if example is None:
            raise ValueError(
                "expected an ExportedProgram that keeps its example inputs, or "
                "example_inputs=... (got a program without example inputs)"
            )
    module = program.module()
    tensors = GraphTensors.of_module(module)  # type: ignore[arg-type]
    pairs, reasons = find_pairs(module.graph, tensors)  # type: ignore[arg-type]
    training = [name for name, why in reasons.items() if any("training mode" in r for r in why)]
    if training:
        raise ValueError(
            "expected an ExportedProgram of a model in eval mode, where batch norm is a "
            f"fixed affine map (got training-mode batch norm in {', '.join(training[:5])}); "
            "export model.eval()"
        )
    report = FoldReport(
        folded=[
            FoldedLayer(owner(p.norm), p.layer.weight.rpartition(".")[0], p.side, "torch.export")
            for p in pairs
        ],
        not_folded=[NotFoldedLayer(name, "; ".join(why)) for name, why in reasons.items()],
    )
    if not pairs:
        return program, report
    _rewrite(module, pairs)  # type: ignore[arg-type]
    args, kwargs = example
    try:
        folded = torch.export.export(module, tuple(args), dict(kwargs), strict=False)
    except Exception as err:
        raise ValueError(
            "expected example inputs the program accepts to export the folded graph again "
            f"(got {type(err).__name__}: {str(err).strip()[:300]})"
        ) from err
    return folded, report
