"""Sampled softmax and NCE (TensorFlow's ``_compute_sampled_logits`` semantics, RETURNN's ``sampling_loss``).

Row i (of the flattened ``input (..., D)``) with T true labels and the m ids sampled for its group:
``z_it = s_{y_it}(x_i) - log EC_true[i, t]`` (target 1/T) and ``z_ij = s_{S_gj}(x_i) - log EC_samp[g, j]``
(target 0), ``s_c(x) = x . W_c + b_c``. Accidental hits (a sampled id equal to one of the row's labels)
are dropped by predicate (``hit_policy="tf"``: at the id's last position in the group's draw; ``"all"``:
at every position): they contribute exactly 0 and get exactly 0 gradient in every dtype.

* sampled softmax: ``L_i = -(1/T) sum_t log softmax(z_i)_t`` over the kept columns;
* NCE (``z' = z - log_norm_term``): ``L_i = sum_t [(1/T) softplus(-z'_it) + (1 - 1/T) softplus(z'_it)]
  + sum_{kept j} softplus(z'_ij)``.

Shared negatives: rows are cut into ``num_splits`` groups (in order, over non-ignored rows), each with
its own draw; the estimator is biased (training only) but consistent. Log-uniform sampling assumes ids
sorted by decreasing frequency.

Backends: Triton (``tri_losses/kernels/sampled.py``: logit tiles on chip, never the N x (T+m) logits; the (V, D)
weight gradient assembled by sorted run sums, no atomics) for one sample group (``num_splits=1``, shared
negatives) with a dense weight gradient; otherwise, and on the torch backend, plain torch (autograd
through the gathered rows, memory O(N*(T+m) + G*m*D)). ``backend="auto"`` picks Triton when it applies.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate
from ._backend import device_guard, kernels, resolve_backend
from ._torch import row_segment_sum
from .samplers import LearnedUnigramSampler, Sampler, make_sampler

__all__ = ["sampled_softmax_loss", "nce_loss", "compute_sampled_logits", "SampledSoftmaxLoss", "NCELoss"]

FLT_MAX = 3.4028234663852886e38


class _GatherRows(torch.autograd.Function):
    """``W[ids].to(ct)`` whose backward sums the rows of equal ids in ``ct`` (fp32 for 16-bit W) in a
    fixed order (stable sort + a segmented scan, no atomics) and casts once: a dense ``(V, ...)``
    gradient, or with ``sparse`` a coalesced sparse COO one (one row per touched id)."""

    @staticmethod
    def forward(ctx, W, ids, ct, sparse):
        ctx.save_for_backward(ids)
        ctx.shape, ctx.dtype, ctx.sparse = W.shape, W.dtype, sparse
        return W[ids].to(ct)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(-1)
        key, sums, last = row_segment_sum(g.reshape(flat.numel(), -1), flat)
        sums = sums.to(ctx.dtype).reshape(flat.numel(), *ctx.shape[1:])
        if ctx.sparse:  # one row per touched id (selecting the runs' ends syncs: eager mode, as coalesce does)
            grad = torch.sparse_coo_tensor(key[last][None, :], sums[last], ctx.shape, is_coalesced=True)
        else:  # duplicates in key carry the same run sum: the result does not depend on the write order
            grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=g.device)
            grad[key] = sums
        return grad, None, None, None


@torch.library.custom_op("tri_losses::sampled_fwd", mutates_args=())
def _sm_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, logq_t: Tensor, samp: Tensor, logq_s: Tensor,
            last: Tensor, valid: Tensor, nce: bool, remove_hits: bool, all_hits: bool,
            log_norm: float) -> tuple[Tensor, Tensor]:
    with device_guard(x):
        return kernels("sampled").fwd(x, w, b, labels, logq_t, samp, logq_s, last, valid, nce, remove_hits, all_hits, log_norm)


@_sm_fwd.register_fake
def _(x, w, b, labels, logq_t, samp, logq_s, last, valid, nce, remove_hits, all_hits, log_norm):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("tri_losses::sampled_bwd", mutates_args=())
def _sm_bwd(grad: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, logq_t: Tensor, samp: Tensor,
            logq_s: Tensor, last: Tensor, valid: Tensor, lse: Tensor, nce: bool, remove_hits: bool, all_hits: bool,
            log_norm: float) -> tuple[Tensor, Tensor, Tensor]:
    with device_guard(x):
        dx, dw, db = kernels("sampled").bwd(x, w, b, labels, logq_t, samp, logq_s, last, valid, lse, grad, nce, remove_hits,
                                    all_hits, log_norm)
    return dx.to(x.dtype), dw.to(w.dtype), (db.to(b.dtype) if b is not None else x.new_empty(0))


@_sm_bwd.register_fake
def _(grad, x, w, b, labels, logq_t, samp, logq_s, last, valid, lse, nce, remove_hits, all_hits, log_norm):
    return torch.empty_like(x), torch.empty_like(w), (torch.empty_like(b) if b is not None else x.new_empty(0))


def _sm_setup(ctx, inputs, output):
    x, w, b, labels, logq_t, samp, logq_s, last, valid, nce, remove_hits, all_hits, log_norm = inputs
    ctx.save_for_backward(x, w, b, labels, logq_t, samp, logq_s, last, valid, output[1])
    ctx.opts = (nce, remove_hits, all_hits, log_norm)
    ctx.has_bias = b is not None
    ctx.mark_non_differentiable(output[1])


def _sm_backward(ctx, grad, grad_lse):
    x, w, b, labels, logq_t, samp, logq_s, last, valid, lse = ctx.saved_tensors
    dx, dw, db = _sm_bwd(grad, x, w, b, labels, logq_t, samp, logq_s, last, valid, lse, *ctx.opts)
    return (dx, dw, db if ctx.has_bias else None) + (None,) * 10


_sm_fwd.register_autograd(_sm_backward, setup_context=_sm_setup)


def _rows(W, ids, sparse, ct):
    return _GatherRows.apply(W, ids, ct, sparse)


def _last_occurrence(sampled: Tensor) -> Tensor:
    """(G, m) bool: position j holds the last occurrence of its id within the group (TF's position map)."""
    G, m = sampled.shape
    order = torch.argsort(sampled, dim=1, stable=True)
    s = sampled.gather(1, order)
    last_sorted = torch.ones_like(s, dtype=torch.bool)
    if m > 1:
        last_sorted[:, :-1] = s[:, 1:] != s[:, :-1]
    out = torch.empty_like(last_sorted)
    out.scatter_(1, order, last_sorted)
    return out


_SAMPLER_CACHE: dict = {}


def _named_sampler(sampler, Vn, kwargs, device):
    """A sampler instance as is; by name, built once per (name, V, kwargs, device) and reused (its table is
    O(V): rebuilding it, or re-reading a vocab file, on every step would cost a host-to-device copy)."""
    if isinstance(sampler, Sampler):
        return sampler.to(device)
    try:
        key = (sampler, Vn, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())),
               str(device))
        hash(key)
    except TypeError:
        return make_sampler(sampler, Vn, **kwargs).to(device)
    if key not in _SAMPLER_CACHE:
        if len(_SAMPLER_CACHE) >= 16:
            _SAMPLER_CACHE.clear()
        _SAMPLER_CACHE[key] = make_sampler(sampler, Vn, **kwargs).to(device)
    return _SAMPLER_CACHE[key]


def _check_options(op, num_sampled, num_splits, hit_policy, weight_grad):
    _validate.check_option(hit_policy, "hit_policy", op, ("tf", "all"))
    _validate.check_option(weight_grad, "weight_grad", op, ("dense", "sparse"))
    if isinstance(num_sampled, bool) or not isinstance(num_sampled, int) or num_sampled < 1:
        raise ValueError(f"{op}: num_sampled: expected an int >= 1, got {num_sampled!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"{op}: num_splits: expected an int >= 1, got {num_splits!r}")


def _host_checks(t: Tensor, validate: bool) -> bool:
    """Whether value checks read ``t``: always on the CPU, on CUDA only with ``validate=True`` (a host sync),
    never while compiling."""
    return (t.device.type == "cpu" or validate) and not torch.compiler.is_compiling()


def _checked_counts(op, true_ec, sampled_ec, ign, group, validate, source):
    """Expected counts must be finite and > 0 (log Q). Raise where they can be read (:func:`_host_checks`);
    elsewhere the rows that use a bad count get a NaN loss on both backends (their count is replaced by 1, so
    they add nothing to any gradient). Ignored rows take no part (count 1). Returns (true_ec, sampled_ec,
    bad rows (N,))."""
    ok_t = ((true_ec > 0) & torch.isfinite(true_ec)) | ign
    ok_s = (sampled_ec > 0) & torch.isfinite(sampled_ec)
    for name, ec, ok in (("true", true_ec, ok_t), ("sampled", sampled_ec, ok_s)):
        if ec.numel() and _host_checks(ec, validate) and not bool(ok.all()):
            raise ValueError(f"{op}: {source}: {name} expected counts must be finite and > 0, got "
                             f"{ec[~ok][0].item()}")
    bad = ~ok_t.all(1) | ~ok_s.all(1)[group]
    return (torch.where(ok_t & ~ign, true_ec, torch.ones_like(true_ec)),
            torch.where(ok_s, sampled_ec, torch.ones_like(sampled_ec)), bad)


def _prepare(op, input, linear_weight, target, num_sampled, linear_bias, sampler, unique, sampler_kwargs,
             sampled_values, generator, num_splits, remove_accidental_hits, subtract_log_q, hit_policy, ignore_index,
             reduction, weight_grad, validate, backend):
    _validate.check_float(input, "input", op)
    _validate.check_float(linear_weight, "linear_weight", op)
    _validate.check_same_dtype(linear_weight, input, "linear_weight", "input", op)
    _validate.check_int(target, "target", op)
    _validate.check_reduction(reduction, op)
    _check_options(op, num_sampled, num_splits, hit_policy, weight_grad)
    use_triton = resolve_backend(backend, input, op, has_triton=op != "compute_sampled_logits")
    if use_triton and (num_splits != 1 or weight_grad != "dense"):
        if backend == "triton":
            raise ValueError(f"{op}: backend: the Triton kernels take one sample group with a dense weight gradient, "
                             f"got num_splits={num_splits}, weight_grad={weight_grad!r}; use backend='torch'")
        use_triton = False
    if linear_weight.dim() != 2:
        raise ValueError(f"{op}: linear_weight: expected (V, D), got {tuple(linear_weight.shape)}")
    Vn, D = linear_weight.shape
    if input.dim() < 1 or input.shape[-1] != D:
        raise ValueError(f"{op}: input: expected last dim D={D}, got {tuple(input.shape)}")
    if linear_bias is not None:
        _validate.check_float(linear_bias, "linear_bias", op)
        _validate.check_same_dtype(linear_bias, input, "linear_bias", "input", op)
        _validate.check_shape(linear_bias, (Vn,), "linear_bias", op)
    lead = tuple(input.shape[:-1])
    if tuple(target.shape) == lead:
        labels = target.reshape(-1, 1)
    elif target.dim() == len(lead) + 1 and tuple(target.shape[:-1]) == lead:
        if target.shape[-1] == 0:
            raise ValueError(f"{op}: target: expected at least one label per row (T >= 1), got shape "
                             f"{tuple(target.shape)}")
        labels = target.reshape(-1, target.shape[-1])
    else:
        raise ValueError(f"{op}: target: expected shape {lead} or {lead + ('T',)}, got {tuple(target.shape)}")
    x = input.reshape(-1, D)
    N, T = labels.shape
    labels = labels.long()
    ign = labels == ignore_index
    row_ign = ign.all(1)
    if _host_checks(labels, validate) and labels.numel():
        if bool((ign.any(1) & ~row_ign).any()):
            raise ValueError(f"{op}: target: a row mixes ignore_index={ignore_index} with real labels")
        _validate.check_index_range(labels, "target", op, Vn, ignore_index=ignore_index)
    valid = ~row_ign
    G = num_splits
    rank = torch.cumsum(valid.long(), 0) - 1
    chunk = valid.sum() // G
    # chunks of floor(N'/G) rows in order, the last takes the remainder (all rows if floor(N'/G) = 0)
    group = torch.where(chunk > 0, (rank // chunk.clamp(min=1)).clamp(max=G - 1), G - 1)
    group = torch.where(valid, group, 0)
    safe_labels = torch.where(ign, 0, labels)
    m = num_sampled
    if sampled_values is not None:
        if not isinstance(sampled_values, (tuple, list)) or len(sampled_values) != 3:
            raise TypeError(f"{op}: sampled_values: expected (sampled, true_expected_count, sampled_expected_count), "
                            f"got {type(sampled_values).__name__}")
        sampled, true_ec, sampled_ec = sampled_values
        _validate.check_int(sampled, "sampled_values", op)
        sampled = sampled.to(x.device).long()
        if sampled.dim() == 1:
            sampled = sampled[None, :].expand(G, -1)
        if tuple(sampled.shape) != (G, m):
            raise ValueError(f"{op}: sampled_values: expected sampled ids of shape ({m},) or ({G}, {m}), got "
                             f"{tuple(sampled.shape)}")
        ec_t = torch.float64 if x.dtype == torch.float64 else torch.float32
        sampled_ec = torch.as_tensor(sampled_ec, device=x.device, dtype=ec_t)
        sampled_ec = sampled_ec[None, :].expand(G, -1) if sampled_ec.dim() == 1 else sampled_ec
        if tuple(sampled_ec.shape) != (G, m):
            raise ValueError(f"{op}: sampled_values: sampled expected counts must match the ids {(G, m)}, got "
                             f"{tuple(sampled_ec.shape)}")
        true_ec = torch.as_tensor(true_ec, device=x.device, dtype=ec_t)
        if true_ec.numel() != N * T:
            raise ValueError(f"{op}: sampled_values: true expected counts must match the target ({N}, {T}), got "
                             f"{tuple(true_ec.shape)}")
        true_ec = true_ec.reshape(N, T)
        if _host_checks(sampled, validate):
            _validate.check_index_range(sampled, "sampled_values", op, Vn)
    else:
        smp = _named_sampler(sampler, Vn, sampler_kwargs or {}, x.device)
        if smp.num_classes != Vn:
            raise ValueError(f"{op}: sampler: covers {smp.num_classes} classes, linear_weight has V={Vn}")
        sampled, true_ec, sampled_ec, _ = smp.sample(m, torch.where(ign, -1, labels), unique=unique, groups=group,
                                                     num_groups=G, generator=generator)
    if subtract_log_q:
        true_ec, sampled_ec, bad_ec = _checked_counts(op, true_ec, sampled_ec, ign, group, validate,
                                                      "sampled_values" if sampled_values is not None else "sampler")
    else:  # the counts are not used
        bad_ec = torch.zeros(N, dtype=torch.bool, device=x.device)
        true_ec = torch.ones_like(true_ec)
    # unchecked ids (CUDA without validate=True) never index out of bounds; their rows get a NaN loss
    bad_label = ((labels < 0) | (labels >= Vn)) & ~ign
    bad_samp = (sampled < 0) | (sampled >= Vn)
    bad = bad_label.any(1) | bad_samp.any(1)[group] | bad_ec
    safe_labels = safe_labels.clamp(0, max(Vn - 1, 0))
    sampled = sampled.clamp(0, max(Vn - 1, 0))
    return x, labels, safe_labels, valid, group, sampled, true_ec, sampled_ec, lead, T, use_triton, bad


def _logits(x, W, b, safe_labels, group, sampled, true_ec, sampled_ec, T, subtract_log_q, weight_grad):
    """fp32 (N, T) true logits, (N, m) sampled logits, and the row->group sampled ids (N, m)."""
    N = x.shape[0]
    G, m = sampled.shape
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    ids = torch.cat([safe_labels.reshape(-1), sampled.reshape(-1)])
    sparse = weight_grad == "sparse"
    rows = _rows(W, ids, sparse, ct)
    Dm = W.shape[1]
    wt, ws = rows[:N * T].view(N, T, Dm), rows[N * T:].view(G, m, Dm)
    xc = x.to(ct)
    z_true = (xc[:, None, :] * wt).sum(-1)
    if G == 1:
        z_samp = xc @ ws[0].t()
    elif G <= Dm:  # every group's logits for every row, (N, G*m), then each row's own: memory N*G*m
        z_samp = (xc @ ws.reshape(G * m, Dm).t()).view(N, G, m).gather(1, group[:, None, None].expand(N, 1, m))[:, 0]
    else:  # many groups (e.g. per-row negatives): the gathered rows, memory N*m*D (~ G*m*D)
        z_samp = torch.einsum("nd,nmd->nm", xc, ws[group])
    if b is not None:
        brows = _rows(b, ids, sparse, ct)
        z_true = z_true + brows[:N * T].view(N, T)
        z_samp = z_samp + brows[N * T:].view(G, m)[group]
    if subtract_log_q:
        z_true = z_true - torch.log(true_ec.to(ct))
        z_samp = z_samp - torch.log(sampled_ec.to(ct))[group]
    return z_true, z_samp, sampled[group]


def _hits(labels, row_sampled, sampled, group, hit_policy):
    hit = (row_sampled[:, :, None] == labels[:, None, :]).any(-1)
    if hit_policy == "tf":
        hit = hit & _last_occurrence(sampled)[group]
    return hit


def _loss(op, nce, input, linear_weight, target, num_sampled, linear_bias, sampler, unique, sampler_kwargs,
          sampled_values, generator, num_splits, remove_accidental_hits, subtract_log_q, hit_policy, ignore_index,
          reduction, use_full_softmax, weight_grad, validate, backend, log_norm_term):
    if use_full_softmax:
        from .linear_cross_entropy import linear_cross_entropy
        _check_options(op, num_sampled, num_splits, hit_policy, weight_grad)
        if target.shape != input.shape[:-1]:
            raise ValueError(f"{op}: use_full_softmax: needs one label per row (T = 1), got target "
                             f"{tuple(target.shape)}")
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, ignore_index=ignore_index,
                                    reduction=reduction, validate=validate, backend=backend)
    (x, labels, safe, valid, group, sampled, true_ec, sampled_ec, lead, T, use_triton, bad) = _prepare(
        op, input, linear_weight, target, num_sampled, linear_bias, sampler, unique, sampler_kwargs, sampled_values,
        generator, num_splits, remove_accidental_hits, subtract_log_q, hit_policy, ignore_index, reduction,
        weight_grad, validate, backend)
    if use_triton:
        ct = torch.float32
        logq_t = torch.log(true_ec.to(ct)) if subtract_log_q else torch.zeros(true_ec.shape, device=x.device)
        logq_s = torch.log(sampled_ec[0].to(ct)) if subtract_log_q else torch.zeros(sampled.shape[1], device=x.device)
        last = _last_occurrence(sampled)[0].to(torch.int8)
        w = linear_weight if linear_weight.stride(-1) == 1 else linear_weight.contiguous()
        b = linear_bias.contiguous() if linear_bias is not None else None
        rows, _ = _sm_fwd(x if x.stride(-1) == 1 else x.contiguous(), w, b, safe.contiguous(),
                          logq_t.contiguous(), sampled[0].contiguous(), logq_s.contiguous(), last,
                          valid.to(torch.int8), nce, bool(remove_accidental_hits), hit_policy == "all",
                          float(log_norm_term))
        rows = torch.where(bad, math.nan, rows)
        if reduction == "none":
            return rows.reshape(lead)
        return rows.sum() if reduction == "sum" else rows.sum() / valid.sum()
    z_true, z_samp, row_sampled = _logits(x, linear_weight, linear_bias, safe, group, sampled, true_ec, sampled_ec, T,
                                          subtract_log_q, weight_grad)
    drop = _hits(safe, row_sampled, sampled, group, hit_policy) if remove_accidental_hits else \
        torch.zeros_like(z_samp, dtype=torch.bool)
    if nce:
        zt = z_true - log_norm_term
        zs = z_samp - log_norm_term
        rows = ((1.0 / T) * F.softplus(-zt) + (1.0 - 1.0 / T) * F.softplus(zt)).sum(1)
        rows = rows + torch.where(drop, 0.0, F.softplus(torch.where(drop, 0.0, zs))).sum(1)
    else:
        z = torch.cat([z_true, torch.where(drop, -math.inf, z_samp)], 1)
        lse = torch.logsumexp(z, 1)
        rows = -(z_true - lse[:, None]).mean(1)
    rows = torch.where(valid, rows, torch.zeros_like(rows)).to(torch.float64 if x.dtype == torch.float64 else
                                                            torch.float32)
    rows = torch.where(bad, math.nan, rows)
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


def sampled_softmax_loss(input: Tensor, linear_weight: Tensor, target: Tensor, num_sampled: int, *,
                         linear_bias: Optional[Tensor] = None, sampler="log_uniform", unique: bool = True,
                         sampler_kwargs: Optional[dict] = None, sampled_values=None,
                         generator: Optional[torch.Generator] = None, num_splits: int = 1,
                         remove_accidental_hits: bool = True, subtract_log_q: bool = True, hit_policy: str = "tf",
                         ignore_index: int = -100, reduction: str = "mean", use_full_softmax: bool = False,
                         weight_grad: str = "dense", validate: bool = False, backend: str = "auto") -> Tensor:
    """Sampled softmax loss (TensorFlow's ``sampled_softmax_loss`` semantics; see the module docstring).

    ``target``: ``input.shape[:-1]`` (T = 1) or ``input.shape[:-1] + (T,)``; ``sampled_values``:
    ``(ids (m,) or (G, m), true_expected_count, sampled_expected_count)`` injected as in TF (no sampler
    runs); ``sampler``: an instance or ``"uniform" | "log_uniform" | "fixed_unigram"`` (+ ``sampler_kwargs``).
    ``reduction``: ``"none"`` (``input.shape[:-1]``, fp32), ``"sum"``, ``"mean"`` over non-ignored rows.
    ``use_full_softmax``: exactly :func:`tri_losses.linear_cross_entropy` (evaluation). ``weight_grad``:
    ``"dense"`` or ``"sparse"`` (a coalesced sparse COO gradient for W and b, eager mode).
    """
    return _loss("sampled_softmax_loss", False, input, linear_weight, target, num_sampled, linear_bias, sampler,
                 unique, sampler_kwargs, sampled_values, generator, num_splits, remove_accidental_hits, subtract_log_q,
                 hit_policy, ignore_index, reduction, use_full_softmax, weight_grad, validate, backend, 0.0)


def nce_loss(input: Tensor, linear_weight: Tensor, target: Tensor, num_sampled: int, *,
             linear_bias: Optional[Tensor] = None, sampler="log_uniform", unique: bool = True,
             sampler_kwargs: Optional[dict] = None, sampled_values=None, generator: Optional[torch.Generator] = None,
             num_splits: int = 1, remove_accidental_hits: bool = False, subtract_log_q: bool = True,
             hit_policy: str = "tf", ignore_index: int = -100, reduction: str = "mean", use_full_softmax: bool = False,
             weight_grad: str = "dense", validate: bool = False, log_norm_term: float = 0.0,
             backend: str = "auto") -> Tensor:
    """Noise-contrastive estimation loss (TensorFlow's ``nce_loss``).

    Each true and sampled class is a binary logistic decision on ``s_c - log Q(c) - log_norm_term``
    (true classes positive, samples negative), summed per row.

    Args:
        log_norm_term: a constant subtracted from every logit (RETURNN's ``nce_log_norm_term``).
        input, linear_weight, target, num_sampled, and the keyword options: as in
            :func:`sampled_softmax_loss` (``remove_accidental_hits`` defaults to False here, as in TF).

    Returns:
        As :func:`sampled_softmax_loss`: fp32, ``(N,)`` for ``reduction="none"``.

    Raises:
        ValueError, TypeError: as :func:`sampled_softmax_loss`, and a non-number ``log_norm_term``.
    """
    _validate.check_number(log_norm_term, "log_norm_term", "nce_loss")
    return _loss("nce_loss", True, input, linear_weight, target, num_sampled, linear_bias, sampler, unique,
                 sampler_kwargs, sampled_values, generator, num_splits, remove_accidental_hits, subtract_log_q,
                 hit_policy, ignore_index, reduction, use_full_softmax, weight_grad, validate, backend,
                 float(log_norm_term))


def compute_sampled_logits(input: Tensor, linear_weight: Tensor, target: Tensor, num_sampled: int, *,
                           linear_bias: Optional[Tensor] = None, sampler="log_uniform", unique: bool = True,
                           sampler_kwargs: Optional[dict] = None, sampled_values=None,
                           generator: Optional[torch.Generator] = None, num_splits: int = 1,
                           remove_accidental_hits: bool = True, subtract_log_q: bool = True, hit_policy: str = "tf",
                           ignore_index: int = -100, validate: bool = False, backend: str = "auto"):
    """TF's ``_compute_sampled_logits`` (debugging path): ``(logits (N, T+m) fp32, labels (N, T+m) fp32)``,
    true columns first; a dropped hit column is ``s - FLT_MAX - log EC`` (TF's exact fp32 value)."""
    op = "compute_sampled_logits"
    (x, labels, safe, valid, group, sampled, true_ec, sampled_ec, lead, T, _, bad) = _prepare(
        op, input, linear_weight, target, num_sampled, linear_bias, sampler, unique, sampler_kwargs, sampled_values,
        generator, num_splits, remove_accidental_hits, subtract_log_q, hit_policy, ignore_index, "none", "dense",
        validate, backend)
    z_true, z_samp, row_sampled = _logits(x, linear_weight, linear_bias, safe, group, sampled, true_ec, sampled_ec, T,
                                          False, "dense")
    if remove_accidental_hits:
        drop = _hits(safe, row_sampled, sampled, group, hit_policy)
        z_samp = z_samp.float() + torch.where(drop, -FLT_MAX, 0.0)
    if subtract_log_q:
        z_true = z_true.float() - torch.log(true_ec.float())
        z_samp = z_samp.float() - torch.log(sampled_ec.float())[group]
    logits = torch.where(bad[:, None], math.nan, torch.cat([z_true.float(), z_samp.float()], 1))
    lab = torch.cat([torch.full_like(z_true, 1.0 / T), torch.zeros_like(z_samp)], 1).float()
    return logits, lab


class _SampledModule(torch.nn.Module):
    def __init__(self, in_features, num_classes, num_sampled, *, nce, sampler="log_uniform", bias=True, weight=None,
                 linear_bias=None, sampler_kwargs=None, **kwargs):
        super().__init__()
        if weight is None:
            self.weight = torch.nn.Parameter(torch.randn(num_classes, in_features) / math.sqrt(in_features))
            self.bias = torch.nn.Parameter(torch.zeros(num_classes)) if bias else None
        else:
            self.weight = weight  # borrowed (e.g. tied embeddings)
            self.bias = linear_bias
        if sampler == "learned_unigram":  # the module owns it, so its counts persist (a checkpointed buffer)
            self.sampler = LearnedUnigramSampler(num_classes)
        else:
            self.sampler = make_sampler(sampler, num_classes, **(sampler_kwargs or {}))
        self.num_sampled = num_sampled
        self.nce = nce
        self.kwargs = kwargs

    def _eval_loss(self, input, target):
        from .linear_cross_entropy import linear_cross_entropy
        return linear_cross_entropy(input, self.weight, target, linear_bias=self.bias,
                                    reduction=self.kwargs.get("reduction", "mean"),
                                    ignore_index=self.kwargs.get("ignore_index", -100))

    def forward(self, input, target):
        if not self.training:
            return self._eval_loss(input, target)
        fn = nce_loss if self.nce else sampled_softmax_loss
        return fn(input, self.weight, target, self.num_sampled, linear_bias=self.bias, sampler=self.sampler,
                  **self.kwargs)


class SampledSoftmaxLoss(_SampledModule):
    """Sampled softmax in ``train()``, full softmax cross-entropy (:func:`linear_cross_entropy`) in ``eval()``.
    Owns (or borrows, ``weight=``/``linear_bias=``) W and b, and owns the sampler (learned counts are a buffer)."""

    def __init__(self, in_features, num_classes, num_sampled, **kwargs):
        super().__init__(in_features, num_classes, num_sampled, nce=False, **kwargs)


class NCELoss(_SampledModule):
    """NCE in ``train()``; in ``eval()`` the full softmax CE, or with ``eval_loss="sigmoid"``
    ``sum_c softplus(s_c) - s_y`` per row."""

    def __init__(self, in_features, num_classes, num_sampled, *, eval_loss="softmax", **kwargs):
        super().__init__(in_features, num_classes, num_sampled, nce=True, **kwargs)
        _validate.check_option(eval_loss, "eval_loss", "NCELoss", ("softmax", "sigmoid"))
        self.eval_loss = eval_loss

    def _eval_loss(self, input, target):
        if self.eval_loss == "softmax":
            return super()._eval_loss(input, target)
        s = input.float() @ self.weight.float().t() + (self.bias.float() if self.bias is not None else 0.0)
        ign = target == self.kwargs.get("ignore_index", -100)
        safe = torch.where(ign, torch.zeros_like(target), target)
        rows = F.softplus(s).sum(-1) - s.gather(-1, safe[..., None])[..., 0]
        rows = torch.where(ign, torch.zeros_like(rows), rows)
        red = self.kwargs.get("reduction", "mean")
        return rows if red == "none" else (rows.sum() if red == "sum" else rows.sum() / (~ign).sum())
