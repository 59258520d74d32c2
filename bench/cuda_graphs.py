"""CUDA-graph capture of the main ops' forward+backward (CE: one program per row, the split kernel of long
rows, ``reduction="none"``, ``inplace_backward``; linear CE; CTC) with host syncs as errors.

``python bench/cuda_graphs.py OUT.json``: for each op, after two warm-up steps on a side stream, one eager
forward+backward runs under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises), then the
step is captured in a ``torch.cuda.CUDAGraph`` (a sync fails the capture) and replayed twice; the replayed
loss and gradients must equal the eager step's bitwise (the ops are deterministic). Writes one result per op.
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
    same = torch.equal(out, ref) and all(torch.equal(t.grad, r) for t, r in zip(leaves, ref_grads))
    return dict(op=name, status="ok" if same else "FAIL", detail="" if same else "replay differs from eager")


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
