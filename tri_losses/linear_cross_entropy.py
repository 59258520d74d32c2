"""Fused linear + cross-entropy: ``linear_cross_entropy`` and ``LinearCrossEntropyLoss``.

Same value and gradients as ``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)``,
but the ``N x V`` logits are never materialised: the Triton backend forms logit tiles on chip
(``tri_losses/kernels/linear_cross_entropy.py``; bf16 on CUDA with torch >= 2.10: fp32 logits of one chunk of
classes at a time from cuBLAS, reduced by Triton kernels), the torch backend works in row chunks of bounded size.
Ops: ``tri_losses::lce_fwd`` / ``tri_losses::lce_bwd`` (any upstream gradient; the backward recomputes
the logits) and ``tri_losses::lce_fwd_grad`` (a scalar upstream, ``reduction="mean"``/``"sum"``: the
gradients are formed in the forward and scaled on device in the backward). Each op body is
``_backend(use_triton).f(...)`` (``kernels("linear_cross_entropy").f`` or ``_torch.linear_cross_entropy.f``)
with the options as one :class:`LceOptions` value. The loss is float32 (float64 for float64 inputs on the torch
backend); gradients are accumulated in fp32 and written once in the input dtypes. With a ``process_group``
(vocab-parallel heads) the forward is ``tri_losses::lce_partial`` (this rank's per-row sums), the combine
shared with ``cross_entropy`` (two O(N) all-reduces) in eager Python, and the backward ``lce_bwd`` with the
whole row's statistics, its input gradient summed over the ranks by one all-reduce.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Union

import torch
from torch import Tensor
from torch.nn.modules.loss import _WeightedLoss

from . import _validate
from ._backend import (autocast_like_linear, check_no_functorch, custom_op, device_guard, first_order,
                       functorch_active, kernels, resolve_backend)
from ._torch import cross_entropy as _tce
from ._torch import compute_dtype, input_grads, loss_dtype, reduce_loss
from ._torch import linear_cross_entropy as _tlce
from ._torch.linear_cross_entropy import LceOptions
from ._validate import InputError, InputTypeError
from .cross_entropy import (_SMOOTH_MODES, _GroupState, _ce_scale, _check_args, _check_ranks_agree, _combine_shards,
                            _dtensor_call, _errors_reach_every_rank, _hide_private_params, _is_dtensor,
                            _mean_denominator, _no_classes, _scaled_grad, _shard_classes, _vocab_parallel_runs_eagerly,
                            cross_entropy)

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]


# The custom ops carry the options (one LceOptions value in the public function) as flat scalars, in
# LceOptions' field order (the op schema needs them flat); each op body rebuilds the value.
def _or_empty(grads, x):
    """(dx, dw, db) with an empty (0,) tensor for each gradient not formed (ops return tensors)."""
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _backend(use_triton):
    """What runs an op's body: the Triton kernels' module or the torch backend (the same functions)."""
    return kernels("linear_cross_entropy") if use_triton else _tlce


@custom_op("tri_losses::lce_fwd", mutates_args=(), rows=(0, 3))  # (its backward sums dW over rows: not row-wise)
def _lce_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, cw: Optional[Tensor], ignore_index: int,
             smoothing: float, smooth_mode: int, focal_gamma: float, z_loss: float, softcap: float, chunk_size: int,
             filter_eps: float, class_offset: int, num_classes: int, use_triton: bool,
             want_argmax: bool = False, want_entropy: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss (N,), row statistics (N, 2) = (max, log sum exp(x - max)), coefficients (N, 3), with
    ``want_argmax`` the rows' predicted classes (N,) int64 (:func:`_predictions`) and with ``want_entropy``
    the rows' softmax entropy (N,) in the loss's dtype (:func:`_entropies`); each else an empty (0,) tensor."""
    o = LceOptions(ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size, filter_eps,
                   class_offset, num_classes)
    pred = _argmax_buffer(x, want_argmax)
    ent = torch.empty(x.shape[0] if want_entropy else 0, dtype=loss_dtype(x, use_triton), device=x.device)
    with device_guard(x):
        loss, stats, coef = _backend(use_triton).lce_fwd(x, w, b, target, cw, o, pred if want_argmax else None,
                                                         ent if want_entropy else None)
    return loss, stats, coef, _predictions(pred, stats), _entropies(ent, stats[:, 0] + stats[:, 1])


def _argmax_buffer(x, want):
    """The rows' argmax output of an op: int64 (N,) that its backend fills when ``want``, else empty (0,)."""
    return torch.empty(x.shape[0] if want else 0, dtype=torch.int64, device=x.device)


def _predictions(pred, stats):
    """The rows' argmax (global class ids, the first maximum of the soft-capped logits) with -1 where the
    row's log-sum-exp ``m + log s`` is not finite (a NaN or +inf logit, or none finite); empty stays empty."""
    return _tlce.finite_rows_only(pred, stats[:, 0] + stats[:, 1]) if pred.numel() else pred


def _entropies(ent, lse):
    """The rows' softmax entropy ``ent`` with NaN where the row's log-sum-exp ``lse`` is not finite (no
    distribution there: a NaN or +inf logit, or none finite); empty stays empty."""
    return _tlce.finite_rows_only(ent, lse, math.nan) if ent.numel() else ent


@_lce_fwd.register_fake
def _(x, w, b, target, cw, ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size,
      filter_eps, class_offset, num_classes, use_triton, want_argmax=False, want_entropy=False):
    N, ct = x.shape[0], loss_dtype(x, use_triton)
    return (x.new_empty(N, dtype=ct), x.new_empty(N, 2, dtype=ct), x.new_empty(N, 3, dtype=ct),
            x.new_empty(N if want_argmax else 0, dtype=torch.int64), x.new_empty(N if want_entropy else 0, dtype=ct))


@custom_op("tri_losses::lce_bwd", mutates_args=())
def _lce_bwd(grad_loss: Tensor, grad_lse: Optional[Tensor], x: Tensor, w: Tensor, b: Optional[Tensor],
             target: Tensor, cw: Optional[Tensor], stats: Tensor, coef: Tensor, ignore_index: int, smoothing: float,
             smooth_mode: int, focal_gamma: float, z_loss: float, softcap: float, chunk_size: int, filter_eps: float,
             class_offset: int, num_classes: int, need_dx: bool, need_dw: bool,
             use_triton: bool, grad_ent: Optional[Tensor] = None,
             ent: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) in the inputs' dtypes for a per-row upstream gradient of the loss and, when given, of
    the row's log-sum-exp (``grad_lse``, ``return_lse``: it reaches ignored rows too) and of its entropy
    ``ent`` (``grad_ent``, ``return_entropy``: ignored rows too); a gradient that is
    not needed is an empty (0,) tensor and its work is skipped (``need_dw`` covers the bias). With a shard
    of the classes (``num_classes > 0``), ``stats`` and ``coef`` are the whole row's and the gradients
    this head's part (dx: this shard's contribution)."""
    o = LceOptions(ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size, filter_eps,
                   class_offset, num_classes)
    with device_guard(x):
        grads = _backend(use_triton).lce_bwd(grad_loss, x, w, b, target, cw, stats, coef, o, need_dx, need_dw,
                                             grad_lse=grad_lse, grad_ent=grad_ent, ent=ent)
    return _or_empty(grads, x)


def _grad_fakes(x, w, b, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(w) if need_dw else x.new_empty(0),
            torch.empty_like(b) if (b is not None and need_dw) else x.new_empty(0))


@_lce_bwd.register_fake
def _(grad_loss, grad_lse, x, w, b, target, cw, stats, coef, ignore_index, smoothing, smooth_mode, focal_gamma,
      z_loss, softcap, chunk_size, filter_eps, class_offset, num_classes, need_dx, need_dw, use_triton,
      grad_ent=None, ent=None):
    return _grad_fakes(x, w, b, need_dx, need_dw)


def _setup(ctx, inputs, output):
    x, w, b, target, cw = inputs[:5]
    _, stats, coef, pred, ent = output
    ctx.save_for_backward(x, w, b, target, cw, stats, coef, ent)
    ctx.opts = inputs[5:16]  # the option scalars and use_triton
    ctx.has_bias = b is not None
    # stats = (m, log s) is differentiable as the row's lse = m + log s only (the public function's
    # return_lse, its one use): its gradient arrives as (g_lse, g_lse)
    ctx.mark_non_differentiable(coef, pred)
    ctx.set_materialize_grads(False)


@first_order("linear_cross_entropy")
def _backward(ctx, grad_loss, grad_stats, grad_coef, grad_pred, grad_ent):
    x, w, b, target, cw, stats, coef, ent = ctx.saved_tensors
    *opts, use_triton = ctx.opts
    if grad_loss is None:  # grads are not materialised: an unused loss is a zero upstream
        grad_loss = torch.zeros_like(stats[:, 0])
    grad_lse = grad_stats[:, 1].contiguous() if grad_stats is not None else None
    need = ctx.needs_input_grad
    need_dx, need_dw = bool(need[0]), bool(need[1] or (ctx.has_bias and need[2]))
    dx, dw, db = _lce_bwd(grad_loss, grad_lse, x, w, b, target, cw, stats, coef, *opts, need_dx, need_dw,
                          use_triton, *_entropy_upstream(grad_ent, ent))
    return input_grads(len(need), dx if need_dx else None, dw if need[1] else None,
                       db if (ctx.has_bias and need[2]) else None)


def _entropy_upstream(grad_ent, ent):
    """``(grad_ent, ent)`` for ``lce_bwd``: both None without an upstream for the entropy (none asked for, or
    not used)."""
    return (grad_ent.contiguous(), ent) if grad_ent is not None and ent.numel() else (None, None)


_lce_fwd.register_autograd(_backward, setup_context=_setup)


@custom_op("tri_losses::lce_fwd_grad", mutates_args=())
def _lce_fwd_grad(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, cw: Optional[Tensor],
                  denom: Optional[Tensor],
                  ignore_index: int, smoothing: float, smooth_mode: int, focal_gamma: float, z_loss: float,
                  softcap: float, chunk_size: int, filter_eps: float, class_offset: int, num_classes: int,
                  need_dx: bool, need_dw: bool, use_triton: bool,
                  want_argmax: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Scalar-upstream path: (sum of the row losses / denom, dx, dw, db, argmax), the gradients of that
    scalar (upstream 1) formed in the forward; the autograd backward scales them by the upstream on device.
    ``denom`` None: the plain sum (``reduction="sum"``; no denominator tensor to make). ``argmax``: as
    :func:`_lce_fwd`'s. Whole-vocabulary heads only (a shard's gradients need the combined row statistics
    first)."""
    o = LceOptions(ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size, filter_eps,
                   class_offset, num_classes)
    pred = _argmax_buffer(x, want_argmax)
    stats = torch.empty(pred.shape[0], 2, dtype=loss_dtype(x, use_triton), device=x.device)
    with device_guard(x):
        loss, dx, dw, db = _backend(use_triton).lce_fwd_grad(x, w, b, target, cw, denom, o, need_dx, need_dw,
                                                             *((pred, stats) if want_argmax else ()))
    return (loss, *_or_empty((dx, dw, db), x), _predictions(pred, stats))


@_lce_fwd_grad.register_fake
def _(x, w, b, target, cw, denom, ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size,
      filter_eps, class_offset, num_classes, need_dx, need_dw, use_triton, want_argmax=False):
    return (x.new_empty((), dtype=loss_dtype(x, use_triton)), *_grad_fakes(x, w, b, need_dx, need_dw),
            x.new_empty(x.shape[0] if want_argmax else 0, dtype=torch.int64))


def _setup_fused(ctx, inputs, output):
    _, dx, dw, db, pred = output
    ctx.use_triton = inputs[18]
    ctx.save_for_backward(dx, dw, db)
    # the inputs, weakly, as graph anchors for first_order's error node (a gradient penalty through
    # torch.autograd.grad must reach it): a strong reference would keep x alive until the backward. A view
    # (the public function's reshape of x) dies with the call: its base, the caller's tensor, is the anchor
    ctx.anchor_refs = [weakref.ref(t if t._base is None else t._base) for t in inputs[:3]
                       if isinstance(t, Tensor) and t.requires_grad]
    ctx.mark_non_differentiable(dx, dw, db, pred)
    ctx.set_materialize_grads(False)  # else autograd zero-fills (N, D) and (V, D) gradients for dx, dw


@first_order("linear_cross_entropy")
def _backward_fused(ctx, grad_loss, grad_dx, grad_dw, grad_db, grad_pred):
    dx, dw, db = ctx.saved_tensors
    need, use_triton = ctx.needs_input_grad, ctx.use_triton
    if grad_loss is None:  # grads are not materialised: an unused loss is a zero upstream
        grad_loss = dx.new_zeros((), dtype=torch.float32)
    # the saved gradients times the upstream scalar as cross_entropy's fast path scales (one rounding, read on
    # device; in place when the graph is released, free on Triton when the upstream is 1). The bias gradient
    # (V values) always into a new tensor: an in-place op on its (1, V) view fails Inductor with a dynamic V
    return input_grads(len(need), _scaled_grad(dx, grad_loss, use_triton) if need[0] else None,
                       _scaled_grad(dw, grad_loss, use_triton) if need[1] else None,
                       _ce_scale(db.reshape(1, -1), grad_loss, use_triton).reshape(-1) if need[2] else None)


_lce_fwd_grad.register_autograd(_backward_fused, setup_context=_setup_fused)


# ----------------------------------------------------------------------------------------------
# vocab-parallel: the local sums in ``tri_losses::lce_partial``, the combine shared with cross_entropy
# (two O(N) all-reduces), the backward in ``lce_bwd`` with the whole row's statistics, the input
# gradient summed over the ranks by ``_ReduceGrad`` (one O(N*D) all-reduce)
# ----------------------------------------------------------------------------------------------
@custom_op("tri_losses::lce_partial", mutates_args=())
def _lce_partial(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, cw: Optional[Tensor],
                 ignore_index: int, smoothing: float, smooth_mode: int, focal_gamma: float, z_loss: float,
                 softcap: float, chunk_size: int, filter_eps: float, class_offset: int, num_classes: int,
                 use_triton: bool, want_argmax: bool = False, want_entropy: bool = False) -> tuple[Tensor, Tensor]:
    """The vocab-parallel forward's local half: per-row sums ``(N, 5)`` = (m, s, A, sum a (z - m), z_y - m)
    over this head's classes (see ``tri_losses._torch.cross_entropy.ce_partial``; with ``want_entropy``
    ``(N, 6)``, the sixth ``sum exp(z - m) (z - m)``), and with ``want_argmax`` the rows' first maximum over
    them (global class ids; else an empty (0,) tensor)."""
    o = LceOptions(ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size, filter_eps,
                   class_offset, num_classes)
    pred = _argmax_buffer(x, want_argmax)
    if want_argmax and not w.shape[0]:
        pred.fill_(class_offset)  # (a head with no rows: any id, its row max is -inf)
    with device_guard(x):
        part = _backend(use_triton).lce_partial(x, w, b, target, cw, o, pred if want_argmax else None,
                                                want_entropy)
    return part, pred


@_lce_partial.register_fake
def _(x, w, b, target, cw, ignore_index, smoothing, smooth_mode, focal_gamma, z_loss, softcap, chunk_size,
      filter_eps, class_offset, num_classes, use_triton, want_argmax=False, want_entropy=False):
    return (x.new_empty(x.shape[0], 6 if want_entropy else 5, dtype=loss_dtype(x, use_triton)),
            x.new_empty(x.shape[0] if want_argmax else 0, dtype=torch.int64))


def _shard_argmax(m, pred, lse, group):
    """The whole row's predicted class from each rank's row max ``m`` (-inf: no finite logit here) and first
    maximum ``pred`` (a global id): the lowest id among the ranks holding the row's max (a MAX and a MIN
    all-reduce of N values), -1 where the whole row's ``lse`` is not finite."""
    import torch.distributed as dist
    top = m.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    best = torch.where((m == top) & (m > -math.inf), pred, torch.iinfo(torch.int64).max)
    dist.all_reduce(best, op=dist.ReduceOp.MIN, group=group)
    return _tlce.finite_rows_only(best, lse)


class _VocabParallelLCE(torch.autograd.Function):
    """Per-row whole-vocabulary loss from this rank's head rows: ``lce_partial``, the shared combine
    (``cross_entropy._combine_shards``), and in the backward ``lce_bwd`` with the combined row
    statistics (no collective there: the input gradient is summed by ``_ReduceGrad``)."""

    @staticmethod
    def forward(ctx, x2, w2, b2, t2, cw, o, group, use_triton, want_argmax, want_entropy):
        part, pred = _lce_partial(x2, w2, b2, t2, cw, *o, use_triton, want_argmax, want_entropy)
        # the torch backend's layout of the backward scalars: (c1, c2, c3, m, log s), the whole row's
        loss, lse, coef, w_y, ent = _combine_shards(part, w2.shape[0], t2, cw, _tlce.ce_options(o), group, False)
        if want_argmax:  # (s = 0: no finite logit in this rank's classes)
            pred = _shard_argmax(torch.where(part[:, 1] != 0, part[:, 0], -math.inf), pred, lse, group)
        ent = _entropies(ent, lse) if want_entropy else lse.new_empty(0)
        ctx.save_for_backward(x2, w2, b2, t2, cw, coef[:, 3:5].contiguous(), coef[:, :3].contiguous(), ent)
        ctx.o, ctx.use_triton = o, use_triton
        ctx.mark_non_differentiable(w_y, pred)
        ctx.set_materialize_grads(False)
        return loss, lse, w_y, pred, ent

    @staticmethod
    @first_order("linear_cross_entropy")
    def backward(ctx, grad_loss, grad_lse, grad_w_y, grad_pred, grad_ent):
        x, w, b, target, cw, stats, coef, ent = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_loss is None:  # grads are not materialised: an unused loss is a zero upstream
            grad_loss = torch.zeros_like(stats[:, 0])
        need_dx, need_dw = bool(need[0]), bool(need[1] or (b is not None and need[2]))
        dx, dw, db = _lce_bwd(grad_loss, grad_lse, x, w, b, target, cw, stats, coef, *ctx.o, need_dx, need_dw,
                              ctx.use_triton, *_entropy_upstream(grad_ent, ent))
        return (dx if need_dx else None, dw if need[1] else None, db if (b is not None and need[2]) else None,
                None, None, None, None, None, None, None)


class _ReduceGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over ``group`` (one all-reduce of the input's
    size, in its dtype): a replicated input whose loss is split over the ranks gets its whole gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    @first_order("linear_cross_entropy")
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _dtensor_lce(input, linear_weight, target, linear_bias, weight, kwargs):
    """A DTensor head sharded on its rows (``Shard(0)`` over a 1-D mesh): compute on the local rows over
    the mesh's group; the outputs come back as DTensors replicated on the mesh."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    op = "linear_cross_entropy"
    if isinstance(input, DTensor) and not kwargs["reduce_input_grad"]:
        raise InputError(f"{op}: reduce_input_grad: False leaves each rank its part of the input gradient, which a "
                         f"DTensor input cannot carry (DTensor takes a replicated gradient as reduced); pass the "
                         f"input as a plain local tensor, or keep reduce_input_grad=True")
    if not isinstance(linear_weight, DTensor):
        raise InputError(f"{op}: linear_weight: with a DTensor input or bias the head must be a DTensor sharded on "
                         f"its rows (Shard(0)), got a {type(linear_weight).__name__}")

    def run(local, group):
        return linear_cross_entropy(local(input, Replicate()), linear_weight.to_local(),
                                    local(target, Replicate()), linear_bias=local(linear_bias, Shard(0)),
                                    weight=local(weight, Shard(0)), **dict(kwargs, process_group=group))
    return _dtensor_call(op, linear_weight, "linear_weight", "head", "its rows", 0, kwargs, run)


def _materialised(input, linear_weight, target, linear_bias, weight, process_group, reduce_input_grad, ce,
                  shard=None):
    """The loss on materialised logits, by :func:`tri_losses.cross_entropy`: probability targets (N x V
    themselves) and inputs without features (D = 0: the logits are the bias, or zeros, as
    ``F.linear_cross_entropy`` gives). ``ce``: the cross-entropy options; ``shard``: with a process group,
    this rank's (class offset, V), computed and validated by the caller (cross_entropy then runs no
    collective for them, and validates nothing the caller has)."""
    sharded = process_group is not None
    xin = _ReduceGrad.apply(input, process_group) if sharded and reduce_input_grad else input
    logits = torch.nn.functional.linear(xin, linear_weight, linear_bias)
    logits = logits.movedim(-1, 1) if logits.dim() > 2 else logits
    dense = target.dtype.is_floating_point
    validate = ce.pop("validate")
    par = dict(process_group=process_group, _shard=shard) if sharded else dict(validate=validate)
    return _ce_of_logits(logits, target.movedim(-1, 1) if dense and target.dim() > 2 else target, weight, ce, par,
                         process_group, shard[0] if sharded else 0)


def _ce_of_logits(logits, target, weight, ce, par, group=None, offset=0):
    """:func:`tri_losses.cross_entropy` of materialised logits (class dim 1, or 0 for one row) with the
    options ``ce`` and ``par``, and with ``ce["return_argmax"]`` the rows' argmax appended to its output (the
    first maximum of the soft-capped logits; -1 where the whole row's lse is not finite; with a ``group``,
    over the ranks' slices, this rank's classes from ``offset``), then with ``ce["return_entropy"]`` the
    rows' softmax entropy (differentiable; no ``group``: the caller refuses it)."""
    ce = dict(ce)
    want, want_lse = ce.pop("return_argmax", False), ce.get("return_lse", False)
    want_ent = ce.pop("return_entropy", False)
    # with a group the whole row's lse comes from cross_entropy's collectives; without one the call keeps its
    # own (e.g. the scalar-upstream fast path) and the lse of the argmax's rule is formed here
    out = cross_entropy(logits, target, weight, **dict(ce, return_lse=want_lse or (want and group is not None)),
                        **par)
    if not (want or want_ent):
        return out
    cd = 0 if logits.dim() == 1 else 1
    cap = ce.get("softcap")
    z = logits.to(compute_dtype(logits))  # (in the compute dtype, as the loss: float64 logits stay float64)
    z = cap * torch.tanh(z / cap) if cap else z
    extra = []
    if want:
        with torch.no_grad():
            lse = out[1] if group is not None or want_lse else torch.logsumexp(z, cd)
            pred = z.argmax(cd) + offset if z.shape[cd] else torch.zeros_like(lse, dtype=torch.int64)
            if group is not None:
                m = z.amax(cd) if z.shape[cd] else torch.full_like(lse, -math.inf)
                pred = _shard_argmax(m, pred, lse, group)
            else:
                pred = _tlce.finite_rows_only(pred, lse)
        extra.append(pred)
    if want_ent:  # -sum p log p, a -inf logit adding 0 (log p clamped to a finite value there)
        lse = torch.logsumexp(z, cd, keepdim=True)
        logp = (z - lse).clamp(min=torch.finfo(z.dtype).min)
        extra.append(_tlce.finite_rows_only(-(logp.exp() * logp).sum(cd), lse.squeeze(cd), math.nan))
    return (*(out if want_lse else (out[0] if isinstance(out, tuple) else out,)), *extra)


def _check_bias(linear_bias, shape, input, op):
    """``linear_bias`` (if given): a float tensor of ``shape`` on ``input``'s device, in its dtype (PyTorch's
    linear raises for another dtype too)."""
    if linear_bias is None:
        return
    _validate.check_float(linear_bias, "linear_bias", op)
    _validate.check_shape(linear_bias, tuple(shape), "linear_bias", op)
    _validate.check_same_device(input, linear_bias, "input", "linear_bias", op)
    if linear_bias.dtype != input.dtype:
        raise InputTypeError(f"{op}: linear_bias: expected dtype {input.dtype} (the input's), got {linear_bias.dtype}")


def _k_dim_head(input, linear_weight, target, linear_bias, weight, sharded, filter_eps, op, ce):
    """PyTorch's K-dimensional head: ``linear_weight (C, d1, ..., dK, D)``, ``linear_bias (C, d1, ..., dK)``,
    ``input (N, D)``: the logits ``(N, C, d1, ..., dK)`` (materialised, as PyTorch's reference path) and
    :func:`tri_losses.cross_entropy`'s K-dimensional loss of them, every option alike."""
    shape = tuple(linear_weight.shape)
    if sharded:  # (a process_group, or one taken from a DTensor head's mesh)
        raise InputError(f"{op}: process_group: a K-dimensional linear_weight (C, d1, ..., dK, D) is not split "
                         f"over ranks (as a process_group or a DTensor); give a (V, D) head, got linear_weight of "
                         f"shape {shape}")
    if filter_eps is not None:
        raise InputError(f"{op}: filter_eps: only with a (V, D) linear_weight, got one of shape {shape}")
    if input.dim() != 2 or input.shape[-1] != shape[-1]:
        raise InputError(f"{op}: input: a K-dimensional linear_weight of shape {shape} takes batched input "
                         f"(N, {shape[-1]}) (as F.linear_cross_entropy), got {tuple(input.shape)}")
    _check_bias(linear_bias, shape[:-1], input, op)
    N, D = input.shape
    want = (N,) + (shape[1:-1] if not target.dtype.is_floating_point else shape[:-1])
    if tuple(target.shape) != want:
        raise InputError(f"{op}: target: expected shape {(N,) + shape[1:-1]} (class ids) or {(N,) + shape[:-1]} "
                         f"(probabilities) for linear_weight {shape}, got {tuple(target.shape)}")
    logits = torch.nn.functional.linear(input, linear_weight.reshape(math.prod(shape[:-1]), D),  # (D may be 0)
                                        linear_bias.reshape(-1) if linear_bias is not None else None)
    return _ce_of_logits(logits.reshape(N, *shape[:-1]), target, weight, ce, {})


@_hide_private_params
@_errors_reach_every_rank(("input", 0), ("linear_weight", 1), ("linear_bias", None))
@autocast_like_linear
def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None, label_smoothing_mode: str = "torch",
                         focal_gamma: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None, filter_eps: Union[float, str, None] = None,
                         return_lse: bool = False, return_argmax: bool = False, return_entropy: bool = False,
                         validate: bool = False, backend: str = "auto", process_group=None,
                         vocab_start: Optional[int] = None, reduce_input_grad: bool = True,
                         _denom=None) -> Union[Tensor, tuple[Tensor, ...]]:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without materialising the logits.

    Args:
        input: ``(..., D)`` hidden states (flattened to rows), fp32/fp16/bf16 (fp64: torch backend); with D = 0
            the logits are the bias (or zeros), as for ``F.linear_cross_entropy``.
        linear_weight: ``(V, D)`` (``nn.Linear`` layout), same dtype as ``input``. PyTorch's K-dimensional
            head ``(C, d1, ..., dK, D)`` (with ``linear_bias (C, d1, ..., dK)``, ``input (N, D)``, class-id
            targets ``(N, d1, ..., dK)`` or probabilities ``(N, C, d1, ..., dK)``) gives the K-dimensional
            loss of :func:`tri_losses.cross_entropy` on the logits ``(N, C, d1, ..., dK)``, which are then
            materialised (as PyTorch's reference path; no ``process_group`` or ``filter_eps`` there).
        target: class ids of shape ``input.shape[:-1]``, or class probabilities ``input.shape[:-1] + (V,)``
            (these are N x V themselves: that case is computed on materialised logits).
        linear_bias: optional ``(V,)``, same dtype as ``input``. Under ``torch.autocast``, ``input``,
            ``linear_weight`` and ``linear_bias`` are first cast to the autocast dtype, as for ``F.linear``.
        ignore_index: as ``F.linear_cross_entropy``: ``None`` (the default) means -100 for class ids;
            probability targets take none (giving one raises, as PyTorch).
        options: ``F.linear_cross_entropy``'s chunking options, accepted for compatibility and unused (the
            logits are never materialised here anyway; see ``chunk_size``).
        weight, reduction, ignore_index, label_smoothing, label_smoothing_mode, focal_gamma, z_loss,
        softcap: as in :func:`tri_losses.cross_entropy` (same semantics and normalisation). ``weight``
            is differentiable with probability targets only (as in PyTorch; with class ids one that
            requires grad raises).
        chunk_size: logits per chunk (what bounds the memory): the torch backend takes
            ``max(1, chunk_size // V)`` rows at a time, the Triton backend ``max(1, chunk_size // N)``
            classes (its backward's dz chunk; for bf16 on CUDA with torch >= 2.10, whose GEMMs are cuBLAS's,
            also the fp32 logits chunk of its forward and backward). ``None``: 64 MiB of fp32 logits (torch) / 8192
            classes within 256 MiB of dz and fp32 logits (Triton). A chunk's temporaries (logits, their
            exponentials, the gradient) make the torch backend's peak extra memory a few chunks of fp32
            values: about 3-5x ``4 * chunk_size`` bytes, up to about 7x with softcap, z-loss and focal or
            Gaussian smoothing (measured on the CPU).
        filter_eps: opt-in gradient filtering (as Cut Cross-Entropy's), a number in (0, 1] or ``"auto"``
            (``torch.finfo(input.dtype).eps / 32``: 2**-12 for bf16, CCE's default threshold); ``None`` (the
            default): exact gradients. dz = dL/dlogits is cut into blocks of 16 rows x 32 classes (a fixed
            grid from row 0 of the flattened rows and class 0 of the head, the same on both backends);
            a block is dropped (its dz counted as 0, and on the Triton backend its dW/dX work skipped)
            when every softmax probability of its non-ignored rows is below ``filter_eps`` and none of
            those rows has its target among the block's classes. Off the target column dz = g*c*p with a
            per-row c (z-loss, focal, class weights, the soft-cap derivative all scale it), so a
            dropped entry has ``|dz| < |g*c|*filter_eps``. With a ``process_group`` the grid starts at each
            rank's first class, so a rank decides on its own part of a block and which entries are dropped can
            differ from the whole-vocabulary call (every dropped entry within the same bound). The loss is
            never affected. Not with
            ``label_smoothing`` (its term is not small where p is) nor with probability targets: a
            ValueError.
        return_lse: also return each row's log-sum-exp of its (soft-capped) logits, fp32 (fp64 for fp64
            inputs on the torch backend), in the unreduced loss's shape, as :func:`cross_entropy`'s
            ``return_lse`` gives it (e.g. to log a z-loss term or build one's own); it is differentiable
            (its gradient reaches ignored rows too) and the backward recomputes the logits, as with
            ``reduction="none"``. Not with ``filter_eps``. Where dz is a 16-bit tensor (fp16, and bf16 off
            the cuBLAS stages), one power-of-two scale serves both upstreams: a row whose only upstream is
            an lse one far below the loss's (an ignored row) keeps fewer of its bits.
        return_argmax: also return each row's predicted class without the logits: the first (lowest) class
            id holding the maximum of its (soft-capped) logits, as ``argmax`` of the materialised logits
            gives it (int64, in the unreduced loss's shape, for every row, ignored ones too; -1 where the
            row's log-sum-exp is not finite: a NaN or +inf logit, or none finite), e.g. for the token
            accuracy ``((pred == target) & (target != ignore_index)).sum() / (target != ignore_index).sum()``.
            Not differentiable, and the loss and gradients are the same bits as without it; the forward keeps
            a running argmax beside its running max (the Triton GEMM kernel), or reads each chunk of fp32
            logits once more for it (the cuBLAS stages of bf16 on CUDA, the torch backend), and the
            scalar-upstream fast path keeps it. With a ``process_group``, one MAX and one MIN all-reduce of N
            values more.
        return_entropy: also return each row's entropy ``-sum_j p_j log p_j`` of the softmax of its
            (soft-capped) logits without the logits (the per-token entropy an RL or fine-tuning loop logs or
            adds as a bonus), fp32 (fp64 for fp64 inputs on the torch backend), in the unreduced loss's shape,
            for every row, ignored ones too; a class of logit -inf adds nothing; NaN where the row's
            log-sum-exp is not finite. Not affected by the loss's options (smoothing, z-loss, focal, class
            weights). It is differentiable (its gradient reaches ignored rows too; the backward recomputes the
            logits, as with ``reduction="none"``). The forward keeps one more running sum beside the row's
            sum of exponentials (bf16 on CUDA then takes the Triton GEMM forward, not the cuBLAS stages, and
            16-bit inputs 16 warps or 64-row tiles, so the loss can differ from the call without it in the
            last bits; fp32's is the same bits). Not with ``filter_eps``; with a ``process_group`` one more
            column in the forward's SUM all-reduce (7N values), and not on the materialised paths there
            (probability targets, D = 0).
        validate: check class ids on CUDA too (a host sync); CPU targets are always checked. With a
            ``process_group``, also checks that every rank passes the same class ids and ``input`` (bit for
            bit; the row counts, input widths and dtypes, the scalar options and a hash of the class ids are
            checked in every call): one all-gather, broadcasts of rank 0's ids and input (N x D values) and one
            more all-gather.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        process_group: vocab-parallel (a tensor-parallel head): a ``torch.distributed`` group of P ranks, each holding a
            contiguous slice of the V classes in rank order (any sizes, even 0): ``linear_weight (V_r, D)``,
            ``linear_bias (V_r,)``, ``weight (V_r,)`` and probability targets ``(..., V_r)`` are this rank's slices;
            ``input`` is the same on every rank (replicated) and class ids are global and the same on every rank, as are
            the other arguments (the row counts, input widths and dtypes, the scalar options and a hash of the class ids
            are checked in every call, ``validate`` checks the ids and ``input``, bit for bit). Every rank returns the loss of the whole-vocabulary problem, every
            option keeping its meaning (smoothing over all V classes, focal, z-loss, softcap, class weights, the
            reductions); ``linear_weight``'s and ``linear_bias``'s gradients are this rank's rows of the whole gradient,
            and ``input``'s gradient is the whole one (summed over the ranks in the backward). Per call: the shard
            offsets (one all-gather of each rank's ``(vocab_start, V_r)``, its validate flag, id range, row count,
            input width and dtype, a CRC of its scalar options and a hash of its class ids: 10P ints, read on the host), one MAX all-reduce of
            N values and one SUM all-reduce of 6N values (7N with ``return_entropy``) in the forward, one SUM all-reduce of the N x D input gradient (in the input's dtype) in the backward: O(N +
            N*D), never O(N*V). The scalar-upstream path below is not used (its gradients need the whole row's
            statistics, known
            only after the forward's collectives): the backward recomputes the logits, as with ``reduction="none"`` (the
            Triton shortcut runs the same kernels, only earlier). Eager only (under ``torch.compile`` a graph break, as
            in :func:`cross_entropy`). A group of size 1 runs the same path. An argument error found on one rank only
            raises there and, on the others, an error naming that rank (no rank is left waiting in a collective). A head
            given as a DTensor sharded on its rows (``Shard(0)`` over a 1-D mesh; ``input`` replicated or a plain
            tensor, ``linear_bias``/``weight`` ``Shard(0)`` DTensors or local slices) uses the mesh's group and returns
            the loss (and the lse and argmax) as DTensors replicated on the mesh.
        vocab_start: this rank's first class id (with ``process_group``); computed from the slice sizes
            when not given. Give it on every rank or on none; given, the ranks' slices are checked to
            follow each other from 0 in rank order (from the same all-gather, on every call).
        reduce_input_grad: with ``process_group``: sum ``input``'s gradient over the ranks (the default).
            ``False`` leaves each rank this rank's part (for a framework whose column-parallel linear
            all-reduces it already, as Megatron's does; a plain tensor input only: a DTensor input raises).

    With ``reduction="mean"``/``"sum"`` and a gradient to form, the gradients are computed in the forward
    pass (for an upstream gradient of 1) and scaled by the actual upstream scalar in the backward, on
    device; with ``reduction="none"`` the backward recomputes the logits for any per-row upstream, and so
    does fp16 with every reduction (its gradients for an upstream of 1, ~|W| / N after a mean, would fall
    below fp16's normal range before a loss scaler's upstream scales them; the backward scales first). A
    non-finite upstream scalar scales the saved gradients with their exact zeros kept, as
    :func:`cross_entropy`'s fast path does (PyTorch's composite also has NaN where it forms inf - inf).

    Returns:
        The loss: fp32 (fp64 for fp64 inputs on the torch backend); ``reduction="none"`` gives
        ``input.shape[:-1]``. With ``return_lse``, ``return_argmax`` and/or ``return_entropy``, a tuple of the
        loss and those asked for, in that order: e.g. ``(loss, lse)``, ``(loss, argmax, entropy)`` or
        ``(loss, lse, argmax, entropy)``.
    """
    # _denom: private, as in cross_entropy (reduction="mean" over this denominator)
    op = "linear_cross_entropy"
    _validate.check_bool(op, return_lse=return_lse, return_argmax=return_argmax, return_entropy=return_entropy,
                         validate=validate, reduce_input_grad=reduce_input_grad)
    label_smoothing = _validate.torch_float_arg(label_smoothing)
    reduction = _validate.legacy_reduction(None, None, reduction)  # ("elementwise_mean", as PyTorch's)
    if any(_is_dtensor(t) for t in (input, linear_weight, linear_bias)):
        return _dtensor_lce(input, linear_weight, target, linear_bias, weight, dict(
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, options=options,
            label_smoothing_mode=label_smoothing_mode, focal_gamma=focal_gamma, z_loss=z_loss, softcap=softcap,
            chunk_size=chunk_size, filter_eps=filter_eps, return_lse=return_lse, return_argmax=return_argmax,
            return_entropy=return_entropy, validate=validate, backend=backend,
            process_group=process_group, vocab_start=vocab_start, reduce_input_grad=reduce_input_grad,
            _denom=_denom))
    sharded = process_group is not None
    if sharded:
        check_no_functorch(op, "process_group")
    if sharded and torch.compiler.is_dynamo_compiling():  # (not export's non-strict trace: it would recurse)
        return _vocab_parallel_runs_eagerly(
            linear_cross_entropy, input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, options=options,
            label_smoothing_mode=label_smoothing_mode, focal_gamma=focal_gamma, z_loss=z_loss, softcap=softcap,
            chunk_size=chunk_size, filter_eps=filter_eps, return_lse=return_lse, return_argmax=return_argmax,
            return_entropy=return_entropy, validate=validate, backend=backend,
            process_group=process_group, vocab_start=vocab_start, reduce_input_grad=reduce_input_grad,
            _denom=_denom)
    if vocab_start is not None and not sharded:
        raise InputError(f"{op}: vocab_start: only meaningful with a process_group, got {vocab_start!r} without one")
    if ignore_index is not None and isinstance(target, Tensor) and target.dtype.is_floating_point:
        raise InputError(f"{op}: ignore_index: cannot be given with probability targets (as "
                         f"F.linear_cross_entropy), got {ignore_index!r}")
    if ignore_index is None:
        ignore_index = -100  # F.linear_cross_entropy: None means -100 for class-id targets
    ignore_index = _validate.check_ignore_index(ignore_index, op)
    _validate.check_float(input, "input", op)
    _validate.check_float(linear_weight, "linear_weight", op)
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise InputError(f"{op}: filter_eps: expected a number in (0, 1], 'auto' or None, got {filter_eps!r}")
        filter_eps = torch.finfo(input.dtype).eps / 32
    _validate.check_tensor(target, "target", op)
    if input.dim() < 1:
        raise InputError(f"{op}: input: expected shape (..., D), got a 0-dim tensor")
    def ce_kwargs():  # cross_entropy's options for the paths that materialise the logits (their values then)
        return dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                    label_smoothing_mode=label_smoothing_mode, z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma,
                    return_lse=return_lse, return_argmax=return_argmax, return_entropy=return_entropy,
                    backend=backend, _denom=_denom, validate=validate)

    if linear_weight.dim() > 2:
        return _k_dim_head(input, linear_weight, target, linear_bias, weight, sharded, filter_eps, op, ce_kwargs())
    if linear_weight.dim() != 2:
        raise InputError(f"{op}: linear_weight: expected shape (V, D) or (C, d1, ..., dK, D), got "
                         f"{tuple(linear_weight.shape)}")
    Vn, D = linear_weight.shape
    if input.shape[-1] != D:
        raise InputError(f"{op}: input: expected last dim D={D} (linear_weight is {tuple(linear_weight.shape)}), "
                         f"got {tuple(input.shape)}")
    _check_bias(linear_bias, (Vn,), input, op)
    if weight is not None:
        _validate.check_class_weight(weight, Vn, input, op, allow_grad=target.is_floating_point(), group=sharded)
    same_options = None  # with a group: the scalar options every rank must pass alike (checked in every call)
    if sharded:
        same_options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            label_smoothing_mode=label_smoothing_mode, focal_gamma=focal_gamma, z_loss=z_loss,
                            softcap=softcap, filter_eps=filter_eps, reduce_input_grad=reduce_input_grad,
                            return_lse=return_lse, return_argmax=return_argmax, return_entropy=return_entropy,
                            weight=weight is not None, linear_bias=linear_bias is not None)
    if chunk_size is not None:
        chunk_size = _validate.as_int(chunk_size, "chunk_size", op, low=1, what="a positive int or None")
    if return_entropy and sharded and (target.dtype.is_floating_point or D == 0):
        raise InputError(f"{op}: return_entropy: not supported with a process_group (or a DTensor head) where the "
                         f"logits are materialised (probability targets, or input without features: D = 0)")
    if return_entropy and filter_eps is not None:
        raise InputError(f"{op}: filter_eps: not supported with return_entropy (the entropy's gradient reaches "
                         f"every row, ignored ones too, which the filter does not look at), got "
                         f"filter_eps={filter_eps}")
    if target.dtype.is_floating_point:  # probability targets: N x V already, so materialise the logits
        if filter_eps is not None:
            raise InputError(f"{op}: filter_eps: only with class-id targets, got filter_eps={filter_eps!r} with "
                             f"probability targets")
        if tuple(target.shape) != tuple(input.shape[:-1]) + (Vn,):
            raise InputError(f"{op}: target: probability targets must have shape "
                             f"{tuple(input.shape[:-1]) + (Vn,)}, got {tuple(target.shape)}")
        shard = None
        if sharded:  # the group checked here, under this op's name (and once)
            # every argument check first, as cross_entropy will make them on the logits (an error on one rank
            # must come before the collective the others wait in): on a stand-in for the logits, no memory
            probe = input.new_empty(()).expand(*input.shape[:-1], Vn)
            probe, probe_t = (probe.movedim(-1, 1), target.movedim(-1, 1)) if probe.dim() > 2 else (probe, target)
            _check_args(probe, probe_t, weight, ignore_index, reduction, label_smoothing, label_smoothing_mode,
                        "logits", focal_gamma, z_loss, softcap, None, op, sharded)
            resolve_backend(backend, input, op, inputs=(linear_weight, linear_bias), classes=Vn)
            shard = _shard_classes(Vn, process_group, vocab_start, input.device, op, math.prod(input.shape[:-1]),
                                   validate=validate, width=input.shape[-1], dtype=input.dtype,
                                   options=same_options)
            if validate:
                _check_ranks_agree(process_group, input.device, op, None, values=input)
        return _materialised(input, linear_weight, target, linear_bias, weight, process_group, reduce_input_grad,
                             ce_kwargs(), shard)
    _validate.check_int(target, "target", op)
    target = _validate.class_ids(target, ignore_index)
    _validate.check_reduction(reduction, op)
    _validate.check_option(label_smoothing_mode, "label_smoothing_mode", op, tuple(_SMOOTH_MODES))
    _validate.check_number(label_smoothing, "label_smoothing", op, low=0.0, high=1.0)
    if label_smoothing_mode == "gaussian" and label_smoothing == 1.0:
        raise InputError(f"{op}: label_smoothing: 'gaussian' mode needs label_smoothing < 1, got 1.0")
    _validate.check_number(focal_gamma, "focal_gamma", op, low=0.0, high=math.inf, high_inclusive=False)
    _validate.check_number(z_loss, "z_loss", op, low=0.0, high=math.inf, high_inclusive=False)
    _validate.check_number(softcap, "softcap", op, low=0.0, low_inclusive=False, allow_none=True)
    if softcap == math.inf:
        softcap = None  # tanh(x / inf) * inf is NaN; an infinite cap is no cap
    _validate.check_number(filter_eps, "filter_eps", op, low=0.0, low_inclusive=False, high=1.0, allow_none=True)
    if filter_eps is not None and return_lse:
        raise InputError(f"{op}: filter_eps: not supported with return_lse (the lse's gradient reaches every row, "
                         f"ignored ones too, which the filter does not look at), got filter_eps={filter_eps}")
    if filter_eps is not None and label_smoothing > 0:
        raise InputError(f"{op}: filter_eps: not supported with label_smoothing (its gradient term is not small "
                         f"where the softmax is), got filter_eps={filter_eps} with label_smoothing={label_smoothing}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise InputError(f"{op}: target: expected shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    if linear_weight.dtype != input.dtype:
        raise InputTypeError(f"{op}: linear_weight: expected dtype {input.dtype} (the input's), got "
                             f"{linear_weight.dtype}")
    _validate.check_same_device(input, linear_weight, "input", "linear_weight", op)
    _validate.check_same_device(input, target, "input", "target", op)
    use_triton = resolve_backend(backend, input, op, inputs=(linear_weight, linear_bias), classes=Vn)
    class_offset, V = 0, Vn
    if sharded:
        class_offset, V = _shard_classes(Vn, process_group, vocab_start, input.device, op, target.numel(), target,
                                         ignore_index, validate, input.shape[-1], input.dtype,
                                         same_options)
        if validate:
            _check_ranks_agree(process_group, input.device, op, None if target.dtype.is_floating_point else target,
                               values=input)
    if label_smoothing > 0 and label_smoothing_mode == "others" and V < 2:
        raise InputError(f"{op}: label_smoothing_mode: 'others' needs at least 2 classes, got V={V}")
    if not sharded and _validate.host_readable(target, validate):  # (sharded: _shard_classes checked them)
        _validate.check_index_range(target, "target", op, V, ignore_index=ignore_index)
    if D == 0:  # no features: the logits are the bias (or zeros), as F.linear_cross_entropy gives
        return _materialised(input, linear_weight, target, linear_bias, weight, process_group, reduce_input_grad,
                             ce_kwargs(), (class_offset, V) if sharded else None)
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
                   int(chunk_size or 0), float(filter_eps or 0.0), class_offset, V if sharded else 0)
    if sharded:
        xin = _ReduceGrad.apply(x2, process_group) if reduce_input_grad and x2.requires_grad else x2
        loss, lse, w_y, pred, ent = _VocabParallelLCE.apply(xin, w2, b2, t2, cw, o, process_group, use_triton,
                                                            return_argmax, return_entropy)
        count = (_mean_denominator(_denom, t2, cw, _tlce.ce_options(o), V, ct, x2.device, w_y)
                 if reduction == "mean" else None)
        return _outputs(reduce_loss(loss.reshape(input.shape[:-1]), reduction, count), input,
                        lse if return_lse else None, pred if return_argmax else None,
                        ent if return_entropy else None)
    count = _mean_denominator(_denom, t2, cw, _tlce.ce_options(o), Vn, ct, x2.device) if reduction == "mean" else None
    if Vn == 0:
        loss, lse = _no_classes(x2 @ w2.t(), t2, False, ignore_index)
        return _outputs(reduce_loss(loss.reshape(input.shape[:-1]), reduction, count), input,
                        lse if return_lse else None,
                        torch.full_like(t2, -1, dtype=torch.int64) if return_argmax else None,
                        torch.full_like(lse, math.nan) if return_entropy else None)
    need_dx = input.requires_grad
    need_dw = linear_weight.requires_grad or (linear_bias is not None and linear_bias.requires_grad)
    if (reduction != "none" and not (return_lse or return_entropy) and torch.is_grad_enabled() and (need_dx or need_dw)
            and x2.dtype != torch.float16 and not torch.compiler.is_exporting() and not functorch_active()):
        # one upstream scalar: the gradients are formed in the forward (no recomputed logits); not for fp16,
        # whose gradients for an upstream of 1 (dX ~ |W| / N after a mean) would fall below fp16's normal range
        # before a loss scaler's upstream (2**16) scales them: its backward scales before the one rounding. Not
        # in torch.export either: which gradients the forward forms would be fixed by the example inputs'
        # requires_grad, and the exported program is run with others (torch.compile guards on it). Nor under
        # torch.func, whose transforms take the gradient of the op's own forward
        out = _lce_fwd_grad(x2, w2, b2, t2, cw, count, *o, need_dx, need_dw, use_triton, return_argmax)
        return _outputs(out[0], input, None, out[4] if return_argmax else None)
    loss, stats, _, pred, ent = _lce_fwd(x2, w2, b2, t2, cw, *o, use_triton, return_argmax, return_entropy)
    return _outputs(reduce_loss(loss.reshape(input.shape[:-1]), reduction, count), input,
                    stats[:, 0] + stats[:, 1] if return_lse else None, pred if return_argmax else None,
                    ent if return_entropy else None)


def _outputs(out, input, lse=None, pred=None, ent=None):
    """The loss, or a tuple of it and the rows' lse, argmax and/or entropy (those given), in the unreduced
    loss's shape."""
    extra = tuple(t.reshape(input.shape[:-1]) for t in (lse, pred, ent) if t is not None)
    return (out, *extra) if extra else out


class LinearCrossEntropyLoss(_GroupState, _WeightedLoss):  # PyTorch's base class, so isinstance checks hold
    """A drop-in for :class:`torch.nn.LinearCrossEntropyLoss`: owns the head ``self.linear``
    (``nn.Linear(in_features, num_classes, bias=bias)``) and computes :func:`linear_cross_entropy` of
    ``forward(input, target)``; plus the tri_losses options (smoothing modes, focal, z-loss, softcap).
    ``out_features`` (PyTorch's K-dimensional heads: ``self.linear`` then has ``num_classes * d1 * ... * dK``
    rows, the loss the K-dimensional one of :func:`linear_cross_entropy`); ``options`` is accepted and unused;
    ``weight``'s shape and ``label_smoothing``'s range are checked at construction, as PyTorch's module does.
    With ``process_group`` (vocab-parallel, see :func:`linear_cross_entropy`; also ``vocab_start``,
    ``reduce_input_grad``), ``num_classes`` is this rank's slice of the vocabulary (the head's rows here);
    copying and pickling treat the group as :class:`~tri_losses.CrossEntropyLoss` does."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 label_smoothing_mode: str = "torch", focal_gamma: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 filter_eps: Union[float, str, None] = None, backend: str = "auto", process_group=None,
                 vocab_start: Optional[int] = None, reduce_input_grad: bool = True):
        super().__init__()
        op = "LinearCrossEntropyLoss"
        if not isinstance(out_features, (tuple, list)):
            raise InputTypeError(f"{op}: out_features: expected a tuple of ints, got {type(out_features).__name__}")
        for d in out_features:
            _validate.as_int(d, "out_features", op, low=0, what="a tuple of non-negative ints")
        # a K-dimensional head (C, d1, ..., dK) is one Linear of C * d1 * ... * dK rows, as PyTorch's module
        self.linear = torch.nn.Linear(in_features, num_classes * math.prod(out_features), bias=bias, device=device,
                                      dtype=dtype)
        self.num_classes, self.out_features = num_classes, out_features  # PyTorch's attributes (kept as given)
        # checked here as torch.nn.LinearCrossEntropyLoss checks them (the call checks them again, and the rest)
        _validate.check_number(_validate.torch_float_arg(label_smoothing), "label_smoothing", op, low=0.0, high=1.0)
        if weight is not None:
            _validate.check_tensor(weight, "weight", op)
            _validate.check_shape(weight, (num_classes,), "weight", op)
        self.register_buffer("weight", weight)
        self.reduction, self.ignore_index, self.label_smoothing, self.options = (reduction, ignore_index,
                                                                                 label_smoothing, options)
        self.kwargs = dict(label_smoothing_mode=label_smoothing_mode, focal_gamma=focal_gamma, z_loss=z_loss,
                           softcap=softcap, chunk_size=chunk_size, filter_eps=filter_eps, backend=backend,
                           process_group=process_group, vocab_start=vocab_start, reduce_input_grad=reduce_input_grad)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        w, b = self.linear.weight, self.linear.bias
        if self.out_features:  # PyTorch's K-dimensional head: (C, d1, ..., dK, D) and (C, d1, ..., dK)
            w = w.reshape(self.num_classes, *self.out_features, self.linear.in_features)
            b = b.reshape(self.num_classes, *self.out_features) if b is not None else None
        return linear_cross_entropy(input, w, target, linear_bias=b,
                                    weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing,
                                    **self._call_kwargs("LinearCrossEntropyLoss"))

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")
