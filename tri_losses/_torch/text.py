"""Pure-PyTorch edit distance (batched row DP with a prefix-min) and BLEU n-gram statistics."""
from __future__ import annotations

import math

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


def ctc_beam_search(x, lengths, beam_width, blank):
    """TensorFlow's ``CTCBeamSearchDecoder`` (prefix beam search) top-1, vectorised over batch and beam.

    ``x (B, T, C)`` float64 frame scores, each frame already normalised (log-softmax); ``lengths (B,)`` on
    ``x``'s device. Returns ``(labels (B, T) padded with 0, lengths (B,), scores (B,))``: the most probable
    prefix in the final beam and its log-probability. No host sync: one Python step per frame, each a
    fixed number of device ops on ``(B, K, K)`` / ``(B, K, M)`` tensors.

    State per beam slot: ``pb``/``pl`` (log P of the prefix ending in a blank / a label), the prefix
    length ``n``, its last label, its labels, and ``anc[b, i, j]``: slot i's prefix is a proper prefix of
    slot j's (kept exactly from the previous step's relation, so prefix identity needs no hashing). A
    slot's parent (its prefix minus the last label) is the slot i with ``anc[i, j]`` and ``n_i + 1 = n_j``;
    as in TF, a prefix already in the beam gets its parent's extension only while the parent is in the
    beam, and a prefix not in the beam enters as ``P(parent) * y_c`` (``P_blank(parent)`` for a repeat).

    Candidates per frame: the K beams (extended by blank / a repeat) and the beam x class extensions,
    over the M = K + 1 best non-blank classes of the frame only. That pruning cannot change the top K:
    a class with K + 1 better classes loses, for the same beam, to at least K strictly better distinct
    candidates (each better class but possibly the beam's own last label gives a new prefix or raises
    an existing one above it), so it is never chosen (up to exact ties, which TF breaks arbitrarily too).
    """
    B, T, C = x.shape
    dev = x.device
    K = beam_width
    neg = -math.inf
    ninf = torch.tensor(neg, dtype=x.dtype, device=dev)
    y_blank = x[..., blank]  # (B, T)
    M = min(K + 1, C - 1)
    if M > 0:
        y_nb = x.index_fill(2, torch.tensor([blank], device=dev), neg)
        ysel, csel = torch.topk(y_nb, M, dim=2)  # (B, T, M): the frame's M best non-blank classes
    bi = torch.arange(B, device=dev)[:, None]
    slot = torch.arange(K, device=dev)
    pb = torch.full((B, K), neg, dtype=x.dtype, device=dev)
    pb[:, 0] = 0.0  # the empty prefix
    pl = torch.full((B, K), neg, dtype=x.dtype, device=dev)
    n = torch.zeros(B, K, dtype=torch.int64, device=dev)
    last = torch.full((B, K), -1, dtype=torch.int64, device=dev)
    labels = torch.zeros(B, K, T, dtype=torch.int64, device=dev)  # a slot's prefix (past n: unused)
    anc = torch.zeros(B, K, K, dtype=torch.bool, device=dev)
    valid = (slot == 0).expand(B, K)
    child = torch.zeros(B, K + 1, C, dtype=torch.bool, device=dev)
    true, false = torch.ones((), dtype=torch.bool, device=dev), torch.zeros((), dtype=torch.bool, device=dev)
    for t in range(T):
        active = t < lengths  # (B,)
        tot = torch.logaddexp(pb, pl)
        y_t = x[:, t]  # (B, C)
        y_last = torch.where(n > 0, y_t.gather(1, last.clamp(min=0)), ninf)  # (B, K)
        # the beams: blank after anything; the last label repeated; the parent's extension (parent in beam)
        parent = anc & (n[:, :, None] + 1 == n[:, None, :])  # [b, i, j]: slot i is slot j's parent
        has_parent = parent.any(1)
        pidx = parent.to(torch.int8).argmax(1)  # (B, K), valid where has_parent
        p_pb, p_tot, p_last = pb.gather(1, pidx), tot.gather(1, pidx), last.gather(1, pidx)
        from_parent = torch.where(has_parent, torch.where(p_last == last, p_pb, p_tot), ninf)
        keep_pb = tot + y_blank[:, t, None]
        keep_pl = torch.logaddexp(pl, from_parent) + y_last
        keep = torch.where(valid, torch.logaddexp(keep_pb, keep_pl), ninf)
        c = csel[:, t] if M > 0 else None  # (B, M)
        if M > 0:
            prev = torch.where(c[:, None, :] == last[:, :, None], pb[:, :, None], tot[:, :, None])  # (B, K, M)
            ext = prev + ysel[:, t, None, :]
            # an extension that is already a beam was counted in that beam (its parent's extension)
            at = (bi.expand(B, K), torch.where(has_parent & valid, pidx, K), last.clamp(min=0))
            child.index_put_(at, true)  # child[b, i, c]: slot i + c is a slot (row K: no parent)
            merged = child[:, :K].gather(2, c[:, None, :].expand(B, K, M))
            child.index_put_(at, false)
            ext = torch.where(merged | ~valid[:, :, None], ninf, ext)
            cand = torch.cat([keep, ext.reshape(B, K * M)], 1)
        else:
            cand = keep
        score, idx = torch.topk(cand, K, dim=1)  # ties: arbitrary, as in TF
        act = active[:, None]
        idx = torch.where(act, idx, slot)  # a finished sequence keeps its beam (scores restored below)
        is_ext = idx >= K
        e = (idx - K).clamp(min=0)
        src = torch.where(is_ext, e // max(M, 1), idx)
        new_c = c.gather(1, e % M) if M > 0 else last
        new_valid = torch.where(act, score > neg, valid)
        # the proper-prefix relation between the new slots, from the old one (j = row, k = column)
        n_a = n.gather(1, src)
        A = anc.gather(1, src[:, :, None].expand(B, K, K)).gather(2, src[:, None, :].expand(B, K, K))
        flat = ((bi * K + src)[:, None, :] * T + n_a.clamp(max=T - 1)[:, :, None]).reshape(-1)
        nxt = labels.reshape(-1).index_select(0, flat).view(B, K, K)  # old prefix a_k at position n_{a_j}
        ej, ek = is_ext[:, :, None], is_ext[:, None, :]
        follows = A & (nxt == new_c[:, :, None])  # old a_j + c_j is a prefix of old a_k
        longer = n_a[:, :, None] + 1 < n_a[:, None, :]
        anc = torch.where(ej, follows & (ek | longer), A | (ek & (src[:, :, None] == src[:, None, :])))
        anc = anc & new_valid[:, :, None] & new_valid[:, None, :]
        rows = (bi * K + src).reshape(-1)
        labels = labels.reshape(B * K, T).index_select(0, rows)
        # an extension's label at position n_a (a kept slot writes past its prefix: never read)
        at = torch.arange(B * K, device=dev) * T + n_a.clamp(max=T - 1).reshape(-1)
        labels = labels.view(-1).index_copy_(0, at, torch.where(is_ext, new_c, 0).reshape(-1)).view(B, K, T)
        pb = torch.where(act, torch.where(is_ext | ~new_valid, ninf, keep_pb.gather(1, src)), pb)
        pl = torch.where(act, torch.where(new_valid, torch.where(is_ext, score, keep_pl.gather(1, src)), ninf), pl)
        last = torch.where(is_ext, new_c, last.gather(1, src))
        n = n_a + is_ext.long()
        valid = new_valid
    tot = torch.where(valid, torch.logaddexp(pb, pl), ninf)
    score, best = tot.max(1)
    out = labels[torch.arange(B, device=dev), best][:, :T]
    length = n.gather(1, best[:, None])[:, 0]
    out = torch.where(torch.arange(T, device=dev)[None, :] < length[:, None], out, 0)
    return out, length, score
