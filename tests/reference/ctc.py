"""Float64 CTC references: brute-force path enumeration (tiny T) and a direct alpha DP (longer T)."""
import itertools
import math

import torch


def collapse(path, blank, label_loop=True):
    out, prev = [], None
    for c in path:
        if c != blank and (not label_loop or c != prev):
            out.append(c)
        prev = c
    return out


def enumerate_paths(lp, target, blank, label_loop=True):
    """lp (T, C) float64 log-probs of one sequence -> (log Z, gamma (T, C), best score, best path).

    Sums/maximises over every path in C^T whose collapse equals ``target``. With label_loop=False
    (RNA topology) a path collapses by dropping blanks only (repeats are separate labels).
    """
    T, C = lp.shape
    target = list(target)
    logs, paths = [], []
    for path in itertools.product(range(C), repeat=T):
        if collapse(path, blank, label_loop) == target:
            logs.append(sum(float(lp[t, c]) for t, c in enumerate(path)))
            paths.append(path)
    gamma = torch.zeros(T, C, dtype=torch.float64)
    if not logs:
        return -math.inf, gamma, -math.inf, None
    m = max(logs)
    logz = m + math.log(sum(math.exp(v - m) for v in logs))
    for v, path in zip(logs, paths):
        w = math.exp(v - logz)
        for t, c in enumerate(path):
            gamma[t, c] += w
    best = max(range(len(logs)), key=lambda i: logs[i])
    return logz, gamma, logs[best], list(paths[best])


def alpha_logz(lp, target, blank):
    """Standard CTC log Z by the textbook alpha recursion, written out per state (float64)."""
    T = lp.shape[0]
    ext = [blank]
    for c in target:
        ext += [c, blank]
    L = len(ext)
    a = [-math.inf] * L
    a[0] = float(lp[0, ext[0]])
    if L > 1:
        a[1] = float(lp[0, ext[1]])

    def lse(*v):
        m = max(v)
        return m if m == -math.inf else m + math.log(sum(math.exp(x - m) for x in v))

    for t in range(1, T):
        n = [-math.inf] * L
        for s in range(L):
            terms = [a[s]]
            if s >= 1:
                terms.append(a[s - 1])
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                terms.append(a[s - 2])
            n[s] = lse(*terms) + float(lp[t, ext[s]])
        a = n
    return lse(a[-1], a[-2]) if L > 1 else a[-1]
