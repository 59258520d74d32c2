"""Shared test set-up: devices, backends, tolerances, the ``gpu``/``slow`` markers, poisoning.

Without CUDA, the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be
set before Triton is imported, so it is set here, before any test module imports tri_losses.
"""
import atexit
import os
import shutil
import tempfile
import zlib

import pytest
import torch

# A fresh Inductor cache per test session: Inductor's on-disk caches do not key on a custom op's fake
# (meta) implementation, so after a change to an op's output shapes a stale entry from an earlier run
# can fail a torch.compile test (seen with tri_losses::ce_fwd and ctc_fwd).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tri_losses_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _lighten_interpreter_bookkeeping():
    """Two pieces of the Triton interpreter's per-call bookkeeping that repeat work, skipped; what a kernel
    computes is unchanged, and a Triton without these internals is left as it is.

    * It re-patches ``triton.language`` (``inspect.getmembers`` over its modules) on every call of a
      ``@triton.jit`` helper from inside a kernel, although the launch already patched it: about a quarter
      of an interpreted CTC test's time. Skipped when the helper's language modules are patched already
      (always so inside a launch); a launch itself, which starts unpatched, still patches and restores.
    * The numpy dtype of a Triton type builds a 20-entry table on every call (about a tenth of the rest);
      it depends only on the element type: kept per element type."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        patch_lang, np_dtype, is_builtin = interpreter._patch_lang, interpreter._get_np_dtype, tl.core.is_builtin
    except (ImportError, AttributeError):
        return

    class AlreadyPatched:
        def restore(self):
            pass

    def patched(lang):
        probes = (lang.load, lang.tensor.__add__) + ((tl.math.exp,) if lang is tl else ())
        return not any(is_builtin(p) for p in probes)

    def patch_unless_patched(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and all(patched(lang) for lang in langs):
            return AlreadyPatched()
        return patch_lang(fn)

    interpreter._patch_lang = patch_unless_patched
    cache = {}

    def cached_np_dtype(tt):
        key = tt.element_ty if isinstance(tt, tl.block_type) else tt
        if isinstance(key, tl.pointer_type):  # (unhashable) every pointer is a uint64 address
            return np_dtype(key)
        if key not in cache:
            cache[key] = np_dtype(key)
        return cache[key]

    interpreter._get_np_dtype = cached_np_dtype


if os.environ.get("TRITON_INTERPRET") == "1":
    _lighten_interpreter_bookkeeping()

# Under pytest-xdist (README's test command runs one worker per core) each worker gets its share of the
# cores for torch's intra-op threads, not all of them (workers x threads > cores slows every worker).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
BACKENDS = ("triton", "torch")

# (atol, rtol) per dtype for fp32-math kernels compared with float64 references.
TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


# Run first: the sm_90 compile of every kernel launch takes minutes of its two compile processes on an empty
# Triton cache (a fresh machine); started first, it overlaps the rest of the suite instead of ending it alone.
FIRST = ("test_kernels_compile.py::test_every_kernel_compiles_for_sm90",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.endswith(FIRST))  # (stable: the rest keep their order)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


# The error a forced backend="triton" call raises for a CPU tensor when the interpreter is off.
CPU_TRITON_ERROR = "backend='triton' requested for a cpu tensor"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """On a CUDA machine the interpreter is off (the kernels run compiled), so a test that builds CPU
    tensors (gloo workers, CPU-made data) and forces the Triton backend cannot run its Triton case there:
    reported as skipped, not failed (its CPU run covers it). Nothing changes without CUDA."""
    try:
        return (yield)
    except RuntimeError as e:
        if HAS_CUDA and CPU_TRITON_ERROR in str(e):
            pytest.skip("Triton case on CPU tensors: needs TRITON_INTERPRET=1, off on a CUDA machine")
        raise


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every correctness case runs on both backends."""
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh but reproducible data per test: seed from the test's node id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN (floats) or a huge value (ints) so unwritten outputs show."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def poison_allocations(monkeypatch):
    """From here on every ``torch.empty``, ``empty_like`` and ``Tensor.new_empty`` comes back poisoned
    (``poison``): a buffer an op reads before writing it shows (CPU's fresh memory is mostly zeros)."""
    real = (torch.empty, torch.empty_like, torch.Tensor.new_empty)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real[0](*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real[1](*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real[2](self, *a, **k)))


def blas_runs() -> bool:
    """Whether linear CE's cuBLAS stages (``BLAS``) run here: the interpreter, or CUDA with torch >= 2.10."""
    from tri_losses._backend import kernels
    return DEVICE.type != "cuda" or kernels("linear_cross_entropy")._torch_at_least(2, 10)


def assert_close(actual, expected, *, dtype=torch.float32, atol=None, rtol=None, msg=""):
    a, r = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(),
                               atol=a if atol is None else atol, rtol=r if rtol is None else rtol,
                               equal_nan=True, msg=(lambda m: f"{msg}: {m}") if msg else None)


def assert_same_rounding(actual, expected, *, backend, msg=""):
    """Two results the package computes along the same arithmetic in two different kernels (a fast path
    against the exact path, a filter that drops nothing against none): bitwise equal on the CPU and in the
    interpreter. On a GPU with the Triton backend the two are other compiled programs, whose fp32 arithmetic
    the compiler may contract differently (FMA), so there they agree to a few fp32 roundings (an H100 run
    showed bitwise equality failing for such a pair)."""
    if DEVICE.type == "cuda" and backend == "triton":
        # a 16-bit result rounds the two fp32 values: one fp32 ulp apart may land an ulp of bf16/fp16 apart
        half = actual.dtype in (torch.bfloat16, torch.float16)
        rtol = 2 * torch.finfo(actual.dtype).eps if half else 1e-5
        torch.testing.assert_close(actual, expected, atol=rtol if half else 1e-6, rtol=rtol, equal_nan=True,
                                   msg=(lambda m: f"{msg}: {m}") if msg else None)
    else:
        assert torch.equal(actual, expected), msg or (actual, expected)
