"""bnorm's layers against torch.nn.BatchNorm1d/2d/3d: outputs, gradients, running
statistics and counters over several steps, state dicts both ways, tracing/compiling,
bad input (clear error, nothing changed) and non-finite batches."""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bnorm

C = 3

# rank option → (bnorm layer factory, torch class, input shape (channels at 1 for torch),
# channel axis of the bnorm input). "generic-nhwc" is bnorm.BatchNorm(axis=-1) fed the
# NHWC tensor whose NCHW permutation torch.nn.BatchNorm2d gets.
RANKS = {
    "1d-2D": (bnorm.BatchNorm1d, nn.BatchNorm1d, (8, C), 1),
    "1d-3D": (bnorm.BatchNorm1d, nn.BatchNorm1d, (4, C, 5), 1),
    "2d": (bnorm.BatchNorm2d, nn.BatchNorm2d, (4, C, 3, 5), 1),
    "3d": (bnorm.BatchNorm3d, nn.BatchNorm3d, (2, C, 2, 3, 4), 1),
    "generic-nhwc": (
        lambda *a, **k: bnorm.BatchNorm(*a, axis=-1, **k),
        nn.BatchNorm2d,
        (4, C, 3, 5),
        -1,
    ),
}

CASES = list(
    itertools.product(
        RANKS,  # rank
        (True, False),  # affine
        (True, False),  # bias
        (True, False),  # track_running_stats
        (0.1, None),  # momentum
        ("train", "eval"),  # mode
        (torch.float32, torch.float64),  # dtype
    )
)


def _tolerance(dtype):
    return (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    )


def _pair(rank, dtype, **options):
    make, torch_cls, _, _ = RANKS[rank]
    ours, theirs = make(C, dtype=dtype, **options), torch_cls(C, dtype=dtype, **options)
    if ours.weight is not None:
        with torch.no_grad():
            for name in ("weight", "bias"):
                if getattr(theirs, name) is not None:
                    getattr(theirs, name).copy_(torch.rand(C, dtype=dtype) + 0.5)
                    getattr(ours, name).copy_(getattr(theirs, name))
    return ours, theirs


def _step_and_compare(ours, theirs, rank, dtype, gen):
    _, _, shape, axis = RANKS[rank]
    x = torch.randn(shape, dtype=dtype, generator=gen) * 2 + 0.5
    dy = torch.randn(shape, dtype=dtype, generator=gen)
    x_theirs = x.clone().requires_grad_()
    x_ours = (x.movedim(1, -1) if axis == -1 else x).clone().requires_grad_()
    out_theirs = theirs(x_theirs)
    out_ours = ours(x_ours)
    out_ours_nchw = out_ours.movedim(-1, 1) if axis == -1 else out_ours
    tol = _tolerance(dtype)
    torch.testing.assert_close(out_ours_nchw, out_theirs, **tol)
    out_theirs.backward(dy)
    out_ours.backward(dy.movedim(1, -1) if axis == -1 else dy)
    grad_ours = x_ours.grad.movedim(-1, 1) if axis == -1 else x_ours.grad
    torch.testing.assert_close(grad_ours, x_theirs.grad, **tol)
    for name in ("weight", "bias"):
        p_ours, p_theirs = getattr(ours, name), getattr(theirs, name)
        assert (p_ours is None) == (p_theirs is None)
        if p_ours is not None:
            torch.testing.assert_close(p_ours.grad, p_theirs.grad, **tol)
            p_ours.grad = p_theirs.grad = None
    _compare_buffers(ours, theirs, tol)


def _compare_buffers(ours, theirs, tol):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        b_ours, b_theirs = getattr(ours, name), getattr(theirs, name)
        assert (b_ours is None) == (b_theirs is None), name
        if b_ours is not None:
            torch.testing.assert_close(b_ours, b_theirs, **tol)


@pytest.mark.parametrize(("rank", "affine", "bias", "track", "momentum", "mode", "dtype"), CASES)
def test_layer_matches_torch_over_several_steps(rank, affine, bias, track, momentum, mode, dtype):
    gen = torch.Generator().manual_seed(len(rank) * 7 + affine + 2 * bias + 4 * track)
    ours, theirs = _pair(
        rank, dtype, affine=affine, bias=bias, track_running_stats=track, momentum=momentum
    )
    for _ in range(2 if mode == "eval" else 3):
        _step_and_compare(ours, theirs, rank, dtype, gen)
    if mode == "eval":
        ours.eval()
        theirs.eval()
        for _ in range(2):
            _step_and_compare(ours, theirs, rank, dtype, gen)


@pytest.mark.parametrize(
    ("rank", "torch_cls"),
    [(2, nn.BatchNorm1d), (3, nn.BatchNorm1d), (4, nn.BatchNorm2d), (5, nn.BatchNorm3d)],
)
def test_generic_layer_with_axis_1_matches_torch_for_each_rank(rank, torch_cls):
    ours, theirs = bnorm.BatchNorm(C), torch_cls(C)
    shape = (6, C, 3, 2, 2)[:rank]
    for _ in range(2):
        x = torch.randn(shape)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    _compare_buffers(ours, theirs, {"atol": 1e-5, "rtol": 1e-5})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer_dtype", ["same", "float32"])
def test_half_precision_input_matches_torch_and_keeps_dtype(dtype, layer_dtype):
    ldtype = dtype if layer_dtype == "same" else torch.float32
    ours, theirs = bnorm.BatchNorm2d(C, dtype=ldtype), nn.BatchNorm2d(C, dtype=ldtype)
    x = (torch.randn(8, C, 4, 4) * 2 + 3).to(dtype)
    out_ours, out_theirs = ours(x), theirs(x)
    assert out_ours.dtype == out_theirs.dtype == dtype
    torch.testing.assert_close(out_ours, out_theirs, atol=2e-2, rtol=1e-2)
    stats_tol = (
        {"atol": 1e-5, "rtol": 1e-5} if ldtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    )
    _compare_buffers(ours, theirs, stats_tol)


# --- zero-size batches ----------------------------------------------------------------


@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_size_batch_matches_torch(rank, mode):
    ours, theirs = _pair(rank, torch.float32)
    getattr(ours, mode)()
    getattr(theirs, mode)()
    shape = (0, *RANKS[rank][2][1:])
    x = torch.zeros(shape, requires_grad=True)
    x_ours = (x.movedim(1, -1) if RANKS[rank][3] == -1 else x)
    out_ours, out_theirs = ours(x_ours), theirs(x)
    assert out_ours.shape == x_ours.shape and out_theirs.shape == x.shape
    (out_ours.sum() + out_theirs.sum()).backward()
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad)
    _compare_buffers(ours, theirs, {"atol": 0, "rtol": 0})
    assert int(ours.num_batches_tracked) == (1 if mode == "train" else 0)


# --- repr, state dicts, checkpoints ---------------------------------------------------

OPTION_SETS = [
    {},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"momentum": None, "eps": 1e-3},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
@pytest.mark.parametrize(
    ("ours_cls", "torch_cls"),
    [
        (bnorm.BatchNorm1d, nn.BatchNorm1d),
        (bnorm.BatchNorm2d, nn.BatchNorm2d),
        (bnorm.BatchNorm3d, nn.BatchNorm3d),
    ],
)
def test_extra_repr_and_state_dict_keys_equal_torch(ours_cls, torch_cls, options):
    ours, theirs = ours_cls(5, **options), torch_cls(5, **options)
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours).replace("bnorm.", "") == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "num_batches_skipped" not in ours.state_dict()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


def test_extra_repr_shows_bnorm_options_when_not_default():
    text = bnorm.BatchNorm(4, axis=-1, skip_nonfinite=False).extra_repr()
    assert text.endswith(", axis=-1, skip_nonfinite=False")


def _trained(module, steps=3, shape=(6, 4, 3, 3)):
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.num_features, generator=gen))
    for _ in range(steps):
        module(torch.randn(shape, generator=gen) * 3 + 1)
    return module


@pytest.mark.parametrize("direction", ["torch->bnorm", "bnorm->torch"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
def test_checkpoints_load_both_ways(direction, options):
    src_cls, dst_cls = (
        (nn.BatchNorm2d, bnorm.BatchNorm2d)
        if direction == "torch->bnorm"
        else (bnorm.BatchNorm2d, nn.BatchNorm2d)
    )
    src = _trained(src_cls(4, **options))
    dst = dst_cls(4, **options)
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[key], value, atol=0, rtol=0)
    src.eval()
    dst.eval()
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(dst(x), src(x), atol=1e-6, rtol=1e-6)


def _version1_state_dict():
    old = _trained(nn.BatchNorm2d(4))
    state = old.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    return state


def test_version1_checkpoint_without_num_batches_tracked_loads_like_torch():
    state = _version1_state_dict()
    ours, theirs = bnorm.BatchNorm2d(4), nn.BatchNorm2d(4)
    ours.load_state_dict(copy.deepcopy(state), strict=True)
    theirs.load_state_dict(copy.deepcopy(state), strict=True)
    _compare_buffers(ours, theirs, {"atol": 0, "rtol": 0})
    assert int(ours.num_batches_tracked) == 0
    torch.testing.assert_close(ours.running_var, state["running_var"])


def test_version1_checkpoint_into_a_trained_layer_keeps_its_counter_like_torch():
    state = _version1_state_dict()
    ours, theirs = _trained(bnorm.BatchNorm2d(4), steps=2), _trained(nn.BatchNorm2d(4), steps=2)
    ours.load_state_dict(copy.deepcopy(state))
    theirs.load_state_dict(copy.deepcopy(state))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2


@pytest.mark.parametrize("target", ["bnorm", "torch"])
def test_torch_save_and_load_weights_only(target):
    ours = _trained(bnorm.BatchNorm2d(4))
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = bnorm.BatchNorm2d(4) if target == "bnorm" else nn.BatchNorm2d(4)
    restored.load_state_dict(state, strict=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, atol=0, rtol=0)


def test_deepcopy_is_independent_and_equal():
    ours = _trained(bnorm.BatchNorm2d(4))
    clone = copy.deepcopy(ours)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(clone.state_dict()[key], value, atol=0, rtol=0)
        assert clone.state_dict()[key].data_ptr() != value.data_ptr()
    assert clone.extra_repr() == ours.extra_repr()
    before = ours.running_mean.clone()
    clone(torch.randn(5, 4, 2, 2) + 10)
    assert torch.equal(ours.running_mean, before)
    assert not torch.equal(clone.running_mean, before)


# --- channels_last, masks -------------------------------------------------------------


def test_channels_last_input_matches_torch_and_keeps_layout():
    ours, theirs = _pair("2d", torch.float32)
    x = torch.randn(4, C, 5, 6).to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(xa), theirs(xb)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
    assert out_ours.is_contiguous(memory_format=torch.channels_last)
    assert out_ours.stride() == out_theirs.stride()
    dy = torch.randn(4, C, 5, 6)
    out_ours.backward(dy)
    out_theirs.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-5)
    _compare_buffers(ours, theirs, {"atol": 1e-6, "rtol": 1e-6})


def test_masked_sequence_layer_matches_torch_on_the_packed_valid_steps():
    # Padded sequences (N, C, L) with a (N, L) validity mask: statistics over the valid
    # steps only are those of torch's BatchNorm1d on the packed (valid, C) matrix.
    ours, theirs = _pair("1d-3D", torch.float64, momentum=0.3)
    lengths = [5, 2, 4, 3]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(4, C, 5, dtype=torch.float64)
    x.transpose(1, 2)[~mask] = float("nan")  # padding may hold anything
    out = ours(x, mask)
    packed = x.transpose(1, 2)[mask]
    torch.testing.assert_close(out.transpose(1, 2)[mask], theirs(packed))
    _compare_buffers(ours, theirs, {"atol": 1e-12, "rtol": 1e-12})
    assert int(ours.num_batches_skipped) == 0


# --- torch.fx and torch.compile -------------------------------------------------------


def _small_net(layer):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), layer, nn.ReLU())


def test_fx_symbolic_trace_records_the_layer_as_a_leaf_like_torchs():
    net = _small_net(bnorm.BatchNorm2d(4))
    reference = _small_net(nn.BatchNorm2d(4))
    reference.load_state_dict(net.state_dict())
    traced = torch.fx.symbolic_trace(net)
    torch_traced = torch.fx.symbolic_trace(reference)
    # Same graph as torch's layer gives: one call_module node for the batch norm.
    ops = [(n.op, n.target) for n in traced.graph.nodes]
    assert ops == [(n.op, n.target) for n in torch_traced.graph.nodes]
    assert ("call_module", "1") in ops
    for mode in ("train", "train", "eval", "train"):
        traced.train(mode == "train")
        reference.train(mode == "train")
        x = torch.randn(3, 2, 5, 5)
        torch.testing.assert_close(traced(x), reference(x))
    for key in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(traced.get_buffer(key), reference.get_buffer(key))
    assert int(traced.get_buffer("1.num_batches_tracked")) == 3
    # The input checks run when a traced graph runs.
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected 4 channels at axis 1"):
        torch.fx.symbolic_trace(nn.Sequential(bnorm.BatchNorm2d(4)))(torch.randn(3, 5, 2, 2))


def test_fx_symbolic_trace_of_a_layer_itself_fixes_the_mode_as_torchs_does():
    traced_layer = torch.fx.symbolic_trace(bnorm.BatchNorm2d(4, renorm=True))
    calls = [n.target.__name__ for n in traced_layer.graph.nodes if n.op == "call_function"]
    assert calls == ["_checked_batch_norm"]
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected 4D input \(got 3D input\)"):
        traced_layer(torch.randn(3, 4, 5))
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(traced_layer(x), nn.BatchNorm2d(4)(x))


def test_torch_compile_fullgraph_matches_torch_in_training_and_eval():
    ours, theirs = _pair("2d", torch.float32)
    compiled = torch.compile(ours, fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = torch.randn(4, C, 3, 5, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ours, out_theirs = compiled(xa), theirs(xb)
        torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
        out_ours.square().sum().backward()
        out_theirs.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-5)
        ours.zero_grad()
        theirs.zero_grad()
        _compare_buffers(ours, theirs, {"atol": 1e-5, "rtol": 1e-5})
    assert int(ours.num_batches_tracked) == 2


# --- bad input: a clear error, nothing changed ----------------------------------------


def _snapshot(module):
    return {k: v.clone() for k, v in module.named_buffers()} | {
        k: v.detach().clone() for k, v in module.named_parameters()
    }


def _assert_unchanged(module, snapshot):
    now = _snapshot(module)
    assert now.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(now[key], value), key


def _rejects(module, args, error, message):
    snapshot = _snapshot(module)
    with pytest.raises(error, match=message):
        module(*args)
    _assert_unchanged(module, snapshot)


def test_wrong_rank_raises_value_error_and_changes_nothing():
    _rejects(
        _trained(bnorm.BatchNorm2d(4)),
        (torch.randn(4, 4, 3),),
        ValueError,
        r"^BatchNorm2d: expected 4D input \(got 3D input\)$",
    )


def test_wrong_rank_for_batchnorm1d_lists_both_ranks():
    _rejects(
        bnorm.BatchNorm1d(4),
        (torch.randn(2, 4, 3, 3),),
        ValueError,
        r"^BatchNorm1d: expected 2D or 3D input \(got 4D input\)$",
    )


def test_rank_below_two_for_the_generic_layer_raises():
    _rejects(
        bnorm.BatchNorm(4),
        (torch.randn(4),),
        ValueError,
        r"^BatchNorm: expected an input of at least 2 dimensions \(got 1D input\)$",
    )


def test_wrong_channel_count_raises_value_error_and_changes_nothing():
    _rejects(
        _trained(bnorm.BatchNorm2d(4)),
        (torch.randn(4, 5, 3, 3),),
        ValueError,
        r"^BatchNorm2d: expected .*4.* \(got .*5",
    )


def test_wrong_channel_count_raises_even_without_parameters_or_running_stats():
    layer = bnorm.BatchNorm2d(4, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match=r"^BatchNorm2d: expected .*4.* \(got .*5"):
        layer(torch.randn(4, 5, 3, 3))


def test_wrong_channel_count_on_the_nhwc_axis_raises():
    _rejects(
        _trained(bnorm.BatchNorm(4, axis=-1), shape=(6, 3, 3, 4)),
        (torch.randn(4, 3, 3, 5),),
        ValueError,
        r"^BatchNorm: expected .*4.* \(got .*5",
    )


def test_non_floating_input_raises_type_error_and_changes_nothing():
    _rejects(
        _trained(bnorm.BatchNorm2d(4)),
        (torch.randint(0, 9, (4, 4, 3, 3)),),
        TypeError,
        r"^BatchNorm2d: expected a floating-point input \(got dtype torch.int64\)$",
    )


def test_non_tensor_input_raises_type_error():
    _rejects(
        bnorm.BatchNorm1d(2),
        ([[1.0, 2.0], [3.0, 4.0]],),
        TypeError,
        r"^BatchNorm1d: expected input to be a Tensor \(got list\)$",
    )


def test_one_value_per_channel_in_training_raises_and_does_not_count_the_batch():
    ours = _trained(bnorm.BatchNorm1d(4), shape=(6, 4))
    _rejects(
        ours,
        (torch.randn(1, 4),),
        ValueError,
        r"^BatchNorm1d: expected more than 1 value per channel when training "
        r"\(got 1 for input of shape \(1, 4\)\)$",
    )
    # torch counts the rejected batch before raising (a RuntimeError... or ValueError).
    theirs = nn.BatchNorm1d(4)
    with pytest.raises((ValueError, RuntimeError)):
        theirs(torch.randn(1, 4))
    assert int(theirs.num_batches_tracked) == 1


def test_one_value_per_channel_is_fine_in_eval():
    ours, theirs = _pair("1d-2D", torch.float32)
    ours.eval()
    theirs.eval()
    x = torch.randn(1, C)
    torch.testing.assert_close(ours(x), theirs(x))


def _one_valid_value_mask():
    mask = torch.zeros(4, 3, 3, dtype=torch.bool)
    mask[0, 0, 0] = True
    return mask


@pytest.mark.parametrize(
    "mask, error, message",
    [
        pytest.param(
            _one_valid_value_mask(),
            ValueError,
            r"expected more than 1 value per channel when training \(got 1 .* with its mask\)",
            id="one-valid-value-in-training",
        ),
        pytest.param(
            torch.ones(4, 4, 3, 3, dtype=torch.bool),
            ValueError,
            r"expected a mask of shape \(4, 3, 3\) .* \(got \(4, 4, 3, 3\)\)",
            id="wrong-shape",
        ),
        pytest.param(
            torch.ones(4, 3, 3),
            TypeError,
            r"expected a bool mask \(got dtype torch.float32\)",
            id="wrong-dtype",
        ),
    ],
)
def test_a_bad_mask_raises_and_changes_nothing(mask, error, message):
    _rejects(_trained(bnorm.BatchNorm2d(4)), (torch.randn(4, 4, 3, 3), mask), error, message)


def test_axis_out_of_range_for_the_input_raises():
    _rejects(
        bnorm.BatchNorm(4, axis=3),
        (torch.randn(4, 4, 3),),
        ValueError,
        r"expected a channel axis in \[-3, 2\] for a 3D input \(got axis=3\)",
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_features": 0}, ValueError, r"expected num_features >= 1 \(got 0\)"),
        ({"num_features": 3.0}, TypeError, r"expected num_features to be an int \(got float\)"),
        ({"num_features": True}, TypeError, r"expected num_features to be an int \(got bool\)"),
        ({"eps": "1e-5"}, TypeError, r"expected eps to be a number \(got str\)"),
        ({"momentum": 1.5}, ValueError, r"expected momentum in \[0, 1\] or None \(got 1.5\)"),
        ({"momentum": "0.1"}, ValueError, r"expected momentum in \[0, 1\] or None \(got '0.1'\)"),
        ({"axis": True}, TypeError, r"expected axis to be an int \(got bool\)"),
        ({"axis": 4}, ValueError, r"expected axis in \[-4, 3\] for BatchNorm2d \(got 4\)"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_bad_constructor_arguments_raise(kwargs, error, message):
    kwargs = {"num_features": 4} | kwargs
    with pytest.raises(error, match=message):
        bnorm.BatchNorm2d(**kwargs)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_follows_torch_constructed_freely_refused_in_training(eps):
    ours, theirs = bnorm.BatchNorm2d(4, eps=eps), nn.BatchNorm2d(4, eps=eps)
    x = torch.randn(3, 4, 2, 2)
    with pytest.raises(ValueError, match="eps must be positive during training") as torch_error:
        theirs(x)
    with pytest.raises(
        ValueError, match=r"BatchNorm2d: batch_norm eps must be positive during training"
    ):
        ours(x)
    assert "eps must be positive" in str(torch_error.value)
    assert int(ours.num_batches_tracked) == 0
    torch.testing.assert_close(ours.running_mean, torch.zeros(4))


def test_eps_zero_in_eval_matches_torch_and_negative_is_refused():
    ours, theirs = bnorm.BatchNorm2d(4, eps=0.0).eval(), nn.BatchNorm2d(4, eps=0.0).eval()
    ours.running_var.uniform_(0.5, 2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bnorm.BatchNorm2d(4, eps=-1.0).eval()(x)


def test_meta_device_layer_loaded_with_assign_has_every_buffer_on_the_loaded_device():
    source = _trained(bnorm.BatchNorm2d(4))
    with torch.device("meta"):
        ours = bnorm.BatchNorm2d(4)
    ours.load_state_dict(source.state_dict(), assign=True)
    assert {b.device.type for b in ours.buffers()} == {"cpu"}
    assert {p.device.type for p in ours.parameters()} == {"cpu"}
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(ours(x), source(x))
    torch.testing.assert_close(ours.running_mean, source.running_mean)
    assert int(ours.num_batches_skipped) == 0


# --- non-finite batches ---------------------------------------------------------------


def _poisoned(value, shape=(6, 4, 3, 3)):
    x = torch.randn(shape)
    x[(2, 1) + (0,) * (len(shape) - 2)] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_batch_is_skipped_and_counted(value):
    ours, theirs = _trained(bnorm.BatchNorm2d(4)), _trained(nn.BatchNorm2d(4))
    before = _snapshot(ours)
    x = _poisoned(value)
    out = ours(x)
    # The output is what the math gives (torch computes the same, NaN channel included).
    torch.testing.assert_close(out, theirs(x), equal_nan=True)
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, [0, 2, 3]]).all()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, key), before[key])
    assert int(ours.num_batches_skipped) == 1
    # The next finite batch is used as usual.
    y = torch.randn(6, 4, 3, 3)
    ours(y)
    assert int(ours.num_batches_tracked) == 4 and int(ours.num_batches_skipped) == 1
    torch.testing.assert_close(
        ours.running_mean, 0.9 * before["running_mean"] + 0.1 * y.mean((0, 2, 3))
    )


def test_without_skip_nonfinite_the_statistics_become_nan_like_torch():
    ours, theirs = _trained(bnorm.BatchNorm2d(4, skip_nonfinite=False)), _trained(nn.BatchNorm2d(4))
    x = _poisoned(float("nan"))
    torch.testing.assert_close(ours(x), theirs(x), equal_nan=True)
    assert torch.isnan(ours.running_mean[1]) and torch.isnan(ours.running_var[1])
    _compare_buffers(ours, theirs, {"atol": 1e-6, "rtol": 1e-6, "equal_nan": True})
    assert int(ours.num_batches_tracked) == 4 and int(ours.num_batches_skipped) == 0


def test_skipped_batch_does_not_enter_the_cumulative_average():
    ours = bnorm.BatchNorm1d(2, momentum=None)
    batches = [torch.randn(5, 2, dtype=torch.float32) + i for i in range(3)]
    ours(batches[0])
    ours(_poisoned(float("inf"), shape=(5, 2)))
    ours(batches[1])
    ours(batches[2])
    assert int(ours.num_batches_tracked) == 3 and int(ours.num_batches_skipped) == 1
    torch.testing.assert_close(ours.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(ours.running_var, torch.stack([b.var(0) for b in batches]).mean(0))


def _rule_expectation(layer, x):
    """What skip_nonfinite must do, from NumPy: the batch counts iff its mean and unbiased
    variance are finite in the statistics' dtype (float32); else nothing moves."""
    xs = x.double().transpose(0, 1).reshape(x.shape[1], -1).numpy()
    m = xs.shape[1]
    with np.errstate(all="ignore"):
        mean, var = xs.mean(1), xs.var(1) * m / (m - 1)
        ok = all(np.isfinite(v.astype(np.float32)).all() for v in (mean, var))
        a = 1.0 if layer.momentum is None else layer.momentum
        rm = layer.running_mean.double().numpy()
        rv = layer.running_var.double().numpy()
        new = ((1 - a) * rm + a * mean, (1 - a) * rv + a * var) if ok else (rm, rv)
    tracked = int(layer.num_batches_tracked) + ok
    skipped = int(layer.num_batches_skipped) + (not ok)
    return ok, new, tracked, skipped


def _huge_variance():
    x = torch.randn(6, 4, 3, 3)
    x[:, 2] = 3e19 * torch.tensor([1.0, -1.0]).repeat(27)[:54].reshape(6, 3, 3)
    return x


@pytest.mark.parametrize(
    "case",
    ["nan", "inf", "variance beyond float32", "finite after nan state", "momentum 0", "finite"],
)
def test_skip_decision_on_the_cpu_path_follows_the_rule(case):
    # The CPU path decides with a host test on the updated statistics; this pins it to the
    # rule (finite mean and unbiased variance in float32) in the cases where the two could
    # part: a variance that overflows float32 only, a state that was already NaN, α = 0.
    layer = bnorm.BatchNorm2d(4, momentum=0.0 if case == "momentum 0" else 0.1)
    _trained(layer)
    x = torch.randn(6, 4, 3, 3)
    if case in ("nan", "momentum 0"):
        x = _poisoned(float("nan"))
    elif case == "inf":
        x = _poisoned(float("inf"))
    elif case == "variance beyond float32":
        x = _huge_variance()
    elif case == "finite after nan state":
        with torch.no_grad():
            layer.running_mean[0] = float("nan")
    ok, (rm, rv), tracked, skipped = _rule_expectation(layer, x)
    assert ok == (case in ("finite", "finite after nan state"))
    layer(x)
    assert int(layer.num_batches_tracked) == tracked
    assert int(layer.num_batches_skipped) == skipped
    np.testing.assert_allclose(layer.running_mean.double().numpy(), rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.running_var.double().numpy(), rv, rtol=1e-6, atol=1e-7)


def test_skip_still_applies_to_buffers_that_require_grad():
    # NumPy cannot view such buffers: the guard then uses torch ops, with the same rule.
    layer = _trained(bnorm.BatchNorm2d(4))
    before = _snapshot(layer)
    layer.running_mean.requires_grad_()
    layer.running_var.requires_grad_()
    with torch.no_grad():
        layer(_poisoned(float("nan")))
    assert torch.equal(layer.running_mean.detach(), before["running_mean"])
    assert torch.equal(layer.running_var.detach(), before["running_var"])
    assert int(layer.num_batches_skipped) == 1
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"])


def test_training_through_torch_func_grad_and_functional_call_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    results = []
    for cls in (bnorm.BatchNorm2d, nn.BatchNorm2d):
        layer = cls(3)
        params = {k: v.detach() for k, v in layer.named_parameters()}
        buffers = {k: v.clone() for k, v in layer.named_buffers()}

        def loss(p, b, x, layer=layer):
            return torch.func.functional_call(layer, (p, b), (x,)).pow(3).sum()

        grads = torch.func.grad(loss)(params, buffers, x)
        results.append((grads, buffers))
    (ours, our_buffers), (theirs, their_buffers) = results
    for key in ("weight", "bias"):
        torch.testing.assert_close(ours[key], theirs[key])
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(our_buffers[key], their_buffers[key])


def test_huge_finite_running_statistics_raise_no_warning_and_count():
    # The guard's cheap test of the updated statistics (Σ mean·var) overflows here: each
    # product is ~2e39, beyond float32's 3.4e38, though every value is finite. The exact
    # rule then decides; it must stay silent (with warnings as errors a warning would
    # leave the state half-updated) and the batch counts.
    ours, theirs = bnorm.BatchNorm1d(3), nn.BatchNorm1d(3)
    for layer in (ours, theirs):
        layer.running_mean.fill_(1e20)
        layer.running_var.fill_(2e19)
    x = torch.randn(8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)
    theirs(x)
    assert torch.isinf(torch.dot(ours.running_mean, ours.running_var))  # (the overflow)
    _compare_buffers(ours, theirs, {"rtol": 1e-6, "atol": 0})
    assert int(ours.num_batches_skipped) == 0


@pytest.mark.parametrize("bad", ["list", "ndarray"])
def test_plain_training_checks_the_type_of_weight(bad):
    x = torch.randn(4, 3, 2, 2)
    weight = [1.0, 1.0, 1.0] if bad == "list" else np.ones(3, np.float32)
    running_mean = torch.zeros(3)
    with pytest.raises(TypeError, match="expected weight to be a Tensor or None"):
        bnorm.functional.batch_norm(x, running_mean, torch.ones(3), weight, training=True)
    assert torch.equal(running_mean, torch.zeros(3))


def test_a_layer_pickled_before_plans_knew_plain_trains():
    layer = bnorm.BatchNorm2d(3)
    del layer._plan.__dict__["plain"]  # what unpickling an older Plan gives
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(loaded.train()(x), nn.BatchNorm2d(3)(x))
    assert int(loaded.num_batches_tracked) == 1


def test_nan_only_in_masked_out_positions_is_not_skipped():
    ours = bnorm.BatchNorm1d(2)
    x = torch.randn(4, 2, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3] = False
    x[1, :, 3] = float("nan")
    out = ours(x, mask)
    assert int(ours.num_batches_skipped) == 0 and int(ours.num_batches_tracked) == 1
    assert (
        torch.isfinite(ours.running_mean).all()
        and torch.isfinite(out[mask.unsqueeze(1).expand_as(x)]).all()
    )
    x[0, 0, 0] = float("nan")  # now a valid position
    ours(x, mask)
    assert int(ours.num_batches_skipped) == 1 and int(ours.num_batches_tracked) == 1


def test_nonfinite_input_in_eval_changes_nothing():
    ours = _trained(bnorm.BatchNorm2d(4)).eval()
    before = _snapshot(ours)
    out = ours(_poisoned(float("nan")))
    assert torch.isnan(out).sum() == 1
    _assert_unchanged(ours, before)


def test_num_batches_skipped_is_a_non_persistent_buffer():
    ours = bnorm.BatchNorm2d(4)
    assert "num_batches_skipped" in dict(ours.named_buffers())
    assert "num_batches_skipped" not in ours.state_dict()
    assert bnorm.BatchNorm2d(4, track_running_stats=False).num_batches_skipped is None


# --- the formulas of the docstrings ---------------------------------------------------


def test_docstring_momentum_update_with_unbiased_running_variance():
    ours = bnorm.BatchNorm2d(3, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        ours.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
        ours.running_var.copy_(torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64))
    rm0, rv0 = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.randn(5, 3, 2, 4, dtype=torch.float64) * 3 + 2
    ours(x)
    values = x.transpose(0, 1).reshape(3, -1).numpy()
    m = values.shape[1]
    mean_b, var_b = values.mean(1), values.var(1)
    np.testing.assert_allclose(
        ours.running_mean.numpy(), 0.7 * rm0.numpy() + 0.3 * mean_b, rtol=1e-12
    )
    np.testing.assert_allclose(
        ours.running_var.numpy(), 0.7 * rv0.numpy() + 0.3 * m / (m - 1) * var_b, rtol=1e-12
    )


def test_docstring_output_uses_the_biased_batch_variance():
    ours = bnorm.BatchNorm1d(2, eps=1e-3, affine=False, dtype=torch.float64)
    x = torch.randn(7, 2, dtype=torch.float64)
    out = ours(x)
    expected = (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-3).sqrt()
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-12)


def test_docstring_momentum_none_weights_by_one_over_num_batches_tracked():
    ours = bnorm.BatchNorm1d(2, momentum=None, dtype=torch.float64)
    batches = [torch.randn(4, 2, dtype=torch.float64) * (i + 1) for i in range(4)]
    for t, x in enumerate(batches, start=1):
        previous = ours.running_mean.clone()
        ours(x)
        torch.testing.assert_close(ours.running_mean, previous + (x.mean(0) - previous) / t)
    torch.testing.assert_close(ours.running_var, torch.stack([b.var(0) for b in batches]).mean(0))


def test_without_running_statistics_batch_statistics_are_used_in_eval():
    ours = bnorm.BatchNorm1d(2, track_running_stats=False, affine=False, dtype=torch.float64).eval()
    x = torch.randn(6, 2, dtype=torch.float64) + 4
    torch.testing.assert_close(
        ours(x), (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    )


def test_the_guard_follows_buffers_replaced_or_moved_in_place():
    # The guard copies the running statistics through NumPy views cached per buffer; a
    # buffer given new memory (set_, load into a new tensor, .data) must be seen anew.
    layer, reference = bnorm.BatchNorm1d(3), nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    layer(x), reference(x)
    fresh = torch.full((3,), 2.0)
    layer.running_var.set_(fresh.clone())
    reference.running_var.set_(fresh.clone())
    layer.running_mean = torch.full((3,), -1.0)
    reference.running_mean = torch.full((3,), -1.0)
    y = torch.randn(8, 3)
    layer(y), reference(y)
    _compare_buffers(layer, reference, {"rtol": 1e-6, "atol": 1e-7})
    # A NaN batch now restores the new values, not ones seen before.
    before = _snapshot(layer)
    layer(_poisoned(float("nan"), shape=(8, 3)))
    assert torch.equal(layer.running_mean, before["running_mean"])
    assert torch.equal(layer.running_var, before["running_var"])
    assert int(layer.num_batches_skipped) == 1


def test_the_guard_keeps_no_reference_to_dead_buffers():
    import gc
    import weakref

    layer = bnorm.BatchNorm1d(3)
    layer(torch.randn(8, 3))
    ref = weakref.ref(layer.running_mean)
    del layer
    gc.collect()
    assert ref() is None


def test_the_guard_restores_non_contiguous_buffers():
    layer = bnorm.BatchNorm1d(3)
    layer.running_mean = torch.arange(6.0)[::2]
    layer.running_var = torch.arange(1.0, 7.0)[::2]
    assert not layer.running_mean.is_contiguous()
    layer(_poisoned(float("nan"), shape=(8, 3)))
    assert torch.equal(layer.running_mean, torch.tensor([0.0, 2.0, 4.0]))
    assert torch.equal(layer.running_var, torch.tensor([1.0, 3.0, 5.0]))
    assert int(layer.num_batches_skipped) == 1
