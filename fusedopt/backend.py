"""The one place where the backend of a bucket of tensors is chosen."""

import functools
import importlib.util
import os

import torch

from fusedopt.kernels import interpreting

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "FUSEDOPT_BACKEND"


@functools.cache
def triton_available() -> bool:
    """True if triton can be imported (it is optional: the reference path needs only torch)."""
    return importlib.util.find_spec("triton") is not None




def check_backend_name(requested: str | None) -> str:
    """Validate a backend name (the argument, else $FUSEDOPT_BACKEND, else "auto")."""
    name = requested if requested is not None else os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        source = "backend" if requested is not None else ENV_VAR
        raise ValueError(f"Invalid {source}: {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Return "triton" or "reference" for tensors on ``device``.

    ``auto``: triton for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1; the pure
    torch reference otherwise. ``triton`` refuses devices it cannot run on instead of silently
    falling back, so that a test that asks for the kernels really runs them.
    """
    name = check_backend_name(requested)
    runnable = triton_available() and (
        device.type == "cuda" or (device.type == "cpu" and interpreting()))
    if name == "auto":
        return "triton" if runnable else "reference"
    if name == "triton" and not runnable:
        why = ("triton is not installed" if not triton_available()
               else f"{device.type} tensors need CUDA, or TRITON_INTERPRET=1 for CPU")
        raise RuntimeError(f"fusedopt backend 'triton' cannot run here: {why}")
    return name
