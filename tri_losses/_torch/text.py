"""Pure-PyTorch edit distance (batched row DP with a prefix-min), BLEU n-gram statistics, and TF's CTC beam
search on the host."""
from __future__ import annotations

import bisect
import heapq
import math

import numpy as np
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


_NEG = -math.inf


def _lse(a, b):
    if a == _NEG:
        return b
    if b == _NEG:
        return a
    return a + math.log1p(math.exp(b - a)) if a > b else b + math.log1p(math.exp(a - b))


def _beam_search_one(x, blank, K):
    """TF's ``CTCBeamSearchDecoder`` on one sequence: ``x (T, C)`` float64 numpy, rows log-softmax
    normalised. Returns (labels, log-probability) of the best prefix in the final beam.

    Frame step, as TF: (1) the beam, best first, carried over: blank after anything, the last label
    repeated, plus the parent's extension while the parent is in the beam; (2) each beam whose previous
    probability beats the beam's current bottom is extended, in class order, by every non-blank class
    whose prefix is not in the beam now: the new prefix enters if it beats the bottom, which is dropped
    (probabilities cleared); one that does not enter has all its probabilities cleared, so a beam
    dropped earlier in the frame and re-created that way is not extended later in the frame.

    Work saved without changing that result: once the beam is full its bottom only rises, so a beam
    visits only the classes that beat the bottom at its turn (``x[c] + P(beam) > bottom``, found by
    bisection in the frame's sorted classes), plus the classes leading to a prefix that is itself a beam
    (a visit may clear it); a new prefix gets a trie node only if it is still in the beam at the end of
    the frame. The beam is a min-heap of ``(total, arrival, node or -1, parent, label)``.

    The trie is flat (no object per node, so no reference cycles for the garbage collector to walk):
    node ``i`` has ``parent[i]``, ``label[i]``, its log-probabilities now (``pt`` total, ``pb`` ending
    in a blank, ``pl`` ending in a label) and at the previous frame (``ot``, ``ob``); ``kid[(i, c)]``
    is node i's child by class c. ``pt[i] == -inf``: not in the beam.
    """
    T, C = x.shape
    rows = x.tolist()
    desc_order = np.argsort(-x, axis=1, kind="stable")  # per frame: the classes, best first
    every = [c for c in range(C) if c != blank]
    heappush, heapreplace, bisect_right = heapq.heappush, heapq.heapreplace, bisect.bisect_right
    parent, label = [-1], [-1]
    pt, pb, pl, ot, ob = [0.0], [0.0], [_NEG], [_NEG], [_NEG]  # node 0: the empty prefix
    kid = {}
    leaves = [0]
    for t in range(T):
        row = rows[t]
        yb = row[blank]
        branches = sorted(leaves, key=pt.__getitem__, reverse=True)
        for e in branches:
            ot[e], ob[e] = pt[e], pb[e]
        in_beam = {}  # node -> classes leading to its children among the branches
        for e in branches:
            p = parent[e]
            if p >= 0:
                lab = pl[e]
                if pt[p] != _NEG:
                    lab = _lse(lab, ob[p] if label[e] == label[p] else ot[p])
                pl[e] = lab + row[label[e]]
                in_beam.setdefault(p, []).append(label[e])
            pb[e] = ot[e] + yb
            pt[e] = _lse(pb[e], pl[e])
        heap = [(pt[e], i, e, -1, 0) for i, e in enumerate(branches)]
        heapq.heapify(heap)
        n = tick = len(heap)
        order = desc = None
        for e in branches:
            o_t = ot[e]
            if o_t == _NEG or (n >= K and not o_t > heap[0][0]):
                continue
            o_b, last = ob[e], label[e]
            filling = n < K
            labels = every if filling else None
            start = 0
            while True:
                if labels is None:
                    # the beam is full: only classes that beat the bottom now, and those leading to a
                    # prefix that is a beam, in class order
                    if order is None:
                        order = desc_order[t].tolist()
                        order.remove(blank)
                        desc = [row[k] for k in reversed(order)]  # ascending
                    thr = heap[0][0] - o_t
                    thr -= 1e-9 * (1.0 + abs(thr))  # a superset despite rounding; the test below decides
                    cnt = len(desc) - bisect_right(desc, thr)
                    labels = sorted(k for k in set(order[:cnt]).union(in_beam.get(e, ())) if k >= start)
                for c in labels:
                    k = kid.get((e, c), -1)
                    if k >= 0 and pt[k] != _NEG:
                        continue  # in the beam already: extended in step (1)
                    v = row[c] + (o_b if c == last else o_t)
                    if v != _NEG and (n < K or v > heap[0][0]):
                        if k >= 0:
                            pt[k] = pl[k] = v
                            pb[k] = _NEG
                        tick += 1
                        if n >= K:
                            out = heapreplace(heap, (v, tick, k, e, c))[2]
                            if out >= 0:
                                pt[out] = pb[out] = pl[out] = _NEG
                        else:
                            heappush(heap, (v, tick, k, e, c))
                            n += 1
                    elif k >= 0:
                        pt[k] = pb[k] = pl[k] = ot[k] = ob[k] = _NEG
                    if filling and n >= K:
                        start, labels, filling = c + 1, None, False
                        break
                else:
                    break
        leaves = []
        for v, _, k, p, c in heap:
            if k < 0:  # a new prefix still in the beam: now a trie node
                k = kid[(p, c)] = len(parent)
                parent.append(p)
                label.append(c)
                pt.append(v)
                pb.append(_NEG)
                pl.append(v)
                ot.append(_NEG)
                ob.append(_NEG)
            leaves.append(k)
    best = max(leaves, key=pt.__getitem__)
    score, out = pt[best], []
    while best > 0:
        out.append(label[best])
        best = parent[best]
    return out[::-1], score


def ctc_beam_search(x, lengths, beam_width, blank):
    """TensorFlow's ``CTCBeamSearchDecoder`` top-1 per sequence, on the host (as TF's op).

    ``x (B, T, C)`` float64 frame scores, each frame already normalised (log-softmax); ``lengths (B,)``.
    Returns ``(labels (B, T) padded with 0, lengths (B,) int64, scores (B,) float64)`` on ``x``'s
    device: the most probable prefix in the final beam and its log-probability.
    """
    B, T, C = x.shape
    xs = x.cpu().numpy()
    ls = lengths.tolist()
    labels = torch.zeros(B, T, dtype=torch.int64)
    lens = torch.zeros(B, dtype=torch.int64)
    scores = torch.zeros(B, dtype=torch.float64)
    for i in range(B):
        lab, sc = _beam_search_one(xs[i, :ls[i]], blank, beam_width)
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.int64)
        lens[i], scores[i] = len(lab), sc
    return labels.to(x.device), lens.to(x.device), scores.to(x.device)
