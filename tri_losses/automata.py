"""General automata: RETURNN's ``fast_baum_welch`` / ``fast_viterbi``, ``fsa_loss`` and FSA builders.

Conventions (RETURNN's): ``am_scores (T, B, D)`` per-frame emission costs in -log space; ``edges (4, E)``
rows ``from, to, emission_idx, sequence_idx`` with state ids global across the batch; ``weights (E,)``
edge costs in -log space (infinite, either sign, or NaN: a dead edge, as RETURNN skips infinite costs),
for ``fast_viterbi`` too; ``start_end_states (2, B)``;
``mask (T, B)`` 1 on valid frames. Every edge consumes one frame; a path must be in the end state right
after the last valid frame. ``fwdbwd (T, B, D) = -log gamma_t(d)`` (the edge posteriors summed in log
space, as RETURNN: exact however small gamma is) with 1e32 where impossible, on padded frames and for
sequences without a path; ``obs_scores (T, B) = -log Z_b`` on valid frames, 0 on padded
frames and for no-path sequences.

Autograd: ``fast_baum_welch`` and ``fast_viterbi`` return detached tensors (as RETURNN, whose posteriors
are the error signal, not something to differentiate); train with :func:`fsa_loss`, whose gradient
w.r.t. logits is ``softmax - gamma`` (``-gamma`` for log-probs), 0 on padded frames; a sequence with
no path contributes loss 0 and gradient ``softmax`` (RETURNN's ``fast_bw`` with obs = 0).

Ops: ``tri_losses::fsa_fwd`` / ``tri_losses::fsa_bwd``, ``tri_losses::fast_bw``, ``tri_losses::fast_viterbi``;
Triton kernels in ``tri_losses/kernels/automata.py`` (one persistent program per sequence: alpha and beta
in registers for sequences of at most 1024 states and 8 incoming / outgoing edges per state, a general
edge-list path otherwise, each sequence on its own path within one launch per direction; the Viterbi
backtrack runs in torch on the kernel's alpha), the torch backend in
``tri_losses/_torch/automata.py``. ``fsa_fwd`` builds the kernels' edge tables and the logits' row
log-sum-exps once and returns them (with alpha and log Z) for ``fsa_bwd``: the backward rebuilds nothing.
A sequence without a path gets loss 0 inside the op, and ``fsa_bwd`` gives it the gradient ``softmax``
(logits) / 0 (log-probs) directly. State ids may be numbered in any way (the Triton path renumbers them per
sequence on device). The number of states is taken from the builders (:class:`Fsa` carries it); for raw
edge tables it is read with one host sync (none for tables on the CPU; under ``torch.compile`` either read is
a graph break: pass ``num_states`` or an :class:`Fsa` there). The builders make the automaton on
their targets' device; the ops take it on any device: one built on the CPU (from CPU targets) is checked
there and copied to the emissions' device without a host sync.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _validate
from ._validate import InputError, InputIndexError, InputTypeError
from ._backend import custom_op, device_guard, first_order, kernels, resolve_backend
from ._torch import automata as _ta

__all__ = ["fast_baum_welch", "fast_viterbi", "fsa_loss", "ctc_fsa", "hmm_fsa", "Fsa"]



class Fsa(NamedTuple):
    """A batch of automata, as :func:`ctc_fsa` and :func:`hmm_fsa` return and :func:`fsa_loss` takes.

    A ``NamedTuple`` ``(edges, weights, start_end_states, num_states)`` in RETURNN's layout: ``edges``
    ``(4, E)`` integer rows (from state, to state, emission id, sequence index), ``weights`` ``(E,)``
    float -log edge costs, ``start_end_states`` ``(2, B)`` integer (start and end state of each
    sequence), and ``num_states`` the total state count as a Python int (so no host sync is needed to
    size the DP), or ``None``. ``fsa[:3]`` is what :func:`fast_baum_welch` takes.
    """
    edges: Tensor
    weights: Tensor
    start_end_states: Tensor
    num_states: Optional[int] = None


def _unpack(fsa, op):
    if not isinstance(fsa, (tuple, list)) or len(fsa) not in (3, 4):
        raise InputTypeError(f"{op}: fsa: expected (edges, weights, start_end_states), got {type(fsa).__name__}")
    edges, weights, se = fsa[0], fsa[1], fsa[2]
    n = fsa[3] if len(fsa) == 4 else None
    return edges, weights, se, n


@torch.compiler.disable
def _num_states_from_edges(edges, se) -> int:
    """The state count, read from the tables (a host read; under torch.compile a graph break, so
    ``fullgraph=True`` needs ``num_states`` or an ``Fsa``)."""
    return int(torch.cat([edges[:2].reshape(-1), se.reshape(-1)]).max()) + 1 if edges.numel() or se.numel() else 0


def _check_fsa(edges, weights, se, B, D, op, num_states=None, validate=False, device=None):
    """Shapes and dtypes always; the ids (emission/sequence range, non-negative states below ``num_states``,
    every state owned by one sequence, start/end states in their own sequence) on CPU tensors, or on
    CUDA with ``validate=True`` (a host sync). Unchecked bad ids on CUDA give undefined results. Returns
    the tables on ``device`` (the emissions' device; None: where they are): an automaton built on the CPU
    is checked there, then copied without a host sync (``_validate.to_device``); one on an accelerator with
    emissions on the CPU is copied to the CPU first (blocking) and checked there."""
    _validate.check_int(edges, "edges", op)
    _validate.check_float(weights, "weights", op)
    _validate.check_int(se, "start_end_states", op)
    if edges.dim() != 2 or edges.shape[0] != 4:
        raise InputError(f"{op}: edges: expected shape (4, E), got {tuple(edges.shape)}")
    _validate.check_shape(weights, (edges.shape[1],), "weights", op)
    _validate.check_shape(se, (2, B), "start_end_states", op)
    if device is not None and (len({edges.device, weights.device, se.device}) > 1
                               or torch.device(device).type == "cpu"):  # checked where they meet, on the CPU
        edges, weights, se = (_validate.to_device(t, device, name=n, op=op) for t, n in (
            (edges, "edges"), (weights, "weights"), (se, "start_end_states")))
    edges = edges.long()
    se = se.long()
    if num_states is None:
        if not torch.compiler.is_compiling() and (edges.is_meta or se.is_meta
                                                  or not _validate.host_readable(edges, validate=True)):
            raise InputError(f"{op}: num_states: the state count is read from the edges' values, which meta "
                             f"and fake tensors do not have: pass num_states=... (or an Fsa, which carries it), "
                             f"got None")
        num_states = _num_states_from_edges(edges, se)
    num_states = _validate.as_int(num_states, "num_states", op, low=0, what="a non-negative int")
    # an infinite edge cost (either sign) is a dead edge, as RETURNN's native ops skip isinf() weights, and
    # so is a NaN: all become +inf here, for both backends (the Triton tables keep only edges with cost < inf,
    # the torch backend drops +inf edges)
    weights = torch.where(torch.isnan(weights) | (weights == -math.inf), math.inf, weights)
    if _validate.host_readable(edges, validate) and edges.shape[1]:
        for row, name, hi in ((2, "emission_idx", D), (3, "sequence_idx", B)):
            bad = (edges[row] < 0) | (edges[row] >= hi)
            if bool(bad.any()):
                raise InputIndexError(f"{op}: edges: {name} expected in [0, {hi}), got {int(edges[row][bad][0])}")
        if bool((edges[:2] < 0).any()):
            raise InputError(f"{op}: edges: state ids (from/to rows) must be >= 0, got {int(edges[:2].min())}")
        if bool((se < 0).any()):
            raise InputError(f"{op}: start_end_states: state ids must be >= 0, got {int(se.min())}")
        top = int(torch.cat([edges[:2].reshape(-1), se.reshape(-1)]).max())
        if top >= num_states:
            raise InputError(f"{op}: num_states: expected > every state id ({top}), got {num_states}")
        # every state belongs to one sequence
        owner = torch.full((num_states,), -1, dtype=torch.int64, device=edges.device)
        for s_row in (0, 1):
            prev = owner[edges[s_row]]
            clash = (prev >= 0) & (prev != edges[3])
            if bool(clash.any()):
                raise InputError(f"{op}: edges: state {int(edges[s_row][clash][0])} is used by edges of two "
                                 f"sequences (states outside a sequence)")
            owner[edges[s_row]] = edges[3]
        b = torch.arange(B, device=edges.device)
        # a start/end state no edge touches must not serve two sequences either (each sequence's states are its own)
        ends, seqs = se.reshape(-1), b.repeat(2)  # start states, then end states
        seq_of = torch.full((num_states,), -1, dtype=torch.int64, device=edges.device).scatter_(0, ends, seqs)
        shared = seq_of[ends] != seqs
        if bool(shared.any()):
            i = int(shared.nonzero()[0, 0])
            raise InputError(f"{op}: start_end_states: state {int(ends[i])} is a start/end state of sequences "
                             f"{int(seq_of[ends[i]])} and {i % B} (each sequence needs its own states)")
        for k, name in ((0, "start"), (1, "end")):
            o = owner[se[k]]
            bad = (o >= 0) & (o != b)
            if bool(bad.any()):
                raise InputError(f"{op}: start_end_states: the {name} state of sequence {int(b[bad][0])} belongs to "
                                 f"another sequence's edges")
    if device is not None:
        edges, weights, se = (_validate.to_device(t, device, name=n, op=op) for t, n in (
            (edges, "edges"), (weights, "weights"), (se, "start_end_states")))
    return edges, weights, se, num_states


def _rows(x):
    """The kernels index classes with unit stride: copy only when the class dim is strided."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------------------------------------
# ops: fsa_fwd / fsa_bwd (fsa_loss), fast_bw, fast_viterbi
# ------------------------------------------------------------------------------------------------
def _tables(edges, weights, se, num_states, B, D):
    """The kernels' edge tables (built once per forward; the backward gets them from the forward)."""
    return kernels("automata").prepare(edges, weights, se, num_states, B, D)


def _triton_alpha(x, lens, tabs, score, viterbi):
    """(alpha (T, S) in the kernels' state numbering, log Z (B,), loss (B,): -log Z, 0 without a path, the
    lse pairs (logits), the slot emissions)."""
    K = kernels("automata")
    lse, emb = K.emissions(x, tabs, score)
    a, logz, loss = K.alpha(x, lse, emb, tabs, lens, score, viterbi)
    return a, logz, loss, lse, emb


def _triton_loss_forward(x, input_lengths, edges, weights, se, num_states, is_logits, viterbi):
    T, B, D = x.shape
    tabs = _tables(edges, weights, se, num_states, B, D)
    a, logz, loss, lse, emb = _triton_alpha(x, input_lengths, tabs, 2 if is_logits else 1, viterbi)
    if viterbi:  # the backtrack runs in torch on original state ids
        a = a[:, tabs.new_id.long()]
    lse = x.new_empty(0, dtype=torch.float32) if lse is None else lse
    emb = x.new_empty(0, dtype=torch.float32) if emb is None else emb
    return loss, logz, a, lse, emb, tabs.itab, tabs.ftab


def _triton_loss_grad(grad_loss, x, input_lengths, edges, is_logits, alpha, logz, lse, emb, itab, ftab):
    K = kernels("automata")
    T, B, D = x.shape
    tabs = K.Tables(itab, ftab, B, alpha.shape[1], edges.shape[1], D)
    out = torch.empty(T, B, D, dtype=x.dtype, device=x.device)
    K.posteriors(out, grad_loss, x, lse if is_logits else None, emb, tabs, input_lengths, alpha, logz,
                 2 if is_logits else 1, 0 if is_logits else 1)
    return out


def _triton_baum_welch(am, lens, edges, weights, se, num_states):
    T, B, D = am.shape
    tabs = _tables(edges, weights, se, num_states, B, D)
    a, logz, _, _, emb = _triton_alpha(am, lens, tabs, 0, False)
    out = torch.empty(T, B, D, dtype=torch.float32, device=am.device)
    obs = torch.empty(T, B, dtype=torch.float32, device=am.device)
    kernels("automata").posteriors(out, None, am, None, emb, tabs, lens, a, logz, 0, 2, obs)
    return out, obs


def _triton_viterbi(am, lens, edges, weights, se, num_states, mask_idx):
    T, B, D = am.shape
    tabs = _tables(edges, weights, se, num_states, B, D)
    alpha, best, _, _, _ = _triton_alpha(am, lens, tabs, 1, True)
    return _ta.viterbi_align(am, lens, edges, weights, se, num_states, mask_idx, alpha[:, tabs.new_id.long()], best)


def _ct(x, use_triton):
    return torch.float64 if (x.dtype == torch.float64 and not use_triton) else torch.float32


def _no_path_zero(loss):
    """A sequence without a path has loss 0 (its gradient: softmax for logits, 0 for log-probs)."""
    return torch.where(torch.isinf(loss), 0.0, loss)


@custom_op("tri_losses::fsa_fwd", mutates_args=())
def _fsa_fwd(x: Tensor, input_lengths: Tensor, edges: Tensor, weights: Tensor, se: Tensor, num_states: int,
             is_logits: bool, viterbi: bool, use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                        Tensor]:
    """(loss (B,) = -log Z (0: no path), log Z (B,), alpha (T, num_states), and what the backward reuses
    (Triton: the lse pairs for logits, the slot emissions, the two table buffers; empty on the torch
    backend))."""
    if use_triton:
        with device_guard(x):
            return _triton_loss_forward(x, input_lengths, edges, weights, se, num_states, is_logits, viterbi)
    loss, alpha = _ta.loss_forward(x, input_lengths, edges, weights, se, num_states, is_logits, viterbi)
    empty = x.new_empty(0, dtype=torch.float32)
    return _no_path_zero(loss), -loss, alpha, empty, empty.clone(), edges.new_empty(0, dtype=torch.int32), \
        empty.clone()


@_fsa_fwd.register_fake
def _(x, input_lengths, edges, weights, se, num_states, is_logits, viterbi, use_triton):
    ct = _ct(x, use_triton)
    T, B, D = x.shape
    ni = nf = bs = 0
    if use_triton:
        K = kernels("automata")
        ni, nf = K.table_sizes(B, num_states, edges.shape[1], D)
        bs = K.reg_block(num_states, B)
    f32 = torch.float32
    return (x.new_empty(B, dtype=ct), x.new_empty(B, dtype=ct), x.new_empty(T, num_states, dtype=ct),
            x.new_empty((T, B, 2) if use_triton and is_logits else (0,), dtype=f32),
            x.new_empty((T, B, bs) if bs else (0,), dtype=f32),
            x.new_empty(ni, dtype=torch.int32), x.new_empty(nf, dtype=f32))


@custom_op("tri_losses::fsa_bwd", mutates_args=())
def _fsa_bwd(grad_loss: Tensor, x: Tensor, input_lengths: Tensor, edges: Tensor, weights: Tensor, se: Tensor,
             num_states: int, is_logits: bool, viterbi: bool, alpha: Tensor, logz: Tensor, lse: Tensor, emb: Tensor,
             itab: Tensor, ftab: Tensor, use_triton: bool) -> Tensor:
    """d loss / d x times ``grad_loss`` (x's dtype), from the forward's alpha, log Z and (Triton) tables.
    Viterbi runs the torch backtrack on both backends."""
    if use_triton and not viterbi:
        with device_guard(x):
            return _triton_loss_grad(grad_loss, x, input_lengths, edges, is_logits, alpha, logz, lse, emb, itab, ftab)
    return _ta.loss_grad(grad_loss, x, input_lengths, edges, weights, se, num_states, is_logits, viterbi, alpha,
                         logz).contiguous()  # one layout on both backends whatever x's strides (the fake's)


@_fsa_bwd.register_fake
def _(grad_loss, x, input_lengths, edges, weights, se, num_states, is_logits, viterbi, alpha, logz, lse, emb, itab,
      ftab, use_triton):
    return x.new_empty(x.shape)  # contiguous (T, B, D), as both backends return it


def _setup(ctx, inputs, output):
    x, input_lengths, edges, weights, se, num_states, is_logits, viterbi, use_triton = inputs
    _, *saved = output
    ctx.save_for_backward(x, input_lengths, edges, weights, se, *saved)
    ctx.opts = (num_states, is_logits, viterbi, use_triton)
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero gradients for the non-differentiable outputs (alpha, tables)


@first_order("fsa_loss")
def _backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 9
    x, input_lengths, edges, weights, se, logz, alpha, lse, emb, itab, ftab = ctx.saved_tensors
    num_states, is_logits, viterbi, use_triton = ctx.opts
    g = _fsa_bwd(grad_loss, x, input_lengths, edges, weights, se, num_states, is_logits, viterbi, alpha, logz, lse,
                 emb, itab, ftab, use_triton)
    return g, None, None, None, None, None, None, None, None


_fsa_fwd.register_autograd(_backward, setup_context=_setup)


@custom_op("tri_losses::fast_bw", mutates_args=())
def _fast_bw(am: Tensor, lengths: Tensor, edges: Tensor, weights: Tensor, se: Tensor, num_states: int,
             use_triton: bool) -> tuple[Tensor, Tensor]:
    """RETURNN's fast_baum_welch: (fwdbwd (T, B, D), obs_scores (T, B)); not differentiable."""
    if use_triton:
        with device_guard(am):
            return _triton_baum_welch(am, lengths, edges, weights, se, num_states)
    return _ta.baum_welch(am, lengths, edges, weights, se, num_states)


@_fast_bw.register_fake
def _(am, lengths, edges, weights, se, num_states, use_triton):
    ct = _ct(am, use_triton)
    return am.new_empty(am.shape, dtype=ct), am.new_empty(am.shape[:2], dtype=ct)


@custom_op("tri_losses::fast_viterbi", mutates_args=())
def _fast_viterbi(am: Tensor, lengths: Tensor, edges: Tensor, weights: Tensor, se: Tensor, num_states: int,
                  mask_idx: int, use_triton: bool) -> tuple[Tensor, Tensor]:
    """RETURNN's fast_viterbi: (alignment (T, B) int64, score (B,)); the backtrack runs in torch."""
    if use_triton:
        with device_guard(am):
            return _triton_viterbi(am, lengths, edges, weights, se, num_states, mask_idx)
    return _ta.viterbi_align(am, lengths, edges, weights, se, num_states, mask_idx)


@_fast_viterbi.register_fake
def _(am, lengths, edges, weights, se, num_states, mask_idx, use_triton):
    return am.new_empty(am.shape[:2], dtype=torch.int64), am.new_empty(am.shape[1], dtype=_ct(am, use_triton))


def fsa_loss(logits: Tensor, input_lengths, fsa, *, input_type: str = "logits", max_approx: bool = False,
             reduction: str = "sum", batch_first: bool = False, validate: bool = False,
             backend: str = "auto") -> Tensor:
    """Full-sum (or Viterbi) training over any automaton: ``loss_b = -log Z_b`` (RETURNN ``FastBaumWelchLoss``).

    Args:
        logits: ``(T, B, D)`` (``(B, T, D)`` with ``batch_first``) scores over the emission classes.
        input_lengths: ``(B,)`` valid frames (tensor or ints).
        fsa: an :class:`Fsa` from a builder (e.g. :func:`ctc_fsa`), or ``(edges, weights, start_end_states)``
            as in :func:`fast_baum_welch`; for such a tuple on CUDA the number of states is read from the
            largest state id with one host sync (an :class:`Fsa` carries it: no sync).
        input_type: ``"logits"`` (log-softmax fused) or ``"log_probs"`` (gradient ``-gamma``; from 16-bit
            log-probs the logits' gradient through a separate ``log_softmax`` loses precision near
            convergence, as for :func:`tri_losses.ctc_loss`: pass 16-bit logits).
        max_approx: Viterbi (best path only).
        reduction: ``"sum"`` (RETURNN's value), ``"mean"`` over sequences, ``"none"`` ``(B,)``.
        validate: check the automaton's ids on CUDA too (one host sync; CPU inputs are always checked).
    The loss is fp32 (fp64 for fp64 inputs on the torch backend); the gradient has the input's dtype.
    A sequence with no path gets loss 0 and gradient ``softmax`` (logits) / 0 (log-probs).
    """
    op = "fsa_loss"
    _validate.check_bool(op, max_approx=max_approx, batch_first=batch_first, validate=validate)
    _validate.check_float(logits, "logits", op)
    _validate.check_option(input_type, "input_type", op, ("logits", "log_probs"))
    _validate.check_reduction(reduction, op)
    if logits.dim() != 3:
        raise InputError(f"{op}: logits: expected a 3-D tensor (T, B, D), got {tuple(logits.shape)}")
    x = _rows(logits.transpose(0, 1) if batch_first else logits)
    T, B, D = x.shape
    use_triton = resolve_backend(backend, x, op)
    il = _validate.as_lengths(input_lengths, "input_lengths", op, B, x.device, max_value=T).clamp(0, T)  # CUDA: unchecked
    edges, weights, se, n = _unpack(fsa, op)
    if isinstance(weights, Tensor) and weights.requires_grad and torch.is_grad_enabled():
        raise InputError(f"{op}: fsa: the edge weights are not differentiable (as in RETURNN's FastBaumWelchLoss); "
                         "pass them detached")
    edges, weights, se, n = _check_fsa(edges, weights, se, B, D, op, n, validate, x.device)
    loss = _fsa_fwd(x, il, edges, weights, se, n, input_type == "logits", bool(max_approx), use_triton)[0]
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


# ------------------------------------------------------------------------------------------------
# RETURNN's operators
# ------------------------------------------------------------------------------------------------
def fast_baum_welch(am_scores: Tensor, edges: Tensor, weights: Tensor, start_end_states: Tensor, mask: Tensor, *,
                    num_states: Optional[int] = None, validate: bool = False, backend: str = "auto"):
    """RETURNN's ``fast_baum_welch``: ``(fwdbwd (T, B, D), obs_scores (T, B))`` (see the module docstring).

    Outputs are float32 whatever the input dtype (as RETURNN's op; float64 for float64 input on the torch
    backend): 1e32 does not fit in fp16. ``mask`` is read as per-sequence lengths (``mask.sum(0)`` valid
    frames from t = 0: RETURNN's masks come from sequence lengths).
    """
    op = "fast_baum_welch"
    _validate.check_bool(op, validate=validate)
    _validate.check_float(am_scores, "am_scores", op)
    if am_scores.dim() != 3:
        raise InputError(f"{op}: am_scores: expected (T, B, D), got {tuple(am_scores.shape)}")
    am_scores = _rows(am_scores)
    T, B, D = am_scores.shape
    _validate.check_tensor(mask, "mask", op)
    _validate.check_shape(mask, (T, B), "mask", op)
    use_triton = resolve_backend(backend, am_scores, op)
    dev = am_scores.device
    edges, weights, se, n = _check_fsa(edges, weights, start_end_states, B, D, op, num_states, validate, dev)
    lens = _validate.to_device(mask, dev, name="mask", op=op).bool().sum(0)
    with torch.no_grad():  # detached, as RETURNN's
        return _fast_bw(am_scores, lens, edges, weights, se, n, use_triton)


def fast_viterbi(am_scores: Tensor, am_seq_len, edges: Tensor, weights: Tensor, start_end_states: Tensor,
                 mask_idx: int = 0, *, num_states: Optional[int] = None, validate: bool = False,
                 backend: str = "auto"):
    """RETURNN's ``fast_viterbi``: ``(alignment (T, B) emission ids, score (B,))``.

    ``am_scores`` are in +log space and ``weights`` are the same -log edge costs as in
    :func:`fast_baum_welch` (infinite or NaN: a dead edge, skipped), as RETURNN's ``FastViterbiOp``: a path
    scores ``sum_t am[t, emission] - sum weights``. Padded frames and sequences without a path get
    ``mask_idx`` (an int); their score is -inf. Ties: the lowest edge index.
    """
    op = "fast_viterbi"
    _validate.check_bool(op, validate=validate)
    mask_idx = _validate.as_int(mask_idx, "mask_idx", op, what="an int (the alignment's padding id)")
    _validate.check_float(am_scores, "am_scores", op)
    if am_scores.dim() != 3:
        raise InputError(f"{op}: am_scores: expected (T, B, D), got {tuple(am_scores.shape)}")
    am_scores = _rows(am_scores)
    T, B, D = am_scores.shape
    use_triton = resolve_backend(backend, am_scores, op)
    il = _validate.as_lengths(am_seq_len, "am_seq_len", op, B, am_scores.device, max_value=T).clamp(0, T)
    dev = am_scores.device
    edges, weights, se, n = _check_fsa(edges, weights, start_end_states, B, D, op, num_states, validate, dev)
    with torch.no_grad():
        return _fast_viterbi(am_scores, il, edges, weights, se, n, mask_idx, use_triton)


# ------------------------------------------------------------------------------------------------
# builders: a per-configuration edge template (built on device from arange, cached), masked per call by
# the targets and lengths (invalid slots become dead +inf edges): a fixed number of torch ops whatever B
# and S, no host sync
# ------------------------------------------------------------------------------------------------
def _capturing(device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached(build):
    """``build(*key, device)`` cached per key and device; rebuilt while torch.compile traces and while a CUDA
    graph is captured (the tensors built then live in the graph's memory pool and are only written when the
    graph replays: cached, they would hand later eager calls unwritten memory); under a fake mode
    (``FakeTensorMode``, ``make_fx``) or with a symbolic size in the key, built and not cached."""
    cached = functools.lru_cache(maxsize=32)(build)

    def get(*key):
        if (torch.compiler.is_compiling() or _validate.fake_mode_active() or _capturing(torch.device(key[-1]))
                or any(isinstance(k, torch.SymInt) for k in key)):
            return build(*key)
        return cached(*key)
    get.cache_info = cached.cache_info
    return get


def _instantiate(ft, w, se_local, P, em, ok, fin):
    """The batch's automaton from a template of R edge slots per sequence: ``ft (2, 2R)`` local from / to
    states (the R edges, then their copies into the final state), ``w (2R,)`` their costs, ``se_local
    (2, 1)`` local start / final states, P states per sequence; per call ``em (B, R)`` emissions, ``ok (B, R)``
    the live edges and ``fin (B, R)`` the live copies."""
    B, R = em.shape
    dev = em.device
    ok2 = torch.stack([ok, fin], 1)  # (B, 2, R)
    b = torch.arange(B, device=dev)
    edges = torch.empty(4, B, 2 * R, dtype=torch.int64, device=dev)
    torch.add(ft[:, None, :], b[None, :, None], alpha=P, out=edges[:2])
    torch.mul(em[:, None, :], ok2, out=edges[2].view(B, 2, R))  # dead edges emit 0: always a valid index
    edges[3] = b[:, None]
    weights = torch.where(ok2.view(B, 2 * R), w, math.inf).reshape(-1)
    return Fsa(edges.view(4, -1), weights, torch.add(se_local, b[None, :], alpha=P), B * P)


def _template(parts, final, device):
    """(ft (2, 2R), w (2R,) fp32, se_local (2, 1)) from parts ``(from, to, cost)`` (each (k,) int64 but the
    cost, a float) and the final state's local id."""
    fr = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64, device=device)
    to = torch.cat([p[1] for p in parts]) if parts else fr
    w = torch.cat([torch.full(p[0].shape, float(p[2]), device=device) for p in parts]) if parts else \
        torch.zeros(0, device=device)
    ft = torch.stack([torch.cat([fr, fr]), torch.cat([to, torch.full_like(to, final)])])
    return ft, torch.cat([w, w]), torch.arange(2, device=device)[:, None] * final


@_cached
def _ctc_template(S, label_loop, device):
    """The CTC automaton's edge slots for S labels: ``(ft, w, se_local)`` (see :func:`_instantiate`) and per
    slot ``dest`` (the ext state entered), ``odd`` (it is a label's), ``lab`` (the label position it reads), ``prev``
    (the previous label's position, for skips), ``static`` (valid whatever the targets), ``skip`` (a
    label-to-label skip). Slots: initial -> ext 0 / ext 1, the self-loops, the forward edges, the skips, in
    RETURNN's order (by source state, then loop, forward, skip): an edge into a state comes after those from
    lower states, as in RETURNN's CTC automaton, so Viterbi ties (the lowest edge wins) go the same way;
    ext state s is local state 1 + s, the final state 2S + 2."""
    L = 2 * S + 1
    r = torch.arange(2 + L + (L - 1) + max(L - 2, 0), device=device)
    part = (r >= 2).long() + (r >= 2 + L).long() + (r >= 1 + 2 * L).long()  # 0 init, 1 loop, 2 forward, 3 skip
    start = torch.where(part == 0, 0, torch.where(part == 1, 2, torch.where(part == 2, 2 + L, 1 + 2 * L)))
    src = torch.where(part == 0, -1, r - start)  # ext index of the source (-1: the initial state)
    dest = src + torch.where(part == 0, r + 1, part - 1)  # step: 0 loop, 1 forward, 2 skip
    order = torch.argsort(3 * src + (dest - src))  # by source, then step (unique keys)
    src, dest, part = src[order], dest[order], part[order]
    odd = (dest % 2) == 1
    static = torch.where(part == 1, odd.logical_not() | label_loop, torch.where(part == 3, odd, True))
    lab = ((dest - 1) // 2).clamp(0, max(S - 1, 0))
    tmpl = _template([(src + 1, dest + 1, 0.0)], L + 1, device)
    return tmpl, dest, odd, lab, (lab - 1).clamp(min=0), static, (part == 3) & odd


def ctc_fsa(targets: Tensor, target_lengths, blank: int, label_loop: bool = True, *, backend: str = "auto") -> Fsa:
    """The CTC topology as an automaton (its full-sum equals :func:`tri_losses.ctc_loss`, except for an
    empty target over zero frames: CTC's one empty path, here no path, as the final state is entered only
    by an edge that takes a frame; :func:`fsa_loss` gives 0 for it either way, :func:`fast_viterbi` -inf).

    Per sequence: an initial state, the 2S+1 CTC states (blank, l1, blank, ..., lS, blank) and a final
    state entered by copies of the edges that reach the last label or the last blank. ``label_loop=False``:
    labels have no self-loop and repeated labels need no blank (RNA topology). Padded ``targets (B, S)``.
    Every sequence gets the same edge slots (those beyond its length are dead, +inf); a fixed number of
    torch ops whatever B and S (the per-S edge template is cached). ``backend``: as every public function
    takes it; the builder is plain torch ops on every backend (``"triton"`` raises).
    """
    op = "ctc_fsa"
    _validate.check_bool(op, label_loop=label_loop)
    _validate.check_int(targets, "targets", op)
    resolve_backend(backend, targets, op, has_triton=False)  # plain torch on every backend ("triton" raises)
    if targets.dim() != 2:
        raise InputError(f"{op}: targets: expected padded (B, S), got {tuple(targets.shape)}")
    blank = _validate.as_int(blank, "blank", op, low=0, what="a non-negative int")
    B, S = targets.shape
    dev = targets.device
    tl_ = _validate.as_lengths(target_lengths, "target_lengths", op, B, dev, max_value=S)
    if S and _validate.host_readable(targets):  # (never for fake tensors: make_fx, FakeTensorMode)
        _validate.check_labels(targets, tl_, op, blank=blank)  # (ids only >= 0: the emission count is not known here)
    (ft, w, se_local), dest, odd, lab, prev, static, skip = _ctc_template(S, bool(label_loop), dev)
    R = dest.shape[0]
    # r <= 0: the destination is within the sequence's 2 tl + 1 states; r in {-1, 0}: the last label or blank
    r = torch.sub(dest, tl_[:, None], alpha=2)
    ok = (r <= 0) & static
    if S:
        tg = targets.long()
        em = torch.where(odd, tg.gather(1, lab.expand(B, R)), blank)
        if label_loop:  # a skip between two labels only when they differ
            ok &= ~skip | (em != tg.gather(1, prev.expand(B, R)))
    else:
        em = torch.full((B, R), blank, dtype=torch.int64, device=dev)
    return _instantiate(ft, w, se_local, 2 * S + 3, em, ok, ok & (r >= -1))


MAX_STATES_PER_LABEL = 1024  # hmm_fsa's bound (an HMM has a few states per label; its template loops over them)


def hmm_fsa(targets: Tensor, target_lengths, *, states_per_label: int = 1, loop_cost: float = 0.0,
            forward_cost: float = 0.0, skip_cost: Optional[float] = None, silence: Optional[int] = None,
            backend: str = "auto") -> Fsa:
    """Left-to-right HMM automaton for hybrid full-sum training, costs in -log space.

    Label i of a sequence has ``states_per_label`` states (default 1: each label one state, emitting its id;
    at most ``MAX_STATES_PER_LABEL`` = 1024)
    emitting ``targets[i] * states_per_label + k``
    (k = 0..K-1), each with a self-loop (``loop_cost``) and a forward edge (``forward_cost``); with
    ``skip_cost``, state k may jump to k+2. A cost of +inf leaves its edges out; -inf or NaN raises
    ``ValueError``. With ``silence`` (an emission id), an optional silence state
    (self-loop) sits before, between and after the labels. A final state is entered by copies of the
    edges that reach the last label's last state (or the trailing silence). ``backend``: as every public
    function takes it; the builder is plain torch ops on every backend (``"triton"`` raises).
    """
    op = "hmm_fsa"
    _validate.check_int(targets, "targets", op)
    resolve_backend(backend, targets, op, has_triton=False)  # plain torch on every backend ("triton" raises)
    if targets.dim() != 2:
        raise InputError(f"{op}: targets: expected padded (B, S), got {tuple(targets.shape)}")
    if silence is not None:
        silence = _validate.as_int(silence, "silence", op, low=0, what="None or a non-negative emission id")
    for name, c in (("loop_cost", loop_cost), ("forward_cost", forward_cost), ("skip_cost", skip_cost)):
        _validate.check_number(c, name, op, allow_none=name == "skip_cost")
        if c is not None and float(c) == -math.inf:  # (a dead edge too, as every infinite cost: not what it says)
            raise InputError(f"{op}: {name}: expected a finite cost or +inf (no such edge), got -inf")
    states_per_label = _validate.as_int(states_per_label, "states_per_label", op, low=1, high=MAX_STATES_PER_LABEL,
                                        what="a positive int")
    B, S = targets.shape
    dev = targets.device
    K = states_per_label
    tl_ = _validate.as_lengths(target_lengths, "target_lengths", op, B, dev, max_value=S)
    if S and _validate.host_readable(targets):  # (never for fake tensors: make_fx, FakeTensorMode)
        _validate.check_labels(targets, tl_, op)
    costs = tuple(None if c is None else float(c) for c in (loop_cost, forward_cost, skip_cost))
    (ft, w, se_local), lab, k, need, last_to = _hmm_template(S, K, costs, silence is not None, dev)
    R = lab.shape[0]
    ok = need < tl_[:, None]
    if S:
        em = targets.long().gather(1, lab.clamp(min=0).expand(B, R)) * K + k
        if silence is not None:
            em = torch.where(lab >= 0, em, silence)
    else:
        em = torch.full((B, R), 0 if silence is None else silence, dtype=torch.int64, device=dev)
    # into the final state: edges reaching the last label's last state (local tl * K) or the silence state
    # after it (local 1 + S K + tl)
    fin = (last_to == tl_[:, None] * K) & (tl_ > 0)[:, None]
    if silence is not None:
        fin |= last_to == (tl_[:, None] + (1 + S * K))
    return _instantiate(ft, w, se_local, S * K + (S + 1 if silence is not None else 0) + 2, em, ok, ok & fin)


@_cached
def _hmm_template(S, K, costs, with_silence, device):
    """The HMM automaton's edge slots: ``(ft, w, se_local)`` (see :func:`_instantiate`) and per slot ``lab``
    (the label position whose emission it reads, -1: silence), ``k`` (the state within the label), ``need``
    (live iff need < the target length) and ``to`` (the local state entered). Local ids: 0 initial,
    1 + i K + k label states, 1 + S K + j silence states (j = 0..S), the final state last."""
    loop_cost, forward_cost, skip_cost = costs
    n_lab = S * K
    final = 1 + n_lab + (S + 1 if with_silence else 0)
    i = torch.arange(S, device=device)
    one = torch.zeros(1, dtype=torch.int64, device=device)
    parts = []  # (from, to, cost, label read (-1: silence), k, need)

    def lab_state(ii, kk):
        return 1 + ii * K + kk

    if S:
        parts.append((one, one + lab_state(0, 0), forward_cost, one, 0, one))
    for kk in range(K):
        parts.append((lab_state(i, kk), lab_state(i, kk), loop_cost, i, kk, i))
        if kk + 1 < K:
            parts.append((lab_state(i, kk), lab_state(i, kk + 1), forward_cost, i, kk + 1, i))
        if skip_cost is not None and kk + 2 < K:
            parts.append((lab_state(i, kk), lab_state(i, kk + 2), skip_cost, i, kk + 2, i))
    if S > 1:
        parts.append((lab_state(i[:-1], K - 1), lab_state(i[1:], 0), forward_cost, i[1:], 0, i[1:]))
    if with_silence:
        j = torch.arange(S + 1, device=device)
        sil = 1 + n_lab + j
        parts.append((one, one + sil[0], forward_cost, one - 1, 0, one - 1))
        parts.append((sil, sil, loop_cost, j * 0 - 1, 0, j - 1))  # silence j is live iff j <= tl
        if S:
            parts.append((sil[:-1], lab_state(i, 0), forward_cost, i, 0, i))
            parts.append((lab_state(i, K - 1), sil[1:], forward_cost, i * 0 - 1, 0, i))
    tmpl = _template([p[:3] for p in parts], final, device)
    cat = (lambda xs: torch.cat(xs)) if parts else (lambda xs: one[:0])
    return tmpl, cat([p[3] for p in parts]), cat([p[0] * 0 + p[4] for p in parts]), cat([p[5] for p in parts]), \
        cat([p[1] for p in parts])
