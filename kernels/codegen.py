"""Compile the multi-tensor kernel for a GPU target without a GPU, and summarise its PTX.

Kernel engineers (and the CPU test suite) use this to check what the interpreter cannot see:
that a variant lowers at all, that the aligned path issues 16-byte vector loads, which atomics
and which rounding of division and sqrt the code uses. Triton's compiler and ptxas run on the
CPU, so no device is needed; this does not work under TRITON_INTERPRET=1, which replaces
``@triton.jit`` functions by interpreted ones.

    python -m fusedopt.kernels.codegen            # JSON summary of every variant, sm_90
    python -m fusedopt.kernels.codegen lamb/bf16  # one variant in one dtype
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

# name: (fusedopt optimizer, constructor options): every optimizer, and each shape of variant
# (number of states, flags, per-tensor scalars, a sums launch) at least once.
VARIANTS = {
    "adamw": ("AdamW", {}),
    "adam-amsgrad-maximize": ("Adam", {"amsgrad": True, "maximize": True}),
    "sgd-momentum-nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "sgd-plain-maximize": ("SGD", {"maximize": True}),
    "adagrad": ("Adagrad", {}),
    "adadelta": ("Adadelta", {}),
    "rmsprop-momentum-centered": ("RMSprop", {"momentum": 0.9, "centered": True}),
    "rmsprop-centered": ("RMSprop", {"centered": True}),
    "nadam-decoupled": ("NAdam", {"decoupled_weight_decay": True}),
    "radam": ("RAdam", {}),
    "adamax": ("Adamax", {}),
    "lion": ("Lion", {}),
    "lamb": ("LAMB", {}),
    # "+amp": the same, launched with GradScaler's grad_scale and found_inf and a clip
    # coefficient
    "adamw+amp": ("AdamW", {}),
    "lamb+amp": ("LAMB", {}),
}


def variant(name: str) -> dict:
    """What the engine would launch for VARIANTS[name]: read off the optimizer's own spec."""
    import torch

    import fusedopt

    cls_name, options = VARIANTS[name]
    opt = getattr(fusedopt, cls_name)([torch.zeros(1)], **options, backend="reference")
    flags = tuple(opt._flags(opt.param_groups[0]).values())
    return {"update": getattr(updates, opt.kernel_update),
            "terms": getattr(updates, opt.kernel_terms) if opt.kernel_terms else None,
            "advance_aux": getattr(updates, opt.scalar_state[2]) if opt.scalar_state else None,
            "num_states": len(opt._state_names(opt._flags(opt.param_groups[0]))),
            "uses_step": opt.uses_step,
            "flags": (flags + (False, False, False))[:3],
            "amp": name.endswith("+amp")}


def compile_ptx(name: str, dtype: str, kernel: str = "step", arch: int = 90) -> str:
    """PTX of VARIANTS[name]'s ``multi_tensor_step`` (kernel="step") or of its
    ``multi_tensor_sums`` (kernel="sums", optimizers with a terms launch), for sm_<arch>."""
    spec = variant(name)
    storage = _DTYPES[dtype]
    compute = tl.float64 if storage == tl.float64 else tl.float32
    flags = spec["flags"]
    constexprs = dict(F0=flags[0], F1=flags[1], F2=flags[2], NUM_STATES=spec["num_states"],
                      USES_STEP=spec["uses_step"], ADVANCE_AUX=spec["advance_aux"],
                      UNSCALE=spec["amp"], SKIP_ON_INF=spec["amp"], CLIP=spec["amp"],
                      SCALE_GRADS=spec["amp"],
                      STORAGE=storage, COMPUTE=compute, BLOCK=skeleton.BLOCK,
                      ITERS=skeleton.ITERS)
    sums_type = "*fp64" if dtype == "fp64" else "*fp32"
    if kernel == "sums":
        fn = skeleton.multi_tensor_sums
        constexprs["TERMS"] = spec["terms"]
        signature = {k: v for k, v in _SIGNATURE.items() if k != "done_counts"}
        signature["sums"] = sums_type
        signature.update(grad_scale="*fp32", found_inf="*fp32", clip_coef=sums_type)
    else:
        fn = skeleton.multi_tensor_step
        has_sums = spec["terms"] is not None
        constexprs.update(UPDATE=spec["update"], HAS_SUMS=has_sums, ROUND_BF16_BY_HAND=False,
                          FINISH=spec["uses_step"] or spec["advance_aux"] is not None
                          or has_sums)
        signature = dict(_SIGNATURE, sums=sums_type if has_sums else "*i32",
                         grad_scale="*fp32", found_inf="*fp32", clip_coef=sums_type)
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=fn, signature=signature, constexprs={
        (fn.arg_names.index(name),): value for name, value in constexprs.items()})
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
    """Arguments: dtypes (every variant in each), or ``name/dtype`` pairs; default: every
    variant in fp32, bf16 and fp64."""
    args = (argv if argv else sys.argv[1:]) or ["fp32", "bf16", "fp64"]
    pairs = [tuple(a.split("/")) if "/" in a else (name, a)
             for a in args for name in (VARIANTS if "/" not in a else (None,))]
    report = {}
    for name, dtype in pairs:
        kernels = ("step", "sums") if variant(name)["terms"] is not None else ("step",)
        for kernel in kernels:
            key = f"{name}/{dtype}" if kernel == "step" else f"{name}/{kernel}/{dtype}"
            report[key] = summarise(compile_ptx(name, dtype, kernel))
    print(json.dumps({"triton": triton.__version__, "arch": "sm_90", "variants": report}))


if __name__ == "__main__":
    main()
