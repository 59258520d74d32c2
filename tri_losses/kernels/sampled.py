"""Triton kernels for sampled softmax / NCE with shared negatives (one group: every row sees the same m ids).

Row i: true logits ``z_it = x_i . W[y_it] + b - logq_it`` and sampled logits ``z_ij = x_i . W[S_j] + b - logq_j``;
hits (``S_j`` equal to one of the row's labels, at ``S_j``'s last position with TF's policy) are dropped by a
predicate in registers (no N x m mask in memory).

  _sm_fwd_kernel  grid (cdiv(N, BM),): true logits by row gathers; sampled logit tiles x @ W_S^T on tensor
                  cores (fp32 accumulation over BK slices); an online log-sum-exp (softmax) or a softplus sum
                  (NCE) per row; the N x (T + m) logits never reach memory. Writes the row loss and lse.
  _sm_dx_kernel   grid (cdiv(N, BM),): recomputes the tiles, dz in registers (upstream folded in), adds
                  dz @ W_S into its rows of an fp32 (N, D) buffer, plus the true-label terms.
  _sm_dw_kernel   grid (cdiv(m, BN),): owns BN sampled columns, loops over row tiles in order:
                  grad_W_S = dz^T @ X and grad_b_S (fp32, deterministic).
  _seg_sum_kernel grid (n,): rows of (grad_W_S; true-label terms x_i dz_it), stably sorted by class id; the
                  program at the start of each run of equal ids sums the run in order and writes the class's
                  row once (no atomics).
FLOPs: forward 2*N*(m+T)*D, backward recomputes 2*2*N*m*D plus 2*2*N*m*D useful; extra memory
O(N*D + m*D + N*T*D) (the true-label contributions), never N x m.
"""
import triton
import triton.language as tl

from ._math import interpreting, softplus
from .linear_cross_entropy import _acc_dot, _logit_tile


@triton.jit
def _samp_tile(x, w, bias, labels, rows64, rmask, samp, logq_s, last, cols, cmask, D, T, stride_x, stride_w, stride_l,
               HAS_BIAS: tl.constexpr, REMOVE_HITS: tl.constexpr, ALL_HITS: tl.constexpr, DOT_F32: tl.constexpr,
               IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(z (BM, BN) fp32 sampled logits minus log Q, gathered ids, keep mask) for one row x column tile."""
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
            s = s * tl.exp(mx - m_new) + tl.exp(z - m_new)
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
            s = s * tl.exp(mx - m_new) + tl.sum(tl.exp(zk - m_new[:, None]), axis=1)
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
    if NCE:
        zz = z - log_norm
        return g * (1.0 / (1.0 + tl.exp(-zz)) - invT)
    return g * (tl.exp(z - lse) - invT)


@triton.jit
def _dz_samp(z, lse, g, keep, log_norm, NCE: tl.constexpr):
    if NCE:
        d = 1.0 / (1.0 + tl.exp(-(z - log_norm)))
    else:
        d = tl.exp(z - lse[:, None])
    return tl.where(keep, d * g[:, None], 0.0)


@triton.jit
def _sm_dx_kernel(x, w, bias, labels, logq_t, samp, logq_s, last, valid, lse_in, grad, dx, dzt,
                  N, D, T, m, stride_x, stride_w, stride_l, stride_g, log_norm,
                  HAS_BIAS: tl.constexpr, NCE: tl.constexpr, REMOVE_HITS: tl.constexpr, ALL_HITS: tl.constexpr,
                  DOT_F32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    ok = tl.load(valid + rows64, mask=rmask, other=0) != 0
    g = tl.where(ok, tl.load(grad + rows64 * stride_g, mask=rmask, other=0.0).to(tl.float32), 0.0)
    lse = tl.load(lse_in + rows64, mask=rmask, other=0.0)
    invT = 1.0 / T
    # true-label terms: dz_it (kept for grad_W), dx += dz_it * W[y_it]
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
            tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + d[:, None] * wt, mask=msk)
        tl.debug_barrier()
    for c0 in range(0, m, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < m
        z, ids, keep = _samp_tile(x, w, bias, labels, rows64, rmask, samp, logq_s, last, cols, cmask, D, T, stride_x,
                                  stride_w, stride_l, HAS_BIAS, REMOVE_HITS, ALL_HITS, DOT_F32, IEEE, BM, BN, BK)
        d = _dz_samp(z, lse, g, keep, log_norm, NCE)
        _acc_dot(d, w, ids, cmask, stride_w, dx, rows64, rmask, D, 1.0, IEEE, BK)
        tl.debug_barrier()


@triton.jit
def _sm_dw_kernel(x, w, bias, labels, logq_t, samp, logq_s, last, valid, lse_in, grad, dws, dbs,
                  N, D, T, m, stride_x, stride_w, stride_l, stride_g, log_norm,
                  HAS_BIAS: tl.constexpr, NCE: tl.constexpr, REMOVE_HITS: tl.constexpr, ALL_HITS: tl.constexpr,
                  DOT_F32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < m
    cols64 = cols.to(tl.int64)
    db = tl.zeros([BN], tl.float32)
    for r0 in range(0, N, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        ok = tl.load(valid + rows64, mask=rmask, other=0) != 0
        g = tl.where(ok, tl.load(grad + rows64 * stride_g, mask=rmask, other=0.0).to(tl.float32), 0.0)
        lse = tl.load(lse_in + rows64, mask=rmask, other=0.0)
        z, ids, keep = _samp_tile(x, w, bias, labels, rows64, rmask, samp, logq_s, last, cols, cmask, D, T, stride_x,
                                  stride_w, stride_l, HAS_BIAS, REMOVE_HITS, ALL_HITS, DOT_F32, IEEE, BM, BN, BK)
        d = _dz_samp(z, lse, g, keep, log_norm, NCE)
        db += tl.sum(d, axis=0)
        _acc_dot(tl.trans(d), x, rows64, rmask, stride_x, dws, cols64, cmask, D, 1.0, IEEE, BK)
        tl.debug_barrier()
    tl.store(dbs + cols64, db, mask=cmask)


@triton.jit
def _seg_sum_kernel(rows, ids, out, n, D, BD: tl.constexpr):
    """Program p: if p starts a run of equal (sorted) ids, sum the run's rows in order into out[id]."""
    p = tl.program_id(0).to(tl.int64)
    my = tl.load(ids + p)
    prev = tl.load(ids + tl.maximum(p - 1, 0))
    if (p == 0) | (prev != my):
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dm = d < D
            acc = tl.zeros([BD], tl.float32)
            q = p
            while q < n:
                if tl.load(ids + q) == my:
                    acc += tl.load(rows + q * D + d, mask=dm, other=0.0)
                    q += 1
                else:
                    q = q * 0 + n  # stays int64 (loop-carried types must not change when compiled)
            tl.store(out + my * D + d, acc, mask=dm)



def _cfg(x):
    import torch
    if interpreting():
        return dict(BM=16, BN=16, BK=16, num_warps=4)
    if x.dtype == torch.float32:
        return dict(BM=32, BN=64, BK=32, num_warps=4)
    return dict(BM=64, BN=128, BK=64, num_warps=8)


def _flags(x, bias, nce, remove_hits, all_hits):
    import torch
    return dict(HAS_BIAS=bias is not None, NCE=nce, REMOVE_HITS=remove_hits, ALL_HITS=all_hits,
                DOT_F32=interpreting(), IEEE=x.dtype == torch.float32)


def fwd(x, w, bias, labels, logq_t, samp, logq_s, last, valid, nce, remove_hits, all_hits, log_norm):
    import torch
    N, D = x.shape
    T = labels.shape[1]
    m = samp.numel()
    loss = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return loss, lse
    c = _cfg(x)
    _sm_fwd_kernel[(triton.cdiv(N, c["BM"]),)](
        x, w, bias if bias is not None else x, labels, logq_t, samp, logq_s, last, valid, loss, lse,
        N, D, T, m, x.stride(0), w.stride(0), labels.stride(0), log_norm, **_flags(x, bias, nce, remove_hits,
                                                                                   all_hits), **c)
    return loss, lse


def bwd(x, w, bias, labels, logq_t, samp, logq_s, last, valid, lse, grad, nce, remove_hits, all_hits, log_norm):
    """(dx fp32 (N, D), dW fp32 (V, D), db fp32 (V,) or None), W's rows assembled without atomics."""
    import torch
    N, D = x.shape
    V = w.shape[0]
    T = labels.shape[1]
    m = samp.numel()
    dx = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    dzt = torch.zeros(N, T, dtype=torch.float32, device=x.device)
    dws = torch.zeros(m, D, dtype=torch.float32, device=x.device)
    dbs = torch.zeros(m, dtype=torch.float32, device=x.device)
    c = _cfg(x)
    fl = _flags(x, bias, nce, remove_hits, all_hits)
    args = (x, w, bias if bias is not None else x, labels, logq_t, samp, logq_s, last, valid, lse, grad)
    shape = (N, D, T, m, x.stride(0), w.stride(0), labels.stride(0), grad.stride(0) if grad.dim() else 0, log_norm)
    if N:
        _sm_dx_kernel[(triton.cdiv(N, c["BM"]),)](*args, dx, dzt, *shape, **fl, **c)
    if m:
        _sm_dw_kernel[(triton.cdiv(m, c["BN"]),)](*args, dws, dbs, *shape, **fl, **c)
    # (V, D): rows of grad_W_S and the true-label terms x_i * dz_it, stably sorted by class id, run sums
    true_rows = (x.float()[:, None, :] * dzt[:, :, None]).reshape(N * T, D)
    all_rows = torch.cat([dws, true_rows], 0)
    # ignored rows add exact zeros: spread their placeholder ids over the classes (one long run of a
    # placeholder class would be summed serially by one program)
    spread = (torch.arange(N * T, device=x.device) % max(V, 1)).view(N, T)
    lab_ids = torch.where(valid.bool()[:, None], labels.long(), spread)
    all_ids = torch.cat([samp.reshape(-1).long(), lab_ids.reshape(-1)])
    order = torch.sort(all_ids, stable=True).indices
    srt_rows = all_rows[order].contiguous()
    srt_ids = all_ids[order].contiguous()
    dw = torch.zeros(V, D, dtype=torch.float32, device=x.device)
    n = srt_ids.numel()
    if n:
        _seg_sum_kernel[(n,)](srt_rows, srt_ids, dw, n, D, BD=min(triton.next_power_of_2(max(D, 16)), 1024))
    db = None
    if bias is not None:
        b_rows = torch.cat([dbs, dzt.reshape(-1)])[order].contiguous()[:, None]
        db = torch.zeros(V, 1, dtype=torch.float32, device=x.device)
        if n:
            _seg_sum_kernel[(n,)](b_rows, srt_ids, db, n, 1, BD=16)
        db = db[:, 0]
    return dx, dw, db
