"""CUDA-graph capture of the main ops' forward+backward (CE: one program per row, the split kernel of long
rows, ``reduction="none"``, ``inplace_backward``; linear CE; CTC) with host syncs as errors.

``python bench/cuda_graphs.py OUT.json``: for each op, after two warm-up steps on a side stream, one eager
forward+backward runs under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises), then the
step is captured in a ``torch.cuda.CUDAGraph`` (a sync fails the capture) and replayed twice; the replayed
loss and gradients must equal the eager step's (``compare``: bitwise, or said where only to rounding). Writes
one result per op.
Without CUDA every op is reported as skipped.
"""
from __future__ import annotations

import json
import sys
import traceback

import torch


OPS = ("cross_entropy", "cross_entropy none", "cross_entropy split V=128k", "cross_entropy inplace_backward",
       "linear_cross_entropy", "ctc_loss")


def _ops(dev):
    import tri_losses
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*s, dtype=torch.float32):
        return torch.randn(*s, device=dev, generator=g).to(dtype)

    x = randn(4096, 32768, dtype=torch.bfloat16)
    y = torch.randint(0, 32768, (4096,), device=dev, generator=g)
    xs = randn(2048, 131072, dtype=torch.bfloat16)  # 256 KiB rows: the training fast path's split kernel
    ys = torch.randint(0, 131072, (2048,), device=dev, generator=g)
    h, w = randn(4096, 1024, dtype=torch.bfloat16), (randn(32000, 1024) * 0.05).to(torch.bfloat16)
    yl = torch.randint(0, 32000, (4096,), device=dev, generator=g)
    lx = randn(200, 16, 500)
    tg = torch.randint(1, 500, (16, 50), device=dev, generator=g)
    il = torch.full((16,), 200, device=dev)
    tl = torch.randint(10, 51, (16,), device=dev, generator=g)
    return {
        "cross_entropy": ([x], lambda a: tri_losses.cross_entropy(a, y)),
        "cross_entropy none": ([x], lambda a: tri_losses.cross_entropy(a, y, reduction="none")),
        "cross_entropy split V=128k": ([xs], lambda a: tri_losses.cross_entropy(a, ys)),
        # the gradient written over the logits: a non-leaf buffer the graph refills on every replay
        "cross_entropy inplace_backward": ([x], lambda a: tri_losses.cross_entropy(a * 1.0, y,
                                                                                   inplace_backward=True)),
        "linear_cross_entropy": ([h, w], lambda a, b: tri_losses.linear_cross_entropy(a, b, yl)),
        "ctc_loss": ([lx], lambda a: tri_losses.ctc_loss(a, tg, il, tl, input_type="logits")),
    }


def check(name, inputs, fn):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    up = None

    def step():
        loss = fn(*leaves)
        nonlocal up
        if up is None:
            up = torch.rand_like(loss)  # a random (per-row where the loss is a vector) upstream gradient
        loss.backward(up)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for t in leaves:
        t.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        ref = step().detach().clone()
        ref_grads = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(2):
            graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return dict(op=name, **compare([out] + [t.grad for t in leaves], [ref] + ref_grads))


def compare(got, want) -> dict:
    """The replay's loss and gradients against the eager step's: bitwise is ``ok``; within a few roundings of
    their dtype is ``ok`` too, said in the detail (cuBLAS, linear CE's default GEMMs for bf16, may pick
    another algorithm on the capture's stream than on the eager one: other summation orders, each
    deterministic); more is ``FAIL``."""
    if all(torch.equal(a, b) for a, b in zip(got, want)):
        return dict(status="ok", detail="")
    worst = 0.0
    for a, b in zip(got, want):
        a64, b64 = a.double(), b.double()
        if not torch.equal(torch.isnan(a64), torch.isnan(b64)):
            return dict(status="FAIL", detail="replay differs from eager (NaN pattern)")
        if not torch.equal(torch.isinf(a64), torch.isinf(b64)) or not torch.equal(a64[torch.isinf(a64)],
                                                                                    b64[torch.isinf(b64)]):
            return dict(status="FAIL", detail="replay differs from eager (infinities)")
        ok = torch.isfinite(a64)
        rel = ((a64 - b64).abs()[ok] / (b64.abs()[ok] + 1e-6)).max().item() if ok.any() else 0.0
        tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 2e-2
        if not rel <= tol:
            return dict(status="FAIL", detail=f"replay differs from eager (max rel {rel:.1e}, {a.dtype})")
        worst = max(worst, rel)
    return dict(status="ok", detail=f"replay equals eager to rounding, not bitwise (max rel {worst:.1e})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else None
    results = []
    if not torch.cuda.is_available():
        results = [dict(op=n, status="skipped", detail="needs CUDA") for n in OPS]
    else:
        ops = _ops(torch.device("cuda"))
        assert tuple(ops) == OPS
        for name, (inputs, fn) in ops.items():
            try:
                results.append(check(name, inputs, fn))
            except Exception as e:  # noqa: BLE001 - each op reports on its own
                torch.cuda.set_sync_debug_mode("default")
                results.append(dict(op=name, status="FAIL", detail=f"{type(e).__name__}: {str(e)[:200]}"))
                traceback.print_exc()
            print(f"[graphs] {results[-1]}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(results, f)
    return results


if __name__ == "__main__":
    main()
