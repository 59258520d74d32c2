"""Triton kernels for sampled softmax / NCE with shared negatives (one group: every row sees the same m ids).

Row i: true logits ``z_it = x_i . W[y_it] + b - logq_it`` and sampled logits ``z_ij = x_i . W[S_j] + b - logq_j``;
hits (``S_j`` equal to one of the row's labels, at ``S_j``'s last position with TF's policy) are dropped by a
predicate in registers (no N x m mask in memory).

  _sm_fwd_kernel  grid (cdiv(N, BM),): true logits by row gathers; sampled logit tiles x @ W_S^T on tensor
                  cores (fp32 accumulation over BK slices); an online log-sum-exp (softmax) or a softplus sum
                  (NCE) per row; the N x (T + m) logits never reach memory. Writes the row loss and lse.
  _sm_true_kernel grid (cdiv(N, BM),): the true columns' dz_it (upstream folded in) and their terms
                  (dz_it / sigma) * W[y_it] of grad_input, into an fp32 (N, D) buffer.
  _sm_dz_kernel   per chunk of sampled columns (``chunk_columns``: max(2048, 4*D)), grid (row tiles x
                  column tiles,) in grouped order: recomputes the logit tiles and writes dz / sigma once in
                  x's dtype to an (N, chunk) buffer (sigma: a power of two near the valid rows' max|g| for
                  16-bit dz through the Triton GEMMs, else 1); then linear cross-entropy's GEMM kernels take
                  the chunk: grad_W_S rows and grad_b_S complete in one GEMM over the rows (fp32 (m, D),
                  sigma multiplied back), and dz @ W_S added to the fp32 grad_input (one read-modify-write
                  of it per chunk, the last multiplying the whole by sigma; W_S gathered once, contiguous).
                  bf16 on CUDA with torch >= 2.10: those two GEMMs on torch.mm (linear CE's ``BLAS``
                  "dwdx", the default; sigma 1).
  _seg_sum_kernel grid (n,): the contributions (grad_W_S's m rows; the true-label terms x_i dz_it),
                  stably sorted by class id; the program at the start of each run of equal ids sums the run in
                  order and writes the class's row once, in W's dtype: into a zero-filled (V, D) gradient, or
                  at the run's end for the sparse form.
FLOPs: forward 2*N*(m+T)*D, backward recomputes 2*N*m*D plus 2*2*N*m*D useful; extra memory
O(N*D + m*D + N*T*D) (the dz chunk is at most max(2048, 4*D) columns; the true-label contributions), never
N x m, and no fp32 (V, D) buffer.
"""
import triton
import triton.language as tl

from ._math import interpreting, rne_bf16, round_to_bf16, softplus
from ._tiles import _logit_tile, _store, _tile_ids
from .linear_cross_entropy import (_GEMM_TILES, _blas_stages, _kind, _lce_dw_kernel, _lce_dx_kernel, _mm_f32,
                                   _upstream_scale)


@triton.jit
def _samp_tile(x, w, bias, labels, rows64, rmask, samp, logq_s, last, cols, cmask, D, T, stride_x, stride_w, stride_l,
               HAS_BIAS: tl.constexpr, REMOVE_HITS: tl.constexpr, ALL_HITS: tl.constexpr, DOT_F32: tl.constexpr,
               IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(z (BM, BN) fp32 sampled logits minus log Q, gathered ids, keep mask) for one row x column tile: reads BM
    rows of X and BN gathered rows of W (D each), 2*BM*BN*D FLOPs on tensor cores."""
    ids = tl.load(samp + cols, mask=cmask, other=0).to(tl.int64)
    z = _logit_tile(x, w, bias, rows64, rmask, ids, cmask, D, stride_x, stride_w, 0.0, HAS_BIAS, False, DOT_F32,
                    IEEE, BM, BN, BK)
    z = z - tl.load(logq_s + cols, mask=cmask, other=0.0)[None, :]
    keep = cmask[None, :] & rmask[:, None]
    if REMOVE_HITS:
        keep = keep & (_hit_tile(labels, rows64, rmask, ids, cols, cmask, last, T, stride_l, ALL_HITS, BM, BN) == 0)
    return z, ids, keep


@triton.jit
def _true_logit(x, w, bias, rows64, rmask, y, D, stride_x, stride_w, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BK: tl.constexpr):
    """(BM,) fp32 ``x_i . W[y_i] + b[y_i]``: one gathered W row per row (2*D FLOPs each, CUDA cores)."""
    acc = tl.zeros([BM], tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < D
        xt = tl.load(x + rows64[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        wt = tl.load(w + y[:, None] * stride_w + ks[None, :], mask=rmask[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xt * wt, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias + y, mask=rmask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _hit_tile(labels, rows64, rmask, ids, cols, cmask, last, T, stride_l, ALL_HITS: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr):
    """(BM, BN) bool: the column's id is one of the row's T labels (with TF's policy only at the id's last
    position, ``last`` nonzero there). Registers only."""
    hit = tl.zeros([BM, BN], tl.int32)
    for t in range(0, T):
        y = tl.load(labels + rows64 * stride_l + t, mask=rmask, other=-1).to(tl.int64)
        hit = hit | (ids[None, :] == y[:, None]).to(tl.int32)
    if not ALL_HITS:
        lastv = tl.load(last + cols, mask=cmask, other=0)
        hit = hit & (lastv != 0)[None, :].to(tl.int32)
    return hit != 0


@triton.jit
def _sm_fwd_kernel(x, w, bias, labels, logq_t, samp, logq_s, last, valid, loss, lse_out,
                   N, D, T, m, stride_x, stride_w, stride_l, log_norm,
                   HAS_BIAS: tl.constexpr, NCE: tl.constexpr, REMOVE_HITS: tl.constexpr, ALL_HITS: tl.constexpr,
                   DOT_F32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr):
    """grid (cdiv(N, BM),). Program: BM rows; T true logits by gathers, then the m sampled columns in (BM, BN)
    tiles (``_samp_tile``) folded into an online log-sum-exp (softmax) or a softplus sum (NCE). Reads X's rows
    once per column tile (L2) and all of W_S (m*D) per program; writes the row loss (0 on invalid rows) and lse
    (fp32, 0 for NCE). FLOPs 2*BM*(m+T)*D."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    mx = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)
    tsum = tl.zeros([BM], tl.float32)
    nce = tl.zeros([BM], tl.float32)
    invT = 1.0 / T
    for t in range(0, T):
        y = tl.load(labels + rows64 * stride_l + t, mask=rmask, other=0).to(tl.int64)
        z = _true_logit(x, w, bias, rows64, rmask, y, D, stride_x, stride_w, HAS_BIAS, BM, BK) \
            - tl.load(logq_t + rows64 * T + t, mask=rmask, other=0.0)
        tsum += z
        if NCE:
            zz = z - log_norm
            nce += invT * softplus(-zz) + (1.0 - invT) * softplus(zz)
        else:
            m_new = tl.maximum(mx, z)
            # all -inf so far (a -inf true logit): s stays 0; a +inf logit: s and the lse +inf (not inf - inf)
            ms = tl.where((m_new == float("-inf")) | (m_new == float("inf")), 0.0, m_new)
            s = s * tl.exp(mx - ms) + tl.exp(z - ms)
            mx = m_new
    for c0 in range(0, m, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < m
        z, ids, keep = _samp_tile(x, w, bias, labels, rows64, rmask, samp, logq_s, last, cols, cmask, D, T, stride_x,
                                  stride_w, stride_l, HAS_BIAS, REMOVE_HITS, ALL_HITS, DOT_F32, IEEE, BM, BN, BK)
        if NCE:
            nce += tl.sum(tl.where(keep, softplus(z - log_norm), 0.0), axis=1)
        else:
            zk = tl.where(keep, z, float("-inf"))
            m_new = tl.maximum(mx, tl.max(zk, axis=1))
            ms = tl.where((m_new == float("-inf")) | (m_new == float("inf")), 0.0, m_new)
            s = s * tl.exp(mx - ms) + tl.sum(tl.exp(zk - ms[:, None]), axis=1)
            mx = m_new
    ok = tl.load(valid + rows64, mask=rmask, other=0) != 0
    if NCE:
        out = nce
        lse = tl.zeros([BM], tl.float32)
    else:
        lse = mx + tl.log(s)
        out = lse - tsum * invT
    tl.store(loss + rows64, tl.where(ok, out, 0.0), mask=rmask)
    tl.store(lse_out + rows64, lse, mask=rmask)


@triton.jit
def _dz_true(z, lse, g, invT, log_norm, NCE: tl.constexpr):
    """dL/dz of a true column times the upstream g: p - 1/T (softmax) or sigmoid(z') - 1/T (NCE), the latter
    as (1 - 1/T) - sigmoid(-z'): no cancellation where sigmoid(z') rounds to 1 (T = 1: exactly -sigmoid(-z'))."""
    if NCE:
        zz = z - log_norm
        return g * ((1.0 - invT) - 1.0 / (1.0 + tl.exp(zz)))
    return g * (tl.exp(z - lse) - invT)


@triton.jit
def _dz_samp(z, lse, g, keep, log_norm, NCE: tl.constexpr):
    """dL/dz of a sampled tile times the upstream g: p (softmax) or sigmoid(z') (NCE); 0 where dropped."""
    if NCE:
        d = 1.0 / (1.0 + tl.exp(-(z - log_norm)))
    else:
        d = tl.exp(z - lse[:, None])
    return tl.where(keep, d * g[:, None], 0.0)


@triton.jit
def _sm_true_kernel(x, w, bias, labels, logq_t, valid, lse_in, grad, scale, dx, dzt,
                    N, D, T, stride_x, stride_w, stride_l, stride_g, log_norm,
                    HAS_BIAS: tl.constexpr, NCE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """grid (cdiv(N, BM),). Program: BM rows; per true column t: dz_it (upstream folded in) stored to ``dzt``
    (N, T) and (dz_it / sigma) * W[y_it] added to its rows of the fp32 ``dx`` (N, D): the true-label terms
    of grad_input (2*N*T*D FLOPs on CUDA cores; T is small), in the scale of the sampled columns' dX GEMM,
    whose last chunk multiplies sigma (``scale``, a power of two) back."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    ok = tl.load(valid + rows64, mask=rmask, other=0) != 0
    g = tl.where(ok, tl.load(grad + rows64 * stride_g, mask=rmask, other=0.0).to(tl.float32), 0.0)
    lse = tl.load(lse_in + rows64, mask=rmask, other=0.0)
    inv_sigma = 1.0 / tl.load(scale)
    invT = 1.0 / T
    for t in range(0, T):
        y = tl.load(labels + rows64 * stride_l + t, mask=rmask, other=0).to(tl.int64)
        z = _true_logit(x, w, bias, rows64, rmask, y, D, stride_x, stride_w, HAS_BIAS, BM, BK) \
            - tl.load(logq_t + rows64 * T + t, mask=rmask, other=0.0)
        d = _dz_true(z, lse, g, invT, log_norm, NCE)
        tl.store(dzt + rows64 * T + t, d, mask=rmask)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            km = ks < D
            msk = rmask[:, None] & km[None, :]
            wt = tl.load(w + y[:, None] * stride_w + ks[None, :], mask=msk, other=0.0).to(tl.float32)
            ptrs = dx + rows64[:, None] * D + ks[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + (d * inv_sigma)[:, None] * wt, mask=msk)
        tl.debug_barrier()


@triton.jit
def _sm_dz_kernel(x, w, bias, labels, samp, logq_s, last, valid, lse_in, grad, scale, dz,
                  N, D, T, c0, MC, stride_dz, stride_x, stride_w, stride_l, stride_g, log_norm,
                  HAS_BIAS: tl.constexpr, NCE: tl.constexpr, REMOVE_HITS: tl.constexpr, ALL_HITS: tl.constexpr,
                  DOT_F32: tl.constexpr, IEEE: tl.constexpr, RNE_BF16: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """dz of sampled columns [c0, c0 + MC) for a (BM rows, BN columns) tile; grid (cdiv(N, BM) * cdiv(MC, BN),)
    in grouped order. The logit tile is recomputed (``_samp_tile``: 2*BM*BN*D FLOPs on tensor cores) and
    ``dz = (g / sigma) * p`` (softmax) or ``(g / sigma) * sigmoid(z')`` (NCE; sigma = ``scale``, a power of
    two near max|g| for 16-bit dz, so that it neither overflows nor underflows), 0 where dropped, written
    once in dz's dtype to the (N, MC) chunk buffer (zeros in the columns from MC to a multiple of 16, which
    the GEMMs read). The GEMMs then take the chunk (``linear_cross_entropy``'s dW and dX kernels)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(MC, BN), GROUP)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    lc = pid_n * BN + tl.arange(0, BN)
    cmask = lc < MC
    ok = tl.load(valid + rows64, mask=rmask, other=0) != 0
    g = tl.where(ok, tl.load(grad + rows64 * stride_g, mask=rmask, other=0.0).to(tl.float32), 0.0) / tl.load(scale)
    lse = tl.load(lse_in + rows64, mask=rmask, other=0.0)
    z, ids, keep = _samp_tile(x, w, bias, labels, rows64, rmask, samp, logq_s, last, c0 + lc, cmask, D, T, stride_x,
                              stride_w, stride_l, HAS_BIAS, REMOVE_HITS, ALL_HITS, DOT_F32, IEEE, BM, BN, BK)
    d = tl.where(rmask[:, None] & cmask[None, :], _dz_samp(z, lse, g, keep, log_norm, NCE), 0.0)
    _store(dz + rows64[:, None] * stride_dz + lc[None, :], d, rmask[:, None] & (lc < (MC + 15) // 16 * 16)[None, :],
           RNE_BF16)


@triton.jit
def _seg_sum_kernel(rows, order, ids, out, n, D, BY_ID: tl.constexpr, RNE_BF16: tl.constexpr, BD: tl.constexpr):
    """grid (n,). ``ids`` (n,) sorted (stably), ``order`` (n,) the rows' positions before the sort. Program p,
    if it starts a run of equal ids, sums ``rows[order[q]]`` (fp32, (., D)) over the run in order and writes the
    sum once, cast to ``out``'s dtype: at ``out[id]`` (``BY_ID``: a dense (V, D) gradient whose untouched rows
    stay as they were) or at ``out[last position of the run]`` (the sparse form). Other programs exit at once.
    Bytes: each contribution row read once (4*D), each touched class written once (D in out's dtype); no
    atomics, so deterministic. A run of r rows is summed serially by one program."""
    p = tl.program_id(0).to(tl.int64)
    my = tl.load(ids + p)
    prev = tl.load(ids + tl.maximum(p - 1, 0))
    if (p == 0) | (prev != my):
        e = p + 1
        nxt = tl.load(ids + tl.minimum(e, n - 1))
        while (e < n) & (nxt == my):
            e += 1
            nxt = tl.load(ids + tl.minimum(e, n - 1))
        dst = my if BY_ID else e - 1
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dm = d < D
            acc = tl.zeros([BD], tl.float32)
            for q in range(p, e):
                src = tl.load(order + q)
                acc += tl.load(rows + src * D + d, mask=dm, other=0.0)
            if RNE_BF16:
                acc = round_to_bf16(acc)
            tl.store(out + dst * D + d, acc.to(out.dtype.element_ty), mask=dm)


def _cfg(x, forward=False):
    """Fixed tiles (no autotune: deterministic): interpreter 16^3; fp32 32x64x32 (4 warps forward, 8 backward);
    16-bit 64x128x32, 8 warps. Chosen from the sm_90 compile with triton 3.6 (the GPU image): no register
    spills in any variant of the three kernels (BK = 64 spilled 200-490 bytes per thread in the 16-bit
    backward kernels; 4 warps 24-64 bytes in the fp32 backward; 8 warps 40-48 in the fp32 forward)."""
    import torch
    if interpreting():
        return dict(BM=16, BN=16, BK=16, num_warps=4)
    if x.dtype == torch.float32:
        return dict(BM=32, BN=64, BK=32, num_warps=4 if forward else 8)
    return dict(BM=64, BN=128, BK=32, num_warps=8)


def _flags(x, bias, nce, remove_hits, all_hits):
    """The kernels' constexpr flags."""
    import torch
    return dict(HAS_BIAS=bias is not None, NCE=nce, REMOVE_HITS=remove_hits, ALL_HITS=all_hits,
                DOT_F32=interpreting(), IEEE=x.dtype == torch.float32)


def chunk_columns(m, D, BN):
    """Sampled columns per backward chunk: the (N, chunk) dz buffer stays within a few times the (N, D)
    gradient (the memory bound O(N*D + m*D)) while each chunk's dW GEMM (chunk x D outputs) has enough
    tiles to fill the GPU: max(2048, 4*D) columns, a multiple of the dz tile width BN, at most m."""
    mc = max(2048, 4 * D) // BN * BN
    return max(1, min(m, max(BN, mc)))


def _group_views(samp, logq_s, last, group, valid):
    """Per sample group g of ``samp (G, m)``: ``(its (1, m) ids, log Q and last-occurrence rows, the valid
    flags of its rows only, its rows (N,) bool or None when G = 1)``. The kernels take one group; G > 1
    launches them once per group, rows outside the group masked as invalid (so their loss and gradient are 0
    in that launch). No host sync: the row groups stay on the device. (Each launch streams all N rows: G times
    the work, so the automatic backend runs G > 1 on the torch backend; ``backend="triton"`` gets this path.)"""
    for g in range(samp.shape[0]):
        mine = None if samp.shape[0] == 1 else group == g
        v = valid if mine is None else (valid.bool() & mine).to(valid.dtype)
        yield samp[g:g + 1], logq_s[g:g + 1], last[g:g + 1], v, mine


def _sampled_gemms(x, w, bias, labels, samp, logq_s, last, valid, lse, grad, sigma, dx, dws, dbs, strides, fl, c,
                   blas):
    """The sampled columns' part of the backward, per chunk of ``chunk_columns``: ``_sm_dz_kernel`` writes the
    chunk's dz / sigma (N x chunk, x's dtype), then ``linear_cross_entropy``'s GEMM kernels: grad_W_S rows and
    grad_b_S of the chunk complete in one GEMM over the rows (K = N) into the fp32 ``dws``/``dbs`` (None:
    not wanted), sigma multiplied back, and dz @ W_S added to the fp32 ``dx`` (K = the chunk: one
    read-modify-write of dx per chunk; the last chunk multiplies the whole of ``dx``, the true-label terms
    included, by sigma). W_S (m x D) is gathered once, contiguous, for the dX GEMM. ``blas`` (bf16 on CUDA
    with torch >= 2.10 and linear CE's ``BLAS`` "dwdx" stage, the default; sigma is 1 there): the two GEMMs
    are torch.mm's (fp32 outputs), as in linear CE."""
    import torch
    N, D = x.shape
    m = samp.numel()
    ids = samp.reshape(-1)
    kind = _kind(x)
    ZM, ZN, ZK, zw = c["BM"], c["BN"], c["BK"], c["num_warps"]
    GM, GN, GK, gw, gs = _GEMM_TILES[kind]
    mc = chunk_columns(m, D, ZN)
    dz = torch.empty(N, -(-mc // 16) * 16, dtype=x.dtype, device=x.device)
    w_s = w.index_select(0, ids)  # (m, D), contiguous
    dot = dict(DOT_F32=fl["DOT_F32"], IEEE=fl["IEEE"], GROUP=8)
    nof = dict(HAS_FILTER=False, FR=16, FC=32, NR=1, NC=1)  # no filter blocks (dz is the flags' placeholder)
    for c0 in range(0, m, mc):
        vc = min(mc, m - c0)
        _sm_dz_kernel[(triton.cdiv(N, ZM) * triton.cdiv(vc, ZN),)](
            x, w, bias if bias is not None else x, labels, samp, logq_s, last, valid, lse, grad, sigma, dz,
            N, D, labels.shape[1], c0, vc, dz.stride(0), *strides, RNE_BF16=rne_bf16(dz), BM=ZM, BN=ZN, BK=ZK,
            num_warps=zw, **fl, GROUP=8)
        if blas:
            if dws is not None:
                _mm_f32(dz[:, :vc].t(), x, dws[c0:c0 + vc], False)
                torch.sum(dz[:, :vc], 0, dtype=torch.float32, out=dbs[c0:c0 + vc])
            _mm_f32(dz[:, :vc], w_s[c0:c0 + vc], dx, True)
            continue
        if dws is not None:
            _lce_dw_kernel[(triton.cdiv(vc, GM) * triton.cdiv(D, GN),)](
                dz, x, sigma, dws, dbs, dz, N, D, c0, vc, dz.stride(0), x.stride(0), 0, HAS_BIAS=True,
                RNE_BF16=False, BV=GM, BD=GN, BK=GK, num_warps=gw, num_stages=gs, **nof, **dot)
        _lce_dx_kernel[(triton.cdiv(N, GM) * triton.cdiv(D, GN),)](
            dz, w_s, sigma, dx, dx, dz, N, D, c0, vc, dz.stride(0), w_s.stride(0), 0, FIRST=False, LAST=c0 + vc == m,
            RNE_BF16=False, BM=GM, BD=GN, BK=GK, num_warps=gw, num_stages=gs, **nof, **dot)


def fwd(x, w, bias, labels, logq_t, samp, logq_s, last, group, valid, nce, remove_hits, all_hits, log_norm):
    """(per-row loss (N,) fp32, lse (N,) fp32; 0 on invalid rows). ``samp (G, m)``: one launch of
    ``_sm_fwd_kernel`` per sample group (:func:`_group_views`); each row takes its group's result."""
    import torch
    if samp.shape[0] > 1:
        loss = lse = None
        for s_g, q_g, l_g, v_g, mine in _group_views(samp, logq_s, last, group, valid):
            lg, eg = fwd(x, w, bias, labels, logq_t, s_g, q_g, l_g, group, v_g, nce, remove_hits, all_hits,
                         log_norm)
            loss, lse = (lg, eg) if loss is None else (torch.where(mine, lg, loss), torch.where(mine, eg, lse))
        return loss, lse
    N, D = x.shape
    T = labels.shape[1]
    m = samp.numel()
    loss = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return loss, lse
    c = _cfg(x, forward=True)
    _sm_fwd_kernel[(triton.cdiv(N, c["BM"]),)](
        x, w, bias if bias is not None else x, labels, logq_t, samp, logq_s, last, valid, loss, lse,
        N, D, T, m, x.stride(0), w.stride(0), labels.stride(0), log_norm, **_flags(x, bias, nce, remove_hits,
                                                                                   all_hits), **c)
    return loss, lse


def bwd(grad, x, w, bias, labels, logq_t, samp, logq_s, last, group, valid, lse, nce, remove_hits, all_hits,
        log_norm, sparse, need_dw=True):
    """``(dx, dw, db, keys, ends)`` in the inputs' dtypes, as ``tri_losses._torch.sampled.bwd`` (``samp (G, m)``:
    the dX and dW kernels once per sample group, :func:`_group_views`, then one ordered sum per class).
    Dense: ``dw`` is zero-filled in W's dtype (V*D*s bytes) and each touched class row written once; no fp32
    (V, D) buffer. Sparse: the sorted contributions' ids ``keys``, ``ends`` marking each run's last entry,
    where ``dw``/``db`` hold the run's sum. Without ``need_dw`` only dX (the dW GEMM skipped). Extra memory:
    fp32 dX (N, D), the S dW partials (S, m, D) and the true-label terms (N*T, D)."""
    import torch
    N, D = x.shape
    V = w.shape[0]
    T = labels.shape[1]
    G, m = samp.shape
    dev = x.device
    c = _cfg(x)
    dx = torch.zeros(N, D, dtype=torch.float32, device=dev)  # (the true-label kernel adds into it)
    dzt = torch.empty(N, T, dtype=torch.float32, device=dev)  # (written whole by the true-label kernel)
    fl = _flags(x, bias, nce, remove_hits, all_hits)
    strides = (x.stride(0), w.stride(0), labels.stride(0), grad.stride(0) if grad.dim() else 0, log_norm)
    blas = "dwdx" in _blas_stages(x, False)
    # 16-bit dz through the Triton GEMMs holds dz / sigma (sigma: a power of two near max|g|), so that a large
    # upstream (a loss scaler's 2**16) does not overflow fp16 and a small one (a mean) does not underflow it
    # (over the valid rows only: an ignored row's upstream reaches no gradient)
    sigma = (_upstream_scale(torch.where(valid.bool(), grad, 0.0)) if m and x.element_size() == 2 and not blas
             else torch.ones(1, dtype=torch.float32, device=dev))
    w_parts, b_parts = [], []  # per group: grad_W_S (m, D) and grad_b_S (m,), in group order (samp's order)
    for s_g, q_g, l_g, v_g, mine in _group_views(samp, logq_s, last, group, valid):
        dx_g, dzt_g = (dx, dzt) if mine is None else (torch.zeros_like(dx), torch.empty_like(dzt))
        # grad_W_S / grad_b_S: written whole by the dW kernel when there are rows and features, else zeros
        new = torch.empty if N and D else torch.zeros
        dws = new(m, D, dtype=torch.float32, device=dev) if need_dw else None
        dbs = new(m, dtype=torch.float32, device=dev) if need_dw else None
        if N:
            _sm_true_kernel[(triton.cdiv(N, c["BM"]),)](
                x, w, bias if bias is not None else x, labels, logq_t, v_g, lse, grad, sigma, dx_g, dzt_g, N, D, T,
                *strides, HAS_BIAS=bias is not None, NCE=nce, BM=c["BM"], BK=c["BK"], num_warps=c["num_warps"])
            if m:
                _sampled_gemms(x, w, bias, labels, s_g, q_g, l_g, v_g, lse, grad, sigma, dx_g, dws, dbs, strides, fl,
                               c, blas)
        if mine is not None:  # each row's terms come from its own group's launch (0 in the others)
            dx, dzt = torch.where(mine[:, None], dx_g, dx), torch.where(mine[:, None], dzt_g, dzt)
        if need_dw:
            w_parts.append(dws)
            b_parts.append(dbs)
    if not need_dw:
        return (dx.to(x.dtype), w.new_empty(0), x.new_empty(0), samp.new_empty(0, dtype=torch.int64),
                samp.new_empty(0, dtype=torch.bool))
    # contributions: grad_W_S's rows (the S partials summed in split order: a fixed-order reduction), then the
    # true-label terms x_i * dz_it; ignored rows add exact zeros: their placeholder ids are spread over the
    # sampled ids (one long run would be summed serially; sampled ids are in the result anyway, so that the
    # sparse form lists only the classes a live row or a sample touches)
    true_rows = (x.float()[:, None, :] * dzt[:, :, None]).reshape(N * T, D)
    flat = samp.reshape(-1).long()  # (num_sampled >= 1: never empty)
    spread = flat[torch.arange(N * T, device=dev) % flat.numel()].view(N, T)
    lab_ids = torch.where(valid.bool()[:, None], labels.long(), spread)
    keys, order = torch.sort(torch.cat([flat, lab_ids.reshape(-1)]), stable=True)
    n = keys.numel()
    w_rows = torch.cat(w_parts + [true_rows])
    b_rows = torch.cat(b_parts + [dzt.reshape(-1)])[:, None]
    shape_w, shape_b = ((n, D), (n, 1)) if sparse else ((V, D), (V, 1))
    dw = torch.zeros(shape_w, dtype=w.dtype, device=dev)
    db = torch.zeros(shape_b, dtype=bias.dtype, device=dev) if bias is not None else None
    for src, out, width in ((w_rows, dw, D), (b_rows, db, 1)):
        if out is not None and n:
            _seg_sum_kernel[(n,)](src, order, keys, out, n, width, BY_ID=not sparse, RNE_BF16=rne_bf16(out),
                                  BD=min(triton.next_power_of_2(max(width, 16)), 1024))
    db = db[:, 0] if db is not None else x.new_empty(0)
    if sparse:
        ends = torch.ones(n, dtype=torch.bool, device=dev)
        ends[:-1] = keys[1:] != keys[:-1]
        return dx.to(x.dtype), dw, db, keys, ends
    return dx.to(x.dtype), dw, db, keys.new_empty(0), keys.new_empty(0, dtype=torch.bool)
