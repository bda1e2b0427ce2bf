"""bnorm's layers in the tools people already use, each compared with torch's layer on
the same model and state: the real tool wherever it installs from PyPI (torch's own
swa_utils, torch.func, fx, torch.ao, torch.export, torch.onnx + onnxruntime, torch.jit,
fvcore, thop, ptflops, torchao), else the documented check of its source reproduced."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.fx.experimental import optimization as fx_optimization
from torch.nn.modules.batchnorm import _BatchNorm

import bnorm


def _net(bn: type[nn.Module], **options) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        bn(4, **options),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        bn(5, **options),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


def _pair(**options) -> tuple[nn.Sequential, nn.Sequential]:
    """(torch's model, bnorm's model) with the same weights and trained statistics."""
    theirs, ours = _net(nn.BatchNorm2d), _net(bnorm.BatchNorm2d, **options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        theirs(torch.randn(8, 3, 6, 6, generator=gen) * 2 + 1)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _batches(n: int = 4, seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 3, 6, 6, generator=gen) * 1.5 - 0.5,
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(n)
    ]


def _assert_same_state(ours: nn.Module, theirs: nn.Module, atol: float = 1e-6) -> None:
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], other[key], rtol=1e-5, atol=atol, msg=key)


# --- class identity --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "torch_cls"),
    [
        (bnorm.BatchNorm1d, nn.BatchNorm1d),
        (bnorm.BatchNorm2d, nn.BatchNorm2d),
        (bnorm.BatchNorm3d, nn.BatchNorm3d),
        (bnorm.BatchNormAct1d, nn.BatchNorm1d),
        (bnorm.BatchNormAct2d, nn.BatchNorm2d),
        (bnorm.BatchNormAct3d, nn.BatchNorm3d),
        (bnorm.BatchNorm, _BatchNorm),
        (bnorm.SyncBatchNorm, _BatchNorm),
    ],
)
def test_layers_are_torchs_batch_norm_classes(cls, torch_cls):
    layer = cls(4)
    assert isinstance(layer, torch_cls) and isinstance(layer, _BatchNorm)
    assert not isinstance(layer, nn.SyncBatchNorm)  # DDP refuses those on CPU
    assert layer.state_dict().keys() == nn.BatchNorm2d(4).state_dict().keys()


def test_frozen_layers_are_not_batch_norm_to_tools_that_recompute_statistics():
    assert not isinstance(bnorm.FrozenBatchNorm2d(4), _BatchNorm)


# --- training recipes ------------------------------------------------------------------


def test_swa_averaged_model_and_update_bn_recompute_statistics_like_torch():
    from torch.optim.swa_utils import AveragedModel, update_bn

    theirs, ours = _pair()
    loader = [x for x, _ in _batches()]
    results = []
    for model in (theirs, ours):
        swa = AveragedModel(model)
        swa.update_parameters(model)
        before = swa.module[1].running_mean.clone()
        update_bn(loader, swa)
        assert not torch.allclose(swa.module[1].running_mean, before)
        results.append(swa)
    _assert_same_state(results[1].module, results[0].module)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(results[1].eval()(x), results[0].eval()(x))


def test_fvcore_precise_bn_updates_statistics_like_torch():
    from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

    theirs, ours = _pair()
    for model in (theirs, ours):
        assert len(get_bn_modules(model)) == 2
        update_bn_stats(model, iter([x for x, _ in _batches()]), num_iters=4)
    _assert_same_state(ours, theirs)


def _sgd_steps(model: nn.Module, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for x, y in _batches(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("check", ["BatchNorm2d", "_BatchNorm"])
def test_freezing_idiom_by_isinstance_freezes_like_torch(check):
    """The fine-tuning idiom (torchvision references, detectron2, timm's freeze):
    ``if isinstance(m, nn.BatchNorm2d): m.eval(); m.requires_grad_(False)``."""
    kind = nn.BatchNorm2d if check == "BatchNorm2d" else _BatchNorm
    theirs, ours = _pair()
    for model in (theirs, ours):
        model.train()
        frozen = [m for m in model.modules() if isinstance(m, kind)]
        for m in frozen:
            m.eval()
            m.requires_grad_(False)
        assert len(frozen) == 2
        stats = [m.running_mean.clone() for m in frozen]
        gammas = [m.weight.clone() for m in frozen]
        _sgd_steps(model)
        for m, s, g in zip(frozen, stats, gammas):
            assert torch.equal(m.running_mean, s) and torch.equal(m.weight, g)
    _assert_same_state(ours, theirs)


def _torchvision_split_normalization_params(model: nn.Module) -> tuple[list, list]:
    """torchvision.ops._utils.split_normalization_params (torchvision 0.15+), reproduced:
    parameters of _BatchNorm, LayerNorm, GroupNorm, _InstanceNorm, LocalResponseNorm
    modules go to the first list."""
    norm_classes = (
        nn.modules.batchnorm._BatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.LocalResponseNorm,
    )
    norm_params, other_params = [], []
    for module in model.modules():
        if next(module.children(), None):
            other_params.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
        elif isinstance(module, norm_classes):
            norm_params.extend(p for p in module.parameters() if p.requires_grad)
        else:
            other_params.extend(p for p in module.parameters() if p.requires_grad)
    return norm_params, other_params


def _mmengine_is_norm(module: nn.Module) -> bool:
    """mmengine.optim DefaultOptimWrapperConstructor's ``norm_decay_mult`` test,
    reproduced: isinstance of (_BatchNorm, _InstanceNorm, GroupNorm, LayerNorm)."""
    return isinstance(
        module, (_BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
    )


def _ultralytics_groups(model: nn.Module) -> tuple[list, list, list]:
    """ultralytics BaseTrainer.build_optimizer's groups, reproduced: norm-layer weights
    (classes of torch.nn whose name contains 'Norm') get no weight decay."""
    norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
    decay, no_decay, biases = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(param)
            elif isinstance(module, norms):
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay, biases


def test_weight_decay_groups_put_batch_norm_parameters_where_torchs_go():
    theirs, ours = _pair()
    for split in (
        lambda m: _torchvision_split_normalization_params(m)[0],
        lambda m: [p for mod in m.modules() if _mmengine_is_norm(mod) for p in mod.parameters()],
        lambda m: _ultralytics_groups(m)[1],
    ):
        mine = {id(p) for p in split(ours)}
        bn_params = {id(p) for m in (ours[1], ours[4]) for p in (m.weight,)}
        assert bn_params <= mine
        assert len(split(ours)) == len(split(theirs)) > 0


def test_func_replace_all_batch_norm_modules_then_vmap_matches_torch():
    from torch.func import replace_all_batch_norm_modules_, vmap

    theirs, ours = _pair()
    x = torch.randn(2, 8, 3, 6, 6)
    outputs = []
    for model in (theirs, ours):
        replace_all_batch_norm_modules_(model)
        assert model[1].running_mean is None and not model[1].track_running_stats
        outputs.append(vmap(model)(x))
    torch.testing.assert_close(outputs[1], outputs[0])


def test_torch_convert_sync_batchnorm_converts_bnorm_layers_and_drops_bnorm_options():
    _, ours = _pair(renorm=True)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ours))
    assert [type(m) for m in converted.modules() if isinstance(m, _BatchNorm)] == [
        nn.SyncBatchNorm
    ] * 2
    assert not hasattr(converted[1], "renorm")
    # bnorm's own converter keeps every option.
    kept = bnorm.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ours))
    assert [type(m) for m in kept.modules() if isinstance(m, _BatchNorm)] == [
        bnorm.SyncBatchNorm
    ] * 2
    assert kept[1].renorm == ours[1].renorm


# --- tracing, quantization, export -----------------------------------------------------


def test_fx_traced_model_switches_between_train_and_eval_like_torchs():
    theirs, ours = _pair()
    traced = torch.fx.symbolic_trace(ours)
    reference = torch.fx.symbolic_trace(theirs)
    for mode in ("eval", "train", "eval"):
        traced.train(mode == "train")
        reference.train(mode == "train")
        x = torch.randn(6, 3, 6, 6)
        torch.testing.assert_close(traced(x), reference(x))
        _assert_same_state(traced, reference)


def _qat(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    x = torch.randn(8, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("fbgemm"), (x,))
        for x, _ in _batches(3):
            prepared(x)
        return convert_fx(prepared.eval())


def test_qat_fx_inference_model_uses_running_statistics_and_keeps_them():
    _, ours = _pair()
    quantized = _qat(ours)
    state = {k: v.clone() for k, v in quantized.state_dict().items() if "running" in k}
    assert len(state) == 4
    x = torch.randn(8, 3, 6, 6)
    full = quantized(x)
    # With running statistics an example's output does not depend on its batch.
    torch.testing.assert_close(quantized(x[:3]), full[:3])
    for key, value in state.items():
        assert torch.equal(quantized.state_dict()[key], value), key


def test_qat_fx_after_converting_to_torch_layers_equals_torchs_qat():
    theirs, ours = _pair()
    torch_ready, report = bnorm.convert(ours, nn.BatchNorm2d)
    assert len(report.converted) == 2
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(_qat(torch_ready)(x), _qat(theirs)(x))


def test_convert_for_inference_drops_training_only_options_and_reports_them():
    theirs, ours = _pair(renorm=True, virtual_batch_size=4)
    with pytest.raises(
        ValueError, match=r"in training mode and has renorm=Renorm.*call model.eval\(\)"
    ):
        bnorm.convert(ours, nn.BatchNorm2d, for_inference=True)
    assert type(ours[1]) is bnorm.BatchNorm2d  # nothing converted
    converted, report = bnorm.convert(ours.eval(), nn.BatchNorm2d, for_inference=True)
    assert [type(m) for m in converted.modules() if isinstance(m, _BatchNorm)] == [
        nn.BatchNorm2d
    ] * 2
    assert [(n, what.split("=")[0]) for n, what in report.dropped] == [
        ("1", "renorm"), ("1", "virtual_batch_size"), ("4", "renorm"), ("4", "virtual_batch_size")
    ]
    assert "dropped virtual_batch_size=4 (training only" in str(report)
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(converted(x), theirs.eval()(x))
    # Tools that match torch's exact classes now fuse.
    fused = torch.ao.quantization.fuse_modules(
        copy.deepcopy(converted), [["0", "1", "2"], ["3", "4"]]
    )
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[4], nn.Identity)
    torch.testing.assert_close(fused(x), theirs(x), rtol=1e-5, atol=1e-5)
    fx_fused = fx_optimization.fuse(converted)
    assert not any(isinstance(m, _BatchNorm) for m in fx_fused.modules())
    torch.testing.assert_close(fx_fused(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (bnorm.BatchNorm(4, axis=-1), r"torch's layers have no channel axis option \(axis=-1\)"),
        (bnorm.BatchNorm(4), r"it accepts inputs of any rank"),
        (bnorm.BatchNormAct2d(4), r"cannot hold an activation"),
    ],
)
def test_convert_for_inference_refuses_layers_without_a_torch_equivalent(layer, message):
    model = nn.Sequential(bnorm.BatchNorm2d(4).eval(), layer.eval())
    with pytest.raises(ValueError, match=message):
        bnorm.convert(model, nn.BatchNorm2d, for_inference=True)
    assert type(model[0]) is bnorm.BatchNorm2d


def test_onnx_legacy_export_runs_in_onnxruntime_like_torchs():
    import onnx
    import onnxruntime

    theirs, ours = _pair()
    x = torch.randn(4, 3, 6, 6)
    results = []
    for model in (theirs.eval(), ours.eval()):
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
        graph = onnx.load_from_string(buffer.getvalue()).graph
        session = onnxruntime.InferenceSession(
            buffer.getvalue(), providers=["CPUExecutionProvider"]
        )
        results.append(
            (sorted(n.op_type for n in graph.node), session.run(None, {"x": x.numpy()})[0])
        )
    assert results[1][0] == results[0][0]
    torch.testing.assert_close(torch.from_numpy(results[1][1]), torch.from_numpy(results[0][1]))
    torch.testing.assert_close(torch.from_numpy(results[1][1]), ours(x), rtol=1e-4, atol=1e-5)


def _batch_norm_nodes(graph: torch.Graph) -> int:
    return sum("batch_norm" in node.kind() for node in graph.nodes())


def test_jit_trace_freeze_and_optimize_for_inference_fold_batch_norm_like_torchs():
    theirs, ours = _pair()
    x = torch.randn(4, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ours.eval(), x)
        assert _batch_norm_nodes(traced.inlined_graph) == 2
        frozen = torch.jit.freeze(traced)
        optimized = torch.jit.optimize_for_inference(torch.jit.trace(ours.eval(), x))
    assert _batch_norm_nodes(frozen.graph) == 0 and _batch_norm_nodes(optimized.graph) == 0
    torch.testing.assert_close(frozen(x), theirs.eval()(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(optimized(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_torch_export_of_eval_model_has_torchs_batch_norm_op():
    theirs, ours = _pair()
    x = torch.randn(4, 3, 6, 6)
    ops = []
    for model in (theirs.eval(), ours.eval()):
        program = torch.export.export(model, (x,))
        ops.append(sorted(str(n.target) for n in program.graph.nodes if n.op == "call_function"))
        torch.testing.assert_close(program.module()(x), theirs(x))
    assert ops[1] == ops[0]
    assert ops[0].count("aten.batch_norm.default") == 2


def test_pt2e_post_training_quantization_folds_batch_norm_like_torchs():
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    theirs, ours = _pair()
    x = torch.randn(4, 3, 6, 6)
    outputs = []
    for model in (theirs.eval(), ours.eval()):
        captured = torch.export.export(model, (x,)).module()
        quantizer = X86InductorQuantizer().set_global(
            get_default_x86_inductor_quantization_config()
        )
        prepared = pt2e.prepare_pt2e(captured, quantizer)
        prepared(x)
        quantized = pt2e.convert_pt2e(prepared)
        assert not any("batch_norm" in str(n.target) for n in quantized.graph.nodes)
        outputs.append(quantized(x))
    torch.testing.assert_close(outputs[1], outputs[0])


def test_fvcore_counts_batch_norm_flops_like_torchs():
    from fvcore.nn import FlopCountAnalysis

    theirs, ours = _pair()
    x = torch.randn(4, 3, 6, 6)
    counts = []
    for model in (theirs.eval(), ours.eval()):
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        counts.append(analysis.by_operator())
    assert counts[1] == counts[0] and counts[0]["batch_norm"] > 0


def test_thop_and_ptflops_count_like_torchs_after_converting_for_inference():
    """thop and ptflops look layers up by exact class: the documented recipe is
    ``bnorm.convert(model.eval(), nn.BatchNorm2d, for_inference=True)`` first."""
    import ptflops
    import thop

    theirs, ours = _pair()
    converted, _ = bnorm.convert(copy.deepcopy(ours).eval(), nn.BatchNorm2d, for_inference=True)
    x = torch.randn(4, 3, 6, 6)
    counts = []
    for model in (theirs.eval(), converted):
        macs, params = thop.profile(copy.deepcopy(model), inputs=(x,), verbose=False)
        flops, _ = ptflops.get_model_complexity_info(
            copy.deepcopy(model),
            (3, 6, 6),
            as_strings=False,
            print_per_layer_stat=False,
            verbose=False,
        )
        counts.append((macs, params, flops))
    assert counts[1] == counts[0]


def test_parametrized_weight_is_read_through_its_parametrization_like_torchs():
    """torch.nn.utils.parametrize moves ``weight`` out of the parameter registry; the
    layer must still normalize with the parametrized value."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    theirs, ours = _pair()
    for model in (theirs, ours):
        parametrize.register_parametrization(model[1], "weight", Doubled())
    x = torch.randn(5, 3, 6, 6)
    for mode in (True, False):
        theirs.train(mode)
        ours.train(mode)
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours[1].weight, 2 * ours[1].parametrizations.weight.original)
