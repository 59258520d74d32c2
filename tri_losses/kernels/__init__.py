"""Triton kernels of tri_losses: one module per loss family, each holding ``@triton.jit`` kernels and
their launch helpers only. The modules import nothing from the rest of the package (a leaf), and
importing one imports Triton, so the Python API imports them lazily, on first use.
"""
import os


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
