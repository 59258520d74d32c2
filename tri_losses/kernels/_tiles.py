"""Tile helpers shared by the GEMM-shaped kernels (linear cross-entropy, sampled softmax): logit tiles
``x @ w.T + b`` formed on chip, the dot, the grouped tile order and the store in a buffer's dtype."""
import triton
import triton.language as tl

from ._math import round_to_bf16, tanh


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b: tensor cores for 16-bit tiles; fp32 tiles in IEEE precision (no TF32)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)




@triton.jit
def _logit_tile(x, w, bias, rows64, rmask, cols64, cmask, D, stride_xn, stride_wv, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(BM, BN) fp32 tile of softcap(x @ w.T + b), -inf outside the valid columns. 2*BM*BN*D FLOPs."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < D
        xt = tl.load(x + rows64[:, None] * stride_xn + ks[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        wt = tl.load(w + cols64[None, :] * stride_wv + ks[:, None], mask=cmask[None, :] & km[:, None], other=0.0)
        acc = _dot(xt, wt, acc, DOT_F32, IEEE)
    return _logit_epilogue(acc, bias, cols64, cmask, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _logit_tile_desc(x_desc, w_desc, bias, row0, col0, cols64, cmask, D, softcap, HAS_BIAS: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
    """:func:`_logit_tile` of rows ``row0 + [0, BM)`` and classes ``col0 + [0, BN)`` with the X and W
    slices read through tensor descriptors (``tl.make_tensor_descriptor`` of x (N, D) with block (BM, BK)
    and of w (V, D) with block (BN, BK): TMA on sm_90; out-of-range rows/classes/features read 0)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        xt = x_desc.load([row0, k0])
        wt = w_desc.load([col0, k0])
        acc = _dot(xt, wt.T, acc, DOT_F32, IEEE)
    return _logit_epilogue(acc, bias, cols64, cmask, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _logit_epilogue(acc, bias, cols64, cmask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The logit tile from its fp32 accumulator x @ w.T: + bias, soft-cap, -inf outside the valid columns."""
    if HAS_BIAS:
        acc += tl.load(bias + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap, False)  # (the short form: see tanh)
    return tl.where(cmask[None, :], acc, float("-inf"))


@triton.jit
def _tile_ids(pid, n_m, n_n, GROUP: tl.constexpr):
    """Grouped tile order: GROUP row tiles share each column tile while it is in L2."""
    in_group = GROUP * n_n
    first_m = (pid // in_group) * GROUP
    size = tl.minimum(n_m - first_m, GROUP)
    return first_m + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _store(ptr, v, mask, RNE_BF16: tl.constexpr):
    """Store fp32 ``v`` in the buffer's dtype (rounded to nearest for bf16 in the interpreter too)."""
    if RNE_BF16:
        v = round_to_bf16(v)
    tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)
