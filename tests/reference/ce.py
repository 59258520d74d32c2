"""Float64 cross-entropy reference: the spec's formulas written directly, gradients by autograd."""
import math

import torch


def smoothed_targets(y, C, eps, mode):
    """q (n, C) float64 for class ids y (n,), built class by class from the spec's definitions."""
    n = y.shape[0]
    q = torch.zeros(n, C, dtype=torch.float64)
    for i in range(n):
        for k in range(C):
            hit = 1.0 if k == int(y[i]) else 0.0
            if eps == 0 or mode is None:
                q[i, k] = hit
            elif mode == "torch":
                q[i, k] = (1 - eps) * hit + eps / C
            elif mode == "others":
                q[i, k] = (1 - eps) if hit else eps / (C - 1)
            elif mode == "gaussian":
                s = 1 - eps
                q[i, k] = math.exp(-((k - int(y[i])) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi))
    return q


def safe_log(p, eps=1e-20):
    """log(max(p, eps)) with an identity gradient through the clamp (RETURNN's safe_log)."""
    clamped = p + (torch.clamp(p, min=eps) - p).detach()
    return torch.log(clamped)


def ce_rows(x, target, weight=None, *, ignore_index=-100, eps=0.0, mode="torch", input_type="logits",
            gamma=0.0, z_loss=0.0, softcap=None):
    """Per-row float64 losses (rows, C) -> (rows,), differentiable w.r.t. ``x``."""
    x = x.double()
    C = x.shape[1]
    dense = target.dtype.is_floating_point
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    if input_type == "logits":
        lse = torch.logsumexp(x, dim=1)
        logp = x - lse[:, None]
    elif input_type == "log_probs":
        logp = x
    else:
        logp = safe_log(x)
    if dense:
        q = target.double()
        if eps:
            q = (1 - eps) * q + eps / C
        valid = torch.ones(x.shape[0], dtype=torch.bool)
    else:
        valid = target != ignore_index
        q = smoothed_targets(torch.where(valid, target, 0), C, eps, mode)
    w = weight.double() if weight is not None else torch.ones(C, dtype=torch.float64)
    rows = -(w[None, :] * q * torch.where(q != 0, logp, torch.zeros_like(logp))).sum(1)
    if gamma and not dense:
        yy = torch.where(valid, target, 0)
        if input_type == "logits":
            py = torch.softmax(x, 1).gather(1, yy[:, None])[:, 0]
        elif input_type == "log_probs":
            py = torch.exp(x.gather(1, yy[:, None])[:, 0])
        else:
            py = x.gather(1, yy[:, None])[:, 0]
        rows = rows * (1 - py) ** gamma
    if z_loss and input_type == "logits":
        rows = rows + z_loss * lse * lse
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


def reduce(rows, valid, target, weight, reduction, dense):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if dense:
        return rows.sum() / rows.shape[0]
    if weight is None:
        return rows.sum() / valid.sum()
    wy = weight.double()[torch.where(valid, target, 0)]
    return rows.sum() / (wy * valid).sum()


def entropy(z):
    """Softmax entropy over the last dim: ``lse - sum_j p_j z_j``, a -inf logit (p = 0) adding 0 (its gradient
    0, not NaN)."""
    p = torch.softmax(z, -1)
    return torch.logsumexp(z, -1) - (p * torch.where(z == -math.inf, 0.0, z)).sum(-1)
