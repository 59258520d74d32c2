"""Pure-PyTorch edit distance (batched row DP with a prefix-min), BLEU n-gram statistics, and TF's CTC beam
search on the host."""
from __future__ import annotations

import bisect
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
    """(B, 2N + 2) int32: match_n = sum over distinct hyp n-grams of min(count_hyp, count_ref), poss_n.

    Per order n, the hyp and ref n-grams of every sequence, keyed by (sequence, tokens), are sorted
    lexicographically (n + 1 stable sorts), so equal n-grams of a sequence are adjacent: each run's hyp and ref
    counts give its clipped matches. O(n L log L) per order (the all-pairs comparison was O(L^2) in time and
    memory); n-grams past a sequence's length are keyed to a sentinel sequence B and counted nowhere."""
    B, H = hyp.shape
    R = ref.shape[1]
    dev = hyp.device
    out = torch.zeros(B, 2 * max_order + 2, dtype=torch.int64, device=dev)
    seq = torch.arange(B, device=dev)[:, None]
    for n in range(1, max_order + 1):
        nh, nr = H - n + 1, R - n + 1
        poss = (hyp_len - n + 1).clamp(min=0)
        out[:, max_order + n - 1] = poss
        if nh <= 0:
            continue
        keys, sides, valid = [], [], []
        for side, (tok, length, width) in enumerate(((hyp, hyp_len, nh), (ref, ref_len, nr))):
            if width <= 0:
                continue
            ok = torch.arange(width, device=dev)[None, :] < (length - n + 1)[:, None]
            grams = torch.stack([tok[:, k:k + width].to(torch.int64) for k in range(n)], -1)
            keys.append(torch.cat([torch.where(ok, seq, B)[..., None], grams], -1).reshape(B * width, n + 1))
            sides.append(torch.full((B * width,), side, dtype=torch.int64, device=dev))
            valid.append(ok.reshape(-1))
        key, side, ok = torch.cat(keys), torch.cat(sides), torch.cat(valid)
        order = torch.arange(key.shape[0], device=dev)
        for c in range(n, -1, -1):  # least significant column first: stable sorts give the lexicographic order
            order = order[torch.argsort(key[order, c], stable=True)]
        ks = key[order]
        new_run = torch.ones(ks.shape[0], dtype=torch.bool, device=dev)
        new_run[1:] = (ks[1:] != ks[:-1]).any(1)
        run = torch.cumsum(new_run.to(torch.int64), 0) - 1
        live = ok[order]
        count_h = torch.zeros(ks.shape[0], dtype=torch.int64, device=dev).scatter_add_(
            0, run, (live & (side[order] == 0)).to(torch.int64))
        count_r = torch.zeros(ks.shape[0], dtype=torch.int64, device=dev).scatter_add_(
            0, run, (live & (side[order] == 1)).to(torch.int64))
        run_seq = torch.full((ks.shape[0],), B, dtype=torch.int64, device=dev).scatter_(0, run, ks[:, 0])
        match = torch.zeros(B + 1, dtype=torch.int64, device=dev).scatter_add_(
            0, run_seq, torch.minimum(count_h, count_r))
        out[:, n - 1] = match[:B]
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


# ---- TF's gtl::TopN over beam entries, with the C++ standard library's heap and sort steps -------------------
# TF keeps the beam in a TopN of entry pointers whose comparator reads each entry's probability when it runs, and
# the decoder changes probabilities of entries inside it (a dropped entry is cleared; an entry whose total is -inf
# can be re-created as a child while still held). Which entry is dropped or first then depends on the container's
# layout, so it is reproduced step for step: element order, the three states, libstdc++'s heap and sort.

def _sift_up(el, hole, top, v, key):  # std::__push_heap
    kv = key[v]
    parent = (hole - 1) >> 1
    while hole > top and key[el[parent]] > kv:
        el[hole] = el[parent]
        hole = parent
        parent = (hole - 1) >> 1
    el[hole] = v


def _adjust_heap(el, hole, n, v, key):  # std::__adjust_heap on el[:n]
    top = child = hole
    half = (n - 1) >> 1
    while child < half:
        child = 2 * child + 2
        if key[el[child]] > key[el[child - 1]]:
            child -= 1
        el[hole] = el[child]
        hole = child
    if not n & 1 and child == (n - 2) >> 1:
        child = 2 * child + 2
        el[hole] = el[child - 1]
        hole = child - 1
    _sift_up(el, hole, top, v, key)


def _make_heap(el, n, key):  # std::make_heap on el[:n]
    for parent in range((n - 2) >> 1, -1, -1):
        _adjust_heap(el, parent, n, el[parent], key)


def _pop_heap(el, n, key):  # std::pop_heap on el[:n]: the heap's first (its bottom) moves to n - 1
    if n > 1:
        v = el[n - 1]
        el[n - 1] = el[0]
        _adjust_heap(el, 0, n - 1, v, key)


def _sort_descending(el, key):  # std::sort with the greater-than comparator
    n = len(el)
    vals = [key[v] for v in el]
    if len(set(vals)) == n:  # no ties: the order is unique, any sort gives it
        el.sort(key=key.__getitem__, reverse=True)
        return
    _introsort(el, 0, n, 2 * (n.bit_length() - 1), key)
    end = min(n, 16)
    for i in range(1, end):  # insertion sort of the first 16, then unguarded insertion of the rest
        v = el[i]
        if key[v] > key[el[0]]:
            el[1:i + 1] = el[0:i]
            el[0] = v
        else:
            _linear_insert(el, i, key)
    for i in range(end, n):
        _linear_insert(el, i, key)


def _linear_insert(el, i, key):
    v = el[i]
    kv = key[v]
    while kv > key[el[i - 1]]:
        el[i] = el[i - 1]
        i -= 1
    el[i] = v


def _introsort(el, first, last, depth, key):
    while last - first > 16:
        if depth == 0:  # std::partial_sort's heap sort of the range (index arithmetic relative to first)
            sub = el[first:last]
            _make_heap(sub, len(sub), key)
            for n in range(len(sub), 1, -1):
                _pop_heap(sub, n, key)
            el[first:last] = sub
            return
        depth -= 1
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        ka, kb, kc = key[el[a]], key[el[b]], key[el[c]]
        if ka > kb:
            m = b if kb > kc else (c if ka > kc else a)
        else:
            m = a if ka > kc else (c if kb > kc else b)
        el[first], el[m] = el[m], el[first]
        kp = key[el[first]]
        lo, hi = first + 1, last
        while True:
            while key[el[lo]] > kp:
                lo += 1
            hi -= 1
            while kp > key[el[hi]]:
                hi -= 1
            if not lo < hi:
                break
            el[lo], el[hi] = el[hi], el[lo]
            lo += 1
        _introsort(el, lo, last, depth, key)
        last = lo


class _TopN:
    """TF's ``gtl::TopN`` (the ``limit`` best by ``key[entry]``, read live): unordered until the bottom is asked
    for (then the bottom is kept first), a heap of ``limit`` (plus one unused slot) once more arrive."""
    __slots__ = ("limit", "el", "heap", "bottom_known", "key")

    def __init__(self, limit, key):
        self.limit, self.key, self.el, self.heap, self.bottom_known = limit, key, [], False, False

    def size(self):
        return min(len(self.el), self.limit)

    def push(self, v):
        el, key = self.el, self.key
        if not self.heap:
            el.append(v)
            if self.bottom_known and not key[v] > key[el[0]]:
                el[0], el[-1] = el[-1], el[0]
            if len(el) == self.limit + 1:
                _make_heap(el, len(el), key)
                _pop_heap(el, len(el), key)
                self.heap = True
        elif key[v] > key[el[0]]:  # std::push_heap then std::pop_heap over all limit + 1 slots
            n = len(el) - 1
            _sift_up(el, n, 0, v, key)
            w = el[n]
            el[n] = el[0]
            _adjust_heap(el, 0, n, w, key)

    def peek_bottom(self):
        el, key = self.el, self.key
        if not self.heap and not self.bottom_known:
            m = 0
            for i in range(1, len(el)):
                if key[el[m]] > key[el[i]]:
                    m = i
            el[0], el[m] = el[m], el[0]
            self.bottom_known = True
        return el[0]

    def extract(self):
        el = self.el
        if self.heap:
            el.pop()
            for n in range(len(el), 1, -1):
                _pop_heap(el, n, self.key)
        else:
            _sort_descending(el, self.key)
        return el


def _beam_search_one(x, blank, K, prune=True):
    """TF's ``CTCBeamSearchDecoder`` on one sequence: ``x (T, C)`` float64 numpy, rows log-softmax
    normalised. Returns (labels, log-probability) of the best prefix in the final beam.

    Frame step, as TF: (1) the beam, best first, carried over: blank after anything, the last label
    repeated, plus the parent's extension while the parent is in the beam; (2) each beam whose previous
    probability beats the beam's current bottom is extended, in class order, by every non-blank class
    whose prefix is not in the beam now: the new prefix enters if it beats the bottom, which is dropped
    (probabilities cleared); one that does not enter has all its probabilities cleared, so a beam
    dropped earlier in the frame and re-created that way is not extended later in the frame.

    Work saved without changing that result (for inputs without NaN): once the beam is full, a beam
    visits only the classes that beat the bottom at its turn (``x[c] + P(beam) > bottom``, found by
    bisection in the frame's sorted classes), plus the classes leading to a prefix that is itself a beam
    (a visit may clear it). Skipping the others is exact while the bottom the container reports does
    not fall during the visit. It can fall only with -inf inputs: an entry held twice (re-created while
    held at -inf) whose one copy is dropped leaves the other at -inf; the selection is then redone, from
    the next class, against the new bottom. It is also redone once a visit has replaced the whole beam (the
    bottom has risen: with tied class scores no class left can enter), and it tests each class with the
    entry test's own sum, so a class tied with the bottom is left out as that test leaves it.

    The trie is flat (no object per node): node ``i`` has ``parent[i]``, ``label[i]``, its
    log-probabilities now (``pt`` total, ``pb`` ending in a blank, ``pl`` ending in a label) and at the
    previous frame (``ot``, ``ob``); ``kid[i * C + c]`` is node i's child by class c; ``pt[i] == -inf``:
    not in the beam.
    """
    T, C = x.shape
    rows = x.tolist()
    prune = prune and not bool(np.isnan(x).any())  # (prune=False: every class visited, for tests)
    desc_order = np.argsort(-x, axis=1, kind="stable") if prune else None  # per frame: classes, best first
    every = [c for c in range(C) if c != blank]
    bisect_left = bisect.bisect_left
    parent, label = [-1], [-1]
    pt, pb, pl, ot, ob = [0.0], [0.0], [_NEG], [_NEG], [_NEG]  # node 0: the empty prefix
    kid = {}
    leaves = _TopN(K, pt)
    leaves.push(0)
    for t in range(T):
        row = rows[t]
        yb = row[blank]
        branches = leaves.extract()
        leaves = _TopN(K, pt)
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
                if prune:
                    in_beam.setdefault(p, []).append(label[e])
            pb[e] = ot[e] + yb
            pt[e] = _lse(pb[e], pl[e])
            leaves.push(e)
        order = desc = None
        el = leaves.el  # len(el) >= K: the beam is full
        push = leaves.push

        def bottom():
            return pt[el[0]] if leaves.heap else pt[leaves.peek_bottom()]

        for e in branches:
            o_t = ot[e]
            if o_t == _NEG or (len(el) >= K and not o_t > bottom()):
                continue
            o_b, last = ob[e], label[e]
            eC = e * C
            filling = prune and len(el) < K
            labels = every if (filling or not prune) else None
            start, pruned, entered = 0, False, 0
            while True:
                if labels is None:
                    # the beam is full: only classes that beat the bottom now, and those leading to a
                    # prefix that is a beam, in class order
                    if order is None:
                        order = desc_order[t].tolist()
                        order.remove(blank)
                        desc = [row[k] for k in reversed(order)]  # ascending
                    if not (leaves.heap or leaves.bottom_known):
                        # the beam just filled up: TF's next candidate test (asking for the bottom, which orders
                        # its container) comes at the first later class whose prefix is not a beam and whose
                        # score is not -inf; make it there too, or not at all, as TF
                        for k in range(start, C):
                            kk = kid.get(eC + k, -1)
                            if k == blank or (kk >= 0 and pt[kk] != _NEG):
                                continue
                            if row[k] + (o_b if k == last else o_t) != _NEG:
                                leaves.peek_bottom()
                                break
                    # the bottom, read without asking the container
                    low = pt[el[0]] if (leaves.heap or leaves.bottom_known) else min(pt[v] for v in el)
                    # the classes whose extension beats it, by the entry test's own sum (monotone in the
                    # class score: exact, ties with the bottom left out as the test leaves them)
                    cnt = len(desc) - bisect_left(desc, True, key=lambda d: d + o_t > low)
                    labels = sorted(k for k in set(order[:cnt]).union(in_beam.get(e, ())) if k >= start)
                    pruned, entered = True, 0
                for c in labels:
                    k = kid.get(eC + c, -1)
                    if k >= 0 and pt[k] != _NEG:
                        continue  # in the beam already: extended in step (1)
                    v = row[c] + (o_b if c == last else o_t)
                    if k < 0:  # a new node (TF would create it and clear it again if it does not enter)
                        if v == _NEG or (len(el) >= K and not v > (pt[el[0]] if leaves.heap else bottom())):
                            continue
                        k = kid[eC + c] = len(parent)
                        parent.append(e)
                        label.append(c)
                        pt.append(v)
                        pb.append(_NEG)
                        pl.append(v)
                        ot.append(_NEG)
                        ob.append(_NEG)
                        enters = True
                    else:  # set first: the bottom may be this very entry (held with a total of -inf)
                        pb[k] = _NEG
                        pt[k] = pl[k] = v
                        enters = v != _NEG and (len(el) < K or v > bottom())
                    if enters:
                        if len(el) >= K:
                            out = el[0] if leaves.heap else leaves.peek_bottom()
                            pt[out] = pb[out] = pl[out] = _NEG
                        push(k)
                        if pruned and pt[el[0]] < low:
                            # the bottom fell (an entry held twice was dropped, leaving its other copy
                            # at -inf): the classes left out may enter now
                            start, labels = c + 1, None
                            break
                        entered += pruned
                        if entered >= K:
                            # the whole beam was replaced: the bottom has risen, so fewer of the classes
                            # left can enter (frames of tied scores: none); select them again
                            start, labels = c + 1, None
                            break
                    else:
                        pt[k] = pb[k] = pl[k] = ot[k] = ob[k] = _NEG
                    if filling and len(el) >= K:
                        start, labels, filling = c + 1, None, False
                        break
                else:
                    break
    # as TF's op (its TopPaths, no Decode): the beam in its container's order pushed into a TopN(1)
    top = _TopN(1, pt)
    for e in leaves.el[:leaves.size()]:
        top.push(e)
    best = top.extract()[0]
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


# two 31-bit polynomial hashes of a prefix, packed in one int64 key (h1 * 2**31 + h2): products stay below 2**62
_HASH_P = (2147483647, 2147483629)  # primes below 2**31
_HASH_M = (1103515245, 1664525)


def _extend_key(key, c):
    h1, h2 = key >> 31, key & (2 ** 31 - 1)
    h1 = (h1 * _HASH_M[0] + c + 1) % _HASH_P[0]
    h2 = (h2 * _HASH_M[1] + c + 1) % _HASH_P[1]
    return (h1 << 31) | h2


def _best_k(s, key, k):
    """Indices (B, k) of each row's k best entries by ``s``, largest first, ties by the smaller ``key`` (keys
    unique in a row; NaN counted as the largest): deterministic on every device, where ``topk`` leaves the
    order of ties unspecified. No host read: a ``topk`` for the k-th value, one over the keys of the entries
    equal to it, and a prefix sum compacting the picked entries."""
    B, n = s.shape
    s = torch.nan_to_num(s, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    kth = s.topk(k, dim=1).values[:, -1:]
    above, tied = s > kth, s == kth
    need = k - above.sum(1, keepdim=True)  # >= 1: how many of the tied entries are taken
    tied_keys = torch.where(tied, key, torch.iinfo(torch.int64).max)
    last_key = tied_keys.topk(k, dim=1, largest=False).values.gather(1, need - 1)
    pick = above | (tied & (key <= last_key))  # exactly k
    slot = torch.where(pick, pick.cumsum(1) - 1, k)  # k: a bin for the rest, dropped
    out = torch.zeros(B, k + 1, dtype=torch.int64, device=s.device)
    out.scatter_(1, slot, torch.arange(n, device=s.device).expand(B, n))
    out = out[:, :k]
    out = out.gather(1, key.gather(1, out).argsort(dim=1))  # by key, then (stable) by score
    return out.gather(1, s.gather(1, out).sort(dim=1, descending=True, stable=True).indices)


def _distinct_prefixes(T, labels, cap):
    """min(cap, the number of label sequences of length <= T over ``labels`` labels): a wider beam keeps
    nothing more (its slots stay empty), so a width meant as "unlimited" costs what the shapes need."""
    total, level = 0, 1
    for _ in range(T + 1):
        total += level
        if total >= cap or level == 0:
            break
        level *= labels
    return min(cap, total)


def ctc_prefix_beam_search_batched(x, lengths, beam_width, blank):
    """The textbook CTC prefix beam search, batched over sequences and beams on ``x``'s device (no host read).

    ``x (B, T, C)`` float64 frame scores, each frame already normalised (log-softmax); ``lengths (B,)``.
    Per frame every beam is carried over (a blank, or its last label again) and extended by every non-blank
    class; an extension that equals a prefix in the beam adds to it; the ``beam_width`` most probable
    prefixes (probability ending in a blank plus ending in a label) are kept, ties in the textbook's order
    (beams best first; a beam's own prefix, then its extensions by class; a prefix in the beam at the first
    of its two places). Only the frame's ``beam_width + 1`` best non-blank classes are tried as extensions:
    each beam has that many extensions (at least ``beam_width`` of them not its repeated last label) at
    least as good and earlier than any other class's, so no other can be kept; the work is
    O(B * beam_width**2) per frame, whatever C. Prefixes are identified by a pair of 31-bit polynomial
    hashes and traced back through per-frame parent pointers. Returns ``(labels (B, T) padded with 0,
    lengths (B,) int64, scores (B,) float64)``: the most probable final prefix and its log-probability.
    Prefixes of probability 0 are dropped (a sequence none survives decodes as empty, score -inf); a NaN in
    a sequence's frames makes its score NaN.
    """
    B, T, C = x.shape
    K, dev, neg = _distinct_prefixes(T, C - 1, beam_width), x.device, -math.inf
    K1 = min(K + 1, C - 1)  # the classes tried per frame
    i64 = dict(dtype=torch.int64, device=dev)
    pb = torch.full((B, K), neg, dtype=x.dtype, device=dev)  # ending in a blank (or empty)
    pb[:, 0] = 0.0  # beam 0: the empty prefix
    pnb = torch.full_like(pb, neg)  # ending in a label
    key = torch.zeros(B, K, **i64)  # the prefix's hash
    pkey = torch.full_like(key, -1)  # its parent's (the prefix without its last label); -1: the empty prefix
    last = torch.full_like(key, -1)  # its last label
    size = torch.zeros_like(key)  # its length
    valid = torch.zeros(B, K, dtype=torch.bool, device=dev)
    valid[:, 0] = True
    beams = torch.arange(K, **i64).expand(B, K)
    classes = torch.arange(C, **i64)
    # textbook order of a candidate: beam k's own prefix k * (C + 1), its extension by class c after it
    rank = (classes + (classes < blank).long()).masked_fill(classes == blank, C + 1)  # 1..C-1; the blank last
    class_key = rank.expand(B, C)
    stay_key = beams * (C + 1)
    parents, emitted = [], []  # per frame (B, K): the parent beam and the label added (-1: none)
    for t in range(T):
        y = x[:, t]  # (B, C)
        tot = torch.logaddexp(pb, pnb)
        # the frame's K1 best non-blank classes (ties: the smaller class)
        sel = _best_k(y.masked_fill(classes == blank, neg), class_key, K1) if K1 else classes[:0].expand(B, 0)
        y_sel = y.gather(1, sel)
        # extensions (B, K, K1): beam k + class sel[j]; the repeated last label extends only the blank-ending part
        base = torch.where(sel[:, None, :] == last[..., None], pb[..., None], tot[..., None])
        ext = torch.where(valid[..., None], base + y_sel[:, None, :], neg)
        # carried over: a blank, or the last label again
        y_last = y.gather(1, last.clamp(min=0)).masked_fill(last < 0, neg)
        stay_b = tot + y[:, blank, None]
        stay_nb = pnb + y_last
        # an extension equal to a beam's prefix (its parent in the beam, its last label) adds to that beam
        hit = (key[:, :, None] == pkey[:, None, :]) & valid[:, :, None] & (valid & (size > 0))[:, None, :]
        has = hit.any(1)  # (B, K'): beam k' has its parent in the beam
        par = hit.to(torch.int8).argmax(1)  # (B, K') the parent k
        cls = last.clamp(min=0)
        from_par = y.gather(1, cls) + torch.where(cls == last.gather(1, par), pb.gather(1, par), tot.gather(1, par))
        stay_nb = torch.where(has, torch.logaddexp(stay_nb, from_par), stay_nb)
        stay = torch.where(valid, torch.logaddexp(stay_b, stay_nb), neg)
        # ... so that extension leaves the parent's candidates; the merged prefix takes the earlier of its two
        # places: its parent's extension slot when the parent ranks higher (`up`: a candidate of its own),
        # else its own
        j = (sel[:, None, :] == cls[..., None]) & has[..., None]  # (B, K', K1)
        at = j.to(torch.int8).argmax(-1) if K1 else par
        gone = torch.where(j.any(-1), par * K1 + at, K * K1)  # K * K1: a bin
        ext = torch.cat([ext.reshape(B, K * K1), ext.new_empty(B, 1)], 1).scatter_(1, gone, neg)[:, :K * K1]
        up = has & (par < beams)
        cand = torch.cat([torch.where(up, neg, stay), ext, torch.where(up, stay, neg)], 1)
        ext_key = (stay_key[..., None] + rank[sel][:, None, :]).reshape(B, K * K1)
        up_key = torch.where(up, par * (C + 1) + rank[cls], K * (C + 1) + beams)  # (else: after every key)
        ckey = torch.cat([stay_key, ext_key, up_key], 1)
        pick = _best_k(cand, ckey, K)
        score = cand.gather(1, pick)
        new = (pick >= K) & (pick < K + K * K1)  # an extension (else a prefix carried over)
        e = (pick - K).clamp(0, max(K * K1 - 1, 0))
        k = torch.where(new, e // max(K1, 1), torch.where(pick < K, pick, pick - K - K * K1))
        c = torch.where(new, sel.gather(1, e % max(K1, 1)) if K1 > 0 else e, -1)
        carry = lambda v: v.gather(1, k)  # noqa: E731
        n_pb = torch.where(new, neg, carry(stay_b))  # carried over (its own place or its parent's): beam k
        n_pnb = torch.where(new, score, carry(torch.where(valid, stay_nb, neg)))
        n_key = torch.where(new, _extend_key(carry(key), c), carry(key))
        n_pkey = torch.where(new, carry(key), carry(pkey))
        n_last = torch.where(new, c, carry(last))
        n_size = carry(size) + new.long()
        n_valid = (score > neg) | score.isnan()
        active = (t < lengths)[:, None]  # frames past a sequence's end leave its beam as it is
        parents.append(torch.where(active, k, beams))
        emitted.append(torch.where(active & new & n_valid, c, -1))
        pb, pnb = torch.where(active, n_pb, pb), torch.where(active, n_pnb, pnb)
        key, pkey = torch.where(active, n_key, key), torch.where(active, n_pkey, pkey)
        last, size = torch.where(active, n_last, last), torch.where(active, n_size, size)
        valid = torch.where(active, n_valid, valid)
    tot = torch.where(valid, torch.logaddexp(pb, pnb), neg)
    score, best = tot.max(1)
    n = size.gather(1, best[:, None])[:, 0]
    path = torch.full((B, T), -1, dtype=torch.int64, device=dev)
    k = best
    for t in range(T - 1, -1, -1):  # trace the parent pointers back
        path[:, t] = emitted[t].gather(1, k[:, None])[:, 0]
        k = parents[t].gather(1, k[:, None])[:, 0]
    keep = (path >= 0) & valid.any(1)[:, None]
    pos = torch.where(keep, keep.long().cumsum(1) - 1, T)  # compacted position, T for a dropped frame
    labels = torch.zeros(B, T + 1, dtype=torch.int64, device=dev)
    labels.scatter_(1, pos, torch.where(keep, path, 0))
    frames = torch.arange(T, device=dev) < lengths[:, None]
    bad = (x.isnan().any(-1) & frames).any(1)
    score = torch.where(bad, math.nan, torch.where(valid.any(1), score, neg))
    return labels[:, :T], torch.where(valid.any(1), n, 0), score
