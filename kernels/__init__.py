"""Triton kernels of tri_losses (installed as ``tri_losses.kernels``).

One module per loss family; each holds ``@triton.jit`` kernels and their ``launch`` helpers only.
Importing a module here imports Triton: the Python API imports them lazily, on first use.
"""
