"""Math helpers that run both compiled and in Triton's interpreter (no libdevice there), and the
interpreter check the launchers share."""
import triton
import triton.language as tl

from . import interpreting  # noqa: F401  (re-exported for the launchers)


@triton.jit
def tanh(x, SERIES: tl.constexpr = True):
    # tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|): no overflow for large |x|. Below |x| = 1/8 1 - e
    # cancels (a softcap far above the logits: an error of softcap * 6e-8 on the capped logit), so SERIES takes
    # its odd series to x**7 there (relative error under 2e-9), a few FMAs and no extra special-function op.
    # The linear-CE logit tiles go without (SERIES=False): there it costs the fp32 FMA tile a stack slot, and
    # the short form's error is at the fp32 rounding of logits as large as the softcap.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    if SERIES:
        a2 = a * a
        t = tl.where(a < 0.125, a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0)))), t)
    return tl.where(x < 0, -t, t)


@triton.jit
def log1p(x):
    # log1p via the classic correction: u = 1 + x; log(u) * x / (u - 1) (exact where u == 1).
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def softplus(x):
    # log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|)).
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def expm1(x):
    # exp(x) - 1: the direct form where it is accurate, the u-correction near 0.
    u = tl.exp(x)
    d = u - 1.0
    lu = tl.log(u)
    small = d * (x / tl.where(lu == 0.0, 1.0, lu))
    small = tl.where(d == 0.0, x, small)
    return tl.where(tl.abs(x) < 0.5, small, d)


@triton.jit
def lse_step(m, s, v):
    """One element-wise online log-sum-exp step: the running max ``m`` and the sum ``s`` (relative to
    ``m``) absorb ``v``; an all ``-inf`` history stays (-inf, 0) without NaN."""
    m_new = tl.maximum(m, v)
    ms = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - ms) + tl.exp(v - ms)


@triton.jit
def round_to_bf16(x):
    # fp32 -> the nearest bf16 value (ties to even), kept in fp32. The GPU's fp32->bf16 cast rounds
    # like this; the interpreter's truncates, so kernels storing bf16 apply this first there
    # (constexpr-gated: compiled kernels skip it). NaN passes through unchanged.
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


def rne_bf16(out) -> bool:
    """Whether a kernel storing into ``out`` must round bf16 to nearest by hand (``round_to_bf16``): only
    in the interpreter, which truncates; the GPU's cast already rounds to nearest."""
    import torch
    return out.dtype == torch.bfloat16 and interpreting()


@triton.jit
def log_softmax_at(v, lse_pair):
    # log-softmax of logits v of one frame whose (row max m, log sum exp(x - m)) pair is at ``lse_pair``
    # (``row_logsumexp``): (v - m) - log s keeps full precision where m + log s would round to ulp(m)
    return (v - tl.load(lse_pair)) - tl.load(lse_pair + 1)


@triton.jit
def row_logsumexp(row, C, BLOCK_C: tl.constexpr):
    """The (max m, log sum exp(x - m)) pair of the C values at ``row`` (unit stride), BLOCK_C per step,
    online in fp32 (m = 0 for an all -inf row): log-softmax values are then ``(x - m) - log s``."""
    m = float("-inf")
    s = 0.0
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(row + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(v, axis=0))
        ms = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - ms) + tl.sum(tl.exp(v - ms), axis=0)
        m = m_new
    return tl.where(m == float("-inf"), 0.0, m), tl.log(s)
