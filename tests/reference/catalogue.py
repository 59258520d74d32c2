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
