"""Ahead-of-time compilation of the Triton kernels for a CUDA target, without a GPU.

The interpreter accepts programs that compiled Triton rejects (loop-carried type changes, constexpr
reassignment, unsupported ops, ...). ``record_launches`` captures every launch the public ops make,
with the launch configuration a GPU would get (``interpreting()`` patched to False, kernels not
executed), as Triton's JIT would specialise it (``native_specialize_impl``: int 1 -> constexpr,
ints -> i32/i64, tensors -> typed pointers). ``compile_all`` then compiles each distinct launch for
sm_90 in subprocesses without ``TRITON_INTERPRET`` (where the kernels are real JIT functions).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = r"""
import importlib, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cap, smem = int(sys.argv[1]), int(sys.argv[2])
failed = []
for line in sys.stdin:
    job = json.loads(line)
    try:
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"])
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=job["options"])
        if k.metadata.shared > smem:
            failed.append((job["kernel"], job["constexprs"], f"needs {k.metadata.shared} bytes of shared memory, "
                                                             f"more than the {smem} a block can have"))
    except Exception:
        failed.append((job["kernel"], job["constexprs"], traceback.format_exc()[-2500:]))
print("AOT-RESULT " + json.dumps(failed))
"""


KERNEL_MODULES = ("automata", "cross_entropy", "ctc", "elementwise", "linear_cross_entropy", "sampled", "text")


def kernel_modules():
    import importlib
    return [importlib.import_module(f"tri_losses.kernels.{m}") for m in KERNEL_MODULES]


def cuda_target_available() -> bool:
    """Whether the installed Triton has its NVIDIA backend (and so ptxas) to compile for CUDA."""
    try:
        import triton.backends as tb
        return "nvidia" in tb.backends
    except Exception:
        return False


@contextlib.contextmanager
def record_launches():
    """Within the block, kernel launches are recorded (not run) with GPU launch configurations.

    Yields the dict of distinct launches: key -> job (module, kernel, signature, constexprs, options).
    Only meaningful with ``TRITON_INTERPRET=1`` (kernels are then ``InterpretedFunction`` objects).
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    from tri_losses.kernels import _math
    mods = kernel_modules()
    jobs: dict = {}

    def run(self, *args, grid, warmup, **kwargs):
        sig_obj = inspect.signature(self.fn)
        params = [p for p in sig_obj.parameters]
        kernel_kwargs = {k: v for k, v in kwargs.items() if k in params}
        options = {k: v for k, v in kwargs.items() if k not in params}
        bound = sig_obj.bind(*args, **kernel_kwargs)
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for name, value in bound.arguments.items():
            ann = sig_obj.parameters[name].annotation
            if "constexpr" in str(ann):
                signature[name] = "constexpr"
                constexprs[name] = value
                continue
            ty, _ = native_specialize_impl(BaseBackend, value, False, True, True)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = value
        options = {k: v for k, v in options.items() if k in ("num_warps", "num_stages")}
        job = dict(module=self.fn.__module__, kernel=self.fn.__name__, signature=signature,
                   constexprs=constexprs, options=options)
        jobs.setdefault(json.dumps(job, sort_keys=True), job)

    saved = [(m, m.interpreting) for m in mods + [_math] if hasattr(m, "interpreting")]
    old_run = InterpretedFunction.run
    try:
        for m, _ in saved:
            m.interpreting = lambda: False
        InterpretedFunction.run = run
        yield jobs
    finally:
        InterpretedFunction.run = old_run
        for m, f in saved:
            m.interpreting = f


def compile_all(jobs, capability=90, shared_limit=232448, procs=2, python_path=None, timeout=1200):
    """Compile every job for ``sm_<capability>``; returns a list of (kernel, constexprs, error).

    ``shared_limit``: the most shared memory one block may use (H100/H200: 227 KiB); a kernel needing
    more would compile but fail at launch. ``python_path`` puts another Triton first on the path (e.g.
    the GPU image's 3.6 installed with ``pip install --target``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if python_path:
        env["PYTHONPATH"] = python_path + os.pathsep + env.get("PYTHONPATH", "")
    lines = [json.dumps(j) for j in jobs]
    chunks = [lines[i::procs] for i in range(procs) if lines[i::procs]]
    ps = [subprocess.Popen([sys.executable, "-c", _SCRIPT, str(capability), str(shared_limit)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
          for _ in chunks]
    failed = []
    for p, chunk in zip(ps, chunks):
        out, _ = p.communicate("\n".join(chunk) + "\n", timeout=timeout)
        res = [ln for ln in out.splitlines() if ln.startswith("AOT-RESULT ")]
        if p.returncode != 0 or not res:
            failed.append(("<compiler process>", {}, out[-4000:]))
            continue
        failed += [tuple(f) for f in json.loads(res[-1][len("AOT-RESULT "):])]
    return failed
