"""Triton kernels for CTC (semantics: ``tri_losses/_torch/ctc.py``).

Layout: emissions ``x (T, B, C)`` with arbitrary T/B strides (class stride 1), log-probs or logits
(then each frame's ``lse (T, B, 2)`` = (max m, log s) pair, formed in the forward's first pass, is applied
on the fly as ``(x - m) - log s``: the log-softmax is never materialised). Extended states ``ext (B, L)``,
L = 2*S_max + 1, and ``skipok (B, L)`` (s-2 -> s allowed) are built by the caller on device (O(B*L)).

  _row_lse_kernel        grid (T*B,): online (max, sum) of one frame, BLOCK_C columns per step (the chunked
                         path's first pass; the register path forms it in its emissions pass).

Register path (2S+1 <= REG_MAX_L = 4096 states, i.e. S <= 2047): the per-frame critical path stays on chip.
  _ctc_emit_kernel       grid (T*B,): gathers each frame's state emissions into ``em (T, B, L)`` (log-softmax
                         applied; -inf off the sequence), fully parallel, once in the forward (forming the
                         frame's lse pair first, for logits; the buffer then becomes alpha) and once in the
                         backward (reading the lse pairs; recomputed: alpha is kept there).
  _ctc_alpha_reg_kernel  grid (B,): one program per sequence holds all its states in registers (about 8 per
                         thread, 1-16 warps); the s-1 / s-2 shifts are ``tl.gather`` (warp shuffles or an
                         on-chip exchange), em[t+1] is loaded a frame ahead; alpha_t is stored over em[t]
                         for the backward (never re-read here) and log Z taken from the registers.
  _ctc_beta_reg_kernel   grid (B,): beta the same way from t = T-1 down (no beta stored), alpha_t and em[t]
                         loaded a frame ahead; writes v_t = log(alpha_t beta_t) (without frame t's emission)
                         over em[t]: no block-wide reduction in the loop.
Chunked path (longer targets; BLOCK_L states per step, no limit on S):
  _ctc_alpha_kernel      grid (B,): one program per sequence loops over time; per frame it loops
                         over BLOCK_L-state chunks, reads alpha_{t-1}(s, s-1, s-2) from
                         the alpha buffer, gathers the emissions, writes alpha_t (T*L fp32 per
                         sequence, the only T-sized state kept for the backward) and finally log Z.
  _ctc_beta_kernel       grid (B,): loops t = T-1 .. 0; beta_t in a 2-row ping-pong scratch (not stored per
                         frame), emissions gathered from x; writes v_t as the register path's beta kernel.
Both:
  _ctc_grad_frame_kernel grid (T*B,): the gradient row of one frame: g * softmax (or 0), then after a barrier
                         the target's classes from the frame's posteriors exp(v - max) / sum (its own
                         normaliser): the blank states' sum and each label class's sum (a cumulative
                         sum in label-sorted order on chip; one writer per class); the frame's states and
                         labels in one block on the register path, in steps beyond. Viterbi: the one-hot
                         class of the backtracked path.
  _ctc_backtrack_kernel  grid (B,): scalar backtrack of the Viterbi alpha (RETURNN's tie rule: the largest
                         predecessor score plus emission, ties s-2, s-1, s; the last label over the final blank).
Memory: alpha T*B*L*4 bytes (kept for the backward; on the register path the forward's emissions buffer, written
over), plus the backward's transient T*B*L*4 posteriors buffer (the register path's emissions, overwritten), plus
O(B*L) scratch on the chunked path. Bytes per frame: reads C (logits: twice, lse + gradient) plus O(L) gathers;
writes C (gradient). No atomics, no host sync (loops run to the padded T; each sequence is masked by its own
length). A program re-reading what it wrote in an earlier step issues ``tl.debug_barrier()``
between the steps.
"""
import triton
import triton.language as tl

from ._math import interpreting, log_softmax_at, rne_bf16, round_to_bf16, row_logsumexp

NEG = float("-inf")


@triton.jit
def _class_grad(grow, xrow, lrow, cls, gamma, g, mask, SOFTMAX: tl.constexpr, RNE_BF16: tl.constexpr):
    """Stores a frame's final gradient at class(es) ``cls``: ``g * (softmax - gamma)`` with SOFTMAX, else
    ``-g * gamma`` (0 where gamma is 0, whatever g), formed in fp32; ``cls`` and ``gamma`` scalars or blocks
    alike. (The upstream times the local derivative: a non-finite g gives what the torch backend's gives.)"""
    if SOFTMAX:
        v = g * (tl.exp(log_softmax_at(tl.load(xrow + cls, mask=mask, other=0.0).to(tl.float32), lrow)) - gamma)
    else:
        v = tl.where(gamma != 0, -g * gamma, 0.0)
    if RNE_BF16:
        v = round_to_bf16(v)
    tl.store(grow + cls, v, mask=mask)


@triton.jit
def _row_lse_kernel(x, out, B, C, stride_t, stride_b, BLOCK_C: tl.constexpr):
    """Grid (T*B,), one frame per program, BLOCK_C classes per step (online max/sum in fp32).
    Reads the frame's C logits once; writes ``out[t, b] = (m, log sum exp(x - m))`` (2 fp32; m = 0 for an
    all -inf row): consumers form log-softmax values as ``(x - m) - log s``, exact for large |x|."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // B
    b = pid % B
    m, ls = row_logsumexp(x + t * stride_t + b * stride_b, C, BLOCK_C)
    tl.store(out + 2 * pid, m)
    tl.store(out + 2 * pid + 1, ls)


@triton.jit
def _lse3(a, b, c, VITERBI: tl.constexpr):
    # NaN-propagating max: a NaN score (a NaN input) makes the state's alpha NaN, as PyTorch's CTC, also for
    # the Viterbi max (a plain maximum would drop it)
    m = tl.maximum(tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL), c, propagate_nan=tl.PropagateNan.ALL)
    if VITERBI:
        return m
    ms = tl.where(m == float("-inf"), 0.0, m)
    return ms + tl.log(tl.exp(a - ms) + tl.exp(b - ms) + tl.exp(c - ms))


@triton.jit
def _reach(l, e):
    """``l + e`` where ``l`` (the log-sum of the paths into or out of a state) is not -inf, else -inf: a
    state no path reaches stays -inf whatever its emission, so a NaN score there (an input NaN on a state no
    path uses) cannot spread, as in PyTorch's CTC, which never visits such states; a NaN ``l`` stays NaN."""
    return tl.where(l == float("-inf"), float("-inf"), l + e)


@triton.jit
def _meet(a, r):
    """``a + r`` (log alpha + log beta of a state) where neither is -inf, else -inf: a state on no complete
    path has posterior 0 even when the other side is NaN (a NaN score on a state no complete path uses)."""
    return tl.where((a == float("-inf")) | (r == float("-inf")), float("-inf"), a + r)


@triton.jit
def _gather(x, t, b, ext_row, s, smask, stride_t, stride_b):
    """The scores ``x[t, b, ext[s]]`` of states ``s`` in fp32 (a gather ext -> x; -inf off ``smask``)."""
    lab = tl.load(ext_row + s, mask=smask, other=0)  # -1: an out-of-range label (no path)
    return tl.load(x + t * stride_t + b * stride_b + lab, mask=smask & (lab >= 0), other=float("-inf")).to(tl.float32)


@triton.jit
def _emit(x, lse, t, b, ext_row, s, smask, B, stride_t, stride_b, IS_LOGITS: tl.constexpr):
    """Emissions of states ``s`` at frame t: a gather ext -> x (log-softmax applied for logits)."""
    e = _gather(x, t, b, ext_row, s, smask, stride_t, stride_b)
    if IS_LOGITS:
        e = log_softmax_at(e, lse + 2 * (t * B + b))
    return e


@triton.jit
def _ctc_alpha_kernel(x, lse, ext, skipok, in_len, tgt_len, alpha, logz,
                      T, B, L, stride_t, stride_b,
                      IS_LOGITS: tl.constexpr, LABEL_LOOP: tl.constexpr, VITERBI: tl.constexpr,
                      BLOCK_L: tl.constexpr):
    """Grid (B,), one program per sequence, t = 0 .. T-1, BLOCK_L states per step. Reads alpha_{t-1}
    (s, s-1, s-2) back from ``alpha`` and gathers the emissions (ext -> x); writes alpha_t (L fp32 per
    frame, masked -inf beyond the sequence) and finally ``logz[b]`` (max with VITERBI)."""
    b = tl.program_id(0).to(tl.int64)
    Tb = tl.load(in_len + b)
    Sb = tl.load(tgt_len + b)
    nstates = 2 * Sb + 1
    ext_row = ext + b * L
    sk_row = skipok + b * L
    a_row = alpha + b * L  # alpha[t, b, s] at a_row + t*B*L + s
    for t32 in range(0, T):
        t = b * 0 + t32  # int64 frame index (offsets may exceed 2^31)
        for s0 in range(0, L, BLOCK_L):
            s = s0 + tl.arange(0, BLOCK_L)
            smask = s < L
            valid = (s < nstates) & ((s * 0 + t) < Tb)  # vector-shaped (interpreter masks)
            e = _emit(x, lse, t, b, ext_row, s, smask & valid, B, stride_t, stride_b, IS_LOGITS)
            if t == 0:
                a = tl.where(s < 2, e, float("-inf"))
            else:
                prev = a_row + (t - 1) * B * L
                a0 = tl.load(prev + s, mask=smask, other=float("-inf"))
                a1 = tl.load(prev + s - 1, mask=smask & (s >= 1), other=float("-inf"))
                a2 = tl.load(prev + s - 2, mask=smask & (s >= 2), other=float("-inf"))
                is_label = (s % 2) == 1
                if LABEL_LOOP:
                    ok2 = tl.load(sk_row + s, mask=smask, other=0) != 0
                else:
                    a0 = tl.where(is_label, float("-inf"), a0)
                    ok2 = is_label & (s >= 2)
                a2 = tl.where(ok2, a2, float("-inf"))
                a = _reach(_lse3(a0, a1, a2, VITERBI), e)
            a = tl.where(valid, a, float("-inf"))
            tl.store(a_row + t * B * L + s, a, mask=smask)
        tl.debug_barrier()
    # log Z from the last valid frame
    last = a_row + (tl.maximum(Tb, 1) - 1) * B * L
    fb = tl.load(last + 2 * Sb)
    fl = tl.load(last + tl.maximum(2 * Sb - 1, 0))
    fl = tl.where(Sb > 0, fl, float("-inf"))
    z = _lse3(fb, fl, float("-inf"), VITERBI)
    z = tl.where(Tb == 0, tl.where(Sb == 0, 0.0, float("-inf")), z)
    tl.store(logz + b, z)


@triton.jit
def _ctc_backtrack_kernel(x, lse, alpha, ext, skipok, in_len, tgt_len, path, T, B, L, blank, stride_t, stride_b,
                          IS_LOGITS: tl.constexpr, LABEL_LOOP: tl.constexpr):
    """Grid (B,), one scalar program per sequence, t = T-1 .. 0: reads alpha_{t-1} at s, s-1, s-2, adds the
    emission of s at t (recomputed as the forward's ``_emit``: the sums round as the forward's did) and writes
    ``path[b, t]`` (the class of the chosen state; blank on padded frames). RETURNN's tie rule: the largest sum,
    ties to s-2, then s-1, then s; at the end the last label over the final blank."""
    b = tl.program_id(0).to(tl.int64)
    Tb = tl.load(in_len + b)
    Sb = tl.load(tgt_len + b)
    a_row = alpha + b * L
    last = a_row + (tl.maximum(Tb, 1) - 1) * B * L
    fb = tl.load(last + 2 * Sb)
    fl = tl.where(Sb > 0, tl.load(last + tl.maximum(2 * Sb - 1, 0)), float("-inf"))
    s = tl.where((Sb > 0) & (fl >= fb), 2 * Sb - 1, 2 * Sb)
    for i in range(0, T):
        t = b * 0 + (T - 1 - i)
        if t >= Tb:
            tl.store(path + b * T + t, blank)
        else:
            tl.store(path + b * T + t, tl.load(ext + b * L + s).to(tl.int64))
            if t > 0:
                e = _emit(x, lse, t, b, ext + b * L, s, True, B, stride_t, stride_b, IS_LOGITS)
                prev = a_row + (t - 1) * B * L
                c0 = tl.load(prev + s) + e
                is_label = (s % 2) == 1
                if not LABEL_LOOP:
                    c0 = tl.where(is_label, float("-inf"), c0)
                c1 = tl.where(s >= 1, tl.load(prev + tl.maximum(s - 1, 0)) + e, float("-inf"))
                if LABEL_LOOP:
                    ok2 = tl.load(skipok + b * L + s) != 0
                else:
                    ok2 = is_label
                c2 = tl.where((s >= 2) & ok2, tl.load(prev + tl.maximum(s - 2, 0)) + e, float("-inf"))
                best = tl.maximum(tl.maximum(c0, c1), c2)
                live = best > float("-inf")  # (no path: stay, any index stays in range)
                step = tl.where(live & (c2 == best), 2, tl.where(live & (c1 == best), 1, 0))
                s = s - step


@triton.jit
def _ctc_beta_kernel(gam, x, lse, ext, skipok, in_len, tgt_len, alpha, logz, beta_buf,
                     T, B, L, stride_t, stride_b,
                     IS_LOGITS: tl.constexpr, LABEL_LOOP: tl.constexpr, BLOCK_L: tl.constexpr):
    """Grid (B,), one program per sequence, t = T-1 .. 0, BLOCK_L states per step (the chunked path's beta).

    Reads alpha_t (L fp32) and the frame's emissions (gathers of x), beta_{t+1} from the 2-row ping-pong
    ``beta_buf[b]``; writes beta_t there (not stored per frame) and v_t(s) = log(alpha_t(s) beta_t(s)) without
    frame t's emission into ``gam[t, b]`` (-inf off the sequence's states and frames and for infeasible
    sequences), which ``_ctc_grad_frame_kernel`` normalises per frame, as on the register path."""
    b = tl.program_id(0).to(tl.int64)
    Tb = tl.load(in_len + b)
    Sb = tl.load(tgt_len + b)
    nstates = 2 * Sb + 1
    feasible = tl.load(logz + b) > float("-inf")
    ext_row = ext + b * L
    sk_row = skipok + b * L
    bb = beta_buf + b * 2 * L
    a_row = alpha + b * L  # alpha[t, b] at a_row + t*B*L, gam[t, b] at v_row + t*B*L
    v_row = gam + b * L
    for i in range(0, T):
        t = b * 0 + (T - 1 - i)
        active = (t < Tb) & feasible
        cur = bb + (t % 2) * L
        nxt = bb + ((t + 1) % 2) * L
        for s0 in range(0, L, BLOCK_L):
            s = s0 + tl.arange(0, BLOCK_L)
            smask = s < L
            valid = tl.where(active, s < nstates, False)
            e = _emit(x, lse, t, b, ext_row, s, smask & valid, B, stride_t, stride_b, IS_LOGITS)
            # frame t + 1's beta exists only below the sequence's last frame (never read unwritten memory)
            has_next = (s * 0 + t + 1) < Tb  # as a block (a scalar mask term breaks the interpreter)
            b0 = tl.load(nxt + s, mask=smask & has_next, other=float("-inf"))
            b1 = tl.load(nxt + s + 1, mask=((s + 1) < L) & has_next, other=float("-inf"))
            b2 = tl.load(nxt + s + 2, mask=((s + 2) < L) & has_next, other=float("-inf"))
            is_label = (s % 2) == 1
            if LABEL_LOOP:
                ok2 = tl.load(sk_row + s + 2, mask=(s + 2) < L, other=0) != 0
            else:
                b0 = tl.where(is_label, float("-inf"), b0)
                ok2 = ((s + 2) % 2) == 1
            b2 = tl.where(ok2, b2, float("-inf"))
            rest = _lse3(b0, b1, b2, False)
            init = tl.where((s == 2 * Sb) | ((s == 2 * Sb - 1) & ((s * 0 + Sb) > 0)), 0.0, float("-inf"))
            # beta without frame t's emission: alpha * beta_rest never forms (-inf) - (-inf) when an
            # emission is -inf
            brest = tl.where(t == Tb - 1, init, rest)
            tl.store(cur + s, tl.where(valid, _reach(brest, e), float("-inf")), mask=smask)
            a = tl.load(a_row + t * B * L + s, mask=smask, other=float("-inf"))
            tl.store(v_row + t * B * L + s, tl.where(valid, _meet(a, brest), float("-inf")), mask=smask)
        tl.debug_barrier()


@triton.jit
def _ctc_emit_kernel(x, lse, ext, in_len, tgt_len, em, B, C, L, stride_t, stride_b,
                     IS_LOGITS: tl.constexpr, ROW_LSE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Grid (T*B,), one frame per program: ``em[t, b, s]`` = the emission of state s (log-softmax applied
    for logits from the frame's lse pair), -inf beyond the sequence's states or frames. Fully parallel:
    the gathers ext -> x leave the recursions' critical path. ROW_LSE (logits, the forward): the frame's lse
    pair is formed here first (``row_logsumexp``, BLOCK_C classes per step: the frame's C scores read once)
    and written to ``lse`` for the backward; else (logits) it is read from ``lse``."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // B
    b = pid % B
    if ROW_LSE:
        m, ls = row_logsumexp(x + t * stride_t + b * stride_b, C, BLOCK_C)
        tl.store(lse + 2 * pid, m)
        tl.store(lse + 2 * pid + 1, ls)
    elif IS_LOGITS:
        m = tl.load(lse + 2 * pid)
        ls = tl.load(lse + 2 * pid + 1)
    Tb = tl.load(in_len + b)
    nstates = 2 * tl.load(tgt_len + b) + 1
    for s0 in range(0, L, BLOCK_L):
        s = s0 + tl.arange(0, BLOCK_L)
        smask = s < L
        valid = (s < nstates) & ((s * 0 + t) < Tb)
        e = _gather(x, t, b, ext + b * L, s, smask & valid, stride_t, stride_b)
        if IS_LOGITS:
            e = (e - m) - ls  # log_softmax_at's form, from the pair in registers
        tl.store(em + pid * L + s, tl.where(valid, e, float("-inf")), mask=smask)


@triton.jit
def _shift_in(v, s, k: tl.constexpr, BLOCK_L: tl.constexpr):
    """``v[s - k]`` (k > 0: from the left) or ``v[s + |k|]`` (k < 0) in registers (``tl.gather``: a shuffle
    or an on-chip exchange, no global memory); -inf where that state is outside the block."""
    src = s - k
    inside = (src >= 0) & (src < BLOCK_L)
    return tl.where(inside, tl.gather(v, tl.minimum(tl.maximum(src, 0), BLOCK_L - 1), 0), float("-inf"))


@triton.jit
def _ctc_alpha_reg_kernel(alpha, skipok, in_len, tgt_len, logz, T, B, L,
                          LABEL_LOOP: tl.constexpr, VITERBI: tl.constexpr, BLOCK_L: tl.constexpr):
    """Grid (B,), one program per sequence holding all its states (BLOCK_L >= L) in registers, t = 0 ..
    T-1: alpha_t = lse(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2)) + em[t] with the shifts in
    registers and em[t+1] loaded one frame ahead. ``alpha`` holds the emissions ``em (T, B, L)`` on entry:
    alpha_t is written over em[t] (read a frame earlier; each value stored depends on the one read at its
    address, so the read completes first) for the backward, never re-read here; log Z from the last valid
    frame's alpha, still in registers."""
    b = tl.program_id(0).to(tl.int64)
    Tb = tl.load(in_len + b)
    Sb = tl.load(tgt_len + b)
    s = tl.arange(0, BLOCK_L)
    smask = s < L
    is_label = (s % 2) == 1
    if LABEL_LOOP:
        ok2 = tl.load(skipok + b * L + s, mask=smask, other=0) != 0
    else:
        ok2 = is_label & (s >= 2)
    row = (b * 0 + B) * L  # one frame of em / alpha (int64: B * L may pass 2^31)
    a_row = alpha + b * L
    a = tl.load(a_row + s, mask=smask, other=float("-inf"))
    a = tl.where(s < 2, a, float("-inf"))
    tl.store(a_row + s, a, mask=smask)
    e_next = tl.load(a_row + row + s, mask=smask & ((s * 0 + 1) < T), other=float("-inf"))
    for t32 in range(1, T):
        t = b * 0 + t32
        e = e_next
        e_next = tl.load(a_row + (t + 1) * row + s, mask=smask & ((s * 0 + t + 1) < T), other=float("-inf"))
        a0 = a
        if not LABEL_LOOP:
            a0 = tl.where(is_label, float("-inf"), a0)
        a1 = _shift_in(a, s, 1, BLOCK_L)
        a2 = tl.where(ok2, _shift_in(a, s, 2, BLOCK_L), float("-inf"))
        nxt = _reach(_lse3(a0, a1, a2, VITERBI), e)
        live = (s * 0 + t) < Tb
        tl.store(a_row + t * row + s, tl.where(live, nxt, float("-inf")), mask=smask)
        a = tl.where(live, nxt, a)  # past the sequence's end: keep its last frame's alpha for log Z
    # the two final states' alpha picked out by a sum over one selected lane (a max would drop a NaN)
    fb = tl.sum(tl.where(s == 2 * Sb, a, 0.0), 0)
    fl = tl.where(Sb > 0, tl.sum(tl.where(s == 2 * Sb - 1, a, 0.0), 0), float("-inf"))
    z = _lse3(fb, fl, float("-inf"), VITERBI)
    z = tl.where(Tb == 0, tl.where(Sb == 0, 0.0, float("-inf")), z)
    tl.store(logz + b, z)


@triton.jit
def _ctc_beta_reg_kernel(em, skipok, in_len, tgt_len, alpha, logz, T, B, L,
                         LABEL_LOOP: tl.constexpr, BLOCK_L: tl.constexpr):
    """Grid (B,), one program per sequence with all its states in registers, t = T-1 .. 0: beta in
    registers (shifts by 1 and 2 from the right via ``tl.gather``), em[t-1] and alpha_{t-1} loaded one frame
    ahead (neither depends on the recursion). Overwrites ``em[t]`` (already read) with v_t(s) = alpha_t(s) +
    beta_t(s) without frame t's emission (log space; -inf off the sequence's states and frames and for
    infeasible sequences), which ``_ctc_grad_frame_kernel`` normalises per frame. No beta is stored."""
    b = tl.program_id(0).to(tl.int64)
    Tb = tl.load(in_len + b)
    Sb = tl.load(tgt_len + b)
    s = tl.arange(0, BLOCK_L)
    feasible = tl.load(logz + b + s * 0) > float("-inf")  # as a block (scalar mask terms break the interpreter)
    smask = s < L
    is_label = (s % 2) == 1
    if LABEL_LOOP:
        ok2 = tl.load(skipok + b * L + s + 2, mask=(s + 2) < L, other=0) != 0  # s -> s+2 allowed
    else:
        ok2 = ((s + 2) % 2) == 1
    init = tl.where((s == 2 * Sb) | ((s == 2 * Sb - 1) & ((s * 0 + Sb) > 0)), 0.0, float("-inf"))
    row = (b * 0 + B) * L  # int64
    e_row = em + b * L
    a_row = alpha + b * L
    bt = tl.full([BLOCK_L], float("-inf"), tl.float32)  # beta_{t+1} (with its emission)
    tl0 = b * 0 + (T - 1)  # int64 offsets (T*B*L may exceed 2^31)
    e_nx = tl.load(e_row + tl0 * row + s, mask=smask, other=float("-inf"))
    a_nx = tl.load(a_row + tl0 * row + s, mask=smask, other=float("-inf"))
    for i in range(0, T):
        t = b * 0 + (T - 1 - i)
        e = e_nx
        a = a_nx
        more = (s * 0 + t) > 0
        e_nx = tl.load(e_row + (t - 1) * row + s, mask=smask & more, other=float("-inf"))
        a_nx = tl.load(a_row + (t - 1) * row + s, mask=smask & more, other=float("-inf"))
        b0 = bt
        if not LABEL_LOOP:
            b0 = tl.where(is_label, float("-inf"), b0)
        b1 = _shift_in(bt, s, -1, BLOCK_L)
        b2 = tl.where(ok2, _shift_in(bt, s, -2, BLOCK_L), float("-inf"))
        rest = tl.where((s * 0 + t) == Tb - 1, init, _lse3(b0, b1, b2, False))
        live = ((s * 0 + t) < Tb) & (s < 2 * Sb + 1)
        bt = tl.where(live, _reach(rest, e), float("-inf"))
        # log(alpha_t beta_t) without frame t's emission; normalised by the parallel gradient pass (no
        # block-wide reduction on this loop's critical path)
        tl.store(e_row + t * row + s, tl.where(live & feasible, _meet(a, rest), float("-inf")), mask=smask)


@triton.jit
def _label_step(grow, xrow, lrow, vrow, order, seg_last, seg_first, ext, b, L, S, Sb, k0, mx, tot, g, carry, carry_lo,
                SOFTMAX: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK_S: tl.constexpr):
    """A frame's label classes k0 .. k0 + BLOCK_S - 1 in label-sorted order: the cumulative sum of their states'
    gamma (``carry``: the sum before k0), each class's value its run's end minus the value before its run's start
    (``carry_lo`` for a run open at k0); stores -g * that (+ g * softmax) at the run's end (one writer per class).
    Returns the (cumulative sum, value before the open run's start) at the step's last position."""
    k = k0 + tl.arange(0, BLOCK_S)
    km = k < S
    o = tl.load(order + b * S + k, mask=km, other=0)
    gv = tl.exp(tl.load(vrow + 2 * o + 1, mask=km, other=float("-inf")) - mx) / tot  # 0 off the states
    cs = tl.cumsum(gv, axis=0) + carry
    f = tl.load(seg_first + b * S + k, mask=km, other=0) - k0  # the run's start, from the step's start
    lo = tl.where(f > 0, tl.gather(cs, tl.maximum(f - 1, 0), 0), tl.where(f == 0, carry, carry_lo))
    cls = tl.load(ext + b * L + 2 * o + 1, mask=km, other=-1)
    is_end = (tl.load(seg_last + b * S + k, mask=km, other=0) != 0) & km & (k < Sb) & (cls >= 0)
    _class_grad(grow, xrow, lrow, cls, cs - lo, g, is_end, SOFTMAX, RNE_BF16)
    last = k == k0 + BLOCK_S - 1
    return tl.max(tl.where(last, cs, float("-inf")), 0), tl.max(tl.where(last, lo, float("-inf")), 0)


@triton.jit
def _ctc_grad_frame_kernel(grad, grad_loss, x, lse, gam, ext, order, seg_last, seg_first, in_len, tgt_len, logz,
                           path, T, B, C, L, S, blank, stride_t, stride_b, stride_gt, stride_gb, stride_go,
                           SOFTMAX: tl.constexpr, VITERBI: tl.constexpr, RNE_BF16: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
                           STEPS: tl.constexpr):
    """Grid (T*B,), one frame per program (fully parallel; both paths). Writes the frame's gradient row:
    ``g * softmax`` (or 0) everywhere, then (after a barrier: the same program's later stores win) the target's
    classes with their final value: blank = -g * (sum of the blank states' gamma), each label class = -g * (the
    sum of its states' gamma, ``_label_step``), plus ``g * softmax`` of that class with SOFTMAX. The frame's
    states ``gam[t, b]`` (v = log(alpha beta) without the emission) and labels in one block (BLOCK_L >= L,
    BLOCK_S >= S), or with STEPS also in further BLOCK_L / BLOCK_S steps (the chunked path). VITERBI: the
    one-hot class ``path[b, t]`` instead. Padded frames / infeasible sequences: 0."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // B
    b = pid % B
    lz = tl.load(logz + b)
    live = t < tl.load(in_len + b)
    active = live & (lz > float("-inf"))
    g = tl.load(grad_loss + b * stride_go).to(tl.float32)
    g = tl.where(active, g, 0.0)
    xrow = x + t * stride_t + b * stride_b
    grow = grad + t * stride_gt + b * stride_gb
    lrow = lse + 2 * pid
    # a NaN loss (NaN input): the sequence's valid frames get NaN throughout, as PyTorch's CTC
    _dense_row(grow, xrow, lrow, g, active, live & (lz != lz), C, SOFTMAX, RNE_BF16, BLOCK_C)
    tl.debug_barrier()
    if active:
        if VITERBI:
            c = tl.load(path + b * T + t)
            _class_grad(grow, xrow, lrow, c, 1.0, g, True, SOFTMAX, RNE_BF16)
        else:
            # the frame's posteriors gamma(s) = exp(v(s) - max) / sum (its own normaliser: exact and finite for
            # extreme scores)
            vrow = gam + pid * L
            sl = tl.arange(0, BLOCK_L)
            v = tl.load(vrow + sl, mask=sl < L, other=float("-inf"))
            mx = tl.max(v, 0)
            if STEPS:
                for s0 in range(BLOCK_L, L, BLOCK_L):
                    mx = tl.maximum(mx, tl.max(tl.load(vrow + s0 + sl, mask=(s0 + sl) < L, other=float("-inf")), 0))
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            w = tl.exp(v - mx)
            tot = tl.sum(w, 0)
            gblank = tl.sum(tl.where((sl % 2) == 0, w, 0.0), 0)
            if STEPS:
                for s0 in range(BLOCK_L, L, BLOCK_L):
                    ws = tl.exp(tl.load(vrow + s0 + sl, mask=(s0 + sl) < L, other=float("-inf")) - mx)
                    tot += tl.sum(ws, 0)
                    gblank += tl.sum(tl.where(((s0 + sl) % 2) == 0, ws, 0.0), 0)
            tot = tl.where(tot > 0, tot, 1.0)
            _class_grad(grow, xrow, lrow, blank, gblank / tot, g, True, SOFTMAX, RNE_BF16)
            Sb = tl.load(tgt_len + b)
            carry, carry_lo = _label_step(grow, xrow, lrow, vrow, order, seg_last, seg_first, ext, b, L, S, Sb, 0, mx,
                                          tot, g, 0.0, 0.0, SOFTMAX, RNE_BF16, BLOCK_S)
            if STEPS:
                for k0 in range(BLOCK_S, S, BLOCK_S):
                    carry, carry_lo = _label_step(grow, xrow, lrow, vrow, order, seg_last, seg_first, ext, b, L, S,
                                                  Sb, k0, mx, tot, g, carry, carry_lo, SOFTMAX, RNE_BF16, BLOCK_S)


@triton.jit
def _dense_row(grow, xrow, lrow, g, active, nan_row, C, SOFTMAX: tl.constexpr, RNE_BF16: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """One frame's whole gradient row: ``g * softmax`` (SOFTMAX, on active frames) or 0; NaN for ``nan_row``."""
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cm = cols < C
        d = tl.zeros([BLOCK_C], tl.float32)
        if SOFTMAX:
            xv = tl.load(xrow + cols, mask=cm, other=0.0).to(tl.float32)
            d = tl.where(active, g * tl.exp(log_softmax_at(xv, lrow)), 0.0)
        d = tl.where(nan_row, float("nan"), d)
        if RNE_BF16:
            d = round_to_bf16(d)
        tl.store(grow + cols, d, mask=cm)


# the register path holds a sequence's 2S+1 states in one program: up to REG_MAX_L states (S <= 2047; 16 warps
# at 4096: 8 states per thread); longer targets take the chunked kernels above
REG_MAX_L = 4096


def _blocks(L, C):
    """(BLOCK_L, BLOCK_C): the chunked recursions' states per step, classes per step of a frame's row."""
    cap = 4096 if not interpreting() else 1 << 16
    bl = min(triton.next_power_of_2(max(L, 16)), 1024 if not interpreting() else cap)
    bc = min(triton.next_power_of_2(max(C, 16)), 4096 if not interpreting() else cap)
    return bl, bc


def _frame_blocks(L, S):
    """(BLOCK_L, BLOCK_S) of the gradient-row pass: a frame's states and labels in one block on the register
    path (L <= REG_MAX_L: S <= 2047), in steps of 1024 states / 512 labels beyond (without spills)."""
    if L <= REG_MAX_L:
        return triton.next_power_of_2(max(L, 16)), triton.next_power_of_2(max(S, 16))
    return 1024, 512


def _reg_block(L):
    """(BLOCK_L >= L, num_warps) of the register path: about 8 states per thread, 1 to 16 warps."""
    bl = triton.next_power_of_2(max(L, 32))
    return bl, max(1, min(16, bl // 256))


def row_lse(x, out):
    """``out (T, B, 2)`` fp32 = each frame's (max, log sum exp(x - max)) of ``x (T, B, C)``."""
    T, B, C = x.shape
    if T * B == 0:
        return
    _, bc = _blocks(1, C)
    _row_lse_kernel[(T * B,)](x, out, B, C, x.stride(0), x.stride(1), BLOCK_C=bc, num_warps=4)


def _emissions(x, lse, ext, input_lengths, target_lengths, row_lse=False):
    """em (T, B, L) fp32: every frame's state emissions, one parallel pass (-inf off the sequence). With
    ``row_lse`` the same pass first fills ``lse`` (as ``row_lse``: same blocks and warps, the same values)."""
    import torch
    T, B, C = x.shape
    L = ext.shape[1]
    em = torch.empty(T, B, L, dtype=torch.float32, device=x.device)
    bl, bc = _blocks(L, C)
    _ctc_emit_kernel[(T * B,)](x, lse if lse is not None else x, ext, input_lengths, target_lengths, em, B, C, L,
                               x.stride(0), x.stride(1), IS_LOGITS=lse is not None, ROW_LSE=bool(row_lse),
                               BLOCK_C=bc if row_lse else 16, BLOCK_L=bl,  # (BLOCK_C unused without row_lse)
                               num_warps=4 if row_lse else max(1, min(4, bl // 256)))
    return em


def ctc_alpha(x, lse, ext, skip, input_lengths, target_lengths, label_loop, viterbi):
    """alpha (T, B, L) fp32 and log Z (B,) fp32; for logits it first fills ``lse (T, B, 2)`` with each frame's
    (max, log sum exp) pair (``row_lse``; None: log-probs input). ``ext (B, L)`` int32 state classes (-1: a
    label out of range: no path), ``skip (B, L)`` int8 (s-2 -> s allowed), from the caller."""
    import torch
    T, B, C = x.shape
    L = ext.shape[1]
    logz = torch.empty(B, dtype=torch.float32, device=x.device)
    if T * B and L <= REG_MAX_L:
        # one pass forms the lse pairs and gathers the emissions; alpha is written over the emissions, frame by
        # frame: one (T, B, L) buffer in all
        alpha = _emissions(x, lse, ext, input_lengths, target_lengths, row_lse=lse is not None)
        bl, nw = _reg_block(L)
        _ctc_alpha_reg_kernel[(B,)](alpha, skip, input_lengths, target_lengths, logz, T, B, L,
                                    LABEL_LOOP=bool(label_loop), VITERBI=bool(viterbi), BLOCK_L=bl, num_warps=nw)
        return alpha, logz
    alpha = torch.empty(T, B, L, dtype=torch.float32, device=x.device)
    if lse is not None:
        row_lse(x, lse)
    if B == 0:
        return alpha, logz
    if T == 0:
        logz.copy_(torch.where(target_lengths == 0, 0.0, float("-inf")))
        return alpha, logz
    bl, _ = _blocks(L, C)
    _ctc_alpha_kernel[(B,)](x, lse if lse is not None else x, ext, skip, input_lengths, target_lengths, alpha, logz,
                            T, B, L, x.stride(0), x.stride(1), IS_LOGITS=lse is not None,
                            LABEL_LOOP=bool(label_loop), VITERBI=bool(viterbi), BLOCK_L=bl, num_warps=4)
    return alpha, logz


def ctc_backtrack(x, lse, alpha, ext, skip, input_lengths, target_lengths, blank, label_loop):
    """Viterbi state path as class ids (B, T) int64 (blank on padded frames) from the Viterbi alpha of ``x``
    (``lse``: the forward's frame pairs for logits, else None)."""
    import torch
    T, B, L = alpha.shape
    path = torch.empty(B, T, dtype=torch.int64, device=alpha.device)
    if B == 0 or T == 0:
        return path.fill_(blank)
    _ctc_backtrack_kernel[(B,)](x, lse if lse is not None else x, alpha, ext, skip, input_lengths, target_lengths,
                                path, T, B, L, blank, x.stride(0), x.stride(1), IS_LOGITS=lse is not None,
                                LABEL_LOOP=bool(label_loop), num_warps=1)
    return path


def ctc_grad(grad, grad_loss, x, lse, targets, ext, skip, input_lengths, target_lengths, alpha, loss, blank,
             label_loop, viterbi, softmax):
    """Write d loss_b / d x (times grad_loss[b]) into ``grad`` (T, B, C): ``softmax - gamma`` with
    ``softmax`` (``lse`` given), ``-gamma`` otherwise (log-probs input, or the posteriors)."""
    import torch
    T, B, C = x.shape
    if T * B == 0:
        return
    S = targets.shape[1]
    L = 2 * S + 1
    logz = (-loss).float().contiguous()
    # label-sorted order of each target (padding last), group boundaries: O(B*S) on device
    pos = torch.arange(S, device=x.device)
    key = torch.where(pos[None, :] < target_lengths[:, None], targets, torch.iinfo(torch.int64).max)
    skey, order = torch.sort(key, dim=1, stable=True)
    seg_last = torch.ones(B, S, dtype=torch.int8, device=x.device)
    if S > 1:
        seg_last[:, :-1] = (skey[:, 1:] != skey[:, :-1]).to(torch.int8)
    is_first = torch.ones(B, S, dtype=torch.bool, device=x.device)
    if S > 1:
        is_first[:, 1:] = skey[:, 1:] != skey[:, :-1]
    seg_first = torch.cummax(torch.where(is_first, pos[None, :].expand(B, S), 0), dim=1).values
    path = ctc_backtrack(x, lse, alpha, ext, skip, input_lengths, target_lengths, blank, label_loop) if viterbi \
        else ext
    rne = rne_bf16(grad)
    bl, bc = _blocks(L, C)
    if viterbi:
        gam = alpha  # not read
    elif L <= REG_MAX_L:
        # log(alpha beta) per state over the emissions buffer, frame by frame, with beta in registers
        gam = _emissions(x, lse, ext, input_lengths, target_lengths)
        rbl, nw = _reg_block(L)
        _ctc_beta_reg_kernel[(B,)](gam, skip, input_lengths, target_lengths, alpha, logz, T, B, L,
                                   LABEL_LOOP=bool(label_loop), BLOCK_L=rbl, num_warps=nw)
    else:
        # the same per state, beta in a 2-row scratch per sequence, BLOCK_L states per step
        gam = torch.empty(T, B, L, dtype=torch.float32, device=x.device)
        beta_buf = torch.empty(B, 2, L, dtype=torch.float32, device=x.device)
        _ctc_beta_kernel[(B,)](gam, x, lse if lse is not None else x, ext, skip, input_lengths, target_lengths,
                               alpha, logz, beta_buf, T, B, L, x.stride(0), x.stride(1), IS_LOGITS=lse is not None,
                               LABEL_LOOP=bool(label_loop), BLOCK_L=bl, num_warps=8)
    # the gradient rows in one fully parallel pass
    gbl, gbs = _frame_blocks(L, S)
    _ctc_grad_frame_kernel[(T * B,)](grad, grad_loss, x, lse if lse is not None else x, gam, ext,
                                     order.int().contiguous(), seg_last, seg_first.int().contiguous(),
                                     input_lengths, target_lengths, logz, path, T, B, C, L, S, blank,
                                     x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
                                     grad_loss.stride(0), SOFTMAX=bool(softmax), VITERBI=bool(viterbi),
                                     RNE_BF16=rne, BLOCK_C=bc, BLOCK_L=gbl, BLOCK_S=gbs, STEPS=L > gbl or S > gbs,
                                     num_warps=4 if max(bc, gbl) <= 2048 else 8)
