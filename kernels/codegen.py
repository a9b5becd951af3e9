"""Compile the multi-tensor kernel for a GPU target without a GPU, and summarise its PTX.

Kernel engineers (and the CPU test suite) use this to check what the interpreter cannot see:
that a variant lowers at all, that the aligned path issues 16-byte vector loads, which atomics
and which rounding of division and sqrt the code uses. Triton's compiler and ptxas run on the
CPU, so no device is needed; this does not work under TRITON_INTERPRET=1, which replaces
``@triton.jit`` functions by interpreted ones.

    python -m fusedopt.kernels.codegen            # JSON summary of every variant, sm_90
"""

import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedopt.kernels import skeleton, updates

_SIGNATURE = {"tensors": "*i64", "num_tensors": "i64", "work": "*i64", "hyper": "*fp64",
              "hyper_stride": "i64", "done_counts": "*i32"}
_DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}

# (name, update, number of states, uses step, constexpr flags): one of each shape of variant.
VARIANTS = [
    ("adamw", "adam", 2, True, (False, False, True)),
    ("adam-amsgrad-maximize", "adam", 3, True, (True, True, False)),
    ("sgd-momentum-nesterov", "sgd", 1, False, (False, True, True)),
    ("sgd-plain-maximize", "sgd", 0, False, (True, False, False)),
]


def compile_ptx(update: str, num_states: int, uses_step: bool, flags: tuple[bool, ...],
                dtype: str, arch: int = 90) -> str:
    """PTX of ``multi_tensor_step`` for one variant, compiled for ``sm_<arch>``."""
    kernel = skeleton.multi_tensor_step
    storage = _DTYPES[dtype]
    constexprs = dict(UPDATE=getattr(updates, update), F0=flags[0], F1=flags[1], F2=flags[2],
                      NUM_STATES=num_states, USES_STEP=uses_step, STORAGE=storage,
                      COMPUTE=tl.float64 if storage == tl.float64 else tl.float32,
                      BLOCK=skeleton.BLOCK, ITERS=skeleton.ITERS, ROUND_BF16_BY_HAND=False)
    signature = dict(_SIGNATURE, **{name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature=signature, constexprs={
        (kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": skeleton.NUM_WARPS})
    return compiled.asm["ptx"]


def summarise(ptx: str) -> dict[str, int]:
    """Count the memory and math instructions that matter for a bandwidth-bound update."""
    def count(pattern: str) -> int:
        return len(re.findall(pattern, ptx))
    return {
        "ld_16B": count(r"ld\.global[.a-z_0-9]*\.(?:v4\.b32|v2\.b64)"),
        "st_16B": count(r"st\.global[.a-z_0-9]*\.(?:v4\.b32|v2\.b64)"),
        "atomic_acq_rel": count(r"atom\.global\.gpu\.acq_rel\.add"),
        "div_rn": count(r"div\.rn\.f(?:32|64)"),
        "sqrt_rn": count(r"sqrt\.rn\.f(?:32|64)"),
        "div_approx": count(r"div\.(?:full|approx)\.f32"),
        "sqrt_approx": count(r"sqrt\.approx"),
    }


def main(argv: list[str] | None = None) -> None:
    dtypes = (argv if argv else sys.argv[1:]) or ["fp32", "bf16", "fp64"]
    report = {f"{name}/{dtype}": summarise(compile_ptx(update, states, step, flags, dtype))
              for name, update, states, step, flags in VARIANTS for dtype in dtypes}
    print(json.dumps({"triton": triton.__version__, "arch": "sm_90", "variants": report}))


if __name__ == "__main__":
    main()
