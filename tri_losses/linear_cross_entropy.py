"""Fused linear + cross-entropy: ``linear_cross_entropy`` and ``LinearCrossEntropyLoss``.

Same value and gradients as ``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)``,
but the ``N x V`` logits are never materialised: the Triton backend forms logit tiles on chip
(``tri_losses/kernels/linear_cross_entropy.py``), the torch backend works in row chunks of bounded size.
Ops: ``tri_losses::lce_fwd`` / ``tri_losses::lce_bwd``. The loss is float32 (float64 for float64
inputs on the torch backend); gradients are accumulated in fp32 and cast once to the input dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate
from ._backend import device_guard, kernels, resolve_backend
from ._torch import cross_entropy as _tce
from ._torch import linear_cross_entropy as _tlce
from .cross_entropy import _SMOOTH_MODES, _no_classes, cross_entropy

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]


@torch.library.custom_op("tri_losses::lce_fwd", mutates_args=())
def _lce_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, cw: Optional[Tensor], ignore_index: int,
             smoothing: float, smooth: int, gamma: float, z_loss: float, softcap: float,
             use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    if not use_triton:
        return _tlce.lce_fwd(x, w, b, target, cw, ignore_index, smoothing, smooth, gamma, z_loss, softcap)
    N = x.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    coef = torch.empty(N, 3, dtype=torch.float32, device=x.device)
    with device_guard(x):
        kernels("linear_cross_entropy").lce_fwd(x, w, b, target, cw, ignore_index, smoothing, smooth, gamma, z_loss, softcap, loss, lse,
                           coef)
    return loss, lse, coef


@_lce_fwd.register_fake
def _(x, w, b, target, cw, ignore_index, smoothing, smooth, gamma, z_loss, softcap, use_triton):
    N = x.shape[0]
    ct = torch.float64 if (x.dtype == torch.float64 and not use_triton) else torch.float32
    return x.new_empty(N, dtype=ct), x.new_empty(N, dtype=ct), x.new_empty(N, 3, dtype=ct)


@torch.library.custom_op("tri_losses::lce_bwd", mutates_args=())
def _lce_bwd(grad_loss: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, cw: Optional[Tensor],
             lse: Tensor, coef: Tensor, ignore_index: int, smoothing: float, smooth: int, softcap: float,
             need_dx: bool, need_dw: bool, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) in the inputs' dtypes; a gradient that is not needed is an empty (0,) tensor and its
    work is skipped (``need_dw`` covers the bias)."""
    if use_triton:
        N, D = x.shape
        dx = torch.zeros(N, D, dtype=torch.float32, device=x.device) if need_dx else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=x.device) if need_dw else None
        db = torch.zeros(w.shape[0], dtype=torch.float32, device=x.device) if (b is not None and need_dw) else None
        with device_guard(x):
            kernels("linear_cross_entropy").lce_bwd(x, w, b, target, cw, lse, coef, grad_loss, ignore_index, smoothing, smooth, softcap,
                               dx, dw, db)
    else:
        dx, dw, db = _tlce.lce_bwd(grad_loss, x, w, b, target, cw, lse, coef, ignore_index, smoothing, smooth,
                                   softcap, need_dx, need_dw)
    return (dx.to(x.dtype) if dx is not None else x.new_empty(0), dw.to(w.dtype) if dw is not None else x.new_empty(0),
            db.to(b.dtype) if db is not None else x.new_empty(0))


@_lce_bwd.register_fake
def _(grad_loss, x, w, b, target, cw, lse, coef, ignore_index, smoothing, smooth, softcap, need_dx, need_dw,
      use_triton):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(w) if need_dw else x.new_empty(0),
            torch.empty_like(b) if (b is not None and need_dw) else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, w, b, target, cw, ignore_index, smoothing, smooth, gamma, z_loss, softcap, use_triton = inputs
    _, lse, coef = output
    ctx.save_for_backward(x, w, b, target, cw, lse, coef)
    ctx.opts = (ignore_index, smoothing, smooth, softcap, use_triton)
    ctx.has_bias = b is not None
    ctx.mark_non_differentiable(lse, coef)


def _backward(ctx, grad_loss, grad_lse, grad_coef):
    x, w, b, target, cw, lse, coef = ctx.saved_tensors
    ignore_index, smoothing, smooth, softcap, use_triton = ctx.opts
    need = ctx.needs_input_grad
    need_dx, need_dw = bool(need[0]), bool(need[1] or (ctx.has_bias and need[2]))
    dx, dw, db = _lce_bwd(grad_loss, x, w, b, target, cw, lse, coef, ignore_index, smoothing, smooth, softcap,
                          need_dx, need_dw, use_triton)
    return (dx if need_dx else None, dw if need[1] else None, db if (ctx.has_bias and need[2]) else None,
            None, None, None, None, None, None, None, None, None)


_lce_fwd.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None, label_smoothing_mode: str = "torch",
                         focal_gamma: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                         validate: bool = False, backend: str = "auto") -> Tensor:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without materialising the logits.

    Args:
        input: ``(..., D)`` hidden states (flattened to rows), fp32/fp16/bf16 (fp64: torch backend).
        linear_weight: ``(V, D)`` (``nn.Linear`` layout), same dtype as ``input``.
        target: class ids of shape ``input.shape[:-1]``, or class probabilities ``input.shape[:-1] + (V,)``
            (these are N x V themselves: that case is computed on materialised logits).
        linear_bias: optional ``(V,)``.
        ignore_index: as ``F.linear_cross_entropy``: ``None`` (the default) means -100 for class ids.
        options: ``F.linear_cross_entropy``'s chunking options, accepted for compatibility and unused (the
            logits are never materialised here anyway).
        weight, reduction, ignore_index, label_smoothing, label_smoothing_mode, focal_gamma, z_loss,
        softcap: as in :func:`tri_losses.cross_entropy` (same semantics and normalisation).
        validate: check class ids on CUDA too (a host sync); CPU targets are always checked.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        The loss: fp32 (fp64 for fp64 inputs on the torch backend); ``reduction="none"`` gives
        ``input.shape[:-1]``.
    """
    op = "linear_cross_entropy"
    if ignore_index is None:
        ignore_index = -100  # F.linear_cross_entropy: None means -100 for class-id targets
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index: expected an int or None, got {type(ignore_index).__name__}")
    _validate.check_float(input, "input", op)
    _validate.check_float(linear_weight, "linear_weight", op)
    _validate.check_tensor(target, "target", op)
    if target.dtype.is_floating_point:  # probability targets: N x V already, so materialise the logits
        if linear_weight.dim() != 2 or input.shape[-1:] != linear_weight.shape[1:]:
            raise ValueError(f"{op}: input: expected (..., D) with D = linear_weight.shape[1], got "
                             f"{tuple(input.shape)} and linear_weight {tuple(linear_weight.shape)}")
        if tuple(target.shape) != tuple(input.shape[:-1]) + (linear_weight.shape[0],):
            raise ValueError(f"{op}: target: probability targets must have shape "
                             f"{tuple(input.shape[:-1]) + (linear_weight.shape[0],)}, got {tuple(target.shape)}")
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        logits = logits.movedim(-1, 1) if logits.dim() > 2 else logits
        return cross_entropy(logits, target.movedim(-1, 1) if target.dim() > 2 else target, weight,
                             ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                             label_smoothing_mode=label_smoothing_mode, z_loss=z_loss, softcap=softcap,
                             focal_gamma=focal_gamma, backend=backend)
    _validate.check_int(target, "target", op)
    _validate.check_reduction(reduction, op)
    _validate.check_option(label_smoothing_mode, "label_smoothing_mode", op, tuple(_SMOOTH_MODES))
    _validate.check_number(label_smoothing, "label_smoothing", op, low=0.0, high=1.0)
    if label_smoothing_mode == "gaussian" and label_smoothing == 1.0:
        raise ValueError(f"{op}: label_smoothing: 'gaussian' mode needs label_smoothing < 1, got 1.0")
    _validate.check_number(focal_gamma, "focal_gamma", op, low=0.0)
    _validate.check_number(z_loss, "z_loss", op, low=0.0)
    _validate.check_number(softcap, "softcap", op, low=0.0, low_inclusive=False, allow_none=True)
    if input.dim() < 1:
        raise ValueError(f"{op}: input: expected shape (..., D), got a 0-dim tensor")
    if linear_weight.dim() != 2:
        raise ValueError(f"{op}: linear_weight: expected shape (V, D), got {tuple(linear_weight.shape)}")
    Vn, D = linear_weight.shape
    if input.shape[-1] != D:
        raise ValueError(f"{op}: input: expected last dim D={D} (linear_weight is {tuple(linear_weight.shape)}), "
                         f"got {tuple(input.shape)}")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"{op}: linear_weight: expected dtype {input.dtype} (the input's), got {linear_weight.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{op}: target: expected shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    if linear_bias is not None:
        _validate.check_float(linear_bias, "linear_bias", op)
        _validate.check_shape(linear_bias, (Vn,), "linear_bias", op)
        _validate.check_same_device(input, linear_bias, "input", "linear_bias", op)
    if weight is not None:
        _validate.check_float(weight, "weight", op)
        _validate.check_shape(weight, (Vn,), "weight", op)
        _validate.check_same_device(input, weight, "input", "weight", op)
    if label_smoothing > 0 and label_smoothing_mode == "others" and Vn < 2:
        raise ValueError(f"{op}: label_smoothing_mode: 'others' needs at least 2 classes, got V={Vn}")
    _validate.check_same_device(input, linear_weight, "input", "linear_weight", op)
    _validate.check_same_device(input, target, "input", "target", op)
    if (validate or target.device.type == "cpu") and not torch.compiler.is_compiling():
        _validate.check_index_range(target, "target", op, Vn, ignore_index=ignore_index)
    use_triton = resolve_backend(backend, input, op)
    x2 = input.reshape(-1, D)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w2 = linear_weight if linear_weight.stride(-1) == 1 else linear_weight.contiguous()
    t2 = target.reshape(-1)
    if not use_triton:
        t2 = t2.to(torch.int64)
    ct = torch.float64 if (input.dtype == torch.float64 and not use_triton) else torch.float32
    cw = weight.to(ct).contiguous() if weight is not None else None  # the kernels read unit-stride vectors
    linear_bias = linear_bias.contiguous() if linear_bias is not None else None
    smooth = _SMOOTH_MODES[label_smoothing_mode] if label_smoothing > 0 else _tce.SMOOTH_NONE
    if Vn == 0:
        loss, _ = _no_classes(x2 @ w2.t(), t2, False, ignore_index)
    else:
        loss, _, _ = _lce_fwd(x2, w2, linear_bias, t2, cw, int(ignore_index), float(label_smoothing), smooth,
                              float(focal_gamma), float(z_loss), float(softcap) if softcap is not None else 0.0,
                              use_triton)
    if reduction == "none":
        return loss.reshape(input.shape[:-1])
    if reduction == "sum":
        return loss.sum()
    valid = t2 != ignore_index
    if weight is not None:
        denom = torch.where(valid, cw.to(loss.dtype)[t2.clamp(0, max(Vn - 1, 0)).long()], 0.0).sum() if Vn \
            else torch.zeros((), dtype=loss.dtype, device=loss.device)
    else:
        denom = valid.sum().to(loss.dtype)
    return loss.sum() / denom


class LinearCrossEntropyLoss(torch.nn.Module):
    """A drop-in for :class:`torch.nn.LinearCrossEntropyLoss`: owns the head ``self.linear``
    (``nn.Linear(in_features, num_classes, bias=bias)``) and computes :func:`linear_cross_entropy` of
    ``forward(input, target)``; plus the tri_losses options (smoothing modes, focal, z-loss, softcap).
    ``out_features`` (PyTorch's K-dimensional heads) must be ``()``; ``options`` is accepted and unused."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 label_smoothing_mode: str = "torch", focal_gamma: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        if tuple(out_features) != ():
            raise ValueError(f"LinearCrossEntropyLoss: out_features: only () (a (num_classes,) head) is supported, "
                             f"got {tuple(out_features)}")
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction, self.ignore_index, self.label_smoothing, self.options = (reduction, ignore_index,
                                                                                 label_smoothing, options)
        self.kwargs = dict(label_smoothing_mode=label_smoothing_mode, focal_gamma=focal_gamma, z_loss=z_loss,
                           softcap=softcap, backend=backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(input, self.linear.weight, target, linear_bias=self.linear.bias,
                                    weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, **self.kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.linear.out_features}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}")
