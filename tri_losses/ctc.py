"""CTC: ``ctc_loss`` / ``CTCLoss`` (a drop-in for PyTorch's), ``ctc_posteriors``, ``ctc_best_path``,
``ctc_greedy_decode``.

Ops ``tri_losses::ctc_fwd`` (loss, the forward variables alpha, the per-frame lse for logits input)
and ``tri_losses::ctc_bwd`` (beta fused with the gradient). Gradients:

* ``input_type="logits"`` (the log-softmax is fused, never materialised): ``softmax - gamma``;
* ``input_type="log_probs"``: the true partial derivative ``-gamma``. PyTorch's ``F.ctc_loss``
  returns ``exp(log_probs) - gamma`` here, which is the gradient w.r.t. the logits when a
  ``log_softmax`` precedes it; through a ``log_softmax`` both give the same logits gradient in fp32.
  In 16 bits they do not: ``-gamma`` rounded to bf16/fp16 leaves the ``log_softmax`` backward a
  difference of two rounded numbers near 1 (``softmax - gamma`` where both are near 1), so near
  convergence the logits' gradient loses its precision; 16-bit models should pass the logits
  (``input_type="logits"``: ``softmax - gamma`` formed in fp32) or an fp32 ``log_softmax``.

gamma is the per-frame class posterior; frames at or after ``input_lengths[b]`` get exactly 0;
infeasible sequences get gradient 0 (loss +inf, or 0 with ``zero_infinity``), never NaN. A NaN score that a
sequence's paths use makes its loss NaN and its gradient NaN on its valid frames, as ``F.ctc_loss``
(``zero_infinity`` leaves a NaN loss as it is); a NaN on a state no complete path uses changes nothing.
A non-finite upstream gradient (inf, -inf, NaN: a loss scaler's overflow) multiplies the gradient for an
upstream of 1 entry by entry, as IEEE products, on both backends; with log-probs input the zeros of ``-gamma``
(classes of posterior 0) stay 0, and padded frames and infeasible sequences stay 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.modules.loss import _Loss

from . import _validate
from ._validate import InputError, InputTypeError
from ._backend import custom_op, device_guard, first_order, kernels, resolve_backend
from ._torch import ctc as _tctc

__all__ = ["ctc_loss", "CTCLoss", "ctc_posteriors", "ctc_best_path", "ctc_greedy_decode"]


def _state_tables(targets, target_lengths, blank, C):
    """The kernels' extended states (B, L) int32 (-1 marks a label outside [0, C): that sequence has no
    path) and s-2 -> s skip flags (B, L) int8, built on device (O(B*L))."""
    ext, valid, skip = _tctc.extended(targets, target_lengths, blank, C)
    inside = torch.arange(ext.shape[1], device=ext.device)[None, :] < 2 * target_lengths[:, None] + 1
    ext = torch.where(inside & ~valid, -1, ext)
    return ext.int().contiguous(), skip.to(torch.int8).contiguous()


def _triton_fwd(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop):
    K = kernels("ctc")
    T, B, C = x.shape
    lse = None
    if is_logits:
        lse = torch.empty(T, B, 2, dtype=torch.float32, device=x.device)  # filled by ctc_alpha
    ext, skip = _state_tables(targets, target_lengths, blank, C)
    alpha, logz = K.ctc_alpha(x, lse, ext, skip, input_lengths, target_lengths, label_loop, viterbi)
    return alpha, logz, lse


def _triton_grad(grad_loss, x, lse, targets, input_lengths, target_lengths, alpha, loss, blank, viterbi, label_loop,
                 softmax, out_dtype):
    grad = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    ext, skip = _state_tables(targets, target_lengths, blank, x.shape[2])
    kernels("ctc").ctc_grad(grad, grad_loss, x, lse, targets, ext, skip, input_lengths, target_lengths, alpha, loss,
                            blank, label_loop, viterbi, softmax)
    return grad


def _triton_path(x, lse, alpha, targets, input_lengths, target_lengths, blank, label_loop):
    ext, skip = _state_tables(targets, target_lengths, blank, x.shape[2])
    return kernels("ctc").ctc_backtrack(x, lse, alpha, ext, skip, input_lengths, target_lengths, blank, label_loop)


def _ct(x, use_triton):
    return torch.float64 if (x.dtype == torch.float64 and not use_triton) else torch.float32


@custom_op("tri_losses::ctc_fwd", mutates_args=())
def _ctc_fwd(x: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int, is_logits: bool,
             viterbi: bool, label_loop: bool, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss (B,) = -log Z, alpha (T, B, 2S+1), per-frame lse pair (T, B, 2) for logits, else empty)."""
    if use_triton:
        with device_guard(x):
            alpha, logz, lse = _triton_fwd(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi,
                                           label_loop)
    else:
        alpha, logz, lse = _tctc.loss_forward(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi,
                                              label_loop)
    if lse is None:
        lse = x.new_empty(0, dtype=_ct(x, use_triton))
    return (-logz).to(_ct(x, use_triton)), alpha, lse


@_ctc_fwd.register_fake
def _(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop, use_triton):
    T, B, _ = x.shape
    L = 2 * targets.shape[1] + 1
    ct = _ct(x, use_triton)
    lse = x.new_empty(T, B, 2, dtype=ct) if is_logits else x.new_empty(0, dtype=ct)
    if not use_triton and _tctc.native_path(x, label_loop, viterbi):
        alpha = _tctc.native_alpha_like(x, targets.shape[1])
    else:
        alpha = x.new_empty(T, B, L, dtype=ct)
    return x.new_empty(B, dtype=ct), alpha, lse


@custom_op("tri_losses::ctc_bwd", mutates_args=())
def _ctc_bwd(grad_loss: Tensor, x: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
             alpha: Tensor, lse: Tensor, loss: Tensor, blank: int, is_logits: bool, viterbi: bool, label_loop: bool,
             posteriors: bool, use_triton: bool) -> Tensor:
    """d loss / d x times ``grad_loss`` (dtype of x), or with ``posteriors`` the class posteriors -gamma
    times ``grad_loss`` in fp32 (fp64 for fp64 input on the torch backend; no softmax term)."""
    lse_ = lse if is_logits else None
    softmax = is_logits and not posteriors
    out_dtype = _ct(x, use_triton) if posteriors else x.dtype
    if use_triton:
        with device_guard(x):
            return _triton_grad(grad_loss, x, lse_, targets, input_lengths, target_lengths, alpha, loss, blank,
                                viterbi, label_loop, softmax, out_dtype)
    return _tctc.loss_grad(grad_loss, x, lse_, targets, input_lengths, target_lengths, alpha, loss, blank, viterbi,
                           label_loop, softmax, out_dtype)


@_ctc_bwd.register_fake
def _(grad_loss, x, targets, input_lengths, target_lengths, alpha, lse, loss, blank, is_logits, viterbi, label_loop,
      posteriors, use_triton):
    return x.new_empty(x.shape, dtype=_ct(x, use_triton) if posteriors else x.dtype)


@custom_op("tri_losses::ctc_path", mutates_args=())
def _ctc_path(x: Tensor, lse: Tensor, alpha: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
              loss: Tensor, blank: int, is_logits: bool, label_loop: bool, use_triton: bool) -> Tensor:
    """The Viterbi alignment (B, T) class ids backtracked from the Viterbi ``alpha`` of ``x`` (``lse``: the
    forward's, for logits; blank on padded frames and for infeasible sequences, whose ``loss`` is +inf)."""
    lse_ = lse if is_logits else None
    if use_triton:
        with device_guard(alpha):
            path = _triton_path(x, lse_, alpha, targets, input_lengths, target_lengths, blank, label_loop)
    else:
        path = _tctc.best_path(x, lse_, alpha, targets, input_lengths, target_lengths, blank, label_loop)
    return torch.where(torch.isfinite(loss)[:, None], path, blank)


@_ctc_path.register_fake
def _(x, lse, alpha, targets, input_lengths, target_lengths, loss, blank, is_logits, label_loop, use_triton):
    return alpha.new_empty(alpha.shape[1], alpha.shape[0], dtype=torch.int64)


def _setup(ctx, inputs, output):
    x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop, use_triton = inputs
    loss, alpha, lse = output
    ctx.save_for_backward(x, targets, input_lengths, target_lengths, alpha, lse, loss)
    ctx.opts = (blank, is_logits, viterbi, label_loop, use_triton)
    ctx.mark_non_differentiable(alpha, lse)
    ctx.set_materialize_grads(False)  # no zero-filled (T, B, 2S+1) gradient for alpha


@first_order("ctc_loss")
def _backward(ctx, grad_loss, grad_alpha, grad_lse):
    x, targets, input_lengths, target_lengths, alpha, lse, loss = ctx.saved_tensors
    blank, is_logits, viterbi, label_loop, use_triton = ctx.opts
    if grad_loss is None:
        return (None,) * 9
    grad = _ctc_bwd(grad_loss, x, targets, input_lengths, target_lengths, alpha, lse, loss, blank, is_logits,
                    viterbi, label_loop, False, use_triton)
    return grad, None, None, None, None, None, None, None, None


_ctc_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# argument handling
# ------------------------------------------------------------------------------------------------
def _host(lengths, validate):
    """Lengths as a list of ints when readable without a device sync (ints, or a CPU tensor when not
    tracing), or on request (``validate``); else None. Plain ints never become a traced tensor."""
    if not isinstance(lengths, torch.Tensor):
        return [int(v) for v in lengths]
    if _validate.host_readable(lengths, validate):  # (never while tracing: no data-dependent checks)
        return lengths.detach().to("cpu", torch.int64).reshape(-1).tolist()
    return None


def _batch_first_hint(x, name, input_lengths, batch_first, op):
    """A common slip: batch-first ``(B, T, C)`` input without ``batch_first=True``. Caught where the
    number of input lengths matches dim 0 and not dim 1 of a time-major layout."""
    if batch_first:
        return
    n = len(input_lengths) if isinstance(input_lengths, Sequence) else (
        input_lengths.shape[0] if isinstance(input_lengths, Tensor) and input_lengths.dim() == 1 else None)
    T, B = x.shape[:2]
    if n is not None and n != B and n == T:
        raise InputError(
            f"{op}: {name}: expected time-major (T, B, C) input (as F.ctc_loss), got shape "
            f"{tuple(x.shape)} with {n} input_lengths: it looks batch-first (B, T, C); pass "
            f"batch_first=True (or transpose to (T, B, C))")


def _prepare(log_probs, targets, input_lengths, target_lengths, blank, batch_first, input_type, op, validate=False):
    """Validate and normalise: ``(x (T, B, C) view, padded targets (B, S) int64, input lengths,
    target lengths (int64 on x's device), blank in [0, C))``.

    Values that need a device read (class ids, lengths of CUDA tensors) are checked when they live on
    the CPU, or always with ``validate=True`` (one host sync). Unchecked device lengths are clamped
    into range (``0 <= input_lengths <= T``, ``0 <= target_lengths <= S``) and unchecked
    out-of-range class ids make their sequence infeasible (loss +inf, gradient 0): never an
    out-of-bounds access.
    """
    _validate.check_float(log_probs, "log_probs", op)
    _validate.check_option(input_type, "input_type", op, ("log_probs", "logits"))
    if log_probs.dim() != 3:
        raise InputError(f"{op}: log_probs: expected shape {'(B, T, C)' if batch_first else '(T, B, C)'}, got "
                         f"{tuple(log_probs.shape)}")
    x = log_probs.transpose(0, 1) if batch_first else log_probs
    if x.shape[2] and x.stride(2) != 1:
        x = x.contiguous()
    T, B, C = x.shape
    if C == 0 or T == 0:
        raise InputError(f"{op}: log_probs: expected at least one frame and one class (the blank), as "
                         f"F.ctc_loss (it must not be empty), got shape {tuple(log_probs.shape)}")
    blank = _validate.class_index(blank, "blank", op, C)
    _batch_first_hint(log_probs, "log_probs", input_lengths, batch_first, op)

    il = _validate.as_lengths(input_lengths, "input_lengths", op, B, x.device, max_value=T)
    tgt_len_t = _validate.as_lengths(target_lengths, "target_lengths", op, B, x.device)
    if validate:
        hi = _host(input_lengths, True)
        if hi and (min(hi) < 0 or max(hi) > T):
            raise InputError(f"{op}: input_lengths: expected lengths in [0, {T}] (the padded size), got {hi}")
    host_lens = _host(target_lengths, validate)
    if host_lens and min(host_lens) < 0:
        raise InputError(f"{op}: target_lengths: expected non-negative lengths, got {min(host_lens)}")
    if isinstance(targets, Sequence) and not isinstance(targets, (torch.Tensor, str, bytes)):
        try:  # the elements' own dtype: floats or bools are refused below, not truncated to ids
            targets = torch.tensor(list(targets)) if len(targets) else torch.zeros(0, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(f"{op}: targets: expected an integer tensor or a sequence of ints, got "
                                 f"{type(targets).__name__}") from None
    _validate.check_int(targets, "targets", op)
    if targets.dim() == 2:
        if targets.shape[0] != B:
            raise InputError(f"{op}: targets: expected {B} rows (the batch), got shape {tuple(targets.shape)}")
        S = targets.shape[1]
        if host_lens and max(host_lens) > S:
            raise InputError(f"{op}: target_lengths: expected lengths <= {S} (the padded size), got "
                             f"{max(host_lens)}")
        padded = _validate.to_device(targets, x.device, torch.int64, "targets", op)
    elif targets.dim() == 1:
        # concatenated targets: pad on device; S_max from host lengths when known (else an upper bound)
        if host_lens is not None:
            S = max(host_lens, default=0)
            if sum(host_lens) != targets.numel():
                raise InputError(f"{op}: targets: concatenated targets must have sum(target_lengths) = "
                                 f"{sum(host_lens)} entries, got {targets.numel()}")
        else:
            # no host lengths (CUDA tensors, or tracing): a label needs a frame, so a target longer than T
            # is infeasible whatever it holds; S = min(numel, T) columns suffice (longer ones marked below)
            S = max(min(targets.numel(), T), 1) if targets.numel() else 0
        t = _validate.to_device(targets, x.device, torch.int64, "targets", op)
        starts = torch.cumsum(tgt_len_t, 0) - tgt_len_t
        j = torch.arange(S, device=x.device)
        idx = (starts[:, None] + j[None, :]).clamp(0, max(t.numel() - 1, 0))
        padded = t[idx] if t.numel() else torch.zeros(B, S, dtype=torch.int64, device=x.device)
        padded = torch.where(j[None, :] < tgt_len_t[:, None], padded, 0)
    else:
        raise InputError(f"{op}: targets: expected a padded (B, S) or concatenated 1-D tensor, got shape "
                         f"{tuple(targets.shape)}")
    check = _validate.host_readable(padded, validate)
    if check and padded.numel() and host_lens is not None:
        _validate.check_labels(padded.cpu(), host_lens, op, high=C, blank=blank)
    # unchecked device values can never index out of bounds (no-ops for valid input): a target length
    # beyond the columns marks its first label out of range, which makes the sequence infeasible
    il = il.clamp(0, T)
    if padded.shape[1]:
        too_long = tgt_len_t > padded.shape[1]
        padded = torch.cat([torch.where(too_long, -1, padded[:, 0])[:, None], padded[:, 1:]], 1)
    tgt_len_t = tgt_len_t.clamp(0, padded.shape[1])
    return x, padded, il, tgt_len_t, blank


def ctc_loss(log_probs: Tensor, targets, input_lengths, target_lengths, blank: int = 0, reduction: str = "mean",
             zero_infinity: bool = False, *, input_type: str = "log_probs", max_approx: bool = False,
             label_loop: bool = True, batch_first: bool = False, validate: bool = False,
             backend: str = "auto") -> Tensor:
    """Connectionist temporal classification loss, a drop-in for :func:`torch.nn.functional.ctc_loss`.

    **Gradient with log-probs input (the default): the true partial derivative -gamma** (gamma: the
    per-frame class posteriors), NOT PyTorch's ``exp(log_probs) - gamma``. Both give the same gradient
    w.r.t. logits through an fp32 ``log_softmax``; code reading ``log_probs.grad`` itself sees the
    difference. With ``input_type="logits"`` the log-softmax is fused and the gradient is ``softmax - gamma``.
    **16-bit log-probs:** pass the logits with ``input_type="logits"`` instead (or log-probs from an fp32
    ``log_softmax``): ``-gamma`` rounded to 16 bits loses the logits' gradient precision near convergence
    (the module docstring says why).

    Args:
        log_probs: ``(T, B, C)`` (``(B, T, C)`` with ``batch_first``) log-probabilities, or logits with
            ``input_type="logits"`` (log-softmax fused). fp32/fp16/bf16 (fp64: torch backend). Unbatched
            ``(T, C)`` with scalar lengths and ``targets`` 1-D (concatenated: ``target_length`` entries) or
            ``(1, S)`` (padded), as PyTorch (the loss is then 0-d). T = 0 or C = 0 raises (as PyTorch);
            an empty batch (B = 0) gives an empty loss (sum 0, mean NaN).
        targets: padded ``(B, S)`` or concatenated 1-D class ids (never the blank); padding beyond a
            target's length is never read.
        input_lengths, target_lengths: ``(B,)`` tensors (any device) or sequences of ints (Python, NumPy
            or 0-d integer tensors).
        blank: the blank index; negative counts from the end (``-1``: last, as in RETURNN).
        reduction: ``"none"`` (per sequence, fp32), ``"sum"``, ``"mean"`` (each loss divided by its
            target length clamped to >= 1, then averaged over the batch, as PyTorch).
        zero_infinity: infeasible sequences get loss 0 (else +inf); their gradient is 0 either way.
        max_approx: Viterbi: loss = -(best path log-score), gradient of that path only.
        label_loop: False selects the RNA-like topology (a label lasts exactly one frame; repeated
            labels need no blank between them).
        validate: also check values that live on the GPU (class ids in range and not the blank,
            lengths within the padding) at the cost of one host sync. CPU values are always checked.
            Unchecked on CUDA, lengths are clamped into range and an out-of-range class id makes its
            sequence infeasible (loss +inf, gradient 0).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns the loss in fp32 (fp64 for fp64 input on the torch backend) whatever the input dtype;
    the gradient has the input's dtype (computed in fp32, rounded once).
    """
    op = "ctc_loss"
    _validate.check_bool(op, zero_infinity=zero_infinity, max_approx=max_approx, label_loop=label_loop,
                         batch_first=batch_first, validate=validate)
    reduction = _validate.legacy_reduction(None, None, reduction)  # ("elementwise_mean", as F.ctc_loss)
    _validate.check_reduction(reduction, op)
    unbatched, batch_first, x, tg, il, tl_, blank, use_triton = _inputs(
        log_probs, targets, input_lengths, target_lengths, blank, batch_first, input_type, op, validate, backend)
    loss, _, _ = _ctc_fwd(x, tg, il, tl_, blank, input_type == "logits", bool(max_approx), bool(label_loop),
                          use_triton)
    if zero_infinity:
        loss = torch.where(torch.isinf(loss), torch.zeros_like(loss), loss)
    if reduction == "none":
        return loss[0] if unbatched else loss
    if reduction == "sum":
        return loss.sum()
    return (loss / tl_.clamp(min=1).to(loss.dtype)).mean()


def _inputs(log_probs, targets, input_lengths, target_lengths, blank, batch_first, input_type, op, validate,
            backend):
    """The public CTC ops' common start: ``(unbatched, batch_first, x, targets, input lengths, target
    lengths, blank, use_triton)``, from ``_batch_of_one``, ``_prepare`` and the backend choice."""
    unbatched, log_probs, targets, input_lengths, target_lengths, batch_first = _batch_of_one(
        log_probs, targets, input_lengths, target_lengths, batch_first, op)
    x, tg, il, tl_, blank = _prepare(log_probs, targets, input_lengths, target_lengths, blank, batch_first,
                                     input_type, op, validate)
    return (unbatched, batch_first, x, tg, il, tl_, blank, resolve_backend(backend, x, op))


def _batch_of_one(log_probs, targets, input_lengths, target_lengths, batch_first, op):
    """``(unbatched, log_probs, targets, input_lengths, target_lengths, batch_first)``: PyTorch's unbatched CTC
    input ((T, C) log-probs) as a batch of one, (T, 1, C) with one-element lengths, the targets as PyTorch
    reads them (1-D: the concatenated form of one sequence, ``target_length`` entries; ``(1, S)``: padded);
    batched input as it is."""
    if not (isinstance(log_probs, Tensor) and log_probs.dim() == 2):
        return False, log_probs, targets, input_lengths, target_lengths, batch_first
    if not isinstance(targets, Tensor) or not (targets.dim() == 1 or targets.dim() == 2 and targets.shape[0] == 1):
        raise InputError(f"{op}: targets: unbatched (T, C) log_probs take 1-D targets (S,) or (1, S), got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")

    def one(v, name):
        if isinstance(v, Tensor):
            if v.numel() != 1 or v.dim() > 1:
                raise InputError(f"{op}: {name}: unbatched input takes a scalar length, got shape {tuple(v.shape)}")
            return v.reshape(1)
        if isinstance(v, (list, tuple)) and len(v) == 1:
            return list(v)
        try:
            return [_validate.as_int(v, name, op)]
        except TypeError:
            raise InputError(f"{op}: {name}: unbatched input takes a scalar length (an int or a 0-d tensor), "
                             f"got {v!r}") from None

    return True, log_probs.unsqueeze(1), targets, one(input_lengths, "input_lengths"), one(
        target_lengths, "target_lengths"), False


class CTCLoss(_Loss):  # PyTorch's base class, so isinstance checks hold
    """Module form of :func:`ctc_loss`, a drop-in for :class:`torch.nn.CTCLoss`.

    ``CTCLoss(...)(log_probs, targets, input_lengths, target_lengths)`` is :func:`ctc_loss` with these
    settings: same shapes (time-major ``(T, B, C)`` unless ``batch_first=True``), dtypes, backends and
    errors (raised on the call).

    Args:
        blank, reduction, zero_infinity: as in :class:`torch.nn.CTCLoss`.
        input_type, max_approx, label_loop, batch_first, validate, backend: keyword-only, as in
            :func:`ctc_loss` (``input_type="logits"`` fuses the log-softmax).
    """

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False, *,
                 input_type: str = "log_probs", max_approx: bool = False, label_loop: bool = True,
                 batch_first: bool = False, validate: bool = False, backend: str = "auto"):
        super().__init__()
        self.blank, self.reduction, self.zero_infinity = blank, reduction, zero_infinity
        self.kwargs = dict(input_type=input_type, max_approx=max_approx, label_loop=label_loop,
                           batch_first=batch_first, validate=validate, backend=backend)

    def forward(self, log_probs, targets, input_lengths, target_lengths):
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                        self.zero_infinity, **self.kwargs)


def ctc_posteriors(log_probs: Tensor, targets, input_lengths, target_lengths, blank: int = 0, *,
                   input_type: str = "log_probs", label_loop: bool = True, batch_first: bool = False,
                   validate: bool = False, backend: str = "auto") -> Tensor:
    """Soft alignment gamma[t, b, c]: posterior of emitting class c at frame t given the target.

    Shape and layout like the input; sums to 1 over c on valid frames, 0 on padded frames and for
    infeasible sequences. Not differentiable (detached). Unbatched ``(T, C)`` input (as :func:`ctc_loss`
    takes it) gives ``(T, C)``.
    """
    op = "ctc_posteriors"
    _validate.check_bool(op, label_loop=label_loop, batch_first=batch_first, validate=validate)
    unbatched, batch_first, x, tg, il, tl_, blank, use_triton = _inputs(
        log_probs, targets, input_lengths, target_lengths, blank, batch_first, input_type, op, validate, backend)
    with torch.no_grad():
        loss, alpha, lse = _ctc_fwd(x, tg, il, tl_, blank, input_type == "logits", False, bool(label_loop),
                                    use_triton)
        # the gradient w.r.t. log-probs with unit upstream is -gamma (fp32; 0 on padded frames and
        # infeasible sequences)
        g = -_ctc_bwd(torch.ones_like(loss), x, tg, il, tl_, alpha, lse, loss, blank, input_type == "logits", False,
                      bool(label_loop), True, use_triton)
    if unbatched:
        return g[:, 0]
    return g.transpose(0, 1) if batch_first else g


def ctc_best_path(log_probs: Tensor, targets, input_lengths, target_lengths, blank: int = 0, *,
                  input_type: str = "log_probs", label_loop: bool = True, batch_first: bool = False,
                  validate: bool = False, backend: str = "auto"):
    """Viterbi alignment: ``(alignment (B, T) class ids, score (B,))``.

    Padded frames and infeasible sequences get blank; the score is the best path's log-probability
    (-inf where infeasible). Ties are broken as RETURNN's ``rf.ctc_best_path`` (its ``FastViterbiOp`` on
    its CTC automaton) breaks them: at each frame the predecessor state whose score plus the emission is
    largest, ties to the skip (s-2), then the previous state, then staying; at the end the last label
    over the final blank. So equal scores put blanks first and labels late (all-equal logits, target
    ``[a, b]``, 5 frames: ``[blank, blank, blank, a, b]``); ``ctc_loss(max_approx=True)`` uses the same
    path. Unbatched ``(T, C)`` input (as :func:`ctc_loss` takes it) gives ``((T,), ())``.
    """
    op = "ctc_best_path"
    _validate.check_bool(op, label_loop=label_loop, batch_first=batch_first, validate=validate)
    unbatched, batch_first, x, tg, il, tl_, blank, use_triton = _inputs(
        log_probs, targets, input_lengths, target_lengths, blank, batch_first, input_type, op, validate, backend)
    with torch.no_grad():
        is_logits = input_type == "logits"
        loss, alpha, lse = _ctc_fwd(x, tg, il, tl_, blank, is_logits, True, bool(label_loop), use_triton)
        path = _ctc_path(x, lse, alpha, tg, il, tl_, loss, blank, is_logits, bool(label_loop), use_triton)
        score = -loss
    return (path[0], score[0]) if unbatched else (path, score)


def ctc_greedy_decode(logits: Tensor, input_lengths, blank: int = 0, batch_first: bool = False, *,
                      backend: str = "auto"):
    """Per-frame argmax, collapse repeats, drop blanks: ``(labels (B, T) padded with 0, lengths (B,))``.

    Plain torch on device (no host sync) on both backends (``backend="triton"`` raises: there is no
    kernel); works on logits, log-probs or probabilities alike; argmax ties go to the lowest index, and a NaN
    score wins its frame (``torch.argmax``; TF's ``ctc_greedy_decoder`` skips a NaN unless it is in class 0).
    """
    op = "ctc_greedy_decode"
    _validate.check_bool(op, batch_first=batch_first)
    _validate.check_float(logits, "logits", op)
    resolve_backend(backend, logits, op, has_triton=False)
    if logits.dim() != 3:
        raise InputError(f"{op}: logits: expected a 3-D tensor, got shape {tuple(logits.shape)}")
    x = logits if batch_first else logits.transpose(0, 1)  # (B, T, C)
    B, T, C = x.shape
    blank = _validate.class_index(blank, "blank", op, C)
    _batch_first_hint(logits, "logits", input_lengths, batch_first, op)

    il = _validate.as_lengths(input_lengths, "input_lengths", op, B, x.device, max_value=T)
    best = x.argmax(-1)
    valid = torch.arange(T, device=x.device)[None, :] < il[:, None]
    prev = torch.nn.functional.pad(best, (1, 0), value=-1)[:, :-1]
    keep = valid & (best != blank) & (best != prev)
    pos = torch.cumsum(keep.long(), 1) - 1
    out = torch.zeros(B, T + 1, dtype=torch.int64, device=x.device)
    out.scatter_(1, torch.where(keep, pos, T), torch.where(keep, best, 0))
    return out[:, :T], keep.sum(1)
