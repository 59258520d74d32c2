"""Triton kernels for the fused softmax cross-entropy family.

Semantics (shared with ``tri_losses/_torch/cross_entropy.py``, whose docstring derives them): per row
the forward forms ``lse``, the row loss and three coefficients ``c1, c2, c3`` such that the gradient
is ``g * (c1*p_j - c2*a_j - c3*[j == y]) * softcap'(x_j)`` (+ ``g_lse * p_j``), with ``a_j`` the target
weight of class j, and lse's low part ``lo`` (``coef`` is (N, 4): c1, c2, c3, lo), so that the backward
forms ``p_j = exp((x_j - lse) - lo)``, as precise as ``exp((x_j - m) - log s)`` from the row max ``m``.
The backward re-reads the logits once and writes the gradient once.

Bytes for forward + backward with N rows, V classes, s bytes per logit (sparse targets):
  forward : reads N*V*s (one pass, online log-sum-exp), writes 24*N (loss, lse, 4 coefs)
  backward: reads N*V*s + 32*N, writes N*V*s (gradient; into the logits with inplace_backward)
  total   : 2 reads + 1 write of the logits: the floor when a row does not stay on chip between
            the two autograd calls. Dense targets add one N*V read of the target per pass.
Training fast path (one scalar upstream): the forward's pass and the gradient pass run back to back on
each row, so that the second read of a row can hit L2: 1 read + 1 write of the logits from memory at best
(the gradient of the reduced loss for an upstream of 1). Rows shorter than ``SPLIT_ROW_BYTES`` get one
program each (``_ce_fwd_grad_kernel``); longer rows (logits with class ids) are read in pieces by several
programs, the last of which combines the pieces' sums and writes the row's gradient
(``_ce_fwd_grad_split_kernel``), so a row's second read follows its first at once. The backward (``_ce_scale_kernel``) multiplies it by the upstream scalar in
place, read on device, and does nothing when the scalar is 1; otherwise it adds 1 read + 1 write.

Flags (constexpr): ``HAS_WEIGHT`` (class weights), ``DENSE`` (probability targets), ``SMOOTH``
(0 none, 1 torch, 2 others, 3 gaussian), ``INPUT`` (0 logits, 1 log-probs, 2 probs), ``HAS_FOCAL``,
``HAS_SOFTCAP``, ``HAS_ZLOSS``, ``HAS_BOUND``, ``HAS_LSE_GRAD``, ``PARTIAL`` (forward: per-row sums of one
shard of the classes, for vocab-parallel; ``class_offset`` and ``V`` place the shard's columns),
``IN_PLACE`` (the fast path's scale: a no-op when the upstream is 1). Row offsets are int64, so N*V may
exceed 2^31. -inf logits are handled (masked vocabulary); +inf/NaN propagate to the row's loss as in
PyTorch. Targets outside [0, V) that are not ``ignore_index`` give a NaN row (no out-of-bounds read).
"""
import triton
import triton.language as tl

from ._math import expm1, rne_bf16, round_to_bf16, tanh

# the training fast path's split kernel: rows of at least SPLIT_ROW_BYTES (0: never) in pieces of
# SPLIT_PIECE columns (``split_pieces``)
SPLIT_ROW_BYTES = 1 << 17
SPLIT_PIECE = 32768

PROB_EPS = tl.constexpr(1e-20)
GAUSS_NORM = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)


@triton.jit
def load_target(ptr, mask, ignore_index, C):
    """Class ids, range-checked in their own width (int64 ids are never truncated first).

    Returns ``(y, ignored, bad)``: ``y`` int32 is -1 (matching no column) on ignored rows and on
    out-of-range ids (``bad``: those rows get NaN)."""
    y64 = tl.load(ptr, mask=mask, other=ignore_index).to(tl.int64)
    ignored = y64 == ignore_index
    bad = ((y64 < 0) | (y64 >= C)) & (y64 != ignore_index)
    y = tl.where(ignored | bad, -1, y64).to(tl.int32)
    return y, ignored, bad


@triton.jit
def local_target(y, class_offset, C):
    """A global class id from :func:`load_target` as a column of this row's ``C`` columns (classes
    ``class_offset + [0, C)``; -1 stays -1), and whether it is one of them."""
    y = tl.where(y >= 0, y - class_offset, -1)
    return y, (y >= 0) & (y < C)


@triton.jit
def smooth_weights(C, smoothing, SMOOTH: tl.constexpr):
    """``(on, off)``: the class-id target distribution of the modes SMOOTH 0 (none), 1 (torch) and 2
    (others) over C classes before class weights: ``on`` at the target, ``off`` at every other class."""
    if SMOOTH == 0:
        return 1.0, 0.0
    elif SMOOTH == 1:
        return 1.0 - smoothing + smoothing / C, smoothing / C
    else:
        return 1.0 - smoothing, smoothing / (C - 1)


@triton.jit
def ce_target_weights(cols, col_mask, y, w, q, C, smoothing, HAS_WEIGHT: tl.constexpr, DENSE: tl.constexpr,
                      SMOOTH: tl.constexpr):
    """a_c for one block of columns: class weight x (smoothed) target distribution (fp32).

    ``w``/``q`` are the loaded class-weight / dense-target blocks (ignored unless HAS_WEIGHT / DENSE).
    The gaussian's exponent multiplies by ``1 / (2 sigma^2)`` rather than dividing each element (an IEEE
    division per element costs ~30 registers per thread on sm_90; the exponent may differ in its last bit).
    """
    if DENSE:
        a = q
        if SMOOTH == 1:
            a = (1.0 - smoothing) * a + smoothing / C
    else:
        if SMOOTH < 3:
            on, off = smooth_weights(C, smoothing, SMOOTH)
            a = tl.where(cols == y, on, off)
        else:
            sigma = 1.0 - smoothing
            d = (cols - y).to(tl.float32)
            a = tl.exp(-(d * d) * (0.5 / (sigma * sigma))) * (GAUSS_NORM / sigma)
    if HAS_WEIGHT:
        if DENSE:
            a = a * w  # PyTorch: sum_c w_c q_c log p_c, a NaN/inf w_c reaches every row
        else:
            a = tl.where(a != 0, a * w, 0.0)  # class ids: w_c only where the target puts mass (as PyTorch)
    return tl.where(col_mask, a, 0.0)


@triton.jit
def ce_row_finish_rel(A, sum_atm, m_safe, log_s, t_ym, gamma, z_loss, upper_bound, INPUT: tl.constexpr,
                      HAS_FOCAL: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_BOUND: tl.constexpr):
    """Per-row scalars from the streamed sums: (loss, lse, c1, c2, c3), with the logit sums taken relative
    to the row max ``m_safe`` (0 for an all -inf row): ``sum_atm = sum_c a_c (t_c - m)`` and ``t_ym = t_y - m``
    (``t``: the soft-capped logit; for log-probs and probs they are the plain ``sum_c a_c t_c`` and ``t_y``,
    the probability itself for probs). No ``x - lse`` is formed, so the loss and the focal factor keep
    fp32 precision at large |x|."""
    if INPUT == 0:
        lse = m_safe + log_s
        L = A * log_s - sum_atm
    else:
        lse = 0.0 * A
        L = -sum_atm
    F = 1.0 + 0.0 * A
    G = 0.0 * A
    if HAS_FOCAL:
        if INPUT == 0:
            log_py = t_ym - log_s
            one_m = -expm1(log_py)
            py = tl.exp(log_py)
        elif INPUT == 1:
            one_m = -expm1(t_ym)
            py = tl.exp(t_ym)
        else:
            one_m = 1.0 - t_ym
            py = 1.0 + 0.0 * A
        pos = one_m > 0
        log_om = tl.log(tl.where(pos, one_m, 1.0))
        F = tl.where(pos, tl.exp(gamma * log_om), tl.where(one_m == 0, 0.0, float("nan")))
        # at p_y = 1: (1 - p_y)^(gamma - 1) is 1 for gamma = 1 (the focal factor's gradient -L stays), 0 above;
        # below 1 it is infinite (the limit without smoothing, L = 0, is 0: kept)
        pyL = tl.where(py == 0.0, 0.0, py * L)  # (p_y = 0 at a -inf target: p_y L -> 0, not 0 * inf)
        G = tl.where(pos, gamma * tl.exp((gamma - 1.0) * log_om) * pyL,
                     tl.where(one_m == 0, tl.where(gamma == 1.0, pyL, 0.0), 0.0))
        F = tl.where(one_m != one_m, float("nan"), F)
    total = F * L
    c1 = 0.0 * A
    if INPUT == 0:
        c1 = F * A + G
        if HAS_ZLOSS:
            total += z_loss * lse * lse
            c1 += 2.0 * z_loss * lse
    if HAS_BOUND:
        total = tl.where(total > upper_bound, upper_bound, total)  # min that keeps NaN (as PyTorch)
    return total, lse, c1, F, G


@triton.jit
def lse_low_part(m_safe, log_s):
    """``lo`` with ``m + log_s = fl(m + log_s) + lo`` exactly (Knuth's two-sum), 0 where the sum is not
    finite: the backward forms ``p = exp((x - lse) - lo)``, as precise as ``exp((x - m) - log_s)``."""
    hi = m_safe + log_s
    bb = hi - m_safe
    lo = (m_safe - (hi - bb)) + (log_s - bb)
    return tl.where(lo == lo, lo, 0.0)


@triton.jit
def ce_row_sums(x_row, t_ptr, weight, row, N, C, class_offset, V, ignore_index, smoothing, softcap,
                HAS_WEIGHT: tl.constexpr, DENSE: tl.constexpr, SMOOTH: tl.constexpr, INPUT: tl.constexpr,
                HAS_FOCAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ONEHOT: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row's streamed sums (the forward's pass over the logits at ``x_row``; ``t_ptr``: the row's
    class id, or its dense target row): ``(m_safe, s, A, sum_at, t_y, y, owned, ignored, bad)`` with
    ``sum_at = sum_c a_c (t_c - m_safe)`` (relative to the row max for logits) and ``y`` the target's
    column here (-1: none; see :func:`load_target`, :func:`local_target`).

    Unsmoothed class-id targets read ``x_y`` with one scalar load (no per-column target weights);
    with log-prob/prob input they then need no pass over the row at all."""
    if DENSE:
        y = (row * 0 - 1).to(tl.int32)  # no class id (a tensor: it is returned)
        ignored = row < 0  # always False, as a tensor (compiled Triton wants tensor conditions)
        bad = row < 0
        owned = row < 0
    else:
        y, ignored, bad = load_target(t_ptr, row < N, ignore_index, V)
        y, owned = local_target(y, class_offset, C)
    m = -float("inf")
    m_safe = 0.0
    s = 0.0
    A = 0.0
    sum_at = 0.0  # sum_c a_c (t_c - m_safe) over the columns seen (logits: relative to the running max)
    t_y = 0.0
    if ONEHOT:
        # a = w_y * onehot(y): one scalar load of x_y instead of per-column target weights.
        yc = tl.minimum(tl.maximum(y, 0), C - 1)
        xy = tl.load(x_row + yc, mask=owned, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            xy = softcap * tanh(xy / softcap)
        ty = tl.log(tl.maximum(xy, PROB_EPS, propagate_nan=tl.PropagateNan.ALL)) if INPUT == 2 else xy
        A = tl.where(owned, 1.0, 0.0)
        if HAS_WEIGHT:
            A = A * tl.load(weight + yc, mask=owned, other=0.0).to(tl.float32)
        sum_at = tl.where(A != 0, A * ty, 0.0)
        t_y = xy if INPUT == 2 else ty
    if INPUT == 0 or not ONEHOT:
        for start in range(0, C, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            cm = cols < C
            x = tl.load(x_row + cols, mask=cm, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                x = tl.where(cm, softcap * tanh(x / softcap), float("-inf"))  # keep padding at -inf
            if INPUT == 0:
                m_new = tl.maximum(m, tl.max(x, axis=0))
                m_new_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                s = s * tl.exp(m - m_new_safe) + tl.sum(tl.exp(x - m_new_safe), axis=0)
                if not ONEHOT:  # re-base the sum on the new max: a_c (t_c - m') = a_c (t_c - m) - a_c (m' - m)
                    sum_at -= tl.where(A != 0, A * (m_new_safe - m_safe), 0.0)
                m = m_new
                m_safe = m_new_safe
            if not ONEHOT:
                w = 0.0
                q = 0.0
                if HAS_WEIGHT:
                    w = tl.load(weight + cols, mask=cm, other=0.0).to(tl.float32)
                if DENSE:
                    q = tl.load(t_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                a = ce_target_weights(cols, cm, y, w, q, V, smoothing, HAS_WEIGHT, DENSE, SMOOTH)
                if INPUT == 2:
                    t = tl.log(tl.maximum(x, PROB_EPS, propagate_nan=tl.PropagateNan.ALL))
                else:
                    t = x
                A += tl.sum(a, axis=0)
                sum_at += tl.sum(tl.where(a != 0, a * (t - m_safe), 0.0), axis=0)
                if HAS_FOCAL:
                    ty_src = x if INPUT == 2 else t
                    t_y += tl.sum(tl.where(cols == y, ty_src, 0.0), axis=0)
    if ONEHOT:
        if INPUT == 0:
            sum_at = tl.where(A != 0, A * (t_y - m_safe), 0.0)
    return m_safe, s, A, sum_at, t_y, y, owned, ignored, bad


@triton.jit
def ce_row_coefs(m_safe, s, A, sum_at, t_ym, ignored, bad, gamma, z_loss, upper_bound, INPUT: tl.constexpr,
                 HAS_FOCAL: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_BOUND: tl.constexpr):
    """The row's ``(loss, lse, c1, c2, c3, lo)`` from :func:`ce_row_sums` (``t_ym``: its ``t_y - m_safe``):
    0 on ignored rows, NaN on rows with an out-of-range class id (``lse`` and its low part ``lo`` as
    computed)."""
    log_s = tl.log(s)
    total, lse, c1, c2, c3 = ce_row_finish_rel(A, sum_at, m_safe, log_s, t_ym, gamma, z_loss, upper_bound,
                                               INPUT, HAS_FOCAL, HAS_ZLOSS, HAS_BOUND)
    nan = float("nan")
    total = tl.where(ignored, 0.0, tl.where(bad, nan, total))
    c1 = tl.where(ignored, 0.0, tl.where(bad, nan, c1))
    c2 = tl.where(ignored, 0.0, tl.where(bad, nan, c2))
    c3 = tl.where(ignored, 0.0, tl.where(bad, nan, c3))
    return total, lse, c1, c2, c3, lse_low_part(m_safe, log_s)


@triton.jit
def _ce_fwd_kernel(
    # data
    logits, target, weight, loss, lse_out, coef,
    # shapes and strides (V: the class count of the whole row, of which this row holds columns
    # class_offset + [0, C); V = C and class_offset = 0 unless the classes are split over ranks)
    N, C, stride_x, stride_t, class_offset, V,
    # options
    ignore_index, smoothing, gamma, z_loss, softcap, upper_bound,
    # flags
    HAS_WEIGHT: tl.constexpr, DENSE: tl.constexpr, SMOOTH: tl.constexpr, INPUT: tl.constexpr,
    HAS_FOCAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_BOUND: tl.constexpr,
    ONEHOT: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Forward: grid ``(N,)``, one program per row; a ``(BLOCK_V,)`` tile of columns per loop step
    (``cdiv(C, BLOCK_V)`` steps), fp32 accumulators.

    Reads the row's logits once (plus its class id, or its dense target row, and the class weights),
    streaming an online max/sum-exp (logits only), ``A = sum a_c``, ``sum a_c (t_c - m)`` (kept relative
    to the running max ``m``) and ``t_y`` (:func:`ce_row_sums`). Writes ``loss[row]``, ``lse_out[row]``
    and ``coef[row, 0:4]`` = (c1, c2, c3, lse's low part): 24 bytes per row.

    ``PARTIAL``: the row's columns are one shard of the classes; instead of finishing, writes the sums
    ``coef[row, 0:5]`` = (m, s, A, sum a_c (t_c - m), t_y - m (0 unless y is a column here)), which
    combine over the shards (``loss`` and ``lse_out`` are not written).
    """
    row = tl.program_id(0).to(tl.int64)
    m_safe, s, A, sum_at, t_y, y, owned, ignored, bad = ce_row_sums(
        logits + row * stride_x, target + row * stride_t, weight, row, N, C, class_offset, V, ignore_index,
        smoothing, softcap, HAS_WEIGHT, DENSE, SMOOTH, INPUT, HAS_FOCAL, HAS_SOFTCAP, ONEHOT, BLOCK_V)
    if PARTIAL:
        tl.store(coef + row * 5, m_safe)
        tl.store(coef + row * 5 + 1, s)
        tl.store(coef + row * 5 + 2, tl.where(ignored, 0.0, A))  # ignored rows: no target weights
        tl.store(coef + row * 5 + 3, tl.where(ignored, 0.0, sum_at))
        tl.store(coef + row * 5 + 4, tl.where(owned, t_y - m_safe, 0.0))
        return
    total, lse, c1, c2, c3, lo = ce_row_coefs(m_safe, s, A, sum_at, t_y - m_safe, ignored, bad, gamma, z_loss,
                                              upper_bound, INPUT, HAS_FOCAL, HAS_ZLOSS, HAS_BOUND)
    tl.store(loss + row, total)
    tl.store(lse_out + row, lse)
    tl.store(coef + row * 4, c1)
    tl.store(coef + row * 4 + 1, c2)
    tl.store(coef + row * 4 + 2, c3)
    tl.store(coef + row * 4 + 3, lo)


@triton.jit
def _ce_bwd_kernel(
    # data
    dlogits, logits, target, weight, lse, coef, grad_loss, grad_lse,
    # shapes and strides (class_offset, V: as in the forward)
    N, C, stride_dx, stride_x, stride_t, stride_g, stride_gl, class_offset, V,
    # options (grad_max: the output dtype's largest finite value)
    ignore_index, smoothing, softcap, grad_max,
    # flags
    HAS_WEIGHT: tl.constexpr, DENSE: tl.constexpr, SMOOTH: tl.constexpr, INPUT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_LSE_GRAD: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK_V: tl.constexpr,
    TILES: tl.constexpr,
):
    """Backward: grid ``(N, cdiv(V, TILES * BLOCK_V))``; a program takes ``TILES`` consecutive
    ``(BLOCK_V,)`` tiles of one row in a loop (fewer, larger programs: 8 per row at V = 256k).

    Reads the row's class id, ``lse``, ``coef[row, 0:4]`` and upstream gradients once, then per tile
    the ``logits`` (and the dense target / class weights when used) once; writes each tile of
    ``dlogits`` once (may alias ``logits``: each element is read before it is written by the same
    program). ``grad_loss``/``grad_lse`` may be stride-0 (expanded scalars).
    """
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * (TILES * BLOCK_V)
    if DENSE:
        y = -1
        ignored = row < 0
    else:
        y, ignored, _ = load_target(target + row * stride_t, row < N, ignore_index, V)
        y, _ = local_target(y, class_offset, C)
    c1 = tl.load(coef + row * 4)
    c2 = tl.load(coef + row * 4 + 1)
    c3 = tl.load(coef + row * 4 + 2)
    lse_hi = tl.load(lse + row)
    lse_lo = tl.load(coef + row * 4 + 3)
    g = tl.load(grad_loss + row * stride_g).to(tl.float32)
    g_lse = 0.0
    if HAS_LSE_GRAD:
        g_lse = tl.load(grad_lse + row * stride_gl).to(tl.float32)
    for t in range(TILES):
        cols = col0 + t * BLOCK_V + tl.arange(0, BLOCK_V)
        cm = cols < C
        d = ce_grad_tile(logits + row * stride_x, target + row * stride_t, weight, cols, cm, y, ignored, c1, c2, c3,
                         lse_hi, lse_lo, g, g_lse, V, smoothing, softcap, grad_max, HAS_WEIGHT, DENSE, SMOOTH,
                         INPUT, HAS_SOFTCAP, HAS_LSE_GRAD, RNE_BF16)
        tl.store(dlogits + row * stride_dx + cols, d.to(dlogits.dtype.element_ty), mask=cm)


@triton.jit
def ce_grad_tile(x_row, t_row, weight, cols, cm, y, ignored, c1, c2, c3, lse_hi, lse_lo, g, g_lse, V, smoothing,
                 softcap, grad_max, HAS_WEIGHT: tl.constexpr, DENSE: tl.constexpr, SMOOTH: tl.constexpr,
                 INPUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LSE_GRAD: tl.constexpr,
                 RNE_BF16: tl.constexpr):
    """The gradient of one tile ``cols`` (mask ``cm``) of a row (logits at ``x_row``, dense target row at
    ``t_row``) from the row's coefficients and upstream gradients ``g``/``g_lse``, in fp32 (rounded to
    bf16 by hand with ``RNE_BF16``), ready to store. Reads the tile's logits once."""
    x = tl.load(x_row + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        xc = softcap * tanh(x / softcap)
    else:
        xc = x
    q = 0.0
    if DENSE:
        q = tl.load(t_row + cols, mask=cm, other=0.0).to(tl.float32)
    w = 0.0
    if HAS_WEIGHT:
        w = tl.load(weight + cols, mask=cm, other=0.0).to(tl.float32)
    a = ce_target_weights(cols, cm, y, w, q, V, smoothing, HAS_WEIGHT, DENSE, SMOOTH)
    if INPUT == 2:
        a = a / tl.maximum(xc, PROB_EPS, propagate_nan=tl.PropagateNan.ALL)
    if INPUT == 0:  # the upstream folded into the row's coefficients first, as autograd's chain does: an
        # infinite g gives inf - inf = NaN where PyTorch has it (the target column), not (p - 1) * g
        p = tl.exp((xc - lse_hi) - lse_lo)  # = exp((x - m) - log s)
        t2 = (c2 * g) * a
        if SMOOTH == 0 and not DENSE:  # target mass at the target column only: no term elsewhere (0 * inf)
            t2 = tl.where(cols == y, t2, 0.0)
        c3g = tl.where(c3 != 0.0, c3 * g, 0.0)  # (no focal term: none for an inf g either)
        d = (c1 * g) * p - t2 - tl.where(cols == y, c3g, 0.0)
    else:
        d = -tl.where(a != 0.0, c2 * a, 0.0) - tl.where(cols == y, c3, 0.0)  # (no target mass: no term, for a NaN c2)
        # as nll_loss: a class other than the target without target mass keeps 0 for an inf / NaN upstream (e.g. a
        # weighted mean over no weight: g = 1 / 0); the target's -w_y * g is NaN there
        d = tl.where((d == 0.0) & (cols != y), 0.0, d * g)
    d = tl.where(ignored, 0.0, d)
    if HAS_LSE_GRAD:
        if INPUT == 0:
            d += g_lse * p
    if HAS_SOFTCAP:
        r = xc / softcap
        d = d * (1.0 - r * r)
        if not HAS_LSE_GRAD:  # an ignored row's gradient stays 0 where its logits are NaN (0 * NaN)
            d = tl.where(ignored, 0.0, d)
    if INPUT == 2:  # -a/max(p, eps) at p = 0 overflows 16-bit outputs: saturate (finite, as the spec asks)
        d = tl.where(d > grad_max, grad_max, tl.where(d < -grad_max, -grad_max, d))
    if RNE_BF16:
        d = round_to_bf16(d)
    return d


@triton.jit
def _ce_fwd_grad_kernel(
    # data (dlogits may be logits itself: each tile is read before the same program writes it)
    logits, dlogits, target, weight, loss, denom,
    # shapes and strides
    N, C, stride_x, stride_dx, stride_t,
    # options (grad_max: the output dtype's largest finite value)
    ignore_index, smoothing, gamma, z_loss, softcap, upper_bound, grad_max,
    # flags
    HAS_WEIGHT: tl.constexpr, DENSE: tl.constexpr, SMOOTH: tl.constexpr, INPUT: tl.constexpr,
    HAS_FOCAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_BOUND: tl.constexpr,
    ONEHOT: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Training fast path (one scalar upstream gradient): the forward and the gradient in one kernel.

    Persistent grid ``(P,)``: program ``p`` takes rows ``p, p + P, ...``; per row, the forward's pass
    (:func:`ce_row_sums`, ``BLOCK_V`` columns a step) writes ``loss[row]``, then a second pass over the
    same row (``BLOCK_G`` columns a step) writes the gradient of ``sum(loss) / denom`` (upstream 1;
    ``denom`` is read on device). ``P`` (``rows_in_flight``: one program per row on CUDA) sets the rows in
    flight; the second read of a row comes from L2 while the rows in flight fit there (rows of up to
    64 KiB; longer rows take ``_ce_fwd_grad_split_kernel``). Programs never wait on each other.
    """
    inv = 1.0 / tl.load(denom).to(tl.float32)
    for r in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):  # int64: pid + P can pass 2**31
        row = tl.cast(r, tl.int64)  # (a tensor in the interpreter too, whose range yields Python ints)
        x_row = logits + row * stride_x
        t_row = target + row * stride_t
        m_safe, s, A, sum_at, t_y, y, owned, ignored, bad = ce_row_sums(
            x_row, t_row, weight, row, N, C, 0, C, ignore_index, smoothing, softcap, HAS_WEIGHT, DENSE, SMOOTH,
            INPUT, HAS_FOCAL, HAS_SOFTCAP, ONEHOT, BLOCK_V)
        total, lse, c1, c2, c3, lo = ce_row_coefs(m_safe, s, A, sum_at, t_y - m_safe, ignored, bad, gamma, z_loss,
                                                  upper_bound, INPUT, HAS_FOCAL, HAS_ZLOSS, HAS_BOUND)
        tl.store(loss + row, total)
        if ONEHOT:
            if INPUT != 0:
                # no pass over the row before the gradient's (x_y's one load was the row's only read): every
                # thread's load of x_y before any thread stores the gradient over it (in place: dlogits is
                # logits). A pass's cross-warp reductions order the loads otherwise
                tl.debug_barrier()
        for start in range(0, C, BLOCK_G):
            cols = start + tl.arange(0, BLOCK_G)
            cm = cols < C
            d = ce_grad_tile(x_row, t_row, weight, cols, cm, y, ignored, c1, c2, c3, lse, lo, inv, 0.0, C,
                             smoothing, softcap, grad_max, HAS_WEIGHT, DENSE, SMOOTH, INPUT, HAS_SOFTCAP, False,
                             RNE_BF16)
            tl.store(dlogits + row * stride_dx + cols, d.to(dlogits.dtype.element_ty), mask=cm)


@triton.jit
def _ce_fwd_grad_split_kernel(
    logits, dlogits, target, weight, loss, denom, part, count,
    N, C, P, PIECE, stride_x, stride_dx, stride_t,
    ignore_index, smoothing, gamma, z_loss, softcap, upper_bound, grad_max,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_BOUND: tl.constexpr, ONEHOT: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Training fast path for long rows of logits with class ids: grid ``(N * P,)``, program ``t`` takes
    piece ``t % P`` (columns ``[j * PIECE, (j + 1) * PIECE)``) of row ``t // P``.

    Every program streams its piece once (:func:`ce_row_sums` on the piece, as a vocab shard) and writes
    the piece's sums (m, s, A, sum a (x - m), x_y - m) to ``part[row, j]`` (fp32 (N, P, 5)), then adds 1
    to ``count[row]`` (int32, zeroed by the caller; acquire-release). The program that brings the count
    to P is the row's last: it combines the P sums in piece order (deterministic whichever program is
    last), writes ``loss[row]`` and the whole row's gradient of ``sum(loss) / denom`` (upstream 1). Its
    second read of the row follows the pieces' reads at once, so it comes from L2: one HBM read and one
    write per logit, with the row's first read spread over P programs. No program waits for another."""
    t = tl.program_id(0)
    r = t // P
    j = t % P
    row = tl.cast(r, tl.int64)
    x_row = logits + row * stride_x
    t_row = target + row * stride_t
    c0 = j * PIECE
    cw = tl.minimum(PIECE, C - c0)
    m_safe, s, A, sum_at, t_y, _, owned, ignored, _ = ce_row_sums(
        x_row + c0, t_row, weight + c0, row, N, cw, c0, C, ignore_index, smoothing, softcap, HAS_WEIGHT, False,
        SMOOTH, 0, HAS_FOCAL, HAS_SOFTCAP, ONEHOT, BLOCK_V)
    base = part + (row * P + j) * 5
    tl.store(base, m_safe)
    tl.store(base + 1, s)
    tl.store(base + 2, tl.where(ignored, 0.0, A))
    tl.store(base + 3, tl.where(ignored, 0.0, sum_at))
    tl.store(base + 4, tl.where(owned, t_y - m_safe, 0.0))
    tl.debug_barrier()
    done = tl.atomic_add(count + row, 1, sem="acq_rel")
    if done == P - 1:
        y, ignored, bad = load_target(t_row, r < N, ignore_index, C)
        m = -float("inf")
        for k in range(0, P):
            mk = tl.load(part + (row * P + k) * 5, cache_modifier=".cg")
            sk = tl.load(part + (row * P + k) * 5 + 1, cache_modifier=".cg")
            m = tl.maximum(m, tl.where(sk != 0, mk, -float("inf")))
        m_all = tl.where(m == -float("inf"), 0.0, m)
        s = 0.0
        A = 0.0
        B = 0.0
        t_ym = 0.0
        jy = tl.where(ignored | bad, -1, y // PIECE)
        for k in range(0, P):
            pk = part + (row * P + k) * 5
            shift = tl.load(pk, cache_modifier=".cg") - m_all
            sk = tl.load(pk + 1, cache_modifier=".cg")
            Ak = tl.load(pk + 2, cache_modifier=".cg")
            s += tl.where(sk != 0, sk * tl.exp(shift), 0.0)
            A += Ak
            B += tl.load(pk + 3, cache_modifier=".cg") + tl.where(Ak != 0, Ak * shift, 0.0)
            t_ym += tl.where(k == jy, tl.load(pk + 4, cache_modifier=".cg") + shift, 0.0)
        total, lse, c1, c2, c3, lo = ce_row_coefs(m_all, s, A, B, t_ym, ignored, bad, gamma, z_loss, upper_bound,
                                                  0, HAS_FOCAL, HAS_ZLOSS, HAS_BOUND)
        tl.store(loss + row, total)
        inv = 1.0 / tl.load(denom).to(tl.float32)
        for start in range(0, C, BLOCK_G):
            cols = start + tl.arange(0, BLOCK_G)
            cm = cols < C
            d = ce_grad_tile(x_row, t_row, weight, cols, cm, y, ignored, c1, c2, c3, lse, lo, inv, 0.0, C,
                             smoothing, softcap, grad_max, HAS_WEIGHT, False, SMOOTH, 0, HAS_SOFTCAP, False,
                             RNE_BF16)
            tl.store(dlogits + row * stride_dx + cols, d.to(dlogits.dtype.element_ty), mask=cm)


@triton.jit
def _ce_scale_tiles(src, dst, row, col0, C, stride_src, stride_dst, g, RNE_BF16: tl.constexpr,
                    BLOCK: tl.constexpr, TILES: tl.constexpr):
    for t in range(TILES):
        cols = col0 + t * BLOCK + tl.arange(0, BLOCK)
        cm = cols < C
        d = tl.load(src + row * stride_src + cols, mask=cm, other=0.0).to(tl.float32)
        d = tl.where(d == 0.0, 0.0, d * g)  # exact zeros (ignored rows) stay 0 for a NaN / inf upstream too
        if RNE_BF16:
            d = round_to_bf16(d)
        tl.store(dst + row * stride_dst + cols, d.to(dst.dtype.element_ty), mask=cm)


@triton.jit
def _ce_scale_kernel(src, dst, g_ptr, C, stride_src, stride_dst, IN_PLACE: tl.constexpr, RNE_BF16: tl.constexpr,
                     BLOCK: tl.constexpr, TILES: tl.constexpr):
    """``dst = src * g`` for the fast path's backward (``g``: the upstream scalar, read on device), in
    fp32 with one rounding, exact zeros kept (an ignored row's gradient is 0 whatever the upstream); grid
    ``(N, cdiv(C, TILES * BLOCK))``. ``IN_PLACE`` (``dst`` is ``src``): a program returns at once when
    ``g == 1`` (``loss.backward()``), so that backward costs no pass."""
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * (TILES * BLOCK)
    g = tl.load(g_ptr).to(tl.float32)
    if IN_PLACE:
        if g != 1.0:
            _ce_scale_tiles(src, dst, row, col0, C, stride_src, stride_dst, g, RNE_BF16, BLOCK, TILES)
    else:
        _ce_scale_tiles(src, dst, row, col0, C, stride_src, stride_dst, g, RNE_BF16, BLOCK, TILES)


def _blocks(C: int, elem_size: int):
    """Fixed block table (no autotune: deterministic reduction order): ``(forward block, backward
    block, forward warps, backward warps, backward tiles per program)``.

    sm_90 registers per thread (triton 3.9 AOT + cuobjdump, V = 256k, class ids / with smoothing,
    weights, focal, z-loss and softcap): the forward at 8192 columns x 16 warps takes 32 / 88-92, no
    spills (a 16384 x 16 bf16 tile took 51 / 128 with 40 bytes of stack spills); the backward loop
    at 4096 columns x 16 warps takes 36-40 / 56-60 (at 8 warps it took 85 / 92-98)."""
    fwd = min(triton.next_power_of_2(max(C, 16)), 8192)
    bwd = min(triton.next_power_of_2(max(C, 16)), 4096)
    fwd_warps = 16 if fwd >= 8192 else (8 if fwd >= 2048 else 4)
    bwd_warps = 16 if bwd >= 4096 else (8 if bwd >= 2048 else 4)
    tiles = min(8, triton.next_power_of_2(triton.cdiv(max(C, 1), bwd)))
    return fwd, bwd, fwd_warps, bwd_warps, tiles


def _flags(weight, opts):
    return dict(HAS_WEIGHT=weight is not None, DENSE=opts.dense, SMOOTH=opts.smooth_mode, INPUT=opts.input_type,
                HAS_SOFTCAP=opts.softcap > 0)


def _classes(opts, C):
    """``(class_offset, V)``: where this input's columns sit among the whole row's V classes."""
    return opts.class_offset, opts.num_classes if opts.num_classes > 0 else C


def ce_fwd(logits, target, weight, opts, loss, lse, coef):
    """Launch the forward into preallocated ``loss (N,)``, ``lse (N,)``, ``coef (N, 4)`` (fp32).

    ``opts``: the call's options (``tri_losses._torch.cross_entropy.CEOptions``: read by field name)."""
    _launch_fwd(logits, target, weight, opts, loss, lse, coef, False)


def ce_partial(logits, target, weight, opts, part, width=0):
    """Launch the forward's partial mode into a preallocated ``part (N, 5)`` (fp32): the per-row sums
    over this shard of the classes (see ``_ce_fwd_kernel``); a shard with no columns launches nothing
    (``part`` must then be zeros). ``width``: the blocks are chosen for ``max(C, width)`` columns (a
    chunked caller's chunk width, so that its last, narrower chunk compiles no variant of its own)."""
    if logits.shape[1] > 0:
        _launch_fwd(logits, target, weight, opts, part, part, part, True, width)


def _launch_fwd(logits, target, weight, opts, loss, lse, coef, partial, width=0):
    N, C = logits.shape
    if N == 0:
        return
    bf, _, wf, _, _ = _blocks(max(C, width), logits.element_size())
    _ce_fwd_kernel[(N,)](
        logits, target, weight if weight is not None else logits, loss, lse, coef,
        N, C, logits.stride(0), target.stride(0), *_classes(opts, C),
        opts.ignore_index, opts.smoothing, opts.gamma, opts.z_loss, opts.softcap, opts.upper_bound,
        PARTIAL=partial, BLOCK_V=bf, num_warps=wf, **_fwd_flags(opts, partial), **_flags(weight, opts))


def _fwd_flags(opts, partial=False):
    """The forward's option flags, shared by the exact forward and the training fast path (a vocab-parallel
    partial forms no z-loss or bound term: those need the whole row)."""
    return dict(HAS_FOCAL=opts.gamma != 0.0 and not opts.dense,
                HAS_ZLOSS=opts.z_loss != 0.0 and opts.input_type == 0 and not partial,
                HAS_BOUND=opts.upper_bound != float("inf") and not partial,
                ONEHOT=opts.smooth_mode == 0 and not opts.dense)


def ce_bwd(dlogits, logits, target, weight, lse, coef, grad_loss, grad_lse, opts, width=0):
    """Launch the backward writing ``dlogits`` (may be ``logits`` itself for in-place); ``width`` as
    :func:`ce_partial`'s."""
    import torch
    N, C = logits.shape
    if N == 0 or C == 0:
        return
    _, bb, _, wb, tiles = _blocks(max(C, width), logits.element_size())
    _ce_bwd_kernel[(N, triton.cdiv(C, bb * tiles))](
        dlogits, logits, target, weight if weight is not None else logits, lse, coef, grad_loss,
        grad_lse if grad_lse is not None else grad_loss,
        N, C, dlogits.stride(0), logits.stride(0), target.stride(0), grad_loss.stride(0),
        grad_lse.stride(0) if grad_lse is not None else 0, *_classes(opts, C),
        opts.ignore_index, opts.smoothing, opts.softcap, torch.finfo(dlogits.dtype).max,
        HAS_LSE_GRAD=grad_lse is not None, RNE_BF16=rne_bf16(dlogits), BLOCK_V=bb, TILES=tiles, num_warps=wb,
        **_flags(weight, opts))


def rows_in_flight(logits) -> int:
    """The fast path's persistent grid size: one program per row on CUDA. Each program holds one row
    between its two reads, so a smaller grid would keep the second read in L2 for long rows, but the
    first GPU measurement (H100, N=16384, bf16) showed that trade losing: a grid bounded by half of L2
    (about 100 programs at V=128k, 50 at 256k, fewer than the SMs) reached only 49% and 27% of the
    2R+1W byte floor, where one program per row (the exact path's grid, and Liger's) streams both reads
    at about 90% of the copy bandwidth. Rows of up to 64 KiB (32k bf16 logits) had one program each in
    that run too (87% of the floor at V=32k). Rows of ``SPLIT_ROW_BYTES`` and more take the split kernel
    instead (``split_pieces``)."""
    N = logits.shape[0]
    if logits.device.type != "cuda":
        return max(1, min(N, 4))  # the interpreter (and the launch recorder): a few rows per program
    return max(1, N)


def split_pieces(C, elem_size, dense, input_type):
    """Pieces per row for the fast path's split kernel (``_ce_fwd_grad_split_kernel``), or 0 for the
    one-program-per-row kernel: rows of logits with class ids of at least ``SPLIT_ROW_BYTES``, in pieces
    of ``SPLIT_PIECE`` columns (0 bytes: never)."""
    if dense or input_type != 0 or SPLIT_ROW_BYTES <= 0 or C * elem_size < SPLIT_ROW_BYTES:
        return 0
    P = triton.cdiv(C, SPLIT_PIECE)
    return P if P >= 2 else 0


def ce_fwd_grad(logits, dlogits, target, weight, opts, loss, denom):
    """Launch the training fast path: per-row ``loss (N,)`` and, into ``dlogits`` (may be ``logits``), the
    gradient of ``loss.sum() / denom`` (``denom``: a 0-dim fp32 device tensor) for an upstream of 1."""
    import torch
    N, C = logits.shape
    if N == 0 or C == 0:
        return
    P = split_pieces(C, logits.element_size(), opts.dense, opts.input_type)
    if P:
        bf, _, wf, _, _ = _blocks(SPLIT_PIECE, logits.element_size())
        _, bb, _, wb, _ = _blocks(C, logits.element_size())
        part = torch.empty(N, P, 5, dtype=torch.float32, device=logits.device)
        count = torch.zeros(N, dtype=torch.int32, device=logits.device)
        _ce_fwd_grad_split_kernel[(N * P,)](
            logits, dlogits, target, weight if weight is not None else logits, loss, denom, part, count,
            N, C, P, SPLIT_PIECE, logits.stride(0), dlogits.stride(0), target.stride(0),
            opts.ignore_index, opts.smoothing, opts.gamma, opts.z_loss, opts.softcap, opts.upper_bound,
            torch.finfo(dlogits.dtype).max, HAS_WEIGHT=weight is not None, SMOOTH=opts.smooth_mode,
            HAS_SOFTCAP=opts.softcap > 0, RNE_BF16=rne_bf16(dlogits), BLOCK_V=bf, BLOCK_G=bb,
            num_warps=max(wf, wb), **_fwd_flags(opts))
        return
    bf, bb, wf, _, _ = _blocks(C, logits.element_size())
    _ce_fwd_grad_kernel[(rows_in_flight(logits),)](
        logits, dlogits, target, weight if weight is not None else logits, loss, denom,
        N, C, logits.stride(0), dlogits.stride(0), target.stride(0),
        opts.ignore_index, opts.smoothing, opts.gamma, opts.z_loss, opts.softcap, opts.upper_bound,
        torch.finfo(dlogits.dtype).max,
        RNE_BF16=rne_bf16(dlogits), BLOCK_V=bf, BLOCK_G=bb, num_warps=wf, **_fwd_flags(opts), **_flags(weight, opts))


def ce_scale(src, dst, g, in_place):
    """``dst = src * g`` (``g``: a 0-dim device tensor, read by the kernel); ``in_place`` (``dst`` is
    ``src``): a no-op on device when ``g == 1``."""
    N, C = src.shape
    if N == 0 or C == 0:
        return
    _, bb, _, wb, tiles = _blocks(C, src.element_size())
    _ce_scale_kernel[(N, triton.cdiv(C, bb * tiles))](
        src, dst, g, C, src.stride(0), dst.stride(0), IN_PLACE=in_place, RNE_BF16=rne_bf16(dst), BLOCK=bb,
        TILES=tiles, num_warps=wb)
