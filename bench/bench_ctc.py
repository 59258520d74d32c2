"""CTC and automata full-sum: forward and forward+backward from logits to the logits' gradient, peak memory.

Providers: tri_losses ``ctc_loss(input_type="logits")``; PyTorch native (``log_softmax`` in fp32 +
``F.ctc_loss``: for bf16 logits the upcast is part of its time); PyTorch's cuDNN path where its conditions
hold (fp32, blank 0, int32 concatenated targets on the CPU, every input length = T, target lengths < 256),
a row saying why where they do not; ``fsa_loss(ctc_fsa)`` (the automaton path on the same input); and an
HMM full-sum row (3 states per phoneme, 40 phonemes, 100 phonemes per sequence).
Byte floor: ``3*T*B*V*s``, the emission passes only (read the logits for the row log-sum-exp, read them
again and write the gradient); the alpha/beta recursions are latency-bound and not in it.
CPU rows: tri_losses' torch backend vs ``F.ctc_loss`` at T=300, B=8, C=500, S=60 (the CPU fallback goal), and
``fsa_loss(ctc_fsa)`` there (the automata's torch backend; no goal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import MODE, Provider, active, case_failed, check, free, measure, outputs

import tri_losses

FAMILY = "ctc"


def cases(device, smoke):
    """(T, B, V, S, dtype, is goal shape)."""
    if device.type != "cuda":
        out = [(50, 4, 20, 10, torch.float32, False)]
        if not MODE["goal"]:
            out.append((300, 8, 500, 60, torch.float32, False))  # the CPU fallback's shape
        return out
    dtypes = (torch.float32,) if MODE["quick"] else (torch.float32, torch.bfloat16)
    return [(1000, 64, V, S, dt, True) for V in (1000, 10000) for S in (100, 300) for dt in dtypes]


def _native(x, tg, il, tl, r):
    return F.ctc_loss(x.float().log_softmax(-1), tg, il, tl, reduction=r)


def _providers(device, dtype, S, tg, il, tl, backend):
    def native(x, r):
        return _native(x, tg, il, tl, r)

    why = None
    if device.type != "cuda":
        why = "needs CUDA"
    elif dtype != torch.float32:
        why = "cuDNN CTC needs fp32"
    elif S >= 256:
        why = "cuDNN CTC needs target lengths < 256"
    (tgc, ilc, tlc), where = _cudnn_inputs(tg, il, tl) if why is None else ((None, None, None), "")
    fsa = tri_losses.ctc_fsa(tg, tl, 0)
    return [
        Provider("tri_losses" if backend == "auto" else f"tri_losses ({backend} backend)",
                 lambda x, r: tri_losses.ctc_loss(x, tg, il, tl, reduction=r, input_type="logits", backend=backend),
                 jit=True),
        Provider("torch-native", native, note="fp32 log_softmax counted"),
        Provider("torch-cudnn", lambda x, r: F.ctc_loss(x.log_softmax(-1), tgc, ilc, tlc, reduction=r), missing=why,
                 note=where),
        Provider("fsa_loss(ctc_fsa)", lambda x, r: _fsa_mean(tri_losses.fsa_loss(x, il, fsa, reduction="none"), tl, r),
                 jit=True),
    ]


def _cudnn_inputs(tg, il, tl):
    """Concatenated int32 targets and int32 lengths where PyTorch's cuDNN CTC takes them: on the CPU (the
    cuDNN 7 API's documented conditions) when that runs in this build, else on the GPU (the cuDNN 8+ path
    of the tensor-lengths overload; a build without the CPU form fails with a device mismatch). Probed
    once on a tiny input. Returns the three tensors and a note for the row."""
    cpu = (tg.int().flatten().cpu(), il.int().cpu(), tl.int().cpu())
    if tg.device.type != "cuda":
        return cpu, ""
    lp = torch.randn(4, 1, 5, device=tg.device).log_softmax(-1).requires_grad_(True)
    try:
        F.ctc_loss(lp, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([4], dtype=torch.int32),
                   torch.tensor([2], dtype=torch.int32)).backward()
        return cpu, "int32 targets and lengths on the CPU"
    except RuntimeError:
        return tuple(t.to(tg.device) for t in cpu), ("int32 targets and lengths on the GPU (this build rejects "
                                                     "CPU targets with CUDA log-probs)")


def _fsa_mean(loss, tl, reduction):
    """``fsa_loss`` per sequence -> ``ctc_loss``'s reduction (mean: divided by target length, then averaged)."""
    return (loss / tl.clamp_min(1)).mean() if reduction == "mean" else loss


def _hmm_rows(device, smoke, T, B, dtype, rows):
    S, phonemes = (5, 40) if smoke else (100, 40)
    x = torch.randn(T, B, 3 * phonemes, device=device, dtype=dtype)
    il = torch.full((B,), T, dtype=torch.long, device=device)
    tl = torch.full((B,), S, dtype=torch.long, device=device)
    hmm = tri_losses.hmm_fsa(torch.randint(0, phonemes, (B, S), device=device), tl, states_per_label=3,
                             loop_cost=0.7, forward_cost=0.7)
    p = Provider("fsa_loss(hmm 3-state)", lambda t: tri_losses.fsa_loss(t, il, hmm), jit=True)
    case = f"hmm T={T},B={B},{phonemes} phonemes x 3 states,S={S}"
    for p in active([p], FAMILY, case, dtype, rows, "sum"):
        xg = x.clone().requires_grad_(True)
        rows.append(measure(FAMILY, case, dtype, p, device, smoke, fwd=lambda: p.fn(x),
                            step=lambda: p.fn(xg).backward(),
                            grads=[xg], variant="sum"))


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    for (T, B, V, S, dtype, goal) in cases(device, smoke):
        case = f"T={T},B={B},V={V},S={S}"
        try:
            _run_case(device, smoke, T, B, V, S, dtype, goal, case, rows)
        except Exception as e:  # noqa: BLE001 - one case failing must not lose the others' rows
            rows.append(case_failed(FAMILY, case, dtype, e))
        free(device)
    T, B = (30, 2) if smoke else (1000, 64)
    hmm_dtypes = [] if MODE["quick"] else [torch.float32] if smoke or MODE["goal"] else [torch.float32, torch.bfloat16]
    for dtype in hmm_dtypes:
        try:
            _hmm_rows(device, smoke, T, B, dtype, rows)
        except Exception as e:  # noqa: BLE001
            rows.append(case_failed(FAMILY, f"hmm T={T},B={B}", dtype, e))
    return rows


def _run_case(device, smoke, T, B, V, S, dtype, goal, case, rows):
    x = torch.randn(T, B, V, device=device).to(dtype)
    tg = torch.randint(1, V, (B, S), device=device)
    il = torch.full((B,), T, dtype=torch.long, device=device)
    tl = torch.full((B,), S, dtype=torch.long, device=device)
    g = torch.rand(B, device=device)
    cpu_fallback = device.type == "cpu" and (T, B, V, S) == (300, 8, 500, 60)
    provs = _providers(device, dtype, S, tg, il, tl, "torch" if device.type == "cpu" else "auto")
    if cpu_fallback:  # the torch backend against PyTorch, and its automaton path on the same input
        provs = [p for p in provs if p.name.startswith("tri_losses") or p.name in ("torch-native",
                                                                                     "fsa_loss(ctc_fsa)")]
    floor = (T * B * V * x.element_size(), 3 * T * B * V * x.element_size())
    ref = []  # torch-native's loss and gradient (mean), made once per case for the agreement check

    def reference():
        if not ref:
            xr = x.clone().requires_grad_(True)
            ref.extend(outputs(lambda: _native(xr, tg, il, tl, "mean"), [xr]))
        return ref

    for variant, red in (("mean", "mean"), ("none, per-row g", "none")):
        if variant != "mean" and (cpu_fallback or MODE["quick"] or (V, S, dtype) != (1000, 100, torch.float32)
                                  and not smoke):
            continue  # per-sequence upstream gradients at one shape
        for p in active(provs, FAMILY, case, dtype, rows if variant == "mean" else [], variant):
            xg = x.clone().requires_grad_(True)

            def step(fn=p.fn, xg=xg, red=red):
                loss = fn(xg, red)
                loss.backward() if red == "mean" else loss.backward(g)

            fwd = None if cpu_fallback else (lambda fn=p.fn: fn(x, red))  # the CPU goal is fwd+bwd
            row = measure(FAMILY, case, dtype, p, device, smoke, fwd=fwd, step=step,
                          grads=[xg], variant=variant, floor=floor)
            del xg, step
            if variant == "mean" and p.name != "torch-native":
                def got(fn=p.fn):
                    xc = x.clone().requires_grad_(True)
                    return outputs(lambda: fn(xc, "mean"), [xc])
                # tolerance: PyTorch's fp32 CTC gradient itself is ~1e-3 off a float64 one at T = 300
                # (a frame's posteriors scaled by the rounding of a large -log Z)
                check(row, got, reference, "torch-native", 1e-2 if dtype == torch.float32 else 3e-2)
            row["goal_shape"] = goal
            row["cpu_fallback"] = cpu_fallback
            rows.append(row)
            free(device)
