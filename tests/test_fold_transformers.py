"""The batch-norm vision models of Hugging Face ``transformers`` (tiny configs, random
weights, no download), taken from training to inference with bnorm: convert and train like
torch's layers, fold (every batch norm, outputs kept), export (and fold the exported
program), recalibrate and adapt — each against an independent reference."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import bnorm
from bnorm.bench.fold import transformers_models
from bnorm.testing import randomize_statistics
from bnorm.tools import batch_norm_layers

MODELS = transformers_models()
NAMES = sorted(MODELS)


def images(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits  # type: ignore[no-any-return]


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    assert scale > 0  # the comparison can fail
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_the_zoo_is_complete() -> None:
    assert NAMES == sorted(
        ["EfficientNet", "LeViT", "MobileNetV1", "MobileNetV2", "MobileViT", "RegNet", "ResNet"]
    )


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_trains_bit_for_bit_like_torch(name: str) -> None:
    reference = MODELS[name]()
    converted, report = bnorm.convert(copy.deepcopy(reference), bnorm.BatchNorm2d)
    assert report.converted and all(
        type(m).__module__.startswith("bnorm") for _, m in batch_norm_layers(converted)
    )
    y = torch.tensor([0, 2])
    for model in (reference, converted):
        torch.manual_seed(1)  # the same dropout masks for both
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            loss = F.cross_entropy(model(images(step)).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (key, a), b in zip(reference.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(b, a), key  # bit for bit: weights, running statistics, counters


@pytest.mark.parametrize("name", NAMES)
def test_fold_with_an_example_folds_every_batch_norm_and_keeps_the_outputs(name: str) -> None:
    model = randomize_statistics(MODELS[name]())
    x = images(0)
    folded, report = bnorm.fold(model, example_inputs=(x,), return_report=True)
    assert not report.not_folded, str(report)
    assert len(report.folded) == len(batch_norm_layers(model)) > 0
    assert not batch_norm_layers(folded)
    assert_close_relative(logits(folded, images(1)), logits(model, images(1)))


@pytest.mark.parametrize("name", ["LeViT", "MobileNetV1"])
def test_folding_the_exported_program_removes_every_batch_norm(name: str) -> None:
    model, _ = bnorm.convert(randomize_statistics(MODELS[name]()), bnorm.BatchNorm2d)
    x = images(0)
    program = torch.export.export(model.eval(), (x,), strict=False)
    assert any("batch_norm" in str(n.target) for n in program.graph.nodes)  # can fail
    folded = bnorm.fold(program)
    assert isinstance(folded, torch.export.ExportedProgram)
    ops = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
    assert not [op for op in ops if "batch_norm" in op]
    assert_close_relative(folded.module()(x).logits, logits(model, x))


def test_the_folded_program_runs_in_onnxruntime_with_the_same_outputs() -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize_statistics(MODELS["MobileNetV1"]())
    x = images(0)
    folded = bnorm.fold(torch.export.export(model, (x,), strict=False))
    onnx_program = torch.onnx.export(folded, dynamo=True, verbose=False)
    assert onnx_program is not None
    proto = onnx_program.model_proto
    assert not [n.op_type for n in proto.graph.node if n.op_type == "BatchNormalization"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert_close_relative(torch.from_numpy(got), logits(model, x))


@pytest.mark.parametrize("name", ["LeViT"])
def test_recalibrate_matches_a_torch_pass_with_momentum_one(name: str) -> None:
    model, _ = bnorm.convert(randomize_statistics(MODELS[name]()), bnorm.BatchNorm2d)
    reference = copy.deepcopy(model)
    x = images(3, batch=8)
    bnorm.recalibrate(model, [x], progress=False)
    # Independent reference: one training-mode pass with momentum 1 stores the batch's
    # mean and unbiased variance in every layer (only the batch norms in training mode).
    for _, layer in batch_norm_layers(reference):
        layer.momentum = 1.0
        layer.train()
    with torch.no_grad():
        reference(x)
    for (key, got), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["MobileNetV1"])
def test_tent_adapts_a_model_that_returns_a_model_output(name: str) -> None:
    model, _ = bnorm.convert(randomize_statistics(MODELS[name]()), bnorm.BatchNorm2d)
    x = images(4, batch=8)
    reference = copy.deepcopy(model)
    layers = [m for _, m in batch_norm_layers(reference)]
    affine = [p for m in layers for p in (m.weight, m.bias)]
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in affine:
        p.requires_grad_(True)
    for m in layers:
        m.train()
    out = reference(x).logits
    entropy = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean()
    grads = torch.autograd.grad(entropy, affine)
    report = bnorm.adapt(model, [x], "tent", lr=0.1, momentum=0.0, progress=False)
    assert report.outputs is not None and hasattr(report.outputs[0], "logits")
    adapted = [p for _, m in batch_norm_layers(model) for p in (m.weight, m.bias)]
    for p, p0, g in zip(adapted, affine, grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(p.detach(), p0.detach()) for p, p0 in zip(adapted, affine))
