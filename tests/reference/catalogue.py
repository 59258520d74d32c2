"""Float64 references for RETURNN's catalogue losses, written directly from their definitions."""
import math

import torch


def deep_clustering(V, Y):
    """||V V^T - Y Y^T||_F^2 through the explicit affinity matrices (float64)."""
    V, Y = V.double(), Y.double()
    return ((V @ V.t() - Y @ Y.t()) ** 2).sum()


def triplet_loop(E, labels, margin):
    n = E.shape[0]
    e = [E[i].double() / math.sqrt(max(float((E[i].double() ** 2).sum()), 1e-15)) for i in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(n):
            d = 1.0 - float((e[i] * e[j]).sum())
            li, lj = int(labels[i]), int(labels[j])
            if lj * lj == li * lj:
                total += 0.5 * d
            else:
                total += 0.5 * max(margin - d, 0.0)
    return total


def levenshtein(a, b):
    """Textbook O(|a| |b|) dynamic programme."""
    D = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        D[i][0] = i
    for j in range(len(b) + 1):
        D[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            D[i][j] = min(D[i - 1][j] + 1, D[i][j - 1] + 1, D[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return D[len(a)][len(b)]


def ngram_stats(hyp, ref, N):
    """Clipped n-gram matches and possible n-grams with collections.Counter."""
    from collections import Counter
    match, poss = [], []
    for n in range(1, N + 1):
        ch = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        cr = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        match.append(sum(min(c, cr[g]) for g, c in ch.items()))
        poss.append(max(len(hyp) - n + 1, 0))
    return match, poss


def returnn_bleu(hyp, ref, N=4):
    """RETURNN's compute_bleu, written from its definition (float64)."""
    match, poss = ngram_stats(hyp, ref, N)
    smooth, logs, any_pos = 1.0, 0.0, False
    for m, p in zip(match, poss):
        if m > 0:
            pn = m / p
        elif p > 0:
            smooth *= 2
            pn = 1.0 / (smooth * p)
        else:
            pn = 0.0
        if pn > 0:
            logs += math.log(pn)
            any_pos = True
    geo = math.exp(logs / N) if any_pos else 0.0
    r = len(hyp) / len(ref) if ref else math.inf
    bp = 0.0 if r < 1e-30 else (math.exp(1 - 1 / r) if r < 1 else 1.0)
    return geo * bp


def prefix_probabilities(lp, blank):
    """log P(labelling) for every labelling of one sequence by enumerating all paths (tiny T)."""
    import itertools
    T, C = lp.shape
    out = {}
    for path in itertools.product(range(C), repeat=T):
        lab, prev = [], None
        for c in path:
            if c != blank and c != prev:
                lab.append(c)
            prev = c
        v = sum(float(lp[t, c]) for t, c in enumerate(path))
        k = tuple(lab)
        out[k] = v if k not in out else max(out[k], v) + math.log1p(math.exp(-abs(out[k] - v)))
    return out
