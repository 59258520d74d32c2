"""CTC: ``ctc_loss`` / ``CTCLoss`` (a drop-in for PyTorch's), ``ctc_posteriors``, ``ctc_best_path``,
``ctc_greedy_decode``.

Ops ``tri_losses::ctc_fwd`` (loss, the forward variables alpha, the per-frame lse for logits input)
and ``tri_losses::ctc_bwd`` (beta fused with the gradient). Gradients:

* ``input_type="logits"`` (the log-softmax is fused, never materialised): ``softmax - gamma``;
* ``input_type="log_probs"``: the true partial derivative ``-gamma``. PyTorch's ``F.ctc_loss``
  returns ``exp(log_probs) - gamma`` here, which is the gradient w.r.t. the logits when a
  ``log_softmax`` precedes it; through a ``log_softmax`` both give the same logits gradient.

gamma is the per-frame class posterior; frames at or after ``input_lengths[b]`` get exactly 0;
infeasible sequences get gradient 0 (loss +inf, or 0 with ``zero_infinity``), never NaN.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _validate as V
from ._backend import device_guard, resolve_backend
from ._torch import ctc as _tctc

__all__ = ["ctc_loss", "CTCLoss", "ctc_posteriors", "ctc_best_path", "ctc_greedy_decode"]


def _kernels():
    from tri_losses.kernels import ctc as K
    return K


def _frame_lse(x: Tensor, use_triton: bool) -> Tensor:
    """Per-frame log-sum-exp (T, B) of logits (fp32), a fully parallel pass."""
    if use_triton:
        T, B, C = x.shape
        out = torch.empty(T, B, dtype=torch.float32, device=x.device)
        with device_guard(x):
            _kernels().row_lse(x, out)
        return out
    return torch.logsumexp(x.double() if x.dtype == torch.float64 else x.float(), dim=-1)


def _fwd_impl(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop, use_triton):
    lse = _frame_lse(x, use_triton) if is_logits else None
    if use_triton:
        with device_guard(x):
            alpha, logz = _kernels().ctc_alpha(x, lse, targets, input_lengths, target_lengths, blank, label_loop,
                                                 viterbi)
    else:
        alpha, logz, *_ = _tctc.forward(x, lse, targets, input_lengths, target_lengths, blank, label_loop, viterbi)
    return alpha, logz, lse


@torch.library.custom_op("tri_losses::ctc_fwd", mutates_args=())
def _ctc_fwd(x: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int, is_logits: bool,
             viterbi: bool, label_loop: bool, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    alpha, logz, lse = _fwd_impl(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop,
                                 use_triton)
    if lse is None:
        lse = x.new_empty(0, dtype=torch.float32)
    return (-logz).to(torch.float64 if x.dtype == torch.float64 else torch.float32), alpha, lse


@_ctc_fwd.register_fake
def _(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop, use_triton):
    T, B, _ = x.shape
    L = 2 * targets.shape[1] + 1
    ct = torch.float64 if (x.dtype == torch.float64 and not use_triton) else torch.float32
    lse = x.new_empty(T, B, dtype=ct) if is_logits else x.new_empty(0, dtype=ct)
    return x.new_empty(B, dtype=ct), x.new_empty(T, B, L, dtype=ct), lse


def _gamma_states(x, targets, input_lengths, target_lengths, alpha, lse, loss, blank, viterbi, label_loop):
    """torch backend: per-class posteriors (T, B, C) fp32 (one-hot path with Viterbi)."""
    T, B, C = x.shape
    logz = -loss
    ext, valid, skip = _tctc.extended(targets, target_lengths, blank)
    if viterbi:
        path = _tctc.viterbi_path(alpha, ext, skip, input_lengths, target_lengths, label_loop, blank)
        frames = torch.arange(T, device=x.device)[:, None] < input_lengths[None, :]
        ok = frames & torch.isfinite(logz)[None, :]
        g = torch.nn.functional.one_hot(path.t(), C).to(alpha.dtype)
        return torch.where(ok[..., None], g, 0.0)
    gam = _tctc.posteriors(x, lse, alpha, logz, ext, valid, skip, input_lengths, target_lengths, label_loop)
    return _tctc.class_posteriors(gam, ext, C)


@torch.library.custom_op("tri_losses::ctc_bwd", mutates_args=())
def _ctc_bwd(grad_loss: Tensor, x: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
             alpha: Tensor, lse: Tensor, loss: Tensor, blank: int, is_logits: bool, viterbi: bool, label_loop: bool,
             use_triton: bool) -> Tensor:
    T, B, C = x.shape
    lse_ = lse if is_logits else None
    if use_triton:
        grad = torch.empty_like(x)
        with device_guard(x):
            _kernels().ctc_grad(grad, grad_loss, x, lse_, targets, input_lengths, target_lengths, alpha, loss, blank,
                                label_loop, viterbi)
        return grad
    gam = _gamma_states(x, targets, input_lengths, target_lengths, alpha, lse_, loss, blank, viterbi, label_loop)
    frames = (torch.arange(T, device=x.device)[:, None] < input_lengths[None, :])[..., None]
    feasible = torch.isfinite(loss)[None, :, None]
    g = grad_loss.to(gam.dtype)[None, :, None]
    if is_logits:
        d = torch.exp(x.to(gam.dtype) - lse_[..., None]) - gam
    else:
        d = -gam
    d = torch.where(frames & feasible, d * g, 0.0)
    return d.to(x.dtype)


@_ctc_bwd.register_fake
def _(grad_loss, x, targets, input_lengths, target_lengths, alpha, lse, loss, blank, is_logits, viterbi, label_loop,
      use_triton):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop, use_triton = inputs
    loss, alpha, lse = output
    ctx.save_for_backward(x, targets, input_lengths, target_lengths, alpha, lse, loss)
    ctx.opts = (blank, is_logits, viterbi, label_loop, use_triton)
    ctx.mark_non_differentiable(alpha, lse)


def _backward(ctx, grad_loss, grad_alpha, grad_lse):
    x, targets, input_lengths, target_lengths, alpha, lse, loss = ctx.saved_tensors
    blank, is_logits, viterbi, label_loop, use_triton = ctx.opts
    grad = _ctc_bwd(grad_loss, x, targets, input_lengths, target_lengths, alpha, lse, loss, blank, is_logits,
                    viterbi, label_loop, use_triton)
    return grad, None, None, None, None, None, None, None, None


_ctc_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# argument handling
# ------------------------------------------------------------------------------------------------
def _prepare(log_probs, targets, input_lengths, target_lengths, blank, batch_first, input_type, op, validate=True):
    V.check_float(log_probs, "log_probs", op)
    V.check_option(input_type, "input_type", op, ("log_probs", "logits"))
    if log_probs.dim() != 3:
        raise ValueError(f"{op}: log_probs: expected shape {'(B, T, C)' if batch_first else '(T, B, C)'}, got "
                         f"{tuple(log_probs.shape)}")
    x = log_probs.transpose(0, 1) if batch_first else log_probs
    T, B, C = x.shape
    if isinstance(blank, bool) or not isinstance(blank, int):
        raise TypeError(f"{op}: blank: expected an int, got {type(blank).__name__}")
    if not -C <= blank < C:
        raise ValueError(f"{op}: blank: expected an index in [{-C}, {C}), got {blank}")
    blank = blank % C
    il = V.as_lengths(input_lengths, "input_lengths", op, B, x.device, max_value=T)
    tgt_len_t = V.as_lengths(target_lengths, "target_lengths", op, B, x.device)
    if isinstance(targets, Sequence) and not isinstance(targets, torch.Tensor):
        targets = torch.tensor(list(targets), dtype=torch.int64)
    V.check_int(targets, "targets", op)
    host_lens = target_lengths if not isinstance(target_lengths, torch.Tensor) else (
        target_lengths if target_lengths.device.type == "cpu" else None)
    if torch.compiler.is_compiling() and isinstance(host_lens, torch.Tensor):
        host_lens = None  # no data-dependent checks while tracing
    if targets.dim() == 2:
        if targets.shape[0] != B:
            raise ValueError(f"{op}: targets: expected {B} rows (the batch), got shape {tuple(targets.shape)}")
        padded = targets.to(device=x.device, dtype=torch.int64)
        if host_lens is not None and len(host_lens) and int(max(host_lens)) > targets.shape[1]:
            raise ValueError(f"{op}: target_lengths: expected lengths <= {targets.shape[1]} (the padded size), got "
                             f"{int(max(host_lens))}")
    elif targets.dim() == 1:
        # concatenated targets: pad on device; S_max from host lengths when known (else an upper bound)
        S = int(max(host_lens)) if (host_lens is not None and len(host_lens)) else targets.numel()
        if host_lens is not None and int(sum(int(v) for v in host_lens)) != targets.numel():
            raise ValueError(f"{op}: targets: concatenated targets must have sum(target_lengths) = "
                             f"{int(sum(int(v) for v in host_lens))} entries, got {targets.numel()}")
        t = targets.to(device=x.device, dtype=torch.int64)
        starts = torch.cumsum(tgt_len_t, 0) - tgt_len_t
        j = torch.arange(S, device=x.device)
        idx = (starts[:, None] + j[None, :]).clamp(max=max(t.numel() - 1, 0))
        padded = t[idx] if t.numel() else torch.zeros(B, S, dtype=torch.int64, device=x.device)
        padded = torch.where(j[None, :] < tgt_len_t[:, None], padded, 0)
    else:
        raise ValueError(f"{op}: targets: expected a padded (B, S) or concatenated 1-D tensor, got shape "
                         f"{tuple(targets.shape)}")
    if validate and padded.device.type == "cpu" and not torch.compiler.is_compiling() and padded.numel():
        inside = torch.arange(padded.shape[1])[None, :] < tgt_len_t[:, None]
        bad = inside & ((padded < 0) | (padded >= C))
        if bool(bad.any()):
            raise ValueError(f"{op}: targets: expected class ids in [0, {C}), got {int(padded[bad][0])}")
        if bool((inside & (padded == blank)).any()):
            raise ValueError(f"{op}: targets: must not contain the blank index {blank} within target_lengths")
    return x, padded, il, tgt_len_t, blank


def ctc_loss(log_probs: Tensor, targets, input_lengths, target_lengths, blank: int = 0, reduction: str = "mean",
             zero_infinity: bool = False, *, input_type: str = "log_probs", max_approx: bool = False,
             label_loop: bool = True, batch_first: bool = False, backend: str = "auto") -> Tensor:
    """Connectionist temporal classification loss, a drop-in for :func:`torch.nn.functional.ctc_loss`.

    Args:
        log_probs: ``(T, B, C)`` (``(B, T, C)`` with ``batch_first``) log-probabilities, or logits with
            ``input_type="logits"`` (log-softmax fused). fp32/fp16/bf16 (fp64: torch backend).
        targets: padded ``(B, S)`` or concatenated 1-D class ids (never the blank); padding beyond a
            target's length is never read.
        input_lengths, target_lengths: ``(B,)`` tensors (any device) or sequences of ints.
        blank: the blank index; negative counts from the end (``-1``: last, as in RETURNN).
        reduction: ``"none"`` (per sequence, fp32), ``"sum"``, ``"mean"`` (each loss divided by its
            target length clamped to >= 1, then averaged over the batch, as PyTorch).
        zero_infinity: infeasible sequences get loss 0 (else +inf); their gradient is 0 either way.
        max_approx: Viterbi: loss = -(best path log-score), gradient of that path only.
        label_loop: False selects the RNA-like topology (a label lasts exactly one frame; repeated
            labels need no blank between them).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    op = "ctc_loss"
    V.check_reduction(reduction, op)
    x, tg, il, tl_, blank = _prepare(log_probs, targets, input_lengths, target_lengths, blank, batch_first,
                                     input_type, op)
    use_triton = resolve_backend(backend, x, op)
    loss, _, _ = _ctc_fwd(x, tg, il, tl_, blank, input_type == "logits", bool(max_approx), bool(label_loop),
                          use_triton)
    if zero_infinity:
        loss = torch.where(torch.isinf(loss), torch.zeros_like(loss), loss)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return (loss / tl_.clamp(min=1).to(loss.dtype)).mean()


class CTCLoss(torch.nn.Module):
    """Module form of :func:`ctc_loss` (a drop-in for :class:`torch.nn.CTCLoss`, plus the extras)."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False, *,
                 input_type: str = "log_probs", max_approx: bool = False, label_loop: bool = True,
                 batch_first: bool = False, backend: str = "auto"):
        super().__init__()
        self.blank, self.reduction, self.zero_infinity = blank, reduction, zero_infinity
        self.kwargs = dict(input_type=input_type, max_approx=max_approx, label_loop=label_loop,
                           batch_first=batch_first, backend=backend)

    def forward(self, log_probs, targets, input_lengths, target_lengths):
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                        self.zero_infinity, **self.kwargs)


def ctc_posteriors(log_probs: Tensor, targets, input_lengths, target_lengths, blank: int = 0, *,
                   input_type: str = "log_probs", label_loop: bool = True, batch_first: bool = False,
                   backend: str = "auto") -> Tensor:
    """Soft alignment gamma[t, b, c]: posterior of emitting class c at frame t given the target.

    Shape and layout like the input; sums to 1 over c on valid frames, 0 on padded frames and for
    infeasible sequences. Not differentiable (detached).
    """
    op = "ctc_posteriors"
    x, tg, il, tl_, blank = _prepare(log_probs, targets, input_lengths, target_lengths, blank, batch_first,
                                     input_type, op)
    use_triton = resolve_backend(backend, x, op)
    with torch.no_grad():
        loss, alpha, lse = _ctc_fwd(x, tg, il, tl_, blank, input_type == "logits", False, bool(label_loop),
                                    use_triton)
        # the gradient w.r.t. log-probs with unit upstream is -gamma
        g = -_ctc_bwd(torch.ones_like(loss), x.float(), tg, il, tl_, alpha,
                      lse, loss, blank, False if input_type == "log_probs" else True, False, bool(label_loop),
                      use_triton).float()
        if input_type == "logits":
            T = x.shape[0]
            frames = (torch.arange(T, device=x.device)[:, None] < il[None, :])[..., None]
            ok = frames & torch.isfinite(loss)[None, :, None]
            g = torch.where(ok, g + torch.exp(x.float() - lse[..., None]), 0.0)
    return g.transpose(0, 1) if batch_first else g


def ctc_best_path(log_probs: Tensor, targets, input_lengths, target_lengths, blank: int = 0, *,
                  input_type: str = "log_probs", label_loop: bool = True, batch_first: bool = False,
                  backend: str = "auto"):
    """Viterbi alignment: ``(alignment (B, T) class ids, score (B,))``.

    Padded frames and infeasible sequences get blank; the score is the best path's log-probability
    (-inf where infeasible). Ties: stay in the state, then the previous state, then the skip; at
    the end the final blank over the last label.
    """
    op = "ctc_best_path"
    x, tg, il, tl_, blank = _prepare(log_probs, targets, input_lengths, target_lengths, blank, batch_first,
                                     input_type, op)
    use_triton = resolve_backend(backend, x, op)
    with torch.no_grad():
        loss, alpha, lse = _ctc_fwd(x, tg, il, tl_, blank, input_type == "logits", True, bool(label_loop), use_triton)
        if use_triton:
            with device_guard(x):
                path = _kernels().ctc_backtrack(alpha, tg, il, tl_, blank, label_loop)
        else:
            ext, valid, skip = _tctc.extended(tg, tl_, blank)
            path = _tctc.viterbi_path(alpha, ext, skip, il, tl_, bool(label_loop), blank)
        score = -loss
        path = torch.where(torch.isfinite(score)[:, None], path, blank)
    return path, score


def ctc_greedy_decode(logits: Tensor, input_lengths, blank: int = 0, batch_first: bool = False):
    """Per-frame argmax, collapse repeats, drop blanks: ``(labels (B, T) padded with 0, lengths (B,))``.

    Plain torch on device (no host sync); works on logits, log-probs or probabilities alike.
    """
    op = "ctc_greedy_decode"
    V.check_float(logits, "logits", op)
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits: expected a 3-D tensor, got shape {tuple(logits.shape)}")
    x = logits if batch_first else logits.transpose(0, 1)  # (B, T, C)
    B, T, C = x.shape
    if not -C <= blank < C:
        raise ValueError(f"{op}: blank: expected an index in [{-C}, {C}), got {blank}")
    blank = blank % C
    il = V.as_lengths(input_lengths, "input_lengths", op, B, x.device, max_value=T)
    best = x.argmax(-1)
    valid = torch.arange(T, device=x.device)[None, :] < il[:, None]
    prev = torch.nn.functional.pad(best, (1, 0), value=-1)[:, :-1]
    keep = valid & (best != blank) & (best != prev)
    pos = torch.cumsum(keep.long(), 1) - 1
    out = torch.zeros(B, T + 1, dtype=torch.int64, device=x.device)
    out.scatter_(1, torch.where(keep, pos, T), torch.where(keep, best, 0))
    return out[:, :T], keep.sum(1)
