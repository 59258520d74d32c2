"""Edit distance (B = 256, L = 100..1000) vs a pure-Python DP loop and editdistance/rapidfuzz if installed;
BLEU statistics over 10,000 sentences vs sacrebleu if installed; CTC beam search (one sequence, T = 500,
C = 1000, width 100: a host op, timed on the CPU; method="batched" too, and on a GPU a batch of 32 at once) vs a
pure-Python prefix beam search and TensorFlow's decoder if installed."""
from __future__ import annotations

import math
import time

import torch

from _common import MODE, Provider, missing_row, time_ms, try_import

import tri_losses
from tests.reference.catalogue import levenshtein as _py_levenshtein  # the pure-Python DP peer


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    B = 8 if smoke else 256
    if MODE["record"]:
        seqs, lens = torch.randint(0, 30, (B, 1000), device=device), torch.full((B,), 1000, device=device)
        tri_losses.edit_distance(seqs, lens, seqs, lens)
        return rows
    for L in ([30] if smoke else [1000] if MODE["goal"] else [100, 300, 1000]):
        hyp = torch.randint(0, 30, (B, L), device=device)
        ref = torch.randint(0, 30, (B, L), device=device)
        lens = torch.full((B,), L, device=device)
        t = time_ms(lambda: tri_losses.edit_distance(hyp, lens, ref, lens), device, smoke=smoke)
        mine = dict(family="text", case=f"edit_distance B={B},L={L}", dtype="int64", provider="tri_losses",
                    fwd_ms=t[0])
        rows.append(mine)
        hl, rl = hyp.cpu().tolist(), ref.cpu().tolist()
        n_py = 4 if L >= 300 else B
        t0 = time.perf_counter()
        for a, b in zip(hl[:n_py], rl[:n_py]):
            _py_levenshtein(a, b)
        py_ms = (time.perf_counter() - t0) * 1e3 * B / n_py
        rows.append(dict(family="text", case=f"edit_distance B={B},L={L}", dtype="int64", provider="python-loop",
                         fwd_ms=py_ms, note=f"extrapolated from {n_py} pairs" if n_py < B else ""))
        mine["metric"] = f"{py_ms / t[0]:.0f}x python-loop"  # the goal: >= 50x at B=256, L=1000
        mine["speedup"] = py_ms / t[0]
        mine["goal_shape"] = (B, L) == (256, 1000)
        for provider, module, fn in (("editdistance", "editdistance", "eval"),
                                     ("rapidfuzz", "rapidfuzz.distance.Levenshtein", "distance")):
            mod, _ = try_import(module)
            if mod is not None:  # optional C peers, timed as their users call them: one pair at a time
                f, t0 = getattr(mod, fn), time.perf_counter()
                for a, b in zip(hl, rl):
                    f(a, b)
                rows.append(dict(family="text", case=f"edit_distance B={B},L={L}", dtype="int64", provider=provider,
                                 fwd_ms=(time.perf_counter() - t0) * 1e3))
    NS = 200 if smoke else 10000
    hyp = torch.randint(0, 50, (NS, 25), device=device)
    ref = torch.randint(0, 50, (NS, 25), device=device)
    lens = torch.full((NS,), 25, device=device)
    t = time_ms(lambda: tri_losses.bleu(hyp, lens, ref, lens, mode="sacrebleu", aggregate="corpus"), device,
                smoke=smoke)
    mine = dict(family="text", case=f"corpus bleu {NS} sentences", dtype="int64", provider="tri_losses", fwd_ms=t[0])
    rows.append(mine)
    sb, _ = try_import("sacrebleu")
    if sb is not None:
        hs = [" ".join(map(str, r)) for r in hyp.cpu().tolist()]
        rs = [" ".join(map(str, r)) for r in ref.cpu().tolist()]
        t0 = time.perf_counter()
        sb.corpus_bleu(hs, [rs], tokenize="none")
        sb_ms = (time.perf_counter() - t0) * 1e3
        rows.append(dict(family="text", case=f"corpus bleu {NS} sentences", dtype="int64", provider="sacrebleu",
                         fwd_ms=sb_ms, note="from token strings (tokenize='none')"))
        mine["metric"] = f"{sb_ms / t[0]:.1f}x sacrebleu"
    if device.type == "cpu":  # the decoder runs on the host whatever the device: its goal is a CPU figure
        rows += _beam_rows()
    else:  # method="batched" runs on the device: a batch of sequences at once
        T, C, W = 500, 1000, 100
        for Bb in (1, 32):
            x = torch.randn(Bb, T, C, device=device)
            t = time_ms(lambda: tri_losses.ctc_beam_search_decode(x, [T] * Bb, beam_width=W, method="batched"),
                        device, smoke=smoke)
            rows.append(dict(family="text", case=f"ctc_beam_search_decode B={Bb},T={T},C={C},width={W}",
                             dtype="float32", provider="tri_losses method=batched", fwd_ms=t[0],
                             metric=f"{t[0] / Bb:.1f} ms per sequence"))
    return rows


def _python_prefix_beam(lp, blank, width, frames):
    """The textbook prefix beam search as a plain Python loop over frames x beams x classes (the decoder
    this package had before), over the first ``frames`` frames: the baseline the goal is stated against."""
    def lse(a, b):
        m = max(a, b)
        return m if m == -math.inf else m + math.log(math.exp(a - m) + math.exp(b - m))

    beams = {(): (0.0, -math.inf)}  # prefix -> (log p ending in blank, log p ending in a label)
    for row in lp[:frames].tolist():
        new = {}

        def add(prefix, pb, pl):
            ob, ol = new.get(prefix, (-math.inf, -math.inf))
            new[prefix] = (lse(ob, pb), lse(ol, pl))

        for prefix, (pb, pl) in beams.items():
            tot = lse(pb, pl)
            add(prefix, tot + row[blank], -math.inf)
            for c, v in enumerate(row):
                if c == blank:
                    continue
                if prefix and prefix[-1] == c:
                    add(prefix, -math.inf, pl + v)
                    add(prefix + (c,), -math.inf, pb + v)
                else:
                    add(prefix + (c,), -math.inf, tot + v)
        beams = dict(sorted(new.items(), key=lambda kv: -lse(*kv[1]))[:width])
    return beams


def _beam_rows():
    """``ctc_beam_search_decode`` at T = 500, C = 1000, width 100 (the RETURNN registry's eval-mode CTC decoding),
    on flat random frames, on frames whose log-probabilities hold -inf (log of a float32 softmax) and on
    all-equal frames (an untrained model's uniform output: every class tied, none pruned by its score)."""
    rows, (T, C, W) = [], (500, 1000, 100)
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1, T, C, generator=g)
    hot = torch.nn.functional.one_hot(torch.randint(0, C, (1, T), generator=g), C)
    peaked = torch.log(torch.softmax((flat * 2 + 9.0 * hot) * 10, -1))  # -inf where float32 underflows
    tf, why = try_import("tensorflow")
    for name, x in (("flat frames", flat), ("log(fp32 softmax), -inf entries", peaked),
                    ("all-equal frames", torch.zeros(1, T, C))):
        case = f"ctc_beam_search_decode T={T},C={C},width={W}, {name}"
        t = time_ms(lambda: tri_losses.ctc_beam_search_decode(x, [T], beam_width=W), torch.device("cpu"),
                    smoke=True)
        mine = dict(family="text", case=case, dtype="float32", provider="tri_losses", fwd_ms=t[0],
                    note=f"{torch.isinf(x).float().mean().item():.0%} -inf entries" if torch.isinf(x).any() else "")
        rows.append(mine)
        n = 40  # the beam is full from the second frame on; its frames then slow down as the prefixes grow
        lp = x[0].double().log_softmax(-1)
        t0 = time.perf_counter()
        _python_prefix_beam(lp, C - 1, W, n + 1)
        t1 = time.perf_counter()
        _python_prefix_beam(lp, C - 1, W, 1)
        py_ms = ((t1 - t0) - (time.perf_counter() - t1)) / n * T * 1e3
        rows.append(dict(family="text", case=case, dtype="float32", provider="python-loop", fwd_ms=py_ms,
                         note=f"extrapolated from its first {n} full-beam frames: a lower bound (later frames "
                              "are slower, the prefixes being longer)"))
        mine["metric"] = f"{py_ms / t[0]:.0f}x python-loop"  # the goal: >= 100x at this shape
        mine["speedup"], mine["beam"] = py_ms / t[0], True
        tb = time_ms(lambda: tri_losses.ctc_beam_search_decode(x, [T], beam_width=W, method="batched"),
                     torch.device("cpu"), smoke=True)
        rows.append(dict(family="text", case=case, dtype="float32", provider="tri_losses method=batched",
                         fwd_ms=tb[0], metric=f"{py_ms / tb[0]:.0f}x python-loop",
                         note="the textbook prefix beam search as batched tensor ops (for a GPU); here one "
                              "sequence on the CPU"))
        if tf is None:
            rows.append(missing_row("text", case, "float32", Provider("tensorflow", missing=why)))
        else:  # TF's op as its users call it (time-major, blank last)
            xt = tf.constant(x.transpose(0, 1).numpy())
            fn = lambda: tf.nn.ctc_beam_search_decoder(xt, [T], beam_width=W, top_paths=1)  # noqa: E731
            tf_ms = time_ms(fn, torch.device("cpu"), smoke=True)[0]
            rows.append(dict(family="text", case=case, dtype="float32", provider="tensorflow", fwd_ms=tf_ms,
                             note=f"tf {tf.__version__}, its CPU op"))
            mine["metric"] += f", {tf_ms / t[0]:.0f}x tensorflow"
    return rows
