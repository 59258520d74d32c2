"""Triton kernels for forward-backward and Viterbi over general automata (semantics:
``tri_losses/_torch/automata.py``).

Preprocessing (torch, on device, O(E log E)): the edges sorted three ways (CSR): by destination
(``in_*``), by source (``out_*``), and by (sequence, emission) (``em_*``); each CSR's max degree is a
device scalar read inside the kernels (no host sync). The kernels need each sequence's states in one
contiguous id range (``lo``, ``hi``): ``Prepared`` renumbers the states so (any global numbering works).
Dead edges (+inf weight) are left out of every CSR.

  _fsa_alpha_kernel  grid (B,): one persistent program per sequence loops over time; per frame it
                     walks its states in BLOCK_S chunks and, for each, its incoming edges in CSR
                     order: a deterministic online log-sum-exp (max with VITERBI). alpha (T, S) fp32
                     is stored per state (not per edge); frames past the sequence's length keep alpha.
  _fsa_post_kernel   grid (B,): loops t = T-1 .. 0; beta_t (after frame t) from beta_{t+1} over the
                     outgoing CSR into a 2-row ping-pong buffer (beta is never stored per frame); then
                     the edge posteriors in parallel over the sequence's edges sorted by emission
                     (BLOCK_E at a time) and gamma_t(d) per emission run by a segmented scan (fixed
                     order: deterministic, no atomics); writes a dense row (the no-edge value) and then
                     each emission's entry once: the loss gradient g * (softmax - gamma) / -gamma or
                     RETURNN's -log gamma (1e32 where 0), 0 / 1e32 on padded frames. Posteriors
                     are normalised per frame by log sum_s alpha_t(s) beta_t(s) (RETURNN's
                     per-frame normalisation: no fp32 drift between alpha and beta).
Edge scores: ``lp[t, b, emission] - w`` with lp = -am (fast_baum_welch), am (fast_viterbi), or the
log-softmax of logits (``lse`` from ``kernels/ctc.row_lse`` subtracted on the fly).
"""
import triton
import triton.language as tl

from ._math import interpreting, log_softmax_at, lse_step

NEG = float("-inf")


@triton.jit
def _edge_score(x, lse, w, em, t, b, B, stride_t, stride_b, SCORE: tl.constexpr, emask):
    v = tl.load(x + t * stride_t + b * stride_b + em, mask=emask, other=0.0).to(tl.float32)
    if SCORE == 0:      # -log space am (fast_baum_welch)
        v = -v
    elif SCORE == 2:    # logits: log-softmax
        v = log_softmax_at(v, lse + 2 * (t * B + b))
    return v - w


@triton.jit
def _fsa_alpha_kernel(x, lse, e_from, e_em, e_w, in_ptr, in_idx, max_in, lo, hi, start, lens, alpha,
                      T, B, S, stride_t, stride_b,
                      SCORE: tl.constexpr, VITERBI: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (B,), one program per sequence, t = 0 .. T-1, BLOCK_S of its states per step, their incoming
    edges (CSR ``in_ptr``/``in_idx``, up to ``max_in``) one at a time. Reads per edge its source's
    alpha_{t-1}, weight and emission score (a gather of x; lse pair for logits); writes alpha_t of the
    sequence's states into ``alpha (T, S)`` (log-sum-exp, or max with VITERBI); past the sequence's
    length alpha is carried over."""
    b = tl.program_id(0).to(tl.int64)
    s_lo = tl.load(lo + b)
    s_hi = tl.load(hi + b)
    st = tl.load(start + b)
    Tb = tl.load(lens + b)
    kmax = tl.load(max_in)
    for t32 in range(0, T):
        t = b * 0 + t32
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            sm = s < s_hi
            if t < Tb:
                p0 = tl.load(in_ptr + s, mask=sm, other=0)
                deg = tl.load(in_ptr + s + 1, mask=sm, other=0) - p0
                m = tl.full([BLOCK_S], float("-inf"), tl.float32)
                acc = tl.zeros([BLOCK_S], tl.float32)
                for k in range(0, kmax):
                    km = sm & (k < deg)
                    e = tl.load(in_idx + p0 + k, mask=km, other=0)
                    fr = tl.load(e_from + e, mask=km, other=0)
                    if t == 0:
                        a_prev = tl.where(fr == st, 0.0, float("-inf"))
                    else:
                        a_prev = tl.load(alpha + (t - 1) * S + fr, mask=km, other=float("-inf"))
                    w = tl.load(e_w + e, mask=km, other=float("inf"))
                    em = tl.load(e_em + e, mask=km, other=0)
                    v = a_prev + _edge_score(x, lse, w, em, t, b, B, stride_t, stride_b, SCORE, km)
                    v = tl.where(km, v, float("-inf"))
                    if VITERBI:
                        m = tl.maximum(m, v)
                    else:
                        m, acc = lse_step(m, acc, v)
                if VITERBI:
                    a = m
                else:
                    ms = tl.where(m == float("-inf"), 0.0, m)
                    a = ms + tl.log(acc)
            else:
                if t == 0:
                    a = tl.where(s == st, 0.0, float("-inf"))
                else:
                    a = tl.load(alpha + (t - 1) * S + s, mask=sm, other=float("-inf"))
            tl.store(alpha + t * S + s, a, mask=sm)
        tl.debug_barrier()


@triton.jit
def _fsa_post_kernel(out, grad_loss, x, lse, e_from, e_to, e_em, e_w, out_ptr, out_idx, max_out, em_ptr, em_idx,
                     lo, hi, start, end, lens, alpha, logz, beta_buf,
                     T, B, S, D, stride_t, stride_b, stride_ot, stride_ob, stride_g,
                     SCORE: tl.constexpr, MODE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    """Grid (B,), one program per sequence, t = T-1 .. 0 (BLOCK_S states, BLOCK_D classes, BLOCK_E edges
    per step). Reads alpha (T, S), x (edge scores; lse pair for logits) and the out-/emission-sorted edge
    tables; beta_t goes to the 2-row ping-pong ``beta_buf``. Writes the sequence's (T, D) block of ``out``:
    MODE 0: g * (softmax - gamma) (logits); 1: -g * gamma (log-probs); 2: -log gamma (1e32 where 0),
    each class written once per frame (a dense row, then each emission run's last edge)."""
    b = tl.program_id(0).to(tl.int64)
    s_lo = tl.load(lo + b)
    s_hi = tl.load(hi + b)
    st = tl.load(start + b)
    en = tl.load(end + b)
    Tb = tl.load(lens + b)
    z = tl.load(logz + b)
    ok = z > float("-inf")
    kout = tl.load(max_out)
    g = 1.0
    if MODE != 2:
        g = tl.load(grad_loss + b * stride_g).to(tl.float32)
    for i in range(0, T):
        t = b * 0 + (T - 1 - i)
        cur = beta_buf + (t % 2) * S
        nxt = beta_buf + ((t + 1) % 2) * S
        active = (t < Tb) & ok
        if active:
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                sm = s < s_hi
                if t == Tb - 1:
                    bt = tl.where(s == en, 0.0, float("-inf"))
                else:
                    p0 = tl.load(out_ptr + s, mask=sm, other=0)
                    deg = tl.load(out_ptr + s + 1, mask=sm, other=0) - p0
                    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
                    acc = tl.zeros([BLOCK_S], tl.float32)
                    for k in range(0, kout):
                        km = sm & (k < deg)
                        e = tl.load(out_idx + p0 + k, mask=km, other=0)
                        to = tl.load(e_to + e, mask=km, other=0)
                        w = tl.load(e_w + e, mask=km, other=float("inf"))
                        em = tl.load(e_em + e, mask=km, other=0)
                        v = tl.load(nxt + to, mask=km, other=float("-inf")) + _edge_score(
                            x, lse, w, em, t + 1, b, B, stride_t, stride_b, SCORE, km)
                        v = tl.where(km, v, float("-inf"))
                        m, acc = lse_step(m, acc, v)
                    ms = tl.where(m == float("-inf"), 0.0, m)
                    bt = ms + tl.log(acc)
                tl.store(cur + s, bt, mask=sm)
        tl.debug_barrier()
        # per-frame normaliser log sum_s alpha_t(s) beta_t(s) (= log Z up to fp32 drift)
        zt = z
        if active:
            mv = tl.full([BLOCK_S], float("-inf"), tl.float32)
            av = tl.zeros([BLOCK_S], tl.float32)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                sm = s < s_hi
                v = tl.load(alpha + t * S + s, mask=sm, other=float("-inf")) + tl.load(cur + s, mask=sm,
                                                                                        other=float("-inf"))
                mv, av = lse_step(mv, av, v)
            mx = tl.max(mv, 0)
            mxs = tl.where(mx == float("-inf"), 0.0, mx)
            zt = mxs + tl.log(tl.sum(av * tl.exp(mv - mxs), 0))
        orow = out + t * stride_ot + b * stride_ob
        # (a) every class's value without edges: g * softmax (logits), 0 (log-probs), 1e32 (-log gamma)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            if MODE == 2:
                r = tl.full([BLOCK_D], 1e32, tl.float32)
            elif MODE == 0:
                xv = tl.load(x + t * stride_t + b * stride_b + d, mask=dm, other=0.0).to(tl.float32)
                r = tl.where(t < Tb, g * tl.exp(log_softmax_at(xv, lse + 2 * (t * B + b))), 0.0)
            else:
                r = tl.zeros([BLOCK_D], tl.float32)
            tl.store(orow + d, r, mask=dm)
        tl.debug_barrier()  # (b) overwrites some of these entries, possibly from other threads
        # (b) gamma_t(d) = sum of the posteriors of the edges emitting d: the sequence's live edges in
        # (emission)-sorted order, BLOCK_E at a time, a segmented scan per emission run (fixed order,
        # relative precision kept per class); each run's last edge writes its class once
        if active:
            q0 = tl.load(em_ptr + b * D)
            q1 = tl.load(em_ptr + b * D + D)
            carry = 0.0
            for c0 in range(q0, q1, BLOCK_E):
                q = c0 + tl.arange(0, BLOCK_E)
                qm = q < q1
                e = tl.load(em_idx + q, mask=qm, other=0)
                fr = tl.load(e_from + e, mask=qm, other=0)
                to = tl.load(e_to + e, mask=qm, other=0)
                w = tl.load(e_w + e, mask=qm, other=float("inf"))
                em = tl.load(e_em + e, mask=qm, other=-1)
                em_prev = tl.load(e_em + tl.load(em_idx + q - 1, mask=qm & (q > q0), other=0),
                                  mask=qm & (q > q0), other=-1)
                em_next = tl.load(e_em + tl.load(em_idx + q + 1, mask=(q + 1) < q1, other=0),
                                  mask=(q + 1) < q1, other=-1)
                if t == 0:
                    a_prev = tl.where(fr == st, 0.0, float("-inf"))
                else:
                    a_prev = tl.load(alpha + (t - 1) * S + fr, mask=qm, other=float("-inf"))
                v = a_prev + _edge_score(x, lse, w, em, t, b, B, stride_t, stride_b, SCORE, qm) \
                    + tl.load(cur + to, mask=qm, other=float("-inf")) - zt
                post = tl.where(qm, tl.exp(v), 0.0)
                head = (em != em_prev).to(tl.int32)  # a run of one emission starts here
                seg, _ = tl.associative_scan((post, head), 0, _seg_sum)
                # the chunk's leading run may continue the previous chunk's last run
                started = tl.cumsum(head, 0) > 0
                seg = tl.where(started, seg, seg + carry)
                carry = tl.sum(tl.where(q == tl.minimum(c0 + BLOCK_E, q1) - 1, seg, 0.0), 0)
                last = qm & (em != em_next)
                if MODE == 2:
                    r = tl.where(seg > 0, -tl.log(tl.where(seg > 0, seg, 1.0)), 1e32)
                elif MODE == 0:
                    xe = tl.load(x + t * stride_t + b * stride_b + em, mask=last, other=0.0).to(tl.float32)
                    r = g * (tl.exp(log_softmax_at(xe, lse + 2 * (t * B + b))) - seg)
                else:
                    r = -g * seg
                tl.store(orow + em, r, mask=last)
        tl.debug_barrier()


@triton.jit
def _seg_sum(a, fa, b, fb):
    """Combine of a segmented sum: ``b`` starting a new segment (fb = 1) drops what came before."""
    return tl.where(fb != 0, b, a + b), fa | fb


def _counts(key, n):
    """Occurrences of each id in [0, n) (integer scatter-add: exact, and unlike bincount no host sync)."""
    import torch
    return torch.zeros(n, dtype=torch.int64, device=key.device).scatter_add_(0, key, torch.ones_like(key))


def _csr(key, n, device, live):
    """Stable sort by ``key`` -> (ptr (n + 2,) int64, order (E,) int64, max degree (1,) int64). Dead edges
    (``live`` False: +inf weight) go to an extra bucket ``n`` that the kernels never visit."""
    import torch
    key = torch.where(live, key, n)
    order = torch.sort(key, stable=True).indices
    counts = _counts(key, n + 1)
    ptr = torch.zeros(n + 2, dtype=torch.int64, device=device)
    ptr[1:] = torch.cumsum(counts, 0)
    mx = counts[:n].max().reshape(1) if n else torch.zeros(1, dtype=torch.int64, device=device)
    return ptr, order, mx


class Prepared:
    """Edge tables for the kernels, built once per call on device (no host sync).

    States are renumbered so that each sequence's states form one contiguous range ``[lo_b, hi_b)``
    (stable sort by owning sequence; states no edge or start/end uses go last); ``new_id`` maps an
    original state id to its kernel id (alpha columns are in kernel ids).
    """

    def __init__(self, edges, weights, se, num_states, B, D):
        import torch
        dev = edges.device
        n = num_states
        b = torch.arange(B, device=dev)
        owner = torch.full((n,), B, dtype=torch.int64, device=dev)
        owner.scatter_(0, edges[0], edges[3])
        owner.scatter_(0, edges[1], edges[3])
        owner.scatter_(0, se[0], b)
        owner.scatter_(0, se[1], b)
        order = torch.sort(owner, stable=True).indices
        new_id = torch.empty(n, dtype=torch.int64, device=dev)
        new_id[order] = torch.arange(n, dtype=torch.int64, device=dev)
        cnt = _counts(owner, B + 1)[:B]
        self.hi = torch.cumsum(cnt, 0)
        self.lo = self.hi - cnt
        self.new_id = new_id
        self.e_from, self.e_to = new_id[edges[0]].contiguous(), new_id[edges[1]].contiguous()
        self.e_em = edges[2].contiguous()
        self.e_w = weights.float().contiguous()
        live = self.e_w < float("inf")
        self.in_ptr, self.in_idx, self.max_in = _csr(self.e_to, n, dev, live)
        self.out_ptr, self.out_idx, self.max_out = _csr(self.e_from, n, dev, live)
        self.em_ptr, self.em_idx, _ = _csr(edges[3] * D + edges[2], B * D, dev, live)
        self.start, self.end = new_id[se[0]].contiguous(), new_id[se[1]].contiguous()
        self.S = n


def _blocks(p, D, B):
    """(BLOCK_S states, BLOCK_D classes, BLOCK_E edges: the average edges per sequence, from shapes only)."""
    be = min(max(triton.next_power_of_2(-(-p.e_w.numel() // max(B, 1))), 16), 64 if interpreting() else 1024)
    return 64, min(triton.next_power_of_2(max(D, 16)), 1024), be


def alpha(x, lse, prep, lens, score, viterbi):
    """alpha (T, S) fp32 and log Z (B,)."""
    import torch
    T, B, D = x.shape
    a = torch.empty(T, prep.S, dtype=torch.float32, device=x.device)
    if T == 0 or B == 0:
        return a, torch.where(prep.start == prep.end, 0.0, float("-inf"))
    bs, _, _ = _blocks(prep, D, B)
    _fsa_alpha_kernel[(B,)](x, lse if lse is not None else x, prep.e_from, prep.e_em, prep.e_w, prep.in_ptr,
                            prep.in_idx, prep.max_in, prep.lo, prep.hi, prep.start, lens, a, T, B, prep.S,
                            x.stride(0), x.stride(1), SCORE=score, VITERBI=bool(viterbi), BLOCK_S=bs, num_warps=4)
    logz = a[T - 1][prep.end]
    logz = torch.where(lens == 0, torch.where(prep.start == prep.end, 0.0, float("-inf")), logz)
    return a, logz


def posteriors(out, grad_loss, x, lse, prep, lens, a, logz, score, mode):
    """Write gradient (mode 0/1) or -log posteriors (mode 2) into ``out`` (T, B, D) fp32."""
    import torch
    T, B, D = x.shape
    if T == 0 or B == 0:
        return
    beta = torch.empty(2, prep.S, dtype=torch.float32, device=x.device)
    bs, bd, be = _blocks(prep, D, B)
    g = grad_loss if grad_loss is not None else logz
    _fsa_post_kernel[(B,)](out, g, x, lse if lse is not None else x, prep.e_from, prep.e_to, prep.e_em, prep.e_w,
                           prep.out_ptr, prep.out_idx, prep.max_out, prep.em_ptr, prep.em_idx,
                           prep.lo, prep.hi, prep.start, prep.end, lens, a, logz.float().contiguous(), beta,
                           T, B, prep.S, D, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                           g.stride(0) if g.dim() else 0, SCORE=score, MODE=mode, BLOCK_S=bs, BLOCK_D=bd,
                           BLOCK_E=be, num_warps=4 if be <= 256 else 8)
