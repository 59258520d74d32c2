"""Backend selection: use_backend's state per thread, asyncio task and context (contextvars)."""
import asyncio
import contextvars
import threading

import torch

from tests.conftest import DEVICE
from tri_losses import use_backend
from tri_losses._backend import resolve_backend


def _current():
    """The default backend in effect, read through resolve_backend's public behaviour: a forced 'triton'
    rejects float64, 'torch' never picks Triton, 'auto' picks it for float32 (CUDA or the interpreter)."""
    try:
        resolve_backend("auto", torch.empty(0, dtype=torch.float64, device=DEVICE), "probe")
    except TypeError:
        return "triton"
    return "auto" if resolve_backend("auto", torch.empty(0, device=DEVICE), "probe") else "torch"


def test_use_backend_is_per_asyncio_task():
    seen = {}

    async def task(name, backend, steps):
        with use_backend(backend):
            for k in range(steps):
                await asyncio.sleep(0)  # interleave with the other task
                seen.setdefault(name, []).append(_current())

    async def main():
        await asyncio.gather(task("a", "torch", 3), task("b", "triton", 3))

    asyncio.run(main())
    assert seen == {"a": ["torch"] * 3, "b": ["triton"] * 3}
    assert _current() == "auto"


def test_use_backend_suspended_generator_in_its_own_context():
    def gen():
        with use_backend("triton"):
            yield _current()
            yield _current()

    g = gen()
    ctx = contextvars.copy_context()
    assert ctx.run(next, g) == "triton"
    assert _current() == "auto"  # the suspended generator's block does not leak out
    with use_backend("torch"):
        assert _current() == "torch"
        assert ctx.run(next, g) == "triton"  # nor does the caller's block leak in
        g.close()  # closed from another context: the caller's setting is untouched
        assert _current() == "torch"
    assert _current() == "auto"
    # nor does it leak into compiled code, which reads the thread's innermost open block: none is open now (it
    # kept the generator's "triton" after every block had exited, and frame_error, without a kernel, raised)
    import tri_losses
    from tri_losses import _backend
    assert _backend._traced.backend == "auto"
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    got = torch.compile(lambda a: tri_losses.frame_error(a, y), fullgraph=True, backend="eager")(x)
    assert got == (x.argmax(1) != y).sum()


def test_use_backend_is_per_thread():
    out = []

    def worker():
        out.append(_current())

    with use_backend("torch"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert _current() == "torch"
    assert out == ["auto"]


def test_use_backend_inside_torch_compile_follows_the_setting():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1 if resolve_backend("auto", x, "probe") else x - 1, fullgraph=True)
    x = torch.zeros(1, device=DEVICE)  # float32: "auto" picks Triton (CUDA or the interpreter)
    with use_backend("torch"):
        assert f(x).item() == -1
    assert f(x).item() == 1  # the changed setting recompiles (guarded), never a stale graph
    with use_backend("torch"):
        assert f(x).item() == -1


def test_every_kernel_launch_runs_under_the_inputs_device_guard(monkeypatch):
    """A Triton kernel launches on the current CUDA device and stream: an input on cuda:1 while cuda:0 is
    current needs ``device_guard`` around every launch (linear_cross_entropy had none: its kernels would
    have run on the wrong GPU). On the CPU the guard is a no-op, so it is replaced here by a marker and
    every interpreted launch of each family's forward and backward must happen inside one."""
    import contextlib
    import importlib
    import os

    import pytest

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records the interpreter's launches")
    import tri_losses as T
    from triton.runtime.interpreter import InterpretedFunction

    depth, launches = [0], []

    @contextlib.contextmanager
    def marker(t):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    for m in ("automata", "cross_entropy", "ctc", "elementwise", "linear_cross_entropy", "sampled", "text"):
        monkeypatch.setattr(importlib.import_module(f"tri_losses.{m}"), "device_guard", marker, raising=False)
    run = InterpretedFunction.run

    def recording_run(self, *a, **k):
        launches.append((self.fn.__name__, depth[0] > 0))
        return run(self, *a, **k)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    g = torch.Generator().manual_seed(0)
    N, D, V = 6, 8, 24
    y = torch.randint(0, V, (N,), generator=g)
    for dt in (torch.float32, torch.bfloat16):  # bf16: the GEMM-stage path of linear_cross_entropy
        x, w = torch.randn(N, D, generator=g).to(dt), torch.randn(V, D, generator=g).to(dt)
        for red in ("none", "mean"):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            T.linear_cross_entropy(xr, wr, y, reduction=red, backend="triton").sum().backward()
            zr = torch.randn(N, V, generator=g).to(dt).requires_grad_()
            T.cross_entropy(zr, y, reduction=red, backend="triton").sum().backward()
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        T.sampled_softmax_loss(xr, wr, y, 4, backend="triton").backward()
    lp = torch.randn(7, 2, 5, generator=g).requires_grad_()
    T.ctc_loss(lp, torch.tensor([[1, 2], [3, 0]]), [7, 6], [2, 1], backend="triton").backward()
    T.fsa_loss(lp, [7, 6], T.ctc_fsa(torch.tensor([[1, 2], [3, 0]]), [2, 1], 0), backend="triton").sum().backward()
    e = torch.randn(3, 4, generator=g).requires_grad_()
    T.binary_cross_entropy_with_logits(e, torch.rand(3, 4, generator=g), backend="triton").backward()
    T.edit_distance(torch.tensor([[1, 2, 3]]), [3], torch.tensor([[1, 3]]), [2], backend="triton")
    names = {n for n, _ in launches}
    assert {"_lce_fwd_split_kernel", "_ce_fwd_kernel", "_ctc_emit_kernel", "_ew_fwd_kernel"} <= names, names
    assert not [n for n, guarded in launches if not guarded]


def test_kernel_less_functions_in_a_triton_block_raise_naming_the_block():
    """A use_backend("triton") block forces the Triton backend on every backend="auto" call: the functions
    without a kernel (automaton builders, frame_error, greedy decoding) raise there as with an explicit
    backend="triton", and the message names the block and what to do (it told the caller to use the 'auto'
    they had used); backend="torch" runs them inside the block with the results they have outside it."""
    import pytest
    import tri_losses as tl_
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 5, generator=g).to(DEVICE)
    lens = torch.tensor([6, 4], device=DEVICE)
    labels = torch.tensor([[1, 2], [3, 0]], device=DEVICE)
    label_lens = torch.tensor([2, 1], device=DEVICE)
    calls = {
        "ctc_fsa": lambda **kw: tl_.ctc_fsa(labels, label_lens, 4, **kw).edges,
        "hmm_fsa": lambda **kw: tl_.hmm_fsa(labels, label_lens, **kw).edges,
        "ctc_greedy_decode": lambda **kw: tl_.ctc_greedy_decode(logits, lens, **kw)[0],
        "frame_error": lambda **kw: tl_.frame_error(logits.reshape(12, 5), torch.arange(12, device=DEVICE) % 5,
                                                      **kw),
    }
    for name, call in calls.items():
        expected = call()
        with use_backend("triton"):
            with pytest.raises(RuntimeError, match=r"no Triton kernel; use_backend\('triton'\) is in effect"):
                call()
            assert torch.equal(call(backend="torch"), expected), name
        with pytest.raises(RuntimeError, match="no Triton kernel; use backend='auto' or 'torch'"):
            call(backend="triton")


def test_rows_beyond_int32_classes_take_the_torch_code():
    """The kernels index a row's classes in int32 (grid axis 1 of column tiles <= 65535): a class count
    past TRITON_MAX_CLASSES takes the torch code under "auto" and is refused with a forced "triton"
    (cross_entropy and linear_cross_entropy pass their classes per row)."""
    import pytest
    from tri_losses._backend import TRITON_MAX_CLASSES
    from tri_losses._validate import InputError
    x = torch.empty(0, device=DEVICE)
    fits = resolve_backend("auto", x, "probe")
    assert resolve_backend("auto", x, "probe", classes=TRITON_MAX_CLASSES) == fits
    assert not resolve_backend("auto", x, "probe", classes=TRITON_MAX_CLASSES + 1)
    assert TRITON_MAX_CLASSES + 32768 <= 65535 * 32768 + 1  # the widest column tiling's grid fits
    if fits:
        with pytest.raises(InputError, match=f"at most {TRITON_MAX_CLASSES} classes per row, got"):
            resolve_backend("triton", x, "probe", classes=TRITON_MAX_CLASSES + 1)
