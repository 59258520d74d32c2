"""Sequence metrics: ``edit_distance``, ``error_rate``, ``bleu`` and ``ctc_beam_search_decode``.

Edit distance and the BLEU n-gram statistics have Triton kernels (``tri_losses/kernels/text.py``, ops
``tri_losses::edit_distance`` and ``tri_losses::bleu_stats``); BLEU's final formula runs in torch
float64. ``ctc_beam_search_decode`` is TensorFlow's sequential beam search, run on the host in
float64 on both backends (TF's op is CPU-only too), or with ``method="batched"`` the textbook prefix beam
search in plain torch, batched over sequences and beams on the logits' device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _validate
from ._validate import InputError
from ._backend import custom_op, device_guard, kernels, resolve_backend
from ._torch import text as _tt

__all__ = ["edit_distance", "error_rate", "bleu", "ctc_beam_search_decode"]


@custom_op("tri_losses::edit_distance", mutates_args=())
def _edit_distance_op(hyp: Tensor, hyp_len: Tensor, ref: Tensor, ref_len: Tensor, use_triton: bool) -> Tensor:
    if use_triton:
        with device_guard(hyp):
            return kernels("text").edit_distance(hyp.long().contiguous(), hyp_len, ref.long().contiguous(), ref_len)
    return _tt.edit_distance(hyp, hyp_len, ref, ref_len)


@_edit_distance_op.register_fake
def _(hyp, hyp_len, ref, ref_len, use_triton):
    return hyp.new_empty(hyp.shape[0], dtype=torch.int32)


@custom_op("tri_losses::bleu_stats", mutates_args=())
def _bleu_stats_op(hyp: Tensor, hyp_len: Tensor, ref: Tensor, ref_len: Tensor, max_order: int,
                   use_triton: bool) -> Tensor:
    if use_triton:
        with device_guard(hyp):
            return kernels("text").bleu_stats(hyp.long().contiguous(), hyp_len, ref.long().contiguous(), ref_len, max_order)
    return _tt.bleu_stats(hyp, hyp_len, ref, ref_len, max_order)


@_bleu_stats_op.register_fake
def _(hyp, hyp_len, ref, ref_len, max_order, use_triton):
    return hyp.new_empty(hyp.shape[0], 2 * max_order + 2, dtype=torch.int32)


def _seqs(hyp, hyp_lengths, ref, ref_lengths, op):
    _validate.check_int(hyp, "hyp", op)
    _validate.check_int(ref, "ref", op)
    if hyp.dim() != 2 or ref.dim() != 2 or hyp.shape[0] != ref.shape[0]:
        raise InputError(f"{op}: ref: expected padded (B, H) hyp and (B, R) ref with the same B, got "
                         f"{tuple(hyp.shape)} and {tuple(ref.shape)}")
    if hyp.device.type == "meta" and ref.device.type != "meta":  # (ref on meta next to real hyp: to_device raises)
        raise InputError(f"{op}: hyp: expected a tensor with data (ref is on {ref.device}), got a meta tensor")
    B = hyp.shape[0]
    hl = _validate.as_lengths(hyp_lengths, "hyp_lengths", op, B, hyp.device, max_value=hyp.shape[1])
    rl = _validate.as_lengths(ref_lengths, "ref_lengths", op, B, hyp.device, max_value=ref.shape[1])
    # unchecked (CUDA) lengths can never index out of bounds (no-ops for valid input)
    hl, rl = hl.clamp(0, hyp.shape[1]), rl.clamp(0, ref.shape[1])
    return hyp.to(torch.int64), hl, _validate.to_device(ref, hyp.device, torch.int64, "ref", op), rl


def _label_table(label_map, device, op):
    """The map as an int64 lookup table: >= 0 the new id, -1 removed, -2 not in the map."""
    if isinstance(label_map, dict):
        if not label_map:
            raise InputError(f"{op}: label_map: expected a non-empty mapping, got {{}}")
        label_map = {
            _validate.as_int(k, "label_map", op, low=0, what="non-negative int keys"):
            None if v is None else _validate.as_int(v, f"label_map[{k!r}]", op, low=0,
                                                    what="a non-negative int or None")
            for k, v in label_map.items()}
        table = torch.full((max(label_map) + 1,), -2, dtype=torch.int64)
        for k, v in label_map.items():
            table[k] = -1 if v is None else v
        return table.to(device)
    _validate.check_int(label_map, "label_map", op)
    if label_map.dim() != 1 or label_map.numel() == 0:
        raise InputError(f"{op}: label_map: expected a non-empty 1-D tensor, got shape {tuple(label_map.shape)}")
    if _validate.host_readable(label_map) and bool((label_map < -1).any()):
        raise InputError(f"{op}: label_map: expected entries >= -1 (-1 = remove), got {int(label_map.min())}")
    return _validate.to_device(label_map, device, torch.int64, "label_map", op).clamp(min=-1)


def _apply_label_map(seq, lengths, table, op, name):
    """Map ids through ``table`` and close up removed labels, on device.

    Returns ``(mapped, new_lengths, bad)``; ``bad (B,)`` marks sequences with an id outside the map
    (raised for CPU input; on CUDA, where checking would need a host sync, their distance is -1)."""
    pos = torch.arange(seq.shape[1], device=seq.device)
    valid = pos[None, :] < lengths[:, None]
    inside = (seq >= 0) & (seq < table.numel())
    mapped = table[seq.clamp(0, table.numel() - 1)]
    bad = (valid & (~inside | (mapped == -2))).any(1)
    if _validate.host_readable(seq) and bool(bad.any()):
        off = seq[valid & (~inside | (mapped == -2))]
        raise InputError(f"{op}: label_map: {name} has ids outside the map, e.g. {int(off[0])}")
    keep = valid & (mapped >= 0)
    idx = torch.cumsum(keep.long(), 1) - 1
    out = torch.zeros_like(seq)
    out.scatter_(1, torch.where(keep, idx, seq.shape[1] - 1), torch.where(keep, mapped, 0))
    new_len = keep.sum(1)
    out = torch.where(pos[None, :] < new_len[:, None], out, 0)
    return out, new_len, bad


def edit_distance(hyp: Tensor, hyp_lengths, ref: Tensor, ref_lengths, *, label_map=None, normalize: bool = False,
                  backend: str = "auto") -> Tensor:
    """Levenshtein distance (unit costs) of ``hyp[b, :hyp_len]`` and ``ref[b, :ref_len]``: ``(B,)`` int32.

    As ``tf.edit_distance(normalize=False)`` / RETURNN ``rf.edit_distance``. ``normalize=True``: float32
    ``d / |ref|`` (empty ref: 0 if d = 0 else +inf, as TF). ``label_map`` ({id: id or None} or an int
    tensor with -1 = None) maps both sides first; None removes the label. An id outside the map raises
    for CPU input; on CUDA (no host sync) that pair's distance is -1 (NaN when normalised).
    """
    op = "edit_distance"
    _validate.check_bool(op, normalize=normalize)
    h, hl, r, rl = _seqs(hyp, hyp_lengths, ref, ref_lengths, op)
    bad = None
    if label_map is not None:
        table = _label_table(label_map, h.device, op)
        h, hl, bad_h = _apply_label_map(h, hl, table, op, "hyp")
        r, rl, bad_r = _apply_label_map(r, rl, table, op, "ref")
        bad = bad_h | bad_r
    use_triton = resolve_backend(backend, torch.empty(0, device=h.device), op)
    d = _edit_distance_op(h, hl, r, rl, use_triton)
    if bad is not None:
        d = torch.where(bad, -1, d)
    if not normalize:
        return d
    df = d.to(torch.float32)
    rf = rl.to(torch.float32)
    out = torch.where(rl > 0, df / rf.clamp(min=1), torch.where(d == 0, 0.0, math.inf))
    return out if bad is None else torch.where(bad, math.nan, out)


def error_rate(hyp: Tensor, hyp_lengths, ref: Tensor, ref_lengths, *, label_map=None, backend: str = "auto") -> Tensor:
    """Corpus error rate ``sum_b d_b / sum_b |ref_b|`` (RETURNN's WER/LER), ``d`` from :func:`edit_distance`.

    Args:
        hyp, hyp_lengths, ref, ref_lengths, label_map, backend: as in :func:`edit_distance` (padded
            ``(B, L)`` integer id tensors and ``(B,)`` lengths).

    Returns:
        A 0-dim fp32 tensor. ``|ref_b|`` are the given reference lengths (before ``label_map``); an
        reference total of 0 gives ``inf`` (NaN when every distance is 0 too), an unmapped id on CUDA
        (unchecked) NaN.

    Raises:
        ValueError, TypeError: as :func:`edit_distance`.
    """
    op = "error_rate"
    _, _, _, rl = _seqs(hyp, hyp_lengths, ref, ref_lengths, op)
    d = edit_distance(hyp, hyp_lengths, ref, ref_lengths, label_map=label_map, backend=backend)
    rate = d.sum().to(torch.float32) / rl.sum().to(torch.float32)
    return torch.where((d < 0).any(), math.nan, rate)  # an unmapped id (CUDA, unchecked): NaN


def _bleu_returnn(st, N, use_bp):
    match, poss = st[:, :N], st[:, N:2 * N]
    hl, rl = st[:, 2 * N], st[:, 2 * N + 1]
    B = st.shape[0]
    logsum = torch.zeros(B, dtype=torch.float64, device=st.device)
    any_pos = torch.zeros(B, dtype=torch.bool, device=st.device)
    smooth = torch.ones(B, dtype=torch.float64, device=st.device)
    for n in range(N):
        m, p = match[:, n], poss[:, n]
        zero_match = (m == 0) & (p > 0)
        smooth = torch.where(zero_match, smooth * 2, smooth)
        pn = torch.where(m > 0, m / p.clamp(min=1), torch.where(zero_match, 1.0 / (smooth * p.clamp(min=1)), 0.0))
        logsum = logsum + torch.where(pn > 0, torch.log(torch.where(pn > 0, pn, 1.0)), 0.0)
        any_pos |= pn > 0
    geo = torch.where(any_pos, torch.exp(logsum / N), 0.0)
    r = torch.where(rl > 0, hl / rl.clamp(min=1), math.inf)
    bp = torch.where(r < 1e-30, 0.0, torch.where(r < 1, torch.exp(1 - 1 / torch.where(r > 0, r, 1.0)), 1.0))
    return geo * (bp if use_bp else 1.0)


def _bleu_sacre(st, N, smooth_method, smooth_value, effective_order):
    match, poss = st[:, :N].clone(), st[:, N:2 * N].clone()
    hl, rl = st[:, 2 * N], st[:, 2 * N + 1]
    B = st.shape[0]
    bp = torch.where(hl == 0, 0.0, torch.where(hl < rl, torch.exp(1 - rl / hl.clamp(min=1)), 1.0))
    no_match = match.sum(1) == 0
    smooth = torch.ones(B, dtype=torch.float64, device=st.device)
    logs = torch.zeros(B, dtype=torch.float64, device=st.device)
    eff = torch.full((B,), N, dtype=torch.float64, device=st.device) if not effective_order else \
        torch.zeros(B, dtype=torch.float64, device=st.device)
    stopped = torch.zeros(B, dtype=torch.bool, device=st.device)
    for n in range(N):
        m, p = match[:, n], poss[:, n]
        if smooth_method == "add-k" and n > 0:
            m = m + smooth_value
            p = p + smooth_value
        stopped |= p == 0
        if effective_order:
            eff = torch.where(stopped, eff, float(n + 1))
        zero = m == 0
        if smooth_method == "exp":
            smooth = torch.where(zero & ~stopped, smooth * 2, smooth)
            pz = 100.0 / (smooth * p.clamp(min=1e-300))
        elif smooth_method == "floor":
            pz = 100.0 * smooth_value / p.clamp(min=1e-300)
        else:
            pz = torch.zeros_like(smooth)
        pn = torch.where(zero, pz, 100.0 * m / p.clamp(min=1e-300))
        pn = torch.where(stopped, 0.0, pn)
        logp = torch.where(pn > 0, torch.log(torch.where(pn > 0, pn, 1.0)), -9999999999.0)
        counted = ~stopped if effective_order else torch.ones_like(stopped)
        logs = logs + torch.where(counted, logp, 0.0)
    score = bp * torch.exp(logs / eff.clamp(min=1))
    return torch.where(no_match | (eff == 0), 0.0, score)


def bleu(hyp: Tensor, hyp_lengths, ref: Tensor, ref_lengths, *, mode: str = "returnn", max_order: int = 4,
         aggregate: str = "sentence", smooth_method: str = "exp", smooth_value: Optional[float] = None,
         effective_order: Optional[bool] = None, use_bp: bool = True, backend: str = "auto") -> Tensor:
    """BLEU of id sequences against one reference each: ``(B,)`` (sentence) or ``()`` (corpus), float32.

    ``mode="returnn"``: RETURNN's ``compute_bleu`` in [0, 1] (its smoothing and quirks);
    ``mode="sacrebleu"``: sacrebleu with ``tokenize="none"`` on the ids, in [0, 100], smoothing
    ``"exp" | "floor" | "add-k" | "none"``, ``effective_order`` (default: True for sentences, False
    for a corpus). ``aggregate="corpus"`` sums the statistics and lengths first.

    Args:
        hyp, ref: padded ``(B, L)`` integer ids; ``hyp_lengths``, ``ref_lengths``: ``(B,)`` lengths.
        max_order: the longest n-gram counted (RETURNN's ``max_order``, sacrebleu's ``max_ngram_order``), 4.
        smooth_method, smooth_value: sacrebleu's smoothing and its value (default 0.1 for ``"floor"``,
            1 for ``"add-k"``, unused by ``"exp"`` and ``"none"``); sacrebleu mode only.
        effective_order: sacrebleu mode only, as above.
        use_bp: multiply by the brevity penalty (RETURNN's ``use_bp``); RETURNN mode only (sacrebleu has
            no such switch: ``use_bp=False`` with ``mode="sacrebleu"`` raises ``ValueError``).
        The sacrebleu-only options given with ``mode="returnn"`` raise ``ValueError``, as they would have no
        effect.
    """
    op = "bleu"
    _validate.check_bool(op, use_bp=use_bp)
    if effective_order is not None:
        _validate.check_bool(op, effective_order=effective_order)
    _validate.check_option(mode, "mode", op, ("returnn", "sacrebleu"))
    _validate.check_option(aggregate, "aggregate", op, ("sentence", "corpus"))
    _validate.check_option(smooth_method, "smooth_method", op, ("exp", "floor", "add-k", "none"))
    if mode == "sacrebleu" and not use_bp:
        raise InputError(f"{op}: use_bp: expected True with mode='sacrebleu' (it always applies the brevity "
                         f"penalty; use_bp=False is for mode='returnn'), got False")
    if mode == "returnn":
        for name, value, default in (("smooth_method", smooth_method, "exp"), ("smooth_value", smooth_value, None),
                                     ("effective_order", effective_order, None)):
            if value != default:
                raise InputError(f"{op}: {name}: a sacrebleu option (mode='sacrebleu'), expected {default!r} "
                                 f"with mode='returnn', got {value!r}")
    max_order = _validate.as_int(max_order, "max_order", op, low=1, what="a positive int")
    _validate.check_number(smooth_value, "smooth_value", op, low=0.0, allow_none=True)
    if smooth_value is not None and not math.isfinite(smooth_value):
        raise InputError(f"{op}: smooth_value: expected a finite number >= 0, got {smooth_value}")
    h, hl, r, rl = _seqs(hyp, hyp_lengths, ref, ref_lengths, op)
    use_triton = resolve_backend(backend, torch.empty(0, device=h.device), op)
    st = _bleu_stats_op(h, hl, r, rl, max_order, use_triton).to(torch.float64)
    if aggregate == "corpus":
        st = st.sum(0, keepdim=True)
    if mode == "returnn":
        out = _bleu_returnn(st, max_order, use_bp)
    else:
        eo = (aggregate == "sentence") if effective_order is None else effective_order
        sv = smooth_value if smooth_value is not None else {"floor": 0.1, "add-k": 1.0}.get(smooth_method, 0.0)
        out = _bleu_sacre(st, max_order, smooth_method, float(sv), eo)
    out = out.to(torch.float32)
    return out[0] if aggregate == "corpus" else out


def ctc_beam_search_decode(logits: Tensor, input_lengths, *, beam_width: int = 100, blank: int = -1,
                           return_scores: bool = False, method: str = "tf", backend: str = "auto"):
    """CTC prefix beam search top-1, as TensorFlow's ``CTCBeamSearchDecoder`` (labels not merged, as TF2).

    ``logits (B, T, C)`` (batch-major); each frame is normalised (log-softmax, as TF), so logits,
    log-probs and ``safe_log(p)`` decode alike. Returns ``(labels (B, T) padded with 0, lengths (B,))``,
    plus the top prefix's log-probability ``(B,)`` float64 (TF's ``log_probabilities``) with
    ``return_scores``. Outputs are on the logits' device.

    TF's algorithm, step for step (its pruning order included): per frame, the beam, best first, is
    carried over; then each beam whose previous probability beats the beam's current bottom is extended
    by every non-blank class in class order, a new prefix entering if it beats the bottom (which is
    dropped). A beam dropped that way and re-created as a child that misses the beam is not extended in
    that frame, so at small widths the result is sometimes not the most probable prefix the textbook
    prefix beam search would keep (a few percent of random inputs at width 2 or 3); this decoder
    returns what TF returns. With -inf log-probabilities TF's beam can hold one prefix twice and which
    entry it drops depends on the order inside its container; that container (TF's ``TopN`` with the
    C++ library's heap and sort steps) is reproduced too, so such inputs also decode as in TF.
    ``blank`` may be any class (TF's is the last); classes are visited in increasing order, skipping it.

    Runs on the host in float64 (one copy of the logits to the CPU per call, like TF's CPU-only op: a
    reporting path, one of the host synchronisations the conventions list), a Python loop over sequences and
    frames that visits only the classes able to enter the beam (every class when an input is NaN).
    ``backend="triton"`` raises (no kernel). Scores are summed in float64. TF's op sums in the input's dtype
    with a log-add-exp whose correction term is float32 at every dtype (``log1pf(expf(d))``), so its scores
    differ from these by float32 roundings (float64 input included), and two prefixes that close (exact ties
    from integer or all-equal logits among them) can be ranked differently: a different prefix, or a different
    beam afterwards. Exact ties are not always broken as TF breaks them, in float64 too (TF's own first
    result on them can change with its ``top_paths``); inputs without such near-ties decode as in TF.

    ``method="batched"``: the textbook CTC prefix beam search instead, in plain torch on the logits' device
    (no host read, no Python loop over sequences; one step of tensor ops per frame, batched over sequences
    and beams, so a GPU decodes a whole batch in about the time of one sequence). Per frame every beam is
    carried over and extended by every non-blank class, an extension equal to a prefix in the beam adds to
    it, and the ``beam_width`` most probable prefixes stay (only the frame's ``beam_width + 1`` best classes
    are tried as extensions: no other can be kept, so the result is the same, with work and memory
    independent of C). It returns what ``"tf"`` returns except where TF's pruning order drops a prefix
    this keeps (small widths, above; the final score can then be lower or higher than TF's: a prefix TF
    keeps may feed the eventual winner) and on exact ties, which go as the textbook's stable sort orders
    them (beams best first, each beam's own prefix before its extensions by class; deterministic, though
    the log-add-exp's last-bit rounding decides what is tied: it can differ between a CPU's vectorised and
    scalar float64 math, so between batches, and between devices). Prefixes of probability 0 are dropped (a sequence none
    survives decodes as empty with score -inf); a NaN in a sequence's frames makes its score NaN. Memory
    O(B * (K * (K + T) + C)) per call, K = ``beam_width`` or, if fewer, the number of label sequences of
    length <= T (a width meant as "unlimited" costs what the shapes need). The RETURNN registry's decoder
    keeps ``"tf"``.
    """
    op = "ctc_beam_search_decode"
    _validate.check_bool(op, return_scores=return_scores)
    _validate.check_float(logits, "logits", op)
    resolve_backend(backend, logits, op, has_triton=False)
    if logits.dim() != 3:
        raise InputError(f"{op}: logits: expected (B, T, C), got {tuple(logits.shape)}")
    B, T, C = logits.shape
    blank = _validate.class_index(blank, "blank", op, C)
    beam_width = _validate.as_int(beam_width, "beam_width", op, low=1, what="a positive int")
    _validate.check_option(method, "method", op, ("tf", "batched"))
    il = _validate.as_lengths(input_lengths, "input_lengths", op, B, logits.device, max_value=T).clamp(0, T)
    with torch.no_grad():
        x = logits.detach().to(torch.float64)
        x = x.log_softmax(-1)  # TF's per-frame normalisation: scores are log-probabilities
        decode = _tt.ctc_beam_search if method == "tf" else _tt.ctc_prefix_beam_search_batched
        labels, lengths, scores = decode(x, il, beam_width, blank)
    return (labels, lengths, scores) if return_scores else (labels, lengths)
