"""RETURNN's remaining losses and custom error signals, in plain torch on both backends.

``deep_clustering_loss``, ``triplet_loss``, ``expected_loss``, ``loss_with_gradient`` and
``label_smoothed_log_prob_gradient``: thin GEMMs and element-wise work that ``torch.compile`` fuses
well, so none has a Triton kernel (``backend="triton"`` raises, as for every op without one).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _validate
from ._validate import InputError, InputIndexError, InputTypeError
from ._torch import compute_dtype
from ._backend import resolve_backend

__all__ = ["deep_clustering_loss", "triplet_loss", "expected_loss", "loss_with_gradient",
           "label_smoothed_log_prob_gradient"]


def _no_triton(backend, x, op):
    resolve_backend(backend, x, op, has_triton=False)


def deep_clustering_loss(embeddings: Tensor, targets: Tensor, lengths=None, *, embedding_dim: Optional[int] = None,
                         num_sources: Optional[int] = None, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Deep clustering (Hershey et al. 2016): ``C_b = |V^T V|^2 - 2 |V^T Y|^2 + |Y^T Y|^2`` (Frobenius).

    Args:
        embeddings: ``(B, T, F, E)`` or RETURNN's flat ``(B, T, F*E)`` (index ``f*E + e``; give
            ``embedding_dim``). V is not normalised.
        targets: one-hot source masks ``(B, T, F, S)`` or flat ``(B, T, F*S)`` (give ``num_sources``).
        lengths: ``(B,)`` valid frames (None: all).
        reduction: ``"mean"`` over the B sequences, ``"sum"``, or ``"none"`` ``(B,)``.
    Computed in float64 (the three terms cancel), returned as float32 (float64 for float64 embeddings).
    """
    op = "deep_clustering_loss"
    _validate.check_float(embeddings, "embeddings", op)
    _validate.check_tensor(targets, "targets", op)
    if targets.is_complex():
        raise InputTypeError(f"{op}: targets: expected real source masks, got {targets.dtype}")
    _validate.check_same_device(embeddings, targets, "embeddings", "targets", op)
    _validate.check_reduction(reduction, op)
    _no_triton(backend, embeddings, op)
    if embedding_dim is not None:
        embedding_dim = _validate.as_int(embedding_dim, "embedding_dim", op, low=1, what="a positive int")
    if num_sources is not None:
        num_sources = _validate.as_int(num_sources, "num_sources", op, low=1, what="a positive int")
    if embeddings.dim() == 3:
        if not embedding_dim:
            raise InputError(f"{op}: embedding_dim: needed for flat (B, T, F*E) embeddings, got {embedding_dim!r}")
        if embeddings.shape[-1] % embedding_dim:
            raise InputError(f"{op}: embeddings: last dim {embeddings.shape[-1]} is not a multiple of "
                             f"embedding_dim={embedding_dim}")
        embeddings = embeddings.reshape(*embeddings.shape[:2], embeddings.shape[-1] // embedding_dim, embedding_dim)
    elif embeddings.dim() != 4:
        raise InputError(f"{op}: embeddings: expected (B, T, F, E) or (B, T, F*E), got {tuple(embeddings.shape)}")
    B, T, Fd, E = embeddings.shape
    if targets.dim() == 3:
        S = num_sources or targets.shape[-1] // Fd
        if targets.shape[-1] != Fd * S:
            raise InputError(f"{op}: targets: expected last dim F*S = {Fd}*{S}, got {targets.shape[-1]} (the output "
                             f"dim must be E * (target dim / S))")
        targets = targets.reshape(*targets.shape[:2], Fd, S)  # its own (B, T): a mismatch is refused below
    if targets.dim() != 4 or tuple(targets.shape[:3]) != (B, T, Fd):
        raise InputError(f"{op}: targets: expected ({B}, {T}, {Fd}, S), got {tuple(targets.shape)}")
    Vm = embeddings.double()
    Y = targets.double()
    if lengths is not None:
        ln = _validate.as_lengths(lengths, "lengths", op, B, embeddings.device, max_value=T)
        m = (torch.arange(T, device=embeddings.device)[None, :] < ln[:, None])[:, :, None, None]
        Vm = torch.where(m, Vm, 0.0)  # by selection: NaN/inf in padded frames cannot leak (0 * NaN = NaN)
        Y = torch.where(m, Y, 0.0)
    Vm = Vm.reshape(B, T * Fd, E)
    Y = Y.reshape(B, T * Fd, targets.shape[-1])
    vv = Vm.transpose(1, 2) @ Vm
    vy = Vm.transpose(1, 2) @ Y
    yy = Y.transpose(1, 2) @ Y
    c = (vv ** 2).sum((1, 2)) - 2 * (vy ** 2).sum((1, 2)) + (yy ** 2).sum((1, 2))
    c = c if embeddings.dtype == torch.float64 else c.float()
    return c if reduction == "none" else (c.sum() if reduction == "sum" else c.mean())


def _triplet_single(e: Tensor, labels: Tensor, margin: float) -> Tensor:
    n = torch.sqrt(torch.clamp((e * e).sum(-1, keepdim=True), min=1e-15))
    eh = e / n
    d = 1.0 - eh @ eh.t()
    li = labels[:, None].double()
    lj = labels[None, :].double()
    same = lj * lj == li * lj  # RETURNN's test: l_j^2 == l_i * l_j (true for l_j = 0 too: quirk kept)
    return 0.5 * torch.where(same, d, 0.0).sum() + 0.5 * torch.where(same, 0.0, torch.clamp(margin - d, min=0)).sum()


def triplet_loss(output: Tensor, target: Tensor, *, margin: float, multi_view: bool = False,
                 backend: str = "auto") -> Tensor:
    """RETURNN ``triplet_loss`` (a pairwise contrastive loss over all rows despite its name).

    ``output (B, 3F) = [anchor | pair | diff]`` (multi-view ``(B, 6F)``), ``target (B, 3)`` class ids.
    Rows ``[anchor; pair; diff]``, unit-normalised (``max(|e|^2, 1e-15)``), ``d = 1 - cos``;
    ``L = 0.5 * sum_same d + 0.5 * sum_other max(margin - d, 0)`` over all ordered pairs (i, j), where
    "same" is RETURNN's test ``l_j^2 == l_i * l_j``: equal ids, and also every pair whose j has id 0
    (RETURNN's quirk, kept: class 0 counts as "same" as every row).
    """
    op = "triplet_loss"
    _validate.check_bool(op, multi_view=multi_view)
    _validate.check_float(output, "output", op)
    _validate.check_int(target, "target", op)
    _validate.check_same_device(output, target, "output", "target", op)
    _validate.check_number(margin, "margin", op)
    _no_triton(backend, output, op)
    parts = 6 if multi_view else 3
    if output.dim() != 2 or output.shape[1] % parts:
        raise InputError(f"{op}: output: expected (B, {parts}F), got {tuple(output.shape)}")
    if tuple(target.shape) != (output.shape[0], 3):
        raise InputError(f"{op}: target: expected ({output.shape[0]}, 3), got {tuple(target.shape)}")
    Fd = output.shape[1] // parts
    output = output if output.dtype == torch.float64 else output.float()  # fp32 math for 16-bit inputs
    chunks = [output[:, k * Fd:(k + 1) * Fd] for k in range(parts)]
    labels = torch.cat([target[:, 0], target[:, 1], target[:, 2]])
    if not multi_view:
        return _triplet_single(torch.cat(chunks), labels, margin)
    a_anchor, a_pair, a_diff, c_anchor, c_pair, c_diff = chunks
    return (_triplet_single(torch.cat([a_anchor, c_pair, c_diff]), labels, margin)
            + _triplet_single(torch.cat([a_pair, c_pair, a_diff]), labels, margin))


def expected_loss(losses: Tensor, scores: Tensor, *, norm_scores: bool = True, norm_scores_stop_gradient: bool = True,
                  divide_beam_size: bool = True, subtract_average_loss: bool = True,
                  loss_correction_grad_only: bool = False, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Expected loss / MBR over a beam: ``R_b = sum_k L'_bk * w_bk``.

    ``losses (B, K)``, ``scores (B, K)`` (+log beam scores); ``w = exp(s - lse_K(s))`` (lse detached
    with ``norm_scores_stop_gradient``) or ``exp(s)``; ``L' = L - detach(mean_K L)`` with
    ``subtract_average_loss``; ``loss_correction_grad_only`` adds ``detach(sum_k (L - L') w)`` so the
    value is ``sum L w`` with the gradient of ``L'``; ``/K`` with ``divide_beam_size``.
    ``reduction``: ``"mean"`` over B, ``"sum"``, ``"none"`` ``(B,)``.
    """
    op = "expected_loss"
    _validate.check_bool(op, norm_scores=norm_scores, norm_scores_stop_gradient=norm_scores_stop_gradient,
                         divide_beam_size=divide_beam_size, subtract_average_loss=subtract_average_loss,
                         loss_correction_grad_only=loss_correction_grad_only)
    _validate.check_float(losses, "losses", op)
    _validate.check_float(scores, "scores", op)
    _validate.check_same_device(losses, scores, "losses", "scores", op)
    _validate.check_reduction(reduction, op)
    _no_triton(backend, losses, op)
    if losses.dim() != 2:
        raise InputError(f"{op}: losses: expected (B, K), got {tuple(losses.shape)}")
    if scores.shape != losses.shape:
        raise InputError(f"{op}: scores: expected the shape of losses {tuple(losses.shape)}, got "
                         f"{tuple(scores.shape)}")
    K = losses.shape[1]
    ct = torch.float64 if torch.float64 in (losses.dtype, scores.dtype) else torch.float32
    losses, scores = losses.to(ct), scores.to(ct)  # fp32 math (returned fp32) for 16-bit inputs
    if norm_scores:
        lse = torch.logsumexp(scores, -1, keepdim=True)
        if norm_scores_stop_gradient:
            lse = lse.detach()
        w = torch.exp(scores - lse)
    else:
        w = torch.exp(scores)
    Lp = losses - losses.mean(-1, keepdim=True).detach() if subtract_average_loss else losses
    R = (Lp * w).sum(-1)
    if loss_correction_grad_only:
        R = R + ((losses - Lp) * w).sum(-1).detach()
    if divide_beam_size:
        R = R / K
    return R if reduction == "none" else (R.sum() if reduction == "sum" else R.mean())


class _LossWithGradient(torch.autograd.Function):
    generate_vmap_rule = True  # (forward, setup and backward are torch ops: torch.func transforms them)

    @staticmethod
    def forward(value, x, grad_x):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        value, x, grad_x = inputs
        ctx.save_for_backward(grad_x)
        ctx.vdim = value.dim()
        ctx.xdim = x.dim()
        ctx.xshape, ctx.xdtype = x.shape, x.dtype

    @staticmethod
    def backward(ctx, g):
        (grad_x,) = ctx.saved_tensors
        g = g.reshape(g.shape + (1,) * (ctx.xdim - ctx.vdim))
        return None, (g * grad_x).expand(ctx.xshape).to(ctx.xdtype), None


def _number_tensor(v, name: str, x: Tensor, op: str) -> Tensor:
    """A real tensor (or number) ``v`` on x's device in its compute dtype; other types raise, naming ``name``."""
    if isinstance(v, Tensor):
        v = _validate.to_device(v, x.device, name=name, op=op)
    else:
        try:
            v = torch.as_tensor(v, device=x.device)
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(f"{op}: {name}: expected a tensor or a number, got "
                                 f"{type(v).__name__}") from None
    if v.dtype == torch.bool or v.is_complex():
        raise InputTypeError(f"{op}: {name}: expected a real tensor or number, got {v.dtype}")
    return v.to(compute_dtype(v))


def loss_with_gradient(value, x: Tensor, grad_x, *, backend: str = "auto") -> Tensor:
    """RETURNN ``generic_loss_and_error_signal``: returns ``value``; the backward gives ``x`` the gradient
    ``upstream * grad_x`` (upstream broadcast over x's trailing dims: value's shape is a prefix of
    x's, or a scalar; ``grad_x`` broadcasts to x's shape); ``value`` and ``grad_x`` get none. The value
    keeps its own precision (float32 at least: a 16-bit x must not overflow or round the loss)."""
    op = "loss_with_gradient"
    _validate.check_tensor(x, "x", op)
    _no_triton(backend, x, op)
    value = _number_tensor(value, "value", x, op)
    grad_x = _number_tensor(grad_x, "grad_x", x, op)
    if tuple(x.shape[:value.dim()]) != tuple(value.shape):
        raise InputError(f"{op}: value: expected a scalar or a prefix of x's shape {tuple(x.shape)}, got "
                         f"{tuple(value.shape)}")
    if _validate.broadcast_shape(grad_x.shape, x.shape) != tuple(x.shape):
        raise InputError(f"{op}: grad_x: shape {tuple(grad_x.shape)} does not broadcast to x's "
                         f"{tuple(x.shape)}")
    return _LossWithGradient.apply(value.detach(), x, grad_x.detach())


class _SmoothedGrad(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, factor, floor, dim):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, factor, floor, ctx.dim = inputs
        ctx.save_for_backward(factor, floor)

    @staticmethod
    def backward(ctx, g):
        factor, floor = ctx.saved_tensors  # fp32 (fp64 for fp64 input): the gradient is cast once
        gc = g.to(factor.dtype)
        return (factor * gc - floor * gc.abs().sum(ctx.dim, keepdim=True)).to(g.dtype), None, None, None


def label_smoothed_log_prob_gradient(log_prob: Tensor, smoothing: float, *, dim: int = -1,
                                     exclude_labels: Optional[Sequence[int]] = None, backend: str = "auto") -> Tensor:
    """RETURNN frontend's ``label_smoothed_log_prob_gradient``: identity forward; the backward maps the
    upstream g over ``dim`` to ``factor * g - floor * sum_dim |g|`` with ``floor = s/(V-1)``,
    ``factor = 1 - V*floor``; labels in ``exclude_labels`` (E ids, e.g. blank) keep ``g`` (factor 1,
    floor 0) and the others use ``floor = s/(V-E-1)``, ``factor = 1 - (V-E)*floor`` (E = the list's
    length, as RETURNN takes it: a repeated id counts each time). For NLL-like
    losses (g = -posterior) this gives minus the smoothed posterior."""
    op = "label_smoothed_log_prob_gradient"
    _validate.check_float(log_prob, "log_prob", op)
    _validate.check_number(smoothing, "smoothing", op, low=0.0, high=1.0)
    _no_triton(backend, log_prob, op)
    dim = _validate.as_int(dim, "dim", op, low=-log_prob.dim(), high=log_prob.dim() - 1)
    d = dim % log_prob.dim()
    Vn = log_prob.shape[d]
    if isinstance(exclude_labels, Tensor):
        exclude_labels = exclude_labels.reshape(-1).tolist()  # ids of a 1-D (or 0-d) integer tensor
    if exclude_labels is not None and (isinstance(exclude_labels, (str, bytes))
                                       or not hasattr(exclude_labels, "__iter__")):
        raise InputTypeError(f"{op}: exclude_labels: expected a sequence of ints or an integer tensor, got "
                             f"{type(exclude_labels).__name__}")
    given = [_validate.as_int(e, "exclude_labels", op, what="a sequence of ints") for e in (exclude_labels or ())]
    ex = sorted(set(given))
    if any(not 0 <= e < Vn for e in ex):
        raise InputIndexError(f"{op}: exclude_labels: expected ids in [0, {Vn}), got {given}")
    if smoothing == 0:  # (after the checks: a bad exclude_labels raises whatever the smoothing)
        return log_prob
    E = len(given)  # as RETURNN: len(exclude_labels), a repeated id counted each time
    if Vn - E < 2:
        raise InputError(f"{op}: exclude_labels: need at least 2 included labels, got V={Vn}, E={E}")
    floor_v = smoothing / (Vn - E - 1)
    ct = compute_dtype(log_prob)
    factor = torch.full((Vn,), 1.0 - (Vn - E) * floor_v, dtype=ct, device=log_prob.device)
    floor = torch.full((Vn,), floor_v, dtype=ct, device=log_prob.device)
    if ex:
        idx = torch.tensor(ex, device=log_prob.device)
        factor[idx] = 1.0
        floor[idx] = 0.0
    shape = [1] * log_prob.dim()
    shape[d] = Vn
    return _SmoothedGrad.apply(log_prob, factor.view(shape), floor.view(shape), d)
