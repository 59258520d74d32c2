"""RETURNN-compatible loss registry: ``get_loss(class_name, **loss_opts)``.

RETURNN configs name losses by class name and options (``"loss": "ce", "loss_opts": {...}``). This
module gives the same values in PyTorch, with RETURNN's base-``Loss`` behaviour:

* frames are masked on the padded tensors (never packed: no host sync); ``value`` is the SUM over
  valid frames (or sequences), ``None`` for metrics (``edit_distance``, ``bleu``, ``as_is`` with
  ``as_error``);
* ``error`` (detached) defaults to the number of frames whose argmax differs from the target
  (dense targets: their argmax; ties -> lowest index; with a softmax activation the logits' argmax);
* ``norm_factor`` is ``1 / sum(target_lengths)`` with a time axis (``1 / sum(output_lengths)``
  without a target), ``1 / B`` without a time axis (``inf`` for an empty batch, as RETURNN's 1 / 0);
  ``custom_norm_factor`` (a number, or a callable
  called as RETURNN does, ``f(self=loss, output=output, layer=None)``, with the keywords it accepts)
  replaces it; ``custom_inv_norm_factor`` (a tensor) gives ``1 / sum``;
* ``objective = value * scale`` (None if ``scale == 0``), times ``norm_factor`` if
  ``use_normalized_loss``; the reported figures are ``value * norm_factor``, ``error * norm_factor``;
  :class:`Accumulator` gives per-epoch ``sum(value) / sum(1 / norm_factor)``.

The call: ``loss(output, target=None, *, activation=None, output_lengths=None, target_lengths=None,
time_major=False, train=True, **extra)``. ``output`` is ``(B, T, F)`` (``(T, B, F)`` with
``time_major``; a frame-wise ``target`` then is ``(T, B, ...)`` too, while the label sequences of ``ctc``,
``edit_distance``, ``bleu`` and ``expected_loss`` stay batch-major ``(B, S)``, as RETURNN takes them) or
``(B, F)`` (a 2-D float output given with ``output_lengths`` and with no target or a target of its shape
is ``(B, T)``, a time axis without a feature dim, read as ``(B, T, 1)``; not for ``triplet_loss`` and
``search_score``) and receives the gradients; with an ``activation`` (``"softmax"``,
``"log_softmax"``, ``"exp"``, ``"sigmoid"`` or a callable) it is the pre-activation and the registry
applies the activation (RETURNN's ``OutputWithActivation``). ``extra`` carries ``beam_scores``,
``error_signal``, ``align``, ``loss_value``, ``linear_input``, ``linear_weight``, ``linear_bias``,
``fsa`` and ``generator`` for the losses that use them (a keyword a loss does not read raises
``TypeError``: a misspelled ``output_lenghts`` is never ignored); ``error_signal`` and ``align`` are shaped
like the output (time-major with ``time_major``), and ``linear_input`` ``(B, T, D)`` has the output's layout
too (``(T, B, D)`` with ``time_major``, as the linear layer's input in RETURNN). The frame-wise losses' target
(``ce``, the element-wise losses, ``generic_ce``, ``sampling_loss``) shares the output's time axis:
``target_lengths`` given beside different ``output_lengths`` raise ``ValueError`` where both are on the host
(RETURNN fails there, or pairs frames across sequences); on a device they are not read (no sync) and the
shorter of the two is masked.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import Tensor

from . import _validate
from ._backend import functorch_active
from ._validate import InputError, InputTypeError

__all__ = ["get_loss", "LOSSES", "Loss", "LossResult", "Accumulator"]

# the ops without a Triton kernel (decoders, metrics) run their only implementation, also inside a
# use_backend("triton") block (which makes a forced "triton" of theirs an error)
_PLAIN = "torch"
_NOOP_OPTIONS = ("use_flatten_frames", "use_fused", "debug_print", "debug_dump")
# numeric options (where a loss has them) and their ranges, checked when the loss is built
_NUMBER_OPTIONS = {"label_smoothing": dict(low=0.0, high=1.0, high_inclusive=False),
                   "focal_loss_factor": dict(low=0.0, high=math.inf, high_inclusive=False),
                   "fake_upper_bound": {}, "pos_weight": {}, "margin": {}, "tdp_scale": {}, "nce_log_norm_term": {}}
_BASE_OPTIONS = {"scale": 1.0, "use_normalized_loss": False, "custom_norm_factor": None,
                 "custom_inv_norm_factor": None}


@dataclasses.dataclass
class LossResult:
    """What one registry loss call gives (a dataclass).

    Attributes:
        value: the loss summed over valid frames or sequences (fp32 tensor), ``None`` for metrics.
        error: the detached error count (frame errors, edit distance, ...), or ``None``.
        norm_factor: RETURNN's norm factor (``1 / sum(target_lengths)`` with a time axis, ``1 / B``
            without, or the custom one).
        objective: what to backpropagate, ``value * scale`` (times ``norm_factor`` with
            ``use_normalized_loss``), ``None`` if there is no value or ``scale == 0``.

    The properties ``reported_value`` (``value * norm_factor``, detached) and ``reported_error``
    (``error * norm_factor``) are the figures RETURNN prints per step.
    """
    value: Optional[Tensor]
    error: Optional[Tensor]
    norm_factor: Tensor
    objective: Optional[Tensor]

    @property
    def reported_value(self) -> Optional[Tensor]:
        return None if self.value is None else self.value.detach() * self.norm_factor

    @property
    def reported_error(self) -> Optional[Tensor]:
        return None if self.error is None else self.error * self.norm_factor


class Accumulator:
    """Per-epoch figures as RETURNN reports them: ``sum(value) / sum(1 / norm_factor)`` (same for error).

    ``acc = Accumulator(); acc.add(result)`` for each step's :class:`LossResult`; ``acc.value`` and
    ``acc.error`` are then the epoch's figures (fp64 tensors, ``None`` if nothing had a value / error).
    """

    def __init__(self):
        self.value_sum = None
        self.error_sum = None
        self.denom = None

    def add(self, result: LossResult) -> None:
        inv = 1.0 / result.norm_factor.detach().double()
        self.denom = inv if self.denom is None else self.denom + inv
        if result.value is not None:
            v = result.value.detach().double()
            self.value_sum = v if self.value_sum is None else self.value_sum + v
        if result.error is not None:
            e = result.error.detach().double()
            self.error_sum = e if self.error_sum is None else self.error_sum + e

    @property
    def value(self) -> Optional[Tensor]:
        return None if self.value_sum is None else self.value_sum / self.denom

    @property
    def error(self) -> Optional[Tensor]:
        return None if self.error_sum is None else self.error_sum / self.denom


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
_ACTIVATIONS = {"softmax": lambda x: torch.softmax(x, -1), "log_softmax": lambda x: torch.log_softmax(x, -1),
                "exp": torch.exp, "sigmoid": torch.sigmoid}


def _activate(x: Tensor, activation) -> Tensor:
    if activation is None:
        return x
    if callable(activation):
        return activation(x)
    if activation not in _ACTIVATIONS:
        raise InputError(f"activation: expected one of {tuple(_ACTIVATIONS)} or a callable, got {activation!r}")
    return _ACTIVATIONS[activation](x)


def _lengths(lengths, B: int, T: int, device, name: str = "output_lengths") -> Tensor:
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device=device)
    return _validate.as_lengths(lengths, name, "returnn", B, device, max_value=T)


def _mask(lengths: Tensor, T: int) -> Tensor:
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def safe_log(x: Tensor, eps: float = 1e-20, use_fake_grad: bool = True) -> Tensor:
    """log(max(x, eps)) with an identity gradient through the clamp (RETURNN's ``safe_log``):
    d/dx = 1 / max(x, eps), also where the clamp is active; ``use_fake_grad=False``: a plain clamp (no
    gradient below eps)."""
    if not use_fake_grad:
        return torch.log(torch.clamp(x, min=eps))
    v = torch.clamp(x, min=eps).detach()
    return torch.log(v) + (x - x.detach()) / v


def _min_identity_grad(x: Tensor, bound: float) -> Tensor:
    """min(x, bound) forward, identity gradient (RETURNN's ``minimum_with_identity_grad``)."""
    return x - (x - torch.clamp(x, max=bound)).detach()


def _smoothing_constant(eps: float, V: int) -> float:
    """RETURNN's label-smoothing normaliser kappa = -(c ln c + (V-1) e ln(e + 1e-20))."""
    c = 1.0 - eps
    e = eps / (V - 1)
    return -(c * math.log(c) + (V - 1) * e * math.log(e + 1e-20))


def _call_norm_function(f, loss, ctx):
    """``custom_norm_factor`` as a function: RETURNN calls it as ``f(self=loss, output=output, layer=layer)``;
    here ``output`` is the output tensor as the caller gave it and there is no layer (``None``). Only the
    keywords ``f`` accepts are passed, so ``f(self)`` and ``f(self, output, layer, **kwargs)`` both work."""
    import inspect
    kw = dict(self=loss, output=ctx.given_output, layer=None)
    try:
        params = inspect.signature(f).parameters
    except (TypeError, ValueError):  # builtins without a signature: RETURNN's full call
        return f(**kw)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return f(**kw)
    return f(**{k: v for k, v in kw.items() if k in params})


_FRAME_EXTRAS = ("error_signal", "align")  # extra inputs shaped like the output


class _Ctx:
    """Everything one call knows, batch-major: output (B, T, F) or (B, F), masks, lengths."""

    def __init__(self, output, target, activation, output_lengths, target_lengths, time_major, train, extra,
                 label_sequence_target=False, frame_values=True, frame_target=False):
        if not isinstance(output, Tensor):
            raise InputTypeError(f"output: expected a torch.Tensor, got {type(output).__name__}")
        self.given_output = output
        # a 2-D float output with output_lengths and no target or a target of its shape is (B, T) (RETURNN's time
        # axis without a feature dim, e.g. the per-frame losses of a layer): read as (B, T, 1), the target too. A
        # (B,) class-id target, or a loss whose output never has a time axis (triplet, search_score), keeps (B, F)
        frames_2d = (frame_values and output.dim() == 2 and output.dtype.is_floating_point
                     and output_lengths is not None and not label_sequence_target
                     and (target is None or target.shape == output.shape))
        if frames_2d:
            if target is not None:
                target = target.unsqueeze(-1)
            output = output.unsqueeze(-1)
        transpose = time_major and (output.dim() >= 3 or (output.dim() == 2 and not output.dtype.is_floating_point))
        if transpose:
            output = output.transpose(0, 1)
            # a frame-wise target shares the output's layout; a label sequence (CTC, edit distance, BLEU: its own
            # length S) is batch-major (B, S) whatever the output's layout, as RETURNN takes it
            if target is not None and target.dim() >= 2 and not label_sequence_target:
                target = target.transpose(0, 1)
        # frame-wise extra inputs (via_layer's error signal and alignment) follow the output: extra axis, layout
        extra = dict(extra)
        for name in _FRAME_EXTRAS:
            v = extra.get(name)
            if isinstance(v, Tensor):
                if frames_2d and v.dim() == 2:
                    v = v.unsqueeze(-1)
                if transpose and v.dim() >= 2:
                    v = v.transpose(0, 1)
                extra[name] = v
        # sampling_loss's linear_input (..., D): the input of the layer's linear part, in the layer's layout
        v = extra.get("linear_input")
        if transpose and isinstance(v, Tensor) and v.dim() >= 3:
            extra["linear_input"] = v.transpose(0, 1)
        self.x = output                      # what receives the gradient (pre-activation if given)
        self.activation = activation
        self.target = target
        self.train = train
        self.extra = extra
        # (B, T, F) scores, or (B, T) sparse ids (edit_distance / bleu outputs)
        self.has_time = output.dim() >= 3 or (output.dim() == 2 and not output.dtype.is_floating_point)
        B = output.shape[0]
        self.B = B
        if self.has_time:
            T = output.shape[1]
            self.T = T
            self.out_len = _lengths(output_lengths, B, T, output.device)
            S = target.shape[1] if (target is not None and target.dim() >= 2) else T
            tl_ = target_lengths if target_lengths is not None else (output_lengths if S == T else None)
            self.tgt_len = _lengths(tl_, B, S, output.device, "target_lengths")
            if (S == T and frame_target and target is not None and target_lengths is not None
                    and output_lengths is not None and _validate.host_readable(self.tgt_len)
                    and _validate.host_readable(self.out_len) and not torch.equal(self.tgt_len, self.out_len)):
                # RETURNN fails there (its flattened frames differ in number) or, with equal totals, pairs
                # frames across sequences: neither is a loss, so it is an error here
                raise InputError(f"target_lengths: a frame-wise target shares the output's time axis: expected "
                                 f"the output_lengths {self.out_len.tolist()}, got {self.tgt_len.tolist()}")
            # frame-wise losses: the target shares the output's time axis; sequence losses: mask by output
            self.frame_len = torch.minimum(self.out_len, self.tgt_len) if S == T else self.out_len
            self.mask = _mask(self.frame_len, T)
        else:
            self.T = None
            self.out_len = self.tgt_len = self.frame_len = None
            self.mask = torch.ones(B, dtype=torch.bool, device=output.device)
        if self.has_time and output.dtype.is_floating_point:
            # padded frames hold anything (NaN, inf): zeroed before use, so they get exactly 0 gradient
            fm = _mask(self.out_len, output.shape[1])
            self.x = torch.where(fm.reshape(fm.shape + (1,) * (output.dim() - 2)), output, torch.zeros_like(output))
        self.y = _activate(self.x, activation)  # the layer output after its activation

    def masked_sum(self, rows: Tensor) -> Tensor:
        """Sum of per-frame (B, T) or per-sequence (B,) values over valid frames (padding gets 0 grad)."""
        return torch.where(self.mask, rows, torch.zeros_like(rows)).sum()

    def frame_errors(self) -> Tensor:
        """RETURNN's base ``Loss.get_error`` per frame, (B, T) or (B,) bool on the valid frames: the argmax of
        the layer's output against the target's (dense targets: their argmax; ties -> lowest index). With a
        softmax activation the argmax is the logits' (RETURNN's ``output_before_softmax_flat``): in fp32 a
        softmax can round two near-equal top logits to one probability."""
        t = self.target
        if t is None:
            raise InputError("target: this loss's error needs a target")
        pred = (self.x if self.activation == "softmax" else self.y).argmax(-1)
        ref = t.argmax(-1) if t.dtype.is_floating_point else t
        return (pred != ref) & self.mask

    def frame_error(self) -> Tensor:
        return self.frame_errors().sum().to(torch.float32).detach()


# ------------------------------------------------------------------------------------------------
# base class
# ------------------------------------------------------------------------------------------------
class Loss:
    """RETURNN's base ``Loss``: options common to all losses, masking, norm factor, objective.

    Instances come from :func:`get_loss`. Calling one,
    ``loss(output, target=None, *, activation=None, output_lengths=None, target_lengths=None,
    time_major=False, train=True, **extra)``, returns a :class:`LossResult` (see the module docstring
    for the shapes and what ``extra`` carries).

    Raises:
        ValueError: an unknown option at construction (the message lists the valid ones), a missing
            ``target`` or ``extra`` input at the call, shapes or lengths that do not fit.
    """

    class_name = "loss"
    OPTIONS: dict = {}
    needs_target = True
    label_sequence_target = False  # the target is a (B, S) label sequence, batch-major even with time_major
    label_output = False  # the output may be a label sequence (integer ids): else it must be a float tensor
    frame_values = True  # a 2-D float output with output_lengths may be (B, T) frame values (not for triplet, ...)
    frame_target = False  # the value reads the target frame by frame on the output's time axis (ce, mse, ...)
    fixed_norm = None  # a function (ctx) -> norm factor that ignores the custom norms (triplet)
    EXTRAS: tuple = ()  # the extra keyword inputs (``**extra`` of a call) this loss reads

    def __init__(self, **opts):
        allowed = dict(_BASE_OPTIONS)
        allowed.update(self.OPTIONS)
        unknown = [k for k in opts if k not in allowed and k not in _NOOP_OPTIONS]
        if unknown:
            raise InputError(f"get_loss({self.class_name!r}): unknown option(s) {unknown}; valid options: "
                             f"{sorted(set(allowed) | set(_NOOP_OPTIONS))}")
        self.opts = {**allowed, **{k: v for k, v in opts.items() if k not in _NOOP_OPTIONS}}
        if self.opts["custom_norm_factor"] is not None and self.opts["custom_inv_norm_factor"] is not None:
            raise InputError(f"get_loss({self.class_name!r}): custom_norm_factor and custom_inv_norm_factor "
                             f"are exclusive, got both")
        for k, v in self.opts.items():
            setattr(self, k, v)
        _validate.check_number(self.scale, "scale", f"get_loss({self.class_name!r})")
        where = f"get_loss({self.class_name!r})"
        for k, rng in _NUMBER_OPTIONS.items():
            if k in self.OPTIONS:
                v = self.opts[k]
                if isinstance(v, Tensor) and v.dim() == 0 and not v.dtype.is_complex and v.dtype != torch.bool:
                    v = v.item()  # a 0-d tensor option (built once, on the host)
                _validate.check_number(v, k, where, allow_none=True, **rng)
                self.opts[k] = v
                setattr(self, k, v)
        if "beam_width" in self.OPTIONS:
            bw = self.beam_width
            bw = int(bw) if isinstance(bw, float) and bw.is_integer() else bw
            self.beam_width = _validate.as_int(bw, "beam_width", where, low=1, what="a positive int")
        cnf = self.custom_norm_factor
        if cnf is not None and not callable(cnf):
            _validate.check_number(cnf, "custom_norm_factor", f"get_loss({self.class_name!r})")

    # subclasses implement: returns (value or None, error or None)
    def compute(self, ctx: _Ctx):
        raise NotImplementedError

    def norm_factor(self, ctx: _Ctx) -> Tensor:
        dev = ctx.x.device
        if self.fixed_norm is not None:
            return torch.as_tensor(self.fixed_norm(ctx), dtype=torch.float32, device=dev)
        if self.custom_norm_factor is not None:
            f = self.custom_norm_factor
            f = _call_norm_function(f, self, ctx) if callable(f) else f
            return torch.as_tensor(f, dtype=torch.float32, device=dev)
        if self.custom_inv_norm_factor is not None:
            return 1.0 / torch.as_tensor(self.custom_inv_norm_factor, device=dev).to(torch.float32).sum()
        if ctx.has_time:
            lens = ctx.tgt_len if ctx.target is not None else ctx.out_len
            return 1.0 / lens.sum().to(torch.float32)
        return torch.tensor(1.0 / ctx.B if ctx.B else math.inf, dtype=torch.float32, device=dev)  # (B = 0: inf)

    def __call__(self, output: Tensor, target: Optional[Tensor] = None, *, activation=None, output_lengths=None,
                 target_lengths=None, time_major: bool = False, train: bool = True, **extra) -> LossResult:
        _validate.check_tensor(output, "output", self.class_name)
        if not (self.label_output and not output.dtype.is_floating_point):
            _validate.check_float(output, "output", self.class_name)  # (an int64 output gave a 'loss' for ce)
        if target is not None:
            _validate.check_tensor(target, "target", self.class_name)
        if self.needs_target and target is None:
            raise InputError(f"{self.class_name}: target: this loss needs a target, got None")
        unknown = sorted(set(extra) - set(self.extras()))
        if unknown:  # a misspelled keyword (output_lenghts=...) must not be ignored silently
            raise InputTypeError(f"{self.class_name}: unexpected keyword argument(s) {unknown}; this loss takes "
                                 f"output, target, activation, output_lengths, target_lengths, time_major, train"
                            + (f" and {', '.join(self.extras())}" if self.extras() else ""))
        ctx = _Ctx(output, target, activation, output_lengths, target_lengths, time_major, train, extra,
                   self.label_sequence_target, self.frame_values, self.frame_target)
        value, error = self.compute(ctx)
        nf = self.norm_factor(ctx)
        objective = None
        if value is not None and self.scale != 0:
            objective = value * self.scale
            if self.use_normalized_loss:
                objective = objective * nf
        return LossResult(value=value, error=error, norm_factor=nf, objective=objective)

    def extras(self) -> tuple:
        return self.EXTRAS

    def per_sequence(self, ctx: _Ctx, kind: str = "value") -> Tensor:
        """Per-sequence (B,) values or errors, unreduced (for ``expected_loss``)."""
        raise NotImplementedError(f"{self.class_name}: no per-sequence {kind} (cannot be used in expected_loss)")


def _extra(ctx: _Ctx, name: str, cls: str):
    if name not in ctx.extra or ctx.extra[name] is None:
        raise InputError(f"{cls}: {name}: this loss needs {name}=... in the call, got none")
    return ctx.extra[name]


def _beam_scores(ctx: _Ctx, cls: str, n_seqs: Optional[int] = None) -> Tensor:
    """The call's ``beam_scores``: a float ``(B, K)`` tensor on the output's device; with ``n_seqs``
    (the output's batch, the beam folded into it), ``B * K`` must equal it."""
    s = _extra(ctx, "beam_scores", cls)
    _validate.check_float(s, "beam_scores", cls)
    s = _validate.to_device(s, ctx.x.device, name="beam_scores", op=cls)
    if s.dim() != 2 or (n_seqs is not None and s.numel() != n_seqs):
        want = f"(B, K) with B * K = {n_seqs}, the output's batch" if n_seqs is not None else "(batch, beam)"
        raise InputError(f"{cls}: beam_scores: expected {want}, got {tuple(s.shape)}")
    return s


# ------------------------------------------------------------------------------------------------
# cross-entropy
# ------------------------------------------------------------------------------------------------
class CrossEntropy(Loss):
    """RETURNN ``ce``: softmax cross-entropy, RETURNN's smoothing constant, focal on the shifted loss.

    With ``input_type="prob"`` and an activation other than softmax the frame's value is
    ``-safe_log(p_y)`` (eps 1e-20 or ``safe_log_opts``, identity gradient through the clamp) whatever
    ``use_flatten_frames`` says, as RETURNN computes it on its default flattened frames. RETURNN's
    ``safe_log`` also rewrites ``log(sigmoid(x))`` to ``log_sigmoid(x)`` and ``log(exp(x))`` to ``x``
    where it can see the activation through the graph, which its ``use_flatten_frames=False`` and an output
    without a time axis allow: there RETURNN has no floor, and for ``p_y`` below the eps its value (and its
    gradient, ``-1`` w.r.t. ``x``) differs from this one (``-log(eps)``, about 0)."""

    class_name = "ce"
    frame_target = True
    OPTIONS = {"input_type": "prob", "focal_loss_factor": 0.0, "label_smoothing": 0.0,
               "label_smoothing_gaussian": False, "fake_upper_bound": None, "safe_log_opts": None}

    def rows(self, ctx: _Ctx) -> Tensor:
        from .cross_entropy import cross_entropy
        if self.input_type == "log_prob":
            raise NotImplementedError("ce: input_type='log_prob' is not implemented (as in RETURNN)")
        if self.input_type not in ("prob", "logits"):
            raise InputError(f"ce: input_type: expected one of ('prob', 'logits', 'log_prob'), got {self.input_type!r}")
        t = _frame_target(ctx, "ce")
        F = ctx.x.shape[-1]
        eps = float(self.label_smoothing or 0.0)
        gauss = bool(self.label_smoothing_gaussian)
        dense = t.dtype.is_floating_point
        if dense and (eps > 0 or self.focal_loss_factor):
            raise NotImplementedError("ce: label_smoothing / focal_loss_factor with a dense target is not "
                                      "implemented (as in RETURNN)")
        lead = ctx.x.shape[:-1]
        # "logits": the layer output (after its activation) is the logits; "prob" with a softmax layer: the
        # pre-activation is (RETURNN's output_before_softmax). Any other activation, log_softmax included,
        # takes -safe_log of the output as RETURNN does (its check is for softmax only; with log_softmax the
        # output is <= 0 and safe_log clamps it: RETURNN's value, not a useful loss)
        use_logits = self.input_type == "logits" or ctx.activation == "softmax"
        # padding is never read; an id outside [0, F) (raised on the host; unchecked on a device) is read as 0
        # (no out-of-bounds gather: a device assert on CUDA); its frame's value comes back NaN and NaN reaches
        # its gradient (the whole row on the softmax path, as TF's sparse softmax cross-entropy documents for
        # such ids on a GPU)
        tt, bad = (t, None) if dense else _safe_ids(ctx, t, F)
        if use_logits:
            x = (ctx.y if self.input_type == "logits" else ctx.x).reshape(-1, F)
            tgt = tt.reshape(-1, F) if dense else tt.reshape(-1)
            rows, lse = cross_entropy(x, tgt, reduction="none", label_smoothing=eps,
                                      label_smoothing_mode="gaussian" if gauss else "others", return_lse=True)
            if dense or (eps > 0 and gauss):
                # RETURNN's gradient: softmax - q (TF's fused op assumes sum(q) = 1), not the true one, for a
                # dense target and for Gaussian smoothing (whose q does not sum to 1)
                if dense:
                    q = tgt.float()
                else:
                    from ._torch.cross_entropy import SMOOTH_GAUSSIAN, target_weights
                    q = target_weights(tgt, None, False, F, eps, SMOOTH_GAUSSIAN, torch.float32, -100)
                xf = x.float()
                # a zero carrying that gradient; a -inf logit (a masked class) takes no part in q.x (0 * -inf, or
                # inf - inf in the carrier, would turn the row's value, +inf where q puts mass there, into NaN)
                surrogate = torch.logsumexp(xf, -1) - (q * torch.where(torch.isinf(xf), 0.0, xf)).sum(-1)
                surrogate = torch.where(torch.isfinite(surrogate), surrogate, 0.0)
                rows = rows.detach() + (surrogate - surrogate.detach())
            if self.focal_loss_factor and not dense:
                xy = x.float().gather(1, tgt[:, None])[:, 0]
                p_y = torch.exp(xy - lse)
        else:
            opts = dict(self.safe_log_opts or {})
            unknown = sorted(set(opts) - {"eps", "use_fake_grad"})
            if unknown:
                raise InputError(f"ce: safe_log_opts: expected keys among ('eps', 'use_fake_grad'), got {unknown}")
            p = ctx.y.reshape(-1, F).float()
            # RETURNN: label smoothing on probabilities calls safe_log with its defaults, the rest with the opts
            logp = safe_log(p) if (eps > 0 and not dense) else safe_log(p, **opts)
            if dense:
                terms = tt.reshape(-1, F).float() * logp
                if self.fake_upper_bound is not None:  # RETURNN clips each term q * log p here (before the sum
                    # and its sign: a bound >= 0 changes nothing), not the row as on its other paths
                    terms = _min_identity_grad(terms, float(self.fake_upper_bound))
                rows = -terms.sum(-1)
            else:
                tgt = tt.reshape(-1)
                if eps > 0:
                    from ._torch.cross_entropy import SMOOTH_GAUSSIAN, SMOOTH_OTHERS, target_weights
                    q = target_weights(tgt, None, False, F, eps, SMOOTH_GAUSSIAN if gauss else SMOOTH_OTHERS,
                                       torch.float32, -100)
                    rows = -(q * logp).sum(-1)
                else:
                    rows = -logp.gather(1, tgt[:, None])[:, 0]
                if self.focal_loss_factor:
                    p_y = p.gather(1, tgt[:, None])[:, 0]
        if eps > 0 and not dense:
            rows = rows - _smoothing_constant(eps, F)
        if self.focal_loss_factor and not dense:
            rows = rows * (1.0 - p_y) ** float(self.focal_loss_factor)
        if self.fake_upper_bound is not None and not (dense and not use_logits):
            rows = _min_identity_grad(rows, float(self.fake_upper_bound))
        rows = rows.reshape(lead)
        return rows if dense else rows * torch.where(bad, math.nan, 1.0)  # (NaN value, NaN gradient row)

    def compute(self, ctx):
        return ctx.masked_sum(self.rows(ctx)), ctx.frame_error()

    def per_sequence(self, ctx, kind="value"):
        if kind == "error":
            err = ctx.frame_errors().to(torch.float32)
            return (err.sum(-1) if ctx.has_time else err).detach()
        rows = torch.where(ctx.mask, self.rows(ctx), 0.0)
        return rows.sum(-1) if ctx.has_time else rows


# ------------------------------------------------------------------------------------------------
# element-wise losses
# ------------------------------------------------------------------------------------------------
class _FrameLoss(Loss):
    """Losses given as per-frame values (B, T) / (B,); value = sum over valid frames, error = frame error."""

    frame_target = True

    def rows(self, ctx):
        raise NotImplementedError

    def compute(self, ctx):
        return ctx.masked_sum(self.rows(ctx)), self.error(ctx)

    def error(self, ctx):
        return ctx.frame_error()

    def per_sequence(self, ctx, kind="value"):
        if kind == "error":
            raise NotImplementedError(f"{self.class_name}: no per-sequence error")
        rows = torch.where(ctx.mask, self.rows(ctx), 0.0)
        return rows.sum(-1) if ctx.has_time else rows

    @staticmethod
    def frame_values(ctx, kind, x, t, mean_over_features, pos_weight=None):
        """Per-frame (B, T) / (B,) float32 element-wise losses through :func:`frame_losses`: the length
        mask (output and, on the same time axis, target lengths) applied inside its kernel."""
        from .elementwise import frame_losses
        if not t.dtype.is_floating_point:
            t = torch.where(ctx.mask, t, 0)  # padded class ids are never looked at
        return frame_losses(kind, x, t, ctx.frame_len, mean_over_features=mean_over_features,
                            pos_weight=pos_weight, reduction="none").float()


def _safe_ids(ctx, t: Tensor, F: int):
    """Sparse frame targets safe to gather with: ``(ids, bad)``, padding and ids outside ``[0, F)`` read as 0
    (int64), ``bad`` the valid frames whose id is out of range (raised on the host by :func:`_frame_target`;
    unchecked on a device, where a gather out of bounds is a device assert): their values become NaN."""
    bad = ctx.mask & ((t < 0) | (t >= F))
    return torch.where(ctx.mask & ~bad, t, 0).long(), bad


def _frame_target(ctx, cls, allow_sparse=True, allow_dense=True):
    """The frame-wise target, its shape checked: dense (float) = the output's shape, sparse (class ids) =
    the output's shape without the feature dim."""
    t = ctx.target
    _validate.check_tensor(t, "target", cls)
    dense = t.dtype.is_floating_point
    if dense and not allow_dense:
        raise InputTypeError(f"{cls}: target: expected integer class ids, got a dense {t.dtype} target")
    if not dense and not allow_sparse:
        raise InputError(f"{cls}: target: expected a dense (float) target, got {t.dtype} class ids")
    shape = tuple(ctx.y.shape) if dense else tuple(ctx.y.shape[:-1])
    if tuple(t.shape) != shape:
        kind = "dense" if dense else "class-id"
        raise InputError(f"{cls}: target: expected a {kind} target of shape {shape}, got {tuple(t.shape)}")
    if not dense and _validate.host_readable(t):  # class ids of the valid frames (padding may hold anything)
        m = ctx.mask
        _validate.check_index_range(t[m] if tuple(m.shape) == tuple(t.shape) else t, "target", cls, ctx.y.shape[-1])
    return t


class BinaryCrossEntropy(_FrameLoss):
    """RETURNN ``bin_ce`` / ``sse_sigmoid``: ``sum_f l_f / F`` with l the sigmoid BCE of the logits.

    As RETURNN ("we expect the output as logits"), the logits are the layer output after its activation
    (so give the layer no sigmoid).
    """

    class_name = "bin_ce"
    OPTIONS = {"pos_weight": None}

    def logits(self, ctx):
        return ctx.y

    @staticmethod
    def _target(ctx, x):
        """The target as x's dtype (RETURNN casts it: 0/1 integer or bool labels of the output's shape work)."""
        t = ctx.target
        if isinstance(t, Tensor) and not t.dtype.is_floating_point and tuple(t.shape) == tuple(x.shape):
            return t.to(x.dtype)
        return _frame_target(ctx, BinaryCrossEntropy.class_name, allow_sparse=False).to(x.dtype)

    def rows(self, ctx):
        x = self.logits(ctx)
        t = self._target(ctx, x)
        pw = None if self.pos_weight is None else torch.full((x.shape[-1],), float(self.pos_weight),
                                                             device=x.device, dtype=torch.float32)
        return self.frame_values(ctx, "bce", x, t, True, pw)

    def error(self, ctx):
        x = self.logits(ctx)
        t = self._target(ctx, x)
        wrong = ((x > 0) != (t > 0.5)).float().mean(-1)
        return torch.where(ctx.mask, wrong, 0.0).sum().detach()


class MeanSquared(_FrameLoss):
    """RETURNN ``mse``: ``mean_f (x_f - t_f)^2`` per frame; class-id targets become one-hot."""

    class_name = "mse"

    def rows(self, ctx):
        t = _frame_target(ctx, self.class_name)
        return self.frame_values(ctx, "mse", ctx.y, t.to(ctx.y.dtype) if t.dtype.is_floating_point else t, True)


class L1(_FrameLoss):
    """RETURNN ``l1`` (sum over features) and ``mean_l1`` (mean over features); dense targets only."""

    class_name = "l1"
    reduce_mean = False

    def rows(self, ctx):
        t = _frame_target(ctx, self.class_name, allow_sparse=False)
        return self.frame_values(ctx, "l1", ctx.y, t.to(ctx.y.dtype), self.reduce_mean)


class MeanL1(L1):
    class_name = "mean_l1"
    reduce_mean = True


class _UpstreamFreeGrad(torch.autograd.Function):
    """Identity on a precomputed gradient: backward returns ``grad`` whatever the upstream is."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, value, grad):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, up):
        (grad,) = ctx.saved_tensors
        return grad, None, None


class GenericCE(_FrameLoss):
    """RETURNN ``generic_ce``: value ``-log(clamp(f(x)_y / sum f(x), 1e-20, 1e20))``; its gradient
    ``(f'(x)/f(x)) * (y_hat - onehot)`` ignores the upstream gradient (RETURNN's custom gradient:
    ``scale`` and normalisation do not change it)."""

    class_name = "generic_ce"

    def rows(self, ctx):
        x = ctx.x
        f = ctx.activation if ctx.activation is not None else (lambda v: v)  # no activation: identity
        # an unchecked out-of-range id (a device): read as 0, the frame's value and gradient row NaN
        t, bad = _safe_ids(ctx, _frame_target(ctx, self.class_name, allow_dense=False), x.shape[-1])
        if not (torch.is_grad_enabled() and x.requires_grad):  # the value only (no_grad, inference_mode, eval)
            fx = _activate(x.detach().float(), f)
            yy = (fx / fx.sum(-1, keepdim=True)).gather(-1, t[..., None])[..., 0]
            return torch.where(bad, math.nan, -torch.log(torch.clamp(yy, 1e-20, 1e20)))
        xd = x.detach().float()
        if (torch.compiler.is_compiling() and not callable(ctx.activation)) or functorch_active():
            # a built-in activation: f'/f by torch.func, which Dynamo traces (autograd.grad breaks the graph);
            # under a torch.func transform, whose wrapped tensors take no requires_grad_
            dlogf = torch.func.grad(lambda v: torch.log(_activate(v, f)).sum())(xd)
            fx = _activate(xd, f)
        else:  # (eager, or the caller's own callable: also an autograd.Function, which torch.func refuses)
            xd.requires_grad_(True)
            with torch.enable_grad():
                fx = _activate(xd, f)
                (dlogf,) = torch.autograd.grad(torch.log(fx).sum(), xd)  # f'/f element-wise
            fx = fx.detach()
        yhat = fx / fx.sum(-1, keepdim=True)
        yy = yhat.gather(-1, t[..., None])[..., 0]
        value = torch.where(bad, math.nan, -torch.log(torch.clamp(yy, 1e-20, 1e20)))
        onehot = t[..., None] == torch.arange(x.shape[-1], device=t.device)  # (F.one_hot reads the ids: not under vmap)
        grad = dlogf * (yhat - onehot.to(yhat.dtype))
        grad = torch.where(ctx.mask[..., None], torch.where(bad[..., None], math.nan, grad), 0.0).to(x.dtype)
        return _UpstreamFreeGrad.apply(x, value, grad)


# ------------------------------------------------------------------------------------------------
# CTC, edit distance, BLEU
# ------------------------------------------------------------------------------------------------
def _collapse_repeated(t: Tensor, lengths: Tensor):
    """Collapse adjacent repeats in padded (B, S) targets on device: (targets, lengths)."""
    S = t.shape[1]
    valid = torch.arange(S, device=t.device)[None, :] < lengths[:, None]
    keep = valid.clone()
    keep[:, 1:] &= t[:, 1:] != t[:, :-1]
    pos = torch.cumsum(keep.long(), 1) - 1
    out = torch.zeros_like(t)
    out.scatter_(1, torch.where(keep, pos, S - 1 if S else 0), torch.where(keep, t, torch.zeros_like(t)))
    # positions written by non-kept entries land on S-1 with 0; re-write real values where kept there
    new_len = keep.sum(1)
    out = torch.where(torch.arange(S, device=t.device)[None, :] < new_len[:, None], out, torch.zeros_like(out))
    return out, new_len


def _ctc_scores(ctx, output_in_log_space):
    """(scores, input_type) by RETURNN's CTC rules (``get_output_logits``), always logits (the CTC op
    normalises them): with ``output_in_log_space`` the output itself, whatever the activation; else the
    pre-activation for a softmax layer, and the log of the output (probs) for any other: exact for exp/sigmoid
    layers, safe_log otherwise (a log_softmax layer's output is <= 0, so that is RETURNN's floor log(1e-20)
    everywhere: its value, not a useful loss; such a layer wants ``output_in_log_space=True``)."""
    if output_in_log_space:
        return ctx.y, "logits"
    if ctx.activation == "softmax":
        return ctx.x, "logits"
    # RETURNN's get_logits(): log(exp(x)) is x, and safe_log(sigmoid(x)) is rewritten to log_sigmoid(x): no floor
    if ctx.activation == "exp":
        return ctx.x, "logits"
    if ctx.activation == "sigmoid":
        return torch.nn.functional.logsigmoid(ctx.x.float()), "logits"
    return safe_log(ctx.y.float()), "logits"


class CTC(Loss):
    """RETURNN ``ctc`` (blank = last class). ``ctc_opts`` takes the keys of the op RETURNN passes it to:
    TF's ``ctc_loss`` on the default path (``preprocess_collapse_repeated``, ``ctc_merge_repeated`` (False:
    no label loop, as ``label_loop=False``), ``ignore_longer_outputs_than_inputs`` (loss 0, no gradient for a
    target longer than its input)), RETURNN's native one with ``use_native`` (``label_loop``, alias
    ``ctc_merge_repeated``), none with ``use_viterbi``; ``zero_infinity`` on every path. Without it an infeasible
    sequence gets the gradient softmax on its frames (loss 0 with ``use_native``, else +inf), a target
    longer than its input included (TF's ``ctc_loss`` raises "Not enough time for target transition sequence"
    there unless ``ignore_longer_outputs_than_inputs``); with ``use_viterbi`` softmax − onehot(0), as RETURNN's
    Viterbi alignment is class 0 there. ``use_native`` needs ``beam_width=1`` (RETURNN asserts it where it builds the
    error; its error is then the greedy decoding's), else a ValueError at construction."""

    class_name = "ctc"
    label_sequence_target = True
    OPTIONS = {"target_collapse_repeated": False, "auto_clip_target_len": False, "output_in_log_space": False,
               "beam_width": 100, "ctc_opts": None, "use_native": False, "use_viterbi": False}

    def __init__(self, **opts):
        super().__init__(**opts)
        if self.use_native and self.beam_width > 1:  # RETURNN asserts this where it builds the error
            raise InputError(f"get_loss('ctc'): beam_width: use_native=True decodes its error greedily and needs "
                             f"beam_width=1 (RETURNN: 'use beam_width=1 with use_native'), got {self.beam_width}")

    def _targets(self, ctx, for_error=False):
        t = ctx.target.long()
        lens = ctx.tgt_len
        if (not self.use_native and not self.use_viterbi) or for_error:  # the TF path and the error labels
            # as RETURNN's sparse_labels: the length is clipped first, then repeats collapse within it
            if self.auto_clip_target_len:
                lens = torch.minimum(lens, torch.clamp(ctx.out_len - 1, min=0))
            if self.target_collapse_repeated:
                t, lens = _collapse_repeated(t, lens)
        return t, lens

    def seq_losses(self, ctx):
        from .ctc import ctc_loss
        opts = dict(self.ctc_opts or {})
        zero_inf = bool(opts.pop("zero_infinity", False))
        # the keys of the op RETURNN hands ctc_opts to: TF's ctc_loss (default path), its native ctc_loss
        # (use_native: label_loop, alias ctc_merge_repeated), none with use_viterbi (RETURNN asserts that)
        if self.use_viterbi:
            keys = ()
        elif self.use_native:
            keys = ("label_loop", "ctc_merge_repeated")
        else:
            keys = ("preprocess_collapse_repeated", "ctc_merge_repeated", "ignore_longer_outputs_than_inputs")
        unknown = sorted(set(opts) - set(keys))
        if unknown:
            raise InputError(f"ctc: ctc_opts: supported keys {('zero_infinity',) + keys} on this path, got {unknown}")
        if "label_loop" in opts and "ctc_merge_repeated" in opts:
            raise InputError("ctc: ctc_opts: label_loop and its alias ctc_merge_repeated both given")
        label_loop = bool(opts.get("ctc_merge_repeated", opts.get("label_loop", True)))
        t, lens = self._targets(ctx)
        # TF skips on the label count it is given, before its own preprocess_collapse_repeated
        longer = (lens > ctx.out_len if opts.get("ignore_longer_outputs_than_inputs")
                  else torch.zeros_like(lens, dtype=torch.bool))
        if opts.get("preprocess_collapse_repeated"):
            t, lens = _collapse_repeated(t, lens)
        if not self.use_native and _validate.host_readable(lens) and bool((lens == 0).any()):
            raise InputError("ctc: target_lengths: empty targets are not supported on the default (TF) path, "
                             "as in TF; use use_native=True")
        x, input_type = _ctc_scores(ctx, self.output_in_log_space)
        F = x.shape[-1]
        losses = ctc_loss(x, t, ctx.out_len, lens, blank=F - 1, reduction="none", zero_infinity=zero_inf,
                          input_type=input_type, max_approx=bool(self.use_viterbi), label_loop=label_loop,
                          batch_first=True)
        losses = torch.where(longer, torch.zeros_like(losses), losses)  # TF: loss 0 and no gradient for those
        infeasible = ~torch.isfinite(losses) if not zero_inf else torch.zeros_like(losses, dtype=torch.bool)
        if not zero_inf:
            # RETURNN: infeasible sequences get the gradient softmax (loss 0 natively, +inf on TF's path);
            # with use_viterbi softmax - onehot(0) (its fast_viterbi fills the alignment with class 0), loss +inf
            lse = torch.logsumexp(x.float(), -1)  # its gradient is softmax (of the log-probs too)
            if self.use_viterbi:
                lse = lse - x[..., 0].float()
            frames = torch.arange(x.shape[1], device=x.device)[None, :] < ctx.out_len[:, None]
            surrogate = torch.where(frames, lse, 0.0).sum(1)
            push = torch.where(infeasible, surrogate - surrogate.detach(), 0.0)
            base = torch.where(infeasible, torch.zeros_like(losses) if self.use_native else losses, losses)
            losses = base + push
        return losses

    def compute(self, ctx):
        return self.seq_losses(ctx).sum(), self.error(ctx)

    def per_sequence(self, ctx, kind="value"):
        if kind == "value":
            return self.seq_losses(ctx)
        return self._errors(ctx)

    def _errors(self, ctx):
        from .text import ctc_beam_search_decode, edit_distance
        F = ctx.x.shape[-1]
        with torch.no_grad():
            x = _ctc_scores(ctx, self.output_in_log_space)[0].detach()
            if ctx.train or self.beam_width <= 1:
                from .ctc import ctc_greedy_decode
                # TF's argmax (tf.nn.ctc_greedy_decoder) keeps the first maximum by '>': a NaN wins its frame only in
                # class 0, where it is the starting value
                nan = torch.isnan(x)
                x = torch.where(nan, torch.where(torch.arange(F, device=x.device) == 0, math.inf, -math.inf), x)
                hyp, hyp_len = ctc_greedy_decode(x, ctx.out_len, blank=F - 1, batch_first=True, backend=_PLAIN)
            else:
                hyp, hyp_len = ctc_beam_search_decode(x.float(), ctx.out_len, beam_width=int(self.beam_width),
                                                      blank=F - 1, backend=_PLAIN)
            t, lens = self._targets(ctx, for_error=True)
            return edit_distance(hyp, hyp_len, t, lens).to(torch.float32)

    def error(self, ctx):
        return self._errors(ctx).sum()


class EditDistance(Loss):
    """RETURNN ``edit_distance``: a metric (value None); error = sum_b d_b of the (decoded) output."""

    class_name = "edit_distance"
    label_sequence_target = True
    label_output = True
    OPTIONS = {"ctc_decode": False, "output_in_log_space": False, "label_map": None}

    def hyp(self, ctx):
        if ctx.x.dtype.is_floating_point:
            if not self.ctc_decode:
                raise InputError("edit_distance: output: dense output needs ctc_decode=True, got a float tensor")
            from .text import ctc_beam_search_decode
            x = _ctc_scores(ctx, self.output_in_log_space)[0].detach().float()
            return ctc_beam_search_decode(x, ctx.out_len, beam_width=100, blank=-1, backend=_PLAIN)
        return ctx.x, ctx.out_len

    def per_sequence(self, ctx, kind="value"):
        """d_b per sequence (the error; a metric has no value): for ``expected_loss`` (MWER)."""
        from .text import edit_distance
        hyp, hl = self.hyp(ctx)
        return edit_distance(hyp, hl, ctx.target, ctx.tgt_len, label_map=self.label_map).to(torch.float32)

    def compute(self, ctx):
        return None, self.per_sequence(ctx, "error").sum()


class Bleu(Loss):
    """RETURNN ``bleu``: a metric; error = -sum_b BLEU_b (the default norm still divides by the
    target lengths: a RETURNN quirk, kept)."""

    class_name = "bleu"
    label_sequence_target = True
    label_output = True

    def per_sequence(self, ctx, kind="value"):
        """-BLEU_b per sequence (the error): for ``expected_loss`` (minimum Bayes risk)."""
        from .text import bleu
        return -bleu(ctx.x, ctx.out_len, ctx.target, ctx.tgt_len, mode="returnn")

    def compute(self, ctx):
        return None, self.per_sequence(ctx, "error").sum()


# ------------------------------------------------------------------------------------------------
# sequence-level and misc
# ------------------------------------------------------------------------------------------------
class DeepClustering(Loss):
    """RETURNN ``deep_clustering``: value = sum_b C_b; no error."""

    class_name = "deep_clustering"
    OPTIONS = {"embedding_dimension": None, "nr_of_sources": None}

    def compute(self, ctx):
        from .misc import deep_clustering_loss
        lens = ctx.out_len if ctx.has_time else None
        v = deep_clustering_loss(ctx.y, ctx.target, lens, embedding_dim=self.embedding_dimension,
                                 num_sources=self.nr_of_sources, reduction="none", backend=_PLAIN)
        return v.sum(), None


class Triplet(Loss):
    """RETURNN ``triplet_loss``: norm factor fixed to 1/(9B) (1/(18B) multi-view); no error."""

    class_name = "triplet_loss"
    OPTIONS = {"margin": None, "multi_view_training": False}
    frame_values = False  # (B, 3F) embeddings, never a time axis

    def compute(self, ctx):
        from .misc import triplet_loss
        if self.margin is None:
            raise InputError("triplet_loss: margin: expected a number, got None")
        return triplet_loss(ctx.y, ctx.target, margin=float(self.margin),
                            multi_view=bool(self.multi_view_training), backend=_PLAIN), None

    def norm_factor(self, ctx):
        n = (18 if self.multi_view_training else 9) * ctx.B
        return torch.tensor(1.0 / n if n else math.inf, device=ctx.x.device)  # (B = 0: inf, as RETURNN's 1 / 0)


class ExpectedLoss(Loss):
    """RETURNN ``expected_loss``: MBR over the beam with an inner loss per (batch*beam) sequence."""

    class_name = "expected_loss"
    label_sequence_target = True
    OPTIONS = {"loss": None, "loss_kind": "value", "norm_scores": True, "norm_scores_stop_gradient": True,
               "divide_beam_size": True, "subtract_average_loss": True, "loss_correction_grad_only": False}
    needs_target = True

    def __init__(self, **opts):
        super().__init__(**opts)
        if not isinstance(self.loss, dict) or "class" not in self.loss:
            raise InputError(f"expected_loss: loss: expected a dict with a 'class' key, got {self.loss!r}")
        inner = dict(self.loss)
        self.inner = get_loss(inner.pop("class"), **inner)
        self.label_output = self.inner.label_output  # (MWER over decoded label sequences)
        if self.loss_kind not in ("value", "error"):
            raise InputError(f"expected_loss: loss_kind: expected 'value' or 'error', got {self.loss_kind!r}")

    def extras(self):
        return ("beam_scores",) + tuple(e for e in self.inner.extras() if e != "beam_scores")

    def compute(self, ctx):
        from .misc import expected_loss
        scores = _beam_scores(ctx, self.class_name, ctx.x.shape[0])
        B, K = scores.shape
        ictx = ctx  # the call's tensors are already (B*K, ...)
        per = self.inner.per_sequence(ictx, self.loss_kind).reshape(B, K)
        v = expected_loss(per, scores, norm_scores=bool(self.norm_scores),  # RETURNN: the options' truth values
                          norm_scores_stop_gradient=bool(self.norm_scores_stop_gradient),
                          divide_beam_size=bool(self.divide_beam_size),
                          subtract_average_loss=bool(self.subtract_average_loss),
                          loss_correction_grad_only=bool(self.loss_correction_grad_only), reduction="sum",
                          backend=_PLAIN)
        return v, None


class ViaLayer(Loss):
    """RETURNN ``via_layer``: error signal from the caller (``error_signal``, or ``output - align``)."""

    class_name = "via_layer"
    OPTIONS = {"loss_wrt_to_act_in": False, "error_signal_layer": None, "align_layer": None}
    EXTRAS = _FRAME_EXTRAS + ("loss_value",)
    needs_target = False

    def compute(self, ctx):
        from .misc import loss_with_gradient
        wrt = self.loss_wrt_to_act_in
        if isinstance(wrt, str):
            act = ctx.activation if isinstance(ctx.activation, str) else getattr(ctx.activation, "__name__", None)
            if act != wrt:
                raise InputError(f"via_layer: loss_wrt_to_act_in: expected the activation {wrt!r}, got {act!r}")
            wrt = True
        if wrt and ctx.activation is None:  # RETURNN asserts the output has an activation
            raise InputError("via_layer: loss_wrt_to_act_in: the gradient goes into the activation's input, "
                             "so the call needs activation=...; got activation=None")
        x = ctx.x if wrt else ctx.y
        for name in _FRAME_EXTRAS:
            v = ctx.extra.get(name)
            if v is not None and (not isinstance(v, Tensor) or v.shape != x.shape):
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise InputError(f"via_layer: {name}: expected the output's shape {tuple(x.shape)} "
                                 f"(batch-major; time-major with time_major=True, as the output), got {got}")
        if ctx.extra.get("error_signal") is not None:
            sig = ctx.extra["error_signal"]
        elif ctx.extra.get("align") is not None:
            sig = ctx.y.detach() - ctx.extra["align"]
        else:
            raise InputError("via_layer: error_signal: pass error_signal=... or align=... in the call")
        m = ctx.mask
        while m.dim() < sig.dim():
            m = m[..., None]
        sig = torch.where(m, sig, torch.zeros_like(sig)).to(x.dtype)
        lv = ctx.extra.get("loss_value")
        value = lv.sum().float() if lv is not None else torch.zeros((), device=x.device)
        value = loss_with_gradient(value, x, sig, backend=_PLAIN)
        err = ctx.frame_error() if ctx.target is not None else None
        return value, err


class AsIs(Loss):
    """RETURNN ``as_is``: the output (float32) summed over all dims (valid frames); ``as_error=True``
    makes it the error and the value None."""

    class_name = "as_is"
    OPTIONS = {"as_error": False}
    needs_target = False

    def compute(self, ctx):
        y = ctx.y.float()
        m = ctx.mask
        while m.dim() < y.dim():
            m = m[..., None]
        s = torch.where(m, y, 0.0).sum()
        return (None, s.detach()) if self.as_error else (s, None)


class SearchScore(Loss):
    """RETURNN ``search_score``: value = sum_{b,k} -beam_scores[b, k]."""

    class_name = "search_score"
    label_output = True  # the output is not read (RETURNN puts this loss on a ChoiceLayer: int labels)
    EXTRAS = ("beam_scores",)
    needs_target = False
    frame_values = False  # the output is not used; the beam scores are per sequence

    def compute(self, ctx):
        return -_beam_scores(ctx, self.class_name).sum(), None


class SamplingLoss(Loss):
    """RETURNN ``sampling_loss``: sampled softmax / NCE over the linear layer under the loss (T = 1,
    unique sampling); rows are the valid frames, value = their sum. The instance owns the sampler."""

    class_name = "sampling_loss"
    frame_target = True
    EXTRAS = ("linear_input", "linear_weight", "linear_bias", "generator")
    OPTIONS = {"num_sampled": 128, "num_splits": 1, "sampler": "log_uniform", "sampler_args": None,
               "nce_loss": False, "use_full_softmax": False, "remove_accidental_hits": None,
               "nce_log_norm_term": 0.0}

    def __init__(self, **opts):
        super().__init__(**opts)
        self._sampler = None
        self._generator = None

    def compute(self, ctx):
        from . import sampled
        x = _extra(ctx, "linear_input", self.class_name)
        W = _extra(ctx, "linear_weight", self.class_name)
        b = ctx.extra.get("linear_bias")
        if self._sampler is None:
            from . import samplers
            args = dict(self.sampler_args or {})
            # RETURNN passes sampler_args to TF's *_candidate_sampler, whose op-level seed makes the draws
            # reproducible: here a generator seeded once and kept (its stream goes on over calls, as TF's op's);
            # TF's op name means nothing here
            seed = args.pop("seed", None)
            args.pop("name", None)
            if seed is not None:
                seed = _validate.as_int(seed, "sampler_args['seed']", self.class_name)
                self._generator = torch.Generator(device=x.device).manual_seed(seed)
            if self.sampler == "learned_unigram":  # owned here, so the learned counts persist across calls
                self._sampler = samplers.LearnedUnigramSampler(W.shape[0], **args)
            else:
                self._sampler = samplers.make_sampler(self.sampler, W.shape[0], **args)
        sampled._move_own_sampler(self._sampler, x.device)
        t = torch.where(ctx.mask, ctx.target, torch.full_like(ctx.target, -100))
        rah = (not self.nce_loss) if self.remove_accidental_hits is None else bool(self.remove_accidental_hits)
        kw = dict(linear_bias=b, sampler=self._sampler, unique=True, num_splits=int(self.num_splits),
                  remove_accidental_hits=rah, ignore_index=-100, reduction="sum",
                  use_full_softmax=bool(self.use_full_softmax),  # RETURNN: whatever the train flag
                  generator=ctx.extra.get("generator", self._generator))
        if self.nce_loss:
            v = sampled.nce_loss(x, W, t, int(self.num_sampled), log_norm_term=float(self.nce_log_norm_term), **kw)
        else:
            v = sampled.sampled_softmax_loss(x, W, t, int(self.num_sampled), **kw)
        return v, ctx.frame_error()  # RETURNN's default error: the layer output's argmax against the target


class FastBW(Loss):
    """RETURNN ``fast_bw``: full-sum over an automaton (``fsa=(edges, weights, start_end_states)``)."""

    class_name = "fast_bw"
    EXTRAS = ("fsa",)
    OPTIONS = {"sprint_opts": None, "tdp_scale": 1.0}
    needs_target = False

    def compute(self, ctx):
        if ctx.extra.get("fsa") is None:
            if self.sprint_opts is not None:
                raise NotImplementedError("fast_bw: sprint_opts needs an external RASR/Sprint process to build the "
                                          "automata; pass fsa=(edges, weights, start_end_states) instead")
            raise InputError("fast_bw: fsa: pass fsa=(edges, weights, start_end_states) in the call")
        from .automata import Fsa, fsa_loss
        f = ctx.extra["fsa"]
        # RETURNN scales the weights, replacing them by zeros when tdp_scale == 0 (a +inf, forbidden, edge then
        # becomes allowed: not inf * 0)
        scale = float(self.tdp_scale)
        w = torch.zeros_like(f[1]) if scale == 0 else f[1] * scale
        fsa = Fsa(f[0], w, f[2], f[3] if len(f) > 3 else None)
        # softmax and log_softmax activations: the pre-activation is the logits of the same distribution
        v = fsa_loss(ctx.x, ctx.out_len, fsa, input_type="logits", reduction="sum", batch_first=True)
        return v, (ctx.frame_error() if ctx.target is not None else None)  # RETURNN's default error with a target


class Sprint(Loss):
    """RETURNN ``sprint``: needs an external RASR/Sprint process: not available."""

    class_name = "sprint"
    OPTIONS = {"sprint_opts": None}
    needs_target = False

    def compute(self, ctx):
        raise NotImplementedError(
            "sprint: this loss needs an external RASR/Sprint process for the loss and error signal; use "
            "'via_layer' / tri_losses.loss_with_gradient with your own error signal, or 'fast_bw' with an "
            "automaton (tri_losses.ctc_fsa / hmm_fsa)")


#: RETURNN loss class names (a layer's ``"loss"``) -> the class :func:`get_loss` builds.
LOSSES: dict[str, type] = {
    "ce": CrossEntropy, "ctc": CTC, "bin_ce": BinaryCrossEntropy, "sse_sigmoid": BinaryCrossEntropy,
    "generic_ce": GenericCE, "mse": MeanSquared, "l1": L1, "mean_l1": MeanL1, "edit_distance": EditDistance,
    "bleu": Bleu, "deep_clustering": DeepClustering, "triplet_loss": Triplet, "expected_loss": ExpectedLoss,
    "via_layer": ViaLayer, "as_is": AsIs, "search_score": SearchScore, "sampling_loss": SamplingLoss,
    "fast_bw": FastBW, "sprint": Sprint,
}


def get_loss(class_name: str, **loss_opts: Any) -> Loss:
    """A RETURNN loss by class name with RETURNN's option names (``get_loss("ce", label_smoothing=0.1)``).

    Args:
        class_name: a RETURNN loss class name, a key of :data:`LOSSES` (``"ce"``, ``"ctc"``,
            ``"fast_bw"``, ``"sampling_loss"``, ``"mse"``, ...).
        **loss_opts: the layer's ``loss_opts`` unchanged (``scale``, ``use_normalized_loss``,
            ``custom_norm_factor``, and the loss's own options).

    Returns:
        A :class:`Loss`; call it on the layer output (see the module docstring).

    Raises:
        ValueError: an unknown ``class_name`` or option (the message lists the valid ones).
        The ``"sprint"`` loss is built, as in RETURNN, but calling it raises ``NotImplementedError``
        (it needs an external RASR process).
    """
    if class_name not in LOSSES:
        raise InputError(f"get_loss: class_name: unknown loss {class_name!r}; valid names: {sorted(LOSSES)}")
    return LOSSES[class_name](**loss_opts)
