"""Test setup. The first lines run before anything imports triton.

Without a GPU the real Triton kernels run through triton's CPU interpreter, which must be
switched on before triton is first imported (later, triton fails with "0 active drivers").
On a CUDA machine the kernels run compiled on the GPU, so the interpreter stays off there
(it would turn every GPU test into an interpreted one). An explicit TRITON_INTERPRET in the
environment always wins. ``import torch`` and ``torch.cuda.is_available()`` do not import
triton (constructing a torch.optim optimizer does, so this must run first).
"""

import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        if "triton" in sys.modules:
            raise RuntimeError("triton was imported before tests/conftest.py could set "
                               "TRITON_INTERPRET=1: set it in the environment instead")
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fusedopt.backend import interpreting, triton_available  # noqa: E402

#: where backend="triton" can run: CUDA when present, else the CPU under the interpreter
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUNNABLE = triton_available() and (KERNEL_DEVICE == "cuda" or interpreting())


@pytest.fixture
def kernel_device() -> str:
    """The device on which backend="triton" runs; skips the test where it cannot run."""
    if not KERNELS_RUNNABLE:
        pytest.skip("triton kernels need triton with CUDA or TRITON_INTERPRET=1")
    return KERNEL_DEVICE

