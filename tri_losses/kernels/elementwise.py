"""One Triton template for the element-wise losses: BCE-with-logits (+ weight, pos_weight), MSE, L1,
and MSE/L1 against a one-hot of an integer target.

Two indexing paths, chosen per launch by the constexpr CONTIG:
* CONTIG (the common case: input, a float target and a weight all contiguous with the full output
  shape, fewer than 2**31 elements): element i sits at offset i of every operand, so offsets need
  no division at all and loads/stores vectorise; indices are int32. The last-dim index (pos_weight,
  one-hot) and the frame index (HAS_LEN) are derived by int32 division only where those flags ask.
* general: the output shape is padded to 4 dims (d0, d1, d2, d3); each operand has 4 strides, 0 on
  broadcast dims (expanded weights are never materialised), offsets by int64 division/modulo.
  _ew_fwd_kernel : grid (cdiv(numel, BLOCK),); per-element fp32 losses (reduction "none") or one fp32
                   partial sum per program, summed afterwards in program order (no float atomics).
  _ew_bwd_kernel : grid (cdiv(numel, BLOCK),); one pass: d/dinput and d/dtarget times the upstream
                   gradient (a stride-0 scalar or per-element), stored in the gradients' dtypes (the
                   input's own dtype for a full-shape input: no fp32 buffer and cast afterwards).
Bytes: forward reads each operand once (broadcast operands hit cache), writes numel*4 (none) or
4 per program; backward reads the operands + upstream and writes one or two gradients.
KIND: 0 BCE-with-logits, 1 MSE, 2 L1. ONEHOT: the target is an integer class id broadcast over
the last dim (t = [last index == id]). HAS_LEN: a (B,) int length vector for a (B, T, F) problem
(4-D shape (1, B, T, F)): elements of frames t >= len[b] count 0 and get 0 gradient, so the masked
sum over valid frames is one pass.
"""
import triton
import triton.language as tl

from ._math import rne_bf16, softplus
from ._tiles import _store

BLOCK = 1024


@triton.jit
def _indices(BLOCK: tl.constexpr, CONTIG: tl.constexpr):
    """This program's element indices: int32 on the contiguous path (numel < 2**31), else int64."""
    if CONTIG:
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    else:
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return i


@triton.jit
def _offsets(i, d1, d2, d3, s0, s1, s2, s3):
    """Offset of flat element ``i`` (of the 4-D shape (., d1, d2, d3)) in an operand of strides s0..s3,
    and the element's last-dim index."""
    i3 = i % d3
    r = i // d3
    i2 = r % d2
    r = r // d2
    i1 = r % d1
    i0 = r // d1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3, i3


@triton.jit
def _frame_valid(i, m, d1, d2, d3, lens):
    """``m`` and (frame t of sequence b of element i is below ``lens[b]``), for the 4-D shape (1, B, T, F)."""
    r = i // d3
    t_idx = r % d2
    b_idx = (r // d2) % d1
    n = tl.load(lens + b_idx, mask=m, other=0)
    return m & (t_idx < n)


@triton.jit
def _load_operands(x, t, w, pw, i, m, d1, d2, d3, sx0, sx1, sx2, sx3, st0, st1, st2, st3, sw0, sw1, sw2, sw3,
                   spw, HAS_W: tl.constexpr, HAS_PW: tl.constexpr, ONEHOT: tl.constexpr, CONTIG: tl.constexpr):
    """fp32 input, target (one-hot: [last index == id]), weight and pos_weight of elements ``i`` (masked ``m``)."""
    if CONTIG:
        ox = i
        ow = i
        if ONEHOT:
            ot = i // d3
        else:
            ot = i
        if ONEHOT or HAS_PW:
            i3 = i % d3
        else:
            i3 = i  # unused
    else:
        ox, i3 = _offsets(i, d1, d2, d3, sx0, sx1, sx2, sx3)
        ot, _ = _offsets(i, d1, d2, d3, st0, st1, st2, st3)
        ow, _ = _offsets(i, d1, d2, d3, sw0, sw1, sw2, sw3)
    xv = tl.load(x + ox, mask=m, other=0.0).to(tl.float32)
    if ONEHOT:
        tv = tl.where(tl.load(t + ot, mask=m, other=-1) == i3, 1.0, 0.0)
    else:
        tv = tl.load(t + ot, mask=m, other=0.0).to(tl.float32)
    wv = 1.0
    if HAS_W:
        wv = tl.load(w + ow, mask=m, other=0.0).to(tl.float32)
    qv = 1.0
    if HAS_PW:
        qv = tl.load(pw + i3 * spw, mask=m, other=0.0).to(tl.float32)
    return xv, tv, wv, qv


@triton.jit
def _ew_fwd_kernel(out, x, t, w, pw, lens, numel, d1, d2, d3,
                   sx0, sx1, sx2, sx3, st0, st1, st2, st3, sw0, sw1, sw2, sw3, spw,
                   KIND: tl.constexpr, HAS_W: tl.constexpr, HAS_PW: tl.constexpr, ONEHOT: tl.constexpr,
                   HAS_LEN: tl.constexpr, REDUCE: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    """Forward. Grid (cdiv(numel, BLOCK),): program p reads elements [p*BLOCK, (p+1)*BLOCK) of x, t, w, pw
    (and lens) and writes their fp32 losses to ``out`` (REDUCE=False, numel) or their sum to ``out[p]``."""
    i = _indices(BLOCK, CONTIG)
    m = i < numel
    if HAS_LEN:
        m = _frame_valid(i, m, d1, d2, d3, lens)
    xv, tv, wv, qv = _load_operands(x, t, w, pw, i, m, d1, d2, d3, sx0, sx1, sx2, sx3, st0, st1, st2, st3,
                                    sw0, sw1, sw2, sw3, spw, HAS_W, HAS_PW, ONEHOT, CONTIG)
    if KIND == 0:
        l = qv * tv * softplus(-xv) + (1.0 - tv) * softplus(xv)
    elif KIND == 1:
        l = (xv - tv) * (xv - tv)
    else:
        l = tl.abs(xv - tv)
    l = tl.where(m, l * wv, 0.0)
    if REDUCE:
        tl.store(out + tl.program_id(0), tl.sum(l, axis=0))
    else:
        tl.store(out + i, l, mask=i < numel)


@triton.jit
def _ew_bwd_kernel(dx, dt, g, x, t, w, pw, lens, numel, d1, d2, d3,
                   sx0, sx1, sx2, sx3, st0, st1, st2, st3, sw0, sw1, sw2, sw3, spw, sg,
                   KIND: tl.constexpr, HAS_W: tl.constexpr, HAS_PW: tl.constexpr, ONEHOT: tl.constexpr,
                   HAS_LEN: tl.constexpr, NEED_DT: tl.constexpr, SCALAR_G: tl.constexpr,
                   CONTIG: tl.constexpr, RNE_DX: tl.constexpr, RNE_DT: tl.constexpr, BLOCK: tl.constexpr):
    """Backward. Grid (cdiv(numel, BLOCK),): program p reads the operands of its BLOCK elements and the
    upstream ``g`` (one scalar with SCALAR_G, else per element at stride ``sg``) and writes d/dx (and d/dt
    with NEED_DT) to flat ``dx``/``dt`` in their dtypes."""
    i = _indices(BLOCK, CONTIG)
    m_all = i < numel
    m = m_all
    if HAS_LEN:
        m = _frame_valid(i, m_all, d1, d2, d3, lens)
    xv, tv, wv, qv = _load_operands(x, t, w, pw, i, m, d1, d2, d3, sx0, sx1, sx2, sx3, st0, st1, st2, st3,
                                    sw0, sw1, sw2, sw3, spw, HAS_W, HAS_PW, ONEHOT, CONTIG)
    if SCALAR_G:  # the reduced loss's upstream: one load per program
        gv = tl.load(g).to(tl.float32) * wv
    else:
        gv = tl.load(g + i * sg, mask=m, other=0.0).to(tl.float32) * wv
    if KIND == 0:
        sig = 1.0 / (1.0 + tl.exp(-xv))
        gx = (1.0 - tv) * sig - qv * tv * (1.0 - sig)
        if HAS_PW:  # q softplus(-x) - softplus(x): from x < -1 as is; above, (q - 1) softplus(-x) - x, which
            # cancels neither at x ~ 0 (q ~ 1) nor, this way round, where softplus(-x) ~ -x (x << 0, small q)
            gt = tl.where(xv < -1.0, qv * softplus(-xv) - softplus(xv), (qv - 1.0) * softplus(-xv) - xv)
        else:  # q = 1: -x (no 0 * inf at x = -inf)
            gt = -xv
    elif KIND == 1:
        gx = 2.0 * (xv - tv)
        gt = -gx
    else:
        d = xv - tv
        gx = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        gt = -gx
    gx = tl.where(m, gx * gv, 0.0)  # masked frames: exactly 0
    _store(dx + i, gx, m_all, RNE_DX)
    if NEED_DT:
        gt = tl.where(m, gt * gv, 0.0)
        _store(dt + i, gt, m_all, RNE_DT)


def _strides4(t, shape4):
    """Strides of ``t`` broadcast to the 4-D ``shape4`` (0 on broadcast dims)."""
    nd = t.dim()
    st = [0] * (4 - nd) + list(t.stride())
    sh = [1] * (4 - nd) + list(t.shape)
    return [0 if sh[k] == 1 and shape4[k] != 1 else st[k] for k in range(4)]


def _full_contiguous(a, shape4, numel):
    return a.numel() == numel and a.is_contiguous() and [1] * (4 - a.dim()) + list(a.shape) == list(shape4)


def _launch_args(x, t, w, pw, onehot, shape4):
    """(CONTIG, the 13 stride arguments) for one launch."""
    numel = shape4[0] * shape4[1] * shape4[2] * shape4[3]
    contig = (numel < 2 ** 31 and _full_contiguous(x, shape4, numel)
              and (t.is_contiguous() and t.numel() * shape4[3] == numel if onehot
                   else _full_contiguous(t, shape4, numel))
              and (w is None or _full_contiguous(w, shape4, numel)))
    sx = _strides4(x, shape4)
    stt = _strides4(t, shape4)
    sw = _strides4(w, shape4) if w is not None else [0, 0, 0, 0]
    spw = (pw.stride(-1) if pw.shape[-1] != 1 else 0) if pw is not None else 0
    return contig, sx + stt + sw + [spw]


def ew_fwd(kind, x, t, w, pw, onehot, shape4, reduce, lens=None):
    """Per-element fp32 losses (numel,) or per-program partial sums (fp32)."""
    import torch
    numel = shape4[0] * shape4[1] * shape4[2] * shape4[3]
    nprog = triton.cdiv(numel, BLOCK)
    out = torch.empty(nprog if reduce else numel, dtype=torch.float32, device=x.device)
    if numel == 0:
        return out
    contig, strides = _launch_args(x, t, w, pw, onehot, shape4)
    _ew_fwd_kernel[(nprog,)](out, x, t, w if w is not None else x, pw if pw is not None else x,
                             lens if lens is not None else x, numel,
                             shape4[1], shape4[2], shape4[3], *strides,
                             KIND=kind, HAS_W=w is not None, HAS_PW=pw is not None, ONEHOT=onehot,
                             HAS_LEN=lens is not None, REDUCE=reduce, CONTIG=contig,
                             BLOCK=BLOCK, num_warps=4)
    return out


def ew_bwd(kind, g, x, t, w, pw, onehot, shape4, dx, dt, lens=None):
    """Write d/dx (and d/dt if ``dt`` is given) of sum(g * loss) into flat ``dx``/``dt`` (numel,), in their
    dtypes. ``g``: per element (flat, any stride), or 0-d (one upstream for every element: the reduced
    loss's)."""
    numel = dx.numel()
    if numel == 0:
        return
    contig, strides = _launch_args(x, t, w, pw, onehot, shape4)
    scalar = g.dim() == 0
    sg = 0 if scalar else g.stride(0)
    # the contiguous path's int32 index also addresses a per-element upstream (at i * sg): a strided one
    # (e.g. a loss concatenated beside other columns) must fit in int32 there too
    contig = contig and (scalar or numel * sg < 2 ** 31)
    _ew_bwd_kernel[(triton.cdiv(numel, BLOCK),)](
        dx, dt if dt is not None else dx, g, x, t, w if w is not None else x, pw if pw is not None else x,
        lens if lens is not None else x, numel,
        shape4[1], shape4[2], shape4[3], *strides, sg,
        KIND=kind, HAS_W=w is not None, HAS_PW=pw is not None, ONEHOT=onehot, HAS_LEN=lens is not None,
        NEED_DT=dt is not None, SCALAR_G=scalar, CONTIG=contig, RNE_DX=rne_bf16(dx),
        RNE_DT=dt is not None and rne_bf16(dt), BLOCK=BLOCK, num_warps=4)
