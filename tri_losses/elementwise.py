"""Element-wise losses: ``binary_cross_entropy_with_logits``, ``mse_loss``, ``l1_loss`` (PyTorch drop-ins
with RETURNN's extensions) and their modules, plus ``generic_ce_loss`` (RETURNN ``generic_ce``).

One op pair, ``tri_losses::ew_fwd`` / ``tri_losses::ew_bwd``, over the shared Triton template of
``tri_losses/kernels/elementwise.py``: broadcasting by strides (weights are never expanded in memory), sums as
fixed-order per-program partials (deterministic), a one-pass backward giving the gradients to the
input and to a floating target. Losses are returned in float32 (float64 for a float64 input or target, as
PyTorch promotes; the torch code computes those).
Extension (MSE/L1): an integer target of shape ``input.shape[:-1]`` stands for its one-hot.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor
from torch.nn.modules.loss import _Loss

from . import _validate
from ._validate import InputError, InputTypeError
from ._backend import custom_op, device_guard, first_order, kernels, resolve_backend
from ._torch import compute_dtype
from ._torch import elementwise as _tew

__all__ = ["binary_cross_entropy_with_logits", "mse_loss", "l1_loss", "generic_ce_loss", "BCEWithLogitsLoss",
           "MSELoss", "L1Loss", "frame_losses"]


def _shape4(shape):
    s = list(shape)
    return [1] * (4 - len(s)) + s


@custom_op("tri_losses::ew_fwd", mutates_args=())
def _ew_fwd(x: Tensor, t: Tensor, w: Optional[Tensor], pw: Optional[Tensor], shape: list[int], kind: int,
            onehot: bool, reduce: bool, use_triton: bool, lens: Optional[Tensor] = None) -> Tensor:
    """The losses (``shape``), or with ``reduce`` their sum (a scalar): fixed-order per-block partial sums,
    summed in block order. (A scalar, not the partials: an output whose size is the block count, a ceil
    division of the element count, made torch.export guard on that count's range.)"""
    if use_triton:
        with device_guard(x):
            out = kernels("elementwise").ew_fwd(kind, x, t, w, pw, onehot, _shape4(shape), reduce, lens)
        return out.sum() if reduce else out.view(shape)
    l = _tew.elementwise(kind, x, t, w, pw, onehot, shape, lens)
    return _tew.block_sums(l).sum() if reduce else l.contiguous()


@_ew_fwd.register_fake
def _(x, t, w, pw, shape, kind, onehot, reduce, use_triton, lens=None):
    ct = torch.float64 if (x.dtype == torch.float64 and not use_triton) else torch.float32
    return x.new_empty(() if reduce else tuple(shape), dtype=ct)


def _grad_dtypes(x, t, shape, need_dt, use_triton):
    """dtypes of d/dx and d/dt: the operand's own dtype where it has the full shape (written directly,
    no fp32 buffer and cast), else the math dtype (summed to the operand's shape afterwards)."""
    ct = torch.float64 if (x.dtype == torch.float64 and not use_triton) else torch.float32
    full = tuple(shape)
    return (x.dtype if tuple(x.shape) == full else ct,
            (t.dtype if tuple(t.shape) == full else ct) if need_dt else ct)


@custom_op("tri_losses::ew_bwd", mutates_args=())
def _ew_bwd(g: Tensor, x: Tensor, t: Tensor, w: Optional[Tensor], pw: Optional[Tensor], shape: list[int], kind: int,
            onehot: bool, reduce: bool, need_dt: bool, use_triton: bool,
            lens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    dx_dt, dt_dt = _grad_dtypes(x, t, shape, need_dt, use_triton)
    n = 1
    for d in shape:
        n *= d
    if use_triton:
        dx = torch.empty(n, dtype=dx_dt, device=x.device)
        dt = torch.empty(n, dtype=dt_dt, device=x.device) if need_dt else None
        with device_guard(x):
            kernels("elementwise").ew_bwd(kind, g.reshape(() if reduce else -1), x, t, w, pw, onehot, _shape4(shape),
                                          dx, dt, lens)
        return dx.view(shape), (dt.view(shape) if dt is not None else x.new_empty(0, dtype=dt_dt))
    dx, dt = _tew.grads(kind, g, x, t, w, pw, onehot, shape, need_dt, lens)
    return (dx.to(dx_dt).contiguous(),
            dt.to(dt_dt).contiguous() if dt is not None else x.new_empty(0, dtype=dt_dt))


@_ew_bwd.register_fake
def _(g, x, t, w, pw, shape, kind, onehot, reduce, need_dt, use_triton, lens=None):
    dx_dt, dt_dt = _grad_dtypes(x, t, shape, need_dt, use_triton)
    return x.new_empty(tuple(shape), dtype=dx_dt), x.new_empty(tuple(shape) if need_dt else (0,), dtype=dt_dt)


def _setup(ctx, inputs, output):
    x, t, w, pw, shape, kind, onehot, reduce, use_triton = inputs[:9]
    ctx.save_for_backward(x, t, w, pw, inputs[9] if len(inputs) > 9 else None)
    ctx.opts = (list(shape), kind, onehot, reduce, use_triton)
    ctx.need_dt = t.dtype.is_floating_point and t.requires_grad


@first_order("mse_loss / l1_loss / binary_cross_entropy_with_logits")
def _backward(ctx, g):
    x, t, w, pw, lens = ctx.saved_tensors
    shape, kind, onehot, reduce, use_triton = ctx.opts
    dx, dt = _ew_bwd(g, x, t, w, pw, shape, kind, onehot, reduce, ctx.need_dt, use_triton, lens)
    gx = dx.sum_to_size(x.shape).to(x.dtype)
    gt = dt.sum_to_size(t.shape).to(t.dtype) if ctx.need_dt else None
    return gx, gt, None, None, None, None, None, None, None, None


_ew_fwd.register_autograd(_backward, setup_context=_setup)


def _run(op, kind, input, target, weight, pos_weight, reduction, backend, onehot=False, lens=None):
    _validate.check_reduction(reduction, op)
    # PyTorch's type promotion: a float64 target makes the loss float64 (the input's gradient comes back in its own
    # dtype through the cast); the kernels do not compute in float64, so this runs the torch code
    x_dtype = input.dtype
    promoted = target.dtype == torch.float64 and x_dtype != torch.float64
    if promoted:
        input = input.to(torch.float64)
    try:
        use_triton = resolve_backend(backend, input, op, inputs=(target, weight, pos_weight))
    except InputTypeError:
        if not promoted:
            raise
        raise InputTypeError(f"{op}: target: a float64 target makes the loss float64 (as PyTorch promotes), which "
                             f"backend='triton' does not compute; use backend='torch' or 'auto', got a {x_dtype} "
                             f"input with a float64 target") from None
    shape = list(input.shape) if onehot else list(_validate.broadcast_shape(
        input.shape, target.shape, *([weight.shape] if weight is not None else [])))
    x, t, w, pw = input, target, weight, pos_weight
    if use_triton and len(shape) > 4:  # the kernel indexes up to 4 dims: fold leading dims (copies broadcasts)
        lead = shape[:-3]
        shape3 = [int(torch.tensor(lead).prod())] + shape[-3:]
        # a broadcast 16-bit operand goes in fp32: its gradient is then summed over the copies in fp32 (by the
        # expand's backward) and rounded once, as the other paths do, not rounded per copy first
        up = lambda v: v.float() if v.dtype in (torch.float16, torch.bfloat16) and tuple(v.shape) != tuple(shape) else v  # noqa: E731
        x = up(x).expand(shape).reshape(shape3)
        t = (t.expand(shape[:-1]) if onehot else up(t).expand(shape)).reshape(shape3[:-1] if onehot else shape3)
        w = w.expand(shape).reshape(shape3) if w is not None else None
        shape_k = shape3
    else:
        shape_k = shape
    reduce = reduction != "none"
    if onehot:
        t = t.unsqueeze(-1) if use_triton else t  # broadcast over the class dim by stride 0
    out = _ew_fwd(x, t, w, pw, shape_k, kind, onehot, reduce, use_triton, lens)
    if not reduce:
        return out.view(shape)
    n = 1
    for d in shape:
        n *= d
    return out if reduction == "sum" else out / n


def _warn_broadcast(input, target, stacklevel=3):
    """PyTorch's warning for ``mse_loss``/``l1_loss`` with a target of another size (broadcast, as there);
    not while compiling (a warning is a graph break under ``torch.compile(fullgraph=True)``)."""
    if target.size() != input.size() and not torch.compiler.is_compiling():
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. "
                      "Please ensure they have the same size.", stacklevel=stacklevel)


def _check_pair(op, input, target, allow_onehot):
    _validate.check_float(input, "input", op)
    _validate.check_tensor(target, "target", op)
    _validate.check_same_device(input, target, "input", "target", op)
    if target.is_complex():  # (PyTorch's mse_loss raises; BCE would return a complex "loss")
        raise InputTypeError(f"{op}: target: expected a real tensor, got {target.dtype}")
    if not target.dtype.is_floating_point:
        if not allow_onehot:
            raise InputTypeError(f"{op}: target: expected a floating tensor, got {target.dtype}")
        if target.dtype != torch.bool and tuple(target.shape) == tuple(input.shape[:-1]):
            if _validate.host_readable(target):
                _validate.check_index_range(target, "target", op, input.shape[-1])  # (unchecked on CUDA: an all-zero row)
            return True, target
        if target.dtype == torch.bool and op == "l1_loss":  # PyTorch: bool subtraction is not supported
            raise InputTypeError(f"{op}: target: a bool target is not supported (as in PyTorch), got {target.dtype}")
        # any other integer (or, for MSE, bool) target holds values, as PyTorch's type promotion reads it
    if _validate.broadcast_shape(input.shape, target.shape) is None:
        raise InputError(f"{op}: target: shape {tuple(target.shape)} does not broadcast with input "
                         f"{tuple(input.shape)}")
    return False, target if target.dtype.is_floating_point else target.to(input.dtype)


def _real_weight(w, name, input, op):
    """A BCE ``weight``/``pos_weight`` as PyTorch's type promotion takes it: an integer one (or a bool
    ``weight``) in the input's dtype; a bool ``pos_weight`` raises, as there (``1 - pos_weight`` is formed)."""
    if w is None:
        return None
    _validate.check_tensor(w, name, op)
    if w.dtype.is_floating_point or w.is_complex() or (w.dtype == torch.bool and name == "pos_weight"):
        return _validate.check_float(w, name, op)
    return w.to(input.dtype)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                                     size_average=None, reduce=None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """``l = w * [q * t * softplus(-x) + (1 - t) * softplus(x)]``, q = ``pos_weight`` broadcast along
    the last dim; a drop-in for :func:`torch.nn.functional.binary_cross_entropy_with_logits`
    (values, reductions, gradients to input and target). The Triton kernel reads ``pos_weight`` along
    the last dim: one that varies along other dims too runs on the torch backend with ``backend="auto"``
    (``backend="triton"`` raises). Arguments in PyTorch's order, its deprecated ``size_average``/``reduce``
    included (mapped to ``reduction`` as PyTorch does). One difference on non-finite input: at ``x = -inf``
    with ``t != 0`` (and ``pos_weight`` not 0) the loss is its limit, +inf (``t > 0``) or -inf (``t < 0``),
    where PyTorch's formula gives NaN; the gradient is PyTorch's there, and the other infinite or NaN cases
    come out as in PyTorch. The loss is fp32, fp64 for an fp64 input or target (as PyTorch promotes; torch
    code)."""
    op = "binary_cross_entropy_with_logits"
    reduction = _validate.legacy_reduction(size_average, reduce, reduction)
    _check_pair(op, input, target, allow_onehot=False)
    if target.shape != input.shape:
        raise InputError(f"{op}: target: expected the input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
    weight, pos_weight = _real_weight(weight, "weight", input, op), _real_weight(pos_weight, "pos_weight", input, op)
    if weight is not None:
        _validate.check_same_device(input, weight, "input", "weight", op)
        if _validate.broadcast_shape(input.shape, weight.shape) != tuple(input.shape):
            raise InputError(f"{op}: weight: shape {tuple(weight.shape)} does not broadcast to the input's "
                             f"{tuple(input.shape)}")
    if pos_weight is not None:
        _validate.check_same_device(input, pos_weight, "input", "pos_weight", op)
        if _validate.broadcast_shape(input.shape, pos_weight.shape) != tuple(input.shape):
            raise InputError(f"{op}: pos_weight: shape {tuple(pos_weight.shape)} does not broadcast to the input's "
                             f"{tuple(input.shape)}")
    for name, w_ in (("weight", weight), ("pos_weight", pos_weight)):
        if w_ is not None and w_.requires_grad and torch.is_grad_enabled():
            raise InputError(f"{op}: {name}: is not differentiable (as in PyTorch); pass it detached")
    if pos_weight is not None:
        if pos_weight.dim() > 1 and any(d != 1 for d in pos_weight.shape[:-1]):
            # the kernel reads pos_weight along the last dim only: a pos_weight varying along more dims
            # runs on the torch backend (same formula, broadcast pos_weight)
            if backend == "triton":
                raise InputError(f"{op}: pos_weight: the Triton kernel takes a pos_weight along the last dim, "
                                 f"got shape {tuple(pos_weight.shape)}; use backend='torch'")
            backend = "torch"
        else:
            pos_weight = pos_weight.reshape(-1) if pos_weight.dim() else pos_weight.reshape(1)
    return _run(op, _tew.KIND_BCE, input, target, weight, pos_weight, reduction, backend)


def _weighted(op, loss_fn, input, target, weight, reduction, backend):
    """PyTorch's ``weight=`` of ``mse_loss``/``l1_loss`` (torch >= 2.13): ``weight`` has the input's shape
    and may require grad; ``"mean"`` is ``sum(w * l) / sum(w)``; an integer or bool one is taken in the input's
    dtype (as PyTorch's type promotion does). The element-wise loss comes from the op, the weighting in plain
    autograd (one extra pass)."""
    _validate.check_tensor(input, "input", op)
    weight = _real_weight(weight, "weight", input, op)
    _validate.check_same_device(input, weight, "input", "weight", op)
    if tuple(weight.shape) != tuple(input.shape):
        raise InputError(f"{op}: weight: expected the input's shape {tuple(input.shape)}, got {tuple(weight.shape)}")
    _validate.check_reduction(reduction, op)
    loss = loss_fn(input, target, reduction="none", backend=backend)
    w = weight.to(torch.promote_types(loss.dtype, weight.dtype))  # (a 16-bit weight's sum, and its gradient, in fp32)
    rows = loss * w
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / w.sum()


def mse_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
             weight: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Squared error ``(input - target)^2``, a drop-in for :func:`torch.nn.functional.mse_loss`.

    Args:
        input: float tensor (fp32/fp16/bf16; fp64 on the torch backend), any shape.
        target: a float tensor that broadcasts with ``input`` (as in PyTorch, with its warning when the
            sizes differ), or an integer tensor of shape ``input.shape[:-1]`` holding class ids, which
            stands for their one-hot vectors over the last dim (RETURNN's ``mse`` with sparse targets). Integer (or bool) targets of any other
            broadcastable shape are values, as PyTorch's type promotion reads them. Float targets get a
            gradient too.
        size_average, reduce: PyTorch's deprecated reduction flags (positional as there), mapped to
            ``reduction`` as PyTorch does.
        reduction: ``"mean"`` (over all elements), ``"sum"`` or ``"none"`` (elementwise, broadcast shape).
        weight: optional per-element weights of the input's shape (as ``torch.nn.functional.mse_loss`` in
            torch >= 2.13; differentiable; integer or bool weights as PyTorch's type promotion reads them): the
            loss is ``weight * l``, its mean ``sum(weight * l) / sum(weight)``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        The loss in fp32 (fp64 for an fp64 input or target, as PyTorch promotes: the torch backend computes
        it, and a forced ``backend="triton"`` raises).

    Raises:
        TypeError: a non-float ``input``; a bool target (``l1_loss``, as PyTorch).
        ValueError: shapes that do not broadcast, class ids out of
            ``[0, input.shape[-1])`` (checked on CPU), an unknown ``reduction``.
    """
    op = "mse_loss"
    reduction = _validate.legacy_reduction(size_average, reduce, reduction)
    if weight is not None:
        return _weighted(op, mse_loss, input, target, weight, reduction, backend)
    onehot, target = _check_pair(op, input, target, allow_onehot=True)
    if not onehot:
        _warn_broadcast(input, target)
    return _run(op, _tew.KIND_MSE, input, target, None, None, reduction, backend, onehot=onehot)


_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def _complex_l1(op, input, target, reduction, backend):
    """``|input - target|`` for complex input, as PyTorch: a real loss (float32 / float64), the gradient
    ``(input - target) / |input - target|`` (0 where equal). Plain torch: the Triton template is real-only
    (``backend="triton"`` raises). A real float input with a complex target: the same, as PyTorch."""
    if not input.is_complex():
        _validate.check_float(input, "input", op)
    _validate.check_tensor(target, "target", op)
    _validate.check_same_device(input, target, "input", "target", op)
    _validate.check_reduction(reduction, op)
    if not (target.is_complex() or target.dtype.is_floating_point):
        raise InputTypeError(f"{op}: target: expected a complex or floating tensor for complex input, got {target.dtype}")
    _warn_broadcast(input, target, stacklevel=4)
    if _validate.broadcast_shape(input.shape, target.shape) is None:
        raise InputError(f"{op}: target: shape {tuple(target.shape)} does not broadcast with input "
                         f"{tuple(input.shape)}")
    resolve_backend(backend, input, op, has_triton=False)  # plain torch (forward-mode AD works); "triton" raises
    d = (input - target).abs()
    return d if reduction == "none" else (d.sum() if reduction == "sum" else d.mean())


def l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
            weight: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Absolute error ``|input - target|``, a drop-in for :func:`torch.nn.functional.l1_loss`.

    The gradient is ``sign(input - target)``, 0 where ``input == target`` (as PyTorch). Complex input
    (torch backend; ``backend="triton"`` raises): ``|input - target|`` as a real loss, as PyTorch.

    Args:
        input, target, size_average, reduce, reduction, weight, backend: as in :func:`mse_loss` (integer
            targets of shape ``input.shape[:-1]`` are one-hot class ids).

    Returns:
        The loss in fp32 (fp64 for an fp64 input or target, as PyTorch promotes: the torch backend computes
        it, and a forced ``backend="triton"`` raises).

    Raises:
        TypeError, ValueError: as :func:`mse_loss`.
    """
    op = "l1_loss"
    reduction = _validate.legacy_reduction(size_average, reduce, reduction)
    if weight is not None:
        return _weighted(op, l1_loss, input, target, weight, reduction, backend)
    if isinstance(input, Tensor) and (input.dtype in _COMPLEX_DTYPES
                                      or (isinstance(target, Tensor) and target.dtype in _COMPLEX_DTYPES)):
        return _complex_l1(op, input, target, reduction, backend)
    onehot, target = _check_pair(op, input, target, allow_onehot=True)
    if not onehot:
        _warn_broadcast(input, target)
    return _run(op, _tew.KIND_L1, input, target, None, None, reduction, backend, onehot=onehot)


_FRAME_KINDS = ("bce", "mse", "l1")


def frame_losses(kind: str, input: Tensor, target: Tensor, lengths: Optional[Tensor] = None, *,
                 mean_over_features: bool = False, pos_weight: Optional[Tensor] = None, reduction: str = "none",
                 backend: str = "auto") -> Tensor:
    """Per-frame element-wise losses with a length mask: the entry RETURNN's ``bin_ce``/``mse``/``l1``/
    ``mean_l1`` reduce to in one call.

    Args:
        kind: ``"bce"`` (logits), ``"mse"`` or ``"l1"``.
        input: ``(B, T, F)`` (any leading dims ``(..., F)`` when ``lengths`` is None).
        target: as for the matching loss (float, broadcastable; MSE/L1: integer ``(B, T)`` = one-hot).
        lengths: ``(B,)`` valid frames; frames ``t >= lengths[b]`` get 0 (and no gradient).
        mean_over_features: divide each frame's sum over F by F (``bin_ce``, ``mse``, ``mean_l1``).
        reduction: ``"none"`` -> per-frame ``(B, T)`` float32; ``"sum"`` -> the sum over valid frames;
            ``"mean"`` -> that sum / number of valid frames.
    The length mask is applied inside the shared kernel (``HAS_LEN``): padded elements are never
    read, count 0 and get an exact 0 gradient (NaN/inf padding cannot leak). ``"sum"``/``"mean"`` are
    one kernel pass with fixed-order partial sums; ``"none"`` sums the masked element losses over F.
    No host sync: the valid-frame count stays a device tensor.
    """
    op = "frame_losses"
    _validate.check_option(kind, "kind", op, _FRAME_KINDS)
    _validate.check_reduction(reduction, op)
    _validate.check_float(input, "input", op)
    if input.dim() < 1:
        raise InputError(f"{op}: input: expected (..., F), got a 0-dim tensor")
    if kind == "bce":
        _check_pair(op, input, target, allow_onehot=False)
        if target.shape != input.shape:
            raise InputError(f"{op}: target: expected the input's shape {tuple(input.shape)}, got "
                             f"{tuple(target.shape)}")
        if pos_weight is not None:
            _validate.check_float(pos_weight, "pos_weight", op)
            _validate.check_same_device(input, pos_weight, "input", "pos_weight", op)
            if pos_weight.dim() != 1 or pos_weight.shape[0] not in (1, input.shape[-1]):
                raise InputError(f"{op}: pos_weight: expected shape ({input.shape[-1]},) or (1,), got "
                                 f"{tuple(pos_weight.shape)}")
        onehot = False
    else:
        if pos_weight is not None:
            raise InputError(f"{op}: pos_weight: only for kind='bce', got kind={kind!r}")
        onehot, target = _check_pair(op, input, target, allow_onehot=True)
    lens = None
    if lengths is not None:
        if input.dim() != 3:
            raise InputError(f"{op}: lengths: need input (B, T, F), got input {tuple(input.shape)}")
        lens = _validate.as_lengths(lengths, "lengths", op, input.shape[0], input.device, max_value=input.shape[1])
        lens = lens.clamp(0, input.shape[1]).contiguous()
    k = {"bce": _tew.KIND_BCE, "mse": _tew.KIND_MSE, "l1": _tew.KIND_L1}[kind]
    scale = 1.0 / input.shape[-1] if mean_over_features and input.shape[-1] else 1.0
    if reduction == "none":
        el = _run(op, k, input, target, None, pos_weight, "none", backend, onehot=onehot, lens=lens)
        return el.sum(-1) * scale
    # one kernel pass: masked elements count 0, fixed-order partial sums
    total = _run(op, k, input, target, None, pos_weight, "sum", backend, onehot=onehot, lens=lens) * scale
    if reduction == "sum":
        return total
    if lens is not None:
        n = lens.clamp(min=0, max=input.shape[1]).sum()
    else:
        n = input.numel() // input.shape[-1] if input.shape[-1] else 0
    return total / n


class BCEWithLogitsLoss(_Loss):  # PyTorch's base class, so isinstance checks hold
    """Module form of :func:`binary_cross_entropy_with_logits`, a drop-in for :class:`torch.nn.BCEWithLogitsLoss`.

    Args:
        weight: optional per-element weight broadcastable to the input (a buffer, as in PyTorch).
        size_average, reduce: PyTorch's deprecated reduction flags, mapped to ``reduction`` as PyTorch does.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        pos_weight: optional weight of the positive term, broadcast along the last dim (a buffer).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    ``forward(input, target)``: shapes, dtypes and errors as :func:`binary_cross_entropy_with_logits`.
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: Optional[Tensor] = None, *, backend: str = "auto"):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction, self.backend = _validate.legacy_reduction(size_average, reduce, reduction), backend

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                reduction=self.reduction, backend=self.backend)


class MSELoss(_Loss):  # PyTorch's base class, so isinstance checks hold
    """Module form of :func:`mse_loss`, a drop-in for :class:`torch.nn.MSELoss`.

    Args:
        size_average, reduce: PyTorch's deprecated reduction flags, mapped to ``reduction`` as PyTorch does.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    ``forward(input, target)``: as :func:`mse_loss` (integer targets of shape ``input.shape[:-1]`` are one-hot class ids).
    """

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", *, backend: str = "auto"):
        super().__init__()
        self.reduction, self.backend = _validate.legacy_reduction(size_average, reduce, reduction), backend

    def forward(self, input, target):
        return mse_loss(input, target, reduction=self.reduction, backend=self.backend)


class L1Loss(_Loss):  # PyTorch's base class, so isinstance checks hold
    """Module form of :func:`l1_loss`, a drop-in for :class:`torch.nn.L1Loss`.

    Args:
        size_average, reduce: PyTorch's deprecated reduction flags, mapped to ``reduction`` as PyTorch does.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    ``forward(input, target)``: as :func:`l1_loss` (integer targets of shape ``input.shape[:-1]`` are one-hot class ids).
    """

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", *, backend: str = "auto"):
        super().__init__()
        self.reduction, self.backend = _validate.legacy_reduction(size_average, reduce, reduction), backend

    def forward(self, input, target):
        return l1_loss(input, target, reduction=self.reduction, backend=self.backend)


_GENERIC_LOG_ACTS = {"exp": lambda x: x, "sigmoid": torch.nn.functional.logsigmoid}  # log f(x), stable
_LOG_CLAMP = math.log(1e20)  # -log(clamp(y, 1e-20, 1e20)) = clamp(-log y, -46.05, 46.05)


def generic_ce_loss(input: Tensor, target: Tensor, activation: Union[str, Callable] = "exp", *,
                    reduction: str = "mean", validate: bool = False, backend: str = "auto") -> Tensor:
    """RETURNN ``generic_ce``: ``y = f(x) / sum_k f(x_k)``, ``loss = -log(clamp(y_target, 1e-20, 1e20))``.

    The gradient is ``upstream * (f'(x)/f(x)) * (y - onehot)`` (the clamp passes the gradient through;
    where ``f(x_target) = 0``, e.g. a logit of -inf, the target's own entry gets 0 and the others their
    ``(f'/f) y``); ``f = exp`` is softmax CE. ``"exp"``/``"sigmoid"`` are computed in log space, a callable
    ``f`` as ``f(x) / sum f(x)`` (as RETURNN: ``f`` may be 0 or negative); fp32 (fp64 for fp64 input).
    Plain torch autograd (forward-mode AD and ``torch.compile`` work); ``backend="triton"`` raises. Class ids
    out of range raise on CPU (and with ``validate=True``, a host sync, on CUDA); unchecked, such a row is NaN.
    """
    op = "generic_ce_loss"
    _validate.check_bool(op, validate=validate)
    _validate.check_float(input, "input", op)
    _validate.check_int(target, "target", op)
    _validate.check_same_device(input, target, "input", "target", op)
    _validate.check_reduction(reduction, op)
    resolve_backend(backend, input, op, has_triton=False)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise InputError(f"{op}: target: expected shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    if _validate.host_readable(target, validate):
        # unchecked elsewhere (no host sync): such rows are NaN
        _validate.check_index_range(target, "target", op, input.shape[-1])
    if isinstance(activation, str):
        _validate.check_option(activation, "activation", op, tuple(_GENERIC_LOG_ACTS))
    elif not callable(activation):
        raise InputTypeError(f"{op}: activation: expected 'exp', 'sigmoid' or a callable, got {type(activation).__name__}")
    C = input.shape[-1]
    inside = (target >= 0) & (target < C)
    t = torch.where(inside, target, 0).long().unsqueeze(-1)
    xc = input.to(compute_dtype(input))
    # -log y_t = log sum_k f(x_k) - log f(x_t); the clamp passes its gradient through: the clamped value plus
    # a zero that carries the gradient. Where f(x_t) = 0 (e.g. a logit of -inf) log f(x_t) drops out of the
    # carrier: the other classes keep their (f'/f) y gradient, the target's own entry gets 0 (the formula's
    # -f'/f there is -1 for exp at -inf, or 0/0, and no finite value carries it)
    if isinstance(activation, str):  # log space: exact for any logits
        lf = _GENERIC_LOG_ACTS[activation](xc)
        lse = torch.logsumexp(lf, -1)
        picked = lf.gather(-1, t).squeeze(-1)
        value = (lse - picked).detach().clamp(-_LOG_CLAMP, _LOG_CLAMP)
        carrier = lse - torch.where(torch.isfinite(picked), picked, 0.0)
    else:  # as RETURNN: f(x) may be 0 or negative
        fx = activation(xc)
        S = fx.sum(-1)
        ft = fx.gather(-1, t).squeeze(-1)
        value = -torch.log((ft / S).detach().clamp(1e-20, 1e20))
        # log|S| - log|f_t| has -log y_t's gradient, finite for a negative y_t too
        carrier = torch.log(S.abs()) - torch.log(torch.where(ft != 0, ft, 1.0).abs())
    carrier = torch.where(torch.isfinite(carrier), carrier, 0.0)
    rows = torch.where(inside, value + (carrier - carrier.detach()), math.nan)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()
