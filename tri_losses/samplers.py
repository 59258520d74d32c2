"""Candidate samplers for sampled softmax / NCE (TensorFlow's candidate samplers, device-resident).

``sampler.probs() -> (V,)`` fp32 and ``sampler.sample(num_sampled, true_classes, *, unique=True,
groups=None, num_groups=None, generator=None) -> (sampled (G, m) int64, true_ec (N, T), sampled_ec (G, m),
num_tries (G,))``. Draws use torch random ops on the tables' device (no host round trip).

* ``unique=False``: m independent draws, ``num_tries = m``, ``EC(c) = m * P(c)``.
* ``unique=True``: the law of TF's rejection loop (keep unseen ids until m are distinct) without the
  loop: picks in draw order are the top-m of ``log P(c) + Gumbel_c``; ``num_tries = sum_{j<m} K_j``
  with K_j geometric on {1, 2, ...} of success probability ``1 - sum_{k<j} P(pick_k)``. The same
  joint law of (set, num_tries) as TF, not the same bits. ``EC(c) = -expm1(num_tries * log1p(-P(c)))``
  (TF's approximation) unless ``num_tries == m``. O(V) work per group; memory O(V + G*m) plus one block
  of fp64 keys (groups are keyed in blocks of max(1, 2**24 // V) groups, at most max(V, 2**24) keys: a
  (G, V) tensor only when G*V fits in one block).
"""
from __future__ import annotations

import csv
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _validate
from ._backend import resolve_backend, transform_active
from ._validate import InputError, InputTypeError, as_int

__all__ = ["Sampler", "UniformSampler", "LogUniformSampler", "FixedUnigramSampler", "LearnedUnigramSampler",
           "AllCandidateSampler", "make_sampler", "expected_count"]


def expected_count(p: Tensor, num_tries: Tensor, m: int, *, backend: str = "auto") -> Tensor:
    """TF's expected count: ``m * p`` if ``num_tries == m`` else ``-expm1(num_tries * log1p(-p))`` (fp32).

    ``p``: float probabilities in [0, 1] (values are not checked: outside it the count is NaN, as TF's);
    ``num_tries``: an integer tensor broadcasting with ``p`` (e.g. ``(G, 1)`` against ``(G, m)``), on its
    device; ``m``: the number of samples drawn (a positive int). Wrong types raise ``TypeError``, a bad
    ``m`` or a device mismatch ``ValueError``. No Triton kernel: ``backend="triton"`` raises."""
    op = "expected_count"
    _validate.check_float(p, "p", op)
    resolve_backend(backend, p, op, has_triton=False)
    _validate.check_int(num_tries, "num_tries", op)
    _validate.check_same_device(p, num_tries, "p", "num_tries", op)
    m = as_int(m, "m", op, low=1, what="a positive int")
    return _expected_count(p, num_tries, m)


def _expected_count(p: Tensor, num_tries: Tensor, m: int) -> Tensor:
    """:func:`expected_count` on checked arguments (the samplers' own draws)."""
    p = p.float()
    nt = num_tries.to(torch.float32)
    return torch.where(nt == m, m * p, -torch.expm1(nt * torch.log1p(-p)))


GUMBEL_BLOCK = 1 << 24  # elements of one block of (groups, V) fp64 Gumbel keys (128 MB)
_MULTINOMIAL_MAX = 2 ** 24  # the most categories torch.multinomial draws from


def _gumbel_top_m(logp: Tensor, G: int, m: int, generator) -> Tensor:
    """(G, m) int64: per group the top-m of ``logp + Gumbel`` (``logp`` (V,) fp64), i.e. m distinct ids in draw
    order. Groups are keyed in blocks of ``max(1, GUMBEL_BLOCK // V)`` rows, so memory stays O(V + G*m) plus one
    block however many groups. On the CPU the random stream is consumed in the same order as one (G, V)
    draw (bitwise the same picks whatever the block size); on CUDA the blocks draw the same law, not the same
    bits (its counter-based stream depends on the launch shape)."""
    V = logp.numel()
    rows = max(1, GUMBEL_BLOCK // V)
    picks = []  # (concatenated, not written into one buffer: under vmap each sample's draws are its own)
    for g0 in range(0, G, rows):
        n = min(rows, G - g0)
        key = torch.rand(n, V, device=logp.device, generator=generator, dtype=torch.float64)
        key.clamp_min_(1e-300).log_().neg_().log_().neg_()  # Gumbel(0, 1) keys, in place
        picks.append(torch.topk(key.add_(logp), m, dim=1).indices)
    return picks[0] if len(picks) == 1 else torch.cat(picks)


def _num_groups(groups: Optional[Tensor], num_groups: Optional[int]) -> int:
    """G: ``num_groups`` if given, else ``max(groups) + 1`` (reading ``groups``: a host sync on CUDA), else 1."""
    if num_groups is not None:
        return as_int(num_groups, "num_groups", "sample", low=1, what="a positive int")
    if groups is not None and groups.numel():
        return int(groups.max()) + 1
    return 1


class Sampler(torch.nn.Module):
    """Base class of the candidate samplers (an ``nn.Module``: a learned sampler's counts are a buffer).

    Subclasses give ``probs()``, the ``(num_classes,)`` fp32 sampling distribution. ``sample(num_sampled,
    true_classes, *, unique=True, groups=None, num_groups=None, generator=None)`` draws ``num_sampled`` ids
    per group (``unique``: without replacement, as TF's samplers; G = ``num_groups``, or ``max(groups) + 1``
    when only ``groups`` is given, a host sync on CUDA, else 1) and returns ``(sampled (G, m) int64,
    true_expected_count (N, num_true) fp32, sampled_expected_count (G, m) fp32, num_tries (G,) int64)``;
    it raises ``ValueError`` for ``num_sampled < 1`` or, with ``unique``, more than the classes with P > 0.
    A negative id in ``true_classes`` marks an ignored entry (its expected count 0; a learned sampler does not
    count it); ids ``>= num_classes`` and group ids outside ``[0, G)`` raise ``IndexError`` (a ``ValueError``)
    where the values are on the host (CPU), and give that row's expected counts NaN elsewhere (no device sync
    for it).
    Device moves (``.to(device)``, ``.cuda()``) move the tables; dtype casts (``.half()``, ``.to(dtype)``, also
    of a loss module holding the sampler) leave them fp32 (counts int64).

    Args:
        num_classes: the number of classes V (a positive int; ``ValueError`` otherwise).
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = as_int(num_classes, "num_classes", type(self).__name__, low=1, what="a positive int")

    def _apply(self, fn, recurse=True):
        """Device moves apply to the tables; dtype casts do not: the tables stay fp32 (int64 counts), so
        ``.half()``/``.double()``/``.to(dtype)`` of a loss module holding a sampler leave its distribution
        exact (an fp16 table rounds rare classes' probabilities to 0: a NaN loss for their rows)."""
        def keep_dtype(t):
            target = fn(t.new_empty(0))  # what fn does to a tensor of this dtype and device
            return t.to(target.device) if target.dtype != t.dtype else fn(t)
        return super()._apply(keep_dtype, recurse)

    def probs(self) -> Tensor:
        if "_p" in self._buffers:  # a fixed table: a copy, so writing to it leaves the sampler unchanged
            return self._p.clone()
        raise NotImplementedError

    def _table(self) -> Tensor:
        """The distribution the draws read: a fixed table's own buffer (``_p``: no copy, never written), else
        ``probs()``."""
        return self._p if "_p" in self._buffers else self.probs()

    def _draw_with_replacement(self, G, m, generator, device):
        p = self._table().to(device)  # G*m draws from one (V,) table: no (G, V) copy
        if p.numel() <= _MULTINOMIAL_MAX:
            return torch.multinomial(p, G * m, replacement=True, generator=generator).view(G, m)
        # more classes than torch.multinomial takes: the inverse of the fp64 CDF at u in [0, total) (the first
        # class whose CDF exceeds u: a class of P = 0 never is, its CDF held at the one before it, and the CDF
        # made monotone, which a parallel scan's rounding need not leave it; u kept below the total, which it
        # can round to)
        cdf = torch.cumsum(p, 0, dtype=torch.float64)
        cdf = torch.where(p > 0, cdf, 0.0).cummax(0).values
        total = cdf[-1]
        u = torch.rand(G, m, device=device, generator=generator, dtype=torch.float64) * total
        u = torch.minimum(u, torch.nextafter(total, total.new_zeros(())))
        return torch.searchsorted(cdf, u, right=True)

    def _update(self, true_classes: Tensor) -> None:
        pass

    def _checked(self, true_classes: Tensor, groups: Optional[Tensor], num_groups: Optional[int]):
        """``sample``'s checks of ``true_classes`` and ``groups`` (ids and group ids read where the values are
        on the host): ``(true_classes as (N, num_true), G)``."""
        _validate.check_int(true_classes, "true_classes", "sample")
        if true_classes.dim() == 1:
            true_classes = true_classes[:, None]
        if true_classes.dim() != 2:
            raise InputError(f"sample: true_classes: expected (N,) or (N, num_true), got {tuple(true_classes.shape)}")
        if _validate.host_readable(true_classes):
            over = true_classes.long() >= self.num_classes  # (in int64: uint8 ids compared with V > 255)
            if bool(over.any()):
                raise _validate.InputIndexError(
                    f"sample: true_classes: expected ids < num_classes={self.num_classes} (negative: an ignored "
                    f"entry), got {true_classes[over][0].item()}")
        if groups is not None:
            _validate.check_int(groups, "groups", "sample")
            if tuple(groups.shape) != (true_classes.shape[0],):
                raise InputError(f"sample: groups: expected shape ({true_classes.shape[0]},) (one per row of "
                                 f"true_classes), got {tuple(groups.shape)}")
        G = _num_groups(groups, num_groups)
        if groups is not None and _validate.host_readable(groups):
            _validate.check_index_range(groups, "groups", "sample", G)
        return true_classes, G

    def sample(self, num_sampled: int, true_classes: Tensor, *, unique: bool = True, groups: Optional[Tensor] = None,
               num_groups: Optional[int] = None, generator: Optional[torch.Generator] = None):
        m = as_int(num_sampled, "num_sampled", "sample", low=1, what="a positive int")
        _validate.check_bool("sample", unique=unique)  # (a truth value: unique="False" drew unique ids)
        true_classes, G = self._checked(true_classes, groups, num_groups)
        p = self._table()
        dev = p.device
        if unique:
            # classes with P > 0 must be at least m (TF would loop forever); checked from the table size when
            # it is known on the host (no sync): subclasses with zero weights set self._num_positive
            npos = getattr(self, "_num_positive", self.num_classes)
            if m > npos:
                raise InputError(f"sample: num_sampled: unique sampling needs num_sampled <= the number of classes "
                                 f"with P > 0 ({npos}), got {m}")
            picks = _gumbel_top_m(torch.log(p.double()), G, m, generator)  # in draw order
            pd = p.double()
            pp = (pd / pd.sum())[picks]  # renormalised in fp64: the fp32 table may sum to 1 +- 1e-7
            cum = torch.cumsum(pp, 1) - pp  # mass already picked before pick j
            uu = torch.rand(G, m, device=dev, generator=generator, dtype=torch.float64).clamp(min=1e-300)
            # success probability 1 - cum > 0: keep cum below 1 (a rounding to 1 would give K = inf)
            logc = torch.log(cum.clamp(max=1.0 - 2.0 ** -50))
            K = torch.where(cum > 0, torch.floor(torch.log(uu) / logc) + 1, 1.0)
            num_tries = K.sum(1).to(torch.int64)
            sampled = picks
        else:
            sampled = self._draw_with_replacement(G, m, generator, dev)
            num_tries = torch.full((G,), m, dtype=torch.int64, device=dev)
        sampled_ec = _expected_count(p[sampled], num_tries[:, None], m)
        tc = _validate.to_device(true_classes, dev, torch.int64, "true_classes", "sample")  # (uint8: ids, not a mask)
        if groups is None:
            g = torch.zeros(tc.shape[0], dtype=torch.int64, device=dev)
        else:
            g = _validate.to_device(groups, dev, torch.int64, "groups", "sample")
        # ids >= V and group ids outside [0, G) raise where the values are on the host; elsewhere (CUDA) their
        # rows' expected counts come back NaN (never an out-of-bounds read); negative ids: ignored rows, count 0
        bad = (tc >= self.num_classes).any(1) | (g < 0) | (g >= G)
        true_ec = _expected_count(p[tc.clamp(0, self.num_classes - 1)], num_tries[g.clamp(0, G - 1)][:, None], m)
        true_ec = torch.where(tc < 0, 0.0, true_ec).masked_fill(bad[:, None], math.nan)
        self._update(true_classes)
        return sampled, true_ec, sampled_ec, num_tries


class UniformSampler(Sampler):
    """Uniform sampler: P(c) = 1/V for every class c in ``[0, num_classes)``.

    Args:
        num_classes: V, a positive int.
    """

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.register_buffer("_p", torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32))

    def _draw_with_replacement(self, G, m, generator, device):
        if self.num_classes <= _MULTINOMIAL_MAX:
            return super()._draw_with_replacement(G, m, generator, device)
        # past multinomial's limit: uniform ids directly (the base class's fp64 CDF of 2**31 classes is 16 GiB)
        return torch.randint(0, self.num_classes, (G, m), device=device, generator=generator)


class LogUniformSampler(Sampler):
    """Zipfian: P(c) = ln((c+2)/(c+1)) / ln(V+1) (computed in fp64, stored fp32); ids sorted by frequency."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        c = torch.arange(num_classes, dtype=torch.float64)
        self.register_buffer("_p", (torch.log((c + 2) / (c + 1)) / math.log(num_classes + 1)).float())


    def _draw_with_replacement(self, G, m, generator, device):
        u = torch.rand(G, m, device=device, generator=generator, dtype=torch.float64)
        v = torch.floor(torch.exp(u * math.log(self.num_classes + 1))).to(torch.int64) - 1
        return v % self.num_classes


class FixedUnigramSampler(Sampler):
    """TF's fixed unigram sampler: P(c) = w_c / sum(w), w = unigram^distortion.

    One of ``unigrams`` (a list) or ``vocab_file`` (CSV; the last column of line k is the count of id
    ``num_reserved_ids + k``); TF's "absent" values (``vocab_file=""``, an empty ``unigrams``) count as not
    given. Reserved ids weigh 0; a zero count weighs ``0 ** distortion``: 1 for ``distortion=0`` (TF: a uniform
    distribution), else 0. With ``num_shards`` only ids with ``id % num_shards == shard`` are kept, re-indexed.
    ``num_classes`` (optional) must equal the kept count. (With both reserved ids and several shards, TF's
    kernel numbers the unigram entries from the count of reserved ids its shard keeps, not from
    ``num_reserved_ids`` as its documentation and this class do: the two differ only in that combination.)
    """

    def __init__(self, unigrams: Optional[Sequence[float]] = None, vocab_file: Optional[str] = None,
                 distortion: float = 1.0, num_reserved_ids: int = 0, num_shards: int = 1, shard: int = 0,
                 num_classes: Optional[int] = None):
        if unigrams is not None and (isinstance(unigrams, (str, bytes)) or not hasattr(unigrams, "__len__")):
            raise InputTypeError(f"FixedUnigramSampler: unigrams: expected a sequence of counts, got "
                                 f"{type(unigrams).__name__}")
        given = (f"got {'no' if unigrams is None else len(unigrams)} unigrams and "
                 f"{'no vocab_file' if not vocab_file else 'vocab_file=' + repr(vocab_file)}")
        unigrams = None if unigrams is None or len(unigrams) == 0 else unigrams  # (empty: not given, as TF's ())
        vocab_file = vocab_file or None
        if (unigrams is None) == (vocab_file is None):
            raise InputError(f"FixedUnigramSampler: unigrams: give exactly one of a non-empty unigrams or vocab_file, "
                             f"{given}")
        if vocab_file is not None:
            with open(vocab_file, newline="") as f:
                unigrams = [row[-1] for row in csv.reader(f) if row]
        _validate.check_number(distortion, "distortion", "FixedUnigramSampler")
        counts = []
        for k, u in enumerate(unigrams):
            try:
                counts.append(float(u))
            except OverflowError:
                raise InputError(f"FixedUnigramSampler: unigrams: the count at entry {k} overflows float32") from None
            except (TypeError, ValueError):
                raise InputError(f"FixedUnigramSampler: {'unigrams' if vocab_file is None else 'vocab_file'}: "
                                 f"expected a count at entry {k} ("
                                 f"{'a number' if vocab_file is None else 'the last column of a line'}), got "
                                 f"{u!r}") from None
        unigrams = counts
        num_reserved_ids = as_int(num_reserved_ids, "num_reserved_ids", "FixedUnigramSampler", low=0,
                                  what="a non-negative int")
        num_shards = as_int(num_shards, "num_shards", "FixedUnigramSampler", low=1, what="a positive int")
        shard = as_int(shard, "shard", "FixedUnigramSampler")
        if any(u < 0 or not math.isfinite(u) for u in unigrams):
            raise InputError("FixedUnigramSampler: unigrams: expected finite non-negative counts")
        # 0 ** 0 = 1 (TF's pow); 0 ** d for d < 0 would be inf: such a class weighs 0 (it is never drawn)
        try:
            w = [0.0] * num_reserved_ids + [u ** distortion if u > 0 or distortion == 0 else 0.0 for u in unigrams]
        except OverflowError:  # past float64 (hence float32 too)
            raise InputError(f"FixedUnigramSampler: unigrams: the weights unigram ** distortion (distortion="
                             f"{distortion}) overflow float32; scale the counts down") from None
        if not 0 <= shard < num_shards:
            raise InputError(f"FixedUnigramSampler: shard: expected in [0, {num_shards}), got {shard}")
        kept = [w[i] for i in range(len(w)) if i % num_shards == shard]
        if num_classes is not None and len(kept) != num_classes:
            raise InputError(f"FixedUnigramSampler: num_classes: the kept range has {len(kept)} ids, expected "
                             f"{num_classes}")
        super().__init__(len(kept))
        t = torch.tensor(kept, dtype=torch.float32)
        total = t.sum()
        if not torch.isfinite(total):  # (TF's expected counts are NaN there)
            raise InputError(f"FixedUnigramSampler: unigrams: the weights unigram ** distortion (distortion="
                             f"{distortion}) or their sum overflow float32 (largest weight {max(kept):.4g}, sum "
                             f"{math.fsum(kept):.4g}); scale the counts down")
        if not total > 0:
            raise InputError("FixedUnigramSampler: unigrams: the weights sum to 0")
        self.register_buffer("_p", t / total)
        self._count_positive()

    def _count_positive(self):
        """The classes of nonzero weight, counted once per table (the constructor's or a loaded one) and kept
        on the host for unique sampling's check, which would otherwise read the table every draw."""
        if not self._p.is_meta:
            self._num_positive = int((self._p > 0).sum())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._count_positive()



class LearnedUnigramSampler(Sampler):
    """TF's learned unigram sampler: counts start at 1, +1 per true-label occurrence after each draw
    (integer, deterministic); updates that would push the total past 2^31 - 1 are dropped, in label order.
    The counts are a buffer (checkpointed with the module)."""

    MAX_TOTAL = 2 ** 31 - 1

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.register_buffer("counts", torch.ones(num_classes, dtype=torch.int64))

    def probs(self):
        c = self.counts.double()
        return (c / c.sum()).float()

    def _update(self, true_classes: Tensor) -> None:
        if transform_active("Vmap"):
            raise NotImplementedError("LearnedUnigramSampler: sampling under torch.vmap is not supported (its counts "
                                      "are one shared buffer, updated in place after each draw): draw outside the "
                                      "transform and pass sampled_values")
        labels = true_classes.reshape(-1).to(self.counts.device, torch.int64)  # (scatter indexes with int64)
        ok = (labels >= 0) & (labels < self.num_classes)  # ignored rows (negative ids) take no part
        room = self.MAX_TOTAL - self.counts.sum()
        keep = ok & (torch.cumsum(ok.to(torch.int64), 0) <= room)  # updates past the cap dropped in label order
        self.counts.scatter_add_(0, labels.clamp(0, self.num_classes - 1), keep.to(torch.int64))


class AllCandidateSampler(Sampler):
    """Samples ``arange(m)`` with all expected counts 1 (for tests: with hits removed, sampled softmax
    then equals the full softmax)."""

    def probs(self):
        return torch.full((self.num_classes,), 1.0 / self.num_classes)

    def sample(self, num_sampled, true_classes, *, unique=True, groups=None, num_groups=None, generator=None):
        m = as_int(num_sampled, "num_sampled", "AllCandidateSampler", low=1, high=self.num_classes,
                   what="an int (all candidates)")
        _validate.check_bool("sample", unique=unique)
        true_classes, num_groups = self._checked(true_classes, groups, num_groups)
        dev = true_classes.device
        sampled = torch.arange(m, device=dev).expand(num_groups, m).contiguous()
        true_ec = (true_classes >= 0).to(torch.float32)  # 1 (as TF's), 0 for an ignored (negative) entry
        return (sampled, true_ec, torch.ones(num_groups, m, device=dev),
                torch.full((num_groups,), m, dtype=torch.int64, device=dev))


def make_sampler(name, num_classes: int, **kwargs) -> Sampler:
    """A sampler by name: ``"uniform"``, ``"log_uniform"``, ``"fixed_unigram"`` (kwargs as the class),
    or an instance (returned as is). ``"learned_unigram"`` by name is an error (its state would be lost)."""
    if isinstance(name, Sampler):
        return name
    table = {"uniform": UniformSampler, "log_uniform": LogUniformSampler}
    if name == "fixed_unigram":
        return FixedUnigramSampler(num_classes=num_classes, **kwargs)
    if name == "learned_unigram":
        raise InputError("sampler: 'learned_unigram' by name would lose its learned counts between calls; pass a "
                         "LearnedUnigramSampler instance")
    if not isinstance(name, str):
        raise InputTypeError(f"sampler: expected a name or a Sampler, got {type(name).__name__}")
    if name not in table:
        raise InputError(f"sampler: expected one of ('uniform', 'log_uniform', 'fixed_unigram') or a Sampler, got "
                         f"{name!r}")
    return table[name](num_classes, **kwargs)
