"""A pool of torch.distributed worker processes (gloo, CPU) started once per test module.

``DistPool(world_size)`` spawns ``world_size`` processes that join one gloo process group and then
run test functions on demand: ``pool.run(fn, *args)`` calls ``fn(rank, world_size, group, *args)``
on every rank and returns the per-rank results (rank order). ``fn`` must be a module-level function
(workers import it by module and name). A worker's exception is re-raised in the parent with the
worker's traceback. Spawned workers inherit the parent's ``sys.path`` and environment (so
``TRITON_INTERPRET=1`` from conftest reaches them before Triton is imported).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback

_TIMEOUT_S = int(os.environ.get("TRI_LOSSES_DIST_TIMEOUT", 600))


def _worker(rank, world_size, init_file, tasks, results):
    import importlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    group = dist.group.WORLD
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, args, kwargs = task
        try:
            fn = getattr(importlib.import_module(module), name)
            out = fn(rank, world_size, group, *args, **kwargs)
            results.put((rank, True, out))
        except BaseException:  # noqa: BLE001 - reported to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        fd, self._init_file = tempfile.mkstemp(prefix="tri_losses_gloo_")
        os.close(fd)
        os.unlink(self._init_file)  # the file store creates it
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, world_size, self._init_file, self._tasks[r],
                                                         self._results), daemon=True)
                       for r in range(world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, **kwargs):
        for q in self._tasks:
            q.put((fn.__module__, fn.__name__, args, kwargs))
        out, errors = [None] * self.world_size, []
        for _ in range(self.world_size):
            rank, ok, value = self._results.get(timeout=_TIMEOUT_S)
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise RuntimeError("a distributed worker failed:\n" + "\n".join(errors))
        return out

    def close(self):
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)
