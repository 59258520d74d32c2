"""Triton kernels for the fused linear + cross-entropy (the N x V logits are never held whole: logit tiles stay
on chip in the Triton GEMM kernels; bf16 on CUDA with torch >= 2.10 (``BLAS``, the default there) holds one fp32
(N, VC) chunk of them at a time, from cuBLAS).

N rows, V classes, D features, s = bytes per element of x/W (2 for bf16/fp16). Logit tiles
``z = x @ W.T + b`` (fp32 accumulation over BK-wide slices of D) are reduced as
``kernels/cross_entropy.py`` reduces a row: the same ``ce_target_weights`` / ``ce_row_finish_rel`` helpers,
so both ops share one semantics. The softmax is formed from the row maximum, ``p = exp((z - m) - log s)``
with ``m`` and ``log s`` saved by the forward (never ``exp(z - lse)``, which loses ~ulp(lse) of relative
precision at large logits).

Forward (2*N*V*D FLOPs):
  _lce_fwd_split_kernel  grid (GROUP * S, cdiv(cdiv(N, BM), GROUP)): the program of row tile i and vocab
                         split k streams their logit tiles and writes row partials (m, s, A, sum a*z, z_y)
                         to an fp32 (S, 5, N) buffer. Grouped order: the programs resident together
                         cover GROUP row tiles x (SMs / GROUP) splits, so their X tiles stay in L2 while
                         each W tile is read from HBM once per group (``split_plan`` picks S: at least
                         SMs / GROUP splits, the count that fills the last wave best).
  _lce_fwd_finish_kernel grid (cdiv(N, 128),): combines the S partials in split order (deterministic);
                         writes loss, stats = (m, log s) and the coefficients (c1, c2, c3): 24 B per row.
                         PARTIAL (vocab-parallel): writes the combined row sums (N, 5) instead.
                         ENTROPY (``return_entropy``): a sixth partial, sum exp(z - m) (z - m), carried
                         beside s (re-based as the max moves); the finish writes log s - q / s per row
                         (PARTIAL: a sixth column). The backward's dz then adds the entropy upstream's
                         g_H * p * ((log s - H) - (z - m)) (``HAS_ENT_GRAD``).
  (``BLAS`` "fwd", bf16: per chunk of classes, fp32 logits from torch.mm and cross-entropy's PARTIAL row
  kernel over them; the finish kernel's REL mode merges each middle chunk's sums into running (N, 5) sums,
  then combines them with the last chunk's and finishes.)
Vocab-parallel (the head is one contiguous shard of the classes): ``class_offset`` and ``VT`` (the whole
vocabulary's size) place the head's rows among the global class ids of the targets and of the smoothing
terms; the W/bias/class-weight reads and the gradients stay local. Unsharded calls pass 0 and V.

Backward, per vocabulary chunk c of VC classes (VC from a memory budget; 6*N*V*D FLOPs in all, on tensor
cores for 16-bit inputs; one upstream scale ``sigma``, a power of two near max|g|, keeps the 16-bit dz
away from underflow after a mean and is undone exactly in the fp32 epilogues; with ``BLAS`` "dz" the dz of
bf16 inputs comes from fp32 torch.mm logits and cross-entropy's backward kernel, with "dwdx" the dW and dX
GEMMs go to torch.mm, and sigma = 1):
  _lce_dz_kernel  grid (cdiv(N, BM) * cdiv(VC, BN),), grouped order: the GEMM tile X @ W_c.T whose
                  epilogue forms dz = (g / sigma) * (c1*p - c2*a - c3*[j == y]) * softcap'(z) and writes
                  it once in the input dtype to an (N, VC) buffer. 2*N*VC*D FLOPs; writes N*VC*s.
  _lce_dw_kernel  grid (cdiv(VC, BV) * cdiv(D, BD),): dW_c = sigma * dz.T @ X, complete in one GEMM
                  (K = N) and written once in W's dtype (no fp32 V x D buffer, no zero fill); the
                  programs of the first D tile also write the bias gradient sigma * sum_n dz.
                  2*N*VC*D FLOPs; writes VC*D*s.
  _lce_dx_kernel  grid (cdiv(N, BM) * cdiv(D, BD),): dX += dz @ W_c (K = VC) with one fp32
                  read-modify-write of an (N, D) accumulator per chunk (none for the first chunk); the
                  last chunk writes sigma * dX once in the input dtype. 2*N*VC*D FLOPs.
Gradient filtering (opt-in ``filter_eps``, the public docstring defines it): the dz epilogue zeroes
every (FILTER_ROWS, FILTER_COLS) block of dz (a fixed grid of the rows and of the head's classes, the
torch backend's too) whose softmax entries on live rows are all below ``filter_eps`` and which holds no
live row's target column, and writes one int8 flag per block (1: all zero) to an (cdiv(N, FR), cdiv(VC,
FC)) buffer; the dW and dX kernels skip the loads and the dot of a K slice whose blocks are all flagged
(device-side branch: no host sync, and skipping a zero contribution leaves the sums bitwise as they were).
Extra memory: the (N, VC) dz chunk, the fp32 (N, D) dX accumulator (with several chunks, or with cuBLAS's
dX), the (S, 5, N) forward partials; with ``BLAS``, an fp32 (N, VC) logits chunk and (2, N, 5) running sums:
O(N*D + chunk + N); the gradients themselves are O(N*D + V*D).
Every sum has one owner program and a fixed order: deterministic, no atomics (cuBLAS's GEMMs, no atomics
either, repeat bitwise on one GPU model and cuBLAS version). Offsets are int64.
In the interpreter, 16-bit tiles are cast to fp32 before ``tl.dot`` (it would act on raw bits) and
bf16 stores round to nearest first (``round_to_bf16``); fp32 inputs use ``input_precision="ieee"``.
"""
import triton
import triton.language as tl

from ._math import interpreting, rne_bf16, round_to_bf16
from ._tiles import _dot, _logit_tile, _logit_tile_desc, _store, _tile_ids
from .cross_entropy import (ce_bwd, ce_partial, ce_row_finish_rel, ce_target_weights, load_target, local_target,
                            lse_low_part, smooth_weights)

DZ_BYTES = 1 << 28  # default budget for a chunk: the backward's dz (and with BLAS its fp32 logits) (256 MiB)
# default width of a chunk in classes, within DZ_BYTES: each backward chunk adds one read-modify-write of the
# fp32 (N, D) dX accumulator, about 8 * 6e14 / (6 * CHUNK_CLASSES * 3e12) of the chunk's GEMM time on an
# H100 (3% at 8192 classes, whatever N and D), while dz takes N * CHUNK_CLASSES * s bytes: 64 MiB at N=4096
# (192 MiB with BLAS's fp32 logits beside it; DZ_BYTES alone gave 256 MiB of dz there, for a 1% time
# difference)
CHUNK_CLASSES = 8192
# the forward split kernel reads X and W through tensor descriptors (TMA on sm_90) where x and w allow it
# (``_tma_ok``); off until a GPU measurement picks it (bench/tune.py's ``lce-tma`` target times both)
FWD_TMA = False
# row tiles per group of the forward's grouped program order (``split_plan``)
FWD_GROUP = 8
# filter_eps's block of dz (rows, classes): the dz tiles are multiples of it, the chunks start on it; the
# torch backend uses the same block (tri_losses/_torch/linear_cross_entropy.py's FILTER_BLOCK)
FILTER_ROWS, FILTER_COLS = 16, 32


@triton.jit
def _lce_fwd_split_kernel(
    x, w, bias, target, cw, part, amax,
    N, V, D, VS, stride_xn, stride_wv, stride_t, class_offset, VT,
    ignore_index, smoothing, softcap,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, TARGET_LOGIT: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, TMA: tl.constexpr = False,
    ARGMAX: tl.constexpr = False, ENTROPY: tl.constexpr = False,
):
    """Forward partials of one (BM-row tile, vocab split [k*VS, (k+1)*VS)) pair; grid
    (GROUP * S, cdiv(cdiv(N, BM), GROUP)) in grouped order: program (i, j) takes row tile
    ``j * GROUP + i % GROUP`` (none past the last: such programs return) and split ``i // GROUP``, so the
    programs launched together share GROUP row tiles (constexpr divisions only).

    Streams the split's (BM, BN) logit tiles (an fp32 accumulator each, 2*BM*VS*D FLOPs) and writes the
    row partials (m, s, A, sum_at, t_y) to ``part[k, :, rows]`` (fp32 (S, 5, N)); reads BM*D*s of X per
    tile and VS*D*s of W. The head's V rows are classes ``class_offset + [0, V)`` of ``VT`` (vocab-parallel;
    else 0 and V): targets are global ids, smoothing is over VT.

    With no, torch or others smoothing (SMOOTH < 3) the target weights are ``a_c = w_c * off`` off the
    target and ``a_y = w_y * on`` (``smooth_weights``; w = 1 without class weights): the tiles only gather
    ``z_y`` and, when smoothing, the row sums of ``z_c`` (``w_c z_c``) over the other columns, and the
    split's weight sum; A and sum a*z follow after the loop (what the per-column sums of ``a`` and ``a*z``
    give, up to rounding). No (BM, BN) weight tile is formed: a weight tile costs 50-120 registers per
    thread on sm_90 (spills with triton 3.6). Gaussian smoothing (SMOOTH == 3) forms the tile.
    ``t_y`` (z_y) is stored only when needed (TARGET_LOGIT: no smoothing, or focal); else 0.
    ``TMA``: the X and W slices are read through tensor descriptors (``_logit_tile_desc``; x and w 16-byte
    aligned with 16-byte row strides, and a ``triton.set_allocator`` for the descriptors' scratch).
    ``ARGMAX``: also the split's first maximum of each row's (soft-capped) logits, as a column of the head,
    to ``amax[k, rows]`` (int32 (S, N); the split's max is ``part[k, 0, rows]``).
    ``ENTROPY``: ``part`` is (S, 6, N), its sixth field ``q = sum exp(z - m) (z - m)`` over the split (relative
    to the split's max m, a -inf logit adding 0), kept beside ``s`` as the running max moves.
    """
    pid_m = tl.program_id(1) * GROUP + tl.program_id(0) % GROUP
    k = tl.program_id(0) // GROUP
    if pid_m * BM >= N:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    y, _, _ = load_target(target + rows64 * stride_t, rmask, ignore_index, VT)
    m = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)
    A = tl.zeros([BM], tl.float32)
    sum_at = tl.zeros([BM], tl.float32)
    t_y = tl.zeros([BM], tl.float32)
    q = tl.zeros([BM], tl.float32)  # ENTROPY: sum exp(z - m) (z - m)
    w_sum = 0.0  # sum of the split's class weights (SMOOTH 1, 2 with HAS_WEIGHT)
    v_lo = k * VS
    best = tl.zeros([BM], tl.int32) + v_lo  # ARGMAX: the first column holding the running max
    yl, owned = local_target(y, class_offset, V)
    owned = owned & (yl >= v_lo) & (yl < v_lo + VS)  # the target is a column of this split
    y_here = tl.where(owned, yl, -1)
    if TMA:
        x_desc = tl.make_tensor_descriptor(x, shape=[N, D], strides=[stride_xn, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w, shape=[V, D], strides=[stride_wv, 1], block_shape=[BN, BK])
    for v0 in range(0, VS, BN):
        cols = v_lo + v0 + tl.arange(0, BN)
        cmask = cols < V
        if TMA:
            z = _logit_tile_desc(x_desc, w_desc, bias, pid_m * BM, v_lo + v0, cols.to(tl.int64), cmask, D,
                                 softcap, HAS_BIAS, HAS_SOFTCAP, DOT_F32, IEEE, BM, BN, BK)
        else:
            z = _logit_tile(x, w, bias, rows64, rmask, cols.to(tl.int64), cmask, D, stride_xn, stride_wv, softcap,
                            HAS_BIAS, HAS_SOFTCAP, DOT_F32, IEEE, BM, BN, BK)
        hit = cols[None, :] == y_here[:, None]
        if TARGET_LOGIT or SMOOTH == 1 or SMOOTH == 2:
            t_y += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if SMOOTH == 1 or SMOOTH == 2:  # off the target a_c = off * w_c: row sums of w_c and w_c * z_c
            if HAS_WEIGHT:
                wc = tl.load(cw + cols, mask=cmask, other=0.0).to(tl.float32)
                keep = ~hit & (wc != 0)[None, :]  # (a_c = 0: no a_c * z_c term, as ce_target_weights)
                w_sum += tl.sum(wc, axis=0)
                sum_at += tl.sum(tl.where(keep, wc[None, :] * z, 0.0), axis=1)
            else:
                sum_at += tl.sum(tl.where(hit | ~cmask[None, :], 0.0, z), axis=1)
        if SMOOTH == 3:  # gaussian: a genuine (rows, classes) weight tile
            wc = 0.0
            if HAS_WEIGHT:
                wc = tl.load(cw + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            a = ce_target_weights((class_offset + cols)[None, :], cmask[None, :], y[:, None], wc, 0.0, VT, smoothing,
                                  HAS_WEIGHT, False, SMOOTH)
            A += tl.sum(a, axis=1)
            sum_at += tl.sum(tl.where(a != 0, a * z, 0.0), axis=1)
        z_max = tl.max(z, axis=1)
        if ARGMAX:  # the tile's first column at its max; a later tile takes over only with a larger max (the
            # first maximum wins ties; NaN never: the max ignores it, and NaN rows get -1 from their lse later)
            first = tl.min(tl.where(z == z_max[:, None], (v0 + tl.arange(0, BN))[None, :], VS), axis=1)
            best = tl.where(z_max > m, v_lo + first, best)
        m_new = tl.maximum(m, z_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if ENTROPY:  # q re-based on the new max: alpha * (q + s * (m - m_new)) (nothing yet where s = 0)
            e = tl.exp(z - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            q = (tl.where(s > 0, (q + s * (m - m_safe)) * alpha, 0.0)
                 + tl.sum(tl.where(e > 0, e * (z - m_safe[:, None]), 0.0), axis=1))  # (-inf: exp 0, no term)
            s = s * alpha + tl.sum(e, axis=1)
        else:
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    if SMOOTH < 3:  # A and sum a z from the row sums, as the per-column sums of a and a*z would give
        on, off = smooth_weights(VT, smoothing, SMOOTH)
        a_y = tl.where(owned, on, 0.0)
        w_y = 1.0
        if HAS_WEIGHT:
            w_y = tl.load(cw + tl.where(owned, yl, 0), mask=owned & rmask, other=0.0).to(tl.float32)
            a_y = tl.where(a_y != 0, a_y * w_y, 0.0)
        if SMOOTH == 0:
            A = a_y
            sum_at = tl.where(a_y != 0, a_y * t_y, 0.0)
        else:  # the split's classes other than the target: their weights' sum (or count)
            if HAS_WEIGHT:
                A = w_sum - tl.where(owned, w_y, 0.0)
            else:
                A = tl.minimum(VS, V - v_lo) - owned.to(tl.float32)
            A = off * A + a_y
            sum_at = off * sum_at + tl.where(a_y != 0, a_y * t_y, 0.0)
    if not TARGET_LOGIT:
        t_y = tl.zeros([BM], tl.float32)
    n64 = tl.cast(N, tl.int64)  # f * N passes 2**31 from N = 2**29 rows
    NF: tl.constexpr = 6 if ENTROPY else 5
    base = part + k.to(tl.int64) * NF * n64 + rows64
    tl.store(base, m, mask=rmask)
    tl.store(base + n64, s, mask=rmask)
    tl.store(base + 2 * n64, A, mask=rmask)
    tl.store(base + 3 * n64, sum_at, mask=rmask)
    tl.store(base + 4 * n64, t_y, mask=rmask)
    if ENTROPY:
        tl.store(base + 5 * n64, q, mask=rmask)
    if ARGMAX:
        tl.store(amax + k.to(tl.int64) * n64 + rows64, best, mask=rmask)


@triton.jit
def _lce_fwd_finish_kernel(
    part, target, loss, stats, coef, ent, N, V, S, VS, class_offset, VL, stride_t, ignore_index, gamma, z_loss,
    HAS_FOCAL: tl.constexpr, HAS_ZLOSS: tl.constexpr, PARTIAL: tl.constexpr, REL: tl.constexpr,
    BLOCK: tl.constexpr, ENTROPY: tl.constexpr = False,
):
    """Combine the S vocab-split partials of BLOCK rows in split order (deterministic), then
    ``ce_row_finish_rel``: loss, stats (m, log s) and the backward coefficients (c1, c2, c3). Grid
    (cdiv(N, BLOCK),); reads 20*S*N + N*8 bytes, writes 24*N.

    ``part``: the split kernel's fp32 (S, 5, N) absolute sums (m, s, A, sum a*z, z_y); with ``REL`` (the
    cuBLAS forward) cross-entropy partials, fp32 (S, N, 5) = (m, s, A, sum a (z - m), z_y - m) relative
    to each split's own max (``kernels/cross_entropy.py``'s PARTIAL; ``m`` is 0 where ``s`` is), split k
    holding the head's classes [k*VS, min((k+1)*VS, VL)) (``class_offset``: where the head's sit among V).

    ``PARTIAL`` (vocab-parallel: the head is one shard of the classes): instead of finishing, writes the
    shard's row sums to ``coef`` (N, 5) = (m, s, A, sum a (z - m), z_y - m) (``m``: the max, 0 for an
    all -inf row; A and the sum 0 on ignored rows), which combine over the shards (``loss`` and
    ``stats`` are not written); ``V`` is then the whole vocabulary's size.

    ``ENTROPY`` (not with REL): the split kernel's (S, 6, N) partials; their ``q`` fields, re-based on the
    row's max, give each row's softmax entropy ``log s - q / s`` in ``ent`` (N,); with PARTIAL ``coef`` is
    (N, 6), its sixth column the re-based ``q``."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    y, ignored, bad = load_target(target + rows64 * stride_t, rmask, ignore_index, V)
    yl, _ = local_target(y, class_offset, VL)
    n64 = tl.cast(N, tl.int64)  # 5N and f * N pass 2**31 from N = 2**29 rows
    if REL:  # field f of split k at part + k*5N + 5*row + f
        first = part + rows64 * 5
        fs = 1
    else:  # at part + k*5N + f*N + row
        first = part + rows64
        fs = n64
    NF: tl.constexpr = 6 if ENTROPY else 5  # the fields of a split
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    base = first  # (split k's pointers advance by NF*N per step: no k * NF*N product to overflow int32)
    for k in range(0, S):
        mk = tl.load(base, mask=rmask, other=float("-inf"))
        if REL:  # (a split with no finite logit stores m = 0, s = 0)
            mk = tl.where(tl.load(base + fs, mask=rmask, other=0.0) != 0, mk, float("-inf"))
        m = tl.maximum(m, mk)
        base += NF * n64
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros([BLOCK], tl.float32)
    A = tl.zeros([BLOCK], tl.float32)
    sum_atm = tl.zeros([BLOCK], tl.float32)  # sum a (z - m_safe)
    t_ym = tl.zeros([BLOCK], tl.float32)  # z_y - m_safe
    q = tl.zeros([BLOCK], tl.float32)  # ENTROPY: sum exp(z - m_safe) (z - m_safe)
    base = first
    for k in range(0, S):
        mk = tl.load(base, mask=rmask, other=float("-inf"))
        sk = tl.load(base + fs, mask=rmask, other=0.0)
        if ENTROPY:
            alpha = tl.exp(mk - m_safe)
            q += tl.where(sk > 0, (tl.load(base + 5 * fs, mask=rmask, other=0.0) + sk * (mk - m_safe)) * alpha, 0.0)
        s += tl.where(sk > 0, sk * tl.exp(mk - m_safe), sk)
        ak = tl.load(base + 2 * fs, mask=rmask, other=0.0)
        A += ak
        if REL:  # re-base the split's sums on the row's max
            shift = mk - m_safe
            sum_atm += tl.load(base + 3 * fs, mask=rmask, other=0.0) + tl.where(ak != 0, ak * shift, 0.0)
            own = (yl >= k * VS) & (yl < tl.minimum(k * VS + VS, VL))
            t_ym += tl.where(own, tl.load(base + 4 * fs, mask=rmask, other=0.0) + shift, 0.0)
        else:
            sum_atm += tl.load(base + 3 * fs, mask=rmask, other=0.0)
            t_ym += tl.load(base + 4 * fs, mask=rmask, other=0.0)
        base += NF * n64
    if not REL:  # absolute sums: relative to the row's max
        sum_atm = sum_atm - A * m_safe
        t_ym = t_ym - m_safe
    if PARTIAL:
        out = coef + rows64 * NF
        tl.store(out, m_safe, mask=rmask)
        tl.store(out + 1, s, mask=rmask)
        tl.store(out + 2, tl.where(ignored, 0.0, A), mask=rmask)
        tl.store(out + 3, tl.where(ignored, 0.0, sum_atm), mask=rmask)
        tl.store(out + 4, t_ym, mask=rmask)
        if ENTROPY:
            tl.store(out + 5, q, mask=rmask)
        return
    total, _, c1, c2, c3 = ce_row_finish_rel(A, sum_atm, m_safe, tl.log(s), t_ym, gamma, z_loss, 0.0, 0, HAS_FOCAL,
                                             HAS_ZLOSS, False)
    nan = float("nan")
    total = tl.where(ignored, 0.0, tl.where(bad, nan, total))
    c1 = tl.where(ignored, 0.0, tl.where(bad, nan, c1))
    c2 = tl.where(ignored, 0.0, tl.where(bad, nan, c2))
    c3 = tl.where(ignored, 0.0, tl.where(bad, nan, c3))
    tl.store(loss + rows64, total, mask=rmask)
    if ENTROPY:
        tl.store(ent + rows64, tl.log(s) - q / s, mask=rmask)
    tl.store(stats + rows64 * 2, m_safe, mask=rmask)
    tl.store(stats + rows64 * 2 + 1, tl.log(s), mask=rmask)
    tl.store(coef + rows64 * 3, c1, mask=rmask)
    tl.store(coef + rows64 * 3 + 1, c2, mask=rmask)
    tl.store(coef + rows64 * 3 + 2, c3, mask=rmask)


@triton.jit
def _lse_parts_kernel(stats, coef, lse, coef4, N, BLOCK: tl.constexpr):
    """The cross-entropy backward's row inputs from the forward's: ``lse = fl(m + log s)`` (N,) and
    ``coef4`` (N, 4) = (c1, c2, c3, lse's low part) (``lse_low_part``), for the cuBLAS dz."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.load(stats + rows64 * 2, mask=rmask, other=0.0)
    log_s = tl.load(stats + rows64 * 2 + 1, mask=rmask, other=0.0)
    tl.store(lse + rows64, m + log_s, mask=rmask)
    for f in range(3):
        tl.store(coef4 + rows64 * 4 + f, tl.load(coef + rows64 * 3 + f, mask=rmask, other=0.0), mask=rmask)
    tl.store(coef4 + rows64 * 4 + 3, lse_low_part(m, log_s), mask=rmask)


@triton.jit
def _dz_width(VC):
    """Columns of a dz chunk of VC classes that the dW and dX kernels read: VC rounded up to a multiple of
    16 (the dz kernel writes zeros past VC, the buffer has the columns), so their masks along dz's rows
    vectorise and its loads stay asynchronous (pipelined) when VC is not a multiple of 16."""
    return (VC + 15) // 16 * 16


@triton.jit
def _lce_dz_kernel(
    x, w, bias, target, cw, stats, coef, grad_loss, grad_lse, grad_ent, ent, scale, dz, flags,
    N, V, D, c0, VC, stride_dz, stride_xn, stride_wv, stride_t, stride_g, stride_gl, stride_ge, stride_f,
    class_offset, VT, ignore_index, smoothing, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_FILTER: tl.constexpr, HAS_LSE_GRAD: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    FR: tl.constexpr, FC: tl.constexpr, HAS_ENT_GRAD: tl.constexpr = False,
):
    """dz for the (BM rows, BN classes) tile of vocabulary chunk [c0, c0 + VC); grid
    (cdiv(N, BM) * cdiv(VC, BN),) in grouped order.

    GEMM tile X @ W_c.T (2*BM*BN*D FLOPs, fp32 accumulator), then the epilogue on chip:
    ``p = exp((z - m) - log s)``, ``dz = (g / sigma) * (c1*p - c2*a - c3*[j == y]) * softcap'(z)``
    (the upstream folded into c1, c2, c3 first, as autograd's chain forms it; with HAS_LSE_GRAD the lse's
    upstream ``grad_lse`` added to c1, ignored rows included; with HAS_ENT_GRAD the row entropy ``ent``'s
    upstream ``grad_ent`` times ``dH/dz = p * ((log s - H) - (z - m))``, ignored rows included)
    (0 on ignored rows), written once in ``dz``'s dtype; with HAS_FILTER, the (FR, FC) blocks whose
    live softmax entries are all below ``filter_eps`` and that hold no live target column are 0, and
    ``flags`` (int8, row stride ``stride_f``) gets 1 for such a block, 0 otherwise (BM, BN: multiples
    of FR, FC; c0: of FC): reads BM*D*s + BN*D*s, writes BM*BN*s (zeros in the columns from VC to
    ``_dz_width(VC)``). ``class_offset``, ``VT``: as in the forward (``m`` and ``log s`` are then the
    whole row's). With no, torch or others smoothing no target-weight tile is
    formed: ``c2 * off * w_c`` off the target column, ``c2 * on * w_y + c3`` at it, as in the forward.
    """
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(VC, BN), GROUP)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    lc = pid_n * BN + tl.arange(0, BN)
    cols = c0 + lc
    cmask = lc < VC
    cols64 = cols.to(tl.int64)
    y, ignored, _ = load_target(target + rows64 * stride_t, rmask, ignore_index, VT)
    m = tl.load(stats + rows64 * 2, mask=rmask, other=0.0)
    log_s = tl.load(stats + rows64 * 2 + 1, mask=rmask, other=0.0)
    c1 = tl.load(coef + rows64 * 3, mask=rmask, other=0.0)
    c2 = tl.load(coef + rows64 * 3 + 1, mask=rmask, other=0.0)
    c3 = tl.load(coef + rows64 * 3 + 2, mask=rmask, other=0.0)
    g = tl.load(grad_loss + rows64 * stride_g, mask=rmask, other=0.0).to(tl.float32) / tl.load(scale)
    g = tl.where(ignored, 0.0, g)  # ignored rows: no gradient even where the upstream is inf/NaN
    # the upstream folded into the row's coefficients first, as autograd's chain does: an infinite g gives
    # inf - inf = NaN where PyTorch has it (e.g. the target column), not (p - a) * g
    c1 = c1 * g
    c2 = c2 * g
    c3 = tl.where(c3 != 0.0, c3 * g, 0.0)  # (no focal term: none for an inf g either)
    z = _logit_tile(x, w, bias, rows64, rmask, cols64, cmask, D, stride_xn, stride_wv, softcap,
                    HAS_BIAS, HAS_SOFTCAP, DOT_F32, IEEE, BM, BN, BK)
    if HAS_LSE_GRAD:  # d lse / dz = p, on every row (the filter is refused with it); loaded after the GEMM's
        # loop, not held through it (fp32 with a cap spilled)
        c1 += tl.load(grad_lse + rows64 * stride_gl, mask=rmask, other=0.0).to(tl.float32) / tl.load(scale)
    p = tl.exp((z - m[:, None]) - log_s[:, None])
    if HAS_ENT_GRAD:  # dH/dz = p * ((log s - H) - (z - m)): the row part joins c1 (the filter is refused)
        ge = tl.load(grad_ent + rows64 * stride_ge, mask=rmask, other=0.0).to(tl.float32) / tl.load(scale)
        c1 += ge * (log_s - tl.load(ent + rows64, mask=rmask, other=0.0))
        # c1 * p - ge * p * (z - m) as one product, before any weight tile is live. z - m is clamped at -1e4:
        # p = exp((z - m) - log s) is 0 below -104 anyway (log s >= 0), and a -inf or huge finite masking logit
        # (-3.4e38) would make ge * (z - m) overflow, and 0 * inf NaN
        cp = p * (c1[:, None] - ge[:, None] * tl.maximum(z - m[:, None], -1e4))
    else:
        cp = c1[:, None] * p
    yl, owned = local_target(y, class_offset, V)
    y_col = tl.where(owned, yl, -1)  # the target's column of the head (-1: none)
    if SMOOTH < 3:  # a_c = on * w_y at the target column, off * w_c elsewhere: no (rows, classes) weight tile
        on, off = smooth_weights(VT, smoothing, SMOOTH)
        a_y = on
        a_off = off
        if HAS_WEIGHT:  # (as ce_target_weights: w_c only where the target puts mass)
            wc = tl.load(cw + cols64, mask=cmask, other=0.0).to(tl.float32)
            a_y = tl.where(on != 0, on * wc, 0.0)[None, :]
            a_off = off * wc[None, :]
        d = cp
        if SMOOTH != 0:
            d = cp - c2[:, None] * a_off
        d = tl.where(cols[None, :] == y_col[:, None], cp - c2[:, None] * a_y - c3[:, None], d)
    else:
        wc = 0.0
        if HAS_WEIGHT:
            wc = tl.load(cw + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
        gcols = class_offset + cols  # global class ids
        a = ce_target_weights(gcols[None, :], cmask[None, :], y[:, None], wc, 0.0, VT, smoothing, HAS_WEIGHT, False,
                              SMOOTH)
        d = cp - c2[:, None] * a - tl.where(gcols[None, :] == y[:, None], c3[:, None], 0.0)
    if HAS_SOFTCAP:
        r = z / softcap
        d = d * (1.0 - r * r)
    if HAS_FILTER:  # (smoothing is refused with filtering: a target column is the only non-p term)
        live = rmask[:, None] & cmask[None, :] & ~ignored[:, None]
        crit = tl.where(live, p, 0.0)
        crit = tl.where(live & (cols[None, :] == y_col[:, None]), 1.0 + filter_eps, crit)  # a target column: kept
        bmax = tl.max(tl.max(tl.reshape(crit, (BM // FR, FR, BN // FC, FC)), axis=3), axis=1)
        drop = bmax < filter_eps  # (BM // FR, BN // FC)
        d = tl.where(tl.reshape(tl.broadcast_to(drop[:, None, :, None], (BM // FR, FR, BN // FC, FC)), (BM, BN)),
                     0.0, d)
        fr = pid_m * (BM // FR) + tl.arange(0, BM // FR)
        fc = pid_n * (BN // FC) + tl.arange(0, BN // FC)
        tl.store(flags + fr.to(tl.int64)[:, None] * stride_f + fc[None, :], drop.to(tl.int8),
                 mask=(fr[:, None] * FR < N) & (fc[None, :] * FC < VC))
    d = tl.where(rmask[:, None] & cmask[None, :], d, 0.0)  # (zeros in the columns past VC)
    _store(dz + rows64[:, None] * stride_dz + lc[None, :], d, rmask[:, None] & (lc < _dz_width(VC))[None, :],
           RNE_BF16)


@triton.jit
def _any_kept(flags, stride_f, r0, c0, N, VC, NR: tl.constexpr, NC: tl.constexpr, FR: tl.constexpr,
              FC: tl.constexpr):
    """Whether some filter block of the dz slice starting at (row r0, class c0) spanning NR x NC blocks
    (r0, c0 on the block grid) is not flagged all-zero; blocks past the chunk count as flagged."""
    fr = r0 // FR + tl.arange(0, NR)
    fc = c0 // FC + tl.arange(0, NC)
    f = tl.load(flags + fr.to(tl.int64)[:, None] * stride_f + fc[None, :],
                mask=(fr[:, None] * FR < N) & (fc[None, :] * FC < VC), other=1)
    return tl.min(tl.min(f.to(tl.int32), axis=1), axis=0) == 0


@triton.jit
def _dw_tile(dz, x, flags, pid_v, lv, lmask, ds, dmask, N, VC, stride_dz, stride_xn, stride_f,
             COLSUM: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
             BK: tl.constexpr, HAS_FILTER: tl.constexpr, FR: tl.constexpr, FC: tl.constexpr, NR: tl.constexpr,
             NC: tl.constexpr):
    """``_lce_dw_kernel``'s K loop: (sum_n dz[n, lv] * x[n, ds] (BV, BD), sum_n dz[n, lv] (BV,), the
    latter only with COLSUM (else 0)), both fp32, in n order."""
    acc = tl.zeros([BV, BD], dtype=tl.float32)
    colsum = tl.zeros([BV], dtype=tl.float32)
    for n0 in range(0, N, BK):
        run = True
        if HAS_FILTER:
            run = _any_kept(flags, stride_f, n0, pid_v * BV // FC * FC, N, VC, NR, NC, FR, FC)
        if run:
            ns = (n0 + tl.arange(0, BK)).to(tl.int64)
            nmask = ns < N
            a = tl.load(dz + lv[:, None] + ns[None, :] * stride_dz, mask=lmask[:, None] & nmask[None, :], other=0.0)
            b = tl.load(x + ns[:, None] * stride_xn + ds[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_F32, IEEE)
            if COLSUM:
                colsum += tl.sum(a.to(tl.float32), axis=1)
    return acc, colsum


@triton.jit
def _lce_dw_kernel(
    dz, x, scale, dw, db, flags, N, D, c0, VC, stride_dz, stride_xn, stride_f,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, RNE_BF16: tl.constexpr,
    BV: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    HAS_FILTER: tl.constexpr, FR: tl.constexpr, FC: tl.constexpr, NR: tl.constexpr, NC: tl.constexpr,
):
    """dW[c0 + v, d] = sigma * sum_n dz[n, v] * x[n, d] for a (BV, BD) tile; grid
    (cdiv(VC, BV) * cdiv(D, BD),) in grouped order.

    One complete GEMM over K = N (2*BV*BD*N FLOPs, fp32 accumulator), written once in W's dtype; the
    programs of the first D tile also write the bias gradient ``db[c0 + v] = sigma * sum_n dz[n, v]``
    (fp32). Reads N*(BV + BD)*s, writes BV*BD*s. HAS_FILTER: a K slice whose dz blocks (NR x NC of
    them) are all flagged zero by the dz kernel is skipped.
    """
    pid_v, pid_d = _tile_ids(tl.program_id(0), tl.cdiv(VC, BV), tl.cdiv(D, BD), GROUP)
    lv = pid_v * BV + tl.arange(0, BV)
    vmask = lv < VC
    lmask = lv < _dz_width(VC)  # the dz loads' mask (zeros past VC): vectorises
    ds = pid_d * BD + tl.arange(0, BD)
    dmask = ds < D
    if HAS_BIAS:
        if pid_d == 0:  # only the first D tile's programs write db: the others skip the column sums
            acc, colsum = _dw_tile(dz, x, flags, pid_v, lv, lmask, ds, dmask, N, VC, stride_dz, stride_xn, stride_f,
                                   True, DOT_F32, IEEE, BV, BD, BK, HAS_FILTER, FR, FC, NR, NC)
        else:
            acc, colsum = _dw_tile(dz, x, flags, pid_v, lv, lmask, ds, dmask, N, VC, stride_dz, stride_xn, stride_f,
                                   False, DOT_F32, IEEE, BV, BD, BK, HAS_FILTER, FR, FC, NR, NC)
    else:
        acc, colsum = _dw_tile(dz, x, flags, pid_v, lv, lmask, ds, dmask, N, VC, stride_dz, stride_xn, stride_f,
                               False, DOT_F32, IEEE, BV, BD, BK, HAS_FILTER, FR, FC, NR, NC)
    sigma = tl.load(scale)
    rows64 = (c0 + lv).to(tl.int64)
    _store(dw + rows64[:, None] * D + ds[None, :], acc * sigma, vmask[:, None] & dmask[None, :], RNE_BF16)
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(db + rows64, colsum * sigma, mask=vmask)


@triton.jit
def _lce_dx_kernel(
    dz, w, scale, acc_buf, dx, flags, N, D, c0, VC, stride_dz, stride_wv, stride_f,
    FIRST: tl.constexpr, LAST: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    RNE_BF16: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    HAS_FILTER: tl.constexpr, FR: tl.constexpr, FC: tl.constexpr, NR: tl.constexpr, NC: tl.constexpr,
):
    """dX[n, d] += sum_v dz[n, v] * W[c0 + v, d] for a (BM, BD) tile; grid (cdiv(N, BM) * cdiv(D, BD),)
    in grouped order.

    One GEMM over K = VC (2*BM*BD*VC FLOPs, fp32 accumulator); the epilogue adds the fp32 accumulator
    of the earlier chunks (unless FIRST) and either stores it back (one read-modify-write per chunk) or,
    on the LAST chunk, writes sigma * dX once in the input dtype. Reads VC*(BM + BD)*s. HAS_FILTER: as
    in ``_lce_dw_kernel``.
    """
    pid_m, pid_d = _tile_ids(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(D, BD), GROUP)
    rows64 = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows64 < N
    ds = pid_d * BD + tl.arange(0, BD)
    dmask = ds < D
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for k0 in range(0, VC, BK):
        run = True
        if HAS_FILTER:
            run = _any_kept(flags, stride_f, pid_m * BM // FR * FR, k0, N, VC, NR, NC, FR, FC)
        if run:
            ks = k0 + tl.arange(0, BK)
            kmask = ks < VC
            a = tl.load(dz + rows64[:, None] * stride_dz + ks[None, :],
                        mask=rmask[:, None] & (ks < _dz_width(VC))[None, :], other=0.0)
            b = tl.load(w + (c0 + ks).to(tl.int64)[:, None] * stride_wv + ds[None, :],
                        mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_F32, IEEE)
    offs = rows64[:, None] * D + ds[None, :]
    msk = rmask[:, None] & dmask[None, :]
    if not FIRST:
        acc += tl.load(acc_buf + offs, mask=msk, other=0.0)
    if LAST:
        _store(dx + offs, acc * tl.load(scale), msk, RNE_BF16)
    else:
        tl.store(acc_buf + offs, acc, mask=msk)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
# Fixed tile tables (no autotune: a tuned tile would change the summation order between runs):
# (BM, BN, BK, num_warps, num_stages). _FWD_TILES for the forward (its online row state costs registers:
# 128x128 tiles spill there), _GEMM_TILES for the dz, dW and dX GEMMs; _DZ_BK overrides BK for the dz GEMM
# (its epilogue's live set) where given. Registers per thread from the sm_90 compile with the launch's
# 16-byte alignment hints (``python bench/kernel_resources.py --triton-path <triton 3.6>``; triton 3.9 /
# 3.6): 16-bit forward split kernel without smoothing 125-142 / 141-155, torch/others smoothing 147-198 /
# 178-208, gaussian 225-255 / 255, TMA loads 97-163 / 105-176; 16-bit dz 121-228 / 128-226 (gaussian
# 201-236 / 207-255); dW 106-128 / 106-134, dX 103-194. fp32: forward 114-168 (BK 16; BK 32 spilled 8-24
# bytes on 3.6); dz 122-128 (BK 16 and 8 warps: with BK 32 and 4 warps it took 206-255 and spilled 16-24 bytes
# when the chunk width is a multiple of 16, the common case); dW 64-80, dX 64-80 (8 warps: 4 spilled 8-16
# bytes with filter_eps in some specialisations). No launch spills. fp32 dots are IEEE FMA chains in K
# order, so BK and the warp count do not change fp32 results (BN does: it sets the chunk width).
_FWD_TILES = {"interp": (16, 32, 32, 4, 1), "fp32": (32, 64, 16, 4, 2), "16b": (128, 64, 64, 8, 3),
              "16b-plain": (128, 128, 64, 8, 3)}
# "16b-plain": the 16-bit forward without smoothing, class weights or soft-cap (LM training's case) takes the
# GEMM kernels' 128 x 128 tile: on an H100 the 128 x 64 forward ran at 230 TFLOP/s where the 128 x 128 dz, dW
# and dX kernels together reached about 500 (N=4096, D=4096, V=128256 bf16). At 128 x 128 that forward takes
# 228-251 registers per thread on sm_90 without spills (triton 3.6 and 3.9); the variants with smoothing,
# weights or a cap spill there and keep 128 x 64. (Chosen from that measurement; the 128 x 128 forward itself
# is not measured yet.)
_GEMM_TILES = {"interp": (16, 32, 32, 4, 1), "fp32": (64, 64, 32, 8, 2), "16b": (128, 128, 64, 8, 3)}
# _DZ_TILES: the dz GEMM (its epilogue's live set: fp32 takes BK 16); the chunk width is a multiple of its BN
_DZ_TILES = {"interp": (16, 32, 32, 4, 1), "fp32": (64, 64, 16, 8, 2), "16b": (128, 128, 64, 8, 3)}
# BLAS: the GEMM stages of bf16 CUDA inputs that go to cuBLAS (torch.mm) instead of the Triton kernels, a
# subset of
#   "fwd"   the forward: per chunk of classes, fp32 logits X @ W_c.T (+ b_c) from cuBLAS (fp32 accumulation,
#           an fp32 output), then cross-entropy's per-row partial kernel over them, merged into running sums;
#   "dz"    the backward's dz: the same fp32 logits, then cross-entropy's backward kernel writes dz;
#   "dwdx"  the backward's dW_c = dz_c.T @ X (written in bf16) and dX accumulated in fp32 (mm/addmm with an fp32
#           output), cast once.
# The logits chunk is an (N, VC) fp32 buffer within DZ_BYTES (with "dz", beside the bf16 dz chunk: 6 bytes
# per element), read back once: 8 bytes per logit beside the GEMM's 2*D FLOPs. The backward stages set the
# upstream scale sigma to 1 (bf16 has fp32's exponent range). Needs torch >= 2.10 (its bf16 x bf16 -> fp32
# mm/addmm; older versions take the Triton kernels); filter_eps keeps the Triton backward (its block skips
# are the kernels'). fp16 and fp32 inputs take the Triton kernels.
# Default: all three, chosen from the first H100 run (N=4096, D=4096, V=128256 bf16), not from a run of this
# path: there torch.compile's row, whose GEMMs are cuBLAS's, did 6*N*V*D in 18.8 ms (>= 690 TFLOP/s for the
# GEMMs), while the Triton forward ran at 230 TFLOP/s and the Triton backward at about 500. This path does
# 8*N*V*D on cuBLAS plus ~18 bytes of fp32 logits / dz traffic per logit. bench/bench_linear_cross_entropy.py's
# "Triton GEMMs" row and bench/tune.py's ``lce-blas`` target time it against the Triton kernels.
BLAS = ("fwd", "dz", "dwdx")


def _kind(x):
    import torch
    return "interp" if interpreting() else ("fp32" if x.dtype == torch.float32 else "16b")


def _flags(x, bias, cw, o, argmax=False, entropy=False):
    """Constexpr flags and the forward's tile config (``argmax``, ``entropy``: the forward's running argmax,
    entropy sums, on the same tiles, so the loss is the same bits: fp32 lifts its 200-register cap for them,
    which spilled; 16-bit inputs with the entropy take 16 warps on the plain 128 x 128 tile, 64-row tiles
    with the argmax or gaussian smoothing: the loss can then differ in its last bits)."""
    import torch
    kind = _kind(x)
    BM, BN, BK, nw, ns = _FWD_TILES[kind]
    if kind == "16b" and o.smooth_mode == 0 and cw is None and not o.softcap > 0:
        BM, BN, BK, nw, ns = _FWD_TILES["16b-plain"]
    if kind == "16b" and entropy and BN == 128:  # (the plain tile: 8 warps spilled 16 bytes)
        nw = 16
    elif kind == "16b" and entropy and (argmax or o.smooth_mode == 3):  # (128 rows spilled 8-24 bytes)
        BM = 64
    return dict(HAS_BIAS=bias is not None, HAS_WEIGHT=cw is not None, SMOOTH=o.smooth_mode,
                HAS_SOFTCAP=o.softcap > 0, DOT_F32=interpreting(), IEEE=x.dtype == torch.float32, BM=BM, BN=BN,
                BK=BK, num_warps=nw, num_stages=ns,
                maxnreg=(255 if argmax or entropy else 200) if kind == "fp32" else None)


def _tma_ok(x, w):
    """Whether the forward can read x and w through tensor descriptors: unit inner stride, 16-byte
    aligned bases and row strides (TMA's rules); sets Triton's scratch allocator for the descriptors if
    none is set (a torch allocation: stream-ordered, CUDA-graph safe)."""
    es = x.element_size()
    if not all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * es % 16 == 0 for t in (x, w)):
        return False
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        unset = isinstance(_allocator.get(), NullAllocator)
    except ImportError:  # another Triton layout: set ours
        unset = True
    if unset:
        triton.set_allocator(_tma_scratch)
    return True


def _tma_scratch(size, alignment, stream):
    """Triton's scratch allocator for in-kernel tensor descriptors: bytes on the current device."""
    import torch
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _num_splits(x, row_tiles, vocab_tiles):
    """``(S, tiles_per_split)`` of the forward on x's device (``split_plan``; in the interpreter two
    splits, to exercise the combine in CPU tests)."""
    import torch
    if interpreting():
        tps = triton.cdiv(vocab_tiles, min(vocab_tiles, 2))
        return triton.cdiv(vocab_tiles, tps), tps
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 1
    return split_plan(sms, row_tiles, vocab_tiles, FWD_GROUP)


def split_plan(sms, row_tiles, vocab_tiles, group):
    """Vocab splits of the forward: ``(S, tiles_per_split)``, no split empty.

    The programs run in grouped order (``group`` row tiles per group), so the ``sms`` programs resident
    at once cover about ``group`` row tiles times ``sms / group`` splits: the X tiles they re-read for
    every vocab tile stay in L2 (``group * BM * D * s`` bytes) and each W tile comes from HBM once per
    group. (Row tiles varying fastest over the whole grid, every resident program held its own X tile:
    128 of them at N=16384, 64 MiB at D=2048, more than an H100's L2.) So at least ``sms / group`` splits
    (or ``2 * sms`` programs when there are few row tiles); among up to 4x that many, the count whose
    programs fill the last wave best (the programs of a split are alike; a wave holds ``sms``), the fewer
    splits on a tie."""
    g = max(1, min(group, row_tiles))
    lo = max(1, min(vocab_tiles, max(-(-sms // g), -(-2 * sms // row_tiles))))
    best = None
    for S in range(lo, min(vocab_tiles, 4 * lo) + 1):
        tps = -(-vocab_tiles // S)
        S_eff = -(-vocab_tiles // tps)
        waves = -(-row_tiles * S_eff // sms)
        eff = row_tiles * vocab_tiles / (waves * sms * tps)
        if best is None or eff > best[0] + 1e-9:
            best = (eff, S_eff, tps)
    return best[1], best[2]


def chunk_classes(N, V, BN, elem_bytes, chunk_size=0, filtered=False):
    """Classes per backward chunk: ``chunk_size // N`` if given (``filtered``: rounded down to a multiple
    of FILTER_COLS, at least one, so that the chunks start on the filter grid), else ``CHUNK_CLASSES``
    classes within ``DZ_BYTES`` of dz, a multiple of the tile width BN (at least one tile, at most V)."""
    if chunk_size > 0:
        vc = max(1, min(V, chunk_size // max(N, 1)))
        return max(FILTER_COLS, vc // FILTER_COLS * FILTER_COLS) if filtered and vc < V else vc
    vc = min(CHUNK_CLASSES, DZ_BYTES // (max(N, 1) * elem_bytes))
    return max(BN, min(-(-V // BN) * BN, vc // BN * BN))


def _classes(o, V):
    """``(class_offset, VT)``: where the head's V rows sit among the whole vocabulary's VT classes."""
    return o.class_offset, o.num_classes if o.num_classes > 0 else V


def lce_fwd(x, w, bias, target, cw, o, pred=None, ent=None):
    """Forward: ``(loss (N,), stats (N, 2) = (m, log s), coef (N, 3))``, all fp32; ``pred`` (int64 (N,)):
    the rows' first maximum of their (soft-capped) logits goes there as global class ids; ``ent`` (fp32
    (N,)): the rows' softmax entropy goes there (the Triton GEMM forward then, not the cuBLAS one); two
    launches."""
    import torch
    N = x.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=x.device)
    stats = torch.empty(N, 2, dtype=torch.float32, device=x.device)
    coef = torch.empty(N, 3, dtype=torch.float32, device=x.device)
    if N:
        _launch_fwd(x, w, bias, target, cw, o, loss, stats, coef, False, pred, ent)
    return loss, stats, coef


def lce_partial(x, w, bias, target, cw, o, pred=None, entropy=False):
    """Vocab-parallel forward's local half: the fp32 row sums ``(N, 5)`` = (m, s, A, sum a (z - m),
    z_y - m) over the head's classes (``o.class_offset`` of ``o.num_classes``; see
    ``_lce_fwd_finish_kernel``'s PARTIAL); zeros for a head with no rows (nothing launched). ``pred``: the
    rows' first maximum over the head's classes goes there (global ids). ``entropy``: ``(N, 6)``, the sixth
    column ``q = sum exp(z - m) (z - m)``."""
    import torch
    part = torch.zeros(x.shape[0], 6 if entropy else 5, dtype=torch.float32, device=x.device)
    if x.shape[0] and w.shape[0]:
        _launch_fwd(x, w, bias, target, cw, o, part, part, part, True, pred, part if entropy else None)
    return part


def _launch_fwd(x, w, bias, target, cw, o, loss, stats, coef, partial, pred=None, ent=None):
    """The forward's launches; ``pred``: the rows' argmax goes there (global ids), when given; ``ent``:
    the rows' entropy (with ``partial``: the sums' sixth column instead), when given."""
    import torch
    N, D = x.shape
    V = w.shape[0]
    rel = "fwd" in _blas_stages(x, False) and ent is None
    if rel:
        part, S, VS = _blas_partials(x, w, bias, target, cw, o, pred)
    else:
        k = _flags(x, bias, cw, o, pred is not None, ent is not None)
        BN = k["BN"]
        row_tiles = triton.cdiv(N, k["BM"])
        vocab_tiles = max(1, triton.cdiv(V, BN))
        S, tiles_per_split = _num_splits(x, row_tiles, vocab_tiles)
        VS = tiles_per_split * BN
        part = torch.empty(S, 5 if ent is None else 6, N, dtype=torch.float32, device=x.device)
        amax = torch.empty(S, N, dtype=torch.int32, device=x.device) if pred is not None else part
        # the group: FWD_GROUP row tiles, fewer (a power of two) when there are fewer, more when the grid's
        # second dimension would pass CUDA's 65535
        G = max(triton.next_power_of_2(min(FWD_GROUP, row_tiles)),
                triton.next_power_of_2(triton.cdiv(row_tiles, 65535)))
        _lce_fwd_split_kernel[(G * S, triton.cdiv(row_tiles, G))](
            x, w, bias if bias is not None else x, target, cw if cw is not None else x, part, amax,
            N, V, D, VS, x.stride(0), w.stride(0), target.stride(0), *_classes(o, V),
            o.ignore_index, o.smoothing, o.softcap, TARGET_LOGIT=o.smooth_mode == 0 or o.focal_gamma != 0.0,
            TMA=FWD_TMA and _tma_ok(x, w), GROUP=G, ARGMAX=pred is not None, ENTROPY=ent is not None, **k)
        if pred is not None:  # the split with the largest max (the first on ties) holds the row's argmax
            pred.copy_(amax.gather(0, part[:, 0].argmax(0, keepdim=True))[0])
            pred += o.class_offset
    _finish(part, target, loss, stats, coef, o, V, S, VS, V, partial, rel, ent)


def _finish(part, target, loss, stats, coef, o, V, S, VS, VL, partial, rel, ent=None):
    """``_lce_fwd_finish_kernel`` over S partials of the head's V rows (split k: classes [k*VS, min((k+1)*VS,
    VL))); ``ent``: the rows' entropy goes there (``partial``: any tensor; the sums get their sixth column)."""
    FB = 128
    offset, VT = _classes(o, V)
    _lce_fwd_finish_kernel[(triton.cdiv(target.shape[0], FB),)](
        part, target, loss, stats, coef, ent if ent is not None else loss, target.shape[0], VT, S, VS, offset, VL,
        target.stride(0), o.ignore_index, o.focal_gamma, o.z_loss, HAS_FOCAL=o.focal_gamma != 0.0 and not partial,
        HAS_ZLOSS=o.z_loss != 0.0 and not partial, PARTIAL=partial, REL=rel, BLOCK=FB, ENTROPY=ent is not None,
        num_warps=4)


def _ce_opts(o, c0, V):
    """The cross-entropy kernels' options (read by field name) for the head's classes from ``c0``."""
    import types
    offset, VT = _classes(o, V)
    return types.SimpleNamespace(dense=False, ignore_index=o.ignore_index, smoothing=o.smoothing,
                                 smooth_mode=o.smooth_mode, input_type=0, gamma=o.focal_gamma, z_loss=0.0,
                                 softcap=o.softcap, upper_bound=float("inf"), class_offset=offset + c0, num_classes=VT)


def _logits_f32(x, w, bias, out):
    """``out = x @ w.T (+ bias)`` in fp32 (``_mm_f32``) for one chunk of the head's rows ``w``."""
    _mm_f32(x, w.t(), out, False)
    if bias is not None:
        out.add_(bias)


def _blas_partials(x, w, bias, target, cw, o, pred=None):
    """The cuBLAS forward's row sums over the head, for the finish kernel (REL): ``(part (2, N, 5), S, VS)``
    in cross-entropy's PARTIAL layout. Chunk k of VC classes goes through ``_logits_f32`` into one fp32
    (N, VC) buffer (``chunk_classes`` at 4 bytes per logit) and cross-entropy's PARTIAL forward
    (``ce_partial``). ``part[0]`` holds the running sums of the chunks before the last (each middle chunk
    merged into them by the finish kernel, REL and PARTIAL: classes [0, c0) and [c0, c0 + vc)), ``part[1]``
    the last chunk's; the caller's finish combines the two (S = 2, VS = the last chunk's start), or takes the
    one chunk's (S = 1, VS = V): O(N) extra memory whatever the chunk count. ``pred``: the rows' first
    maximum of their (soft-capped) logits goes there (global ids), over each chunk's fp32 logits by torch."""
    import torch
    N = x.shape[0]
    V = w.shape[0]
    VC = chunk_classes(N, V, 128, 4, o.chunk_size)
    part = torch.empty(2, N, 5, dtype=torch.float32, device=x.device)
    buf = torch.empty(N * min(VC, V), dtype=torch.float32, device=x.device)
    top = torch.full((N,), float("-inf"), dtype=torch.float32, device=x.device) if pred is not None else None
    if pred is not None:
        pred.zero_()  # (a row with no finite max keeps 0; its lse makes it -1)
    for c0 in range(0, V, VC):
        vc = min(VC, V - c0)
        z = buf[:N * vc].view(N, vc)
        _logits_f32(x, w[c0:c0 + vc], bias[c0:c0 + vc] if bias is not None else None, z)
        ce_partial(z, target, cw[c0:c0 + vc] if cw is not None else None, _ce_opts(o, c0, V), part[min(c0, 1)],
                   VC)  # (the last chunk with the others' blocks: no compile of its own per row count)
        if pred is not None:  # (z is not read again: capped in place)
            if o.softcap > 0:
                z.div_(o.softcap).tanh_().mul_(o.softcap)
            val, idx = z.max(1)  # (the first maximum of the chunk)
            later = val > top  # a later chunk takes over only with a larger max (NaN: never)
            pred.copy_(torch.where(later, idx + c0, pred))
            top.copy_(torch.where(later, val, top))
        if c0 and c0 + vc < V:
            _finish(part, target, part, part, part, o, V, 2, c0, c0 + vc, True, True)
    if pred is not None:
        pred += o.class_offset
    return (part, 2, c0) if c0 else (part, 1, V)


def _upstream_scale(grad_loss, *more):
    """sigma (1,) fp32 on device: the power of two at or below max|g| (1 if that is 0, inf or NaN), g
    over the loss's upstream and ``more`` (the lse's and the entropy's, those not None). dz / sigma is O(1), so its 16-bit cast keeps small entries;
    the epilogues multiply sigma back exactly. No host sync."""
    import torch
    if grad_loss.numel() == 0:
        return torch.ones(1, dtype=torch.float32, device=grad_loss.device)
    gmax = grad_loss.detach().abs().amax().float()
    for g in more:
        if g is not None:
            gmax = torch.maximum(gmax, g.detach().abs().amax().float())
    ok = torch.isfinite(gmax) & (gmax > 0)
    # at least 2**-126, fp32's smallest normal: 1 / sigma stays finite and g / sigma survives flush-to-zero
    sigma = torch.exp2(torch.floor(torch.log2(torch.where(ok, gmax, 1.0)))).clamp(min=2.0 ** -126)
    return torch.where(ok, sigma, 1.0).reshape(1)


def lce_bwd(grad_loss, x, w, bias, target, cw, stats, coef, o, need_dx=True, need_dw=True, sigma=None,
            grad_lse=None, grad_ent=None, ent=None):
    """(dx, dw, db) in the inputs' dtypes (None where not needed) for a per-row upstream ``grad_loss``
    and, if given, ``grad_lse`` of the row's log-sum-exp and ``grad_ent`` of its entropy ``ent`` (``sigma``:
    their scale when known, else from ``_upstream_scale``; the entropy's takes the Triton dz kernel).

    Per vocabulary chunk: ``_lce_dz_kernel`` (dz chunk), then ``_lce_dw_kernel`` (dW and db rows of the
    chunk, complete) and ``_lce_dx_kernel`` (dX accumulation); a frozen head or input skips its kernel.
    """
    import torch
    N, D = x.shape
    V = w.shape[0]
    has_db = bias is not None and need_dw
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty_like(w, memory_format=torch.contiguous_format) if need_dw else None
    db = torch.empty(V, dtype=torch.float32, device=x.device) if has_db else None
    if N == 0 or V == 0:
        for t in (dx, dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db.to(bias.dtype) if has_db else None
    if not (need_dx or need_dw):
        return None, None, None
    k = _flags(x, bias, cw, o)
    for key in ("BM", "BN", "BK", "num_warps", "num_stages", "maxnreg"):
        k.pop(key)
    dot = dict(DOT_F32=k.pop("DOT_F32"), IEEE=k.pop("IEEE"), RNE_BF16=rne_bf16(x),
               GROUP=8)
    GM, GN, GK, gw, gs = _GEMM_TILES[_kind(x)]
    ZM, ZN, ZK, zw, zs = _DZ_TILES[_kind(x)]
    if grad_ent is not None and o.smooth_mode == 3 and _kind(x) == "16b":
        ZN = 64  # (gaussian smoothing's weight tile beside the entropy's term: 128 x 128 spilled 8 bytes)
    filt = o.filter_eps > 0
    stages = _blas_stages(x, filt)
    blas, blas_dz = "dwdx" in stages, "dz" in stages and grad_ent is None
    # (with the cuBLAS dz, an fp32 logits chunk beside dz: 4 more bytes per element within the budget)
    VC = chunk_classes(N, V, ZN, x.element_size() + 4 * blas_dz, o.chunk_size, filt)
    dz = torch.empty(N, -(-VC // 16) * 16, dtype=x.dtype, device=x.device)  # (the columns _dz_width reads)
    if blas_dz:
        zbuf = torch.empty(N * min(VC, V), dtype=torch.float32, device=x.device)
        lse = torch.empty(N, dtype=torch.float32, device=x.device)
        coef4 = torch.empty(N, 4, dtype=torch.float32, device=x.device)
        _lse_parts_kernel[(triton.cdiv(N, 128),)](stats, coef, lse, coef4, N, BLOCK=128, num_warps=4)
    # filter_eps: one int8 flag per (FILTER_ROWS, FILTER_COLS) block of the dz chunk (every flag the
    # consumers read is written by the chunk's dz launch first)
    fl = (torch.empty(triton.cdiv(N, FILTER_ROWS), triton.cdiv(VC, FILTER_COLS), dtype=torch.int8, device=x.device)
          if filt else dz)
    fk = dict(HAS_FILTER=filt, FR=FILTER_ROWS, FC=FILTER_COLS)
    # blocks spanned by a consumer's K slice: dW (BK rows x BV classes), dX (BM rows x BK classes)
    span = dict(dw=dict(NR=max(1, GK // FILTER_ROWS), NC=max(1, GM // FILTER_COLS)),
                dx=dict(NR=max(1, GM // FILTER_ROWS), NC=max(1, GK // FILTER_COLS)))
    if blas or blas_dz:
        sigma = torch.ones(1, dtype=torch.float32, device=x.device)
    elif sigma is None:
        sigma = _upstream_scale(grad_loss, grad_lse, grad_ent)
    chunks = list(range(0, V, VC))
    acc = (torch.empty(N, D, dtype=torch.float32, device=x.device)
           if need_dx and (len(chunks) > 1 or blas) else None)
    for i, c0 in enumerate(chunks):
        vc = min(VC, V - c0)
        if blas_dz:
            z = zbuf[:N * vc].view(N, vc)
            _logits_f32(x, w[c0:c0 + vc], bias[c0:c0 + vc] if bias is not None else None, z)
            ce_bwd(dz[:, :vc], z, target, cw[c0:c0 + vc] if cw is not None else None, lse, coef4, grad_loss,
                   grad_lse, _ce_opts(o, c0, V), VC)
            if not blas and vc % 16:  # the columns past vc that the dW and dX kernels read: zeros
                dz[:, vc:-(-vc // 16) * 16].zero_()
        else:
            _lce_dz_kernel[(triton.cdiv(N, ZM) * triton.cdiv(vc, ZN),)](
                x, w, bias if bias is not None else x, target, cw if cw is not None else x, stats, coef, grad_loss,
                grad_lse if grad_lse is not None else grad_loss, grad_ent if grad_ent is not None else grad_loss,
                ent if ent is not None else grad_loss, sigma, dz, fl, N, V, D, c0, vc, dz.stride(0),
                x.stride(0), w.stride(0), target.stride(0), grad_loss.stride(0),
                grad_lse.stride(0) if grad_lse is not None else 0, grad_ent.stride(0) if grad_ent is not None else 0,
                fl.stride(0), *_classes(o, V), o.ignore_index, o.smoothing, o.softcap, o.filter_eps, BM=ZM, BN=ZN,
                BK=ZK, num_warps=zw, num_stages=zs, HAS_LSE_GRAD=grad_lse is not None,
                HAS_ENT_GRAD=grad_ent is not None, **fk, **k, **dot)
        if blas:
            _blas_chunk(dz[:, :vc], x, w[c0:c0 + vc], dw[c0:c0 + vc] if need_dw else None,
                        db[c0:c0 + vc] if has_db else None, dx if need_dx else None, acc, i == 0,
                        i == len(chunks) - 1)
            continue
        if need_dw:
            _lce_dw_kernel[(triton.cdiv(vc, GM) * triton.cdiv(D, GN),)](
                dz, x, sigma, dw, db if has_db else dz, fl, N, D, c0, vc, dz.stride(0), x.stride(0), fl.stride(0),
                HAS_BIAS=has_db, BV=GM, BD=GN, BK=GK, num_warps=gw, num_stages=gs, **fk, **span["dw"], **dot)
        if need_dx:
            _lce_dx_kernel[(triton.cdiv(N, GM) * triton.cdiv(D, GN),)](
                dz, w, sigma, acc if acc is not None else dx, dx, fl, N, D, c0, vc, dz.stride(0), w.stride(0),
                fl.stride(0), FIRST=i == 0, LAST=i == len(chunks) - 1, BM=GM, BD=GN, BK=GK, num_warps=gw,
                num_stages=gs, **fk, **span["dx"], **dot)
    return dx, dw, db.to(bias.dtype) if has_db else None


def _blas_stages(x, filtered):
    """The ``BLAS`` stages this call runs on torch.mm: bf16 on CUDA with torch 2.10 or later (its bf16 x
    bf16 -> fp32 mm/addmm), or in the interpreter for the CPU tests; with filter_eps only "fwd"."""
    import torch
    if not (BLAS and x.dtype == torch.bfloat16):
        return ()
    if not (interpreting() or (x.device.type == "cuda" and _torch_at_least(2, 10))):
        return ()
    return tuple(s for s in BLAS if s == "fwd" or not filtered)


def _torch_at_least(major, minor):
    import torch
    try:
        got = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


def _mm_f32(a, b, out, accumulate):
    """``out (+)= a @ b`` into the fp32 ``out`` from 16-bit ``a``, ``b`` (fp32 accumulation; cuBLAS's
    mixed-output GEMM on CUDA, an fp32 matmul elsewhere)."""
    import torch
    if a.is_cuda:
        if accumulate:
            torch.ops.aten.addmm.dtype_out(out, a, b, torch.float32, out=out)
        else:
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
    elif accumulate:
        out.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=out)


def _blas_chunk(dz, x, w, dw, db, dx, acc, first, last):
    """One chunk's dW, db and dX through torch.mm (``BLAS`` "dwdx"): ``dw = dz.T @ x`` written once in
    W's dtype (cuBLAS's bf16 GEMM: fp32 accumulation; its K is N and its output VC x D large, where
    cuBLAS has no reason to split K, the one case in which torch's default
    ``allow_bf16_reduced_precision_reduction`` lets partial sums round to bf16), ``db = sum_n dz``
    (fp32), ``dx (+)= dz @ w`` in the fp32 ``acc`` (K = the chunk: split-K is likely there, so always
    an fp32 output), cast into ``dx`` after the last chunk."""
    import torch
    if dw is not None:
        if dz.is_cuda:
            torch.mm(dz.t(), x, out=dw)
        else:
            dw.copy_(dz.t().float() @ x.float())
    if db is not None:
        torch.sum(dz, 0, dtype=torch.float32, out=db)
    if dx is None:
        return
    _mm_f32(dz, w, acc, not first)
    if last:
        dx.copy_(acc)


def lce_fwd_grad(x, w, bias, target, cw, denom, o, need_dx=True, need_dw=True, pred=None, stats_out=None):
    """Scalar-upstream path: ``(loss.sum() / denom, dx, dw, db)`` (``denom`` None: the sum) with the
    gradients of that reduced loss for an upstream of 1 (per-row upstream ``1 / denom``, on device): the
    forward, then the backward kernels right away (8*N*V*D FLOPs, as forward + backward); ``pred``,
    ``stats_out``: the rows' argmax and statistics go there, as :func:`lce_fwd` gives them."""
    import torch
    loss, stats, coef = lce_fwd(x, w, bias, target, cw, o, pred)
    if stats_out is not None:
        stats_out.copy_(stats)
    if denom is None:  # upstream 1: one (1,) tensor is both the rows' upstream and its scale sigma
        one = torch.ones(1, dtype=torch.float32, device=x.device)
        dx, dw, db = lce_bwd(one.expand(x.shape[0]), x, w, bias, target, cw, stats, coef, o, need_dx, need_dw,
                             sigma=one)
        total = loss.sum()
    else:
        g = (1.0 / denom.float()).expand(x.shape[0])
        dx, dw, db = lce_bwd(g, x, w, bias, target, cw, stats, coef, o, need_dx, need_dw)
        total = loss.sum() / denom.float()
    return total, dx, dw, db
