"""Fused linear + cross-entropy: ``linear_cross_entropy`` and ``LinearCrossEntropyLoss``.

Same value and gradients as ``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)``,
but the ``N x V`` logits are never materialised: the Triton backend forms logit tiles on chip
(``tri_losses/kernels/linear_cross_entropy.py``), the torch backend works in row chunks of bounded size.
Ops: ``tri_losses::lce_fwd`` / ``tri_losses::lce_bwd`` (any upstream gradient; the backward recomputes
the logits) and ``tri_losses::lce_fwd_grad`` (a scalar upstream, ``reduction="mean"``/``"sum"``: the
gradients are formed in the forward and scaled on device in the backward). Each op body is
``kernels("linear_cross_entropy").f(...) if use_triton else _torch.linear_cross_entropy.f(...)`` with the
options as one :class:`LceOptions` value. The loss is float32 (float64 for float64 inputs on the torch
backend); gradients are accumulated in fp32 and written once in the input dtypes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _validate
from ._backend import kernels, resolve_backend
from ._torch import cross_entropy as _tce
from ._torch import input_grads, loss_dtype, reduce_loss
from ._torch import linear_cross_entropy as _tlce
from ._torch.linear_cross_entropy import LceOptions
from ._validate import InputError, InputTypeError
from .cross_entropy import _SMOOTH_MODES, _mean_count, _no_classes, cross_entropy

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]


# The custom ops carry the options (one LceOptions value in the public function) as flat scalars, in
# LceOptions' field order (the op schema needs them flat); each op body rebuilds the value.
def _or_empty(grads, x):
    """(dx, dw, db) with an empty (0,) tensor for each gradient not formed (ops return tensors)."""
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@torch.library.custom_op("tri_losses::lce_fwd", mutates_args=())
def _lce_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, cw: Optional[Tensor], ignore_index: int,
             smoothing: float, smooth_mode: int, focal_gamma: float, z_loss: float, softcap: float, chunk_size: int,
             filter_eps: float, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss (N,), row statistics (N, 2) = (max, log sum exp(x - max)), coefficients (N, 3)."""
    o = LceOptions(ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size, filter_eps)
    return (kernels("linear_cross_entropy").lce_fwd(x, w, b, target, cw, o) if use_triton
            else _tlce.lce_fwd(x, w, b, target, cw, o))


@_lce_fwd.register_fake
def _(x, w, b, target, cw, *opts_and_backend):
    N, ct = x.shape[0], loss_dtype(x, opts_and_backend[-1])
    return x.new_empty(N, dtype=ct), x.new_empty(N, 2, dtype=ct), x.new_empty(N, 3, dtype=ct)


@torch.library.custom_op("tri_losses::lce_bwd", mutates_args=())
def _lce_bwd(grad_loss: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, cw: Optional[Tensor],
             stats: Tensor, coef: Tensor, ignore_index: int, smoothing: float, smooth_mode: int, focal_gamma: float,
             z_loss: float, softcap: float, chunk_size: int, filter_eps: float, need_dx: bool, need_dw: bool,
             use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) in the inputs' dtypes for a per-row upstream gradient; a gradient that is not needed
    is an empty (0,) tensor and its work is skipped (``need_dw`` covers the bias)."""
    o = LceOptions(ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size, filter_eps)
    args = (grad_loss, x, w, b, target, cw, stats, coef, o, need_dx, need_dw)
    return _or_empty(kernels("linear_cross_entropy").lce_bwd(*args) if use_triton else _tlce.lce_bwd(*args), x)


def _grad_fakes(x, w, b, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(w) if need_dw else x.new_empty(0),
            torch.empty_like(b) if (b is not None and need_dw) else x.new_empty(0))


@_lce_bwd.register_fake
def _(grad_loss, x, w, b, target, cw, stats, coef, *rest):
    need_dx, need_dw, _ = rest[-3:]
    return _grad_fakes(x, w, b, need_dx, need_dw)


def _setup(ctx, inputs, output):
    x, w, b, target, cw = inputs[:5]
    _, stats, coef = output
    ctx.save_for_backward(x, w, b, target, cw, stats, coef)
    ctx.opts = inputs[5:]  # the option scalars and use_triton
    ctx.has_bias = b is not None
    ctx.mark_non_differentiable(stats, coef)


def _backward(ctx, grad_loss, grad_stats, grad_coef):
    x, w, b, target, cw, stats, coef = ctx.saved_tensors
    *opts, use_triton = ctx.opts
    need = ctx.needs_input_grad
    need_dx, need_dw = bool(need[0]), bool(need[1] or (ctx.has_bias and need[2]))
    dx, dw, db = _lce_bwd(grad_loss, x, w, b, target, cw, stats, coef, *opts, need_dx, need_dw, use_triton)
    return input_grads(len(need), dx if need_dx else None, dw if need[1] else None,
                       db if (ctx.has_bias and need[2]) else None)


_lce_fwd.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("tri_losses::lce_fwd_grad", mutates_args=())
def _lce_fwd_grad(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, cw: Optional[Tensor], denom: Tensor,
                  ignore_index: int, smoothing: float, smooth_mode: int, focal_gamma: float, z_loss: float,
                  softcap: float, chunk_size: int, filter_eps: float, need_dx: bool, need_dw: bool,
                  use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scalar-upstream path: (sum of the row losses / denom, dx, dw, db), the gradients of that scalar
    (upstream 1) formed in the forward; the autograd backward scales them by the upstream on device."""
    o = LceOptions(ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size, filter_eps)
    args = (x, w, b, target, cw, denom, o, need_dx, need_dw)
    loss, *grads = kernels("linear_cross_entropy").lce_fwd_grad(*args) if use_triton else _tlce.lce_fwd_grad(*args)
    return (loss, *_or_empty(grads, x))


@_lce_fwd_grad.register_fake
def _(x, w, b, target, cw, denom, *rest):
    need_dx, need_dw, use_triton = rest[-3:]
    return (x.new_empty((), dtype=loss_dtype(x, use_triton)), *_grad_fakes(x, w, b, need_dx, need_dw))


def _setup_fused(ctx, inputs, output):
    _, dx, dw, db = output
    ctx.save_for_backward(dx, dw, db)
    ctx.mark_non_differentiable(dx, dw, db)


def _backward_fused(ctx, grad_loss, grad_dx, grad_dw, grad_db):
    dx, dw, db = ctx.saved_tensors
    need = ctx.needs_input_grad
    # 16-bit gradients times the fp32 scalar: one rounding; no host sync whatever the upstream is
    return input_grads(len(need), dx * grad_loss if need[0] else None, dw * grad_loss if need[1] else None,
                       db * grad_loss if need[2] else None)


_lce_fwd_grad.register_autograd(_backward_fused, setup_context=_setup_fused)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None, label_smoothing_mode: str = "torch",
                         focal_gamma: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None, filter_eps: Optional[float] = None,
                         validate: bool = False, backend: str = "auto") -> Tensor:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without materialising the logits.

    Args:
        input: ``(..., D)`` hidden states (flattened to rows), fp32/fp16/bf16 (fp64: torch backend), D >= 1.
        linear_weight: ``(V, D)`` (``nn.Linear`` layout), same dtype as ``input``.
        target: class ids of shape ``input.shape[:-1]``, or class probabilities ``input.shape[:-1] + (V,)``
            (these are N x V themselves: that case is computed on materialised logits).
        linear_bias: optional ``(V,)``, same dtype as ``input``.
        ignore_index: as ``F.linear_cross_entropy``: ``None`` (the default) means -100 for class ids.
        options: ``F.linear_cross_entropy``'s chunking options, accepted for compatibility and unused (the
            logits are never materialised here anyway; see ``chunk_size``).
        weight, reduction, ignore_index, label_smoothing, label_smoothing_mode, focal_gamma, z_loss,
        softcap: as in :func:`tri_losses.cross_entropy` (same semantics and normalisation). ``weight``
            is not differentiable (a ``weight`` that requires grad raises, as in PyTorch).
        chunk_size: logits held at once (the memory bound): the torch backend takes
            ``max(1, chunk_size // V)`` rows at a time, the Triton backward ``max(1, chunk_size // N)``
            classes. ``None``: 64 MiB of fp32 logits (torch) / 256 MiB of 16-bit dz (Triton).
        filter_eps: opt-in approximation: softmax probabilities below it count as 0 in the gradient
            (the loss is exact). ``None`` (the default): exact gradients.
        validate: check class ids on CUDA too (a host sync); CPU targets are always checked.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    With ``reduction="mean"``/``"sum"`` and a gradient to form, the gradients are computed in the forward
    pass (for an upstream gradient of 1) and scaled by the actual upstream scalar in the backward, on
    device; with ``reduction="none"`` the backward recomputes the logits for any per-row upstream.

    Returns:
        The loss: fp32 (fp64 for fp64 inputs on the torch backend); ``reduction="none"`` gives
        ``input.shape[:-1]``.
    """
    op = "linear_cross_entropy"
    if ignore_index is None:
        ignore_index = -100  # F.linear_cross_entropy: None means -100 for class-id targets
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise InputTypeError(f"{op}: ignore_index: expected an int or None, got {type(ignore_index).__name__}")
    _validate.check_float(input, "input", op)
    _validate.check_float(linear_weight, "linear_weight", op)
    _validate.check_tensor(target, "target", op)
    if input.dim() < 1:
        raise InputError(f"{op}: input: expected shape (..., D), got a 0-dim tensor")
    if linear_weight.dim() != 2:
        raise InputError(f"{op}: linear_weight: expected shape (V, D), got {tuple(linear_weight.shape)}")
    Vn, D = linear_weight.shape
    if input.shape[-1] != D:
        raise InputError(f"{op}: input: expected last dim D={D} (linear_weight is {tuple(linear_weight.shape)}), "
                         f"got {tuple(input.shape)}")
    if D == 0:
        raise InputError(f"{op}: input: expected at least one feature (D >= 1), got input {tuple(input.shape)} and "
                         f"linear_weight {tuple(linear_weight.shape)}")
    if linear_bias is not None:
        _validate.check_float(linear_bias, "linear_bias", op)
        _validate.check_shape(linear_bias, (Vn,), "linear_bias", op)
        _validate.check_same_device(input, linear_bias, "input", "linear_bias", op)
        if linear_bias.dtype != input.dtype:  # PyTorch's linear raises too
            raise InputTypeError(f"{op}: linear_bias: expected dtype {input.dtype} (the input's), got "
                                 f"{linear_bias.dtype}")
    if weight is not None:
        _validate.check_class_weight(weight, Vn, input, op)
    if target.dtype.is_floating_point:  # probability targets: N x V already, so materialise the logits
        if tuple(target.shape) != tuple(input.shape[:-1]) + (Vn,):
            raise InputError(f"{op}: target: probability targets must have shape "
                             f"{tuple(input.shape[:-1]) + (Vn,)}, got {tuple(target.shape)}")
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
        raise InputError(f"{op}: label_smoothing: 'gaussian' mode needs label_smoothing < 1, got 1.0")
    _validate.check_number(focal_gamma, "focal_gamma", op, low=0.0)
    _validate.check_number(z_loss, "z_loss", op, low=0.0, high=math.inf, high_inclusive=False)
    _validate.check_number(softcap, "softcap", op, low=0.0, low_inclusive=False, allow_none=True)
    if softcap == math.inf:
        softcap = None  # tanh(x / inf) * inf is NaN; an infinite cap is no cap
    _validate.check_number(filter_eps, "filter_eps", op, low=0.0, high=1.0, allow_none=True)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"{op}: chunk_size: expected a positive int or None, got {chunk_size!r}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise InputError(f"{op}: target: expected shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    if linear_weight.dtype != input.dtype:
        raise InputTypeError(f"{op}: linear_weight: expected dtype {input.dtype} (the input's), got "
                             f"{linear_weight.dtype}")
    if label_smoothing > 0 and label_smoothing_mode == "others" and Vn < 2:
        raise InputError(f"{op}: label_smoothing_mode: 'others' needs at least 2 classes, got V={Vn}")
    _validate.check_same_device(input, linear_weight, "input", "linear_weight", op)
    _validate.check_same_device(input, target, "input", "target", op)
    if (validate or target.device.type == "cpu") and not torch.compiler.is_compiling():
        _validate.check_index_range(target, "target", op, Vn, ignore_index=ignore_index)
    use_triton = resolve_backend(backend, input, op, inputs=(linear_weight, linear_bias))
    x2 = input.reshape(-1, D)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w2 = linear_weight if linear_weight.stride(-1) == 1 else linear_weight.contiguous()
    t2 = target.reshape(-1)
    if not use_triton:
        t2 = t2.to(torch.int64)
    ct = loss_dtype(input, use_triton)
    cw = weight.to(ct).contiguous() if weight is not None else None  # the kernels read unit-stride vectors
    b2 = linear_bias.contiguous() if linear_bias is not None else None
    o = LceOptions(int(ignore_index), float(label_smoothing),
                   _SMOOTH_MODES[label_smoothing_mode] if label_smoothing > 0 else _tce.SMOOTH_NONE,
                   float(focal_gamma), float(z_loss), float(softcap) if softcap is not None else 0.0,
                   int(chunk_size or 0), float(filter_eps or 0.0))
    count = _mean_count(t2, cw, _tlce.ce_options(o), Vn, ct) if reduction == "mean" else None
    if Vn == 0:
        loss, _ = _no_classes(x2 @ w2.t(), t2, False, ignore_index)
        return reduce_loss(loss.reshape(input.shape[:-1]), reduction, count)
    need_dx = input.requires_grad
    need_dw = linear_weight.requires_grad or (linear_bias is not None and linear_bias.requires_grad)
    if reduction != "none" and torch.is_grad_enabled() and (need_dx or need_dw):
        # one upstream scalar: the gradients are formed in the forward (no recomputed logits)
        denom = count if reduction == "mean" else torch.ones((), dtype=ct, device=x2.device)
        return _lce_fwd_grad(x2, w2, b2, t2, cw, denom, *o, need_dx, need_dw, use_triton)[0]
    loss, _, _ = _lce_fwd(x2, w2, b2, t2, cw, *o, use_triton)
    return reduce_loss(loss.reshape(input.shape[:-1]), reduction, count)


class LinearCrossEntropyLoss(torch.nn.Module):
    """A drop-in for :class:`torch.nn.LinearCrossEntropyLoss`: owns the head ``self.linear``
    (``nn.Linear(in_features, num_classes, bias=bias)``) and computes :func:`linear_cross_entropy` of
    ``forward(input, target)``; plus the tri_losses options (smoothing modes, focal, z-loss, softcap).
    ``out_features`` (PyTorch's K-dimensional heads) must be ``()``; ``options`` is accepted and unused."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 label_smoothing_mode: str = "torch", focal_gamma: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 filter_eps: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        if tuple(out_features) != ():
            raise InputError(f"LinearCrossEntropyLoss: out_features: only () (a (num_classes,) head) is supported, "
                             f"got {tuple(out_features)}")
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction, self.ignore_index, self.label_smoothing, self.options = (reduction, ignore_index,
                                                                                 label_smoothing, options)
        self.kwargs = dict(label_smoothing_mode=label_smoothing_mode, focal_gamma=focal_gamma, z_loss=z_loss,
                           softcap=softcap, chunk_size=chunk_size, filter_eps=filter_eps, backend=backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(input, self.linear.weight, target, linear_bias=self.linear.bias,
                                    weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, **self.kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.linear.out_features}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}")
