"""pytest plugin: the representative subset of the correctness tests that the GPU check runs on CUDA.

Loaded with ``-p gpu_subset`` (``bench/`` on the path); ``TRI_LOSSES_TEST_SUBSET`` chooses the subset:

- ``full``: every family's tests, both backends, fp32/bf16 (or no dtype) cases, at most
  ``FULL_PER_FUNCTION`` parametrisations per test function and backend;
- ``quick``: the cross-entropy, linear-CE, CTC and element-wise families, Triton backend only, at most
  ``QUICK_PER_FUNCTION`` parametrisations per test function.

Both leave out ``torch.compile`` cases (minutes of inductor work each) and the tests that are no family's
correctness (the AOT compile test for machines without a GPU, the GPU check's own tests, packaging, docs,
README examples).

Deselected tests are reported as such by pytest. ``select`` is a pure function (tested on CPU).
"""
from __future__ import annotations

import os

QUICK_FILES = ("test_cross_entropy.py", "test_linear_cross_entropy.py", "test_ctc.py", "test_elementwise.py")
QUICK_PER_FUNCTION = 3
FULL_PER_FUNCTION = 8
SKIP_FILES = ("test_kernels_compile.py", "test_gpu_check.py", "test_packaging.py", "test_docs.py",
              "test_readme.py")


def _dtype_ok(params) -> bool:
    names = {str(v).replace("torch.", "") for v in params.values()}
    dtypes = names & {"float16", "float64", "float32", "bfloat16"}
    return not dtypes or bool(dtypes & {"float32", "bfloat16"})


def select(items, mode: str):
    """(kept, deselected). Items need ``nodeid``, ``name``, ``fspath`` (basename used) and ``params`` (dict)."""
    if mode not in ("full", "quick"):
        raise ValueError(f"TRI_LOSSES_TEST_SUBSET: expected 'full' or 'quick', got {mode!r}")
    kept, dropped, per_fn = [], [], {}
    for it in items:
        fname = os.path.basename(str(it.fspath))
        base = it.name.split("[")[0]
        backend = it.params.get("backend", "triton")
        ok = fname not in SKIP_FILES and "compile" not in base and _dtype_ok(it.params)
        if ok and mode == "quick":
            ok = fname in QUICK_FILES and backend == "triton"
        if ok:
            key = (fname, base, backend)
            per_fn[key] = per_fn.get(key, 0) + 1
            ok = per_fn[key] <= (QUICK_PER_FUNCTION if mode == "quick" else FULL_PER_FUNCTION)
        (kept if ok else dropped).append(it)
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
