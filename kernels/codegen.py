"""Compile the multi-tensor kernel for a GPU target without a GPU, and summarise its PTX.

Kernel engineers (and the CPU test suite) use this to check what the interpreter cannot see:
that a variant lowers at all, that the aligned path issues 16-byte vector loads, which atomics
and which rounding of division and sqrt the code uses. Triton's compiler and ptxas run on the
CPU, so no device is needed; this does not work under TRITON_INTERPRET=1, which replaces
``@triton.jit`` functions by interpreted ones.

    python -m fusedopt.kernels.codegen            # JSON summary of every variant, sm_90
    python -m fusedopt.kernels.codegen lamb/bf16  # one variant in one dtype
    python -m fusedopt.kernels.codegen --others fp32 bf16  # tile and sparse-row kernels
    python -m fusedopt.kernels.codegen --precision  # the precision modes' variants

A variant is a :class:`~fusedopt.kernels.skeleton.Variant`; the constexprs it compiles with
come from :func:`~fusedopt.kernels.skeleton.constexprs`, the function the launches use.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedopt.kernels import algorithms as alg
from fusedopt.kernels import skeleton

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}


def _variant(algorithm: alg.Algorithm, states: tuple[str, ...], flags: dict[str, bool],
             amp: bool = False) -> tuple:
    values = tuple(flags.get(f, False) for f in algorithm.flags)
    return algorithm, states, values, amp


# name: every algorithm, and each shape of variant (number of states, flags, scalars, sums)
# at least once. "+amp": launched with GradScaler's grad_scale and found_inf and a clip
# coefficient.
VARIANTS = {
    "adamw": _variant(alg.ADAM, ("exp_avg", "exp_avg_sq"), {"decoupled_weight_decay": True}),
    "adam-amsgrad-maximize": _variant(alg.ADAM, alg.ADAM.states,
                                      {"amsgrad": True, "maximize": True}),
    "sgd-momentum-nesterov": _variant(alg.SGD, ("momentum_buffer",),
                                      {"has_momentum": True, "nesterov": True}),
    "sgd-plain-maximize": _variant(alg.SGD, (), {"maximize": True}),
    "adagrad": _variant(alg.ADAGRAD, ("sum",), {}),
    "adadelta": _variant(alg.ADADELTA, alg.ADADELTA.states, {}),
    "rmsprop-momentum-centered": _variant(alg.RMSPROP, alg.RMSPROP.states,
                                          {"has_momentum": True, "centered": True}),
    "rmsprop-centered": _variant(alg.RMSPROP, ("square_avg", "grad_avg"), {"centered": True}),
    "nadam-decoupled": _variant(alg.NADAM, alg.NADAM.states, {"decoupled_weight_decay": True}),
    "radam": _variant(alg.RADAM, alg.RADAM.states, {}),
    "adamax": _variant(alg.ADAMAX, alg.ADAMAX.states, {}),
    "lion": _variant(alg.LION, alg.LION.states, {}),
    "lamb": _variant(alg.LAMB, alg.LAMB.states, {"bias_correction": True}),
    "rprop": _variant(alg.RPROP, alg.RPROP.states, {}),
    "asgd-maximize": _variant(alg.ASGD, alg.ASGD.states, {"maximize": True}),
    "adamw+amp": _variant(alg.ADAM, ("exp_avg", "exp_avg_sq"),
                          {"decoupled_weight_decay": True}, amp=True),
    "lamb+amp": _variant(alg.LAMB, alg.LAMB.states, {"bias_correction": True}, amp=True),
}


def variant(name: str, dtype: str = "fp32") -> skeleton.Variant:
    """VARIANTS[name] in ``dtype`` storage."""
    algorithm, states, flags, amp = VARIANTS[name]
    return skeleton.Variant(algorithm, states, flags, DTYPES[dtype], unscale=amp,
                            skip_on_inf=amp, clip=amp)


def compile_variant(v: skeleton.Variant, kernel: str = "step", arch: int = 90):
    """``multi_tensor_step`` (kernel="step") or ``multi_tensor_sums`` (kernel="sums", for an
    algorithm with sums) of ``v``, compiled for sm_<arch> with the options a launch ends up
    with (:class:`~fusedopt.kernels.skeleton.Prepared`: the register cap where the plain
    build needs it and the capped one does not spill): triton's compiled kernel, with
    ``.asm`` (ptx, cubin, ...)."""
    compiled = _compile(v, kernel, arch, skeleton.LAUNCH_OPTIONS)
    usage = resource_usage(compiled.asm["cubin"])
    if not skeleton.needs_cap(usage["REG"], usage["spills"]):
        return compiled
    capped = _compile(v, kernel, arch, skeleton.CAPPED_OPTIONS)
    return capped if skeleton.keep_cap(resource_usage(capped.asm["cubin"])["spills"]) else compiled


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``cuobjdump -res-usage`` of a one-kernel cubin: REG, STACK, SHARED, LOCAL (bytes but
    REG), and ``spills``: STACK + LOCAL in 4-byte words, as triton's ``n_spills`` counts
    them (these kernels have a stack frame only to spill to)."""
    import os
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                              check=True, timeout=300).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    usage["spills"] = (usage.get("STACK", 0) + usage.get("LOCAL", 0)) // 4
    return usage


def _compile(v: skeleton.Variant, kernel: str, arch: int, options: dict):
    opmath = "*fp64" if v.compute == torch.float64 else "*fp32"
    signature = {"tensors": "*i64", "num_tensors": "i64", "work": "*i64", "hyper": "*fp64",
                 "hyper_stride": "i64"}
    if kernel == "sums":
        fn = skeleton.multi_tensor_sums
        signature["sums"] = opmath
    else:
        fn = skeleton.multi_tensor_step
        signature.update(done_counts="*i32", sums=opmath if v.algorithm.sums else "*i32")
    signature.update(grad_scale="*fp32", found_inf="*fp32", clip_coef=opmath)
    if kernel == "step":
        signature["rng"] = "*i64"
    signature["codes"] = "*fp32"
    constexprs = skeleton.constexprs(v, kernel)
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=fn, signature=signature, constexprs={
        (fn.arg_names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(options))


def _compile_kernel(fn, pointers: dict[str, str], constexprs: dict, arch: int):
    signature = {name: pointers.get(name, "i32") for name in fn.arg_names
                 if name not in constexprs}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=fn, signature=signature, constexprs={
        (fn.arg_names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(skeleton.LAUNCH_OPTIONS))


def other_kernels(dtype: str) -> dict[str, tuple]:
    """The kernels besides the skeleton's, each as (jit function, pointer types, constexprs)
    in one configuration per shape of its code: the tile kernels of Adafactor (factored and
    vector buckets) and Muon (Nesterov or not, bf16's buffer normalisation), and the sparse
    rows kernel with SparseAdam's, Adagrad's and plain SGD's updates. AMP on, as GradScaler
    launches them (its branches are the ones with more code)."""
    from fusedopt.kernels import sparse, tiles

    torch_dtype = DTYPES[dtype]
    compute = torch.float64 if torch_dtype == torch.float64 else torch.float32
    opmath = "*fp64" if compute == torch.float64 else "*fp32"
    amp = {"UNSCALE": True, "SKIP_ON_INF": True, "CLIP": True}
    common = {**tiles.storage_and_compute(torch_dtype), "ROUND_BF16_BY_HAND": False,
              "TR": tiles.TILE_ROWS, "TC": tiles.TILE_COLS, **amp}
    pointers = {"tensors": "*i64", "work": "*i32", "hyper": "*fp64", "acc": opmath,
                "numels": "*i64", "norms": "*fp32", "lr_ratios": "*fp64",
                "clamped_norms": "*bf16", "grad_scale": "*fp32", "found_inf": "*fp32",
                "clip_coef": opmath}
    out = {}
    for factored in (True, False):
        kind = "factored" if factored else "vector"
        out[f"adafactor_sums/{kind}"] = (tiles.adafactor_sums, pointers,
                                         {**common, "FACTORED": factored})
        out[f"adafactor_norms/{kind}"] = (tiles.adafactor_norms, pointers,
                                          {**common, "FACTORED": factored, "MAXIMIZE": False})
        out[f"adafactor_apply/{kind}"] = (tiles.adafactor_apply, pointers,
                                          {**common, "FACTORED": factored, "MAXIMIZE": False})
    out["adafactor_factors"] = (tiles.adafactor_factors, pointers, common)
    for nesterov in (True, False):
        out[f"muon_momentum/{'nesterov' if nesterov else 'plain'}"] = (
            tiles.muon_momentum, pointers, {**common, "NESTEROV": nesterov})
    out["muon_apply"] = (tiles.muon_apply, pointers,
                         {**common, "NORMALISE_BUFFER": torch_dtype == torch.bfloat16})
    sparse_pointers = {"tensors": "*i64", "work": "*i64", "hyper": "*fp64",
                       "done_counts": "*i32", "grad_scale": "*fp32", "found_inf": "*fp32",
                       "clip_coef": opmath}
    for name, algorithm, states, flags in (
            ("sparse_adam", alg.SPARSE_ADAM, alg.SPARSE_ADAM.states, (False,)),
            ("adagrad", alg.ADAGRAD, alg.ADAGRAD.states, (False,)),
            ("sgd", alg.SGD, (), (False, False, False))):
        v = skeleton.Variant(algorithm, states, flags, torch_dtype)
        out[f"sparse_rows/{name}"] = (sparse.sparse_rows_step, sparse_pointers, {
            "UPDATE": skeleton.adapter(algorithm, "update", states),
            "ADVANCE": None, "FLAGS": flags, "NUM_STATES": len(states),
            "NUM_HYPER": len(algorithm.hyper), "NUM_SCALARS": len(algorithm.scalars),
            "USES_STEP": algorithm.uses_step, **amp,
            "STORAGE": skeleton._TL_DTYPES[v.dtype], "COMPUTE": skeleton._TL_DTYPES[compute],
            "ROUND_BF16_BY_HAND": False, "ROWS": sparse.ROWS, "COLS": sparse.COLS})
    return out


def other_kernels_usage(dtypes: list[str], arch: int = 90) -> dict[str, dict[str, int]]:
    """:func:`other_kernels` compiled for sm_<arch>: each one's :func:`resource_usage`."""
    report = {}
    for dtype in dtypes:
        for name, (fn, pointers, constexprs) in other_kernels(dtype).items():
            compiled = _compile_kernel(fn, pointers, constexprs, arch)
            report[f"{name}/{dtype}"] = resource_usage(compiled.asm["cubin"])
    return report


#: The precision modes (:class:`~fusedopt.kernels.variant.Precision`) compiled by
#: ``--precision``: (param dtype, state dtype or None, write).
PRECISION_MODES = {
    "bf16+master": ("bf16", None, "master"),
    "bf16+stochastic": ("bf16", None, "stochastic"),
    "bf16+kahan": ("bf16", None, "kahan"),
    "bf16+fp32-states": ("bf16", torch.float32, "nearest"),
    "fp32+bf16-states": ("fp32", torch.bfloat16, "nearest"),
    "fp32+8bit-states": ("fp32", torch.uint8, "nearest"),
    "bf16+master+8bit-states": ("bf16", torch.uint8, "master"),
}
PRECISION_VARIANTS = ("adamw", "adam-amsgrad-maximize", "sgd-momentum-nesterov", "lion",
                      "lamb", "adamw+amp")


def precision_variant(name: str, mode: str) -> skeleton.Variant:
    """VARIANTS[name] in precision mode PRECISION_MODES[mode]."""
    from fusedopt.kernels.variant import Precision

    dtype, state_dtype, write = PRECISION_MODES[mode]
    return dataclasses.replace(variant(name, dtype), precision=Precision(state_dtype, write))


def precision_usage(names: tuple[str, ...] = PRECISION_VARIANTS, arch: int = 90
                    ) -> dict[str, dict[str, int]]:
    """Each of ``names`` x PRECISION_MODES kernels (step; LAMB's sums too) compiled for
    sm_<arch> as launched: registers, spills and the 16-byte loads and stores of its PTX."""
    report = {}
    for name in names:
        for mode in PRECISION_MODES:
            v = precision_variant(name, mode)
            for kernel in ("step", "sums") if v.algorithm.sums else ("step",):
                compiled = compile_variant(v, kernel, arch)
                usage = resource_usage(compiled.asm["cubin"])
                key = f"{name}/{mode}" + ("" if kernel == "step" else "/sums")
                report[key] = {"regs": usage["REG"], "spills": usage["spills"],
                               **summarise(compiled.asm["ptx"])}
    return report


def compile_ptx(name: str, dtype: str, kernel: str = "step", arch: int = 90) -> str:
    """PTX of VARIANTS[name] in ``dtype``: that of the plain build (under the register cap
    the PTX is the same but for its ``.maxnreg`` line, so one compile is enough)."""
    return _compile(variant(name, dtype), kernel, arch, skeleton.LAUNCH_OPTIONS).asm["ptx"]


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
    if args[0] == "--others":  # the tile and sparse-row kernels: registers and spills
        usage = other_kernels_usage(args[1:] or ["fp32", "bf16", "fp64"])
        print(json.dumps({"triton": triton.__version__, "arch": "sm_90", "kernels": usage}))
        return
    if args[0] == "--precision":
        usage = precision_usage(tuple(args[1:]) or PRECISION_VARIANTS)
        print(json.dumps({"triton": triton.__version__, "arch": "sm_90", "kernels": usage}))
        return
    pairs = [tuple(a.split("/")) if "/" in a else (name, a)
             for a in args for name in (VARIANTS if "/" not in a else (None,))]
    report = {}
    for name, dtype in pairs:
        kernels = ("step", "sums") if VARIANTS[name][0].sums else ("step",)
        for kernel in kernels:
            key = f"{name}/{dtype}" if kernel == "step" else f"{name}/{kernel}/{dtype}"
            report[key] = summarise(compile_ptx(name, dtype, kernel))
    print(json.dumps({"triton": triton.__version__, "arch": "sm_90", "variants": report}))


if __name__ == "__main__":
    main()
