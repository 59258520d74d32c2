"""Triton kernels for the fused linear + cross-entropy (the N x V logits never reach global memory).

Logit tiles ``z = x @ W.T + b`` (BM rows x BN classes, fp32 accumulation over BK-wide slices of D)
are formed on chip and reduced exactly as ``kernels/cross_entropy.py`` reduces a row: the same
``ce_target_weights`` / ``ce_row_finish`` helpers, so both ops share one semantics.

Kernels (M = BM rows per tile, N rows, V classes, D features):
  _lce_fwd_split_kernel : grid (cdiv(N, BM), S); program (i, k) streams the V tiles of vocab split k
                    (and D slices) for row tile i and writes the row partials (m, s, A, sum_at, t_y)
                    to an fp32 (S, 5, N) buffer. FLOPs 2*N*V*D; reads X once per V tile row
                    and W once per row tile: cdiv(V, BN)*N*D*s + cdiv(N, BM)*V*D*s bytes (L2-served).
                    S is chosen so that row tiles x S fills the GPU about twice (small N).
  _lce_fwd_finish_kernel : grid (cdiv(N, 128),); combines the S partials in split order
                    (deterministic) and calls ``ce_row_finish``: loss, lse, (c1, c2, c3) per row.
  _lce_dx_kernel  : grid (cdiv(N, BM),); recomputes each logit tile, forms dz in registers and adds
                    dz @ W_tile into its own rows of an fp32 (N, D) buffer. FLOPs 4*N*V*D.
  _lce_dw_kernel  : grid (cdiv(V, BN),); loops over row tiles in order, recomputes the tile, adds
                    dz.T @ X_tile into its own rows of an fp32 (V, D) buffer and dz column sums into
                    the bias gradient. FLOPs 4*N*V*D.
Every accumulation has one owner program and a fixed order: deterministic, no atomics. Extra memory
O(N*D + V*D + N) (the fp32 gradient buffers and per-row vectors). Offsets are int64.
In the interpreter, 16-bit tiles are cast to fp32 before ``tl.dot`` (it would act on raw bits);
fp32 tiles use ``input_precision="ieee"`` (no TF32) so both match the float64 reference closely.
"""
import triton
import triton.language as tl

from ._math import interpreting, round_to_bf16, tanh
from .cross_entropy import ce_row_finish, ce_target_weights, load_target


@triton.jit
def _logit_tile(x, w, bias, rows64, rmask, cols64, cmask, D, stride_xn, stride_wv, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(BM, BN) fp32 tile of x @ w.T + b (soft-capped), -inf outside the valid columns."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < D
        xt = tl.load(x + rows64[:, None] * stride_xn + ks[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        wt = tl.load(w + cols64[:, None] * stride_wv + ks[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(wt))
    if HAS_BIAS:
        acc += tl.load(bias + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return tl.where(cmask[None, :], acc, float("-inf"))


@triton.jit
def _acc_dot(a, src, src_rows64, src_mask, src_stride, dst, dst_rows64, dst_mask, D, scale, IEEE: tl.constexpr,
             BK: tl.constexpr):
    """dst[dst_rows, :] += scale * (a @ src[src_rows, :]) over BK-wide slices of D (fp32 dst, one owner
    program).

    ``a`` (P, Q) sets the dot's precision: the src tile is cast to its dtype. ``scale`` (a scalar) undoes
    a normalisation of ``a`` done so that its 16-bit cast keeps small values (no underflow).
    """
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < D
        b = tl.load(src + src_rows64[:, None] * src_stride + ks[None, :], mask=src_mask[:, None] & km[None, :],
                    other=0.0).to(a.dtype)
        if IEEE:
            part = tl.dot(a, b, input_precision="ieee")
        else:
            part = tl.dot(a, b)
        msk = dst_mask[:, None] & km[None, :]
        ptrs = dst + dst_rows64[:, None] * D + ks[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + part * scale, mask=msk)


@triton.jit
def _dz_tile(z, cols, cmask, rmask, y, cw, lse, c1, c2, c3, g, ignored, V, smoothing, softcap,
             HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """dL/dz for a tile: g * (c1*p - c2*a - c3*[col == y]) * softcap'(z); 0 outside the valid tile."""
    wc = 0.0
    if HAS_WEIGHT:
        wc = tl.load(cw + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    a = ce_target_weights(cols[None, :], cmask[None, :], y[:, None], wc, 0.0, V, smoothing, HAS_WEIGHT, False,
                          SMOOTH)
    p = tl.exp(z - lse[:, None])
    d = c1[:, None] * p - c2[:, None] * a - tl.where(cols[None, :] == y[:, None], c3[:, None], 0.0)
    d = d * g[:, None]
    if HAS_SOFTCAP:
        r = z / softcap
        d = d * (1.0 - r * r)
    return tl.where(rmask[:, None] & cmask[None, :] & (ignored == 0)[:, None], d, 0.0)


@triton.jit
def _dot_operand(d, like, DOT_F32: tl.constexpr, HALF: tl.constexpr):
    """``d`` as the dot's input: cast to the 16-bit input dtype on a GPU; in the interpreter (fp32 dots)
    that rounding is emulated (HALF: 1 fp16, 2 bf16), so CPU tests see the GPU's precision."""
    if DOT_F32:
        if HALF == 1:
            d = d.to(tl.float16).to(tl.float32)
        elif HALF == 2:
            d = round_to_bf16(d)
    else:
        d = d.to(like.dtype.element_ty)
    return d


@triton.jit
def _tile_scale(g):
    """max |g| over a tile's rows (1 if all are 0): dz / scale is O(p), so its 16-bit cast keeps it."""
    m = tl.max(tl.abs(g), axis=0)
    return tl.where(m > 0, m, 1.0)


@triton.jit
def _row_inputs(target, coef, lse_in, grad_loss, rows64, rmask, stride_t, stride_g, ignore_index, V):
    y, ign, _ = load_target(target + rows64 * stride_t, rmask, ignore_index, V)
    ignored = ign.to(tl.int32)
    c1 = tl.load(coef + rows64 * 3, mask=rmask, other=0.0)
    c2 = tl.load(coef + rows64 * 3 + 1, mask=rmask, other=0.0)
    c3 = tl.load(coef + rows64 * 3 + 2, mask=rmask, other=0.0)
    lse = tl.load(lse_in + rows64, mask=rmask, other=0.0)
    g = tl.load(grad_loss + rows64 * stride_g, mask=rmask, other=0.0).to(tl.float32)
    return y, ignored, c1, c2, c3, lse, g


@triton.jit
def _lce_fwd_split_kernel(
    x, w, bias, target, cw, part,
    N, V, D, VS, stride_xn, stride_wv, stride_t,
    ignore_index, smoothing, softcap,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Forward partials of one (BM-row tile, vocab split [k*VS, (k+1)*VS)) pair.

    Streams the split's logit tiles and writes the row partials (m, s, A, sum_at, t_y) to
    ``part[k, :, N]`` (fp32, (S, 5, N)); ``_lce_fwd_finish_kernel`` combines the splits in order.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k = tl.program_id(1)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    y, _, _ = load_target(target + rows64 * stride_t, rmask, ignore_index, V)
    m = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)
    A = tl.zeros([BM], tl.float32)
    sum_at = tl.zeros([BM], tl.float32)
    t_y = tl.zeros([BM], tl.float32)
    v_lo = k * VS
    for v0 in range(0, VS, BN):
        cols = v_lo + v0 + tl.arange(0, BN)
        cmask = cols < V
        z = _logit_tile(x, w, bias, rows64, rmask, cols.to(tl.int64), cmask, D, stride_xn, stride_wv, softcap,
                        HAS_BIAS, HAS_SOFTCAP, DOT_F32, IEEE, BM, BN, BK)
        wc = 0.0
        if HAS_WEIGHT:
            wc = tl.load(cw + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        a = ce_target_weights(cols[None, :], cmask[None, :], y[:, None], wc, 0.0, V, smoothing, HAS_WEIGHT, False,
                              SMOOTH)
        A += tl.sum(a, axis=1)
        sum_at += tl.sum(tl.where(a != 0, a * z, 0.0), axis=1)
        t_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    base = part + k.to(tl.int64) * 5 * N + rows64
    tl.store(base, m, mask=rmask)
    tl.store(base + N, s, mask=rmask)
    tl.store(base + 2 * N, A, mask=rmask)
    tl.store(base + 3 * N, sum_at, mask=rmask)
    tl.store(base + 4 * N, t_y, mask=rmask)


@triton.jit
def _lce_fwd_finish_kernel(
    part, target, loss, lse_out, coef, N, V, S, stride_t, ignore_index, gamma, z_loss,
    HAS_FOCAL: tl.constexpr, HAS_ZLOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Combine the S vocab-split partials of BLOCK rows in split order (deterministic), then
    ``ce_row_finish``: loss, lse and the backward coefficients (c1, c2, c3). Grid (cdiv(N, BLOCK),);
    reads 5*S*N + N, writes 5*N values."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    _, ignored, bad = load_target(target + rows64 * stride_t, rmask, ignore_index, V)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for k in range(0, S):
        m = tl.maximum(m, tl.load(part + k * 5 * N + rows64, mask=rmask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros([BLOCK], tl.float32)
    A = tl.zeros([BLOCK], tl.float32)
    sum_at = tl.zeros([BLOCK], tl.float32)
    t_y = tl.zeros([BLOCK], tl.float32)
    for k in range(0, S):
        base = part + k * 5 * N + rows64
        mk = tl.load(base, mask=rmask, other=float("-inf"))
        sk = tl.load(base + N, mask=rmask, other=0.0)
        s += tl.where(sk > 0, sk * tl.exp(mk - m_safe), sk)
        A += tl.load(base + 2 * N, mask=rmask, other=0.0)
        sum_at += tl.load(base + 3 * N, mask=rmask, other=0.0)
        t_y += tl.load(base + 4 * N, mask=rmask, other=0.0)
    total, lse, c1, c2, c3 = ce_row_finish(A, sum_at, m, s, t_y, gamma, z_loss, 0.0, 0, HAS_FOCAL, HAS_ZLOSS, False)
    nan = float("nan")
    total = tl.where(ignored, 0.0, tl.where(bad, nan, total))
    c1 = tl.where(ignored, 0.0, tl.where(bad, nan, c1))
    c2 = tl.where(ignored, 0.0, tl.where(bad, nan, c2))
    c3 = tl.where(ignored, 0.0, tl.where(bad, nan, c3))
    tl.store(loss + rows64, total, mask=rmask)
    tl.store(lse_out + rows64, lse, mask=rmask)
    tl.store(coef + rows64 * 3, c1, mask=rmask)
    tl.store(coef + rows64 * 3 + 1, c2, mask=rmask)
    tl.store(coef + rows64 * 3 + 2, c3, mask=rmask)


@triton.jit
def _lce_dx_kernel(
    x, w, bias, target, cw, lse_in, coef, grad_loss, dx,
    N, V, D, stride_xn, stride_wv, stride_t, stride_g,
    ignore_index, smoothing, softcap,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HALF: tl.constexpr,
):
    """grad_input for one BM-row tile: sum over V tiles of dz @ W_tile, into fp32 ``dx`` (N, D)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    y, ignored, c1, c2, c3, lse, g = _row_inputs(target, coef, lse_in, grad_loss, rows64, rmask, stride_t, stride_g,
                                                 ignore_index, V)
    # dz is cast to 16 bits for the dot: formed relative to the tile's largest |upstream| (1/N after a
    # mean would push small p * g below fp16's range), the scale restored on the fp32 accumulation
    gs = _tile_scale(g)
    g = g / gs
    for v0 in range(0, V, BN):
        cols = v0 + tl.arange(0, BN)
        cmask = cols < V
        cols64 = cols.to(tl.int64)
        z = _logit_tile(x, w, bias, rows64, rmask, cols64, cmask, D, stride_xn, stride_wv, softcap,
                        HAS_BIAS, HAS_SOFTCAP, DOT_F32, IEEE, BM, BN, BK)
        d = _dz_tile(z, cols, cmask, rmask, y, cw, lse, c1, c2, c3, g, ignored, V, smoothing, softcap,
                     HAS_WEIGHT, SMOOTH, HAS_SOFTCAP)
        d = _dot_operand(d, w, DOT_F32, HALF)
        _acc_dot(d, w, cols64, cmask, stride_wv, dx, rows64, rmask, D, gs, IEEE, BK)
        tl.debug_barrier()  # this program re-reads its own dx rows in the next V tile


@triton.jit
def _lce_dw_kernel(
    x, w, bias, target, cw, lse_in, coef, grad_loss, dw, db,
    N, V, D, stride_xn, stride_wv, stride_t, stride_g,
    ignore_index, smoothing, softcap,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HALF: tl.constexpr,
):
    """grad_linear_weight / grad_linear_bias for one BN-class tile: sum over row tiles (in order)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < V
    cols64 = cols.to(tl.int64)
    dbias = tl.zeros([BN], tl.float32)
    for n0 in range(0, N, BM):
        rows = n0 + tl.arange(0, BM)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        y, ignored, c1, c2, c3, lse, g = _row_inputs(target, coef, lse_in, grad_loss, rows64, rmask, stride_t,
                                                     stride_g, ignore_index, V)
        gs = _tile_scale(g)  # see _lce_dx_kernel
        g = g / gs
        z = _logit_tile(x, w, bias, rows64, rmask, cols64, cmask, D, stride_xn, stride_wv, softcap,
                        HAS_BIAS, HAS_SOFTCAP, DOT_F32, IEEE, BM, BN, BK)
        d = _dz_tile(z, cols, cmask, rmask, y, cw, lse, c1, c2, c3, g, ignored, V, smoothing, softcap,
                     HAS_WEIGHT, SMOOTH, HAS_SOFTCAP)
        dbias += tl.sum(d, axis=0) * gs
        dt = tl.trans(d)
        dt = _dot_operand(dt, x, DOT_F32, HALF)
        _acc_dot(dt, x, rows64, rmask, stride_xn, dw, cols64, cmask, D, gs, IEEE, BK)
        tl.debug_barrier()  # this program re-reads its own dw rows in the next row tile
    if HAS_BIAS:
        tl.store(db + cols64, dbias, mask=cmask)



def _config(x):
    """Fixed tile table (no autotune): (BM, BN, BK, num_warps)."""
    import torch
    if interpreting():
        return 16, 32, 32, 4
    if x.dtype == torch.float32:
        return 32, 64, 32, 4
    return 64, 128, 64, 8


def _common(x, w, bias, cw, smooth, softcap):
    import torch
    BM, BN, BK, nw = _config(x)
    return dict(HAS_BIAS=bias is not None, HAS_WEIGHT=cw is not None, SMOOTH=smooth, HAS_SOFTCAP=softcap > 0,
                DOT_F32=interpreting(), IEEE=x.dtype == torch.float32, BM=BM, BN=BN, BK=BK, num_warps=nw)


def _num_splits(x, row_tiles, vocab_tiles):
    """Vocab splits for the forward: enough (row tile x split) programs to fill the GPU twice."""
    import torch
    if interpreting():
        return min(vocab_tiles, 2)  # exercise the split combine in CPU tests
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 1
    target = 2 * sms
    return max(1, min(vocab_tiles, -(-target // row_tiles)))


def lce_fwd(x, w, bias, target, cw, ignore_index, smoothing, smooth, gamma, z_loss, softcap, loss, lse, coef):
    """Forward into preallocated ``loss``, ``lse`` (N,) and ``coef`` (N, 3), all fp32.

    Two launches: ``_lce_fwd_split_kernel`` on a (row tiles, S vocab splits) grid writes per-split
    row partials (S*5*N fp32: O(N) extra), then ``_lce_fwd_finish_kernel`` combines them in split order.
    """
    import torch
    N, D = x.shape
    V = w.shape[0]
    if N == 0:
        return
    k = _common(x, w, bias, cw, smooth, softcap)
    BN = k["BN"]
    row_tiles = triton.cdiv(N, k["BM"])
    vocab_tiles = max(1, triton.cdiv(V, BN))
    S = _num_splits(x, row_tiles, vocab_tiles)
    tiles_per_split = triton.cdiv(vocab_tiles, S)
    S = triton.cdiv(vocab_tiles, tiles_per_split)  # no empty splits
    VS = tiles_per_split * BN
    part = torch.empty(S, 5, N, dtype=torch.float32, device=x.device)
    _lce_fwd_split_kernel[(row_tiles, S)](
        x, w, bias if bias is not None else x, target, cw if cw is not None else x, part,
        N, V, D, VS, x.stride(0), w.stride(0), target.stride(0),
        ignore_index, smoothing, softcap, **k)
    FB = 128
    _lce_fwd_finish_kernel[(triton.cdiv(N, FB),)](
        part, target, loss, lse, coef, N, V, S, target.stride(0), ignore_index, gamma, z_loss,
        HAS_FOCAL=gamma != 0.0, HAS_ZLOSS=z_loss != 0.0, BLOCK=FB, num_warps=4)


def lce_bwd(x, w, bias, target, cw, lse, coef, grad_loss, ignore_index, smoothing, smooth, softcap, dx, dw, db):
    """Backward into zero-initialised fp32 ``dx`` (N, D), ``dw`` (V, D) and ``db`` (V,) (if bias); a None
    ``dx`` / ``dw`` skips its kernel (a frozen head or input)."""
    import torch
    N, D = x.shape
    V = w.shape[0]
    if N == 0 or V == 0:
        return
    k = _common(x, w, bias, cw, smooth, softcap)
    args = (x, w, bias if bias is not None else x, target, cw if cw is not None else x, lse, coef, grad_loss)
    shape = (N, V, D, x.stride(0), w.stride(0), target.stride(0), grad_loss.stride(0), ignore_index, smoothing,
             softcap)
    half = {torch.float16: 1, torch.bfloat16: 2}.get(x.dtype, 0)
    if dx is not None:
        _lce_dx_kernel[(triton.cdiv(N, k["BM"]),)](*args, dx, *shape, HALF=half, **k)
    if dw is not None:
        _lce_dw_kernel[(triton.cdiv(V, k["BN"]),)](*args, dw, db if db is not None else dw, *shape, HALF=half, **k)
