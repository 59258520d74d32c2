"""fsa_loss over ctc_fsa vs PyTorch's CTC and tri_losses.ctc_loss (T = 1000, B = 64, V = 1000, S = 100),
and a 3-state-per-label HMM topology at the same sizes: forward+backward time and peak memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import peak_mb, time_ms

import tri_losses


def run(device: torch.device, smoke: bool) -> list[dict]:
    T, B, V, S = (30, 2, 20, 5) if smoke else (1000, 64, 1000, 100)
    x0 = torch.randn(T, B, V, device=device)
    tg = torch.randint(1, V, (B, S), device=device)
    il = torch.full((B,), T, dtype=torch.long, device=device)
    tl = torch.full((B,), S, dtype=torch.long, device=device)
    ctc = tri_losses.ctc_fsa(tg, tl, 0)
    hmm = tri_losses.hmm_fsa(torch.randint(0, V // 3, (B, S), device=device), tl, states_per_label=3,
                             loop_cost=0.7, forward_cost=0.7)
    provs = {
        "fsa_loss(ctc_fsa)": lambda x: tri_losses.fsa_loss(x, il, ctc),
        "tri_losses.ctc_loss": lambda x: tri_losses.ctc_loss(x, tg, il, tl, input_type="logits", reduction="sum"),
        "torch ctc_loss": lambda x: F.ctc_loss(x.log_softmax(-1), tg, il, tl, reduction="sum"),
        "fsa_loss(hmm 3-state)": lambda x: tri_losses.fsa_loss(x, il, hmm),
    }
    rows = []
    for name, fn in provs.items():
        x = x0.clone().requires_grad_(True)
        fb = time_ms(lambda: fn(x).backward(), device, grad_to_none=[x], smoke=smoke)
        peak, extra = peak_mb(lambda: fn(x).backward(), device)
        rows.append(dict(family="automata", case=f"T={T},B={B},V={V},S={S}", dtype="float32", provider=name,
                         fwdbwd_ms=fb[0], peak_mb=peak, extra_mb=extra))
    return rows
