"""Triton kernels for batched Levenshtein distance and BLEU n-gram statistics (integer arithmetic).

_edit_distance_kernel: grid (B,), one program per pair. Rows of the DP over the hypothesis, the
  reference axis vectorised in BLOCK_R chunks:
      c[0] = i,  c[j] = min(D[i-1][j] + 1, D[i-1][j-1] + [a_i != b_j])
      D[i][j] = j + min_{k <= j} (c[k] - k)        (prefix min: tl.associative_scan)
  a chunk carries the running min of the chunks before it, so references of any length work; the
  previous row lives in a 2-row int32 ping-pong scratch (B, 2, R+1). |hyp| row steps per pair (the
  loop bound is the pair's own length), no launch per anti-diagonal. Bytes: O(|hyp| * |ref|) int32
  scratch traffic per pair, all L2-resident.
_bleu_stats_kernel: grid (B,), one program per pair. For each hypothesis n-gram start i (BLOCK-wide
  tiles over i and over j), E_n[i, j] = E_{n-1}[i, j] & (h[i+n-1] == r[j+n-1]) is built order by
  order from 2-D tile compares, counting in-reference copies (hyp x ref) and in-hypothesis copies
  plus "an earlier equal n-gram exists" (hyp x hyp); clipped counts min(#hyp, #ref) summed over
  first occurrences give match_n. Output (B, 2*N + 2) int32: match_1..N, poss_1..N, |hyp|, |ref|.
"""
import triton
import triton.language as tl

from ._math import interpreting


@triton.jit
def _min_combine(a, b):
    """The combine function of the prefix-min scan (``tl.associative_scan``)."""
    return tl.minimum(a, b)


@triton.jit
def _edit_distance_kernel(hyp, hyp_len, ref, ref_len, out, rows, H, R, BLOCK_R: tl.constexpr):
    """Levenshtein distance of one pair. Grid (B,): program b reads ``hyp[b, :hyp_len[b]]`` (int64, row
    stride H) and ``ref[b, :ref_len[b]]`` (row stride R); DP rows over the hypothesis, the reference axis
    in BLOCK_R-wide chunks with a prefix-min scan (a carry between chunks); the previous row in its
    2 x (R + 1) int32 slice of ``rows``. Writes ``out[b]`` (int32)."""
    b = tl.program_id(0).to(tl.int64)
    Hb = tl.load(hyp_len + b).to(tl.int32)
    Rb = tl.load(ref_len + b).to(tl.int32)
    W = R + 1
    base = rows + b * 2 * W
    # row 0: D[0][j] = j
    for j0 in range(0, Rb + 1, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        tl.store(base + j, j, mask=j <= Rb)
    tl.debug_barrier()
    for i in range(1, Hb + 1):
        prev = base + ((i - 1) % 2) * W
        cur = base + (i % 2) * W
        a = tl.load(hyp + b * H + i - 1)
        carry = 2147483647
        for j0 in range(0, Rb + 1, BLOCK_R):
            j = j0 + tl.arange(0, BLOCK_R)
            jm = j <= Rb
            up = tl.load(prev + j, mask=jm, other=0)
            diag = tl.load(prev + j - 1, mask=jm & (j >= 1), other=0)
            bj = tl.load(ref + b * R + j - 1, mask=jm & (j >= 1), other=0)
            c = tl.minimum(up + 1, diag + tl.where(bj != a, 1, 0))
            c = tl.where(j == 0, i, c)
            v = tl.where(jm, c - j, 2147483647)
            pm = tl.minimum(tl.associative_scan(v, 0, _min_combine), carry)
            tl.store(cur + j, j + pm, mask=jm)
            carry = tl.minimum(carry, tl.min(v, axis=0))
        tl.debug_barrier()
    tl.store(out + b, tl.load(base + (Hb % 2) * W + Rb))


@triton.jit
def _bleu_stats_kernel(hyp, hyp_len, ref, ref_len, out, H, R, N: tl.constexpr, BLOCK: tl.constexpr):
    """Clipped n-gram statistics of one pair. Grid (B,): program b compares BLOCK x BLOCK tiles of n-gram
    starts (hyp x ref and hyp x hyp) order by order, n = 1..N, and writes the int32 row
    ``out[b] = [match_1..N, poss_1..N, |hyp|, |ref|]``."""
    b = tl.program_id(0).to(tl.int64)
    Hb = tl.load(hyp_len + b).to(tl.int32)
    Rb = tl.load(ref_len + b).to(tl.int32)
    hrow = hyp + b * H
    rrow = ref + b * R
    orow = out + b * (2 * N + 2)
    for n in tl.static_range(1, N + 1):
        match = 0
        npos = Hb - n + 1  # n-gram starts in the hypothesis
        for i0 in range(0, tl.maximum(npos, 0), BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            im = i < npos
            c_ref = tl.zeros([BLOCK], tl.int32)
            c_hyp = tl.zeros([BLOCK], tl.int32)
            earlier = tl.zeros([BLOCK], tl.int32)
            # hyp x ref
            for j0 in range(0, tl.maximum(Rb - n + 1, 0), BLOCK):
                j = j0 + tl.arange(0, BLOCK)
                jm = j < Rb - n + 1
                eq = im[:, None] & jm[None, :]
                for k in tl.static_range(0, n):
                    hk = tl.load(hrow + i + k, mask=im, other=-1)
                    rk = tl.load(rrow + j + k, mask=jm, other=-2)
                    eq = eq & (hk[:, None] == rk[None, :])
                c_ref += tl.sum(eq.to(tl.int32), axis=1)
            # hyp x hyp
            for j0 in range(0, npos, BLOCK):
                j = j0 + tl.arange(0, BLOCK)
                jm = j < npos
                eq = im[:, None] & jm[None, :]
                for k in tl.static_range(0, n):
                    hk = tl.load(hrow + i + k, mask=im, other=-1)
                    hj = tl.load(hrow + j + k, mask=jm, other=-2)
                    eq = eq & (hk[:, None] == hj[None, :])
                e32 = eq.to(tl.int32)
                c_hyp += tl.sum(e32, axis=1)
                earlier += tl.sum(tl.where(j[None, :] < i[:, None], e32, 0), axis=1)
            first = im & (earlier == 0)
            match += tl.sum(tl.where(first, tl.minimum(c_hyp, c_ref), 0), axis=0)
        tl.store(orow + (n - 1), match)
        tl.store(orow + N + (n - 1), tl.maximum(npos, 0))
    tl.store(orow + 2 * N, Hb)
    tl.store(orow + 2 * N + 1, Rb)


def edit_distance(hyp, hyp_len, ref, ref_len):
    """(B,) int32 Levenshtein distances of padded int64 ``hyp (B, H)`` / ``ref (B, R)`` (ids compared in full width)."""
    import torch
    B, H = hyp.shape
    R = ref.shape[1]
    out = torch.empty(B, dtype=torch.int32, device=hyp.device)
    if B == 0:
        return out
    rows = torch.empty(B, 2, R + 1, dtype=torch.int32, device=hyp.device)
    block = min(triton.next_power_of_2(R + 1), 64 if interpreting() else 1024)
    _edit_distance_kernel[(B,)](hyp, hyp_len, ref, ref_len, out, rows, H, R, BLOCK_R=block, num_warps=4)
    return out


def bleu_stats(hyp, hyp_len, ref, ref_len, max_order):
    """(B, 2*max_order + 2) int32: match_n, poss_n (n = 1..N), |hyp|, |ref|."""
    import torch
    B, H = hyp.shape
    R = ref.shape[1]
    out = torch.empty(B, 2 * max_order + 2, dtype=torch.int32, device=hyp.device)
    if B == 0:
        return out
    # 32 x 32 tiles of n-gram comparisons: sm_90 compiles them in 128 registers without spills (64 x 64 tiles
    # spilled up to 968 bytes per thread at 4 warps)
    block = 32
    _bleu_stats_kernel[(B,)](hyp, hyp_len, ref, ref_len, out, H, R, N=max_order, BLOCK=block, num_warps=4)
    return out
