"""Pure-PyTorch edit distance (batched row DP with a prefix-min) and BLEU n-gram statistics."""
from __future__ import annotations

import torch


def edit_distance(hyp, hyp_len, ref, ref_len):
    """(B,) int32 Levenshtein distances; rows over the hypothesis, vectorised over pairs and the reference."""
    B, H = hyp.shape
    R = ref.shape[1]
    dev = hyp.device
    j = torch.arange(R + 1, device=dev)
    D = j.expand(B, R + 1).clone()
    final = torch.where(hyp_len == 0, ref_len, 0).clone()
    for i in range(1, H + 1):
        a = hyp[:, i - 1:i]
        cost = (ref != a).long()  # (B, R)
        c = torch.empty_like(D)
        c[:, 0] = i
        c[:, 1:] = torch.minimum(D[:, 1:] + 1, D[:, :-1] + cost)
        D = j + torch.cummin(c - j, dim=1).values
        final = torch.where(hyp_len == i, D.gather(1, ref_len[:, None])[:, 0], final)
    return final.to(torch.int32)


def bleu_stats(hyp, hyp_len, ref, ref_len, max_order):
    """(B, 2N + 2) int32: match_n = sum over distinct hyp n-grams of min(count_hyp, count_ref), poss_n."""
    B, H = hyp.shape
    R = ref.shape[1]
    dev = hyp.device
    out = torch.zeros(B, 2 * max_order + 2, dtype=torch.int64, device=dev)
    for n in range(1, max_order + 1):
        nh, nr = H - n + 1, R - n + 1
        poss = (hyp_len - n + 1).clamp(min=0)
        out[:, max_order + n - 1] = poss
        if nh <= 0:
            continue
        ih = torch.arange(nh, device=dev)
        hv = ih[None, :] < poss[:, None]
        eq_hh = hv[:, :, None] & hv[:, None, :]
        for k in range(n):
            eq_hh = eq_hh & (hyp[:, k:k + nh, None] == hyp[:, None, k:k + nh])
        c_hyp = eq_hh.sum(2)
        earlier = (eq_hh & (ih[None, None, :] < ih[None, :, None])).any(2)
        if nr > 0:
            rv = torch.arange(nr, device=dev)[None, :] < (ref_len - n + 1)[:, None]
            eq_hr = hv[:, :, None] & rv[:, None, :]
            for k in range(n):
                eq_hr = eq_hr & (hyp[:, k:k + nh, None] == ref[:, None, k:k + nr])
            c_ref = eq_hr.sum(2)
        else:
            c_ref = torch.zeros_like(c_hyp)
        out[:, n - 1] = torch.where(hv & ~earlier, torch.minimum(c_hyp, c_ref), 0).sum(1)
    out[:, 2 * max_order] = hyp_len
    out[:, 2 * max_order + 1] = ref_len
    return out.to(torch.int32)
