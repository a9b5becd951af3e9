"""Triton code only: the multi-tensor skeleton, one element-wise update per algorithm, and the
vector kernels of L-BFGS. The ground floor: nothing here imports from ``fusedopt``'s API.

Importing this package does not import triton: :mod:`fusedopt.kernels.algorithms` (the
declarations) and :func:`interpreting` need neither triton nor torch, so ``import fusedopt``
works where triton is not installed. The kernel entry points below load triton on first use.
"""

import importlib
import os

_LAZY = {
    "CHUNK": "skeleton", "Variant": "variant", "columns": "skeleton", "launch": "skeleton",
    "launch_count": "skeleton", "work_list": "skeleton",
    "Layout": "vector", "TensorTable": "vector", "abs_max": "vector", "abs_sum": "vector",
    "axpy": "vector", "copy": "vector", "dot": "vector", "norm": "vector", "scale": "vector",
    "vector_launch_count": "vector",
}


def interpreting() -> bool:
    """True when triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"),
                    "launch_count" if name == "vector_launch_count" else name)
    globals()[name] = value  # later lookups skip this function (and a stub set here stays)
    return value


__all__ = ["interpreting", *_LAZY]
