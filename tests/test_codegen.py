"""Compile the real kernel for an H100 (sm_90) on this machine, no GPU needed, and read the PTX.

This is how a CPU-only machine checks what the interpreter cannot: that every variant lowers
(fp64 scalar math, pointer casts from the table, the atomic step hand-off), that the aligned
path really issues 16-byte vector loads and stores, and that division and sqrt are IEEE-rounded
as in torch.
"""

import re

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia", reason="triton's CUDA backend is not installed")

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedopt.kernels import skeleton, updates  # noqa: E402

SIGNATURE = {"tensors": "*i64", "num_tensors": "i64", "work": "*i64", "hyper": "*fp64",
             "hyper_stride": "i64", "done_counts": "*i32"}

VARIANTS = [
    # (update, states, uses_step, flags)
    pytest.param(updates.adam, 2, True, (False, False, True), id="adamw"),
    pytest.param(updates.adam, 3, True, (True, True, False), id="adam-amsgrad-maximize"),
    pytest.param(updates.sgd, 1, False, (False, True, True), id="sgd-nesterov"),
    pytest.param(updates.sgd, 0, False, (True, False, False), id="sgd-plain-maximize"),
]


def compile_ptx(update, num_states, uses_step, flags, storage):
    kernel = skeleton.multi_tensor_step
    constexprs = dict(UPDATE=update, F0=flags[0], F1=flags[1], F2=flags[2],
                      NUM_STATES=num_states, USES_STEP=uses_step, STORAGE=storage,
                      COMPUTE=tl.float64 if storage == tl.float64 else tl.float32,
                      BLOCK=skeleton.BLOCK, ITERS=skeleton.ITERS)
    signature = dict(SIGNATURE, **{name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature=signature, constexprs={
        (kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": skeleton.NUM_WARPS})
    return compiled.asm["ptx"]


@pytest.mark.parametrize("storage", [tl.float32, tl.bfloat16, tl.float64],
                         ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize(("update", "num_states", "uses_step", "flags"), VARIANTS)
def test_sm90_codegen(update, num_states, uses_step, flags, storage):
    ptx = compile_ptx(update, num_states, uses_step, flags, storage)
    wide = "v2.b64" if storage == tl.float64 else "v4.b32"  # 16 bytes either way
    tensors = 2 + num_states  # param, grad, states
    # Aligned full chunks: every tensor is read and written in 16-byte vectors.
    assert len(re.findall(rf"ld\.global(\.[a-z_0-9]+)*\.{wide}", ptx)) >= tensors
    assert len(re.findall(rf"st\.global(\.[a-z_0-9]+)*\.{wide}", ptx)) >= tensors - 1
    # The step hand-off between the programs of one tensor.
    assert ("atom.global.gpu.acq_rel.add" in ptx) == uses_step
    # IEEE division and square root, as torch computes them (Adam only).
    if update is updates.adam:
        suffix = "f64" if storage == tl.float64 else "f32"
        assert f"div.rn.{suffix}" in ptx and f"sqrt.rn.{suffix}" in ptx
        assert "div.full.f32" not in ptx and "sqrt.approx" not in ptx
