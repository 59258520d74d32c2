"""Vocab-parallel losses at world size 1: the process-group path (its collectives run, on one rank) vs the
plain call, cross-entropy at N=16384, V=131072 and linear CE at N=4096, D=4096, V=128256 (bf16 on a GPU).
Goal: the overhead stays within 5% with both on the same kernels (``reduction="none"`` with a per-row
upstream gradient; with ``"mean"`` the plain call takes the training fast path, which a process group
cannot). Rows say so when this tri_losses has no ``process_group`` argument.

Collective volume per training step (forward + backward) with P ranks, N rows, D features, s bytes per
input element (no multi-GPU machine is available here, so this is the design's count, not a measurement):

* shard offsets, once per call: an all-gather of every rank's (vocab_start or -1, size, validate flag, id range,
  row count, linear CE's input width, input dtype, options' CRC, class ids' hash), 10P int64 (80P bytes), read
  on the host (the kernels take the offset and V as scalars; the rest is checked there);
* cross-entropy forward: a MAX all-reduce of N floats (logits only) and a SUM all-reduce of 6N floats
  (sum-exp, target-weighted logit sum, target-weight sum, target logit, owner count, target class weight):
  28N bytes in fp32; the backward: none;
* linear cross-entropy: the same two O(N) all-reduces in the forward (the head's rows stay local, the
  logits never leave a rank) and, in the backward, one SUM all-reduce of the N x D input gradient in the
  input's dtype (N*D*s bytes; none with ``reduce_input_grad=False``).

At N=4096, D=4096, bf16: 112 KiB for the loss plus 32 MiB for the input gradient per step, against
N*V*4 = 2 GiB for gathering fp32 logits of V=128256 classes. With ``validate=True`` add an all-gather of
2 int64 per rank (whether the target holds class ids, linear CE's input shape CRC), a broadcast of
rank 0's N class ids with an all-gather of one int64 per rank (each rank's exact comparison), and the host
reads of the target range check.
``tests/test_vocab_parallel.py`` checks these counts by wrapping the collectives."""
from __future__ import annotations

import inspect
import os
import tempfile

import torch

from _common import Provider, active, free, measure

import tri_losses

FAMILY = "distributed"


def _group(device):
    import torch.distributed as dist
    if not dist.is_initialized():
        fd, path = tempfile.mkstemp()
        os.close(fd)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{path}",
                                rank=0, world_size=1)
    return dist.new_group([0])


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    ok = "process_group" in inspect.signature(tri_losses.cross_entropy).parameters
    ok_lce = "process_group" in inspect.signature(tri_losses.linear_cross_entropy).parameters
    dtype = torch.float32 if smoke else torch.bfloat16
    N, V, ND, D, VL = (64, 1024, 64, 64, 512) if smoke else (16384, 131072, 4096, 4096, 128256)
    why = None if ok else "this tri_losses has no process_group argument"
    pg = _group(device) if ok or ok_lce else None
    x0 = torch.randn(N, V, device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), device=device)
    h0 = torch.randn(ND, D, device=device, dtype=dtype)
    w0 = (torch.randn(VL, D, device=device) * 0.05).to(dtype)
    yl = torch.randint(0, VL, (ND,), device=device)
    gup, gupl = torch.rand(N, device=device), torch.rand(ND, device=device)
    # "mean": the plain call takes the training fast path (gradient formed in the forward), which a process
    # group cannot (the global log-sum-exp is known only after the collectives); "none" with a per-row
    # upstream gradient: both take the same kernels, so the ratio is the collective path's own overhead
    ce = [Provider("plain", lambda x, **k: tri_losses.cross_entropy(x, y, **k), jit=True),
          Provider("process_group (world size 1)",
                   lambda x, **k: tri_losses.cross_entropy(x, y, process_group=pg, **k), jit=True, missing=why)]
    lce = [Provider("plain", lambda h, w, **k: tri_losses.linear_cross_entropy(h, w, yl, **k), jit=True),
           Provider("process_group (world size 1)",
                    lambda h, w, **k: tri_losses.linear_cross_entropy(h, w, yl, process_group=pg, **k), jit=True,
                    missing=None if ok_lce else "this tri_losses has no process_group argument for linear CE")]
    for variant, red, g, gl in (("mean", "mean", None, None), ("none, per-row g", "none", gup, gupl)):
        case = f"cross_entropy N={N},V={V}"
        for p in active(ce, FAMILY, case, dtype, rows, variant):
            x = x0.clone().requires_grad_(True)
            rows.append(measure(FAMILY, case, dtype, p, device, smoke,
                                fwd=lambda fn=p.fn, red=red: fn(x0, reduction=red),
                                step=lambda fn=p.fn, red=red, g=g: fn(x, reduction=red).backward(g), grads=[x],
                                variant=variant))
        case = f"linear_cross_entropy N={ND},D={D},V={VL}"
        for p in active(lce, FAMILY, case, dtype, rows, variant):
            h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            rows.append(measure(FAMILY, case, dtype, p, device, smoke,
                                fwd=lambda fn=p.fn, red=red: fn(h0, w0, reduction=red),
                                step=lambda fn=p.fn, red=red, g=gl: fn(h, w, reduction=red).backward(g),
                                grads=[h, w], variant=variant))
    for r in rows:
        r["goal_shape"] = not smoke
    free(device)
    return rows
