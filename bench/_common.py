"""Shared benchmark plumbing: timing, peak memory, the copy-bandwidth probe, providers and result rows.

Every family module ``bench/bench_<family>.py`` exposes ``run(device: torch.device, smoke: bool) -> list[dict]``
returning rows (dicts with the keys of :data:`COLUMNS`, missing ones blank, plus machine-readable extras:
``floor_bytes``, ``flops``, ``p20_ms``/``p80_ms``, ``goal_shape``). ``bench/run.py`` calls them and
``bench/report.py`` writes the table, JSON and plot.

Modes, set by ``bench/run.py`` through :data:`MODE`:
- ``smoke``: tiny shapes (always on CPU); ``goal``: only the shapes the open goals name; ``quick``: a
  subset of those (bf16, one upstream-gradient variant, fewer providers) for a re-run after a fix;
- ``record``: every Triton launch is recorded instead of run (``tests/aot.py``), each provider that
  launches Triton kernels is called once and nothing is timed (GPU precompile step).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

COLUMNS = ("family", "case", "dtype", "provider", "variant", "fwd_ms", "fwdbwd_ms", "peak_mb", "extra_mb",
           "floor_pct", "metric", "note")

MODE = {"record": False, "goal": False, "quick": False, "no_compile": False, "rep": 200, "warmup": 25}
_COPY = {}


def time_ms(fn, device: torch.device, *, grad_to_none=None, smoke=False):
    """(median, p20, p80) of ``fn()`` in ms: triton's do_bench on CUDA (L2 flushed per rep), a wall clock on CPU.

    In record mode ``fn`` runs once (its launches are recorded, not executed) and NaNs come back."""
    if MODE["record"]:
        fn()
        return (math.nan,) * 3
    if device.type == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=MODE["warmup"], rep=MODE["rep"], grad_to_none=grad_to_none,
                              quantiles=[0.5, 0.2, 0.8]))
    n = 2 if smoke else 5
    fn()  # warm-up
    ts = []
    for _ in range(n):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[0], ts[-1]


def peak_mb(fn, device: torch.device, grads=()):
    """(peak allocated MB during one ``fn()``, peak minus the memory allocated before). CUDA only.

    ``grads``: tensors whose ``.grad`` is dropped first, so an earlier call's gradient is not counted."""
    if device.type != "cuda" or MODE["record"]:
        return math.nan, math.nan
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written per second), once per process.

    A 2 GiB bf16 ``copy_`` on CUDA (well beyond L2), 64 MiB on CPU. Byte floors divide by this figure."""
    if device.type in _COPY:
        return _COPY[device.type]
    if MODE["record"]:
        return math.nan
    n = (1 << 30) if device.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)[0]
    _COPY[device.type] = 2 * n * 2 / (ms * 1e-3) / 1e9
    del src, dst
    return _COPY[device.type]


def floor_pct(floor_bytes: float, ms: float, device: torch.device) -> float:
    """Percent of the byte floor reached: time the floor takes at the measured copy bandwidth / ``ms``."""
    if not ms or math.isnan(ms):
        return math.nan
    return 100.0 * floor_bytes / (copy_bandwidth(device) * 1e9) / (ms * 1e-3)


def try_import(name: str):
    """(module, None), or (None, "why") for a peer that is missing or fails to import (reported as a row).

    ``importlib.import_module``, not ``__import__(name, fromlist=...)``: a fromlist entry is looked up on
    the module, and Liger's lazy module ``__getattr__`` raises ImportError for any name when transformers
    is not installed (the GPU image may lack it), which failed the import of a usable peer."""
    import importlib
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any import failure is a row, never fatal
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


class Provider:
    """One benchmarked implementation. ``jit``: it launches Triton JIT kernels (run in record mode);
    ``missing``: why it cannot run here (it still gets a row saying so)."""

    def __init__(self, name, fn=None, *, jit=False, note="", missing=None):
        self.name, self.fn, self.jit, self.note, self.missing = name, fn, jit, note, missing


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def missing_row(family, case, dtype, provider: Provider, variant=""):
    return dict(family=family, case=case, dtype=dtype_name(dtype), provider=provider.name, variant=variant,
                note=f"not run: {provider.missing}")


def failed_row(family, case, dtype, provider: Provider, err: Exception, variant=""):
    return dict(family=family, case=case, dtype=dtype_name(dtype), provider=provider.name, variant=variant,
                note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}")


def active(providers, family, case, dtype, rows, variant=""):
    """The providers to run now: missing ones become rows, non-JIT ones are skipped in record mode,
    ``torch.compile`` ones with ``no_compile`` (a dry run)."""
    out = []
    for p in providers:
        if p.missing:
            if not MODE["record"]:
                rows.append(missing_row(family, case, dtype, p, variant))
        elif MODE["no_compile"] and p.name == "torch-compile":
            continue
        elif p.jit or not MODE["record"]:
            out.append(p)
    return out


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compiled(fn):
    """``torch.compile(dynamic=False)`` built once per shape: dynamo's caches are reset first and the
    recompile limit raised, so the variants timed at one shape (mean, none, per-row upstream) never
    fall back to eager. Build a new one for every shape."""
    import torch._dynamo as dynamo
    dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 64)
    return torch.compile(fn, dynamic=False)


def outputs(loss_fn, grads, upstream=None):
    """``[loss, *gradients]`` (detached) of one forward+backward of ``loss_fn()`` with the ``grads`` tensors'
    ``.grad`` cleared before and after (``upstream``: the backward's gradient for a non-scalar loss)."""
    for t in grads:
        t.grad = None
    loss = loss_fn()
    loss.backward(upstream.to(loss.dtype) if upstream is not None and loss.dim() else None)
    out = [loss.detach().float()] + [t.grad for t in grads]
    for t in grads:
        t.grad = None
    return out


def _max_diff(a, b, chunk=1 << 24):
    """``(max |a - b|, max |b|)`` over the entries where ``b`` is finite, in float64 a chunk at a time (an
    N x V gradient in float64 would need 8 bytes per logit at once); ``(inf, 1)`` where ``a`` and ``b``
    disagree on which entries are finite."""
    diff, scale = 0.0, 0.0
    for i in range(0, b.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        fin = torch.isfinite(y)
        if not torch.equal(fin, torch.isfinite(x)):
            return math.inf, 1.0
        if fin.any():
            diff = max(diff, float((x - y)[fin].abs().max()))
            scale = max(scale, float(y[fin].abs().max()))
    return diff, scale


def agreement(row, got, ref, ref_name, tol):
    """Record in ``row`` how far ``got`` (``[loss, *gradients]``, see :func:`outputs`) is from the reference
    run's ``ref``: ``check`` = the largest ``max |got - ref| / max |ref|`` over the loss and each gradient
    (inf where they disagree on which entries are finite or a gradient is missing), ``check_ok`` =
    ``check <= tol``, and a note. A benchmark row is only worth its time if its result is right: this is the
    GPU run's correctness check at the goal shapes (every earlier test ran smaller shapes)."""
    if MODE["record"] or "fwdbwd_ms" not in row:
        return row
    err = 0.0
    for a, b in zip(got, ref):
        if a is None or b is None:
            err = math.inf if (a is None) != (b is None) else err
            continue
        diff, scale = _max_diff(a.detach().reshape(-1), b.detach().reshape(-1))
        err = max(err, diff / (scale or 1.0))
    row["check"], row["check_ok"] = err, err <= tol
    verdict = "agrees with" if err <= tol else "DIFFERS from"
    row["note"] = "; ".join(x for x in (row.get("note", ""), f"{verdict} {ref_name} (rel {err:.1e}, tol {tol:.0e})")
                            if x)
    return row


def case_failed(family, case, dtype, err: Exception) -> dict:
    """A row for a case that failed outside one provider's timing (data, the reference run); the traceback
    goes to the log. The family's other cases still run."""
    import traceback
    traceback.print_exc()
    return dict(family=family, case=case, dtype=dtype_name(dtype), provider="",
                note=f"case failed: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")


def too_big(family, case, dtype, device, need_bytes: float):
    """A row saying why a case is not run where it needs more than 90% of the device's memory, else None
    (an 80 GB card cannot hold every fp32 goal shape that a 141 GB one can)."""
    if device.type != "cuda" or MODE["record"]:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if need_bytes <= 0.9 * total:
        return None
    return dict(family=family, case=case, dtype=dtype_name(dtype), provider="",
                note=f"not run: needs about {need_bytes / 2**30:.0f} GiB, the device has {total / 2**30:.0f} GiB")


def check(row, got_fn, ref_fn, ref_name, tol):
    """:func:`agreement` of ``got_fn()`` against ``ref_fn()`` (both :func:`outputs` lists; ``ref_fn`` may
    cache), run only for a row that was timed; a failure of either run is noted in the row, never raised."""
    if MODE["record"] or "fwdbwd_ms" not in row:
        return row
    try:
        return agreement(row, got_fn(), ref_fn(), ref_name, tol)
    except Exception as e:  # noqa: BLE001 - the timing stands; the check's failure is reported
        row["check"], row["check_ok"] = math.inf, False
        row["note"] = "; ".join(x for x in (row.get("note", ""), f"agreement check failed: {type(e).__name__}: "
                                            f"{str(e).splitlines()[0][:80] if str(e) else ''}") if x)
        return row


@contextlib.contextmanager
def swapped(module, name, value):
    """``module.name = value`` for the duration (the launchers read their tables and switches at call time)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# every row ``measure`` has made in this process, in order: what a bench run killed at its timeout still reports
# (bench/run.py writes them on SIGTERM)
MEASURED: list = []


def measure(family, case, dtype, p: Provider, device, smoke, *, fwd, step, grads, variant="", floor=None,
            flops=None, note=""):
    """One row for provider ``p``: ``fwd()`` (may be None) and ``step()`` (forward+backward) timed, peak memory
    of one step; ``floor``: (forward bytes, forward+backward bytes) of the op's byte floor; ``flops``: FLOPs of
    one step as this provider does them, with its label, e.g. ``(8*N*V*D, "8NVD")``. A failure is a row."""
    try:
        f = time_ms(fwd, device, smoke=smoke) if fwd is not None else (math.nan,) * 3
        fb = time_ms(step, device, grad_to_none=grads, smoke=smoke)
        peak, extra = peak_mb(step, device, grads)
    except Exception as e:  # noqa: BLE001 - a provider failing is reported, not fatal
        free(device)
        return failed_row(family, case, dtype, p, e, variant)
    row = dict(family=family, case=case, dtype=dtype_name(dtype), provider=p.name, variant=variant, fwd_ms=f[0],
               fwdbwd_ms=fb[0], p20_ms=fb[1], p80_ms=fb[2], peak_mb=peak, extra_mb=extra,
               note="; ".join(x for x in (p.note, note, f"p20-p80 {fb[1]:.3g}-{fb[2]:.3g} ms") if x))
    metric = []
    if floor is not None and not MODE["record"]:
        row["floor_bytes"] = floor[1]
        row["floor_pct"] = floor_pct(floor[1], fb[0], device)
        row["fwd_floor_pct"] = floor_pct(floor[0], f[0], device)
        metric.append(f"{floor[1] / (fb[0] * 1e-3) / 1e9:.3g} GB/s")
    if flops is not None:
        row["flops"], row["flop_model"] = flops
        row["tflops"] = flops[0] / (fb[0] * 1e-3) / 1e12
        metric.append(f"{row['tflops']:.3g} TFLOP/s ({flops[1]})")
    row["metric"] = ", ".join(metric)
    MEASURED.append(row)  # the same dict: later notes (the agreement check) show in it
    return row
