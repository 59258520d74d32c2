"""pytest plugin: the representative subset of the correctness tests that the GPU check runs on CUDA.

Loaded with ``-p gpu_subset`` (``bench/`` on the path); ``TRI_LOSSES_TEST_SUBSET`` chooses the subset:

- ``full``: every family's tests, both backends, fp32/bf16 (or no dtype) cases, at most
  ``FULL_PER_FUNCTION`` parametrisations per test function and backend, chosen to cover the test's
  parameter values evenly (``_spread``), not just the first ones collected;
- ``quick``: the cross-entropy, linear-CE, CTC and element-wise families, Triton backend only, at most
  ``QUICK_PER_FUNCTION`` parametrisations per test function.

Both leave out ``torch.compile`` cases (minutes of inductor work each) and the tests that are no family's
correctness (the AOT compile test for machines without a GPU, the GPU check's own tests, packaging, docs,
README examples).

Deselected tests are reported as such by pytest. ``select`` is a pure function (tested on CPU).
"""
from __future__ import annotations

import os
import re

QUICK_FILES = ("test_cross_entropy.py", "test_linear_cross_entropy.py", "test_ctc.py", "test_elementwise.py")
QUICK_PER_FUNCTION = 3
FULL_PER_FUNCTION = 8
SKIP_FILES = ("test_kernels_compile.py", "test_gpu_check.py", "test_packaging.py", "test_docs.py",
              "test_readme.py")


def _dtype_ok(params) -> bool:
    names = {str(v).replace("torch.", "") for v in params.values()}
    dtypes = names & {"float16", "float64", "float32", "bfloat16"}
    return not dtypes or bool(dtypes & {"float32", "bfloat16"})


def _value_key(v) -> str:
    """A parameter value as a key that is the same in every process (xdist workers each select)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(v))


def _spread(group, cap: int):
    """Up to ``cap`` items of one test function and backend that cover its parameter values evenly:
    each pick is the item whose values have been picked least (sum of 1 / (1 + times picked)), the
    earliest on a tie; so a (family x path) grid keeps both paths and as many families as fit, where
    the first ``cap`` in collection order would keep one path only. Identical scores: collection order."""
    if len(group) <= cap:
        return list(group)
    keys = [{(k, _value_key(v)) for k, v in it.params.items() if k != "backend"} for it in group]
    seen, chosen = {}, []
    left = list(range(len(group)))
    while left and len(chosen) < cap:
        best = max(left, key=lambda i: (sum(1.0 / (1 + seen.get(kv, 0)) for kv in keys[i]), -i))
        left.remove(best)
        chosen.append(best)
        for kv in keys[best]:
            seen[kv] = seen.get(kv, 0) + 1
    return [group[i] for i in sorted(chosen)]


def select(items, mode: str):
    """(kept, deselected), each in collection order. Items need ``nodeid``, ``name``, ``fspath`` (basename
    used) and ``params`` (dict)."""
    if mode not in ("full", "quick"):
        raise ValueError(f"TRI_LOSSES_TEST_SUBSET: expected 'full' or 'quick', got {mode!r}")
    cap = QUICK_PER_FUNCTION if mode == "quick" else FULL_PER_FUNCTION
    groups = {}
    for it in items:
        fname = os.path.basename(str(it.fspath))
        base = it.name.split("[")[0]
        backend = it.params.get("backend", "triton")
        ok = fname not in SKIP_FILES and "compile" not in base and _dtype_ok(it.params)
        if ok and mode == "quick":
            ok = fname in QUICK_FILES and backend == "triton"
        if ok:
            groups.setdefault((fname, base, backend), []).append(it)
    keep = {id(it) for group in groups.values() for it in _spread(group, cap)}
    kept = [it for it in items if id(it) in keep]
    dropped = [it for it in items if id(it) not in keep]
    return kept, dropped


class _View:
    def __init__(self, item):
        self.item, self.nodeid, self.name, self.fspath = item, item.nodeid, item.name, item.fspath
        cs = getattr(item, "callspec", None)
        self.params = dict(cs.params) if cs is not None else {}


def pytest_collection_modifyitems(config, items):
    mode = os.environ.get("TRI_LOSSES_TEST_SUBSET", "full")
    kept, dropped = select([_View(i) for i in items], mode)
    if dropped:
        config.hook.pytest_deselected(items=[v.item for v in dropped])
        items[:] = [v.item for v in kept]


def pytest_runtest_logreport(report):
    """Each failure printed the moment it is known (one line: the test id and the error's last line), so a
    step killed at its timeout still names its failures (pytest's own summary comes only at the end). With
    xdist this runs in the controller, once per report."""
    if report.failed:
        text = str(getattr(report, "longreprtext", "") or report.longrepr or "")
        last = [ln for ln in text.splitlines() if ln.strip()][-3:]
        print(f"\n[subset] FAILED ({report.when}) {report.nodeid}: {' | '.join(s.strip()[:160] for s in last)}",
              flush=True)
