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


def _patch_language_once_per_launch() -> None:
    """Make triton's interpreter patch ``triton.language`` once per launch, not per call.

    The interpreter swaps triton.language's builtins for interpreted ones when a kernel
    starts and swaps them back when it ends. It also re-runs that patching (an
    ``inspect.getmembers`` walk of the language modules) on every call of a nested
    ``@triton.jit`` helper, where everything is already patched: with the skeleton's and the
    updates' small helpers that was half of the CPU suite's interpreter time (triton 3.9).
    Skipping the nested re-patch changes nothing else. Test-only; a triton without these
    internals is left alone.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original_patch = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original_patch is None or executor is None or not hasattr(interpreter,
                                                                 "_LangPatchScope"):
        return
    import inspect

    import triton.language as tl

    launch = {"running": False, "patched": set()}  # the language modules patched so far
    original_call = executor.__call__

    def call(self, *args, **kwargs):
        launch.update(running=True, patched=set())
        try:
            return original_call(self, *args, **kwargs)
        finally:
            launch.update(running=False, patched=set())

    def patch_lang(fn):
        # the modules triton's _patch_lang patches for ``fn``: tl and/or tl.core, whichever
        # its module imports (triton's own helpers, like tl.zeros, import tl.core)
        langs = {id(v) for v in fn.__globals__.values()
                 if inspect.ismodule(v) and v in (tl, tl.core)}
        if launch["running"] and langs <= launch["patched"]:
            return interpreter._LangPatchScope()  # nothing patched, nothing to undo
        scope = original_patch(fn)
        if launch["running"]:
            launch["patched"] |= langs
        return scope

    executor.__call__ = call
    interpreter._patch_lang = patch_lang


if interpreting() and triton_available():
    _patch_language_once_per_launch()

#: where backend="triton" can run: CUDA when present, else the CPU under the interpreter
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUNNABLE = triton_available() and (KERNEL_DEVICE == "cuda" or interpreting())


@pytest.fixture
def kernel_device() -> str:
    """The device on which backend="triton" runs; skips the test where it cannot run."""
    if not KERNELS_RUNNABLE:
        pytest.skip("triton kernels need triton with CUDA or TRITON_INTERPRET=1")
    return KERNEL_DEVICE

