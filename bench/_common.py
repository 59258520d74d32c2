"""Shared benchmark plumbing: timing, peak memory, result rows.

Every family module ``bench/<family>.py`` exposes ``run(device: torch.device, smoke: bool) -> list[dict]``
returning rows with the keys of :data:`COLUMNS` (missing ones are left blank). ``bench/run.py`` calls
them all and writes the table and plot.
"""
from __future__ import annotations

import statistics
import time

import torch

COLUMNS = ("family", "case", "dtype", "provider", "fwd_ms", "fwdbwd_ms", "peak_mb", "extra_mb",
           "metric", "note")


def time_ms(fn, device: torch.device, *, warmup: int = 25, rep: int = 200, grad_to_none=None, smoke=False):
    """Median, p20 and p80 time of ``fn()`` in ms: triton's do_bench on CUDA, a wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        q = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return tuple(q)
    n = 2 if smoke else 5
    fn()  # warm-up
    ts = []
    for _ in range(n):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[0], ts[-1]


def peak_mb(fn, device: torch.device):
    """(peak allocated MB during one ``fn()``, peak minus the memory allocated before). CUDA only."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


def try_import(name: str):
    """Import a peer package, or return None (the caller reports it as skipped)."""
    try:
        return __import__(name, fromlist=["_"])
    except Exception:
        return None


def compiled(fn):
    """``torch.compile(dynamic=False)`` of a peer function (warmed up by the first timing call)."""
    return torch.compile(fn, dynamic=False)
