"""Float64 linear cross-entropy reference: materialise ``x @ W.T + b`` in float64, then apply the
float64 cross-entropy formulas of :mod:`tests.reference.ce` (gradients by autograd)."""
import torch

from . import ce


def linear_ce(x, w, b, target, weight=None, *, ignore_index=-100, reduction="none", eps=0.0, mode="torch",
              gamma=0.0, z_loss=0.0, softcap=None):
    """x (..., D), w (V, D), b (V,) or None, target x.shape[:-1] -> loss (float64), differentiable."""
    z = x.double().reshape(-1, x.shape[-1]) @ w.double().t()
    if b is not None:
        z = z + b.double()
    t = target.reshape(-1).cpu()
    rows, valid = ce.ce_rows(z.cpu(), t, weight.cpu() if weight is not None else None, ignore_index=ignore_index,
                             eps=eps, mode=mode, gamma=gamma, z_loss=z_loss, softcap=softcap)
    if reduction == "none":
        return rows.reshape(target.shape)
    return ce.reduce(rows, valid, t, weight.cpu() if weight is not None else None, reduction, False)
