"""Every Triton kernel compiles for sm_90 (H100/H200), with the launch configurations a GPU gets.

The interpreter runs programs that compiled Triton rejects (a loop-carried variable changing type,
constexpr reassignment, ...), so CPU-only test runs would miss them. Here the public ops run with
kernel launches recorded instead of executed (see tests/aot.py), in fp32 and bf16 and with
every constexpr flag the ops use, and each distinct launch (with the 16-byte alignment hints a GPU
launch gets) is compiled ahead of time for sm_90, once: its registers, spills and synchronous
shared-memory tiles are read from the same compile.
On a CUDA machine the rest of the suite runs the compiled kernels, so this test is skipped there.
"""
import os
import warnings

import pytest
import torch

from tests.conftest import HAS_CUDA
from tests import aot

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="on a GPU every test runs the compiled kernels")

DTYPES = (torch.float32, torch.bfloat16)


def _bwd(loss, *xs):
    torch.autograd.grad(loss.float().sum(), [x for x in xs if x is not None and x.requires_grad],
                        allow_unused=True)


def _cross_entropy(tl_):
    for dt in DTYPES:
        # one block / several blocks per row / several backward programs per row / the fast path's split
        # kernel (rows of 128 KiB and more: 40000 fp32, 70000 both)
        for C in (300, 5000, 40000, 70000):
            x = torch.randn(6, C, dtype=dt, requires_grad=True)
            y = torch.randint(0, C, (6,))
            q = torch.rand(6, C).softmax(-1).to(dt)
            w = torch.rand(C)
            opts = [dict(), dict(weight=w, label_smoothing=0.1), dict(label_smoothing=0.2, label_smoothing_mode="others"),
                    dict(label_smoothing=0.2, label_smoothing_mode="gaussian", focal_gamma=2.0),
                    dict(z_loss=1e-3, softcap=20.0, fake_upper_bound=3.0, return_lse=True),
                    dict(input_type="log_probs"), dict(input_type="probs", focal_gamma=1.0),
                    dict(reduction="none"), dict(inplace_backward=True)]
            # each option set twice: the training fast path (mean: forward + gradient in one kernel, the
            # backward's scale in place) and the exact path (a per-row upstream: forward, then backward)
            for kw in opts + [dict(kw, reduction="none") for kw in opts if "reduction" not in kw]:
                xx = x.detach().clone().requires_grad_() if kw.get("inplace_backward") else x
                out = tl_.cross_entropy(xx * 1 if kw.get("inplace_backward") else xx, y, backend="triton", **kw)
                out = out[0] if isinstance(out, tuple) else out
                _bwd(out, xx)
            for red in ("mean", "none"):
                _bwd(tl_.cross_entropy(x, q, label_smoothing=0.1, reduction=red, backend="triton"), x)
                _bwd(tl_.cross_entropy(x, q, weight=w, input_type="log_probs", reduction=red, backend="triton"), x)
            # the fast path's backward under retain_graph: the scaled gradient into a new buffer
            torch.autograd.grad(tl_.cross_entropy(x, y, backend="triton") * 2.0, x, retain_graph=True)
            # vocab-parallel's local half (PARTIAL) with the shard's columns at an offset of the classes; the
            # backward with offsets is ce_bwd above (class_offset and V are runtime arguments)
            xd = x.detach()
            for tgt, cw, flat in ((y, None, (False, -100, 0.0, 0, 0, 0.0, 0.0, 0.0)),
                                  (y, w, (False, -100, 0.1, 1, 0, 2.0, 0.0, 20.0)),
                                  (y, None, (False, -100, 0.2, 3, 0, 0.0, 0.0, 0.0)),
                                  (y, w, (False, -100, 0.0, 0, 2, 1.0, 0.0, 0.0)),
                                  (q, w, (True, -100, 0.1, 1, 1, 0.0, 0.0, 0.0))):
                torch.ops.tri_losses.ce_partial(xd, tgt, cw, *flat, float("inf"), 5, C + 11, True)


def _linear_cross_entropy(tl_):
    for dt in (*DTYPES, torch.float16):  # (fp16 takes the Triton GEMM kernels on every stage: no cuBLAS path)
        # the vocabulary split grid at small N, row tiles at larger N; V 1000: chunk widths that are not a
        # multiple of 16, V 1024: the common case, whose specialisation differs (e.g. the dW kernel
        # pipelines its dz loads only then)
        for N, V in ((5, 1000), (300, 1024)):
            x = torch.randn(N, 64, dtype=dt, requires_grad=True)
            w = torch.randn(V, 64, dtype=dt, requires_grad=True)
            b = torch.randn(V, dtype=dt, requires_grad=True)
            y = torch.randint(0, V, (N,))
            # mean/sum: the scalar-upstream op; "none": forward + recomputing backward; chunk_size: several
            # vocabulary chunks (the dX accumulator's first/middle/last launches); filter_eps; frozen head
            opts = (dict(), dict(linear_bias=b, weight=torch.rand(V), label_smoothing=0.1),
                    dict(label_smoothing=0.1, label_smoothing_mode="others", focal_gamma=1.0, z_loss=1e-4),
                    dict(label_smoothing=0.1, label_smoothing_mode="gaussian", softcap=15.0, reduction="none"),
                    dict(linear_bias=b, chunk_size=N * 400, filter_eps=1e-6, reduction="sum"))
            if dt == torch.float16:  # the flags' code is bf16's: fp16 needs its own dtype through every kernel
                # (plain, and with bias, weights, smoothing, a cap and several chunks), not every flag again
                opts = (dict(), dict(linear_bias=b, weight=torch.rand(V), label_smoothing=0.1, softcap=15.0,
                                     chunk_size=N * 400))
            for kw in opts:
                _bwd(tl_.linear_cross_entropy(x, w, y, backend="triton", **kw), x, w, kw.get("linear_bias"))
            if dt == torch.float16:
                tl_.linear_cross_entropy(x.detach(), w.detach(), y, return_argmax=True, backend="triton")
                continue
            _bwd(tl_.linear_cross_entropy(x, w.detach(), y, reduction="none", chunk_size=N * 400, backend="triton"), x)
            # return_argmax: the split kernel's running argmax (ARGMAX), with a cap and plain
            tl_.linear_cross_entropy(x.detach(), w.detach(), y, softcap=15.0, return_argmax=True, backend="triton")
            tl_.linear_cross_entropy(x.detach(), w.detach(), y, linear_bias=b.detach(), return_argmax=True,
                                     reduction="none", backend="triton")
            # return_lse: the lse's upstream in the dz kernel (HAS_LSE_GRAD)
            _bwd(sum(tl_.linear_cross_entropy(x, w, y, linear_bias=b, softcap=15.0, return_lse=True, backend="triton",
                                              reduction="none")), x, w, b)
            # return_entropy: the split kernel's running q (ENTROPY), the finish kernel's entropy, the entropy's
            # upstream in the dz kernel (HAS_ENT_GRAD), with and without a cap, smoothing, and with the lse's
            for kw in (dict(softcap=15.0, return_lse=True), dict(linear_bias=b, label_smoothing=0.1),
                       dict(return_argmax=True, chunk_size=N * 400)):
                _bwd(sum(t for t in tl_.linear_cross_entropy(x, w, y, return_entropy=True, backend="triton",
                                                             reduction="none", **kw) if t.is_floating_point()),
                     x, w, kw.get("linear_bias"))
            # the forward's tensor-descriptor (TMA) loads: a launch option (FWD_TMA) the GPU sweep may pick
            from tri_losses._backend import kernels
            K = kernels("linear_cross_entropy")
            old, K.FWD_TMA = K.FWD_TMA, True
            try:
                for kw in (dict(), dict(linear_bias=b, weight=torch.rand(V), label_smoothing=0.1, softcap=15.0)):
                    tl_.linear_cross_entropy(x.detach(), w.detach(), y, reduction="none", backend="triton", **kw)
            finally:
                K.FWD_TMA = old
            # the cuBLAS stages (BLAS, bf16): cross-entropy's PARTIAL and backward kernels over fp32 logits
            # chunks, the REL combine, the lse/coef conversion; "dz" beside the Triton dW/dX kernels
            if dt == torch.bfloat16:
                old = K._blas_stages
                K._blas_stages = lambda x_, filtered: ("fwd", "dz")
                try:
                    for kw in (dict(), dict(linear_bias=b, weight=torch.rand(V), label_smoothing=0.1, softcap=15.0),
                               dict(label_smoothing=0.2, label_smoothing_mode="gaussian", focal_gamma=1.0,
                                    z_loss=1e-4, reduction="none", chunk_size=N * 400)):
                        _bwd(tl_.linear_cross_entropy(x, w, y, backend="triton", **kw), x, w, kw.get("linear_bias"))
                    _bwd(sum(tl_.linear_cross_entropy(x, w, y, return_lse=True, backend="triton")), x, w)
                    torch.ops.tri_losses.lce_partial(x.detach(), w.detach(), None, y, None, -100, 0.0, 0, 0.0, 0.0,
                                                     0.0, 0, 0.0, 5, V + 11, True)
                finally:
                    K._blas_stages = old
            # vocab-parallel: the forward's PARTIAL finish and the split/dz kernels with the head's rows at an
            # offset of the classes (class_offset, num_classes: runtime arguments; an offset of 0 specialises)
            xd, wd, bd = x.detach(), w.detach(), b.detach()
            for bias, cw, flat in ((None, None, (-100, 0.0, 0, 0.0, 0.0, 0.0, 0, 0.0)),
                                   (bd, torch.rand(V), (-100, 0.1, 1, 2.0, 0.0, 15.0, 0, 0.0)),
                                   (bd, None, (-100, 0.2, 3, 0.0, 0.0, 0.0, 0, 0.0))):
                for off in (0, 5):
                    torch.ops.tri_losses.lce_partial(xd, wd, bias, y, cw, *flat, off, V + 11, True, off > 0,
                                                     bias is not None)  # (with the entropy's partial sums)
                    stats, coef = torch.zeros(N, 2), torch.zeros(N, 3)
                    torch.ops.tri_losses.lce_bwd(torch.ones(N), None, xd, wd, bias, y, cw, stats, coef, *flat, off, V + 11,
                                                 True, True, True)


def _ctc(tl_):
    T, B, S = 30, 3, 5
    tg = torch.randint(1, 20, (B, S))
    il, tl = torch.tensor([30, 25, 20]), torch.tensor([5, 4, 0])
    for dt in DTYPES:
        x = torch.randn(T, B, 20, dtype=dt, requires_grad=True)
        for kw in (dict(), dict(input_type="logits"), dict(max_approx=True, input_type="logits"),
                   dict(label_loop=False), dict(max_approx=True, label_loop=False)):
            _bwd(tl_.ctc_loss(x if kw.get("input_type") else x.log_softmax(-1), tg, il, tl, reduction="none",
                              backend="triton", **kw), x)
        tl_.ctc_posteriors(x, tg, il, tl, input_type="logits", backend="triton")
        tl_.ctc_best_path(x, tg, il, tl, input_type="logits", backend="triton")
    # the register path's wider blocks (S = 300: 4 warps; S = 2047: 4095 states, 16 warps)
    for S in (300, 2047):
        x = torch.randn(S + 10, 2, 20, requires_grad=True)
        _bwd(tl_.ctc_loss(x, torch.randint(1, 20, (2, S)), [S + 10, S + 5], [S, S - 3], reduction="none",
                          input_type="logits", backend="triton"), x)
    # a wide vocabulary (C = 5000: the emissions pass forms the lse pairs in 4096-class steps, the gradient rows too)
    x = torch.randn(70, 2, 5000, requires_grad=True)
    _bwd(tl_.ctc_loss(x, torch.randint(1, 5000, (2, 60)), [70, 65], [60, 57], reduction="none", input_type="logits",
                      backend="triton"), x)
    # targets longer than the register path holds (2S+1 > 4096 states): the chunked kernels
    S = 2100
    tg = torch.randint(1, 20, (2, S))
    il, tl = torch.tensor([4300, 4250]), torch.tensor([S, S - 7])
    for dt in DTYPES:
        x = torch.randn(4300, 2, 20, dtype=dt, requires_grad=True)
        for kw in (dict(input_type="logits"), dict(max_approx=True, input_type="logits"), dict(label_loop=False)):
            _bwd(tl_.ctc_loss(x if kw.get("input_type") else x.log_softmax(-1), tg, il, tl, reduction="none",
                              backend="triton", **kw), x)


def _automata(tl_):
    T, B = 12, 2
    tg = torch.randint(1, 6, (B, 3))
    lens = torch.tensor([3, 2])
    il = torch.tensor([12, 9])
    for dt in DTYPES:
        x = torch.randn(T, B, 6, dtype=dt, requires_grad=True)
        for fsa in (tl_.ctc_fsa(tg, lens, 0), tl_.hmm_fsa(tg, lens, states_per_label=1, loop_cost=0.5, silence=0)):
            for kw in (dict(), dict(max_approx=True), dict(input_type="log_probs")):
                _bwd(tl_.fsa_loss(x, il, fsa, backend="triton", **kw), x)
        edges, weights, se, n = tl_.ctc_fsa(tg, lens, 0)
        mask = (torch.arange(T)[:, None] < il[None, :]).float()
        am = -x.detach().float().log_softmax(-1)
        tl_.fast_baum_welch(am, edges, weights, se, mask, num_states=n, backend="triton")
        tl_.fast_viterbi(-am, il, edges, weights, se, num_states=n, backend="triton")
    # the register path's widest block (a 300-label CTC automaton: 603 states, BLOCK_S 1024) in the table
    # builder and the recursions
    x = torch.randn(3, 1, 20, requires_grad=True)
    _bwd(tl_.fsa_loss(x, [3], tl_.ctc_fsa(torch.randint(1, 20, (1, 300)), [300], 0), backend="triton"), x)
    # no register path (a 600-label CTC automaton: 1203 states per sequence, more than it holds): the
    # recursion kernels with the general path alone, every mode
    fsa = tl_.ctc_fsa(torch.randint(1, 20, (1, 600)), [600], 0)
    for kw in (dict(), dict(max_approx=True), dict(input_type="log_probs")):
        _bwd(tl_.fsa_loss(x, [3], fsa, backend="triton", **kw), x)
    tl_.fast_baum_welch(x.detach(), *fsa[:3], torch.ones(3, 1), num_states=fsa[3], backend="triton")


def _sampled(tl_):
    V, D, N, m = 300, 32, 40, 24
    for dt in DTYPES:
        x = torch.randn(N, D, dtype=dt, requires_grad=True)
        w = torch.randn(V, D, dtype=dt, requires_grad=True)
        b = torch.randn(V, dtype=dt, requires_grad=True)
        y = torch.randint(0, V, (N,))
        y2 = torch.randint(0, V, (N, 2))
        samp = torch.randint(0, V, (m,))
        sv = (samp, torch.full((N,), 0.3), torch.full((m,), 0.2))
        sv2 = (samp, torch.full((N, 2), 0.3), torch.full((m,), 0.2))
        for kw in (dict(), dict(linear_bias=b, hit_policy="all"), dict(remove_accidental_hits=False),
                   dict(subtract_log_q=False, reduction="none"), dict(linear_bias=b, weight_grad="sparse")):
            _bwd(tl_.sampled_softmax_loss(x, w, y, m, sampled_values=sv, backend="triton", **kw), x, w,
                 kw.get("linear_bias"))
            _bwd(tl_.nce_loss(x, w, y2, m, sampled_values=sv2, log_norm_term=1.0, backend="triton", **kw), x, w,
                 kw.get("linear_bias"))


def _elementwise(tl_):
    from tri_losses.elementwise import frame_losses
    for dt in DTYPES:
        x = torch.randn(4, 5, 33, dtype=dt, requires_grad=True)
        t = torch.rand(4, 5, 33, dtype=dt, requires_grad=True)
        _bwd(tl_.binary_cross_entropy_with_logits(x, t, torch.rand(5, 1), pos_weight=torch.rand(33),
                                                  backend="triton"), x, t)
        _bwd(tl_.binary_cross_entropy_with_logits(x, t, reduction="none", backend="triton"), x, t)
        _bwd(tl_.mse_loss(x, t, backend="triton"), x, t)
        _bwd(tl_.l1_loss(x, t, reduction="sum", backend="triton"), x, t)
        _bwd(tl_.mse_loss(x, torch.randint(0, 33, (4, 5)), backend="triton"), x)
        lens = torch.tensor([5, 3, 0, 2])
        for kind in ("bce", "mse", "l1"):
            _bwd(frame_losses(kind, x, t, lens, mean_over_features=True, backend="triton"), x, t)
        # the strided (general) path beside the contiguous one for each flag: a transposed input, a
        # strided one-hot target, a strided input with lengths; pos_weight alone on the contiguous path
        xs = torch.randn(4, 33, 5, dtype=dt).transpose(1, 2).requires_grad_()
        _bwd(tl_.mse_loss(xs, t, reduction="none", backend="triton"), xs, t)
        _bwd(tl_.l1_loss(xs, torch.randint(0, 33, (5, 4)).t(), backend="triton"), xs)
        _bwd(frame_losses("bce", xs, t, lens, mean_over_features=True, backend="triton"), xs, t)
        _bwd(tl_.binary_cross_entropy_with_logits(x, t, pos_weight=torch.rand(33), backend="triton"), x, t)
        # beyond 4 dims (leading dims folded into a copy) a broadcast 16-bit target goes in fp32: mixed dtypes
        x5, t5 = torch.randn(2, 3, 2, 2, 5, dtype=dt, requires_grad=True), torch.rand(5, dtype=dt, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (PyTorch's broadcast-target warning)
            _bwd(tl_.l1_loss(x5, t5, reduction="none", backend="triton"), x5, t5)


def _text(tl_):
    hyp = torch.randint(0, 9, (3, 40))
    ref = torch.randint(0, 9, (3, 50))
    hl, rl = torch.tensor([40, 3, 0]), torch.tensor([50, 0, 7])
    tl_.edit_distance(hyp, hl, ref, rl, backend="triton")
    tl_.bleu(hyp, hl, ref, rl, backend="triton")
    tl_.bleu(hyp, hl, ref, rl, mode="sacrebleu", max_order=5, aggregate="corpus", backend="triton")


FAMILIES = dict(cross_entropy=_cross_entropy, linear_cross_entropy=_linear_cross_entropy, ctc=_ctc,
                automata=_automata, sampled=_sampled, elementwise=_elementwise, text=_text)


def test_int32_row_math_finds_offsets_that_wrap():
    """The TTIR scan the sm_90 test applies: an int32 product with the row count and a persistent loop to N
    by the grid's size are found (the forms the linear-CE forward and CE fast path had), int64 math and a
    loop by a constant block are not."""
    bad = ["%8 = arith.muli %N, %c4_i32 : i32 loc(#loc12)",
           "%9 = arith.muli %c5_i32, %N : i32",
           "scf.for %r = %0 to %N step %1 : i32 {"]
    good = ["%8 = arith.muli %n64, %c4_i64 : i64",
            "%acc = scf.for %n0 = %c0_i32 to %N step %c32_i32 iter_args(%a = %z) -> (tensor<64x64xf32>)  : i32 {",
            "scf.for %row = %0 to %1 step %2 : i64 {",
            "%3 = arith.muli %C, %c4_i32 : i32"]
    assert aot.int32_row_math("\n".join(bad + good)) == [ln.split(" loc(")[0] for ln in bad]


def test_every_kernel_compiles_for_sm90():
    """Every launch the families' workloads make, with the JIT's 16-byte alignment hints (what a GPU launch
    compiles), compiles for sm_90 within the shared-memory limit, and no kernel forms int32 offsets that grow
    with its row count (``aot.int32_row_math``). From the same compiles (one per launch: they dominate the
    suite's time on a machine with an empty Triton cache), read from the cubins and TTGIR:

    * every linear-CE launch, bf16 and fp32 (every smoothing mode, bias, weights, softcap, focal, filtering,
      TMA, the dX accumulator's first/middle/last chunks) and fp16 (plain; bias, weights, smoothing, a cap and
      several chunks), uses no stack (no register spills):
      the torch and others smoothing modes form no (rows, classes) weight tile, the gaussian weight divides
      no element, and the fp32 GEMM tiles fit the FMA dot's operands;
    * the 16-bit linear-CE GEMM launches without filter_eps load every tile asynchronously (the software
      pipeliner's cp.async copies: no tile goes to shared memory through registers), also where the chunk
      width is not a multiple of 16 (V 1000: the dW and dX kernels read dz with its columns padded to 16,
      else their dz loads were synchronous). filter_eps's device-side skip is a branch around the loads,
      which the pipeliner does not cross (not checked);
    * the BLEU n-gram statistics kernel (orders 4 and 5) uses no stack: its 32 x 32 comparison tiles fit
      the registers (64 x 64 tiles spilled up to 968 bytes per thread);
    * the cross-entropy fast path with log-prob/prob input and class ids has a barrier (``bar.sync``)
      between its one read of the row (x_y) and the gradient it stores over it in place.

    With TRI_LOSSES_AOT_TRITON_PATH (pip install --no-deps --target DIR triton==3.6.0, the GPU image's), the
    second Triton's compiles are checked the same way."""
    if not aot.cuda_target_available():
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    import tri_losses as tl_
    with aot.record_launches(hints=True) as jobs:
        for run in FAMILIES.values():
            run(tl_)
    jobs = list(jobs.values())
    kernels = {(j["module"], j["kernel"]) for j in jobs}
    defined = aot.defined_kernels()
    assert defined <= kernels, f"kernels never launched by the workloads: {sorted(defined - kernels)}"
    gemms = {"_lce_fwd_split_kernel", "_lce_dz_kernel", "_lce_dw_kernel", "_lce_dx_kernel"}

    def dtype(j):  # the input dtype: x's, or dz's (the dX kernel reads no x)
        return j["signature"].get("x", j["signature"].get("dz"))

    def flags(j):
        return {k: v for k, v in j["constexprs"].items() if k.isupper()}

    lce = [i for i, j in enumerate(jobs) if j["kernel"].startswith("_lce_")]
    for dt in ("*bf16", "*fp16", "*fp32"):
        assert {jobs[i]["kernel"] for i in lce if dtype(jobs[i]) == dt} >= gemms
    piped = [i for i in lce if jobs[i]["kernel"] in gemms and not jobs[i]["constexprs"].get("HAS_FILTER")
             and dtype(jobs[i]) == "*bf16"]
    assert {jobs[i]["kernel"] for i in piped} == gemms
    fast = [i for i, j in enumerate(jobs) if j["kernel"] == "_ce_fwd_grad_kernel"]
    bleu = [i for i, j in enumerate(jobs) if j["kernel"] == "_bleu_stats_kernel"]
    assert {jobs[i]["constexprs"]["N"] for i in bleu} == {4, 5}
    other = os.environ.get("TRI_LOSSES_AOT_TRITON_PATH")
    for path in [None] + ([other] if other else []):
        res = aot.compile_jobs(jobs, python_path=path, usage=True)
        failed = aot.compile_failures(jobs, res, check_rows=True)
        assert not failed, "\n\n".join(f"{k} {c}:\n{e}" for k, c, e in failed)
        spills = [(jobs[i]["kernel"], dtype(jobs[i]), flags(jobs[i]), res[i]) for i in lce + bleu
                  if res[i].get("STACK") != 0]
        assert not spills, "register spills:\n" + "\n".join(map(str, spills))
        sync = [(jobs[i]["kernel"], flags(jobs[i]), res[i]) for i in piped if res[i].get("SYNC_SMEM") != 0]
        assert not sync, "16-bit GEMM tiles loaded synchronously:\n" + "\n".join(map(str, sync))
        # the in-place fast path with log-prob/prob input reads a row only through x_y's load, then writes
        # the gradient over the row: a barrier between them (the interpreter cannot show the race)
        onehot = [i for i in fast if jobs[i]["constexprs"]["INPUT"] != 0 and jobs[i]["constexprs"]["ONEHOT"]]
        assert len(onehot) >= 2 and all(res[i]["BARRIERS"] >= 1 for i in onehot), [res[i] for i in onehot]
