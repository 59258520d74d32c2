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
