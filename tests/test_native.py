"""bnorm.kernels.native: the C/OpenMP kernels of act(BN(x) + r) on CPU.

Against the float64 NumPy reference (bnorm.reference, the activation's derivative by
hand) at the shapes that take each of the C code's loops and edges: planes longer than
one summation block, channel counts that are not a multiple of a vector block, rows in
several chunks and a partial last one, 2D and 3D inputs; the running-statistics update
inside the kernel against bnorm._math.running_update (to float32 rounding), the non-finite guard
and the cumulative average; results independent of the thread count; that the layers
really run these kernels; the build cache, concurrent builds, and the fallback when the
compiler is missing or broken (a real failing compiler process).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import bnorm
from bnorm import _math, reference
from bnorm.kernels import Activation, batch_norm_act_train, native

pytestmark = pytest.mark.usefixtures("fused_at_every_size")

SLOPE = 0.1


@pytest.fixture(autouse=True)
def _native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BNORM_NO_NATIVE", raising=False)
    if not native.available():
        pytest.fail("the native kernels did not build on this machine (gcc is required here)")


@pytest.fixture(params=["node", "function"])
def caller(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernels called by the C++ autograd node (as shipped), then by the Python
    autograd.Function (where the node cannot be built): the same results."""
    if request.param == "function":
        monkeypatch.setenv("BNORM_NO_NATIVE_NODE", "1")
    elif native.node() is None:
        pytest.fail("the native kernels' C++ autograd node did not build (g++ is required here)")
    return request.param


def act_of(name: str) -> Activation:
    return Activation.parse(name, negative_slope=SLOPE)  # type: ignore[return-value]


def np_act(name: str, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(act(z), act'(z)) by hand; the z ≤ 0 side at 0, as PyTorch."""
    slope = {"identity": 1.0, "relu": 0.0, "leaky_relu": SLOPE}[name]
    return np.where(z > 0, z, slope * z), np.where(z > 0, 1.0, slope)


def make(shape, dtype, residual, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 4).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = torch.empty(c, dtype=dtype).uniform_(0.5, 1.5, generator=g)
    w[0] = -0.7
    b = torch.empty(c, dtype=dtype).uniform_(-0.5, 0.5, generator=g)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
        r = None if r is None else r.to(memory_format=fmt)
    return x, r, dy, w, b


def run(x, r, dy, w, b, act, running=None, skip_nonfinite=True):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    xl, wl, bl, rl = leaves
    y, mean, invstd = batch_norm_act_train(
        xl, wl, bl, rl, 1e-5, act, running=running, skip_nonfinite=skip_nonfinite
    )
    y.backward(dy)
    return y.detach(), xl.grad, wl.grad, bl.grad, None if rl is None else rl.grad, mean, invstd


def reference_of(x, r, dy, w, b, name):
    as64 = lambda t: None if t is None else t.detach().double().numpy()  # noqa: E731
    bn, cache = reference.forward(as64(x), as64(w), as64(b), 1e-5)
    z = bn if r is None else bn + as64(r)
    y, dact = np_act(name, z)
    dz = as64(dy) * dact
    dx, dw, db = reference.backward(dz, cache)
    return y, dx, dw, db, dz, cache


def rel_err(a, b) -> float:
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))


# (shape, channels_last): a plane longer than one summation block (1024) and not a
# multiple of it; planes that end in 1-3 whole vectors after the last 128-byte step and
# then single values (63 values), and one shorter than a vector (6 values); channel
# counts below, at, between and above the rows loops' channel block (64 float32 / 32
# float64 channels: 8 vectors), blocks of every width from 1 to 8 vectors, with single
# channels after the last whole vector; rows in several chunks of 256 and a partial last
# one; an (N, C) input (rows of channels) and an (N, C, L) one; a single channel.
SHAPES = [
    ((3, 4, 40, 41), False),
    ((5, 17, 9, 7), True),
    ((4, 40, 13, 11), True),
    ((6, 3, 5, 5), True),
    ((300, 19), False),
    ((7, 24, 33), False),
    ((9, 1, 6, 6), False),
    ((2, 64, 8, 8), True),
    ((3, 70, 5, 5), True),
    ((40, 33), False),
    ((4, 5, 7, 9), False),
    ((5, 3, 2, 3), False),
    ((3, 56, 4, 5), True),
    ((2, 27, 6, 6), True),
]


ACTS = [("relu", True), ("leaky_relu", False), ("identity", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("name,residual", ACTS)
def test_native_matches_the_float64_reference(shape, channels_last, dtype, name, residual, caller):
    x, r, dy, w, b = make(shape, dtype, residual, channels_last)
    y, dx, dw, db, dr, mean, invstd = run(x, r, dy, w, b, act_of(name))
    y64, dx64, dw64, db64, dz64, cache = reference_of(x, r, dy, w, b, name)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert y.dtype == dtype and y.stride() == x.stride()
    assert rel_err(y, y64) < tol
    assert rel_err(mean, cache["mean"]) < tol
    assert rel_err(invstd, 1 / np.sqrt(cache["var"] + 1e-5)) < tol
    assert rel_err(dx, dx64) < 50 * tol
    assert rel_err(dw, dw64) < 10 * tol and rel_err(db, db64) < 10 * tol
    if residual:
        assert dr is not None and dr.stride() == x.stride() and rel_err(dr, dz64) < tol


def test_layers_run_the_native_kernels_through_the_cpp_node(monkeypatch):
    op = native.node()
    if op is None:
        pytest.fail("the native kernels' C++ autograd node did not build (g++ is required here)")
    tried, calls = native.node_try(), []

    def spy(*args):
        calls.append(("node", args[0]))
        return op(*args)

    def spy_try(*args):
        out = tried(*args)
        calls.append(("try", args[0], bool(out)))
        return out

    monkeypatch.setattr(native, "node", lambda: spy)
    monkeypatch.setattr(native, "node_try", lambda: spy_try)
    layer = bnorm.BatchNormAct2d(8, activation="relu")
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    y = layer(x, residual=torch.randn(4, 8, 5, 5))
    # The layer's per-call route: the node, with its checks in C++.
    assert calls == [("try", x, True)] and "BatchNormAct" in y.grad_fn.name()
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    # Channels at another dim: the general path, which calls the node the same way.
    calls.clear()
    moved = bnorm.BatchNormAct(8, axis=-1, activation="relu")(x.movedim(1, -1))
    assert [(c[0], c[2]) for c in calls] == [("try", True)]
    assert moved.grad_fn.name() == "PermuteBackward0"
    # Without running statistics (batch statistics only): the node too.
    calls.clear()
    bnorm.BatchNormAct2d(8, activation="relu", track_running_stats=False)(x)
    assert [(c[0], c[2]) for c in calls] == [("try", True)]
    # Running buffers the kernels cannot update (the cumulative average's 1/t is a
    # tensor) take the Python Function.
    calls.clear()
    bnorm.BatchNormAct2d(8, activation="relu", momentum=None)(x).sum().backward()
    assert calls == []


def _try(x, weight=None, bias=None, residual=None, rm=None, rv=None, tracked=None):
    c = x.shape[1] if x.dim() > 1 else x.shape[0]
    rm = torch.zeros(c, dtype=x.dtype) if rm is None else rm
    rv = torch.ones(c, dtype=x.dtype) if rv is None else rv
    op = native.node_try()
    assert op is not None
    return op(x, weight, bias, residual, rm, rv, tracked, None, 1e-5, 0.0, 0.1, True)


def test_the_try_operator_declines_what_its_kernels_do_not_take_as_it_is():
    # Each of these goes to the layers' general path (the Python Function, ATen's ops or
    # an error), which these tests check elsewhere; here the operator must say no, and
    # change nothing.
    x = torch.randn(4, 6, 5, 5)
    f64 = torch.zeros(6, dtype=torch.float64)
    cases = {
        "float64 running mean": dict(rm=f64),
        "strided running var": dict(rv=torch.ones(12)[::2]),
        "float64 weight": dict(weight=f64),
        "weight of 5": dict(weight=torch.ones(5)),
        "(1, 6) bias": dict(bias=torch.zeros(1, 6)),
        "float32 counter": dict(tracked=torch.zeros(())),
        "float64 residual": dict(residual=torch.randn(4, 6, 5, 5, dtype=torch.float64)),
        "residual of another shape": dict(residual=torch.randn(4, 6, 5, 1)),
    }
    for name, kw in cases.items():
        rm = kw.get("rm", torch.zeros(6))
        kw = {**kw, "rm": rm}
        before = rm.clone()
        assert _try(x, **kw) == [], name
        assert torch.equal(rm, before), name
    assert _try(x[:, :, ::2]) == [], "not dense"
    assert _try(torch.randn(1, 6, 1)) == [], "one value per channel"
    assert _try(x.half()) == [], "float16"
    assert _try(torch.randn(6)) == [], "1-D"
    op = native.node_try()
    one_sided = op(x, None, None, None, torch.zeros(6), None, None, None, 1e-5, 0.0, 0.1, True)
    assert one_sided == [], "a running mean without a running variance"
    counter = torch.zeros((), dtype=torch.long)
    assert len(_try(x, tracked=counter)) == 3 and counter.item() == 1


@pytest.mark.parametrize(
    "memory",
    ["contiguous", "channels_last", "3d channels_last", "(H, N, C, W) memory", "size-1 dims"],
)
def test_the_try_operator_reads_every_dense_layout_as_the_python_layout_does(memory):
    # Its (R, C, B) — computed in C++ from the strides — against bnorm.kernels.layout's,
    # through the same node: the same bits out, the same running statistics.
    torch.manual_seed(0)
    if memory == "contiguous":
        x = torch.randn(3, 5, 4, 6)
    elif memory == "channels_last":
        x = torch.randn(3, 5, 4, 6).to(memory_format=torch.channels_last)
    elif memory == "3d channels_last":
        x = torch.randn(2, 5, 3, 4, 3).to(memory_format=torch.channels_last_3d)
    elif memory == "(H, N, C, W) memory":
        x = torch.randn(4, 3, 5, 6).permute(1, 2, 0, 3)
    else:
        x = torch.randn(3, 5, 1, 6, 1).as_strided((3, 5, 1, 6, 1), (30, 6, 999, 1, 7))
    from bnorm.kernels.layout import _Layout

    layout = _Layout.of(x)
    assert layout.dense
    r = torch.randn_like(x)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    rm1, rv1, rm2, rv2 = torch.zeros(5), torch.ones(5), torch.zeros(5), torch.ones(5)
    got = _try(x, w, b, r, rm1, rv1)
    node = native.node()
    want = node(x, w, b, r, rm2, rv2, None, None, layout.a, 5, layout.b, 1e-5, 0.0, 0.1, True)
    assert len(got) == 3
    for a, c in zip([*got, rm1, rv1], [*want, rm2, rv2], strict=True):
        assert torch.equal(a, c)
    assert got[0].stride() == x.stride()


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_node_and_the_python_function_give_the_same_bits(channels_last, monkeypatch):
    x, r, dy, w, b = make((6, 40, 9, 9), torch.float32, True, channels_last)

    def step() -> list[torch.Tensor]:
        layer = bnorm.BatchNormAct2d(40, activation="leaky_relu", negative_slope=SLOPE)
        layer.weight.data.copy_(w), layer.bias.data.copy_(b)
        xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = layer(xl, residual=rl)
        y.backward(dy)
        state = [t for t in layer.state_dict().values()]
        return [y, xl.grad, rl.grad, layer.weight.grad, layer.bias.grad, *state]

    assert native.node() is not None
    node = step()
    monkeypatch.setenv("BNORM_NO_NATIVE_NODE", "1")
    function = step()
    for a, c in zip(node, function, strict=True):
        assert torch.equal(a, c)


def test_no_weight_or_bias_is_one_and_zero(caller):
    x, r, dy, _, _ = make((5, 6, 7, 7), torch.float64, True, False)
    ones, zeros = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    xl = x.clone().requires_grad_()
    y = batch_norm_act_train(xl, None, None, r, 1e-5, act_of("relu"))[0]
    y.backward(dy)
    want = run(x, r, dy, ones, zeros, act_of("relu"))
    assert torch.equal(y.detach(), want[0]) and torch.equal(xl.grad, want[1])


def test_torch_func_grad_through_a_fused_layer_matches_torch():
    # Inside torch.func transforms the layers run ATen's ops (an autograd.Function there
    # needs setup_context, and the kernels read memory directly).
    x, r = torch.randn(8, 6, 9, 9), torch.randn(8, 6, 9, 9)
    results = []
    for ours in (True, False):
        layer = bnorm.BatchNormAct2d(6, activation="relu") if ours else torch.nn.BatchNorm2d(6)
        params = {k: v.detach() for k, v in layer.named_parameters()}
        buffers = {k: v.clone() for k, v in layer.named_buffers() if k != "num_batches_skipped"}

        def loss(p, b, x, layer=layer, ours=ours):
            if ours:
                y = torch.func.functional_call(layer, (p, b), (x,), {"residual": r})
            else:
                y = torch.relu(torch.func.functional_call(layer, (p, b), (x,)) + r)
            return y.pow(2).sum()

        results.append((torch.func.grad(loss)(params, buffers, x), buffers))
    (ours, our_buffers), (theirs, their_buffers) = results
    for key in ("weight", "bias"):
        torch.testing.assert_close(ours[key], theirs[key])
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(our_buffers[key], their_buffers[key])


def test_layers_run_the_native_kernels_from_python_without_the_node(monkeypatch):
    monkeypatch.setenv("BNORM_NO_NATIVE_NODE", "1")
    calls: list[str] = []
    forward, backward = native.forward, native.backward

    def spy_forward(*args, **kwargs):
        calls.append("forward")
        return forward(*args, **kwargs)

    def spy_backward(*args, **kwargs):
        calls.append("backward")
        return backward(*args, **kwargs)

    monkeypatch.setattr(native, "forward", spy_forward)
    monkeypatch.setattr(native, "backward", spy_backward)
    layer = bnorm.BatchNormAct2d(8, activation="relu")
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    layer(x, residual=torch.randn(4, 8, 5, 5)).sum().backward()
    assert calls == ["forward", "backward"]
    # Not for the activations, dtypes and modes that have no native kernel.
    calls.clear()
    bnorm.BatchNormAct2d(8, activation="silu")(x).sum().backward()
    bnorm.BatchNormAct2d(8, activation="leaky_relu", memory_efficient=True)(x).sum().backward()
    bnorm.BatchNormAct2d(8, activation="relu").bfloat16()(x.bfloat16()).sum().backward()
    assert calls == []
    monkeypatch.setenv("BNORM_NO_NATIVE", "1")
    layer(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize("channels_last", [False, True])
def test_running_statistics_updated_in_the_kernel_as_torch_lerp(channels_last, caller):
    x, r, dy, w, b = make((8, 6, 7, 7), torch.float32, True, channels_last)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    tracked, skipped = torch.tensor(3), torch.tensor(0)
    state = (rm.clone(), rv.clone(), 0.1, tracked, skipped)
    mean = run(x, r, dy, w, b, act_of("relu"), running=state)[5]
    count = x.numel() // 6
    var = x.double().var(dim=(0, 2, 3), unbiased=False).float()
    want_mean, want_var, ok = _math.running_update(rm, rv, mean, var, count, 0.1, True)
    assert bool(ok) and int(tracked) == 4 and int(skipped) == 0
    # torch.lerp's formula; ATen may round through a fused multiply-add: 1 ulp apart.
    torch.testing.assert_close(state[0], want_mean, rtol=3e-7, atol=1e-7)
    torch.testing.assert_close(state[1], want_var, rtol=2e-6, atol=0)
    # torch's own layer from the same buffers
    bn = torch.nn.BatchNorm2d(6, momentum=0.1)
    bn.running_mean.copy_(rm), bn.running_var.copy_(rv)
    bn(x)
    torch.testing.assert_close(state[0], bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[1], bn.running_var, rtol=1e-5, atol=1e-6)


def test_non_finite_batch_leaves_running_statistics_and_counts_a_skip(caller):
    x, r, dy, w, b = make((4, 5, 6, 6), torch.float32, False, False)
    x[1, 2, 3, 3] = float("nan")
    rm, rv = torch.zeros(5), torch.ones(5)
    tracked, skipped = torch.tensor(0), torch.tensor(0)
    y, *_ = run(x, r, dy, w, b, act_of("relu"), running=(rm, rv, 0.1, tracked, skipped))
    assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5))
    assert int(tracked) == 0 and int(skipped) == 1
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    # without the guard the NaN reaches the buffers, as in torch
    run(x, r, dy, w, b, act_of("relu"), running=(rm, rv, 0.1, tracked, None), skip_nonfinite=False)
    assert torch.isnan(rm[2]) and int(tracked) == 1


def test_cumulative_average_layer_matches_torch():
    # momentum=None: the weight 1/t is a tensor, so the update runs outside the kernel.
    ours = bnorm.BatchNormAct2d(6, activation="identity", momentum=None)
    theirs = torch.nn.BatchNorm2d(6, momentum=None)
    for seed in range(3):
        x = make((4, 6, 5, 5), torch.float32, False, seed % 2 == 1, seed)[0]
        ours(x)
        theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize(
    "shape,channels_last,residual",
    [
        ((16, 20, 24, 24), False, True),
        ((16, 20, 24, 24), True, True),
        # planes longer than the partial-sum lanes' threshold, with and without a residual
        ((8, 3, 40, 40), False, True),
        ((8, 3, 40, 40), False, False),
    ],
)
def test_results_do_not_depend_on_the_thread_count(shape, channels_last, residual, caller):
    # Large enough for the parallel loops (32768 elements); sums in a fixed order.
    x, r, dy, w, b = make(shape, torch.float32, residual, channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, r, dy, w, b, act_of("relu"))
        torch.set_num_threads(2)
        two = run(x, r, dy, w, b, act_of("relu"))
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, two, strict=True):
        assert torch.equal(a, c) if a is not None else c is None


def test_matches_the_eager_fallback(monkeypatch):
    x, r, dy, w, b = make((6, 10, 9, 9), torch.float32, True, True)
    ours = run(x, r, dy, w, b, act_of("leaky_relu"))
    monkeypatch.setenv("BNORM_NO_NATIVE", "1")
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")
    fallback = run(x, r, dy, w, b, act_of("leaky_relu"))
    for a, c in zip(ours, fallback, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


# --- the build -------------------------------------------------------------------------


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty cache directory and no library loaded; the real one again afterwards."""
    monkeypatch.setenv("BNORM_CACHE_DIR", str(tmp_path / "cache"))
    native._library.cache_clear()
    yield tmp_path / "cache"
    native._library.cache_clear()


def test_concurrent_first_builds_leave_one_library_that_later_processes_reuse(
    fresh_build, tmp_path
):
    # The compiler, wrapped to count its builds: one process builds, the other waits on the
    # build lock and loads the result.
    builds = tmp_path / "builds.log"
    cc = tmp_path / "counting-cc"
    real = shutil.which("cc") or shutil.which("gcc")
    cc.write_text(
        f'#!/bin/sh\ncase "$1" in --version) exec {real} "$@";; esac\n'
        f'echo build >> {builds}\nexec {real} "$@"\n'
    )
    cc.chmod(0o755)
    script = textwrap.dedent(
        """
        import torch, bnorm
        from bnorm.kernels import native
        assert native.available()
        layer = bnorm.BatchNormAct2d(4, activation="relu")
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        layer(x).sum().backward()
        print("ok")
        """
    )
    env = {**os.environ, "BNORM_CACHE_DIR": str(fresh_build), "CC": str(cc)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(o.strip() == "ok" for o in outs)
    built = sorted(fresh_build.iterdir())
    # one library and its build lock, no temporary files left, one build
    assert [f.suffix for f in built] == [".lock", ".so"]
    assert builds.read_text().splitlines() == ["build"]
    assert all(f.name.startswith("bn_act_native-") for f in built)
    # A later process (here: this one) loads it without building again.
    mtime = built[1].stat().st_mtime_ns
    assert native.available()
    assert sorted(fresh_build.iterdir()) == built and built[1].stat().st_mtime_ns == mtime


def test_a_failing_compiler_warns_once_and_the_layer_falls_back(fresh_build, tmp_path, monkeypatch):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")
    layer = bnorm.BatchNormAct2d(5, activation="relu")
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="broken-cc: cannot compile"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()
        layer(x).sum().backward()
    want = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and not list(fresh_build.glob("*.so"))


def test_a_failing_cpp_compiler_warns_once_and_the_python_function_runs(
    fresh_build, tmp_path, monkeypatch
):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'broken-cxx: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    native._node.cache_clear()
    try:
        layer = bnorm.BatchNormAct2d(5, activation="relu")
        x = torch.randn(3, 5, 4, 4, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="broken-cxx: cannot compile"):
            y = layer(x)
        assert "_BatchNormActNative" in y.grad_fn.name()  # the Python Function
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.node() is None
            layer(x).sum().backward()
        want = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert not list(fresh_build.glob("bn_act_node-*.so"))
    finally:
        native._node.cache_clear()


# --- edges found in review ---------------------------------------------------------------


def test_an_empty_input_does_not_reach_the_native_kernels():
    # (The layers route empty batches elsewhere; a direct call gets ATen's error, where
    # the C code would have read the first value of an empty tensor.)
    x = torch.empty(0, 4, 3, 3)
    assert not native.supports(x, None, act_of("relu"))
    with pytest.raises(RuntimeError, match="at least one element"):
        batch_norm_act_train(x, None, None, None, 1e-5, act_of("relu"))


def test_double_backward_matches_torchs_ops(caller):
    x, r, dy, w, b = make((4, 6, 5, 5), torch.float64, True, True)

    def second_order(fused: bool) -> list[torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
        xl, wl, bl, rl = leaves
        if fused:
            y = batch_norm_act_train(xl, wl, bl, rl, 1e-5, act_of("leaky_relu"))[0]
        else:
            bn = torch.nn.functional.batch_norm(xl, None, None, wl, bl, training=True)
            y = torch.nn.functional.leaky_relu(bn + rl, SLOPE)
        grads = torch.autograd.grad((y * dy).sum(), leaves, create_graph=True)
        assert all(g.requires_grad for g in grads)
        total = sum((g * g).sum() for g in grads)
        return list(torch.autograd.grad(total, leaves))

    for a, c in zip(second_order(True), second_order(False), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


def test_relu_of_infinities_and_nan_is_torchs(caller):
    x, _, _, w, b = make((4, 3, 4, 4), torch.float32, False, False)
    r = torch.zeros_like(x)
    r[0, 0, 0, 0], r[0, 1, 0, 0], r[0, 2, 0, 0] = -math.inf, math.inf, math.nan
    dy = torch.ones_like(x)
    dy[0, 0, 0, 0] = math.inf  # where z = -inf: relu's derivative is 0, not inf·0
    y, dx, _, _, dr, mean, invstd = run(x, r, dy, w, b, act_of("relu"))
    bn = (x - mean.view(1, 3, 1, 1)) * (invstd * w).view(1, 3, 1, 1) + b.view(1, 3, 1, 1)
    torch.testing.assert_close(y, torch.relu(bn + r), equal_nan=True)
    assert y[0, 0, 0, 0] == 0 and y[0, 1, 0, 0] == math.inf and math.isnan(y[0, 2, 0, 0])
    assert dr is not None and dr[0, 0, 0, 0] == 0 and torch.isfinite(dx[:, 0]).all()


def test_the_kernel_bumps_the_running_buffers_versions(caller):
    layer = bnorm.BatchNormAct2d(5, activation="relu")
    before = [t._version for t in (layer.running_mean, layer.running_var)]
    tracked = layer.num_batches_tracked._version
    layer(torch.randn(4, 5, 3, 3), residual=torch.randn(4, 5, 3, 3))
    assert all(t._version > v for t, v in zip((layer.running_mean, layer.running_var), before))
    assert layer.num_batches_tracked._version > tracked and int(layer.num_batches_tracked) == 1


def test_state_on_another_device_is_not_read_by_the_native_kernels():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    weight = torch.ones(3, device="meta")
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
        batch_norm_act_train(x, weight, None, None, 1e-5, act_of("relu"))


def test_double_backward_through_the_compiled_kernels_is_refused(monkeypatch):
    monkeypatch.setenv("BNORM_NO_NATIVE", "1")
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = batch_norm_act_train(x, None, None, None, 1e-5, act_of("relu"))[0]
    with pytest.raises(ValueError, match="expected no double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_an_unwritable_cache_falls_back_to_the_temp_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # a file where the cache folder would go: mkdir fails
    monkeypatch.setenv("BNORM_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    native._library.cache_clear()
    try:
        assert native.available()
        assert list((tmp_path / "tmp").glob("bnorm-*/bn_act_native-*.so"))
    finally:
        native._library.cache_clear()


def test_the_benchmarks_streaming_floor_stands_in_for_every_fused_layer():
    from bnorm.bench.kernels import StreamingFloor, streaming_floor_model

    model = streaming_floor_model()
    layers = [m for m in model.modules() if isinstance(m, StreamingFloor)]
    assert len(layers) == 19 and not any(
        isinstance(m, bnorm.BatchNormAct2d) for m in model.modules()
    )
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    # It moves the kernels' passes, not batch norm: with a residual y = x + r and the
    # gradients dr = dy + x·r, dx = dr + x.
    xs, rs, dy = (
        torch.randn(2, 16, 3, 3, requires_grad=True),
        torch.randn(2, 16, 3, 3),
        torch.randn(2, 16, 3, 3),
    )
    y = layers[0](xs, rs)
    y.backward(dy)
    assert torch.equal(y, xs + rs)
    torch.testing.assert_close(xs.grad, dy + xs.detach() * rs + xs.detach())
    assert all(p.grad is not None for p in model.parameters())


def test_the_model_benchmarks_spread_is_taken_within_each_round():
    from bnorm.bench.kernels import _paired_quartiles

    # Round i: no-BN 10 + i, torch 20 + 2i, bnorm 12 + i (a machine that slows down from
    # round to round): within each round bnorm adds 2 where torch adds 10 + i.
    rounds = range(9)
    samples = {
        "none": [10.0 + i for i in rounds],
        "torch": [20.0 + 2 * i for i in rounds],
        "bnorm": [12.0 + i for i in rounds],
    }
    ratio_q, cost_q = _paired_quartiles(samples)["bnorm"]
    cost = sorted(2 / (10 + i) for i in rounds)
    ratio = sorted((12 + i) / (10 + i) for i in rounds)
    # statistics.quantiles' default ("exclusive") method: positions (n + 1)/4 and 3(n + 1)/4
    assert cost_q == [round(cost[1] + 0.5 * (cost[2] - cost[1]), 3),
                      round(cost[6] + 0.5 * (cost[7] - cost[6]), 3)]  # fmt: skip
    assert ratio_q == [round(ratio[1] + 0.5 * (ratio[2] - ratio[1]), 3),
                       round(ratio[6] + 0.5 * (ratio[7] - ratio[6]), 3)]  # fmt: skip
    assert set(_paired_quartiles(samples)) == {"bnorm"}


def test_the_node_checks_what_its_kernels_would_read_on_a_direct_call():
    op = native.node()
    assert op is not None
    x = torch.randn(2, 4, 3, 3)
    shape = (2, 4, 9)

    def call(*tensors, shape=shape):
        return op(x, *tensors, *shape, 1e-5, 0.0, 0.1, True)

    with pytest.raises(RuntimeError, match=r"expected \(C,\) CPU weight and bias"):
        call(torch.ones(3), None, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="of x's size"):
        call(None, None, None, None, None, None, None, shape=(2, 4, 8))
    with pytest.raises(RuntimeError, match="expected a residual like x"):
        call(None, None, torch.randn(2, 4, 3), None, None, None, None)
    stats64 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="running statistics of x's dtype"):
        call(None, None, None, *stats64, None, None)
    with pytest.raises(RuntimeError, match="int64 counters"):
        call(None, None, None, torch.zeros(4), torch.ones(4), torch.zeros(1), None)
    y, mean, invstd = call(None, None, None, None, None, None, None)  # a valid call runs
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd, (var + 1e-5).rsqrt())
    want = torch.relu((x - mean.view(1, 4, 1, 1)) * invstd.view(1, 4, 1, 1))
    torch.testing.assert_close(y, want)


def test_env_switches_are_read_at_every_call_as_os_environ_has_them(monkeypatch):
    from bnorm.options import env_switch

    name = "BNORM_TEST_SWITCH"
    monkeypatch.delenv(name, raising=False)
    assert not env_switch(name)
    for value, on in [("1", True), ("yes", True), ("0", False), ("", False), ("00", True)]:
        monkeypatch.setenv(name, value)
        assert env_switch(name) is on, value
        assert on is (os.environ.get(name, "") not in ("", "0"))
    monkeypatch.delenv(name)
    assert not env_switch(name)
    # os.environ replaced by a plain mapping: read through it.
    monkeypatch.setattr(os, "environ", {name: "1"})
    assert env_switch(name)
    monkeypatch.setattr(os, "environ", {name: "0"})
    assert not env_switch(name)


def test_the_native_kernels_switch_off_and_on_again_at_the_next_call(monkeypatch):
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    layer = bnorm.BatchNormAct2d(8, activation="relu")
    node = "torch::autograd::CppNode<(anonymous namespace)::BatchNormAct>"
    assert layer(x).grad_fn.name() == node
    monkeypatch.setenv("BNORM_NO_NATIVE", "1")
    assert "BatchNormAct>" not in layer(x).grad_fn.name()
    monkeypatch.setenv("BNORM_NO_NATIVE", "0")
    assert layer(x).grad_fn.name() == node
