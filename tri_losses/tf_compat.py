"""TensorFlow's exact signatures for sampled softmax, NCE and the candidate samplers.

``sampled_softmax_loss(weights, biases, labels, inputs, num_sampled, num_classes, ...)`` and ``nce_loss``
return the per-row loss ``(B,)`` as TF does; ``weights``/``biases`` may be lists of shards
(``partition_strategy="div"`` concatenates them, ``"mod"`` interleaves: id i lives in shard i % n; the
shards must have TF's sizes, V // n rows plus one for the first V % n). The default sampler is TF's:
log-uniform, unique, over the first ``num_classes`` ids (TF reads ``num_classes`` only there: it may be below
the weights' rows, and is not read with ``sampled_values``). ``seed`` seeds a generator. The partition
default is TF1's (``tf.compat.v1.nn``: ``"mod"``, and TF1's argument order); TF2's ``tf.nn`` functions shard
with ``"div"``, so pass ``partition_strategy="div"`` for their results with a list of shards.
"""
from __future__ import annotations

import torch

from . import sampled as _s
from . import samplers as _smp
from . import _validate
from ._backend import resolve_backend
from ._validate import InputError, InputTypeError, as_int, check_index_range, host_readable

__all__ = ["sampled_softmax_loss", "nce_loss", "uniform_candidate_sampler", "log_uniform_candidate_sampler",
           "fixed_unigram_candidate_sampler", "learned_unigram_candidate_sampler", "all_candidate_sampler"]


def _merge(shards, strategy, name, op):
    """The (V, ...) tensor of TF's list of shards: ``"div"`` gives shard p the ids from
    ``sum(sizes[:p])`` on, ``"mod"`` the ids p, p + n, ...; either way TF's lookup assumes sizes of
    ``V // n`` rows plus one for the first ``V % n`` shards (other sizes make it read other rows or fail)."""
    # checked first, also for a single tensor: a TF2-style positional call puts ``seed`` here
    if strategy not in ("div", "mod"):
        raise InputError(f"partition_strategy: expected 'div' or 'mod' (TF1 argument order: ..., "
                         f"remove_accidental_hits, partition_strategy, name, seed), got {strategy!r}")
    if isinstance(shards, torch.Tensor):
        return shards
    if not isinstance(shards, (list, tuple)) or not shards:
        raise InputTypeError(f"{op}: {name}: expected a tensor or a non-empty list of tensor shards, got "
                             f"{type(shards).__name__}")
    first = shards[0]
    for k, sh in enumerate(shards):
        _validate.check_tensor(sh, f"{name}[{k}]", op)
        if sh.dim() == 0:
            raise InputError(f"{op}: {name}[{k}]: expected a shard with rows, got a 0-d tensor")
        if sh.shape[1:] != first.shape[1:] or sh.dtype != first.dtype or sh.device != first.device:
            raise InputError(f"{op}: {name}[{k}]: expected rows of shape {tuple(first.shape[1:])}, {first.dtype} on "
                             f"{first.device} like {name}[0], got {tuple(sh.shape[1:])}, {sh.dtype} on {sh.device}")
    shards = list(shards)
    if len(shards) == 1:
        return shards[0]
    n = len(shards)
    V = sum(s.shape[0] for s in shards)
    got = [s.shape[0] for s in shards]
    want = [V // n + (p < V % n) for p in range(n)]
    if got != want:
        held = "the ids p, p + {n}, ..." if strategy == "mod" else "a contiguous range of ids, the first V % n one more"
        raise InputError(f"{name}: with partition_strategy={strategy!r} the {n} shards of V={V} rows must have "
                         f"sizes {want} (shard p holds {held.format(n=n)}), got {got}")
    cat = torch.cat(shards, 0)
    if strategy == "div":
        return cat
    # position of id i in the concatenation: shard i % n, row i // n
    sizes = torch.tensor(got)
    offsets = torch.cumsum(sizes, 0) - sizes
    ids = torch.arange(V)
    pos = offsets[ids % n] + ids // n
    return cat[pos.to(cat.device)]


def _generator(seed, device):
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _tf_loss(fn, weights, biases, labels, inputs, num_sampled, num_classes, num_true, sampled_values,
             remove_accidental_hits, partition_strategy, seed, **kw):
    op = fn.__name__
    _validate.check_float(inputs, "inputs", op)
    if inputs.dim() != 2:
        raise InputError(f"{op}: inputs: expected (batch, dim), got {tuple(inputs.shape)}")
    W = _merge(weights, partition_strategy, "weights", op)
    b = _merge(biases, partition_strategy, "biases", op) if biases is not None else None
    _validate.check_float(W, "weights", op)
    if W.dim() != 2 or W.shape[1] != inputs.shape[1]:
        raise InputError(f"{op}: weights: expected (num_classes, {inputs.shape[1]}) (inputs' dim; or a list of "
                         f"such shards), got {tuple(W.shape)}")
    _validate.check_same_device(inputs, W, "inputs", "weights", op)
    if b is not None:
        _validate.check_float(b, "biases", op)
        if tuple(b.shape) != (W.shape[0],):
            raise InputError(f"{op}: biases: expected ({W.shape[0]},) (the weights' rows; or a list of such "
                             f"shards), got {tuple(b.shape)}")
        _validate.check_same_device(inputs, b, "inputs", "biases", op)
    labels = _true_matrix(labels, num_true, "labels", op, rows=inputs.shape[0])
    labels = _validate.to_device(labels, inputs.device, name="labels", op=op)  # (TF takes them anywhere)
    num_true = labels.shape[1]
    V = W.shape[0]
    if host_readable(labels):  # TF's embedding lookup refuses ids outside the weights' rows
        check_index_range(labels, "labels", op, V)
    if sampled_values is None:  # TF reads num_classes only here: the range of its log-uniform sampler
        num_classes = as_int(num_classes, "num_classes", op, low=1, what="a positive int")
        if num_classes > V:
            raise InputError(f"{op}: num_classes: the sampler's range of {num_classes} ids goes past the weights' "
                             f"{V} rows")
        if num_classes < V:  # samples from the first num_classes ids only (labels beyond them: as TF, an error)
            smp = _s._named_sampler("log_uniform", num_classes, {}, labels.device, op)
            sampled_values = _candidates(smp, labels, num_true, num_sampled, True, seed, "labels", op=op)
    # by name: the op's cached, device-resident table over the weights' rows (not rebuilt on every call)
    return fn(inputs, W, labels if num_true > 1 else labels[:, 0], num_sampled, linear_bias=b, sampler="log_uniform",
              unique=True, sampled_values=sampled_values, generator=_generator(seed, inputs.device),
              remove_accidental_hits=bool(remove_accidental_hits),  # TF: its truth value (1/0 work there)
              reduction="none", **kw)


def sampled_softmax_loss(weights, biases, labels, inputs, num_sampled, num_classes, num_true=1, sampled_values=None,
                         remove_accidental_hits=True, partition_strategy="mod", name="sampled_softmax_loss", seed=None,
                         *, backend="auto"):
    """``tf.nn.sampled_softmax_loss``: per-row losses ``(B,)``. ``backend``: as every op of this package's."""
    return _tf_loss(_s.sampled_softmax_loss, weights, biases, labels, inputs, num_sampled, num_classes, num_true,
                    sampled_values, remove_accidental_hits, partition_strategy, seed, backend=backend)


def nce_loss(weights, biases, labels, inputs, num_sampled, num_classes, num_true=1, sampled_values=None,
             remove_accidental_hits=False, partition_strategy="mod", name="nce_loss", seed=None, *, backend="auto"):
    """``tf.nn.nce_loss``: per-row losses ``(B,)`` (TF's "sampled logistic" when hits are removed). ``backend``:
    as every op of this package's."""
    return _tf_loss(_s.nce_loss, weights, biases, labels, inputs, num_sampled, num_classes, num_true,
                    sampled_values, remove_accidental_hits, partition_strategy, seed, backend=backend)


def _true_matrix(x, num_true, name, op, rows=None):
    """``x`` as TF's ``(batch, num_true)`` matrix of true classes (a loss's ``(batch,)`` labels too where
    ``num_true`` is 1, as TF's gather takes them without ``remove_accidental_hits``; taken here with it too,
    where TF's hit check fails on them); any other shape raises, as TF's candidate-sampler ops
    ("true_classes must have num_true columns") and losses do."""
    num_true = as_int(num_true, "num_true", op, low=1, what="a positive int")
    try:
        t = torch.as_tensor(x)  # (a list or an array, as TF converts them)
    except (TypeError, ValueError, RuntimeError):
        raise InputTypeError(f"{op}: {name}: expected an integer tensor of class ids, got {type(x).__name__}") from None
    _validate.check_int(t, name, op)
    if t.dim() == 1 and num_true == 1 and rows is not None:
        t = t[:, None]
    if t.dim() != 2 or t.shape[1] != num_true or (rows is not None and t.shape[0] != rows):
        raise InputError(f"{op}: {name}: expected shape ({'batch' if rows is None else rows}, {num_true}) "
                         f"(num_true={num_true} columns), got {tuple(t.shape)}")
    return t


def _range_max(range_max, op):
    """TF's ``range_max`` (the sampler's class count), checked under its TF name."""
    return as_int(range_max, "range_max", op, low=1, what="a positive int")


def _candidates(sampler, true_classes, num_true, num_sampled, unique, seed, name="true_classes", *, op,
                backend="auto", range_max=None, owned=False):
    """TF's candidate sampler op: ``sampler`` a Sampler instance (the caller's: used on the true classes'
    device, not moved, unless ``owned``: made for this call) or ``(name, num_classes, kwargs)``, built once per
    device and options (its O(V) table, or a vocab file, is not rebuilt on every call, as TF's op keeps its
    kernel); ``range_max``: the class count the sampler must have."""
    tc = _true_matrix(true_classes, num_true, name, op)
    resolve_backend(backend, tc, op, has_triton=False)
    num_sampled = as_int(num_sampled, "num_sampled", op, low=1, what="a positive int")
    _validate.check_bool(op, unique=unique)
    # draws (and the seed's generator) on the true classes' device
    if isinstance(sampler, _smp.Sampler):
        if owned:
            _s._move_own_sampler(sampler, tc.device)
        sampler = _s._named_sampler(sampler, None, {}, tc.device, op)
    else:
        sampler = _s._named_sampler(*sampler, tc.device, op)
    if range_max is not None and sampler.num_classes != range_max:  # (under TF's name for the class count)
        raise InputError(f"{op}: range_max: the kept range has {sampler.num_classes} ids, expected {range_max}")
    if host_readable(tc):  # TF rejects out-of-range true classes (read on the host only: no CUDA sync)
        check_index_range(tc, name, op, sampler.num_classes)
    s, tec, sec, _ = sampler.sample(num_sampled, tc, unique=unique, generator=_generator(seed, tc.device))
    return s[0], tec, sec[0]


def uniform_candidate_sampler(true_classes, num_true, num_sampled, unique, range_max, seed=None, name=None, *,
                              backend="auto"):
    """``tf.random.uniform_candidate_sampler``: P(c) = 1/range_max.

    Returns:
        ``(sampled (num_sampled,) int64, true_expected_count (B, num_true) fp32, sampled_expected_count
        (num_sampled,) fp32)``, as TF. ``seed`` seeds a generator; ``name`` is ignored; ``backend``: no
        Triton kernel ("triton" raises).
    """
    op = "uniform_candidate_sampler"
    smp = ("uniform", _range_max(range_max, op), {})
    return _candidates(smp, true_classes, num_true, num_sampled, unique, seed, op=op, backend=backend)


def log_uniform_candidate_sampler(true_classes, num_true, num_sampled, unique, range_max, seed=None, name=None, *,
                                  backend="auto"):
    """``tf.random.log_uniform_candidate_sampler``: Zipfian P(c) over ``range_max`` ids sorted by frequency.

    Returns:
        ``(sampled (num_sampled,) int64, true_expected_count (B, num_true) fp32, sampled_expected_count
        (num_sampled,) fp32)``, as TF. ``seed`` seeds a generator; ``name`` is ignored; ``backend``: no
        Triton kernel ("triton" raises).
    """
    op = "log_uniform_candidate_sampler"
    smp = ("log_uniform", _range_max(range_max, op), {})
    return _candidates(smp, true_classes, num_true, num_sampled, unique, seed, op=op, backend=backend)


def fixed_unigram_candidate_sampler(true_classes, num_true, num_sampled, unique, range_max, vocab_file="",
                                    distortion=1.0, num_reserved_ids=0, num_shards=1, shard=0, unigrams=(),
                                    seed=None, name=None, *, backend="auto"):
    """``tf.random.fixed_unigram_candidate_sampler``: P(c) from ``unigrams`` or a ``vocab_file`` of counts
    (:class:`~tri_losses.samplers.FixedUnigramSampler`: id ``num_reserved_ids + k`` for entry k, as TF documents
    it; TF's kernel differs when reserved ids and several shards come together).

    Returns:
        ``(sampled (num_sampled,) int64, true_expected_count (B, num_true) fp32, sampled_expected_count
        (num_sampled,) fp32)``, as TF. ``seed`` seeds a generator; ``name`` is ignored; ``backend``: no
        Triton kernel ("triton" raises).
    """
    op = "fixed_unigram_candidate_sampler"
    range_max = _range_max(range_max, op)
    smp = ("fixed_unigram", None, dict(unigrams=list(unigrams), vocab_file=vocab_file, distortion=distortion,
                                       num_reserved_ids=num_reserved_ids, num_shards=num_shards, shard=shard))
    return _candidates(smp, true_classes, num_true, num_sampled, unique, seed, op=op, backend=backend,
                       range_max=range_max)


def learned_unigram_candidate_sampler(true_classes, num_true, num_sampled, unique, range_max, seed=None, name=None,
                                      sampler=None, *, backend="auto"):
    """``tf.random.learned_unigram_candidate_sampler``: pass the same ``sampler`` (a LearnedUnigramSampler over
    ``range_max`` classes) on every call to keep its learned counts. ``backend``: no Triton kernel ("triton"
    raises)."""
    op = "learned_unigram_candidate_sampler"
    range_max = _range_max(range_max, op)
    smp = sampler if sampler is not None else _smp.LearnedUnigramSampler(range_max)
    if not isinstance(smp, _smp.LearnedUnigramSampler):
        raise InputTypeError(f"{op}: sampler: expected a LearnedUnigramSampler, got {type(smp).__name__}")
    if smp.num_classes != range_max:
        raise InputError(f"{op}: sampler: expected a LearnedUnigramSampler over range_max={range_max} classes, "
                         f"got one over {smp.num_classes}")
    return _candidates(smp, true_classes, num_true, num_sampled, unique, seed, op=op, backend=backend,
                       owned=sampler is None)


def all_candidate_sampler(true_classes, num_true, num_sampled, unique, seed=None, name=None, *, backend="auto"):
    """``tf.random.all_candidate_sampler``: samples ``arange(num_sampled)`` with expected counts 1.

    Returns:
        ``(sampled (num_sampled,) int64, true_expected_count (B, num_true) fp32, sampled_expected_count
        (num_sampled,) fp32)``, as TF. ``seed`` seeds a generator; ``name`` is ignored; ``backend``: no
        Triton kernel ("triton" raises).
    """
    num_sampled = as_int(num_sampled, "num_sampled", "all_candidate_sampler", low=1, what="a positive int")
    return _candidates(_smp.AllCandidateSampler(num_sampled), true_classes, num_true, num_sampled, unique, seed,
                       op="all_candidate_sampler", backend=backend)
