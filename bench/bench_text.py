"""Edit distance (B = 256, L = 100..1000) vs a pure-Python DP loop and editdistance/rapidfuzz if installed;
BLEU statistics over 10,000 sentences vs sacrebleu if installed."""
from __future__ import annotations

import time

import torch

from _common import MODE, time_ms, try_import

import tri_losses
from tests.reference.catalogue import levenshtein as _py_levenshtein  # the pure-Python DP peer


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    B = 8 if smoke else 256
    if MODE["record"]:
        seqs, lens = torch.randint(0, 30, (B, 1000), device=device), torch.full((B,), 1000, device=device)
        tri_losses.edit_distance(seqs, lens, seqs, lens)
        return rows
    for L in ([30] if smoke else [1000] if MODE["goal"] else [100, 300, 1000]):
        hyp = torch.randint(0, 30, (B, L), device=device)
        ref = torch.randint(0, 30, (B, L), device=device)
        lens = torch.full((B,), L, device=device)
        t = time_ms(lambda: tri_losses.edit_distance(hyp, lens, ref, lens), device, smoke=smoke)
        mine = dict(family="text", case=f"edit_distance B={B},L={L}", dtype="int64", provider="tri_losses",
                    fwd_ms=t[0])
        rows.append(mine)
        hl, rl = hyp.cpu().tolist(), ref.cpu().tolist()
        n_py = 4 if L >= 300 else B
        t0 = time.perf_counter()
        for a, b in zip(hl[:n_py], rl[:n_py]):
            _py_levenshtein(a, b)
        py_ms = (time.perf_counter() - t0) * 1e3 * B / n_py
        rows.append(dict(family="text", case=f"edit_distance B={B},L={L}", dtype="int64", provider="python-loop",
                         fwd_ms=py_ms, note=f"extrapolated from {n_py} pairs" if n_py < B else ""))
        mine["metric"] = f"{py_ms / t[0]:.0f}x python-loop"  # the goal: >= 50x at B=256, L=1000
        mine["speedup"] = py_ms / t[0]
        mine["goal_shape"] = (B, L) == (256, 1000)
        for provider, module, fn in (("editdistance", "editdistance", "eval"),
                                     ("rapidfuzz", "rapidfuzz.distance.Levenshtein", "distance")):
            mod, _ = try_import(module)
            if mod is not None:  # optional C peers, timed as their users call them: one pair at a time
                f, t0 = getattr(mod, fn), time.perf_counter()
                for a, b in zip(hl, rl):
                    f(a, b)
                rows.append(dict(family="text", case=f"edit_distance B={B},L={L}", dtype="int64", provider=provider,
                                 fwd_ms=(time.perf_counter() - t0) * 1e3))
    NS = 200 if smoke else 10000
    hyp = torch.randint(0, 50, (NS, 25), device=device)
    ref = torch.randint(0, 50, (NS, 25), device=device)
    lens = torch.full((NS,), 25, device=device)
    t = time_ms(lambda: tri_losses.bleu(hyp, lens, ref, lens, mode="sacrebleu", aggregate="corpus"), device,
                smoke=smoke)
    mine = dict(family="text", case=f"corpus bleu {NS} sentences", dtype="int64", provider="tri_losses", fwd_ms=t[0])
    rows.append(mine)
    sb, _ = try_import("sacrebleu")
    if sb is not None:
        hs = [" ".join(map(str, r)) for r in hyp.cpu().tolist()]
        rs = [" ".join(map(str, r)) for r in ref.cpu().tolist()]
        t0 = time.perf_counter()
        sb.corpus_bleu(hs, [rs], tokenize="none")
        sb_ms = (time.perf_counter() - t0) * 1e3
        rows.append(dict(family="text", case=f"corpus bleu {NS} sentences", dtype="int64", provider="sacrebleu",
                         fwd_ms=sb_ms, note="from token strings (tokenize='none')"))
        mine["metric"] = f"{sb_ms / t[0]:.1f}x sacrebleu"
    return rows
