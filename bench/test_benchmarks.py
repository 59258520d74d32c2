"""pytest-benchmark entry points (``pytest bench/``): one small, representative case per family.

The full tables come from ``python bench/run.py``; these are for tracking regressions over time.
"""
import pytest
import torch

import tri_losses

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = DEVICE.type == "cpu"


@pytest.mark.parametrize("V", [4096] if SMALL else [32768, 131072])
def test_bench_cross_entropy_fwd_bwd(benchmark, V):
    N = 64 if SMALL else 16384
    x = torch.randn(N, V, device=DEVICE, dtype=torch.float32 if SMALL else torch.bfloat16, requires_grad=True)
    y = torch.randint(0, V, (N,), device=DEVICE)

    def step():
        x.grad = None
        tri_losses.cross_entropy(x, y).backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
