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

Backends, both behind the custom ops ``tri_losses::sampled_fwd`` / ``sampled_bwd`` with analytic gradients:
Triton (``tri_losses/kernels/sampled.py``: logit tiles on chip, never the N x (T+m) logits; the weight gradient
written once per touched class in W's dtype, by sorted run sums, no atomics), built for one sample group
(``num_splits=1``, shared negatives): with G > 1 groups ``backend="triton"`` launches the kernels once per
group (rows of other groups masked: G times the work), so ``backend="auto"`` then picks the torch backend
(``tri_losses/_torch/sampled.py``: any number of groups, and float64). ``backend="auto"`` picks Triton when
it applies. ``weight_grad="sparse"`` gives coalesced
sparse COO gradients for W and b (eager mode: selecting the touched rows syncs).
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate
from ._validate import InputError, InputTypeError
from ._backend import autocast_like_linear, custom_op, device_guard, first_order, kernels, resolve_backend
from ._torch import compute_dtype, input_grads, loss_dtype, reduce_loss
from ._torch import sampled as _torch_sampled
from .samplers import LearnedUnigramSampler, Sampler, make_sampler

__all__ = ["sampled_softmax_loss", "nce_loss", "compute_sampled_logits", "SampledSoftmaxLoss", "NCELoss"]

FLT_MAX = 3.4028234663852886e38


@custom_op("tri_losses::sampled_fwd", mutates_args=())
def _sm_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, logq_t: Tensor, samp: Tensor, logq_s: Tensor,
            last: Tensor, group: Tensor, valid: Tensor, nce: bool, remove_hits: bool, all_hits: bool, log_norm: float,
            sparse: bool, use_triton: bool) -> tuple[Tensor, Tensor]:
    """(per-row loss (N,), lse (N,)): fp32, fp64 for fp64 inputs on the torch backend. ``sparse`` only shapes
    the backward's weight gradient."""
    with device_guard(x):
        args = (x, w, b, labels, logq_t, samp, logq_s, last, group, valid, nce, remove_hits, all_hits, log_norm)
        return kernels("sampled").fwd(*args) if use_triton else _torch_sampled.fwd(*args)


@_sm_fwd.register_fake
def _(x, w, b, labels, logq_t, samp, logq_s, last, group, valid, nce, remove_hits, all_hits, log_norm, sparse,
      use_triton):
    ct = loss_dtype(x, use_triton)
    return x.new_empty(x.shape[0], dtype=ct), x.new_empty(x.shape[0], dtype=ct)


@custom_op("tri_losses::sampled_bwd", mutates_args=())
def _sm_bwd(grad: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, logq_t: Tensor, samp: Tensor,
            logq_s: Tensor, last: Tensor, group: Tensor, valid: Tensor, lse: Tensor, nce: bool, remove_hits: bool,
            all_hits: bool, log_norm: float, sparse: bool, need_dw: bool,
            use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, db, keys, ends) in the inputs' dtypes; see ``tri_losses._torch.sampled.bwd`` (without
    ``need_dw`` the weight and bias gradients are empty and their work is skipped)."""
    with device_guard(x):
        args = (grad, x, w, b, labels, logq_t, samp, logq_s, last, group, valid, lse, nce, remove_hits, all_hits,
                log_norm, sparse, need_dw)
        return kernels("sampled").bwd(*args) if use_triton else _torch_sampled.bwd(*args)


@_sm_bwd.register_fake
def _(grad, x, w, b, labels, logq_t, samp, logq_s, last, group, valid, lse, nce, remove_hits, all_hits, log_norm,
      sparse, need_dw, use_triton):
    no_b = x.new_empty(0)
    if not need_dw:
        return (torch.empty_like(x), w.new_empty(0), no_b, labels.new_empty(0, dtype=torch.int64),
                labels.new_empty(0, dtype=torch.bool))
    if not sparse:
        return (torch.empty_like(x), torch.empty_like(w), torch.empty_like(b) if b is not None else no_b,
                labels.new_empty(0, dtype=torch.int64), labels.new_empty(0, dtype=torch.bool))
    k = samp.numel() + labels.numel()  # one entry per contribution: G*m sampled rows, N*T true labels
    return (torch.empty_like(x), w.new_empty(k, w.shape[1]), b.new_empty(k) if b is not None else no_b,
            labels.new_empty(k, dtype=torch.int64), labels.new_empty(k, dtype=torch.bool))


_FWD_INPUTS = 16  # _sm_fwd's inputs (the backward returns one gradient or None for each)


def _sm_setup(ctx, inputs, output):
    x, w, b, labels, logq_t, samp, logq_s, last, group, valid = inputs[:10]
    ctx.save_for_backward(x, w, b, labels, logq_t, samp, logq_s, last, group, valid, output[1])
    ctx.flags = inputs[10:14]  # nce, remove_hits, all_hits, log_norm
    ctx.sparse, ctx.use_triton = inputs[14:]
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _sparse_rows(rows, keys, ends, shape):
    """A coalesced sparse COO gradient: one row per touched class (selecting the runs' ends syncs: eager mode,
    as coalescing does)."""
    with torch.sparse.check_sparse_tensor_invariants(enable=False):  # valid by construction; said explicitly,
        return torch.sparse_coo_tensor(keys[ends][None, :], rows[ends], shape,  # torch does not warn
                                       is_coalesced=True, check_invariants=False)


@first_order("sampled_softmax_loss / nce_loss")
def _sm_backward(ctx, grad, grad_lse):
    x, w, b, labels, logq_t, samp, logq_s, last, group, valid, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad is None:  # grads are not materialised: an unused loss is a zero upstream
        grad = torch.zeros_like(lse)
    need_w, need_b = need[1], b is not None and need[2]
    dx, dw, db, keys, ends = _sm_bwd(grad, x, w, b, labels, logq_t, samp, logq_s, last, group, valid, lse,
                                     *ctx.flags, ctx.sparse, need_w or need_b, ctx.use_triton)
    if ctx.sparse and (need_w or need_b):
        dw = _sparse_rows(dw, keys, ends, w.shape) if need_w else None
        db = _sparse_rows(db, keys, ends, b.shape) if need_b else None
    return input_grads(_FWD_INPUTS, dx, dw if need_w else None, db if need_b else None)


_sm_fwd.register_autograd(_sm_backward, setup_context=_sm_setup)


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


def _sampler_device(smp: Sampler):
    """The device of a sampler's tables (None: it has none)."""
    return next((b.device for b in smp.buffers()), None)


def _move_own_sampler(smp: Sampler, device) -> None:
    """An owner (a loss module, the RETURNN layer) moves the sampler it owns to the input's device, in place
    (the learned counts go on there); never to ``meta`` (a shape-only call must not drop the tables)."""
    if device.type != "meta" and _sampler_device(smp) not in (None, device):
        smp.to(device)


def _named_sampler(sampler, Vn, kwargs, device, op):
    """A sampler instance as is (on the input's device: the caller's object is not moved, except a copy for a
    ``meta`` input); by name, built once per (name, V, kwargs, device) and reused (its table is O(V):
    rebuilding it, or re-reading a vocab file, on every step would cost a host-to-device copy)."""
    if isinstance(sampler, Sampler):
        dev = _sampler_device(sampler)
        if dev is None or dev == device:
            return sampler
        if device.type == "meta":  # shape inference: a copy, the caller's tables stay where they are
            return copy.deepcopy(sampler).to(device)
        raise InputError(f"{op}: sampler: expected its tables on the input's device {device}, got {dev} (move it "
                         f"with sampler.to(device); a loss module moves the sampler it owns itself)")
    if not torch.compiler.is_compiling() and _validate.fake_mode_active():
        return make_sampler(sampler, Vn, **kwargs).to(device)  # fake tables (FakeTensorMode): never cached
    if any(isinstance(v, Tensor) for v in kwargs.values()):
        # a tensor option (e.g. unigram counts) is keyed by identity: updated in place it would keep serving
        # the first table; built for this call (build the sampler once and pass it to avoid the O(V) work)
        return make_sampler(sampler, Vn, **kwargs).to(device)
    try:  # (a dict lookup, not hash(): torch.compile before torch 2.13 cannot trace the builtin)
        key = (sampler, Vn, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())),
               str(device))
        cached = _SAMPLER_CACHE.get(key)
    except TypeError:  # an unhashable option value: built for this call
        return make_sampler(sampler, Vn, **kwargs).to(device)
    if cached is None:
        if len(_SAMPLER_CACHE) >= 16:
            _SAMPLER_CACHE.clear()
        cached = _SAMPLER_CACHE[key] = make_sampler(sampler, Vn, **kwargs).to(device)
    return cached


@dataclass(frozen=True)
class _Options:
    """The options of one call, built once by the public function (the ops take the flat scalars their schema
    needs)."""
    op: str
    nce: bool
    num_sampled: int
    sampler: object = "log_uniform"
    unique: bool = True
    sampler_kwargs: Optional[dict] = None
    sampled_values: object = None
    generator: Optional[torch.Generator] = None
    num_splits: int = 1
    remove_accidental_hits: bool = True
    subtract_log_q: bool = True
    hit_policy: str = "tf"
    ignore_index: int = -100
    reduction: str = "mean"
    use_full_softmax: bool = False
    weight_grad: str = "dense"
    validate: bool = False
    backend: str = "auto"
    log_norm_term: float = 0.0

    def check(self):
        op = self.op
        _validate.check_option(self.hit_policy, "hit_policy", op, ("tf", "all"))
        _validate.check_option(self.weight_grad, "weight_grad", op, ("dense", "sparse"))
        _validate.check_reduction(self.reduction, op)
        for name in ("num_sampled", "num_splits"):
            object.__setattr__(self, name, _validate.as_int(getattr(self, name), name, op, low=1))
        object.__setattr__(self, "ignore_index", _validate.check_ignore_index(self.ignore_index, op))
        _validate.check_number(self.log_norm_term, "log_norm_term", op)
        _validate.check_bool(op, unique=self.unique, remove_accidental_hits=self.remove_accidental_hits,
                             subtract_log_q=self.subtract_log_q, use_full_softmax=self.use_full_softmax,
                             validate=self.validate)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise InputTypeError(f"{op}: generator: expected a torch.Generator or None, got "
                                 f"{type(self.generator).__name__}")
        if self.sampler_kwargs is not None and not isinstance(self.sampler_kwargs, dict):
            raise InputTypeError(f"{op}: sampler_kwargs: expected a dict or None, got "
                                 f"{type(self.sampler_kwargs).__name__}")


class _Prepared(NamedTuple):
    """Flattened rows and their samples, ready for the ops."""
    x: Tensor            # (N, D) input rows
    labels: Tensor       # (N, T) int64 labels, ignored and out-of-range ids replaced by valid placeholders
    valid: Tensor        # (N,) bool: not ignored
    group: Tensor        # (N,) int64 sample group of each row (0 for ignored rows)
    sampled: Tensor      # (G, m) int64 sampled ids, clamped into [0, V)
    true_ec: Tensor      # (N, T) expected counts of the labels (1 where unused)
    sampled_ec: Tensor   # (G, m) expected counts of the samples
    bad: Tensor          # (N,) bool: rows that get a NaN loss and no gradient (unchecked bad ids or counts)
    nan_loss: Tensor     # (N,) bool: rows whose loss is NaN but whose gradient stands (a sampled count of +inf)
    lead: tuple          # input.shape[:-1]
    use_triton: bool


def _host_checks(t: Tensor, validate: bool) -> bool:
    """Whether value checks read ``t``: always on the CPU, on CUDA only with ``validate=True`` (a host sync),
    never while compiling."""
    return _validate.host_readable(t, validate)


def _checked_counts(op, true_ec, sampled_ec, ign, group, validate, source):
    """Expected counts must be finite and > 0 (log Q). ``validate=True`` raises (a host read on CUDA); otherwise
    TF's results, which it computes without a check: a true count of +inf makes that logit -inf, so the row's
    loss is +inf and its gradient finite (p = 0 there), as IEEE arithmetic gives it; a sampled count of +inf
    makes that column's logit -inf (p = 0: the gradient as if the column were not drawn) and, as in TF (whose
    cross-entropy forms 0 * inf there), the loss of the rows of its group NaN; every other bad count (0,
    < 0, NaN: TF's logits are NaN or +inf minus the row maximum) gives the rows that use it a NaN loss on both
    backends, its count replaced by 1 so that they add nothing to any gradient (TF's gradients there are
    NaN or differ between its two losses). Ignored rows take no part (count 1, loss 0). Returns (true_ec,
    sampled_ec, rows with a NaN loss and no gradient (N,), rows with a NaN loss (N,))."""
    ok_t = ((true_ec > 0) & torch.isfinite(true_ec)) | ign
    ok_s = (sampled_ec > 0) & torch.isfinite(sampled_ec)
    for name, ec, ok in (("true", true_ec, ok_t), ("sampled", sampled_ec, ok_s)):
        if validate and ec.numel() and _host_checks(ec, validate) and not bool(ok.all()):
            raise InputError(f"{op}: {source}: {name} expected counts must be finite and > 0, got "
                             f"{ec[~ok][0].item()}")
    ok_t = ok_t | (true_ec == math.inf)
    inf_s = sampled_ec == math.inf
    live = ~ign.all(1)
    bad = (~ok_t.all(1) | ~(ok_s | inf_s).all(1)[group]) & live
    return (torch.where(ok_t & ~ign, true_ec, torch.ones_like(true_ec)),
            torch.where(ok_s | inf_s, sampled_ec, torch.ones_like(sampled_ec)), bad, inf_s.any(1)[group] & live)


def _prepare(opts: _Options, input: Tensor, linear_weight: Tensor, target: Tensor,
             linear_bias: Optional[Tensor]) -> _Prepared:
    op = opts.op
    _validate.check_float(input, "input", op)
    _validate.check_float(linear_weight, "linear_weight", op)
    _validate.check_same_dtype(linear_weight, input, "linear_weight", "input", op)
    _validate.check_int(target, "target", op)
    _validate.check_same_device(input, linear_weight, "input", "linear_weight", op)
    _validate.check_same_device(input, target, "input", "target", op)
    if linear_bias is not None:
        _validate.check_tensor(linear_bias, "linear_bias", op)
        _validate.check_same_device(input, linear_bias, "input", "linear_bias", op)
    opts.check()
    use_triton = resolve_backend(opts.backend, input, op, has_triton=op != "compute_sampled_logits",
                                 inputs=(linear_weight, linear_bias))
    if use_triton and opts.num_splits != 1 and opts.backend != "triton":
        use_triton = False  # the kernels take one sample group: G launches (G x the work); forced "triton" runs them
    if linear_weight.dim() != 2:
        raise InputError(f"{op}: linear_weight: expected (V, D), got {tuple(linear_weight.shape)}")
    Vn, D = linear_weight.shape
    if input.dim() < 1 or input.shape[-1] != D:
        raise InputError(f"{op}: input: expected last dim D={D}, got {tuple(input.shape)}")
    if linear_bias is not None:
        _validate.check_float(linear_bias, "linear_bias", op)
        _validate.check_same_dtype(linear_bias, input, "linear_bias", "input", op)
        _validate.check_shape(linear_bias, (Vn,), "linear_bias", op)
    lead = tuple(input.shape[:-1])
    if tuple(target.shape) == lead:
        labels = target.reshape(-1, 1)
    elif target.dim() == len(lead) + 1 and tuple(target.shape[:-1]) == lead:
        if target.shape[-1] == 0:
            raise InputError(f"{op}: target: expected at least one label per row (T >= 1), got shape "
                             f"{tuple(target.shape)}")
        labels = target.reshape(-1, target.shape[-1])
    else:
        raise InputError(f"{op}: target: expected shape {lead} or {lead + ('T',)}, got {tuple(target.shape)}")
    x = input.reshape(-1, D)
    N, T = labels.shape
    labels = labels.long()
    ign = labels == opts.ignore_index
    row_ign = ign.all(1)
    if _host_checks(labels, opts.validate) and labels.numel():
        if bool((ign.any(1) & ~row_ign).any()):
            raise InputError(f"{op}: target: a row mixes ignore_index={opts.ignore_index} with real labels")
        _validate.check_index_range(labels, "target", op, Vn, ignore_index=opts.ignore_index)
    valid = ~row_ign
    G = opts.num_splits
    rank = torch.cumsum(valid.long(), 0) - 1
    chunk = valid.sum() // G
    # chunks of floor(N'/G) rows in order, the last takes the remainder (all rows if floor(N'/G) = 0)
    group = torch.where(chunk > 0, (rank // chunk.clamp(min=1)).clamp(max=G - 1), G - 1)
    group = torch.where(valid, group, 0)
    m = opts.num_sampled
    if opts.sampled_values is not None:
        sampled, true_ec, sampled_ec = _injected(opts, opts.sampled_values, x, lead, T, Vn)
    else:
        smp = _named_sampler(opts.sampler, Vn, opts.sampler_kwargs or {}, x.device, op)
        if smp.num_classes != Vn:
            raise InputError(f"{op}: sampler: covers {smp.num_classes} classes, linear_weight has V={Vn}")
        sampled, true_ec, sampled_ec, _ = smp.sample(m, torch.where(ign, -1, labels), unique=opts.unique,
                                                     groups=group, num_groups=G, generator=opts.generator)
    if opts.subtract_log_q:
        true_ec, sampled_ec, bad_ec, nan_loss = _checked_counts(
            op, true_ec, sampled_ec, ign, group, opts.validate,
            "sampled_values" if opts.sampled_values is not None else "sampler")
    else:  # the counts are not used
        bad_ec = nan_loss = torch.zeros(N, dtype=torch.bool, device=x.device)
        true_ec = torch.ones_like(true_ec)
    # unchecked ids (CUDA without validate=True) never index out of bounds; their rows get a NaN loss, as do
    # unchecked rows that mix ignore_index with real labels
    bad_label = ((labels < 0) | (labels >= Vn)) & ~ign
    bad_samp = (sampled < 0) | (sampled >= Vn)
    bad = bad_label.any(1) | (ign.any(1) & ~row_ign) | bad_samp.any(1)[group] | bad_ec
    top = max(Vn - 1, 0)
    return _Prepared(x, torch.where(ign, 0, labels).clamp(0, top), valid, group, sampled.clamp(0, top), true_ec,
                     sampled_ec, bad, nan_loss & ~bad, lead, use_triton)


def _injected(opts, sampled_values, x, lead, T, Vn):
    """``sampled_values = (ids (m,) or (G, m), true counts like the target or with a trailing 1 (TF's
    (N, T)), sampled counts like the ids)``, as (sampled (G, m), true_ec (N, T), sampled_ec (G, m)) on the
    input's device."""
    op, G, m = opts.op, opts.num_splits, opts.num_sampled
    N = x.shape[0]
    if not isinstance(sampled_values, (tuple, list)) or len(sampled_values) != 3:
        raise InputTypeError(f"{op}: sampled_values: expected (sampled, true_expected_count, sampled_expected_count), "
                        f"got {type(sampled_values).__name__}")
    sampled, true_ec, sampled_ec = sampled_values
    _validate.check_int(sampled, "sampled_values", op)
    sampled = _validate.to_device(sampled, x.device, name="sampled_values", op=op).long()
    true_ec, sampled_ec = (_validate.to_device(c, x.device, name="sampled_values", op=op)
                           if isinstance(c, Tensor) else c for c in (true_ec, sampled_ec))
    if sampled.dim() == 1:
        sampled = sampled[None, :].expand(G, -1)
    if tuple(sampled.shape) != (G, m):
        raise InputError(f"{op}: sampled_values: expected sampled ids of shape ({m},) or ({G}, {m}), got "
                         f"{tuple(sampled.shape)}")
    ec_t = compute_dtype(x)
    # counts are constants (TF stops their gradient): detached, so compute_sampled_logits gives them none either
    sampled_ec = torch.as_tensor(sampled_ec, device=x.device, dtype=ec_t).detach()
    sampled_ec = sampled_ec[None, :].expand(G, -1) if sampled_ec.dim() == 1 else sampled_ec
    if tuple(sampled_ec.shape) != (G, m):
        raise InputError(f"{op}: sampled_values: sampled expected counts must match the ids {(G, m)}, got "
                         f"{tuple(sampled_ec.shape)}")
    true_ec = torch.as_tensor(true_ec, device=x.device, dtype=ec_t).detach()
    shapes = (lead + (T,), lead + (T, 1)) + ((lead,) if T == 1 else ())
    # compared with ==, not by set membership: hashing a traced (symbolic) size pins it to its value
    if not any(tuple(true_ec.shape) == s for s in shapes):
        raise InputError(f"{op}: sampled_values: true expected counts must have the target's shape "
                         f"{lead + ((T,) if T > 1 else ())} (or with a trailing 1), got {tuple(true_ec.shape)}")
    if _host_checks(sampled, opts.validate):
        _validate.check_index_range(sampled, "sampled_values", op, Vn)
    return sampled, true_ec.reshape(N, T), sampled_ec


def _reduce(rows: Tensor, p: _Prepared, reduction: str) -> Tensor:
    """NaN on bad rows (no gradient) and on ``nan_loss`` rows (the gradient kept: a NaN added as a constant),
    then the reduction (``"mean"`` over non-ignored rows)."""
    rows = torch.where(p.bad, math.nan, rows) + torch.where(p.nan_loss, math.nan, 0.0)
    return reduce_loss(rows.reshape(p.lead), reduction, p.valid.sum())


def _loss(opts: _Options, input, linear_weight, target, linear_bias):
    if opts.use_full_softmax:
        from .linear_cross_entropy import linear_cross_entropy
        opts.check()
        if target.shape != input.shape[:-1]:
            raise InputError(f"{opts.op}: use_full_softmax: needs one label per row (T = 1), got target "
                             f"{tuple(target.shape)}")
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    ignore_index=opts.ignore_index, reduction=opts.reduction, validate=opts.validate,
                                    backend=opts.backend)
    p = _prepare(opts, input, linear_weight, target, linear_bias)
    ct = loss_dtype(p.x, p.use_triton)
    if opts.subtract_log_q:
        logq_t, logq_s = torch.log(p.true_ec.to(ct)), torch.log(p.sampled_ec.to(ct))
    else:
        logq_t, logq_s = p.true_ec.new_zeros(p.true_ec.shape, dtype=ct), p.sampled_ec.new_zeros(p.sampled.shape,
                                                                                                 dtype=ct)
    x = p.x if p.x.stride(-1) == 1 else p.x.contiguous()
    w = linear_weight if linear_weight.stride(-1) == 1 else linear_weight.contiguous()
    b = linear_bias.contiguous() if linear_bias is not None else None
    rows, _ = _sm_fwd(x, w, b, p.labels.contiguous(), logq_t.contiguous(), p.sampled.contiguous(),
                      logq_s.contiguous(), _last_occurrence(p.sampled).to(torch.int8), p.group,
                      p.valid.to(torch.int8), opts.nce, bool(opts.remove_accidental_hits), opts.hit_policy == "all",
                      float(opts.log_norm_term), opts.weight_grad == "sparse", p.use_triton)
    return _reduce(rows, p, opts.reduction)


@autocast_like_linear
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
    runs); ``sampler``: an instance (its tables on the input's device, else ``ValueError``: it is not moved) or
    ``"uniform" | "log_uniform" | "fixed_unigram"`` (+ ``sampler_kwargs``; built once per device and options and
    reused, except when an option is a tensor, which is read again on every call).
    ``unique``: draw ``num_sampled`` distinct ids (TF's ``unique=True``; the expected counts follow the number
    of tries) or with replacement. ``num_splits``: ``G`` groups of rows (in order, over non-ignored rows), each
    with its own draw (``sampled_values`` ids then ``(G, m)``). ``remove_accidental_hits``: drop a sampled id
    that equals one of the row's labels, at its last position in the draw (``hit_policy="tf"``) or at every
    position (``"all"``). ``subtract_log_q``: subtract ``log EC`` (the expected count) from every true and
    sampled logit, as TF; False drops both log terms.
    ``reduction``: ``"none"`` (``input.shape[:-1]``), ``"sum"``, ``"mean"`` over non-ignored rows; the loss is
    fp32 (fp64 for fp64 inputs, on the torch backend: what ``gradcheck`` needs).
    ``use_full_softmax``: exactly :func:`tri_losses.linear_cross_entropy` (evaluation). ``weight_grad``:
    ``"dense"`` or ``"sparse"`` (a coalesced sparse COO gradient for W and b, eager mode; ``torch.autograd.grad``
    returns it so, while ``.backward()``'s accumulation into ``.grad`` drops PyTorch's coalesced flag, the rows
    staying sorted and unique: ``W.grad.coalesce()`` then costs no merge, and ``.indices()`` needs it).
    Expected counts must be finite and > 0: ``validate=True`` raises; otherwise the loss is TF's, which checks
    nothing: a row whose true count is +inf gets +inf (that logit is -inf; its gradient stands), a sampled
    count of +inf drops its column and makes its group's losses NaN (gradients as without the column), and
    a row using any other bad count (0, < 0, NaN) gets a NaN loss and no gradient. Out-of-range ids raise on
    CPU and with ``validate=True``; elsewhere their rows get a NaN loss too.
    ``generator``: a ``torch.Generator`` on the input's device (None: the device's default generator). A
    generator state repeats its samples on one device. Under ``torch.compile`` the default generator's draw is
    traced into the graph; an explicit ``generator`` cannot be traced, so the draw runs eagerly before the
    graph (a graph break, refused by ``fullgraph=True``): there, draw eagerly and pass ``sampled_values``.
    Under activation checkpointing (``torch.utils.checkpoint``) the recomputed forward draws again: with the
    default generator, whose state the checkpoint restores, it draws the same classes; an explicit
    ``generator`` (not restored) or a ``LearnedUnigramSampler`` (whose counts the recomputation updates
    again, as BatchNorm's running statistics) would give gradients of another draw, so there draw before the
    checkpoint and pass ``sampled_values``.
    """
    return _loss(_Options("sampled_softmax_loss", False, num_sampled, sampler=sampler, unique=unique,
                          sampler_kwargs=sampler_kwargs, sampled_values=sampled_values, generator=generator,
                          num_splits=num_splits, remove_accidental_hits=remove_accidental_hits,
                          subtract_log_q=subtract_log_q, hit_policy=hit_policy, ignore_index=ignore_index,
                          reduction=reduction, use_full_softmax=use_full_softmax, weight_grad=weight_grad,
                          validate=validate, backend=backend), input, linear_weight, target, linear_bias)


@autocast_like_linear
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
        As :func:`sampled_softmax_loss`: fp32 (fp64 for fp64 inputs), ``(N,)`` for ``reduction="none"``.

    Raises:
        ValueError, TypeError: as :func:`sampled_softmax_loss`, and a non-number ``log_norm_term``.
    """
    return _loss(_Options("nce_loss", True, num_sampled, sampler=sampler, unique=unique,
                          sampler_kwargs=sampler_kwargs, sampled_values=sampled_values, generator=generator,
                          num_splits=num_splits, remove_accidental_hits=remove_accidental_hits,
                          subtract_log_q=subtract_log_q, hit_policy=hit_policy, ignore_index=ignore_index,
                          reduction=reduction, use_full_softmax=use_full_softmax, weight_grad=weight_grad,
                          validate=validate, backend=backend, log_norm_term=log_norm_term),
                 input, linear_weight, target, linear_bias)


@autocast_like_linear
def compute_sampled_logits(input: Tensor, linear_weight: Tensor, target: Tensor, num_sampled: int, *,
                           linear_bias: Optional[Tensor] = None, sampler="log_uniform", unique: bool = True,
                           sampler_kwargs: Optional[dict] = None, sampled_values=None,
                           generator: Optional[torch.Generator] = None, num_splits: int = 1,
                           remove_accidental_hits: bool = True, subtract_log_q: bool = True, hit_policy: str = "tf",
                           ignore_index: int = -100, validate: bool = False, backend: str = "auto"):
    """TF's ``_compute_sampled_logits`` (debugging path, plain differentiable torch): ``(logits (N, T+m) fp32,
    labels (N, T+m) fp32)``, true columns first; a dropped hit column is ``s - FLT_MAX - log EC`` (TF's exact
    fp32 value)."""
    opts = _Options("compute_sampled_logits", False, num_sampled, sampler=sampler, unique=unique,
                    sampler_kwargs=sampler_kwargs, sampled_values=sampled_values, generator=generator,
                    num_splits=num_splits, remove_accidental_hits=remove_accidental_hits,
                    subtract_log_q=subtract_log_q, hit_policy=hit_policy, ignore_index=ignore_index,
                    validate=validate, backend=backend)
    p = _prepare(opts, input, linear_weight, target, linear_bias)
    z_true, z_samp = _torch_sampled.class_scores(p.x, linear_weight, linear_bias, p.labels, p.sampled, p.group,
                                                 compute_dtype(p.x),
                                                 layout=_torch_sampled._layout(p.group, None, opts.num_splits))
    z_true, z_samp = z_true.float(), z_samp.float()
    if remove_accidental_hits:
        drop = _torch_sampled.hits(p.labels, p.sampled, _last_occurrence(p.sampled), p.group, hit_policy == "all")
        z_samp = z_samp + torch.where(drop, -FLT_MAX, 0.0)
    if subtract_log_q:
        z_true = z_true - torch.log(p.true_ec.float())
        z_samp = z_samp - torch.log(p.sampled_ec.float())[p.group]
    logits = torch.where(p.bad[:, None], math.nan, torch.cat([z_true, z_samp], 1))
    T = z_true.shape[1]
    lab = torch.cat([torch.full_like(z_true, 1.0 / T), torch.zeros_like(z_samp)], 1)
    return logits, lab


# the training options that also apply to the full softmax of eval()
_EVAL_OPTIONS = ("reduction", "ignore_index", "validate", "backend")


class _SampledModule(torch.nn.Module):
    def __init__(self, in_features, num_classes, num_sampled, *, nce, sampler="log_uniform", bias=True, weight=None,
                 linear_bias=None, sampler_kwargs=None, **kwargs):
        super().__init__()
        name = type(self).__name__
        in_features = _validate.as_int(in_features, "in_features", name, low=1, what="a positive int")
        num_classes = _validate.as_int(num_classes, "num_classes", name, low=1, what="a positive int")
        num_sampled = _validate.as_int(num_sampled, "num_sampled", name, low=1, what="a positive int")
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
        fn = nce_loss if nce else sampled_softmax_loss
        own = {"linear_bias", "sampler", "sampler_kwargs"}  # the module's own (W, b and the sampler)
        options = [n for n, p in inspect.signature(fn).parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in own]
        unknown = sorted(set(kwargs) - set(options))
        if unknown:  # as torch.nn modules: at construction, not at the first training step
            raise InputTypeError(f"{type(self).__name__}: unexpected keyword argument(s) {unknown}; the options are "
                                 f"{options}")
        self.kwargs = kwargs

    def _eval_loss(self, input, target):
        from .linear_cross_entropy import linear_cross_entropy
        return linear_cross_entropy(input, self.weight, target, linear_bias=self.bias,
                                    **{k: v for k, v in self.kwargs.items() if k in _EVAL_OPTIONS})

    def forward(self, input, target):
        if not self.training:
            return self._eval_loss(input, target)
        fn = nce_loss if self.nce else sampled_softmax_loss
        _move_own_sampler(self.sampler, input.device)  # (e.g. borrowed tied weights: the module was not moved)
        return fn(input, self.weight, target, self.num_sampled, linear_bias=self.bias, sampler=self.sampler,
                  **self.kwargs)


class SampledSoftmaxLoss(_SampledModule):
    """Sampled softmax in ``train()``, full softmax cross-entropy (:func:`linear_cross_entropy`) in ``eval()``.

    ``SampledSoftmaxLoss(in_features, num_classes, num_sampled, *, sampler="log_uniform", sampler_kwargs=None,
    bias=True, weight=None, linear_bias=None, **options)``: owns W ``(num_classes, in_features)`` and, with
    ``bias=True`` (the default), b ``(num_classes,)``, or borrows them (``weight=``/``linear_bias=``, e.g. tied
    embeddings); owns the sampler (a name for :func:`~tri_losses.samplers.make_sampler` with
    ``sampler_kwargs``, an instance, or ``"learned_unigram"``, whose counts are a checkpointed buffer; it moves
    with the module, and to the input's device at a call, e.g. with borrowed weights).
    ``options``: the keyword options of :func:`sampled_softmax_loss` (``unique``, ``num_splits``,
    ``remove_accidental_hits``, ``reduction``, ``ignore_index``, ``backend``, ...), checked at construction;
    ``eval()`` uses ``reduction``, ``ignore_index``, ``validate`` and ``backend`` of them.
    ``forward(input (..., in_features), target)`` returns the loss."""

    def __init__(self, in_features, num_classes, num_sampled, **kwargs):
        super().__init__(in_features, num_classes, num_sampled, nce=False, **kwargs)


class NCELoss(_SampledModule):
    """NCE in ``train()``; in ``eval()`` the full softmax CE, or with ``eval_loss="sigmoid"``
    ``sum_c softplus(s_c) - s_y`` per row.

    Constructed as :class:`SampledSoftmaxLoss` (the same owned or borrowed W, b and sampler), with the keyword
    options of :func:`nce_loss` (``log_norm_term`` too) and ``eval_loss="softmax" | "sigmoid"``."""

    def __init__(self, in_features, num_classes, num_sampled, *, eval_loss="softmax", **kwargs):
        super().__init__(in_features, num_classes, num_sampled, nce=True, **kwargs)
        _validate.check_option(eval_loss, "eval_loss", "NCELoss", ("softmax", "sigmoid"))
        self.eval_loss = eval_loss

    def _eval_loss(self, input, target):
        if self.eval_loss == "softmax":
            return super()._eval_loss(input, target)
        op, V = "NCELoss", self.weight.shape[0]
        ignore_index = self.kwargs.get("ignore_index", -100)
        _validate.check_float(input, "input", op)
        _validate.check_int(target, "target", op)
        if input.dim() < 1 or input.shape[-1] != self.weight.shape[1]:
            raise InputError(f"{op}: input: expected shape (..., {self.weight.shape[1]}) (in_features last), got "
                             f"{tuple(input.shape)}")
        if tuple(target.shape) != tuple(input.shape[:-1]):
            raise InputError(f"{op}: target: expected shape {tuple(input.shape[:-1])} (input's leading dims), got "
                             f"{tuple(target.shape)}")
        _validate.check_same_device(input, target, "input", "target", op)
        target = _validate.class_ids(target, ignore_index)
        if _validate.host_readable(target, self.kwargs.get("validate", False)):
            _validate.check_index_range(target, "target", op, V, ignore_index=ignore_index)
        s = input.float() @ self.weight.float().t() + (self.bias.float() if self.bias is not None else 0.0)
        ign = target == ignore_index
        bad = ~ign & ((target < 0) | (target >= V))  # unchecked out-of-range ids (CUDA): NaN rows
        safe = torch.where(ign | bad, torch.zeros_like(target), target).long()
        rows = F.softplus(s).sum(-1) - s.gather(-1, safe[..., None])[..., 0]
        rows = torch.where(ign, torch.zeros_like(rows), torch.where(bad, math.nan, rows))
        return reduce_loss(rows, self.kwargs.get("reduction", "mean"), (~ign).sum())
