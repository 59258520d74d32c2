"""Triton kernels for forward-backward and Viterbi over general automata (semantics:
``tri_losses/_torch/automata.py``).

Tables (``prepare``: on device, O(E log E), no host sync, a fixed number of launches whatever the batch
and automaton sizes (about 30 torch ops: two sorts, three searchsorted, one concatenation into the int32
buffer; then ``_fsa_tables_kernel``); built once per forward and handed to the backward as two flat
buffers, ``itab`` int32 and ``ftab`` fp32, sized from shapes only). States are renumbered so each
sequence's states form one range ``[lo_b, hi_b)``; dead edges (+inf weight; the op maps -inf and NaN to
+inf) are left out of every table. Two paths, chosen per sequence on device (``fit``):

* register path, sequences whose table columns fit in ``BLOCK_S`` (``BLOCK_S`` = the next power of two
  (>= 16) of num_states / B, at most ``REG_MAX_STATES`` = 1024), every state with at most 2 * ``REG_K`` = 8
  live incoming and 8 outgoing edges, and at most ``BLOCK_S`` distinct emissions (``ctc_fsa`` / ``hmm_fsa``
  automata fit when BLOCK_S does: the final state's up to 5 incoming edges take one overflow column). Padded
  per-sequence tables ``(REG_K, BLOCK_S)``: column c holds up to REG_K incoming edges of a state (source,
  emission slot, weight; a dead slot has weight +inf); a state with more has one overflow column, numbered
  after the sequence's states, merged into it after the per-column log-sum-exp (``in_map``); the same by
  source for outgoing edges. Emission slots number the sequence's distinct emission ids.
* general path (CSR by destination / source / emission, one edge at a time) for every other sequence.

  _fsa_tables_kernel   grid (B,): the register path's tables of a sequence from the CSR tables: degrees and
                       overflow columns (a cumsum over its states), emission slots (a cumsum over its
                       emission-sorted live edges), the padded in / out tables, the column maps and the
                       slot-sorted positions; plain stores ordered by barriers (no atomics: deterministic).
  _fsa_emit_kernel     grid (T*B,): the parallel pre-pass. Row log-sum-exp of logits (saved for the
                       backward), then each sequence's slot emissions ``emb (T, B, BLOCK_S)`` (log-softmax /
                       -am / am): the recursions never gather from x.
  _fsa_alpha_kernel    grid (B,): alpha, each program on its sequence's path. Register path (``_reg_alpha``):
                       alpha_t in registers (BLOCK_S fp32 per program); per frame gathers (``tl.gather``:
                       shared memory) of alpha_{t-1} by the (REG_K, BLOCK_S) source table, of the frame's
                       slot emissions (loaded one frame ahead) by the slot table and of the overflow
                       columns. General path (``_csr_alpha``): per frame, states in chunks, each state's CSR
                       neighbours one at a time (``_csr_lse``, shared with the backward). Writes alpha_t
                       (T, num_states), carried past the sequence's length, then log Z and the loss (B,).
  _fsa_beta_kernel     grid (B,): t = T-1 .. 0, each program on its sequence's path. Register path
                       (``_reg_beta``): beta_t in registers; edge posteriors in the in-edge layout,
                       normalised per frame (log-sum over the frame's edges), summed per emission slot by a
                       segmented scan in slot-sorted order (fixed order: deterministic, no atomics; no
                       cancellation) into ``gam (T, B, BLOCK_S)``; then beta_{t-1} from the out-edge table.
                       General path (``_csr_post``): beta in a 2-row ping-pong buffer; edge posteriors over
                       the emission-sorted edges (BLOCK_E at a time, segmented scan) written straight into
                       the output rows. fast_baum_welch's obs_scores (T, B) too.
  _fsa_out_kernel      grid (T*B, cdiv(D, BLOCK_D)), launched when a register path exists: the gradient
                       g * (softmax - gamma) / -g * gamma or RETURNN's -log gamma (1e32 where 0) per class
                       (class -> slot map) of the register path's rows, 0 / 1e32 on padded frames.
One launch per direction whatever the mix of paths (no host sync decides which run): a forward is
``_fsa_tables_kernel`` (when a register path exists), ``_fsa_emit_kernel`` (logits or a register path),
``_fsa_alpha_kernel``; a backward ``_fsa_beta_kernel`` and ``_fsa_out_kernel``.
Edge scores: ``lp[t, b, emission] - w`` with lp = -am (fast_baum_welch), am (fast_viterbi), or the
log-softmax of logits. Memory: alpha T*num_states*4, emb and gam T*B*BLOCK_S*4 each, tables O(E + B*D).
"""
import triton
import triton.language as tl

from ._math import interpreting, log_softmax_at, lse_step, round_to_bf16, row_logsumexp

NEG = float("-inf")
REG_MAX_STATES = 1024  # register path: states per sequence (BLOCK_S) at most
REG_K = 4  # register path: table depth; a state with up to 2 * REG_K live in / out edges uses an overflow column


# ------------------------------------------------------------------------------------------------
# pre-pass
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fsa_emit_kernel(x, lse, slot_em, emb, B, D, stride_t, stride_b,
                     SCORE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (T*B,), one frame per program. SCORE 2 (logits): the frame's (max, log sum exp) pair into
    ``lse (T, B, 2)`` (BLOCK_C classes per step). BLOCK_S > 0: the scores of the sequence's emission
    slots (``slot_em (B, BLOCK_S)``, -1: unused -> -inf) into ``emb (T, B, BLOCK_S)``."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // B
    b = pid % B
    row = x + t * stride_t + b * stride_b
    if SCORE == 2:
        m, ls = row_logsumexp(row, D, BLOCK_C)
        tl.store(lse + 2 * pid, m)
        tl.store(lse + 2 * pid + 1, ls)
    if BLOCK_S > 0:
        u = tl.arange(0, BLOCK_S)
        d = tl.load(slot_em + b * BLOCK_S + u)
        v = tl.load(row + d, mask=d >= 0, other=0.0).to(tl.float32)
        if SCORE == 0:
            v = -v
        elif SCORE == 2:
            v = (v - m) - ls
        tl.store(emb + pid * BLOCK_S + u, tl.where(d >= 0, v, float("-inf")))


# ------------------------------------------------------------------------------------------------
# register path
# ------------------------------------------------------------------------------------------------
@triton.jit
def _seq(lo, hi, start, lens, b):
    """Sequence b's state range [s_lo, s_hi) (kernel ids), start state and valid frames."""
    return tl.load(lo + b), tl.load(hi + b), tl.load(start + b), tl.load(lens + b)


@triton.jit
def _tab2(tab, b, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """Load sequence b's (BLOCK_K, BLOCK_S) slice of a padded edge table."""
    k = tl.arange(0, BLOCK_K)[:, None]
    s = tl.arange(0, BLOCK_S)[None, :]
    return tl.load(tab + b * (BLOCK_K * BLOCK_S) + k * BLOCK_S + s)


@triton.jit
def _take(src, idx, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """src[idx] for a (BLOCK_K, BLOCK_S) index table into BLOCK_S register values (one 1-D ``tl.gather``:
    src goes through shared memory once)."""
    return tl.reshape(tl.gather(src, tl.reshape(idx, [BLOCK_K * BLOCK_S]), 0), [BLOCK_K, BLOCK_S])


@triton.jit
def _reg_lse(prev, nb, sc, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, VITERBI: tl.constexpr):
    """For every state s: log-sum-exp (max with VITERBI) over its table slots k of prev[nb[k, s]] + sc[k, s]
    (prev: BLOCK_S values in registers, gathered through shared memory)."""
    v = _take(prev, nb, BLOCK_K, BLOCK_S) + sc
    m = tl.max(v, 0)
    if VITERBI:  # a NaN score (NaN input) makes the state's value NaN (the max reduction would drop it)
        return m + tl.sum(tl.where(v != v, v, 0.0), 0)
    ms = tl.where(m == float("-inf"), 0.0, m)
    return ms + tl.log(tl.sum(tl.exp(v - ms[None, :]), 0))


@triton.jit
def _merge(col, ex, VITERBI: tl.constexpr):
    """Per state s: its column's value col[s] combined (log-sum-exp, or max) with its overflow column's
    (``ex`` = 1 + that column, 0: none)."""
    v2 = tl.where(ex > 0, tl.gather(col, tl.where(ex > 0, ex - 1, 0), 0), float("-inf"))
    m = tl.maximum(col, v2, propagate_nan=tl.PropagateNan.ALL)
    if VITERBI:
        return m
    ms = tl.where(m == float("-inf"), 0.0, m)
    return ms + tl.log(tl.exp(col - ms) + tl.exp(v2 - ms))


@triton.jit
def _reg_alpha(emb, in_code, in_w, in_map, b, s_lo, s_hi, st, Tb, alpha, T, B, S,
               VITERBI: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """The register path's alpha of sequence b, t = 0 .. T-1: per table column c (a state, or the overflow
    column of a state with more than BLOCK_K incoming edges) col_t(c) = lse_k alpha_{t-1}(nb[k, c]) +
    emb[t, b, slot[k, c]] - w[k, c]; alpha_t(s) = col_t(s) merged with its overflow column's (``in_map``).
    Tables are held in registers; the next frame's slot emissions are loaded before this frame's gathers.
    Writes alpha_t of the sequence's states into ``alpha (T, S)`` (kernel state ids), carried over past the
    sequence's length."""
    s = tl.arange(0, BLOCK_S)
    code = _tab2(in_code, b, BLOCK_K, BLOCK_S)
    nb = code & 0xFFFF
    sl = code >> 16
    w = _tab2(in_w, b, BLOCK_K, BLOCK_S)
    ex = tl.load(in_map + b * BLOCK_S + s) >> 16
    a = tl.where(s == st - s_lo, 0.0, float("-inf"))
    # the slot emissions of the next frame are loaded one frame ahead (tensor masks: the interpreter
    # rejects a scalar comparison as a load mask)
    e_next = tl.load(emb + b * BLOCK_S + s, mask=s * 0 < Tb, other=0.0)
    for t32 in range(0, T):
        t = b * 0 + t32
        e = e_next
        e_next = tl.load(emb + ((t + 1) * B + b) * BLOCK_S + s, mask=s * 0 + t + 1 < Tb, other=0.0)
        if t < Tb:
            sc = _take(e, sl, BLOCK_K, BLOCK_S) - w
            a = _merge(_reg_lse(a, nb, sc, BLOCK_K, BLOCK_S, VITERBI), ex, VITERBI)
        tl.store(alpha + t * S + s_lo + s, a, mask=s < s_hi - s_lo)


@triton.jit
def _seg_sum(a, fa, b, fb):
    """Combine of a segmented sum: ``b`` starting a new segment (fb = 1) drops what came before."""
    return tl.where(fb != 0, b, a + b), fa | fb


@triton.jit
def _seg_lse(ma, sa, fa, mb, sb, fb):
    """Combine of a segmented log-sum-exp of (max m, scaled sum s) pairs (the value is m + log s):
    ``b`` starting a new segment (fb = 1) drops what came before."""
    m = tl.maximum(ma, mb)
    ms = tl.where(m == float("-inf"), 0.0, m)
    sm = sa * tl.exp(ma - ms) + sb * tl.exp(mb - ms)
    return tl.where(fb != 0, mb, m), tl.where(fb != 0, sb, sm), fa | fb


@triton.jit
def _lse_value(m, s):
    """``m + log s`` of a (max, scaled sum) pair from :func:`_seg_lse`: -inf for an empty sum."""
    return tl.where(s > 0, m + tl.log(tl.where(s > 0, s, 1.0)), float("-inf"))


@triton.jit
def _reg_beta(emb, in_code, in_w, in_map, out_code, out_w, out_map, srt, b, s_lo, s_hi, st, en, Tb, alpha, gam,
              T, B, S, MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """The register path's backward of sequence b (one with a path), t = T_b-1 .. 0, beta_t in registers.
    Edge posteriors p[k, c] = exp(alpha_{t-1}(nb[k, c]) + score_t + beta_t(dest(c)) - n_t), n_t the log-sum over
    the frame's edges (RETURNN's per-frame normalisation); gamma of each emission slot = the sum of its
    edges' posteriors, by a segmented scan over the slot-sorted table positions (``srt`` = position |
    (slot * 4 + run head * 2 + run end) << 13; -1 past the live edges), written once per slot into
    ``gam (T, B, BLOCK_S)``; MODE 2 (RETURNN's -log gamma) writes log gamma, summed in log space (exact
    however small gamma is). beta_{t-1}(s) = lse over the out-edge table's columns (emissions of frame t),
    merged with the overflow column (``out_map``)."""
    n_b = s_hi - s_lo
    st -= s_lo
    s = tl.arange(0, BLOCK_S)
    q = tl.arange(0, BLOCK_K * BLOCK_S)
    dest = tl.load(in_map + b * BLOCK_S + s) & 0xFFFF  # the state of each in-table column
    oex = tl.load(out_map + b * BLOCK_S + s) >> 16
    beta = tl.where(s == en - s_lo, 0.0, float("-inf"))
    # frame t's slot emissions and alpha_{t-1} are loaded one frame ahead (independent of beta)
    t0 = b * 0 + Tb - 1
    e_next = tl.load(emb + (t0 * B + b) * BLOCK_S + s, mask=s * 0 + t0 >= 0, other=0.0)
    a_next = tl.load(alpha + (t0 - 1) * S + s_lo + s, mask=(s < n_b) & (s * 0 + t0 > 0), other=float("-inf"))
    for i in range(0, T):
        t = b * 0 + (T - 1 - i)
        if t < Tb:
            e = e_next
            a_prev = a_next
            if t == 0:
                a_prev = tl.where(s == st, 0.0, float("-inf"))
            e_next = tl.load(emb + ((t - 1) * B + b) * BLOCK_S + s, mask=s * 0 + t > 0, other=0.0)
            a_next = tl.load(alpha + (t - 2) * S + s_lo + s, mask=(s < n_b) & (s * 0 + t > 1),
                             other=float("-inf"))
            # the edge tables are re-read each frame (L1/L2, independent of beta): registers would spill
            code = _tab2(in_code, b, BLOCK_K, BLOCK_S)
            lp = _take(a_prev, code & 0xFFFF, BLOCK_K, BLOCK_S) + _take(e, code >> 16, BLOCK_K, BLOCK_S) \
                - _tab2(in_w, b, BLOCK_K, BLOCK_S) + tl.gather(beta, dest, 0)[None, :]
            mx = tl.max(tl.max(lp, 1), 0)
            mxs = tl.where(mx == float("-inf"), 0.0, mx)
            nt = mxs + tl.log(tl.sum(tl.sum(tl.exp(lp - mxs), 1), 0))
            # slot-sorted order
            sq = tl.load(srt + b * (BLOCK_K * BLOCK_S) + q)
            flag = sq >> 13
            slot = flag >> 2
            head = ((flag >> 1) & 1) | (flag < 0).to(tl.int32)
            last = (flag >= 0) & ((flag & 1) != 0)
            pos = tl.where(sq >= 0, sq & 0x1FFF, 0)
            if MODE == 2:
                lq = tl.where(lp > float("-inf"), lp - nt, float("-inf"))
                lq = tl.gather(tl.reshape(lq, [BLOCK_K * BLOCK_S]), pos, 0)
                lq = tl.where(sq >= 0, lq, float("-inf"))
                sm, ss, _ = tl.associative_scan((lq, tl.full([BLOCK_K * BLOCK_S], 1.0, tl.float32), head), 0,
                                                _seg_lse)
                seg = _lse_value(sm, ss)
            else:
                post = tl.where(lp > float("-inf"), tl.exp(lp - nt), 0.0)
                ps = tl.gather(tl.reshape(post, [BLOCK_K * BLOCK_S]), pos, 0)
                ps = tl.where(sq >= 0, ps, 0.0)
                seg, _ = tl.associative_scan((ps, head), 0, _seg_sum)
            tl.store(gam + (t * B + b) * BLOCK_S + slot, seg, mask=last)
            ocode = _tab2(out_code, b, BLOCK_K, BLOCK_S)
            ocol = _reg_lse(beta, ocode & 0xFFFF,
                            _take(e, ocode >> 16, BLOCK_K, BLOCK_S) - _tab2(out_w, b, BLOCK_K, BLOCK_S),
                            BLOCK_K, BLOCK_S, False)
            beta = _merge(ocol, oex, False)


@triton.jit
def _fsa_out_kernel(out, grad_loss, x, lse, gam, d2slot, fit, lens, logz, B, D, stride_t, stride_b,
                    stride_ot, stride_ob, stride_g,
                    MODE: tl.constexpr, RNE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (T*B, cdiv(D, BLOCK_D)), rows of fitting sequences: class d's gamma is ``gam[t, b, slot(d)]``
    (``d2slot (B, D)``, -1: no edge emits d). MODE 0: g * (softmax - gamma) (logits; softmax from the saved
    lse pair); 1: -g * gamma (log-probs); 2: -log gamma (``gam`` holds log gamma), 1e32 where 0. Padded
    frames: 0 (1e32 for MODE 2);
    a sequence without a path has gamma 0. RNE: round bf16 to nearest (interpreter)."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // B
    b = pid % B
    if tl.load(fit + b) != 0:
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        valid = d * 0 + t < tl.load(lens + b)  # a tensor: the interpreter rejects scalar load masks
        zd = d * 0.0 + tl.load(logz + b)
        active = valid & (zd > float("-inf"))
        u = tl.load(d2slot + b * D + d, mask=dm, other=-1)
        if MODE == 2:  # gam holds log gamma
            lg = tl.load(gam + pid * BLOCK_S + u, mask=dm & (u >= 0) & active, other=float("-inf"))
            r = tl.where(lg > float("-inf"), -lg, 1e32)
        else:
            g = tl.load(gam + pid * BLOCK_S + u, mask=dm & (u >= 0) & active, other=0.0)
            gl = tl.load(grad_loss + b * stride_g).to(tl.float32)
            if MODE == 0:
                xv = tl.load(x + t * stride_t + b * stride_b + d, mask=dm & valid, other=0.0).to(tl.float32)
                r = gl * (tl.exp(log_softmax_at(xv, lse + 2 * pid)) - g)
            else:
                r = -gl * g
            r = tl.where(valid, r, 0.0)
            if RNE:
                r = round_to_bf16(r)
        r = tl.where(valid & (zd != zd), float("nan"), r)  # a NaN log Z: NaN on the sequence's valid frames
        tl.store(out + t * stride_ot + b * stride_ob + d, r, mask=dm)


# ------------------------------------------------------------------------------------------------
# general path (CSR)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _csr_lse(ptr, idx, e_nb, e_w, e_em, prev, one_hot, s, sm, kmax, x, lse, t, b, B, stride_t, stride_b,
             SCORE: tl.constexpr, VITERBI: tl.constexpr):
    """For states ``s``: log-sum-exp (max with VITERBI) over their CSR edges (``ptr``/``idx``, up to
    ``kmax``) of prev[nb_e] + lp[t, emission_e] - w_e, one edge per step. prev is a row of states in
    global memory, or with ``one_hot`` >= 0 the one-hot (0 at that state, -inf elsewhere: alpha_{-1})."""
    p0 = tl.load(ptr + s, mask=sm, other=0)
    deg = tl.load(ptr + s + 1, mask=sm, other=0) - p0
    m = tl.full(s.shape, float("-inf"), tl.float32)
    acc = tl.zeros(s.shape, tl.float32)
    for k in range(0, kmax):
        km = sm & (k < deg)
        e = tl.load(idx + p0 + k, mask=km, other=0)
        nb = tl.load(e_nb + e, mask=km, other=0)
        if one_hot >= 0:
            v = tl.where(nb == one_hot, 0.0, float("-inf"))
        else:
            v = tl.load(prev + nb, mask=km, other=float("-inf"))
        v = v + _edge_score(x, lse, tl.load(e_w + e, mask=km, other=float("inf")),
                            tl.load(e_em + e, mask=km, other=0), t, b, B, stride_t, stride_b, SCORE, km)
        v = tl.where(km, v, float("-inf"))
        if VITERBI:
            m = tl.maximum(m, v, propagate_nan=tl.PropagateNan.ALL)
        else:
            m, acc = lse_step(m, acc, v)
    if VITERBI:
        return m
    return tl.where(m == float("-inf"), 0.0, m) + tl.log(acc)


@triton.jit
def _edge_score(x, lse, w, em, t, b, B, stride_t, stride_b, SCORE: tl.constexpr, emask):
    v = tl.load(x + t * stride_t + b * stride_b + em, mask=emask, other=0.0).to(tl.float32)
    if SCORE == 0:      # -log space am (fast_baum_welch)
        v = -v
    elif SCORE == 2:    # logits: log-softmax
        v = log_softmax_at(v, lse + 2 * (t * B + b))
    return v - w


@triton.jit
def _csr_alpha(x, lse, e_from, e_em, e_w, in_ptr, in_idx, max_in, b, s_lo, s_hi, st, Tb, alpha,
               T, B, S, stride_t, stride_b, SCORE: tl.constexpr, VITERBI: tl.constexpr, BLOCK_S: tl.constexpr):
    """The general path's alpha of sequence b, t = 0 .. T-1, BLOCK_S of its states per step, their incoming
    edges (CSR ``in_ptr``/``in_idx``, up to ``max_in``) one at a time (``_csr_lse``); writes alpha_t into
    ``alpha (T, S)``; past the sequence's length alpha is carried over."""
    kmax = tl.load(max_in)
    for t32 in range(0, T):
        t = b * 0 + t32
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            sm = s < s_hi
            if t < Tb:
                a = _csr_lse(in_ptr, in_idx, e_from, e_w, e_em, alpha + (t - 1) * S, tl.where(t == 0, st, -1),
                             s, sm, kmax, x, lse, t, b, B, stride_t, stride_b, SCORE, VITERBI)
            else:
                if t == 0:
                    a = tl.where(s == st, 0.0, float("-inf"))
                else:
                    a = tl.load(alpha + (t - 1) * S + s, mask=sm, other=float("-inf"))
            tl.store(alpha + t * S + s, a, mask=sm)
        tl.debug_barrier()


@triton.jit
def _csr_post(out, grad_loss, x, lse, e_from, e_to, e_em, e_w, out_ptr, out_idx, max_out, em_ptr, em_idx,
              b, s_lo, s_hi, st, en, Tb, z, alpha, beta_buf,
              T, B, S, D, stride_t, stride_b, stride_ot, stride_ob, stride_g,
              SCORE: tl.constexpr, MODE: tl.constexpr, RNE: tl.constexpr, BLOCK_S: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """The general path's backward of sequence b, t = T-1 .. 0 (BLOCK_S states, BLOCK_D classes, BLOCK_E
    edges per step). Reads alpha (T, S), x (edge scores; lse pair for logits) and the out-/emission-sorted
    edge tables; beta_t goes to the 2-row ping-pong ``beta_buf (2, S)`` (each sequence its own state range).
    Writes the sequence's (T, D) block of ``out``: MODE 0: g * (softmax - gamma) (logits); 1: -g * gamma
    (log-probs); 2: -log gamma (1e32 where 0), each class written once per frame (a dense row, then each
    emission run's last edge). Posteriors are normalised per frame by log sum_s alpha_t(s) beta_t(s)."""
    ok = z > float("-inf")
    kout = tl.load(max_out)
    g = 1.0
    if MODE != 2:
        g = tl.load(grad_loss + b * stride_g).to(tl.float32)
    for i in range(0, T):
        t = b * 0 + (T - 1 - i)
        cur = beta_buf + (t % 2) * S
        nxt = beta_buf + ((t + 1) % 2) * S
        active = (t < Tb) & ok
        if active:
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                sm = s < s_hi
                if t == Tb - 1:
                    bt = tl.where(s == en, 0.0, float("-inf"))
                else:
                    bt = _csr_lse(out_ptr, out_idx, e_to, e_w, e_em, nxt, -1, s, sm, kout, x, lse, t + 1, b, B,
                                  stride_t, stride_b, SCORE, False)
                tl.store(cur + s, bt, mask=sm)
        tl.debug_barrier()
        # per-frame normaliser log sum_s alpha_t(s) beta_t(s) (= log Z up to fp32 drift)
        zt = z
        if active:
            mv = tl.full([BLOCK_S], float("-inf"), tl.float32)
            av = tl.zeros([BLOCK_S], tl.float32)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                sm = s < s_hi
                v = tl.load(alpha + t * S + s, mask=sm, other=float("-inf")) + tl.load(cur + s, mask=sm,
                                                                                        other=float("-inf"))
                mv, av = lse_step(mv, av, v)
            mx = tl.max(mv, 0)
            mxs = tl.where(mx == float("-inf"), 0.0, mx)
            zt = mxs + tl.log(tl.sum(av * tl.exp(mv - mxs), 0))
        orow = out + t * stride_ot + b * stride_ob
        # (a) every class's value without edges: g * softmax (logits), 0 (log-probs), 1e32 (-log gamma)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            if MODE == 2:
                r = tl.full([BLOCK_D], 1e32, tl.float32)
            elif MODE == 0:
                xv = tl.load(x + t * stride_t + b * stride_b + d, mask=dm, other=0.0).to(tl.float32)
                r = tl.where(t < Tb, g * tl.exp(log_softmax_at(xv, lse + 2 * (t * B + b))), 0.0)
            else:
                r = tl.zeros([BLOCK_D], tl.float32)
            if RNE:
                r = round_to_bf16(r)
            # a NaN log Z (a NaN score on its paths): NaN on the valid frames ((b) skips the sequence)
            r = tl.where((d * 0 + t < Tb) & (d * 0.0 + z != z), float("nan"), r)
            tl.store(orow + d, r, mask=dm)
        tl.debug_barrier()  # (b) overwrites some of these entries, possibly from other threads
        # (b) gamma_t(d) = sum of the posteriors of the edges emitting d: the sequence's live edges in
        # (emission)-sorted order, BLOCK_E at a time, a segmented scan per emission run (fixed order,
        # relative precision kept per class); each run's last edge writes its class once
        if active:
            q0 = tl.load(em_ptr + b * D)
            q1 = tl.load(em_ptr + b * D + D)
            carry = 0.0
            carry_m = float("-inf")
            carry_s = 0.0
            for c0 in range(q0, q1, BLOCK_E):
                q = c0 + tl.arange(0, BLOCK_E)
                qm = q < q1
                e = tl.load(em_idx + q, mask=qm, other=0)
                fr = tl.load(e_from + e, mask=qm, other=0)
                to = tl.load(e_to + e, mask=qm, other=0)
                w = tl.load(e_w + e, mask=qm, other=float("inf"))
                em = tl.load(e_em + e, mask=qm, other=-1)
                em_prev = tl.load(e_em + tl.load(em_idx + q - 1, mask=qm & (q > q0), other=0),
                                  mask=qm & (q > q0), other=-1)
                em_next = tl.load(e_em + tl.load(em_idx + q + 1, mask=(q + 1) < q1, other=0),
                                  mask=(q + 1) < q1, other=-1)
                if t == 0:
                    a_prev = tl.where(fr == st, 0.0, float("-inf"))
                else:
                    a_prev = tl.load(alpha + (t - 1) * S + fr, mask=qm, other=float("-inf"))
                v = a_prev + _edge_score(x, lse, w, em, t, b, B, stride_t, stride_b, SCORE, qm) \
                    + tl.load(cur + to, mask=qm, other=float("-inf")) - zt
                head = (em != em_prev).to(tl.int32)  # a run of one emission starts here
                # the chunk's leading run may continue the previous chunk's last run
                started = tl.cumsum(head, 0) > 0
                at_end = q == tl.minimum(c0 + BLOCK_E, q1) - 1
                last = qm & (em != em_next)
                if MODE == 2:  # log gamma summed in log space (exact however small gamma is)
                    lq = tl.where(qm, v, float("-inf"))
                    sm, ss, _ = tl.associative_scan((lq, tl.full([BLOCK_E], 1.0, tl.float32), head), 0, _seg_lse)
                    # the leading run continues the previous chunk's last one (the carry) until a run starts
                    st_i = started.to(tl.int32)
                    sm, ss, _ = _seg_lse(carry_m + tl.zeros([BLOCK_E], tl.float32), carry_s, st_i, sm, ss, st_i)
                    carry_m = tl.max(tl.where(at_end, sm, float("-inf")), 0)
                    carry_s = tl.sum(tl.where(at_end, ss, 0.0), 0)
                    lg = _lse_value(sm, ss)
                    r = tl.where(lg > float("-inf"), -lg, 1e32)
                else:
                    post = tl.where(qm, tl.exp(v), 0.0)
                    seg, _ = tl.associative_scan((post, head), 0, _seg_sum)
                    seg = tl.where(started, seg, seg + carry)
                    carry = tl.sum(tl.where(at_end, seg, 0.0), 0)
                    if MODE == 0:
                        xe = tl.load(x + t * stride_t + b * stride_b + em, mask=last, other=0.0).to(tl.float32)
                        r = g * (tl.exp(log_softmax_at(xe, lse + 2 * (t * B + b))) - seg)
                    else:
                        r = -g * seg
                if RNE:
                    r = round_to_bf16(r)
                tl.store(orow + em, r, mask=last)
        tl.debug_barrier()


# ------------------------------------------------------------------------------------------------
# the recursions: one launch per direction, each program on its sequence's path
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fsa_alpha_kernel(x, lse, emb, in_code, in_w, in_map, e_from, e_em, e_w, in_ptr, in_idx, max_in, fit, lo, hi,
                      start, end, lens, alpha, logz, loss, T, B, S, stride_t, stride_b,
                      SCORE: tl.constexpr, VITERBI: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_S: tl.constexpr):
    """Grid (B,), one program per sequence: alpha (T, S) by the register path (``_reg_alpha``, BLOCK_R
    states; BLOCK_R = 0: no register path) for a fitting sequence, else by the general path
    (``_csr_alpha``, BLOCK_S states a step); then log Z = alpha_{T-1}(end) (alpha is carried past the
    sequence's length; without frames, T = 0: 0 if the start state is the end state, else -inf) into
    ``logz (B,)`` and the loss -log Z (0 where infinite: no path) into ``loss (B,)``."""
    b = tl.program_id(0).to(tl.int64)
    s_lo, s_hi, st, Tb = _seq(lo, hi, start, lens, b)
    f = tl.load(fit + b)
    if BLOCK_R > 0:
        if f != 0:
            _reg_alpha(emb, in_code, in_w, in_map, b, s_lo, s_hi, st, Tb, alpha, T, B, S, VITERBI, BLOCK_K, BLOCK_R)
    if f == 0:
        _csr_alpha(x, lse, e_from, e_em, e_w, in_ptr, in_idx, max_in, b, s_lo, s_hi, st, Tb, alpha, T, B, S,
                   stride_t, stride_b, SCORE, VITERBI, BLOCK_S)
    en = tl.load(end + b)
    z = tl.where(st == en, 0.0, float("-inf"))  # no frames (T = 0): alpha_{-1}
    if T > 0:
        tl.debug_barrier()  # alpha_{T-1} was stored by other threads
        z = tl.load(alpha + (b * 0 + T - 1) * S + en)
    tl.store(logz + b, z)
    tl.store(loss + b, tl.where((z == float("inf")) | (z == float("-inf")), 0.0, -z))


@triton.jit
def _fsa_beta_kernel(out, grad_loss, x, lse, emb, in_code, in_w, in_map, out_code, out_w, out_map, srt,
                     e_from, e_to, e_em, e_w, out_ptr, out_idx, max_out, em_ptr, em_idx, fit, lo, hi, start, end,
                     lens, alpha, logz, gam, beta_buf, obs, T, B, S, D, stride_t, stride_b, stride_ot, stride_ob,
                     stride_g, SCORE: tl.constexpr, MODE: tl.constexpr, RNE: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Grid (B,), one program per sequence: a fitting sequence with a path by the register path
    (``_reg_beta``: its slot gammas into ``gam``, the gradient then by ``_fsa_out_kernel``), any other by the
    general path (``_csr_post``: its rows of ``out`` directly). MODE 2 (fast_baum_welch) also writes the
    sequence's column of ``obs (T, B)``: -log Z on valid frames of a sequence with a path (finite log Z) or a
    NaN log Z, else 0. A NaN log Z (a NaN score on the sequence's paths) makes its valid rows of ``out`` NaN."""
    b = tl.program_id(0).to(tl.int64)
    s_lo, s_hi, st, Tb = _seq(lo, hi, start, lens, b)
    en = tl.load(end + b)
    z = tl.load(logz + b)
    if MODE == 2:
        for t0 in range(0, T, BLOCK_D):
            t = t0 + tl.arange(0, BLOCK_D)
            zt = z + tl.zeros([BLOCK_D], tl.float32)  # a tensor: the interpreter rejects scalar & tensor masks
            has = (t < Tb) & (((zt > float("-inf")) & (zt < float("inf"))) | (zt != zt))  # (NaN stays NaN)
            tl.store(obs + t.to(tl.int64) * B + b, tl.where(has, -zt, 0.0), mask=t < T)
    f = tl.load(fit + b)
    if BLOCK_R > 0:
        if (f != 0) & (z > float("-inf")):
            _reg_beta(emb, in_code, in_w, in_map, out_code, out_w, out_map, srt, b, s_lo, s_hi, st, en, Tb, alpha,
                      gam, T, B, S, MODE, BLOCK_K, BLOCK_R)
    if f == 0:
        _csr_post(out, grad_loss, x, lse, e_from, e_to, e_em, e_w, out_ptr, out_idx, max_out, em_ptr, em_idx,
                  b, s_lo, s_hi, st, en, Tb, z, alpha, beta_buf, T, B, S, D, stride_t, stride_b, stride_ot,
                  stride_ob, stride_g, SCORE, MODE, RNE, BLOCK_S, BLOCK_D, BLOCK_E)


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fsa_tables_kernel(e_from, e_to, e_em, e_w, in_ptr, in_idx, out_ptr, out_idx, em_ptr, em_idx, lohi, fit,
                       in_code, in_w, in_map, out_code, out_w, out_map, srt, slot_em, d2slot, e_slot, e_pos, D,
                       K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B,): the register path's tables of sequence b from the CSR tables (see :func:`prepare`). Every
    entry is written by one lane (plain stores, ordered by barriers): deterministic. A sequence that does
    not fit gets ``fit = 0`` and an unused ``slot_em`` row; its other rows are never read."""
    b = tl.program_id(0).to(tl.int64)
    BK: tl.constexpr = K * BLOCK_S
    lo = tl.load(lohi + b)
    cnt = tl.load(lohi + b + 1) - lo
    s = tl.arange(0, BLOCK_S)
    sm = s < cnt
    p_in = tl.load(in_ptr + lo + s, mask=sm, other=0)
    d_in = tl.load(in_ptr + lo + s + 1, mask=sm, other=0) - p_in
    p_out = tl.load(out_ptr + lo + s, mask=sm, other=0)
    d_out = tl.load(out_ptr + lo + s + 1, mask=sm, other=0) - p_out
    # a state with more than K edges (one direction) gets an overflow column, numbered after the states
    o_in = (d_in > K).to(tl.int32)
    o_out = (d_out > K).to(tl.int32)
    x_in = cnt + tl.cumsum(o_in, 0) - o_in
    x_out = cnt + tl.cumsum(o_out, 0) - o_out
    # emission slots: the distinct emission ids of the sequence's live edges (emission-sorted), in order
    q = tl.arange(0, BK)
    q0 = tl.load(em_ptr + b * D)
    m = tl.load(em_ptr + b * D + D) - q0
    qm = q < m
    eq = tl.load(em_idx + q0 + q, mask=qm, other=0)
    em = tl.load(e_em + eq, mask=qm, other=-1)
    em_prev = tl.load(e_em + tl.load(em_idx + q0 + q - 1, mask=qm & (q > 0), other=0), mask=qm & (q > 0),
                      other=-1)
    em_next = tl.load(e_em + tl.load(em_idx + q0 + q + 1, mask=q + 1 < m, other=0), mask=q + 1 < m, other=-1)
    first = qm & (em != em_prev)
    slot = tl.cumsum(first.to(tl.int32), 0) - 1
    ok = (cnt + tl.sum(o_in, 0) <= BLOCK_S) & (cnt + tl.sum(o_out, 0) <= BLOCK_S) & \
        (tl.max(tl.maximum(d_in, d_out), 0) <= 2 * K) & (tl.sum(first.to(tl.int32), 0) <= BLOCK_S) & (m <= BK)
    tl.store(fit + b, ok.to(tl.int32))
    tl.store(slot_em + b * BLOCK_S + s, tl.full([BLOCK_S], -1, tl.int32))
    if ok:
        tl.store(e_slot + eq, slot, mask=qm)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            tl.store(d2slot + b * D + d, tl.full([BLOCK_D], -1, tl.int32), mask=d < D)
        tl.store(in_code + b * BK + q, tl.zeros([BK], tl.int32))
        tl.store(out_code + b * BK + q, tl.zeros([BK], tl.int32))
        tl.store(in_w + b * BK + q, tl.full([BK], float("inf"), tl.float32))
        tl.store(out_w + b * BK + q, tl.full([BK], float("inf"), tl.float32))
        tl.store(in_map + b * BLOCK_S + s, tl.zeros([BLOCK_S], tl.int32))
        tl.store(out_map + b * BLOCK_S + s, tl.zeros([BLOCK_S], tl.int32))
        tl.debug_barrier()
        tl.store(slot_em + b * BLOCK_S + slot, em, mask=first)
        tl.store(d2slot + b * D + em, slot, mask=first)
        # the padded tables: the k-th edge (CSR order) of state s sits in row k of column s (k < K), or
        # in row k - K of s's overflow column
        for k in tl.static_range(2 * K):
            if k < K:
                col_in = s
                col_out = s
            else:
                col_in = x_in
                col_out = x_out
            km = sm & (k < d_in)
            e = tl.load(in_idx + p_in + k, mask=km, other=0)
            pos = (k % K) * BLOCK_S + col_in
            code = (tl.load(e_from + e, mask=km, other=0) - lo) | (tl.load(e_slot + e, mask=km, other=0) << 16)
            tl.store(in_code + b * BK + pos, code, mask=km)
            tl.store(in_w + b * BK + pos, tl.load(e_w + e, mask=km, other=0.0), mask=km)
            tl.store(e_pos + e, pos, mask=km)
            km = sm & (k < d_out)
            e = tl.load(out_idx + p_out + k, mask=km, other=0)
            pos = (k % K) * BLOCK_S + col_out
            code = (tl.load(e_to + e, mask=km, other=0) - lo) | (tl.load(e_slot + e, mask=km, other=0) << 16)
            tl.store(out_code + b * BK + pos, code, mask=km)
            tl.store(out_w + b * BK + pos, tl.load(e_w + e, mask=km, other=0.0), mask=km)
        # per column: its state (in_map) and per state: 1 + its overflow column (0: none)
        tl.store(in_map + b * BLOCK_S + s, s | (tl.where(o_in != 0, x_in + 1, 0) << 16), mask=sm)
        tl.store(in_map + b * BLOCK_S + x_in, s, mask=sm & (o_in != 0))
        tl.store(out_map + b * BLOCK_S + s, s | (tl.where(o_out != 0, x_out + 1, 0) << 16), mask=sm)
        tl.store(out_map + b * BLOCK_S + x_out, s, mask=sm & (o_out != 0))
        tl.debug_barrier()
        # the in-table positions in slot order, with the slot and its run's head / end flags
        flag = slot * 4 + first.to(tl.int32) * 2 + (qm & (em_next != em)).to(tl.int32)
        v = tl.load(e_pos + eq, mask=qm, other=0) | (flag << 13)
        tl.store(srt + b * BK + q, tl.where(qm, v, -1))


def reg_block(num_states, B):
    """BLOCK_S of the register path from shapes only (0: none): the next power of two (>= 16) of the
    average states per sequence, if at most ``REG_MAX_STATES``."""
    if B == 0 or num_states == 0:
        return 0
    bs = max(triton.next_power_of_2(-(-num_states // B)), 16)
    return bs if bs <= REG_MAX_STATES else 0


def _padded(count: int) -> int:
    """A table section's length in the buffer: ``count`` rounded up to 4 elements (16 bytes), so that every
    section starts 16-byte aligned. (The kernels' pointer arguments are specialised on that alignment: with
    sections packed end to end it changed with the shapes, and each combination compiled its own variant.)"""
    return -(-count // 4) * 4


def _sizes(B, n, E, D, BS, K):
    """(name, element count) of the int32 and of the fp32 table buffers, in order; each section takes
    ``_padded(count)`` elements of its buffer. The first int32 sections (through ``new_id``) are written by
    one concatenation, the register path's by ``_fsa_tables_kernel`` (``e_slot`` / ``e_pos``: its scratch)."""
    reg = 1 if BS else 0
    ints = (("e_from", E), ("e_to", E), ("e_em", E), ("in_ptr", n + 2), ("out_ptr", n + 2), ("em_ptr", B * D + 2),
            ("in_idx", E), ("out_idx", E), ("em_idx", E), ("max_in", 1), ("max_out", 1), ("lohi", B + 1),
            ("start", B), ("end", B), ("new_id", n), ("fit", B), ("in_code", B * K * BS), ("out_code", B * K * BS),
            ("srt", B * K * BS), ("in_map", B * BS), ("out_map", B * BS), ("slot_em", B * BS),
            ("d2slot", B * D * reg), ("e_slot", E * reg), ("e_pos", E * reg))
    return ints, (("e_w", E), ("in_w", B * K * BS), ("out_w", B * K * BS))


def table_sizes(B, num_states, E, D):
    """(int32 count, fp32 count) of :func:`prepare`'s buffers, from shapes only (for the ops' fakes)."""
    ints, flts = _sizes(B, num_states, E, D, reg_block(num_states, B), REG_K)
    return sum(_padded(c) for _, c in ints), sum(_padded(c) for _, c in flts)


class Tables:
    """Named views into the two flat buffers ``itab`` (int32) and ``ftab`` (fp32) that :func:`prepare`
    fills; ``BS`` is the register path's BLOCK_S (0: none), ``K`` its table depth; ``lo`` / ``hi`` are
    each sequence's state range ``[lo_b, hi_b)`` (views of ``lohi``)."""

    def __init__(self, itab, ftab, B, num_states, E, D):
        self.itab, self.ftab = itab, ftab
        self.B, self.S, self.E, self.D = B, num_states, E, D
        self.BS, self.K = reg_block(num_states, B), REG_K
        for buf, spec in zip((itab, ftab), _sizes(B, num_states, E, D, self.BS, self.K)):
            views = buf.split([k for _, n in spec for k in (n, _padded(n) - n)])  # one op for every view
            for (name, _), view in zip(spec, views[::2]):
                setattr(self, name, view)
        self.lo, self.hi = self.lohi[:B], self.lohi[1:]


def prepare(edges, weights, se, num_states, B, D):
    """Build the kernels' tables on device (no host sync) -> :class:`Tables` over two new flat buffers
    ``itab`` (int32) and ``ftab`` (fp32).

    ``edges (4, E)`` int64, ``weights (E,)`` float (NaN already replaced by +inf), ``se (2, B)`` int64.
    States are renumbered so that each sequence's form one range (a stable sort by owning sequence); the
    CSR tables by destination, source and (sequence, emission) come from one stable sort of the three keys
    (dead edges sort last, out of every bucket); the register path's tables from ``_fsa_tables_kernel``.
    A fixed number of torch ops whatever B, E or the state count.
    """
    import torch
    dev = edges.device
    n, E = num_states, edges.shape[1]
    ni, nf = table_sizes(B, n, E, D)
    # zeroed: entries no sequence uses (e.g. the register tables of a sequence on the general path) are
    # never read, but the buffers are outputs of the forward op and saved for the backward: defined values
    itab = torch.zeros(ni, dtype=torch.int32, device=dev)
    ftab = torch.zeros(nf, dtype=torch.float32, device=dev)
    p = Tables(itab, ftab, B, n, E, D)
    ar = torch.arange(max(n + 2, B * D + 2, B + 1, E), device=dev)
    # the sequence owning each state (B: none), then kernel ids: states grouped by sequence
    owner = torch.full((n,), B, dtype=torch.int64, device=dev).scatter_(
        0, torch.cat([edges[:2].reshape(-1), se.reshape(-1)]), torch.cat([edges[3], edges[3], ar[:B], ar[:B]]))
    own_sorted, order = torch.sort(owner, stable=True)
    new_id = torch.empty_like(order).scatter_(0, order, ar[:n])
    lohi = torch.searchsorted(own_sorted, ar[:B + 1])
    ft = new_id[edges[:2]]
    big = max(n, B * D) + 1  # the key of a dead edge: after every bucket
    keys = torch.where(weights < float("inf"), torch.cat([ft.flip(0), (edges[3] * D + edges[2])[None]]), big)
    skeys, orders = torch.sort(keys, dim=1, stable=True)
    ptr2 = torch.searchsorted(skeys[:2], ar[:n + 2].repeat(2, 1))  # in_ptr, out_ptr
    em_ptr = torch.searchsorted(skeys[2], ar[:B * D + 2])
    mx = (ptr2[:, 1:n + 1] - ptr2[:, :n]).amax(1) if n else ptr2[:, 0]
    # the sections in _sizes' order, each followed by its padding (zeros)
    rows = [*ft.unbind(0), edges[2], *ptr2.unbind(0), em_ptr, *orders.unbind(0), *mx.split(1), lohi,
            *new_id[se].unbind(0), new_id]
    if not p.BS:  # fit: every sequence on the general path
        rows.append(torch.zeros(B, dtype=torch.int64, device=dev))
    pads = [_padded(r.numel()) - r.numel() for r in rows]
    zeros = torch.zeros(sum(pads), dtype=torch.int64, device=dev).split(pads)
    parts = [t for pair in zip(rows, zeros) for t in pair]
    torch.cat(parts, out=itab[:sum(t.numel() for t in parts)])
    p.e_w.copy_(weights)
    if p.BS and B:
        _fsa_tables_kernel[(B,)](p.e_from, p.e_to, p.e_em, p.e_w, p.in_ptr, p.in_idx, p.out_ptr, p.out_idx, p.em_ptr,
                                 p.em_idx, p.lohi, p.fit, p.in_code, p.in_w, p.in_map, p.out_code, p.out_w,
                                 p.out_map, p.srt, p.slot_em, p.d2slot, p.e_slot, p.e_pos, D, K=p.K,
                                 BLOCK_S=p.BS, BLOCK_D=min(triton.next_power_of_2(max(D, 16)), 1024),
                                 num_warps=_warps(p))
    return p


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _warps(p):
    """Warps of the recursion kernels: the register path's (its tables' width / 256, 1..16), 4 without it."""
    if interpreting():
        return 4
    return max(1, min(16, (p.K * p.BS) // 256)) if p.BS else 4


def _opts(nw, ceiling=True):
    """Launch options of a recursion kernel with ``nw`` warps: a register ceiling of what one program alone on
    an SM may have (255 up to 8 warps, 128 at 16). Without one, ptxas (sm_90, triton 3.6 and 3.9) aims lower
    and spills the register path's tables in its frame loop; ``ceiling=False`` for the backward at 16 warps,
    which compiles without spills as it is and spills with the ceiling."""
    if interpreting() or not (ceiling or nw < 16):
        return dict(num_warps=nw)
    return dict(num_warps=nw, maxnreg=min(255, 65536 // (32 * nw)))


def _blocks(p, D, B, nw):
    """(BLOCK_S states, BLOCK_D classes, BLOCK_E edges: the average edges per sequence, from shapes only)
    of the general path, for a launch of ``nw`` warps: at most 8 classes and edges per thread, 4 edges
    beside a register path (there it is the fallback, and its registers would count against the register
    path's)."""
    be = min(max(triton.next_power_of_2(-(-p.E // max(B, 1))), 16),
             64 if interpreting() else (128 if p.BS else 256) * nw)
    return 64, min(triton.next_power_of_2(max(D, 16)), 256 * nw), be


def emissions(x, p, score):
    """The pre-pass: (lse (T, B, 2) fp32 for logits (score 2), else None; emb (T, B, BS) fp32 or None)."""
    import torch
    T, B, D = x.shape
    lse = torch.empty(T, B, 2, dtype=torch.float32, device=x.device) if score == 2 else None
    emb = torch.empty(T, B, p.BS, dtype=torch.float32, device=x.device) if p.BS else None
    if T * B and (lse is not None or emb is not None):
        _fsa_emit_kernel[(T * B,)](x, lse if lse is not None else x, p.slot_em, emb if emb is not None else x, B, D,
                                   x.stride(0), x.stride(1), SCORE=score,
                                   BLOCK_C=min(triton.next_power_of_2(max(D, 16)), 4096), BLOCK_S=p.BS, num_warps=4)
    return lse, emb


def alpha(x, lse, emb, p, lens, score, viterbi):
    """(alpha (T, S) fp32 in kernel state ids, log Z (B,), loss (B,): -log Z, 0 where infinite); one launch."""
    import torch
    T, B, D = x.shape
    # -inf first: states no sequence owns (num_states past every sequence's) are never written, as on the
    # torch backend, where no path reaches them
    a = torch.full((T, p.S), float("-inf"), dtype=torch.float32, device=x.device)
    logz = torch.empty(B, dtype=torch.float32, device=x.device)
    loss = torch.empty(B, dtype=torch.float32, device=x.device)
    if B == 0:
        return a, logz, loss
    nw = _warps(p)
    _fsa_alpha_kernel[(B,)](x, lse if lse is not None else x, emb if emb is not None else x, p.in_code, p.in_w,
                            p.in_map, p.e_from, p.e_em, p.e_w, p.in_ptr, p.in_idx, p.max_in, p.fit, p.lo, p.hi,
                            p.start, p.end, lens, a, logz, loss, T, B, p.S, x.stride(0), x.stride(1), SCORE=score,
                            VITERBI=bool(viterbi), BLOCK_K=p.K, BLOCK_R=p.BS, BLOCK_S=_blocks(p, D, B, nw)[0],
                            **_opts(nw))
    return a, logz, loss


def posteriors(out, grad_loss, x, lse, emb, p, lens, a, logz, score, mode, obs=None):
    """Write the gradient (mode 0/1, in ``out``'s dtype) or -log posteriors (mode 2, fp32) into ``out``
    (T, B, D), and for mode 2 fast_baum_welch's ``obs (T, B)``; two launches (one without the register
    path)."""
    import torch
    T, B, D = x.shape
    if T == 0 or B == 0:
        return
    logz = logz.float().contiguous()
    g = grad_loss if grad_loss is not None else logz
    sg = g.stride(0) if g.dim() else 0
    rne = out.dtype == torch.bfloat16 and interpreting()
    nw = _warps(p)
    bs, bd, be = _blocks(p, D, B, nw)
    gam = torch.empty(T, B, p.BS, dtype=torch.float32, device=x.device) if p.BS else out
    beta = torch.empty(2, p.S, dtype=torch.float32, device=x.device)
    _fsa_beta_kernel[(B,)](out, g, x, lse if lse is not None else x, emb if emb is not None else x, p.in_code,
                           p.in_w, p.in_map, p.out_code, p.out_w, p.out_map, p.srt, p.e_from, p.e_to, p.e_em, p.e_w,
                           p.out_ptr, p.out_idx, p.max_out, p.em_ptr, p.em_idx, p.fit, p.lo, p.hi, p.start, p.end,
                           lens, a, logz, gam, beta, obs if obs is not None else logz, T, B, p.S, D, x.stride(0),
                           x.stride(1), out.stride(0), out.stride(1), sg, SCORE=score, MODE=mode, RNE=rne,
                           BLOCK_K=p.K, BLOCK_R=p.BS, BLOCK_S=bs, BLOCK_D=bd, BLOCK_E=be,
                           **_opts(nw if p.BS else (4 if be <= 256 else 8), ceiling=False))
    if p.BS:
        bd = min(triton.next_power_of_2(max(D, 16)), 1024)
        _fsa_out_kernel[(T * B, triton.cdiv(D, bd))](out, g, x, lse if lse is not None else x, gam, p.d2slot, p.fit,
                                                     lens, logz, B, D, x.stride(0), x.stride(1), out.stride(0),
                                                     out.stride(1), sg, MODE=mode, RNE=rne, BLOCK_S=p.BS,
                                                     BLOCK_D=bd, num_warps=4)
