"""Fused softmax cross-entropy: ``cross_entropy``, ``CrossEntropyLoss`` and ``frame_error``.

The per-row work runs in the custom op ``tri_losses::ce_fwd`` (backward ``tri_losses::ce_bwd``, or
``tri_losses::ce_bwd_inplace`` with ``inplace_backward=True``); the reduction runs on device in plain
torch ops. The training fast path (one scalar upstream gradient) is ``tri_losses::ce_fwd_grad`` (the
reduced loss and its gradient, formed in one pass; ``tri_losses::ce_fwd_grad_inplace`` writes the
gradient over the logits), whose backward is ``tri_losses::ce_scale_`` (in place) or
``tri_losses::ce_scale`` (a new tensor, when the graph is kept). With a ``process_group``
(vocab-parallel) the forward is ``tri_losses::ce_partial`` (this rank's per-row sums), two all-reduces
and the torch backend's row finish, in eager Python; the backward is ``ce_bwd`` with the whole row's
statistics (no collective). Losses are returned in float32 (float64 for float64 input on the torch
backend), whatever the input dtype.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import threading
from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.loss import _WeightedLoss

from . import _validate
from ._validate import InputError, InputIndexError, InputTypeError
from ._backend import (check_no_functorch, custom_op, device_guard, first_order, functorch_active, kernels,
                       resolve_backend)
from ._torch import compute_dtype, input_grads, loss_dtype, reduce_loss
from ._torch import cross_entropy as _tce
from ._torch.cross_entropy import CEOptions

__all__ = ["cross_entropy", "CrossEntropyLoss", "frame_error"]

_SMOOTH_MODES = {"torch": _tce.SMOOTH_TORCH, "others": _tce.SMOOTH_OTHERS, "gaussian": _tce.SMOOTH_GAUSSIAN}
_INPUT_TYPES = {"logits": _tce.IN_LOGITS, "log_probs": _tce.IN_LOG_PROBS, "probs": _tce.IN_PROBS}


# ----------------------------------------------------------------------------------------------
# custom ops: the options travel flat here (``*opts``: the schema has no structured types) and
# become one CEOptions value again inside each op body
# ----------------------------------------------------------------------------------------------
@custom_op("tri_losses::ce_fwd", mutates_args=(), rows=(0, 1))
def _ce_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], dense: bool, ignore_index: int,
            smoothing: float, smooth_mode: int, input_type: int, gamma: float, z_loss: float, softcap: float,
            upper_bound: float, class_offset: int, num_classes: int, inplace_backward: bool,
            use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    opts = CEOptions(dense, ignore_index, smoothing, smooth_mode, input_type, gamma, z_loss, softcap, upper_bound,
                     class_offset, num_classes)
    if not use_triton:
        return _tce.ce_fwd(logits, target, weight, opts)
    loss, lse, coef = _fwd_outputs(logits, use_triton)
    with device_guard(logits):
        kernels("cross_entropy").ce_fwd(logits, target, weight, opts, loss, lse, coef)
    return loss, lse, coef


@_ce_fwd.register_fake
def _(logits, target, weight, dense, ignore_index, smoothing, smooth_mode, input_type, gamma, z_loss, softcap,
      upper_bound, class_offset, num_classes, inplace_backward, use_triton):
    return _fwd_outputs(logits, use_triton)


@custom_op("tri_losses::ce_partial", mutates_args=())
def _ce_partial(logits: Tensor, target: Tensor, weight: Optional[Tensor], dense: bool, ignore_index: int,
                smoothing: float, smooth_mode: int, input_type: int, gamma: float, z_loss: float, softcap: float,
                upper_bound: float, class_offset: int, num_classes: int, use_triton: bool) -> Tensor:
    """The vocab-parallel forward's local half: per-row sums ``(N, 5)`` over this rank's classes
    (``(m, s, A, sum a (t - m), t_y - m)``, see ``tri_losses._torch.cross_entropy.ce_partial``)."""
    opts = CEOptions(dense, ignore_index, smoothing, smooth_mode, input_type, gamma, z_loss, softcap, upper_bound,
                     class_offset, num_classes)
    if not use_triton:
        return _tce.ce_partial(logits, target, weight, opts)
    part = logits.new_zeros(logits.shape[0], 5, dtype=torch.float32)
    with device_guard(logits):
        kernels("cross_entropy").ce_partial(logits, target, weight, opts, part)
    return part


@_ce_partial.register_fake
def _(logits, target, weight, *rest):
    return logits.new_empty(logits.shape[0], 5, dtype=loss_dtype(logits, rest[-1]))


def _fwd_outputs(logits, use_triton):
    """``loss (N,)``, ``lse (N,)`` and the per-row backward scalars ``coef``: (c1, c2, c3), plus lse's
    low part on Triton (its backward forms p as exp((x - lse) - lo)); the torch backend re-forms p
    from the row max instead."""
    N, ct = logits.shape[0], loss_dtype(logits, use_triton)
    return (logits.new_empty(N, dtype=ct), logits.new_empty(N, dtype=ct),
            logits.new_empty(N, 4 if use_triton else 3, dtype=ct))


@custom_op("tri_losses::ce_bwd", mutates_args=(), rows=(0, 1, 2, 3, 5, 6))
def _ce_bwd(grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
            weight: Optional[Tensor], lse: Tensor, coef: Tensor, dense: bool, ignore_index: int,
            smoothing: float, smooth_mode: int, input_type: int, gamma: float, z_loss: float, softcap: float,
            upper_bound: float, class_offset: int, num_classes: int, use_triton: bool) -> Tensor:
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    opts = CEOptions(dense, ignore_index, smoothing, smooth_mode, input_type, gamma, z_loss, softcap, upper_bound,
                     class_offset, num_classes)
    _ce_bwd_into(out, grad_loss, grad_lse, logits, target, weight, lse, coef, opts, use_triton)
    return out


@_ce_bwd.register_fake
def _(grad_loss, grad_lse, logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("tri_losses::ce_bwd_inplace", mutates_args=("logits",))
def _ce_bwd_inplace(grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
                    weight: Optional[Tensor], lse: Tensor, coef: Tensor, dense: bool, ignore_index: int,
                    smoothing: float, smooth_mode: int, input_type: int, gamma: float, z_loss: float,
                    softcap: float, upper_bound: float, class_offset: int, num_classes: int, use_triton: bool) -> None:
    opts = CEOptions(dense, ignore_index, smoothing, smooth_mode, input_type, gamma, z_loss, softcap, upper_bound,
                     class_offset, num_classes)
    _ce_bwd_into(logits, grad_loss, grad_lse, logits, target, weight, lse, coef, opts, use_triton)


@_ce_bwd_inplace.register_fake
def _(*args):
    return None


def _ce_bwd_into(out, grad_loss, grad_lse, logits, target, weight, lse, coef, opts, use_triton):
    if use_triton:
        with device_guard(logits):
            kernels("cross_entropy").ce_bwd(out, logits, target, weight, lse, coef, grad_loss, grad_lse, opts)
    else:
        _tce.ce_bwd(grad_loss, grad_lse, logits, target, weight, lse, coef, opts, out=out)


def _setup_context(ctx, inputs, output):
    logits, target, weight = inputs[:3]
    *flat, inplace_backward, use_triton = inputs[3:]
    _, lse, coef = output
    ctx.save_for_backward(logits, target, weight, lse, coef)
    ctx.opts = CEOptions(*flat)
    ctx.inplace, ctx.use_triton, ctx.n_inputs = inplace_backward, use_triton, len(inputs)
    ctx.mark_non_differentiable(coef)
    ctx.set_materialize_grads(False)  # no zero gradients for lse/coef when unused (the backward takes None)


def _target_grad(grad_loss, logits, target, weight, lse, opts):
    """d loss / d q for probability targets: ``-(1 - eps) * w_c * log p_c`` times the upstream (the
    smoothing mixes q' = (1 - eps) q + eps / C; focal is class-id only, the bound passes the gradient)."""
    ct = lse.dtype
    x = logits.to(ct)
    if opts.input_type == _tce.IN_LOGITS and opts.num_classes > 0:  # a shard of the classes: the whole lse
        logp = _tce._softcap(x, opts.softcap) - lse[:, None]
    elif opts.input_type == _tce.IN_LOGITS:
        logp = torch.log_softmax(_tce._softcap(x, opts.softcap), 1)  # from the row max, as the loss
    elif opts.input_type == _tce.IN_LOG_PROBS:
        logp = x
    else:
        logp = torch.log(torch.clamp(x, min=_tce.PROB_EPS))
    d = logp * (-(1.0 - opts.smoothing) * grad_loss.to(ct))[:, None]
    if weight is not None:
        d = d * weight.to(ct)
    return d.to(target.dtype)


@first_order("cross_entropy")
def _backward(ctx, grad_loss, grad_lse, grad_coef):
    logits, target, weight, lse, coef = ctx.saved_tensors
    opts = ctx.opts
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    if grad_lse is not None and opts.input_type != _tce.IN_LOGITS:
        grad_lse = None
    # probability targets that require grad (e.g. distillation): formed before an in-place backward
    dq = _target_grad(grad_loss, logits, target, weight, lse, opts) if opts.dense and ctx.needs_input_grad[1] \
        else None
    args = (grad_loss, grad_lse, logits, target, weight, lse, coef, *opts, ctx.use_triton)
    if ctx.inplace:
        _ce_bwd_inplace(*args)
        grad = logits
    else:
        grad = _ce_bwd(*args) if ctx.needs_input_grad[0] else None
    return input_grads(ctx.n_inputs, grad, dq)


_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# training fast path (one scalar upstream gradient): the gradient of the reduced loss for an upstream
# of 1 is formed in the forward (``ce_fwd_grad``: a new buffer; ``ce_fwd_grad_inplace``: the logits'
# own storage), and the backward only scales it by the upstream scalar, read on device
# ----------------------------------------------------------------------------------------------
@custom_op("tri_losses::ce_fwd_grad", mutates_args=())
def _ce_fwd_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], denom: Tensor, dense: bool,
                 ignore_index: int, smoothing: float, smooth_mode: int, input_type: int, gamma: float, z_loss: float,
                 softcap: float, upper_bound: float, class_offset: int, num_classes: int,
                 use_triton: bool) -> tuple[Tensor, Tensor]:
    """``(sum of the row losses / denom, its gradient w.r.t. the logits for an upstream of 1)``."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    opts = CEOptions(dense, ignore_index, smoothing, smooth_mode, input_type, gamma, z_loss, softcap, upper_bound,
                     class_offset, num_classes)
    return _fwd_grad_into(grad, logits, target, weight, denom, opts, use_triton), grad


@_ce_fwd_grad.register_fake
def _(logits, target, weight, denom, *rest):
    return (logits.new_empty((), dtype=loss_dtype(logits, rest[-1])),
            torch.empty_like(logits, memory_format=torch.contiguous_format))


@custom_op("tri_losses::ce_fwd_grad_inplace", mutates_args=("logits",))
def _ce_fwd_grad_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor], denom: Tensor, dense: bool,
                         ignore_index: int, smoothing: float, smooth_mode: int, input_type: int, gamma: float,
                         z_loss: float, softcap: float, upper_bound: float, class_offset: int, num_classes: int,
                         use_triton: bool) -> Tensor:
    """:func:`_ce_fwd_grad` writing the gradient over the logits (each row is read before it is written)."""
    opts = CEOptions(dense, ignore_index, smoothing, smooth_mode, input_type, gamma, z_loss, softcap, upper_bound,
                     class_offset, num_classes)
    return _fwd_grad_into(logits, logits, target, weight, denom, opts, use_triton)


@_ce_fwd_grad_inplace.register_fake
def _(logits, target, weight, denom, *rest):
    return logits.new_empty((), dtype=loss_dtype(logits, rest[-1]))


def _fwd_grad_into(out, logits, target, weight, denom, opts, use_triton):
    if use_triton:
        rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
        with device_guard(logits):
            kernels("cross_entropy").ce_fwd_grad(logits, out, target, weight, opts, rows, denom)
    else:
        rows = _tce.ce_fwd_grad(logits, target, weight, denom, opts, out)
    return reduce_loss(rows, "mean", denom)  # the sum over denom, as the exact path reduces


@custom_op("tri_losses::ce_scale", mutates_args=())
def _ce_scale(grad: Tensor, g: Tensor, use_triton: bool) -> Tensor:
    """``grad * g`` (``g``: the 0-dim upstream gradient, read on device) in fp32 with one rounding."""
    out = torch.empty_like(grad)
    _scale_into(grad, out, g, use_triton)
    return out


@_ce_scale.register_fake
def _(grad, g, use_triton):
    return torch.empty_like(grad)


@custom_op("tri_losses::ce_scale_", mutates_args=("grad",))
def _ce_scale_(grad: Tensor, g: Tensor, use_triton: bool) -> None:
    """``grad *= g`` in place; on Triton a no-op on device when ``g == 1`` (no host read)."""
    _scale_into(grad, grad, g, use_triton)


@_ce_scale_.register_fake
def _(grad, g, use_triton):
    return None


def _scale_into(src, dst, g, use_triton):
    if use_triton:
        with device_guard(src):
            kernels("cross_entropy").ce_scale(src, dst, g, dst is src)
    else:
        _tce.ce_scale(src, dst, g)


def _graph_released_after_this() -> bool:
    """Whether the running backward frees the graph afterwards (no ``retain_graph``/``create_graph``):
    only then may the saved gradient be scaled in place and handed to autograd, as nothing can run this
    node again. Unknown (a torch without the query): False, the copying form."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return query is not None and not query()


def _scaled_grad(grad, g, use_triton):
    """The fast path's backward: the saved unit-upstream gradient times the upstream scalar ``g``.

    Eager: when the graph is released after this call (no ``retain_graph``), in place (no new buffer;
    on Triton free when ``g == 1``) and handed to autograd as is; otherwise into a new tensor, so that
    the saved gradient stays intact for a later call and no tensor autograd has handed out is ever
    written again. Traced (``torch.compile``): the in-place op, which AOTAutograd functionalizes;
    Inductor then writes into the saved gradient only where it may (a donated buffer: such graphs
    refuse ``retain_graph``), else into a copy."""
    if torch.compiler.is_compiling() or _graph_released_after_this():
        _ce_scale_(grad, g, use_triton)
        return grad
    return _ce_scale(grad, g, use_triton)


def _setup_fast(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd zero-fills an (N, V) gradient for the saved gradient
    ctx.use_triton, ctx.n_inputs = inputs[-1], len(inputs)


@first_order("cross_entropy")
def _backward_fast(ctx, grad_loss, grad_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:  # grads are not materialised: an unused loss is a zero upstream
        grad_loss = grad.new_zeros((), dtype=torch.float32)
    return input_grads(ctx.n_inputs, _scaled_grad(grad, grad_loss, ctx.use_triton))


_ce_fwd_grad.register_autograd(_backward_fast, setup_context=_setup_fast)


class _FastInplaceCE(torch.autograd.Function):
    """The fast path with ``inplace_backward=True`` (eager only): the forward overwrites the logits with
    the gradient (the caller gave them up), the backward scales them in place and returns them."""

    @staticmethod
    def forward(ctx, x2, t2, w, denom, opts, use_triton):
        loss = _ce_fwd_grad_inplace(x2, t2, w, denom, *opts, use_triton)
        ctx.save_for_backward(x2)  # now the gradient (saved after the write: its version matches)
        ctx.use_triton = use_triton
        return loss

    @staticmethod
    @first_order("cross_entropy")
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return input_grads(6, _scaled_grad(grad, grad_loss, ctx.use_triton))


# ----------------------------------------------------------------------------------------------
# vocab-parallel: the local sums in ``tri_losses::ce_partial``, two O(N) all-reduces here, the
# finish in the torch backend's code, the backward in ``ce_bwd`` (local: no collective)
# ----------------------------------------------------------------------------------------------
class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, t2, w, opts, group, inplace, use_triton):
        part = _ce_partial(x2, t2, w, *opts, use_triton)
        loss, lse, coef, w_y, _ = _combine_shards(part, x2.shape[1], t2, w, opts, group, use_triton)
        ctx.save_for_backward(x2, t2, w, lse, coef)
        ctx.opts, ctx.inplace, ctx.use_triton, ctx.n_inputs = opts, inplace, use_triton, 3
        ctx.mark_non_differentiable(w_y)
        ctx.set_materialize_grads(False)
        return loss, lse, w_y

    @staticmethod
    @first_order("cross_entropy")
    def backward(ctx, grad_loss, grad_lse, grad_w_y):
        return _backward(ctx, grad_loss, grad_lse, None) + (None,) * 4


def _combine_shards(part, C, t2, w, opts, group, use_triton):
    """Whole-row loss, lse and backward coefficients from each rank's ``part = (m, s, A, B, t_y - m)``
    (see ``tri_losses::ce_partial``): one MAX all-reduce of the row max, one SUM all-reduce of an
    (N, 6) tensor. Also returns the target's class weight per row (for the mean), and the row's softmax
    entropy where ``part`` has a sixth column ``q = sum exp(z - m) (z - m)`` (``linear_cross_entropy``'s
    return_entropy: then (N, 7) are summed; else None)."""
    import torch.distributed as dist
    m, s, A, B, t_ym = part[:, :5].unbind(1)
    q = part[:, 5] if part.shape[1] > 5 else None
    ct = part.dtype
    if opts.dense:
        owned = torch.zeros_like(A, dtype=torch.bool)
        w_y = torch.zeros_like(A)
    else:
        local = t2 - opts.class_offset
        owned = (local >= 0) & (local < C)
        w_y = owned.to(ct)
        if w is not None and C > 0:
            w_y = torch.where(owned, w.to(ct)[local.clamp(0, C - 1).long()], 0.0)
    if opts.input_type == _tce.IN_LOGITS:
        m_all = torch.where(s != 0, m, -math.inf)  # s = 0: no finite logit here (or no columns)
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        m_all = torch.where(m_all == -math.inf, 0.0, m_all)
        shift = m - m_all  # re-base every sum on the whole row's max
        alpha = torch.exp(shift)
        if q is not None:  # q + s * shift, re-based: the rank's q relative to the whole row's max
            q = torch.where(s != 0, (q + s * shift) * alpha, 0.0)
        s = torch.where(s != 0, s * alpha, 0.0)
        B = B + torch.where(A != 0, A * shift, 0.0)
        t_ym = torch.where(owned, t_ym + shift, 0.0)
    else:
        m_all = torch.zeros_like(A)
    packed = torch.stack((s, B, A, t_ym, owned.to(ct), w_y) + ((q,) if q is not None else ()), 1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    s, B, A, t_ym, n_owners, w_y = packed[:, :6].unbind(1)
    ent = torch.log(s) - packed[:, 6] / s if q is not None else None
    log_s = torch.log(s) if opts.input_type == _tce.IN_LOGITS else s
    ignored, _ = _tce.row_status(t2, opts, C)
    bad = ~ignored & (n_owners == 0) if not opts.dense else ignored  # a class id outside every shard
    loss, lse, c1, c2, c3 = _tce.ce_finish(A, B, m_all, log_s, t_ym, ignored, bad, opts)
    if use_triton:  # the kernel's backward forms p = exp((x - lse) - lo): lse's low part (two-sum)
        bb = lse - m_all
        lo = (m_all - (lse - bb)) + (log_s - bb)
        coef = torch.stack((c1, c2, c3, torch.where(lo == lo, lo, 0.0)), 1)
    else:  # the torch backend's backward forms p = exp((x - m) - log s)
        coef = torch.stack((c1, c2, c3, m_all, log_s), 1)
    return loss, lse, coef, w_y, ent


_RANK_FAILED = -3  # a rank's (vocab_start, C) entry in _shard_classes: its call failed before that collective
_SHARD_FIELDS = 10  # the int64 values per rank in _shard_classes' all-gather (a failed rank's entry has as many)
_COLLECTIVES = threading.local()  # .calls: how many _shard_classes all-gathers this thread has joined


def _errors_reach_every_rank(*dtensor_params):
    """Decorator (``dtensor_params``: the (name, position or None) of the arguments whose DTensor the op
    dispatches on). For a call with a ``process_group``: an exception raised on this rank before the call's first
    collective (an argument only this rank got wrong, e.g. a class-weight slice of the wrong length) would
    leave the other ranks waiting in that collective until the group's timeout. The rank joins it instead,
    with a "failed" entry, and raises its own error; every other rank then raises an error naming it (see
    :func:`_shard_classes`). A DTensor call's group is its mesh's. Nothing is added to a call without a
    group, or whose shard the caller gives (``_shard``: its first collective has already run), or traced by
    Dynamo (fn reruns such a call eagerly, through this wrapper)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            group = kwargs.get("process_group")
            if group is None:  # a DTensor the op dispatches on (1-D mesh) brings its mesh's group
                for name, at in dtensor_params:
                    mesh = getattr(args[at] if at is not None and at < len(args) else kwargs.get(name),
                                   "device_mesh", None)
                    if mesh is not None and mesh.ndim == 1:
                        group = mesh.get_group()
                        break
            if group is None or kwargs.get("_shard") is not None or torch.compiler.is_dynamo_compiling():
                return fn(*args, **kwargs)  # (a compiled call with a group reruns eagerly: see fn)
            joined = getattr(_COLLECTIVES, "calls", 0)
            try:
                return fn(*args, **kwargs)
            except Exception:
                if getattr(_COLLECTIVES, "calls", 0) == joined:
                    _join_as_failed(group, [*args, *kwargs.values()])
                raise
        return call
    return wrap


def _join_as_failed(group, args):
    """Join :func:`_shard_classes`'s all-gather with a "failed" entry, best effort (without a process group
    the error stays this rank's alone). The entry goes on the first tensor argument's device (the input's,
    where it is one; for an NCCL group the first CUDA argument's, else the current CUDA device), else on the
    CPU."""
    import torch.distributed as dist
    if not isinstance(group, dist.ProcessGroup):
        return
    _COLLECTIVES.calls = getattr(_COLLECTIVES, "calls", 0) + 1
    try:
        devices = [a.device for a in args if isinstance(a, Tensor) and a.device.type != "meta"]
        if dist.get_backend(group) == "nccl":  # a CUDA device: the first CUDA argument's, else the current one
            device = next((d for d in devices if d.type == "cuda"), torch.device("cuda", torch.cuda.current_device()))
        else:
            device = devices[0] if devices else torch.device("cpu")
        mine = torch.tensor([_RANK_FAILED] + [0] * (_SHARD_FIELDS - 1), dtype=torch.int64, device=device)
        dist.all_gather([torch.empty_like(mine) for _ in range(dist.get_world_size(group))], mine, group=group)
    except Exception:  # noqa: BLE001 - the rank's own error is the one to raise
        pass


_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _shard_classes(C, group, vocab_start, device, op, rows, ids=None, ignore_index=-100, validate=False, width=0,
                   dtype=None, options=None):
    """``(class_offset, V)`` of this rank's slice of the classes, from one all-gather of every rank's
    ``(vocab_start or -1, C, validate, lo, hi, rows, width, dtype, options, ids' hash)`` (10P ints, read on the
    host: the kernels take them as scalars), ``lo``/``hi`` the smallest and largest of this rank's class ``ids``
    other than ``ignore_index`` where they are on the host (else nothing: 0, -1), ``rows`` this rank's row count,
    ``width`` linear CE's input width D (0 for cross_entropy), ``dtype`` the input's (a code), ``options`` the
    call's scalar options (a dict, as a CRC-32 of its repr), the hash :func:`_ids_hash` of the class ids (formed
    on their device, 0 without ids). One collective whether ``vocab_start`` is given or not, so a rank that gives
    it beside one that does not gets an error, as every rank does; given starts are checked to tile ``[0, V)``
    in rank order, ids to lie in ``[0, V)``, and ``validate``, the row counts, the widths, the input dtypes, the
    options and the ids to agree, on every rank alike (free: the values are on the host already; ranks holding
    different rows, inputs of another dtype (a float64 input makes float64 collectives) or other options
    (another input type, return_argmax's or reduce_input_grad's collectives) would otherwise meet in the loss's
    collectives, and inputs of different widths in linear CE's input-gradient all-reduce, with tensors of
    different sizes or counts: a hang until the group's timeout, or a process aborted by gloo; other ids, e.g.
    a data loader seeded per rank, a silently wrong loss)."""
    import zlib
    import torch.distributed as dist
    if not isinstance(group, dist.ProcessGroup):
        raise InputTypeError(f"{op}: process_group: expected a torch.distributed ProcessGroup, got "
                             f"{type(group).__name__}")
    error = None
    if vocab_start is not None:
        try:
            vocab_start = _validate.as_int(vocab_start, "vocab_start", op, low=0, what="a non-negative int")
        except (InputError, InputTypeError) as e:  # raised after the all-gather, which the other ranks wait in
            error, vocab_start = e, -2
    lo, hi = 0, -1
    if ids is not None and ids.numel() and _validate.host_readable(ids, validate):
        kept = ids.reshape(-1).long()
        kept = kept[kept != ignore_index]
        if kept.numel():
            lo, hi = int(kept.min()), int(kept.max())
    crc = zlib.crc32(repr(sorted((k, _option_value(v)) for k, v in (options or {}).items())).encode())
    mine = torch.cat([torch.tensor([-1 if vocab_start is None else vocab_start, C, bool(validate), lo, hi, rows, width,
                                    _DTYPE_CODES.get(dtype, 0), crc], dtype=torch.int64, device=device),
                      _ids_hash(ids, device)])
    got = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _COLLECTIVES.calls = getattr(_COLLECTIVES, "calls", 0) + 1
    dist.all_gather(got, mine, group=group)
    rows = torch.stack(got).tolist()
    slices = [tuple(r[:2]) for r in rows]
    if error is not None:
        raise error
    failed = [r for r, (start, _) in enumerate(slices) if start == _RANK_FAILED]
    if failed:
        raise InputError(f"{op}: ranks {failed} of process_group rejected their arguments (each raises its own "
                         f"error); this rank stops too rather than wait for them")
    checked = [r for r, row in enumerate(rows) if row[2]]
    if checked and len(checked) < len(rows):
        raise InputError(f"{op}: validate: every rank of process_group must pass the same validate, got True on "
                         f"ranks {checked} of {len(rows)}")
    if len({row[5] for row in rows}) > 1:
        raise InputError(f"{op}: input: every rank of process_group must hold the same rows, got row counts "
                         f"{[row[5] for row in rows]} by rank")
    if len({row[6] for row in rows}) > 1:
        raise InputError(f"{op}: input: every rank of process_group must hold the same (replicated) input, got "
                         f"widths D {[row[6] for row in rows]} by rank")
    if len({row[7] for row in rows}) > 1:
        names = {code: str(dt).replace("torch.", "") for dt, code in _DTYPE_CODES.items()}
        raise InputTypeError(f"{op}: input: every rank of process_group must pass the same input dtype, got "
                             f"{[names.get(row[7], '?') for row in rows]} by rank")
    differ = _ranks_unlike_rank0(rows, 8)
    if differ:
        raise InputError(f"{op}: every rank of process_group must pass the same options "
                         f"({', '.join(options or {})}); ranks {differ} differ from rank 0, this rank has {options}")
    invalid = [r for r, (start, _) in enumerate(slices) if start == -2]
    if invalid:
        raise InputError(f"{op}: vocab_start: ranks {invalid} of process_group passed an invalid vocab_start")
    given = [r for r, (start, _) in enumerate(slices) if start >= 0]
    offsets = [0]
    for _, size in slices:
        offsets.append(offsets[-1] + size)
    if given and len(given) < len(slices):
        raise InputError(f"{op}: vocab_start: pass it on every rank of process_group or on none, got it on ranks "
                         f"{given} of {len(slices)}")
    if given and [start for start, _ in slices] != offsets[:-1]:
        raise InputError(f"{op}: vocab_start: the ranks' class slices must follow each other from 0 in rank order "
                         f"without gaps or overlaps, got (start, size) by rank {slices}")
    V = offsets[-1]
    outside = [r for r, row in enumerate(rows) if row[3] <= row[4] and (row[3] < 0 or row[4] >= V)]
    if outside:
        if dist.get_rank(group) in outside:  # this rank's own message names the id
            _validate.check_index_range(ids, "target", op, V, ignore_index=ignore_index)
        raise InputIndexError(f"{op}: target: ranks {outside} of process_group passed class ids outside [0, {V}) "
                              f"(or ignore_index={ignore_index})")
    differ = _ranks_unlike_rank0(rows, 9)
    if differ:
        raise InputError(f"{op}: target: every rank of process_group must pass the same (global) class ids, got "
                         f"other ids than rank 0's on ranks {differ} (a hash of them, checked in every call)")
    return offsets[dist.get_rank(group)], V


def _ranks_unlike_rank0(rows, field):
    """The ranks whose ``field`` of the shard all-gather differs from rank 0's (empty: all agree)."""
    return [r for r, row in enumerate(rows) if row[field] != rows[0][field]]


def _ids_hash(ids, device):
    """(1,) int64 on ``device``: a position-dependent 64-bit hash of the class ids (0 without them), one
    reduction on their device (no host read: the all-gather that carries it is read). Each (id, position)
    pair goes through a non-linear 64-bit mixer (xor-shifts and multiplications, SplitMix64's finaliser) and
    the results are summed modulo 2**64 (integer sums: the same on every device and in any order); a sum of
    terms linear in the ids would miss changes that keep their sum and position-weighted sum."""
    if ids is None:
        return torch.zeros(1, dtype=torch.int64, device=device)
    flat = ids.reshape(-1).to(device=device, dtype=torch.int64)
    h = flat * -7046029254386353131 + torch.arange(flat.numel(), device=device, dtype=torch.int64)  # (wraps)
    for shift, mult in ((30, -4658895280553007687), (27, -7723592293110705685), (31, None)):
        h = h ^ ((h >> shift) & ((1 << (64 - shift)) - 1))  # (a logical shift)
        if mult is not None:
            h = h * mult
    return h.sum().reshape(1)


def _option_value(v):
    """An option's value as the ranks compare it: equal numbers of other Python or NumPy types alike (0 and
    0.0, a NumPy float and a float, a 0-dim tensor and its item) and an infinite cap or bound as none."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (RuntimeError, ValueError):  # (not one value: its repr)
            return repr(v)
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        v = float(v)
        return None if v == math.inf else v
    return v


def _check_ranks_agree(group, device, op, ids=None, values=None):
    """validate=True (after :func:`_shard_classes`, which checked the row counts, dtypes and scalar options):
    given the class-id targets ``ids``, every rank must pass the same ids, and given ``values``
    (linear_cross_entropy's replicated input), the same shape and bits: one all-gather of (has ids, values'
    shape CRC), then rank 0's ids and values broadcast and compared exactly on each rank (bit for
    bit: NaNs agree where their bits do, -0.0 is not 0.0), one all-gather of the verdicts (host reads; validate
    is opt-in)."""
    import zlib

    import torch.distributed as dist
    world = dist.get_world_size(group)
    vcrc = zlib.crc32(repr(tuple(values.shape)).encode()) if values is not None else 0
    mine = torch.tensor([ids is not None, vcrc], dtype=torch.int64, device=device)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    got = [tuple(g) for g in torch.stack(got).tolist()]
    if len({g[0] for g in got}) > 1:
        raise InputError(f"{op}: target: every rank of process_group must pass the same kind of target, got "
                         f"class ids on ranks {[r for r, g in enumerate(got) if g[0]]} and probabilities on the "
                         f"others")
    if len({g[1] for g in got}) > 1:
        differ = [r for r, g in enumerate(got) if g[1] != got[0][1]]
        raise InputError(f"{op}: input: every rank of process_group must pass the same (replicated) input; ranks "
                         f"{differ} differ from rank 0 in shape, this rank has {tuple(values.shape)}")
    checks = []  # (name, this rank's tensor): compared with rank 0's
    if ids is not None:
        checks.append(("target", ids.reshape(-1).to(device=device, dtype=torch.int64)))
    if values is not None:
        checks.append(("input", values.detach().contiguous().reshape(-1).view(torch.int8).to(device)))  # bytes
    if not checks:
        return
    same = []
    for _, t in checks:
        first = t.clone()
        dist.broadcast(first, src=dist.get_global_rank(group, 0), group=group)
        same.append(int(torch.equal(t, first)))
    same = torch.tensor(same, dtype=torch.int64, device=device)
    verdicts = [torch.empty_like(same) for _ in range(world)]
    dist.all_gather(verdicts, same, group=group)
    verdicts = torch.stack(verdicts).tolist()
    for i, (name, _) in enumerate(checks):
        differ = [r for r, v in enumerate(verdicts) if not v[i]]
        if differ:
            what = "(global) class ids" if name == "target" else "input values (replicated)"
            raise InputError(f"{op}: {name}: every rank of process_group must pass the same {what}; ranks "
                             f"{differ} differ from rank 0")


@torch.compiler.disable
def _vocab_parallel_runs_eagerly(fn, *args, **kwargs):
    """A call with a ``process_group`` runs eagerly (it reads the shard sizes on the host and waits on
    collectives): under ``torch.compile`` a graph break, so ``fullgraph=True`` fails naming this function."""
    return fn(*args, **kwargs)


def _dtensor_call(op, sharded, name, what, where, dim, kwargs, run):
    """The DTensor path of the vocab-parallel ops: ``sharded`` (the argument ``name``, "a DTensor
    ``what``") must be sharded on ``dim`` (``where``, e.g. "its class dim") over a 1-D mesh, and no
    process_group given with it. ``run(local, group)`` computes on local tensors over the mesh's group
    (``local(t, placement)``: a DTensor redistributed to ``placement`` and made local, anything else as
    it is); its output (a tensor or a tuple) comes back as DTensors replicated on the mesh."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    mesh = sharded.device_mesh
    if mesh.ndim != 1 or sharded.placements[0] != Shard(dim):
        raise InputError(f"{op}: {name}: a DTensor {what} must be sharded on {where} (Shard({dim})) over a 1-D mesh, "
                         f"got placements {tuple(sharded.placements)} on a {mesh.ndim}-D mesh")
    if kwargs.get("process_group") is not None:
        raise InputError(f"{op}: process_group: a DTensor {what} brings its mesh's group; got one too")

    def local(t, placement):
        return t.redistribute(mesh, [placement]).to_local() if isinstance(t, DTensor) else t

    out = run(local, mesh.get_group())
    wrap = lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False)  # noqa: E731
    return tuple(wrap(t) for t in out) if isinstance(out, tuple) else wrap(out)


def _dtensor_ce(input, target, weight, kwargs):
    """A DTensor input sharded on the class dim: compute on the local shard over the mesh's group and
    return the loss (and lse) as DTensors replicated on the mesh."""
    from torch.distributed.tensor import Replicate, Shard
    class_dim = 0 if input.dim() == 1 else 1

    def run(local, group):
        # probability targets: this rank's slice of the classes; class ids: every row
        tgt = local(target, Shard(class_dim) if target.dtype.is_floating_point else Replicate())
        return cross_entropy(input.to_local(), tgt, local(weight, Shard(0)),
                             **dict(kwargs, process_group=group))
    return _dtensor_call("cross_entropy", input, "input", "input", "its class dim", class_dim, kwargs, run)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _to_rows(input: Tensor, target: Tensor, dense: bool):
    """(C) / (N, C) / (N, C, d1..dk) -> (rows, C) logits and (rows,) or (rows, C) targets."""
    C = input.shape[-1] if input.dim() == 1 else input.shape[1]
    if input.dim() == 1:
        x2 = input.unsqueeze(0)
        t2 = target.unsqueeze(0) if dense else target.reshape(1)
    elif input.dim() == 2:
        x2, t2 = input, target
    else:
        rows = math.prod(input.shape[:1] + input.shape[2:])  # explicit: C may be 0 (a shard without classes)
        x2 = input.movedim(1, -1).reshape(rows, C)
        t2 = target.movedim(1, -1).reshape(rows, C) if dense else target.reshape(-1)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if dense and t2.shape[0] and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return x2, t2, C


def _no_classes(x2, t2, dense, ignore_index):
    """C = 0 (as PyTorch): a row's loss is 0 if it is ignored (or dense), else NaN; zero gradients."""
    ct = compute_dtype(x2)
    loss = x2.sum(-1).to(ct) * 0.0  # zeros that keep the autograd graph
    if not dense:
        loss = loss + torch.where(t2 == ignore_index, 0.0, math.nan).to(ct)
    return loss, torch.full_like(loss, -math.inf).detach()


def _hide_private_params(fn):
    """Drop ``fn``'s keyword parameters named ``_...`` from its reported signature (``inspect.signature``,
    ``help``, docs/api.md): they are internal channels between this package's modules, not API."""
    sig = inspect.signature(fn)
    fn.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if not p.name.startswith("_")])
    return fn


def _mean_denominator(denom, t2, w, opts, C, dtype, device, w_y=None):
    """The mean's denominator as the 0-dim ``dtype`` tensor on ``device`` the reductions divide by (no host
    read): the caller's ``denom`` when given (a number, or a tensor on any device, e.g. ``tri_losses.hf``'s
    ``num_items_in_batch``), else PyTorch's (:func:`_mean_count`); ``w_y`` (a class shard with class
    weights): each row's target weight, gathered from the owning ranks."""
    if denom is not None:  # the caller's: sum / denom whatever it is (sum / 0 = inf, as transformers' own)
        if torch.is_tensor(denom):
            return denom.to(device=device, dtype=dtype).reshape(())
        return torch.full((), denom, dtype=dtype, device=device)
    if w_y is not None and w is not None and not opts.dense:
        d = torch.where(t2 != opts.ignore_index, w_y, 0.0).sum()
    else:
        d = _mean_count(t2, w, opts, C, dtype)
        if not torch.is_tensor(d):  # a row count known on the host
            return torch.full((), d if d else math.nan, dtype=dtype, device=device)
    d = d.to(device=device, dtype=dtype).reshape(())
    if w is None:  # no rows counted: every row ignored, its loss 0, so the mean is 0/0 = NaN already
        return d
    # class weights summing to 0: NaN, as PyTorch's 0/0, also when label smoothing's term (PyTorch:
    # ... + eps * x/0) would make the sum nonzero
    return torch.where(d == 0, math.nan, d)


def _mean_count(t2, w, opts, C, dtype):
    """The mean's denominator (PyTorch's): all rows for probability targets (none when there are no
    classes: PyTorch's mean of an empty input is NaN), else the non-ignored rows, or their summed class
    weights ``sum w_y``."""
    if opts.dense:
        return t2.shape[0] if C else 0
    valid = t2 != opts.ignore_index
    if w is None:
        return valid.sum().to(dtype)
    wy = w.to(dtype)[t2.clamp(0, max(C - 1, 0)).long()] if C else torch.zeros(t2.shape, dtype=dtype, device=t2.device)
    return torch.where(valid, wy, 0.0).sum()


def _check_args(input, target, weight, ignore_index, reduction, label_smoothing, label_smoothing_mode, input_type,
                focal_gamma, z_loss, softcap, fake_upper_bound, op, sharded=False):
    _validate.check_float(input, "input", op)
    _validate.check_tensor(target, "target", op)
    _validate.check_reduction(reduction, op)
    _validate.check_option(label_smoothing_mode, "label_smoothing_mode", op, tuple(_SMOOTH_MODES))
    _validate.check_option(input_type, "input_type", op, tuple(_INPUT_TYPES))
    _validate.check_number(label_smoothing, "label_smoothing", op, low=0.0, high=1.0)
    if label_smoothing_mode == "gaussian" and label_smoothing == 1.0:
        raise InputError(f"{op}: label_smoothing: 'gaussian' mode needs label_smoothing < 1 (sigma = "
                         f"1 - label_smoothing > 0), got 1.0")
    _validate.check_number(focal_gamma, "focal_gamma", op, low=0.0, high=math.inf, high_inclusive=False)
    _validate.check_number(z_loss, "z_loss", op, low=0.0, high=math.inf, high_inclusive=False)
    _validate.check_number(softcap, "softcap", op, low=0.0, low_inclusive=False, allow_none=True)
    _validate.check_number(fake_upper_bound, "fake_upper_bound", op, allow_none=True)
    _validate.check_ignore_index(ignore_index, op)
    if input.dim() == 0:
        raise InputError(f"{op}: input: expected shape (C), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    if input_type != "logits":
        for name, val, off in (("z_loss", z_loss, 0.0), ("softcap", softcap, None)):
            if val != off:
                raise InputError(f"{op}: {name}: only defined for input_type='logits', got {name}={val} with "
                                 f"input_type={input_type!r}")
    dense = target.dtype.is_floating_point
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    id_shape = _id_shape(input)
    if dense:
        if target.shape != input.shape:
            hint = ("; class ids must be an integer tensor: cast them with target.long()"
                    if tuple(target.shape) == id_shape or tuple(target.shape) == tuple(input.shape[:-1]) else "")
            raise InputError(f"{op}: target: probability targets must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)} {target.dtype}{hint}")
        if focal_gamma != 0.0:
            raise InputError(f"{op}: focal_gamma: focal loss needs class-index targets, got probability targets "
                             f"(focal_gamma={focal_gamma})")
        if label_smoothing > 0 and label_smoothing_mode != "torch":
            raise InputError(f"{op}: label_smoothing_mode: probability targets support only 'torch', got "
                             f"{label_smoothing_mode!r}")
        if ignore_index >= 0:  # as PyTorch: a negative one is accepted and has no effect
            raise InputError(f"{op}: ignore_index: not supported for probability targets (PyTorch accepts only "
                             f"a negative value, which has no effect), got {ignore_index}")
    else:
        _validate.check_int(target, "target", op)
        _check_id_shape(input, target, op)
        if label_smoothing > 0 and label_smoothing_mode == "others" and C < 2 and not sharded:
            raise InputError(f"{op}: label_smoothing_mode: 'others' needs at least 2 classes, got C={C}")
    _validate.check_same_device(input, target, "input", "target", op)
    if weight is not None:  # (differentiable weights with probability targets come here only with a group)
        _validate.check_class_weight(weight, C, input, op, allow_grad=dense, group=sharded)
    return dense, C




def _id_shape(input):
    return () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])


def _check_id_shape(input, target, op):
    """Class-id targets: shape ``()`` (or ``(1,)``, as PyTorch takes it) for a ``(C)`` input, else ``(N, d1, ...)``
    (classes in dim 1)."""
    expected = _id_shape(input)
    if tuple(target.shape) != expected and not (input.dim() == 1 and tuple(target.shape) == (1,)):  # as PyTorch
        hint = ""
        if input.dim() >= 3 and tuple(target.shape) == tuple(input.shape[:-1]):
            hint = ("; for (B, T, C) logits with (B, T) targets, flatten them (input.flatten(0, -2), "
                    "target.flatten()), or put the classes in dim 1 (input.transpose(1, -1))")
        raise InputError(f"{op}: target: expected shape {expected} for input of shape {tuple(input.shape)} "
                         f"(classes in dim 1), got {tuple(target.shape)}{hint}")


def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return False
    return isinstance(x, DTensor)


def _fast_path(x2, t2, dense, reduction, sharded, C, return_lse) -> bool:
    """Whether this call takes the training fast path: the input's gradient is wanted and the upstream
    gradient is one scalar (``reduction`` mean/sum). Not with a ``process_group`` (a rank knows the whole
    row's lse only after the forward's all-reduces), ``return_lse`` (an lse gradient needs the
    probabilities again), probability targets that require grad (their gradient needs log p), no classes,
    or fp16 logits: the gradient for an upstream of 1 held in fp16 loses its entries below fp16's normal
    range (p / N after a mean) before a loss scaler's upstream (2**16) scales them up; the exact path
    rounds the scaled gradient once. (bf16 has fp32's range: an upstream of 1 or a power of two scales
    it exactly.)"""
    return (reduction != "none" and not sharded and not return_lse and C > 0 and torch.is_grad_enabled()
            and x2.requires_grad and not (dense and t2.requires_grad) and x2.dtype != torch.float16
            and not functorch_active())


def _can_overwrite(x2: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether the logits ``x2`` (unit column stride, (N, C)) can hold their own gradient: their rows
    occupy distinct memory (not an expanded tensor, whose stride-0 rows share one row), and no other
    argument (probability targets, class weights) lies in their storage, which the in-place backward
    would overwrite while it still reads that argument."""
    if not (x2.shape[0] <= 1 or x2.stride(0) >= x2.shape[1]):
        return False
    if not _validate.has_values(x2):  # fake tensors (FakeTensorMode, make_fx) have no storage to compare
        return False
    storage = x2.untyped_storage().data_ptr()
    return all(o is None or o.untyped_storage().data_ptr() != storage for o in others)


@_hide_private_params
@_errors_reach_every_rank(("input", 0))
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  label_smoothing_mode: str = "torch",
                  input_type: str = "logits", focal_gamma: float = 0.0, z_loss: float = 0.0,
                  softcap: Optional[float] = None, fake_upper_bound: Optional[float] = None,
                  inplace_backward: bool = False, return_lse: bool = False, validate: bool = False,
                  backend: str = "auto", process_group=None, vocab_start: Optional[int] = None, _denom=None,
                  _shard=None):
    """Fused softmax cross-entropy, a drop-in for :func:`torch.nn.functional.cross_entropy`.

    Training fast path: when ``input`` requires grad, grad mode is on and ``reduction`` is ``"mean"`` or
    ``"sum"`` (the upstream gradient is one scalar), the forward also forms the gradient of the reduced loss
    for an upstream of 1, in the same kernel while each row is on chip or in L2 (the logits are read from
    memory once and the gradient written once), and the backward multiplies it by the upstream scalar read
    on device: no host sync, CUDA-graph safe; on Triton it costs nothing when the upstream is exactly 1
    (``loss.backward()``), else one read and write of the gradient. The gradient buffer is allocated by the
    forward instead of the backward and the logits are not kept for the backward, so peak memory is no
    higher than on the exact path. With ``retain_graph``/``create_graph`` each backward writes the scaled
    gradient to a new tensor, leaving the saved one intact for the next call (the one case that holds one
    more gradient-sized buffer than the exact path while the caller keeps the logits). Every option works on
    it; these calls take the exact path instead (a forward, then a backward that reads the logits again):
    ``reduction="none"`` (per-row upstream gradients), ``return_lse=True`` (an lse gradient needs the
    probabilities), probability targets that require grad, a ``process_group`` or DTensor input (a rank
    knows the whole row's lse only after the forward's all-reduces), and fp16 logits (a gradient held in
    fp16 for an upstream of 1 would lose its small entries before a loss scaler's upstream scales them; bf16
    keeps them). Without grad (``torch.no_grad``, a frozen input) the forward forms the loss only. A
    non-finite upstream scalar multiplies the unit-upstream gradient with its exact zeros kept: NaN gives NaN
    in every non-zero entry, ±inf gives ±inf by each entry's sign, and ignored rows and zero entries (a
    class whose probability underflows to 0) stay 0, where PyTorch's composite backward also has NaN at its
    inf - inf and 0 * inf terms (the target column, such zero entries). The exact path follows PyTorch there.

    Args:
        input: ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` scores, fp32/fp16/bf16 (fp64: torch backend).
        target: class ids of shape ``()``, ``(N)`` or ``(N, d1, ..., dk)``, or class probabilities of
            the input's shape (a floating tensor; a class with probability 0 adds nothing even where its
            logit is -inf, a masked class, where PyTorch's 0 * -inf makes the row NaN). Probabilities of
            another dtype are read in the compute dtype: a float64 target with fp32/16-bit input gives an
            fp32 loss (PyTorch promotes its loss to float64 there, from fp32 log-probabilities).
        weight: optional ``(C,)`` class weights (PyTorch semantics: not differentiable with class-id targets,
            where one that requires grad raises; differentiable with probability targets, with PyTorch's
            options; a NaN/inf weight reaches only the rows whose target distribution puts mass on that class
            (an infinite one makes them NaN where PyTorch's loss can be inf); a class of weight 0 adds nothing,
            also label smoothing's share where its logit is -inf, where PyTorch's 0 * -inf makes the row NaN).
        size_average, reduce: PyTorch's deprecated reduction flags (positional as there), mapped to
            ``reduction`` as PyTorch does.
        ignore_index: rows whose target equals it get loss 0 and gradient 0, also where their logits
            hold a NaN (PyTorch's gradient is NaN there) (class-id targets; with probability targets
            only a negative value is accepted, and it has no effect, as in PyTorch).
        reduction: ``"none"`` (per row, fp32), ``"mean"`` (over non-ignored rows, or over
            ``sum w_y`` with weights; all rows ignored gives NaN = 0/0 as in PyTorch), ``"sum"``.
        label_smoothing: epsilon in [0, 1] (1 puts all the target mass on the smoothing distribution).
        label_smoothing_mode: ``"torch"`` (q = (1-eps)*onehot + eps/C), ``"others"`` (eps/(C-1) on
            the other classes, RETURNN) or ``"gaussian"`` (RETURNN's Gaussian, sigma = 1 - eps).
        input_type: ``"logits"`` (softmax fused), ``"log_probs"`` or ``"probs"`` (RETURNN's
            ``safe_log``: log(max(p, 1e-20)) with an identity gradient through the clamp).
        focal_gamma: focal loss exponent (rows multiplied by ``(1 - p_y)^gamma``; class ids only).
        z_loss: adds ``z_loss * lse^2`` per non-ignored row (logits only; finite).
        softcap: logits become ``softcap * tanh(x / softcap)`` first (logits only; ``inf`` = no cap).
        fake_upper_bound: forward value ``min(row_loss, U)``, gradient of the unbounded row.
        inplace_backward: write the gradient into ``input``'s storage (it is clobbered: on the
            training fast path by this call already, which leaves the gradient for an upstream of 1
            there; otherwise by the backward); ignored under ``torch.compile``, when the input's
            rows share memory (e.g. an expanded tensor) and when ``target`` or ``weight`` lies in the
            input's storage (a fresh gradient is allocated then). Since the logits are overwritten, what
            would read them again raises PyTorch's "modified by an inplace operation" error instead of
            reading the gradient: a non-reentrant activation checkpoint around this loss alone (keep the head
            inside it), and with ``reduction="none"`` a second backward (``retain_graph=True``).
        return_lse: also return the per-row log-sum-exp (fp32, shape of the unreduced loss). With
            ``input_type`` ``"log_probs"`` or ``"probs"`` the input is taken as normalised: the lse is 0
            (a constant, no gradient).
        validate: check class ids on CUDA too (a host sync); CPU inputs are always checked.
            Unchecked out-of-range ids give a NaN row loss, never an out-of-bounds read. With a
            ``process_group``, also checks that every rank passes the same class ids exactly (the row counts, input
            dtypes, scalar options and a hash of the ids are checked in every call): one all-gather, and for
            class-id targets a broadcast of the ids and one more all-gather.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        process_group: vocab-parallel (tensor-parallel heads): a ``torch.distributed`` group of P ranks, each holding a
            contiguous slice of the V classes in rank order (any sizes, even 0): ``input (N, V_r, ...)``, ``weight
            (V_r,)`` and probability targets ``(N, V_r, ...)`` are this rank's slices; class ids are global and the same
            on every rank, as are the other arguments (the row counts, input dtypes and scalar options are checked in
            every call, ``validate`` checks the ids, not ``input`` or ``weight``). Every rank returns the loss (and lse) of the
            whole-vocabulary problem, every option keeping its meaning (smoothing over all V classes; class weights that
            require grad with probability targets raise: their gradient would need every rank's log-probabilities);
            ``input``'s gradient is this rank's slice of the whole gradient (no collective in the backward). Per call:
            the shard offsets (one all-gather of each rank's ``(vocab_start, V_r)``, its validate flag, id range, row
            count, a 0 (linear CE's input width), its input dtype and a CRC of its scalar options: 9P ints, read on the
            host), then one MAX all-reduce of N values
            (logits only) and one SUM all-reduce of 6N values: O(N), never O(N*V). Eager only: under ``torch.compile``
            the call runs eagerly (a graph break; ``fullgraph=True`` fails). A group of size 1 runs the same path. An
            argument error found on one rank only raises there and, on the others, an error naming that rank (no rank is
            left waiting in a collective). A DTensor ``input`` sharded on the class dim (``Shard(1)``, ``Shard(0)`` for
            a ``(C)`` input) over a 1-D mesh uses the mesh's group; the loss (and lse) come back as DTensors replicated
            on the mesh, and the gradient reaches the DTensor.
        vocab_start: this rank's first class id (with ``process_group``); computed from the slice
            sizes when not given. Give it on every rank or on none; given, the ranks' slices are checked
            to follow each other from 0 in rank order (from the same all-gather, on every call).

    Returns:
        The loss (fp32; fp64 for fp64 input), and the lse if ``return_lse``.
    """
    # _denom (private, for tri_losses.hf; hidden from the signature): with reduction="mean", the
    # denominator (a number or a device tensor) in place of the count, so that the fast path's saved
    # gradient is already divided by it and the backward sees an upstream of 1. _shard (private, for
    # linear_cross_entropy's materialised path): this rank's (class offset, V), which the caller has computed
    # and validated under its own name: no collective for them here
    op = "cross_entropy"
    _validate.check_bool(op, inplace_backward=inplace_backward, return_lse=return_lse, validate=validate)
    label_smoothing = _validate.torch_float_arg(label_smoothing)
    reduction = _validate.legacy_reduction(size_average, reduce, reduction)
    if _is_dtensor(input):
        return _dtensor_ce(input, target, weight, dict(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            label_smoothing_mode=label_smoothing_mode, input_type=input_type, focal_gamma=focal_gamma, z_loss=z_loss,
            softcap=softcap, fake_upper_bound=fake_upper_bound, inplace_backward=inplace_backward,
            return_lse=return_lse, validate=validate, backend=backend, process_group=process_group,
            vocab_start=vocab_start, _denom=_denom))
    if process_group is not None and torch.compiler.is_dynamo_compiling():  # (not export's non-strict trace)
        return _vocab_parallel_runs_eagerly(
            cross_entropy, input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, label_smoothing_mode=label_smoothing_mode, input_type=input_type,
            focal_gamma=focal_gamma, z_loss=z_loss, softcap=softcap, fake_upper_bound=fake_upper_bound,
            inplace_backward=inplace_backward, return_lse=return_lse, validate=validate, backend=backend,
            process_group=process_group, vocab_start=vocab_start, _denom=_denom)
    if vocab_start is not None and process_group is None:
        raise InputError(f"{op}: vocab_start: only meaningful with a process_group, got {vocab_start!r} without one")
    if (isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled() and isinstance(target, Tensor)
            and target.is_floating_point() and process_group is None):
        return _differentiable_class_weights(input, target, weight, dict(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            label_smoothing_mode=label_smoothing_mode, input_type=input_type, focal_gamma=focal_gamma, z_loss=z_loss,
            softcap=softcap, fake_upper_bound=fake_upper_bound, inplace_backward=inplace_backward,
            return_lse=return_lse, validate=validate, backend=backend, _denom=_denom))
    if isinstance(softcap, (int, float)) and softcap == math.inf:
        softcap = None  # tanh(x / inf) * inf is NaN; an infinite cap is no cap
    sharded = process_group is not None
    if sharded:
        check_no_functorch(op, "process_group")
    dense, C = _check_args(input, target, weight, ignore_index, reduction, label_smoothing, label_smoothing_mode,
                           input_type, focal_gamma, z_loss, softcap, fake_upper_bound, op, sharded)
    ignore_index = int(ignore_index)  # a NumPy integer or 0-d tensor, as PyTorch takes it
    if not dense:
        target = _validate.class_ids(target, ignore_index)
    compiling = torch.compiler.is_compiling()
    use_triton = resolve_backend(backend, input, op, inputs=(target,), classes=C)  # (before any collective)
    class_offset, V = 0, 0
    if sharded:
        if _shard is not None:
            class_offset, V = _shard
        else:
            rows = math.prod(input.shape[:1] + input.shape[2:]) if input.dim() > 1 else 1  # (N, C, d...)
            options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           label_smoothing_mode=label_smoothing_mode, input_type=input_type, focal_gamma=focal_gamma,
                           z_loss=z_loss, softcap=softcap, fake_upper_bound=fake_upper_bound, return_lse=return_lse,
                           weight=weight is not None)
            class_offset, V = _shard_classes(C, process_group, vocab_start, input.device, op, rows,
                                             None if dense else target, ignore_index, validate, dtype=input.dtype,
                                             options=options)
            if validate:
                _check_ranks_agree(process_group, input.device, op, None if dense else target)
        if not dense and label_smoothing > 0 and label_smoothing_mode == "others" and V < 2:
            raise InputError(f"{op}: label_smoothing_mode: 'others' needs at least 2 classes, got V={V}")
    if not dense and not sharded and _validate.host_readable(target, validate):  # (sharded: _shard_classes did)
        _validate.check_index_range(target, "target", op, C, ignore_index=ignore_index)
    x2, t2, _ = _to_rows(input, target, dense)
    if not dense:
        t2 = t2 if use_triton else t2.to(torch.int64)
    if dense and t2.dtype != x2.dtype and not use_triton:  # mixed dtypes: the targets in the compute dtype
        t2 = t2.to(loss_dtype(x2, use_triton))  # (not rounded to 16-bit logits' dtype), as the kernels read them
    w = weight.to(loss_dtype(x2, use_triton)).contiguous() if weight is not None else None  # unit stride
    opts = CEOptions(dense, int(ignore_index), float(label_smoothing),
                     _SMOOTH_MODES[label_smoothing_mode] if label_smoothing > 0 else _tce.SMOOTH_NONE,
                     _INPUT_TYPES[input_type], float(focal_gamma), float(z_loss),
                     float(softcap) if softcap is not None else 0.0,
                     float(fake_upper_bound) if fake_upper_bound is not None else math.inf, class_offset, V)
    # logits whose memory cannot take their gradient (expanded rows, or read as targets or weights too):
    # allocate one instead
    inplace = (bool(inplace_backward) and not compiling and not functorch_active()
               and _can_overwrite(x2, t2 if dense else None, w))
    if _fast_path(x2, t2, dense, reduction, sharded, C, return_lse):
        ct = loss_dtype(x2, use_triton)
        denom = (_mean_denominator(_denom, t2, w, opts, C, ct, x2.device) if reduction == "mean"
                 else torch.ones((), dtype=ct, device=x2.device))
        if inplace:
            return _FastInplaceCE.apply(x2, t2, w, denom, opts, use_triton)
        return _ce_fwd_grad(x2, t2, w, denom, *opts, use_triton)[0]
    if sharded:
        loss, lse, w_y = _VocabParallelCE.apply(x2, t2, w, opts, process_group, inplace, use_triton)
    elif C == 0:
        loss, lse = _no_classes(x2, t2, dense, ignore_index)
    else:
        loss, lse, _ = _ce_fwd(x2, t2, w, *opts, inplace, use_triton)
    out_shape = _id_shape(input)
    if reduction == "none":
        out = loss.reshape(out_shape)
    else:
        count = (_mean_denominator(_denom, t2, w, opts, V if sharded else C, loss.dtype, loss.device,
                                   w_y if sharded else None)
                 if reduction == "mean" else None)
        out = reduce_loss(loss, reduction, count)
    if return_lse:
        return out, lse.reshape(out_shape)
    return out


def _differentiable_class_weights(input, target, weight, kw):
    """Probability targets with class weights that require grad: PyTorch differentiates the loss
    ``-sum_c w_c q_c log p_c`` (q: the targets, label-smoothed as ``t (1 - eps) + eps / C``) with respect to them.
    The op runs with the weights detached (the loss and the input's gradient); a term of value 0 adds the
    weights' gradient ``sum_rows g * q_c * (-log p_c)``. PyTorch's options only."""
    op = "cross_entropy"
    extra = {k: kw[k] for k in ("focal_gamma", "z_loss") if kw[k]}
    extra.update({k: kw[k] for k in ("softcap", "fake_upper_bound", "_denom") if kw[k] is not None})
    if kw["return_lse"] or kw["input_type"] != "logits" or kw["label_smoothing_mode"] != "torch" or extra:
        raise InputError(f"{op}: weight: class weights that require grad (probability targets, which PyTorch "
                         f"differentiates them for) take PyTorch's options only (logits, label_smoothing in 'torch' "
                         f"mode, no return_lse), got {extra or {k: kw[k] for k in ('return_lse', 'input_type', 'label_smoothing_mode')}}")
    cdim = 0 if input.dim() == 1 else 1
    C = input.shape[cdim]
    eps = float(kw["label_smoothing"])
    with torch.no_grad():  # before the op (with inplace_backward it overwrites the logits with their gradient)
        ct = compute_dtype(input)
        q = target.to(ct) * (1.0 - eps) + eps / max(C, 1)
        per = torch.where(q == 0, 0.0, -q * torch.log_softmax(input.to(ct), cdim))  # 0 * -inf: 0, as the op
    out = cross_entropy(input, target, weight.detach(), **kw)
    term = _ClassWeightGrad.apply(weight, per, cdim, (input, target))  # value 0: the weights' gradient
    if kw["reduction"] == "none":
        return out + term
    return out + (term.sum() if kw["reduction"] == "sum" else term.sum() / max(term.numel(), 1))


class _ClassWeightGrad(torch.autograd.Function):
    """Zeros of the rows' shape whose gradient to the class weights is ``sum_rows upstream * per``
    (``per``: each class's ``-q_c log p_c``); a zero value even where ``per`` is infinite, where
    ``(w - w.detach()) * per`` would be 0 * inf = NaN and turn an infinite loss into NaN. ``sources``: the
    logits and targets ``per`` was formed from (without a graph), anchors of first_order's error node, so
    that differentiating the weights' gradient with respect to them raises too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, per, cdim, sources):
        return per.new_zeros(per.shape[:cdim] + per.shape[cdim + 1:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, per, ctx.cdim, sources = inputs
        ctx.save_for_backward(per, weight)  # the weights: first_order's anchor (a second derivative raises)
        ctx.wdtype = weight.dtype
        # (not saved: with inplace_backward the logits hold their gradient by then, which a saved tensor refuses)
        ctx.anchors = tuple(t for t in sources if isinstance(t, Tensor) and t.is_floating_point())

    @staticmethod
    @first_order("cross_entropy")
    def backward(ctx, g):
        per, _ = ctx.saved_tensors
        gw = (g.unsqueeze(ctx.cdim) * per).movedim(ctx.cdim, 0).reshape(per.shape[ctx.cdim], -1).sum(1)
        return gw.to(ctx.wdtype), None, None, None


class _PickledGroup:
    """A ``process_group`` as a loss module holds it across ``copy.deepcopy`` (the same group: groups are
    process-wide) and pickling (``torch.save(model)``: a ProcessGroup cannot be pickled, so only whether it
    was the default group is saved; a loaded module runs on the default group then, or asks for its group)."""

    def __init__(self, group=None, world=False):
        self.group, self.world = group, world

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        import torch.distributed as dist
        world = self.world if self.group is None else (dist.is_initialized() and self.group is dist.group.WORLD)
        return _PickledGroup, (None, world)

    def resolve(self, op):
        import torch.distributed as dist
        if not self.world:
            raise InputError(f"{op}: process_group: this module was unpickled from one that held a process group "
                             f"other than the default one (a process group cannot be pickled); set it again: "
                             f"module.kwargs['process_group'] = group")
        if not dist.is_initialized():
            raise InputError(f"{op}: process_group: this module was pickled with the default process group, which "
                             f"is not initialised in this process (torch.distributed.init_process_group)")
        return dist.group.WORLD


class _GroupState:
    """For the loss modules whose ``kwargs`` hold a ``process_group``: deepcopy and pickle them (see
    :class:`_PickledGroup`)."""

    def __getstate__(self):
        state = super().__getstate__()
        group = state.get("kwargs", {}).get("process_group")
        if group is not None and not isinstance(group, _PickledGroup):
            state = dict(state, kwargs=dict(state["kwargs"], process_group=_PickledGroup(group)))
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        group = self.__dict__.get("kwargs", {}).get("process_group")
        if isinstance(group, _PickledGroup) and group.group is not None:  # a deepcopy: the same group
            self.kwargs = dict(self.kwargs, process_group=group.group)

    def _call_kwargs(self, op):
        group = self.kwargs.get("process_group")
        if isinstance(group, _PickledGroup):
            return dict(self.kwargs, process_group=group.resolve(op))
        return self.kwargs


class CrossEntropyLoss(_GroupState, _WeightedLoss):  # PyTorch's base class, so isinstance checks hold
    """Module form of :func:`cross_entropy`, a drop-in for :class:`torch.nn.CrossEntropyLoss`.

    ``CrossEntropyLoss(...)(input, target)`` is ``cross_entropy(input, target, weight, ignore_index=...,
    reduction=..., label_smoothing=..., **options)``: same shapes, dtypes (fp32 loss), backends and errors
    (raised on the call, not here).

    Args:
        weight: optional ``(C,)`` class weights, kept as a buffer (moves with ``.to()``, saved in the
            ``state_dict`` as in PyTorch).
        size_average, reduce: PyTorch's deprecated reduction flags, mapped to ``reduction`` as PyTorch does.
        ignore_index, reduction, label_smoothing: as in :func:`cross_entropy` (PyTorch's positions).
        label_smoothing_mode, input_type, focal_gamma, z_loss, softcap, fake_upper_bound, inplace_backward,
            validate, backend, process_group, vocab_start: keyword-only, as in :func:`cross_entropy`
            (vocab-parallel: ``weight`` is this rank's slice). ``copy.deepcopy`` keeps the group; pickling
            (``torch.save(module)``) saves only whether it is the default group, since a process group cannot
            be pickled: a loaded module runs on the default group, or raises until
            ``module.kwargs["process_group"]`` is set again.
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, label_smoothing_mode: str = "torch",
                 input_type: str = "logits", focal_gamma: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, fake_upper_bound: Optional[float] = None,
                 inplace_backward: bool = False, validate: bool = False, backend: str = "auto",
                 process_group=None, vocab_start: Optional[int] = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _validate.legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.kwargs = dict(label_smoothing_mode=label_smoothing_mode, input_type=input_type,
                           focal_gamma=focal_gamma, z_loss=z_loss, softcap=softcap,
                           fake_upper_bound=fake_upper_bound, inplace_backward=inplace_backward,
                           validate=validate, backend=backend, process_group=process_group,
                           vocab_start=vocab_start)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, **self._call_kwargs("CrossEntropyLoss"))


def frame_error(input: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "sum", *,
                validate: bool = False, backend: str = "auto") -> Tensor:
    """Rows whose argmax (over dim 1, or the only dim of a ``(C)`` input) differs from ``target``.

    RETURNN's default ``get_error``. Ignored rows count 0. ``reduction``: ``"sum"`` (float32 count),
    ``"mean"`` (over non-ignored rows) or ``"none"`` (per row, float32 0/1). Ties: the lowest index
    wins (``torch.argmax``). Class ids out of range raise on CPU (and with ``validate=True``, a host sync,
    on CUDA); unchecked, such a row is NaN, as in :func:`cross_entropy`. No Triton kernel:
    ``backend="triton"`` raises.
    """
    op = "frame_error"
    _validate.check_bool(op, validate=validate)
    _validate.check_float(input, "input", op)
    _validate.check_int(target, "target", op)
    _validate.check_reduction(reduction, op)
    ignore_index = _validate.check_ignore_index(ignore_index, op)
    target = _validate.class_ids(target, ignore_index)
    resolve_backend(backend, input, op, has_triton=False)
    if input.dim() == 0:
        raise InputError(f"{op}: input: expected shape (C), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if C == 0:
        raise InputError(f"{op}: input: expected at least one class (an argmax needs C > 0), got C=0 "
                         f"(shape {tuple(input.shape)})")
    _check_id_shape(input, target, op)
    _validate.check_same_device(input, target, "input", "target", op)
    if _validate.host_readable(target, validate):  # as cross_entropy: CPU ids are checked (else no host sync)
        _validate.check_index_range(target, "target", op, C, ignore_index=ignore_index)
    pred = input.argmax(dim=0 if input.dim() == 1 else 1)
    valid = target != ignore_index
    err = ((pred != target) & valid).to(torch.float32)
    err = torch.where(valid & ((target < 0) | (target >= C)), math.nan, err)  # unchecked bad ids: NaN rows
    if reduction == "none":
        return err
    if reduction == "sum":
        return err.sum()
    return err.sum() / valid.sum().to(torch.float32)
