"""A static roofline of every kernel variant fusedopt can launch, from the compiler's output.

``fusedopt-bench static`` compiles each variant's kernels for a GPU target on this machine
(triton's compiler and ptxas run on the CPU; no GPU is needed), disassembles the cubin with
the ``cuobjdump`` triton ships, finds the kernel's aligned hot path in the SASS, counts what it
issues there, and turns the counts into a predicted share of the copy bandwidth on an H100
and an H200. It measures whatever the kernels are: nothing here knows how they are written.

Which variants
--------------
Every optimizer fusedopt exports that is a :class:`fusedopt.FusedOptimizer` (its *spec*) x its
variant flags (``--flags default``: the flags of its torch defaults; ``--flags all``: every
combination of ``algorithm.flags``, minus those the spec or torch rejects: the states come from
``spec._variant_states(flags)``, and each combination must be reachable from constructor
arguments, e.g. SGD's ``nesterov`` without ``momentum`` is refused by torch) x storage dtype
x AMP/clip (``--amp``: also the variant launched with GradScaler's ``grad_scale`` and
``found_inf`` and a clip coefficient) x the kernels the variant launches (``step``, plus
``sums`` for an algorithm with per-tensor sums: LAMB) x target architecture (``--arch``).

Compiling
---------
In a small pool of worker processes (``python -m fusedopt.perf.static --worker``), with
``TRITON_INTERPRET`` removed from their environment (the interpreter replaces
``@triton.jit`` functions, so nothing could compile under it). Each worker compiles with
:func:`fusedopt.kernels.codegen.compile_variant` (triton's cache, ``~/.triton/cache``, makes a
repeated variant fast), writes the cubin to a temporary file and reads ``cuobjdump -sass`` and
``cuobjdump -res-usage`` of it. ``regs`` is the register count of ``-res-usage``; ``spills``
its local memory per thread, stack frame included, in 4-byte words (as triton's ``n_spills``:
the driver's local bytes / 4; these kernels have a stack frame only to spill registers to),
and ``local_memory_ops`` the ``LDL``/``STL`` instructions that move them;
``smem`` the shared memory one program asks for (triton's dynamic ``metadata.shared`` plus the
static shared memory of ``-res-usage``).

Finding the aligned hot path in the SASS
----------------------------------------
The SASS is split into basic blocks (leaders: branch targets, the instruction after a branch,
``EXIT`` or ``RET``); a conditional ``BRA`` has two successors; a ``CALL`` is followed
through (its target, a subroutine, is reached from nowhere else in the graph and is shown as
``sub``). Dominators and post-dominators are computed on that graph. Then:

1. the *vector blocks* are those with an unpredicated 16-byte (or wider) global load or store
   (``LDG.E.128``, ``STG.E.128``, ``LDG.E.ENL2.256``...): the unmasked accesses of full,
   aligned chunks. Masked accesses are predicated, so a tail path that also uses 16-byte
   vectors is not mistaken for the hot path;
2. the **aligned branch** is the nearest block dominating every vector block that ends in a
   conditional branch of which one side reaches vector blocks and the other does not; the
   first side is the hot region's entry, the other the masked paths';
3. the **join** is the nearest block post-dominating every vector block: where the aligned
   path and the others meet again (then the finishing tail);
4. the **hot region** is every block reachable from its entry before the join. Inside it, a
   block that ``CALL``s a subroutine is a *cold* slow path (IEEE division and square root
   call one for denormal or huge operands) and is left out;
5. the **hot path** is the longest path from the entry to the join through the remaining
   blocks (longest: where the code forks on a value the SASS does not show, a
   hyperparameter such as weight decay being zero, the longer side is counted: an upper
   bound). A loop left in the region (a power-by-squaring loop over the step count, say) is
   counted ``LOOP_TRIPS`` times: the number of bits of ``STEP`` (1000 -> 10 trips), the trip
   count of such a loop at step 1000, and flagged ``LOOP`` (``loops_in_hot_path``).

A program handles ``BLOCK * ITERS`` elements (the kernel's own constexprs, which depend on the
dtype when the kernel sizes its blocks in 16-byte vectors) with ``32 * num_warps`` threads, so
each thread handles ``E = BLOCK * ITERS / (32 * num_warps)`` elements on the hot path. Every
per-element count below is a count along the hot path divided by ``E``.

The columns (one row per variant, kernel and arch; ``COLUMN_LEGEND`` says the same briefly)
-------------------------------------------------------------------------------------------
* ``vec16_loads_per_elem`` / ``vec16_stores_per_elem``: 16-byte global accesses on the hot
  path, counted in 16-byte units (a 32-byte access counts 2), per element, all tensors
  together: AdamW fp32 reads 4 tensors x 4 B = 16 B per element, 1.0 loads, and writes 3,
  0.75 stores; in bf16, 0.5 and 0.375.
* ``bytes_per_param``: bytes of every per-thread global access on the hot path (16 x the
  vector accesses plus any narrower access whose address differs between threads), per
  element. Loads from an address that is the same in every thread of a warp (a broadcast of a
  per-program value: a hyperparameter, ``step``) are not traffic per element and are left out
  (``uniform_load_bytes_per_elem``). Which addresses differ between threads is a dataflow
  analysis of the SASS: registers derived from ``SR_TID``/``SR_LANEID`` (through arithmetic,
  loads from such addresses, shuffles) are per-thread; uniform registers never are.
  ``bytes_model_bytes_per_param`` is :func:`fusedopt.perf.bytes_model.bytes_per_param` of the
  same optimizer, options and dtype (for the ``sums`` kernel, which only reads:
  :func:`~fusedopt.perf.bytes_model.resident_bytes_per_param`, the reads of the same
  tensors). They should be equal; the ``check`` column says ``BYTES`` where they are not.
* ``instr_per_elem``: SASS instructions on the hot path per element per thread, every
  instruction counted once per issue (uniform-datapath and control instructions included).
  ``instr_per_elem_program`` adds the instructions a program issues outside the hot region
  (reading the table, the per-tensor scalars, the finishing tail; longest paths likewise).
* ``hyper_loads_in_loop``: global loads from warp-uniform addresses (the hyperparameter table,
  ``step``, per-tensor scalars) issued on the hot path after its first store (in a kernel whose
  hot path stores nothing, after its first vector load): loads the compiler could not hoist
  because it could not prove the stores miss them. ``scalar_loads_in_loop``: every global
  load narrower than 16 bytes anywhere on the hot path.
* ``inflight_kb_per_sm``: the bytes of 16-byte loads the hot path issues before its first
  store (in a kernel that stores nothing on it: before the first instruction that reads a
  vector load's result), per thread, x ``32 * num_warps`` threads x ``ctas_per_sm`` programs
  resident per SM, in KB (1 KB = 1024 bytes). ``inflight_kb_per_sm_first_use`` counts up to
  the first use of a loaded value instead: what is in flight when the first warp stalls.
* ``ctas_per_sm``: programs resident per SM, the least of: registers (per-thread count rounded
  up to a multiple of 8, as the hardware allocates 256 per warp; 65,536 per SM), threads
  (2,048 per SM), programs (32 per SM), shared memory (``smem`` + 1 KB the driver reserves per
  program, out of 228 KB per SM on sm_90 and sm_100, 164 KB on sm_80).
* ``shared_memory_ops``: shared-memory instructions (``LDS``, ``STS``, ``LDSM``, ``STSM``,
  ``ATOMS``, ``LDGSTS``) anywhere in the kernel, with where they are; ``fences_atomics``:
  ``MEMBAR``, ``FENCE``, ``ERRBAR``, ``CCTL``, ``ATOM``, ``ATOMG``, ``RED``, ``REDG``, with
  where. The places (``*_where``): ``pre`` (before the aligned branch), ``hot`` (the hot
  region), ``cold`` (its slow paths), ``masked`` (the other element paths: tails, unaligned
  storage), ``post`` (after the join: the finishing tail), ``sub`` (called subroutines).
  Only ``post`` should hold atomics and fences; a ``sums`` kernel's ``post`` may use shared
  memory for its block reduction.

The prediction (``predicted_pct_h100``, ``predicted_pct_h200``; sm_90 rows only)
--------------------------------------------------------------------------------
The share of the *copy* bandwidth (what a device-to-device copy reaches; the H100 prototype
reached 94-99% of it, torch's fused AdamW 83-87%) the hot path can sustain, as the least of
two bounds, each capped at 100%:

(a) **memory-level parallelism**: ``inflight_kb_per_sm / needed_kb_per_sm``, where by Little's
    law ``needed = bandwidth x loaded DRAM latency / SMs``. H100 SXM: 3.35 TB/s HBM3, 132
    SMs; H200: 4.8 TB/s HBM3e, 132 SMs; a latency under full load of ``DRAM_LATENCY_NS`` =
    1,600 ns (about 2,800 cycles at 1.75 GHz: unloaded HBM latency is ~600-800 ns and grows
    under load) gives 39.7 KB per SM on an H100 and 56.8 KB on an H200, the 40-64 KB of reads
    in flight per SM this project's notes give for HBM3. The model counts all traffic as if
    it were reads (stores need no reply before the warp moves on): a conservative bound.
(b) **instruction issue**: at full bandwidth the SMs must issue ``instr_per_elem x
    bandwidth / bytes_per_param`` thread-instructions per second; they can issue ``132 SMs x
    128 thread-instructions per clock`` (4 schedulers x 1 warp-instruction of 32 threads)
    ``x 1.75 GHz``. The ratio of available to needed bounds the share. This assumes a
    perfect issue rate: no pipe is busier than one instruction per scheduler per clock
    (MUFU and fp64 run at lower rates; ``mufu_per_elem`` and ``fp64_per_elem`` are in the
    JSON for that reason).

``predicted_pct_*`` = 100 x min(a, b); ``limit`` names the binding bound (``mlp`` or
``issue``; ``-`` when neither binds). Rows of other archs get the same model for that arch's
reference GPU in ``predicted_pct`` / ``gpu`` (A100 SXM for sm_80, B200 for sm_100).

Outputs (``--out DIR``): ``static.json`` (metadata: versions, archs, the kernel's BLOCK /
ITERS / NUM_WARPS and elements per program per dtype, the model's constants; then one object
per row), ``static.csv``, ``static.png`` and ``sass/<variant>-<kernel>-<dtype>-sm<arch>.sass``:
the disassembly, each instruction tagged with its place and ``*`` where the hot path counts it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------
# Constants: what runs by default, and the model
# ---------------------------------------------------------------------------

#: ``fusedopt-bench static`` with no options: every optimizer, its default flags, these
#: dtypes, no AMP, this arch.
DEFAULT_DTYPES = ("fp32", "bf16")
DEFAULT_ARCHS = (90,)
DEFAULT_FLAGS = "default"
#: What the bare CPU run of ``fusedopt-bench`` compiles (its static section): a few variants
#: that cover one, two and no adaptive states, so that the whole run stays under two minutes
#: on a 2-core machine with a cold compiler cache. ``fusedopt-bench static`` does them all.
BARE_RUN_OPTIMIZERS = ("AdamW", "SGD:momentum=0.9", "Lion")
BARE_RUN_QUICK_OPTIMIZERS = ("AdamW",)
BARE_RUN_QUICK_DTYPES = ("fp32",)
ALL_DTYPES = ("fp32", "bf16", "fp16", "fp64")
#: Targets: sm_80 (A100), sm_90 (H100/H200), sm_100 (B200), where the installed triton's
#: ptxas can build them (:func:`supported_archs`).
KNOWN_ARCHS = (80, 90, 100)
#: Worker processes that compile (each compile keeps one core busy).
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))

#: Per-thread instructions of a loop left on the hot path are counted this many times: the
#: bits of the step count at STEP (a power-by-squaring loop over ``step`` runs that often).
STEP = 1000
LOOP_TRIPS = STEP.bit_length()


@dataclass(frozen=True)
class SmLimits:
    """What bounds the programs resident on one SM of an architecture."""

    regs: int = 65536
    threads: int = 2048
    ctas: int = 32
    smem_kb: int = 228
    reserved_smem_per_cta: int = 1024
    reg_unit: int = 8  # registers per thread are allocated in multiples of this (256 per warp)


ARCH_LIMITS = {80: SmLimits(smem_kb=164), 90: SmLimits(), 100: SmLimits()}


@dataclass(frozen=True)
class Gpu:
    """A GPU of the model: HBM bandwidth, SMs and the SM clock under a memory-bound load."""

    name: str
    bandwidth: float  # bytes/s
    sms: int
    clock_hz: float

    def needed_kb_per_sm(self, latency_s: float) -> float:
        """Little's law: bytes in flight per SM to cover ``latency_s`` at full bandwidth."""
        return self.bandwidth * latency_s / self.sms / 1024


H100 = Gpu("H100 SXM", 3.35e12, 132, 1.75e9)
H200 = Gpu("H200", 4.8e12, 132, 1.75e9)
#: The reference GPU of each arch, for the ``predicted_pct`` column of its rows.
ARCH_GPU = {80: Gpu("A100 SXM 80GB", 2.04e12, 108, 1.41e9), 90: H100,
            100: Gpu("B200", 8.0e12, 148, 1.85e9)}
#: DRAM latency under full load assumed by the memory-level-parallelism bound.
DRAM_LATENCY_NS = 1600.0
#: Thread-instructions one SM issues per clock: 4 schedulers x one 32-thread warp-instruction.
ISSUE_PER_SM_PER_CLOCK = 128

_NEEDED_H100 = H100.needed_kb_per_sm(DRAM_LATENCY_NS * 1e-9)
_NEEDED_H200 = H200.needed_kb_per_sm(DRAM_LATENCY_NS * 1e-9)

#: static.json / static.csv fields, in order: the named ones first.
FIELDS = [
    "variant", "arch", "regs", "spills", "smem", "ctas_per_sm", "vec16_loads_per_elem",
    "vec16_stores_per_elem", "bytes_per_param", "instr_per_elem", "hyper_loads_in_loop",
    "inflight_kb_per_sm", "predicted_pct_h100", "predicted_pct_h200",
    # more
    "optimizer", "flags", "states", "dtype", "amp", "kernel", "status", "error", "register_cap",
    "bytes_model_bytes_per_param", "bytes_match", "uniform_load_bytes_per_elem",
    "narrow_element_accesses", "scalar_loads_in_loop", "instr_per_elem_program",
    "inflight_kb_per_sm_first_use", "loops_in_hot_path", "forks_in_hot_path",
    "cold_blocks_in_hot_region", "shared_memory_ops", "shared_memory_ops_where",
    "fences_atomics", "fences_atomics_where", "barriers", "barriers_where", "local_memory_ops",
    "mufu_per_elem", "fp64_per_elem", "elements_per_thread", "threads_per_program",
    "vector_bytes_in_flight_per_thread", "limit", "gpu", "predicted_pct", "hot_region",
    "sass_instructions", "findings", "sass_file", "compile_s",
]  # fmt: skip
NAMED_FIELDS = FIELDS[:14]

#: What each column of the printed table means (the legend under it).
COLUMN_LEGEND = {
    "variant": "optimizer, '+flag' / '+no_flag' where a variant flag differs from its torch "
               "defaults, '+amp' = launched with GradScaler's grad_scale and found_inf and a "
               "clip coefficient",
    "dtype": "storage dtype of params, grads and states",
    "kernel": "step = the update launch; sums = the read-only launch before it (LAMB's norms)",
    "sm": "target architecture the kernel was compiled for",
    "regs": "registers per thread (cuobjdump -res-usage); '*' = compiled under the register "
            "cap (maxnreg 96), which a launch takes where the plain build uses more than 96 "
            "registers or spills, unless the capped one spills",
    "spill": "local memory per thread (stack frame included) in 4-byte words: register "
             "spills; should be 0",
    "smem": "shared memory per program in bytes (triton's dynamic + static)",
    "CTA/SM": "programs resident per SM: the least of registers (65,536 per SM, allocated in "
              "multiples of 8 per thread), 2,048 threads, 32 programs and shared memory",
    "ld16": "16-byte global loads on the aligned hot path per element, all tensors "
            "together (AdamW fp32: 4 tensors x 4 B / 16 B = 1.0)",
    "st16": "16-byte global stores on the hot path per element (AdamW fp32: 0.75)",
    "B/el": "bytes per element of every per-thread global access on the hot path; "
            "'x/y' = x from the SASS differs from y of the bytes model (fusedopt-bench --list)",
    "instr": "SASS instructions on the hot path per element per thread (slow-path calls left "
             "out; where the code forks on a hyperparameter the longer side counted)",
    "reload": "hyperparameter/scalar loads (warp-uniform addresses) on the hot path after its "
              "first store: values the compiler reloads because the stores might have changed "
              "them; should be 0",
    "narrow": "global loads narrower than 16 bytes anywhere on the hot path",
    "KB/SM": "bytes of 16-byte loads issued before the first store, per thread x threads x "
             "CTA/SM, in KB: the reads in flight per SM",
    "shm": "shared-memory instructions anywhere in the kernel (a sums kernel's block "
           "reduction may use some after its hot path)",
    "fence": "atomics and fences (ATOM/RED/MEMBAR/ERRBAR/CCTL), with where: post = the "
             "finishing tail after the paths join, which is the only place for them",
    "%H100": "predicted % of the copy bandwidth on an H100 SXM: min(reads in flight / "
             f"{_NEEDED_H100:.1f} KB, instruction issue available / needed); sm_90 rows only",
    "%H200": f"the same on an H200 ({_NEEDED_H200:.1f} KB needed in flight per SM, "
             f"{H200.bandwidth / 1e12:g} TB/s)",
    "%own": "the same model on the reference GPU of the row's arch: A100 SXM 80GB for sm_80 "
            "(2.04 TB/s, 108 SMs, 1.41 GHz), H100 SXM for sm_90, B200 for sm_100 (8 TB/s, 148 "
            "SMs, 1.85 GHz); shown when an arch other than sm_90 is in the table",
    "limit": "the bound that sets the prediction (on the H100 for sm_90 rows, else on the "
             "row's own GPU): mlp (reads in flight), issue, or - (neither binds)",
    "check": "ok, or what the SASS shows that a roofline kernel would not have: SPILL, SMEM "
             "(shared-memory traffic on an element path), RELOAD (reloads after stores), BYTES "
             "(SASS bytes differ from the bytes model), NARROW (narrower per-element accesses "
             "on the hot path), ATOMIC (atomics or fences outside the finishing tail), LOOP (a "
             "loop on the hot path, counted at step 1000), or error",
}


# ---------------------------------------------------------------------------
# Which variants
# ---------------------------------------------------------------------------


@dataclass
class StaticJob:
    """One kernel of one variant for one arch: what a worker compiles."""

    optimizer: str
    variant: str  # the optimizer with its flag differences and +amp
    algorithm: str
    flags: dict[str, bool]
    states: tuple[str, ...]
    dtype: str
    amp: bool
    kernel: str
    arch: int
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``<variant>-<kernel>-<dtype>-sm<arch>``: the SASS file's name."""
        return f"{self.variant}-{self.kernel}-{self.dtype}-sm{self.arch}"

    @property
    def label(self) -> str:
        return f"{self.variant} {self.kernel} {self.dtype} sm_{self.arch}"

    def wire(self) -> dict[str, Any]:
        """What the worker needs to rebuild the variant."""
        return {"key": self.key, "algorithm": self.algorithm, "states": list(self.states),
                "flags": list(self.flags.values()), "dtype": self.dtype, "amp": self.amp,
                "kernel": self.kernel, "arch": self.arch}


def optimizer_specs() -> dict[str, type]:
    """fusedopt's element-wise optimizers, by name (:func:`bytes_model.element_wise_specs`):
    the skeleton's kernels, which this model reads."""
    from .bytes_model import element_wise_specs

    return element_wise_specs()


#: A variant flag that is not a constructor argument of the same name: the argument and the
#: values that turn it on and off (SGD's and RMSprop's ``has_momentum`` is ``momentum != 0``).
FLAG_ARGUMENTS = {"has_momentum": ("momentum", 0.9, 0.0)}


def _build(cls: type, hparams: dict[str, Any]):
    import torch

    return cls([torch.zeros(1)], **hparams, backend="reference")


def _hparams_for(cls: type, flags: dict[str, bool], defaults: dict[str, bool]) -> dict[str, Any]:
    """Constructor arguments that give ``flags``: each flag that differs from the defaults set
    through its argument (FLAG_ARGUMENTS, else the argument of the flag's name)."""
    hparams: dict[str, Any] = {}
    for name, value in flags.items():
        if value == defaults.get(name):
            continue
        arg, on, off = FLAG_ARGUMENTS.get(name, (name, True, False))
        hparams[arg] = on if value else off
    return hparams


def _name(optimizer: str, flags: dict[str, bool], defaults: dict[str, bool], amp: bool) -> str:
    diff = [f if v else f"no_{f}" for f, v in flags.items() if v != defaults.get(f)]
    return "+".join([optimizer, *diff, *(["amp"] if amp else [])])


def split_optimizers(values: Iterable[str] | None) -> list[str] | None:
    """``--optimizers`` items, also comma-separated: ``AdamW,SGD:momentum=0.9,nesterov=True``
    is AdamW and ``SGD:momentum=0.9,nesterov=True`` (a ``k=v`` piece belongs to the name
    before it)."""
    if values is None:
        return None
    out: list[str] = []
    for piece in (p.strip() for v in values for p in v.split(",")):
        if not piece:
            continue
        if out and "=" in piece and ":" not in piece:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def parse_optimizer(text: str) -> tuple[str, dict[str, Any]]:
    """``Name`` or ``Name:k=v,...`` (as ``fusedopt-bench --optimizers``); case-insensitive."""
    from .impls import OptSpec

    spec = OptSpec.parse(text)
    return spec.name, dict(spec.overrides)


def enumerate_jobs(optimizers: Iterable[str] | None = None,
                   dtypes: Iterable[str] = DEFAULT_DTYPES, flags: str = DEFAULT_FLAGS,
                   amp: bool = False, archs: Iterable[int] = DEFAULT_ARCHS,
                   ) -> tuple[list[StaticJob], list[dict[str, str]]]:
    """The jobs to compile, and the flag combinations skipped (with why), in a cache-friendly
    order (one variant's kernels, dtypes and archs together). ``optimizers``: names, or
    ``Name:k=v`` for one variant of explicit options (then ``flags`` is not used for it);
    None = every spec. ``flags``: "default" or "all". ``amp``: also the AMP/clip variant."""
    from .bytes_model import canonical_dtype

    specs = optimizer_specs()
    names = list(optimizers) if optimizers else list(specs)
    dtypes = [canonical_dtype(d) for d in dtypes]
    jobs: list[StaticJob] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    for text in names:
        optimizer, explicit = parse_optimizer(text)
        cls = specs.get(optimizer)
        if cls is None:
            from .workloads import UnknownNameError

            raise UnknownNameError("optimizer", optimizer, list(specs))
        base = _build(cls, {})
        defaults = base._group_flags(base.param_groups[0])
        alg = cls.algorithm
        if ":" in text:
            opt = _build(cls, explicit)
            combos = [opt._group_flags(opt.param_groups[0])]
        elif flags == "all":
            combos = [dict(zip(alg.flags, bits))
                      for bits in _product(len(alg.flags))]  # fmt: skip
        else:
            combos = [defaults]
        for combo in combos:
            label = _name(optimizer, combo, defaults, False)
            try:
                states = tuple(base._variant_states(combo))
            except Exception as err:  # noqa: BLE001 - a combination the spec refuses
                skipped.append({"variant": label, "reason": f"the spec refuses it: {err}"})
                continue
            hparams = explicit if ":" in text else _hparams_for(cls, combo, defaults)
            try:
                opt = _build(cls, hparams)
                got = opt._group_flags(opt.param_groups[0])
            except Exception as err:  # noqa: BLE001 - torch's own argument checks
                skipped.append({"variant": label, "reason": f"{optimizer}({_kwargs(hparams)}) "
                                f"is refused: {str(err).splitlines()[0][:200]}"})
                continue
            if got != combo:
                skipped.append({"variant": label, "reason": f"{optimizer}({_kwargs(hparams)}) "
                                f"gives other flags: {got}"})
                continue
            for with_amp in (False, True) if amp else (False,):
                variant = _name(optimizer, combo, defaults, with_amp)
                for kernel in ("sums", "step") if alg.sums else ("step",):
                    for dtype in dtypes:
                        for arch in archs:
                            job = StaticJob(optimizer, variant, alg.name, combo, states, dtype,
                                            with_amp, kernel, int(arch), hparams)
                            if job.key not in seen:
                                seen.add(job.key)
                                jobs.append(job)
    return jobs, skipped


def _product(n: int) -> list[tuple[bool, ...]]:
    return [tuple(bool(i >> (n - 1 - b) & 1) for b in range(n)) for i in range(2 ** n)]


def _kwargs(hparams: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in hparams.items())


def bytes_model(job: StaticJob) -> int:
    """The bytes model's bytes per element for this kernel: the whole step's minimum traffic
    for ``step``, the reads of the same tensors for ``sums``."""
    from . import bytes_model as bm

    if job.kernel == "sums":
        return bm.resident_bytes_per_param(job.optimizer, job.dtype, job.hparams)
    return bm.bytes_per_param(job.optimizer, job.dtype, job.hparams)


# ---------------------------------------------------------------------------
# SASS: instructions, basic blocks, dominators
# ---------------------------------------------------------------------------

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GUARD = re.compile(r"^@(!?)(U?P[0-6T])\s+")
_REG = re.compile(r"(?<![A-Za-z0-9_])(UR\d+|URZ|UP\d|UPT|R\d+|RZ|P\d|PT)(\.64|\.128)?(?![0-9])")
_PRED = re.compile(r"^!?U?P[0-6T]$")

GLOBAL_LOADS = {"LDG", "LD"}
GLOBAL_STORES = {"STG", "ST"}
ATOMICS = {"ATOM", "ATOMG", "RED", "REDG"}
FENCES = {"MEMBAR", "FENCE", "ERRBAR", "CCTL"}
SHARED = {"LDS", "STS", "LDSM", "STSM", "ATOMS", "LDGSTS"}
LOCAL = {"LDL", "STL"}
BARRIERS = {"BAR"}
MUFU = {"MUFU"}
_NO_DEST = GLOBAL_STORES | {"STS", "STL", "STSM", "RED", "REDG", "BAR", "BRA", "BRX", "JMP",
                            "JMX", "EXIT", "CALL", "RET", "BSSY", "BSYNC", "MEMBAR", "FENCE",
                            "ERRBAR", "CCTL", "NOP", "WARPSYNC", "DEPBAR", "BREAK", "KILL",
                            "YIELD", "BPT", "NANOSLEEP", "ARRIVES", "SYNCS"}  # fmt: skip


@dataclass
class Instr:
    """One SASS instruction."""

    index: int
    addr: int
    text: str
    guard: str | None  # "P0", "!P0", "UP1"...; None when unpredicated (or @PT)
    op: str
    operands: list[str]

    @functools.cached_property
    def base(self) -> str:
        return self.op.split(".", 1)[0]

    @functools.cached_property
    def parts(self) -> list[str]:
        return self.op.split(".")

    def width(self) -> int:
        """Bytes one thread moves with this memory instruction."""
        parts = set(self.parts[1:])
        for token, size in (("256", 32), ("128", 16), ("64", 8), ("U16", 2), ("S16", 2),
                            ("U8", 1), ("S8", 1)):
            if token in parts:
                return size
        return 4

    @property
    def is_global_load(self) -> bool:
        return self.base in GLOBAL_LOADS

    @property
    def is_global_store(self) -> bool:
        return self.base in GLOBAL_STORES

    @property
    def is_vector(self) -> bool:
        """A 16-byte (or wider) global load or store."""
        return (self.is_global_load or self.is_global_store) and self.width() >= 16

    def target(self) -> int | None:
        if self.operands and re.fullmatch(r"0x[0-9a-f]+", self.operands[-1]):
            return int(self.operands[-1], 16)
        return None


def parse_sass(text: str) -> list[Instr]:
    """The instructions of ``cuobjdump -sass`` (or nvdisasm) output, in address order; the
    encoding lines are ignored."""
    out: list[Instr] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        guard = None
        g = _GUARD.match(body)
        if g:
            guard = None if g.group(2) in ("PT", "UPT") and not g.group(1) else \
                g.group(1) + g.group(2)
            body = body[g.end():]
        op, _, rest = body.partition(" ")
        operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
        out.append(Instr(len(out), int(m.group(1), 16), m.group(2).strip(), guard, op,
                         operands))
    return out


@dataclass
class Block:
    """A basic block: instructions ``[start, end)`` of the instruction list."""

    id: int
    start: int
    end: int
    succs: list[int] = field(default_factory=list)
    preds: list[int] = field(default_factory=list)


class Cfg:
    """Basic blocks, their edges, and (post-)dominators of the blocks reachable from entry."""

    EXIT = -1

    def __init__(self, instrs: list[Instr]):
        self.instrs = instrs
        by_addr = {ins.addr: ins.index for ins in instrs}
        leaders = {0}
        for ins in instrs:
            if ins.base in ("BRA", "CALL") and ins.target() in by_addr:
                leaders.add(by_addr[ins.target()])
            if ins.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL"):
                leaders.add(ins.index + 1)
        starts = sorted(s for s in leaders if s < len(instrs))
        self.blocks = [Block(i, s, e) for i, (s, e) in
                       enumerate(zip(starts, [*starts[1:], len(instrs)]))]
        self.block_of = [0] * len(instrs)
        for b in self.blocks:
            for i in range(b.start, b.end):
                self.block_of[i] = b.id
        self.call_targets: set[int] = set()
        for b in self.blocks:
            last = instrs[b.end - 1]
            fall = b.id + 1 if b.id + 1 < len(self.blocks) else None
            target = last.target()
            conditional = last.guard is not None or len(last.operands) > 1
            succs: list[int] = []
            if last.base == "BRA" and target in by_addr:
                succs.append(self.block_of[by_addr[target]])
                if conditional and fall is not None:
                    succs.append(fall)
            elif last.base in ("EXIT", "RET", "KILL", "BRX", "JMX", "JMP"):
                if last.guard is not None and fall is not None:
                    succs.append(fall)
            elif fall is not None:
                succs.append(fall)
            b.succs = list(dict.fromkeys(succs))
            for i in range(b.start, b.end):
                if instrs[i].base == "CALL" and instrs[i].target() in by_addr:
                    self.call_targets.add(self.block_of[by_addr[instrs[i].target()]])
        for b in self.blocks:
            for s in b.succs:
                self.blocks[s].preds.append(b.id)
        self.reachable = self._reach([0])
        self.idom = self._dominators(0, lambda b: self.blocks[b].succs,
                                     lambda b: self.blocks[b].preds, self.reachable)
        self.ipdom = self._post_dominators()

    def instructions(self, block: int) -> list[Instr]:
        b = self.blocks[block]
        return self.instrs[b.start:b.end]

    def _reach(self, roots: Iterable[int], stop: set[int] | None = None) -> set[int]:
        seen: set[int] = set()
        todo = [r for r in roots if r not in (stop or set())]
        while todo:
            b = todo.pop()
            if b in seen:
                continue
            seen.add(b)
            todo += [s for s in self.blocks[b].succs if s not in seen and s not in (stop or ())]
        return seen

    def ancestors(self, block: int) -> set[int]:
        """``block`` and the reachable blocks from which it can be reached."""
        seen = {block}
        todo = [block]
        while todo:
            for p in self.blocks[todo.pop()].preds:
                if p not in seen and p in self.reachable:
                    seen.add(p)
                    todo.append(p)
        return seen

    def reaches(self, root: int, targets: set[int]) -> bool:
        return bool(self._reach([root]) & targets)

    @staticmethod
    def _dominators(root: int, succs: Callable, preds: Callable, nodes: set[int]) -> dict:
        """Immediate dominators (Cooper, Harvey and Kennedy) of ``nodes`` from ``root``."""
        order: list[int] = []
        seen = {root}
        stack = [(root, iter(succs(root)))]
        while stack:
            node, it = stack[-1]
            nxt = next((s for s in it if s in nodes and s not in seen), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(succs(nxt))))
        rpo = order[::-1]
        number = {n: i for i, n in enumerate(rpo)}
        idom = {root: root}
        changed = True
        while changed:
            changed = False
            for n in rpo[1:]:
                done = [p for p in preds(n) if p in idom]
                if not done:
                    continue
                new = done[0]
                for p in done[1:]:
                    a, b = p, new
                    while a != b:
                        while number[a] > number[b]:
                            a = idom[a]
                        while number[b] > number[a]:
                            b = idom[b]
                    new = a
                if idom.get(n) != new:
                    idom[n] = new
                    changed = True
        return idom

    def _post_dominators(self) -> dict:
        exit_ = self.EXIT
        nodes = set(self.reachable)
        rsucc: dict[int, list[int]] = {exit_: []}  # reversed edges: exit -> exits, ...
        to_exit = [b for b in nodes if not self.blocks[b].succs]
        rsucc[exit_] = list(to_exit)
        for b in nodes:
            rsucc.setdefault(b, [])
            for s in self.blocks[b].succs:
                if s in nodes:
                    rsucc.setdefault(s, []).append(b)
        # blocks that never reach an exit (a trap loop) are tied to it, so every block has one
        reach_exit = set()
        todo = [exit_]
        while todo:
            n = todo.pop()
            if n in reach_exit:
                continue
            reach_exit.add(n)
            todo += rsucc.get(n, [])
        for b in sorted(nodes - reach_exit):
            rsucc[exit_].append(b)
        rpred = {n: [] for n in rsucc}
        for n, ss in rsucc.items():
            for s in ss:
                rpred[s].append(n)
        return self._dominators(exit_, lambda n: rsucc.get(n, []), lambda n: rpred.get(n, []),
                                nodes | {exit_})

    @staticmethod
    def common(tree: dict, nodes: Iterable[int]) -> int | None:
        """The nearest common ancestor of ``nodes`` in a dominator tree."""
        result = None
        for n in nodes:
            if result is None:
                result = n
                continue
            ancestors = set()
            a = result
            while True:
                ancestors.add(a)
                if tree.get(a, a) == a:
                    break
                a = tree[a]
            b = n
            while b not in ancestors:
                if tree.get(b, b) == b:
                    return None
                b = tree[b]
            result = b
        return result

    def dominator_chain(self, block: int) -> list[int]:
        chain = [block]
        while self.idom.get(chain[-1], chain[-1]) != chain[-1]:
            chain.append(self.idom[chain[-1]])
        return chain


# ---------------------------------------------------------------------------
# Which values differ between the threads of a warp
# ---------------------------------------------------------------------------


def _regs_in(operand: str) -> list[str]:
    """Registers an operand names, a ``.64`` pair as both halves (R6.64: R6, R7)."""
    out = []
    for name, wide in _REG.findall(operand):
        if name in ("RZ", "URZ", "PT", "UPT"):
            continue
        n = {".64": 2, ".128": 4}.get(wide, 1)
        if n > 1 and name.startswith("R"):
            out += [f"R{int(name[1:]) + i}" for i in range(n)]
        else:
            out.append(name)
    return out


def _dest_width(ins: Instr) -> int:
    parts = ins.parts
    if ins.base in GLOBAL_LOADS | LOCAL | ATOMICS | {"LDS", "LDC", "ATOMS", "LDSM", "SHFL"}:
        if ins.base == "LDSM":
            return int(parts[-1]) if parts[-1].isdigit() else 1
        return max(1, ins.width() // 4)
    if ins.base in ("DADD", "DMUL", "DFMA", "DMNMX", "DMMA") or ins.op.startswith("IMAD.WIDE"):
        return 2
    if ins.base in ("F2F", "I2F", "F2I", "I2I", "F2FP") and len(parts) > 1:
        return 2 if parts[1] in ("F64", "S64", "U64") else 1
    if ins.base == "CS2R":
        return 1 if "32" in parts else 2
    if ins.base == "MOV" and "64" in parts:
        return 2
    return 1


def _wide_sources(ins: Instr) -> bool:
    """Whether the register sources of ``ins`` are 64-bit pairs (fp64 math, conversions
    from a 64-bit type)."""
    if ins.base in ("DADD", "DMUL", "DFMA", "DMNMX", "DSETP"):
        return True
    return ins.base in ("F2F", "F2I", "I2F", "I2I") and ins.parts[-1] in ("F64", "S64", "U64")


def _dests_and_sources(ins: Instr) -> tuple[list[str], list[str]]:
    """Registers written and read (predicates included; uniform registers too)."""
    if ins.base in _NO_DEST or not ins.operands:
        return [], [r for o in ins.operands for r in _regs_in(o)]
    ops = ins.operands
    n_dest = 1
    limit = 2 if ins.base == "PLOP3" else len(ops)
    while n_dest < min(limit, len(ops)) and _PRED.match(ops[n_dest]):
        n_dest += 1
    dests: list[str] = []
    for k, o in enumerate(ops[:n_dest]):
        regs = _regs_in(o)
        if k == 0 and len(regs) == 1 and regs[0].startswith("R"):
            first = int(regs[0][1:])
            regs = [f"R{first + i}" for i in range(_dest_width(ins))]
        dests += regs
    sources = []
    wide = _wide_sources(ins)
    for o in ops[n_dest:]:
        for r in _regs_in(o):
            sources.append(r)
            if wide and r.startswith("R") and ".64" not in o:
                sources.append(f"R{int(r[1:]) + 1}")
    return dests, sources


def _address_regs(ins: Instr) -> list[str]:
    """The registers of a memory instruction's address (its last ``[...]``)."""
    for o in ins.operands:
        if "[" in o:
            inner = o[o.rindex("[") + 1: o.rindex("]")] if "]" in o else o
            return [r for r in _regs_in(inner) if r.startswith("R")]
    return []


_VARYING_SPECIALS = ("SR_TID", "SR_LANEID", "SR_LTMASK", "SR_LEMASK", "SR_GTMASK",
                     "SR_GEMASK", "SR_EQMASK", "SR_CLOCK", "SR_GLOBALTIMER")


def varying_registers(cfg: Cfg) -> dict[int, frozenset[str]]:
    """For each instruction index, the registers that may differ between the threads of a
    warp just before it executes: a forward dataflow over the reachable blocks. Uniform
    registers (UR, UP) never differ; ``S2R`` of a thread or lane id, shuffles and
    ``MATCH`` do; anything computed from a per-thread value (or under a per-thread predicate)
    does. A subroutine call writes what its subroutine writes, per-thread if anything it
    reads is."""
    instrs = cfg.instrs
    sub_io: dict[int, tuple[set[str], set[str]]] = {}
    for entry in cfg.call_targets:
        reads, writes = set(), set()
        for b in cfg._reach([entry]):
            for ins in cfg.instructions(b):
                d, s = _dests_and_sources(ins)
                writes.update(d)
                reads.update(s)
        sub_io[entry] = (reads, writes)
    by_addr = {ins.addr: ins.index for ins in instrs}

    operands = {ins.index: _dests_and_sources(ins) for ins in instrs}

    def step(ins: Instr, varying: set[str]) -> None:
        dests, sources = operands[ins.index]
        guard = ins.guard.lstrip("!") if ins.guard else None
        guarded = guard is not None
        per_thread = guarded and guard in varying
        if ins.base == "CALL":
            target = ins.target()
            io = sub_io.get(cfg.block_of[by_addr[target]]) if target in by_addr else None
            if io is not None:
                reads, writes = io
                value = per_thread or bool(reads & varying)
                for r in writes:
                    if not r.startswith("U"):
                        (varying.add if value else varying.discard)(r)
            return
        if not dests:
            return
        if ins.base == "S2R" or ins.base == "CS2R":
            per_thread = per_thread or any(s in ins.text for s in _VARYING_SPECIALS)
        elif ins.base in ("SHFL", "MATCH"):
            per_thread = True
        elif ins.base == "VOTE":
            per_thread = per_thread
        else:
            per_thread = per_thread or any(s in varying for s in sources)
        for r in dests:
            if r.startswith("U"):
                continue
            if per_thread:
                varying.add(r)
            elif not guarded:
                varying.discard(r)

    state_in: dict[int, set[str]] = {0: set()}
    work = [0]
    before: dict[int, frozenset[str]] = {}
    while work:
        b = work.pop(0)
        varying = set(state_in.get(b, set()))
        for ins in cfg.instructions(b):
            before[ins.index] = frozenset(varying)
            step(ins, varying)
        for s in cfg.blocks[b].succs:
            old = state_in.get(s)
            if old is None or not varying <= old:
                state_in[s] = (old or set()) | varying
                if s not in work:
                    work.append(s)
    return before


# ---------------------------------------------------------------------------
# The hot path and what it issues
# ---------------------------------------------------------------------------


@dataclass
class SassAnalysis:
    """What :func:`analyse_sass` finds, per thread (divide by the elements per thread)."""

    counts: dict[str, Any]
    places: dict[int, str]  # block id -> pre/hot/cold/masked/post/sub
    on_path: dict[int, int]  # instruction index -> times the hot path counts it
    error: str | None = None


def _place_counts(cfg: Cfg, places: dict[int, str], kinds: set[str]) -> tuple[int, str]:
    where: Counter = Counter()
    for b in cfg.blocks:
        for ins in cfg.instructions(b.id):
            if ins.base in kinds:
                where[places.get(b.id, "sub")] += 1
    total = sum(where.values())
    return total, " ".join(f"{k}:{v}" for k, v in sorted(where.items()))


def analyse_sass(text: str) -> SassAnalysis:
    """Find the aligned hot path of a kernel's SASS (see the module docstring) and count what
    one thread issues on it."""
    instrs = parse_sass(text)
    if not instrs:
        return SassAnalysis({}, {}, {}, "no SASS instructions found")
    cfg = Cfg(instrs)
    reachable = cfg.reachable
    vector_blocks = {b for b in reachable
                     if any(i.is_vector and i.guard is None for i in cfg.instructions(b))}
    places = {b.id: "sub" for b in cfg.blocks}
    if not vector_blocks:
        for b in reachable:
            places[b] = "masked"
        return SassAnalysis(_totals(cfg, places), places, {},
                            "no unpredicated 16-byte global access: no aligned path was found")
    first = cfg.common(cfg.idom, vector_blocks)
    entry = masked_entry = branch = None
    for d in cfg.dominator_chain(first)[1:] if first is not None else []:
        succs = cfg.blocks[d].succs
        if len(succs) != 2:
            continue
        sides = [cfg.reaches(s, vector_blocks) for s in succs]
        if sides[0] != sides[1]:
            branch = d
            entry, masked_entry = (succs[0], succs[1]) if sides[0] else (succs[1], succs[0])
            break
    if entry is None:  # the vector accesses are not behind a branch: start where they start
        entry = first if first is not None else 0
    # the join: where the aligned branch's two sides meet again (its post-dominator); without
    # a branch, the first block after the vector blocks that all paths through them reach
    join = cfg.ipdom.get(branch) if branch is not None else cfg.common(cfg.ipdom, vector_blocks)
    while join is not None and join in vector_blocks and cfg.ipdom.get(join) != join:
        join = cfg.ipdom.get(join)
    if join is None or join in vector_blocks:
        join = Cfg.EXIT
    region = cfg._reach([entry], stop={join})
    varying = varying_registers(cfg)
    # the finishing tail: from the first block after the join (on its post-dominator chain)
    # past which no per-thread global access is left (element paths after the join, such as
    # a tail's first elements, count as masked)
    finish = join
    while finish != Cfg.EXIT and _element_accesses(cfg, cfg._reach([finish]), varying):
        finish = cfg.ipdom.get(finish, Cfg.EXIT)
    after = cfg._reach([finish]) if finish != Cfg.EXIT else set()
    region -= cfg._reach([join]) if join != Cfg.EXIT else set()
    cold = {b for b in region if any(i.base == "CALL" for i in cfg.instructions(b))}
    before = cfg.ancestors(branch) - region - after if branch is not None else set()
    for b in reachable:
        places[b] = ("cold" if b in cold else "hot") if b in region else \
            "post" if b in after else "pre" if b in before else "masked"

    path, loops, headers = _longest_path(cfg, entry, join, region, cold)
    on_path: dict[int, int] = {}
    for b in path:
        for ins in cfg.instructions(b):
            on_path[ins.index] = loops.get(b, 1)
    counts = _totals(cfg, places)
    counts.update(_path_counts(cfg, path, loops, varying))
    counts["loops_in_hot_path"] = len(headers)
    counts["forks_in_hot_path"] = sum(
        1 for b in path if len([s for s in cfg.blocks[b].succs if s in region - cold or
                                s == join]) == 2)
    counts["cold_blocks_in_hot_region"] = len(cold)
    counts["hot_region"] = (f"0x{instrs[cfg.blocks[entry].start].addr:x}-"
                            f"0x{instrs[cfg.blocks[max(region)].end - 1].addr:x}"
                            if region else "")
    counts["join"] = "exit" if join == Cfg.EXIT else f"0x{instrs[cfg.blocks[join].start].addr:x}"
    counts["finishing_tail"] = ("none" if finish == Cfg.EXIT
                                else f"0x{instrs[cfg.blocks[finish].start].addr:x}")
    counts["program_instructions"] = counts["path_instructions"] + _outside_instructions(
        cfg, branch, finish, places)
    return SassAnalysis(counts, places, on_path)


def _totals(cfg: Cfg, places: dict[int, str]) -> dict[str, Any]:
    shm, shm_where = _place_counts(cfg, places, SHARED)
    fences, fences_where = _place_counts(cfg, places, FENCES | ATOMICS)
    bars, bars_where = _place_counts(cfg, places, BARRIERS)
    local, _ = _place_counts(cfg, places, LOCAL)
    return {"shared_memory_ops": shm, "shared_memory_ops_where": shm_where,
            "fences_atomics": fences, "fences_atomics_where": fences_where,
            "barriers": bars, "barriers_where": bars_where, "local_memory_ops": local,
            "sass_instructions": len(cfg.instrs)}


def _longest_path(cfg: Cfg, entry: int, join: int, region: set[int], cold: set[int]
                  ) -> tuple[list[int], dict[int, int], set[int]]:
    """The longest path (in instructions) from ``entry`` to ``join`` through ``region`` minus
    ``cold`` (cold blocks only where no other path exists), loops cut at their back edges;
    per block of a loop on it, how many times it is counted (LOOP_TRIPS); and the headers
    of those loops."""
    for allowed in (region - cold, region):
        if entry not in allowed:
            continue
        back = {(u, s) for u in allowed for s in cfg.blocks[u].succs
                if s in allowed and s in cfg.dominator_chain(u)}
        succs = {b: [s for s in cfg.blocks[b].succs
                     if (s in allowed or s == join) and (b, s) not in back] for b in allowed}
        best: dict[int, tuple[int, int | None]] = {}  # block -> (length to join, next block)
        for b in _post_order(entry, succs, join):  # successors first
            size = cfg.blocks[b].end - cfg.blocks[b].start
            options = [(0 if s == join else best[s][0], s) for s in succs[b]
                       if s == join or s in best]
            if not options and join != Cfg.EXIT:
                continue  # does not reach the join
            length, nxt = max(options, default=(0, None), key=lambda o: (o[0], -(o[1] or 0)))
            best[b] = (size + length, nxt)
        if entry not in best:
            continue
        path: list[int] = []
        b: int | None = entry
        while b is not None and b != join and b not in path:
            path.append(b)
            b = best[b][1]
        loops: dict[int, int] = {}
        headers = set()
        for u, h in back:
            if h in path:
                headers.add(h)
                for x in _loop_body(cfg, u, h) & set(path):
                    loops[x] = LOOP_TRIPS
        return path, loops, headers
    return [], {}, set()


def _post_order(root: int, succs: dict[int, list[int]], stop: int) -> list[int]:
    """Blocks reachable from ``root`` (not through ``stop``), each after its successors."""
    order: list[int] = []
    seen = {root}
    stack = [(root, iter(succs[root]))]
    while stack:
        node, it = stack[-1]
        nxt = next((s for s in it if s not in seen and s != stop), None)
        if nxt is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succs[nxt])))
    return order


def _loop_body(cfg: Cfg, tail: int, header: int) -> set[int]:
    body = {header, tail}
    todo = [tail] if tail != header else []
    while todo:
        b = todo.pop()
        for p in cfg.blocks[b].preds:
            if p not in body:
                body.add(p)
                todo.append(p)
    return body


def _outside_instructions(cfg: Cfg, branch: int | None, join: int,
                          places: dict[int, str]) -> int:
    """Instructions a program of a full aligned chunk issues outside the hot region: the
    longest path from the entry to the aligned branch, and from the join to an exit (cold
    blocks avoided where possible)."""
    total = 0
    if branch is not None:
        pre = {b for b, p in places.items() if p == "pre"}
        path, loops, _ = _longest_path(cfg, 0, branch, pre - {branch}, set())
        total += sum((cfg.blocks[b].end - cfg.blocks[b].start) * loops.get(b, 1) for b in path)
        total += cfg.blocks[branch].end - cfg.blocks[branch].start
    if join != Cfg.EXIT:
        post = {b for b, p in places.items() if p == "post"}
        calls = {b for b in post if any(i.base == "CALL" for i in cfg.instructions(b))}
        path, loops, _ = _longest_path(cfg, join, Cfg.EXIT, post, calls)
        total += sum((cfg.blocks[b].end - cfg.blocks[b].start) * loops.get(b, 1) for b in path)
    return total


def _element_accesses(cfg: Cfg, blocks: set[int], varying: dict[int, frozenset[str]]) -> bool:
    """Whether ``blocks`` load or store global memory at a per-thread address."""
    return any((i.is_global_load or i.is_global_store)
               and set(_address_regs(i)) & varying.get(i.index, frozenset())
               for b in blocks for i in cfg.instructions(b))


def _path_counts(cfg: Cfg, path: list[int], loops: dict[int, int],
                 varying: dict[int, frozenset[str]]) -> dict[str, Any]:
    """Counts along the hot path, per thread."""
    n = vec_loads = vec_stores = 0
    element_bytes = uniform_bytes = narrow_loads = narrow_element = 0
    reloads = mufu = fp64 = 0
    first_store_seen = first_vector_load_seen = False
    inflight = inflight_use = 0
    pending: set[str] = set()
    used = False
    any_store = any(i.is_global_store for b in path for i in cfg.instructions(b))
    for b in path:
        times = loops.get(b, 1)
        for ins in cfg.instructions(b):
            n += times
            if ins.base in MUFU:
                mufu += times
            if ins.base.startswith("D") and ins.base in ("DADD", "DMUL", "DFMA", "DSETP",
                                                         "DMNMX"):
                fp64 += times
            _, sources = _dests_and_sources(ins)
            if pending and not used and set(sources) & pending:
                used = True
            if ins.is_global_load or ins.is_global_store:
                width = ins.width()
                per_thread = bool(set(_address_regs(ins)) & varying.get(ins.index, frozenset()))
                if ins.is_vector:
                    units = times * width // 16
                    if ins.is_global_load:
                        vec_loads += units
                        first_vector_load_seen = True
                        if not first_store_seen:
                            inflight += units * 16
                        if not used:
                            inflight_use += units * 16
                            pending.update(_dests_and_sources(ins)[0])
                    else:
                        vec_stores += units
                    element_bytes += times * width
                else:
                    if per_thread:
                        element_bytes += times * width
                        narrow_element += times
                    elif ins.is_global_load:
                        uniform_bytes += times * width
                    if ins.is_global_load:
                        narrow_loads += times
                        late = first_store_seen if any_store else first_vector_load_seen
                        if late and not per_thread:
                            reloads += times
                if ins.is_global_store:
                    first_store_seen = True
    return {"path_instructions": n, "vec16_loads": vec_loads, "vec16_stores": vec_stores,
            "element_bytes": element_bytes, "uniform_load_bytes": uniform_bytes,
            "narrow_loads": narrow_loads, "narrow_element_accesses": narrow_element,
            "reloads": reloads, "mufu": mufu, "fp64": fp64,
            "inflight_bytes": inflight if any_store else inflight_use,
            "inflight_bytes_first_use": inflight_use}


def annotate(text: str, analysis: SassAnalysis, header: str) -> str:
    """The SASS with each instruction's place and ``*`` (``*N``: counted N times) where the
    hot path counts it, under a header that says what the tags mean."""
    instrs = parse_sass(text)
    cfg_blocks = Cfg(instrs) if instrs else None
    lines = [f"// {line}" for line in header.splitlines()]
    lines += ["// place: pre = before the aligned branch, hot = the aligned hot region, cold = "
              "its slow paths (they CALL a subroutine), masked = the other element paths "
              "(tails, unaligned storage), post = after the paths join (the finishing tail), "
              "sub = subroutines; '*' = counted on the hot path ('*10' = ten times: a loop)", ""]
    for ins in instrs:
        place = analysis.places.get(cfg_blocks.block_of[ins.index], "sub") if cfg_blocks else ""
        times = analysis.on_path.get(ins.index)
        mark = "" if times is None else "*" if times == 1 else f"*{times}"
        lines.append(f"{place:<6} {mark:<4} /*{ins.addr:04x}*/  {ins.text} ;")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def ctas_per_sm(regs: int, smem: int, threads: int, arch: int) -> int:
    """Programs resident per SM (see the module docstring)."""
    lim = ARCH_LIMITS.get(arch, SmLimits())
    warps = max(1, threads // 32)
    per_thread = max(1, math.ceil(regs / lim.reg_unit) * lim.reg_unit)
    by_regs = (lim.regs // (per_thread * 32)) // warps
    by_threads = lim.threads // threads
    by_smem = (lim.smem_kb * 1024) // (smem + lim.reserved_smem_per_cta)
    return max(0, min(lim.ctas, by_regs, by_threads, by_smem))


def predict(inflight_kb: float, instr_per_elem: float, bytes_per_param: float,
            gpu: Gpu) -> tuple[float, str]:
    """Predicted % of the copy bandwidth and the binding bound (see the module docstring)."""
    mlp = min(1.0, inflight_kb / gpu.needed_kb_per_sm(DRAM_LATENCY_NS * 1e-9))
    issue = 1.0
    if instr_per_elem > 0 and bytes_per_param > 0:
        needed = instr_per_elem * gpu.bandwidth / bytes_per_param
        issue = min(1.0, gpu.sms * ISSUE_PER_SM_PER_CLOCK * gpu.clock_hz / needed)
    limit = "-" if min(mlp, issue) >= 1.0 else "mlp" if mlp <= issue else "issue"
    return 100.0 * min(mlp, issue), limit


def model_constants() -> dict[str, Any]:
    """The model's numbers, for static.json."""
    latency = DRAM_LATENCY_NS * 1e-9
    gpus = {"h100": H100, "h200": H200, **{f"sm{a}": g for a, g in ARCH_GPU.items()}}
    return {
        "dram_latency_ns": DRAM_LATENCY_NS, "issue_per_sm_per_clock": ISSUE_PER_SM_PER_CLOCK,
        "step": STEP, "loop_trips": LOOP_TRIPS,
        "gpus": {k: {"name": g.name, "bandwidth_tb_s": g.bandwidth / 1e12, "sms": g.sms,
                     "clock_ghz": g.clock_hz / 1e9,
                     "needed_kb_per_sm": g.needed_kb_per_sm(latency),
                     "issue_thread_instr_per_s": g.sms * ISSUE_PER_SM_PER_CLOCK * g.clock_hz}
                 for k, g in gpus.items()},
        "sm_limits": {str(a): vars(lim) for a, lim in ARCH_LIMITS.items()},
    }


def make_row(job: StaticJob, result: dict[str, Any]) -> dict[str, Any]:
    """A table row from a worker's result: the counts per element, the model, the findings."""
    row: dict[str, Any] = {"variant": job.variant, "arch": job.arch, "optimizer": job.optimizer,
                           "flags": dict(job.flags), "states": list(job.states),
                           "dtype": job.dtype, "amp": job.amp, "kernel": job.kernel,
                           "status": "ok", "error": "", "compile_s": result.get("compile_s")}
    try:
        row["bytes_model_bytes_per_param"] = bytes_model(job)
    except Exception as err:  # noqa: BLE001
        row["bytes_model_bytes_per_param"] = None
        row["error"] = f"bytes model: {err}"
    if result.get("status") != "ok":
        row.update(status="error", error=result.get("error") or "failed")
        return row
    c = result["counts"]
    threads = result["threads"]
    per = result["elements_per_program"] / threads
    regs, smem = result["regs"], result["smem"]
    ctas = ctas_per_sm(regs, smem, threads, job.arch)
    row.update(regs=regs, register_cap=result.get("maxnreg"), spills=result["spills"],
               smem=smem, ctas_per_sm=ctas,
               elements_per_thread=per, threads_per_program=threads,
               sass_file=result.get("sass_file"))
    for key in ("shared_memory_ops", "shared_memory_ops_where", "fences_atomics",
                "fences_atomics_where", "barriers", "barriers_where", "local_memory_ops",
                "sass_instructions", "loops_in_hot_path", "forks_in_hot_path",
                "cold_blocks_in_hot_region", "hot_region", "narrow_element_accesses"):
        row[key] = c.get(key)
    if result.get("analysis_error"):
        row.update(status="error", error=result["analysis_error"])
        return row
    row.update(
        vec16_loads_per_elem=c["vec16_loads"] / per,
        vec16_stores_per_elem=c["vec16_stores"] / per,
        bytes_per_param=c["element_bytes"] / per,
        uniform_load_bytes_per_elem=c["uniform_load_bytes"] / per,
        instr_per_elem=c["path_instructions"] / per,
        instr_per_elem_program=c["program_instructions"] / per,
        hyper_loads_in_loop=c["reloads"], scalar_loads_in_loop=c["narrow_loads"],
        mufu_per_elem=c["mufu"] / per, fp64_per_elem=c["fp64"] / per,
        vector_bytes_in_flight_per_thread=c["inflight_bytes"],
        inflight_kb_per_sm=c["inflight_bytes"] * threads * ctas / 1024,
        inflight_kb_per_sm_first_use=c["inflight_bytes_first_use"] * threads * ctas / 1024)
    model = row["bytes_model_bytes_per_param"]
    row["bytes_match"] = model is not None and abs(row["bytes_per_param"] - model) < 1e-9
    gpu = ARCH_GPU.get(job.arch)
    if gpu is not None:
        row["gpu"] = gpu.name
        row["predicted_pct"], row["limit"] = predict(
            row["inflight_kb_per_sm"], row["instr_per_elem"], row["bytes_per_param"], gpu)
    if job.arch == 90:
        row["predicted_pct_h100"], row["limit"] = predict(
            row["inflight_kb_per_sm"], row["instr_per_elem"], row["bytes_per_param"], H100)
        row["predicted_pct_h200"], _ = predict(
            row["inflight_kb_per_sm"], row["instr_per_elem"], row["bytes_per_param"], H200)
    row["findings"] = findings(row)
    return row


def findings(row: dict[str, Any]) -> list[str]:
    """What the SASS shows that a roofline-quality kernel would not have (the check column)."""
    out = []
    if row.get("spills"):
        out.append("SPILL")
    if shared_on_element_paths(row):
        out.append("SMEM")
    if row.get("hyper_loads_in_loop"):
        out.append("RELOAD")
    if row.get("bytes_match") is False:
        out.append("BYTES")
    if row.get("narrow_element_accesses"):
        out.append("NARROW")
    if any(k != "post" for k in _where(row.get("fences_atomics_where"))):
        out.append("ATOMIC")
    if row.get("loops_in_hot_path"):
        out.append("LOOP")
    return out


def shared_on_element_paths(row: dict[str, Any]) -> int:
    """Shared-memory instructions outside the finishing tail (``post``, where a program may
    broadcast an atomic's result or reduce its sums)."""
    return sum(v for k, v in _where(row.get("shared_memory_ops_where")).items() if k != "post")


def _where(text: str | None) -> dict[str, int]:
    """``"masked:3 post:1"`` -> ``{"masked": 3, "post": 1}``."""
    out = {}
    for item in (text or "").split():
        k, _, v = item.partition(":")
        out[k] = int(v or 0)
    return out


# ---------------------------------------------------------------------------
# Compiling: the worker, and a pool of them
# ---------------------------------------------------------------------------

_RESULT = "@@fusedopt-static@@ "


def triton_bin(tool: str) -> Path:
    """A tool triton ships (cuobjdump, nvdisasm, ptxas): ``<triton>/backends/nvidia/bin``."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("triton is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: this triton ships no {tool}")
    return path


def supported_archs() -> list[int]:
    """The archs of KNOWN_ARCHS the installed triton's ptxas can build (sm_100 needs a ptxas
    that knows Blackwell: triton ships one as ptxas-blackwell)."""
    out = []
    for arch in KNOWN_ARCHS:
        names = ("ptxas-blackwell", "ptxas") if arch >= 100 else ("ptxas",)
        found = []
        for name in names:
            try:
                found.append(triton_bin(name))
            except FileNotFoundError:
                pass
        if arch < 100 and found:
            out.append(arch)
        elif arch >= 100 and found:
            version = _ptxas_version(found[0])
            if version is None or version >= (12, 8):
                out.append(arch)
    return out


def _ptxas_version(path: Path) -> tuple[int, int] | None:
    try:
        text = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def compile_one(job: dict[str, Any], sass_dir: Path | None) -> dict[str, Any]:
    """Compile one job (in a worker: no TRITON_INTERPRET) and analyse its SASS."""
    import torch

    from fusedopt.kernels import algorithms, codegen, skeleton
    from fusedopt.kernels.variant import Variant

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp64": torch.float64}
    t0 = time.perf_counter()
    variant = Variant(algorithms.ALGORITHMS[job["algorithm"]], tuple(job["states"]),
                      tuple(job["flags"]), dtypes[job["dtype"]], unscale=job["amp"],
                      skip_on_inf=job["amp"], clip=job["amp"])
    kernel = codegen.compile_variant(variant, kernel=job["kernel"], arch=job["arch"])
    compile_s = time.perf_counter() - t0
    cubin = kernel.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = str(triton_bin("cuobjdump"))
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True,
                              check=True, timeout=300).stdout
    res = codegen.resource_usage(cubin)
    meta = kernel.metadata
    num_warps = getattr(meta, "num_warps", None) or getattr(skeleton, "NUM_WARPS", 4)
    threads = 32 * num_warps
    consts = skeleton.constexprs(variant, job["kernel"])
    if "BLOCK" in consts and "ITERS" in consts:
        per_program = consts["BLOCK"] * consts["ITERS"]
    elif hasattr(skeleton, "chunk_elements"):
        per_program = skeleton.chunk_elements(variant)
    else:
        per_program = skeleton.CHUNK
    n_regs = getattr(kernel, "n_regs", None)  # filled only where a driver loaded it
    regs = res.get("REG", n_regs if isinstance(n_regs, int) else 0)
    smem = int(getattr(meta, "shared", 0) or 0) + res.get("SHARED", 0)
    analysis = analyse_sass(sass)
    sass_file = None
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        header = (f"{job['key']}: {job['algorithm']} states={list(job['states'])} "
                  f"flags={job['flags']} amp={job['amp']}\ntriton {_triton_version()}, "
                  f"{threads} threads x {per_program // threads} elements per thread; "
                  f"regs {regs}, smem {smem}; hot region {analysis.counts.get('hot_region')},"
                  f" join {analysis.counts.get('join')}")
        sass_file = sass_dir / f"{job['key']}.sass"
        sass_file.write_text(annotate(sass, analysis, header))
    return {"key": job["key"], "status": "ok", "compile_s": compile_s, "regs": regs,
            "spills": res["spills"], "smem": smem,
            "maxnreg": getattr(kernel.metadata, "maxnreg", None),
            "threads": threads,
            "elements_per_program": per_program, "counts": analysis.counts,
            "analysis_error": analysis.error,
            "sass_file": str(sass_file) if sass_file else None,
            "kernel_constants": _kernel_constants(skeleton, consts)}


def _triton_version() -> str:
    import triton

    return triton.__version__


def _kernel_constants(skeleton: Any, consts: dict[str, Any]) -> dict[str, Any]:
    out = {name: getattr(skeleton, name) for name in ("BLOCK", "ITERS", "CHUNK", "NUM_WARPS")
           if isinstance(getattr(skeleton, name, None), int)}
    out.update({f"constexpr_{k}": v for k, v in consts.items() if k in ("BLOCK", "ITERS",
                                                                        "VECTOR")})
    return out


def _worker_main(sass_dir: str | None) -> int:
    """Read one JSON job per line on stdin, compile it, print its result line."""
    os.environ.pop("TRITON_INTERPRET", None)
    out = Path(sass_dir) if sass_dir else None
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            result = compile_one(job, out)
        except Exception as err:  # noqa: BLE001 - reported in the row
            text = str(err).strip().splitlines()
            text = [t for t in text if not t.startswith("#loc")]
            result = {"key": job["key"], "status": "error",
                      "error": f"{type(err).__name__}: " + " | ".join(text[-4:])[-600:]}
        print(_RESULT + json.dumps(result, default=str), flush=True)
    return 0


class Pool:
    """Worker processes compiling jobs in the background; :meth:`result` waits for one.

    Started on the first :meth:`result` (so that a run's timing sections are over before it
    competes for the cores). Jobs go to whichever worker is free, in order."""

    def __init__(self, jobs: list[StaticJob], workers: int, sass_dir: Path | None):
        self.jobs = jobs
        self.workers = max(1, min(workers, len(jobs) or 1))
        self.sass_dir = sass_dir
        self.results: dict[str, dict[str, Any]] = {}
        self.done = threading.Condition()
        self.started = False
        self.todo: queue.Queue = queue.Queue()
        self.start_time: float | None = None
        self.end_time: float | None = None

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        self.start_time = time.perf_counter()
        for job in self.jobs:
            self.todo.put(job)
        for _ in range(self.workers):
            threading.Thread(target=self._serve, daemon=True).start()

    def _spawn(self) -> tuple[subprocess.Popen, Any]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        errors = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "fusedopt.perf.static", "--worker"]
        if self.sass_dir is not None:
            cmd.append(str(self.sass_dir))
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=errors, text=True, env=env, bufsize=1)
        return proc, errors

    def _serve(self) -> None:
        proc = errors = None
        try:
            while True:
                try:
                    job = self.todo.get_nowait()
                except queue.Empty:
                    break
                try:
                    if proc is None or proc.poll() is not None:
                        if errors is not None:
                            errors.close()
                        proc, errors = self._spawn()
                    result = self._ask(proc, errors, job)
                except Exception as err:  # noqa: BLE001 - a worker that cannot start
                    result = {"key": job.key, "status": "error", "error": f"worker: {err}"}
                with self.done:
                    self.results[job.key] = result
                    self.end_time = time.perf_counter()
                    self.done.notify_all()
        finally:
            if proc is not None:
                try:
                    proc.stdin.close()
                    proc.wait(timeout=30)
                except (OSError, subprocess.SubprocessError):
                    proc.kill()
            if errors is not None:
                errors.close()

    def _ask(self, proc: subprocess.Popen, errors: Any, job: StaticJob) -> dict[str, Any]:
        try:
            proc.stdin.write(json.dumps(job.wire()) + "\n")
            proc.stdin.flush()
            while True:
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith(_RESULT):
                    return json.loads(line[len(_RESULT):])
        except (OSError, ValueError) as err:
            return {"key": job.key, "status": "error", "error": f"worker: {err}"}
        errors.seek(0)
        tail = [t for t in errors.read().strip().splitlines() if not t.startswith("#loc")]
        return {"key": job.key, "status": "error",
                "error": "the compile worker died: " + " | ".join(tail[-3:])[-600:]}

    def result(self, job: StaticJob) -> dict[str, Any]:
        self.start()
        with self.done:
            while job.key not in self.results:
                self.done.wait()
            return self.results[job.key]


#: Planned seconds on this project's 2-core VM: one compile with a cold triton cache, per
#: worker (measured with 2 workers: the bare run's 6 kernels in 11 s, every optimizer's 28 in
#: 66 s, a second build under the register cap included where one is needed), and starting a
#: worker (importing torch and triton).
COMPILE_S = 5.0
WORKER_START_S = 5.0


def planned_seconds(n_jobs: int, workers: int) -> list[float]:
    """Planned seconds per job, cold cache, ``workers`` compiling at once (the first job also
    waits for a worker to start)."""
    per = COMPILE_S / max(1, min(workers, n_jobs or 1))
    return [per + (WORKER_START_S if i == 0 else 0.0) for i in range(n_jobs)]


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _bytes_cell(r: dict) -> str:
    got, model = r.get("bytes_per_param"), r.get("bytes_model_bytes_per_param")
    if got is None:
        return "-"
    text = f"{got:g}"
    return text if r.get("bytes_match") else f"{text}/{model}"


def _fence_cell(r: dict) -> str:
    n = r.get("fences_atomics")
    if n is None:
        return "-"
    return f"{n} {r.get('fences_atomics_where') or ''}".strip()


_COLUMNS: list[tuple[str, Callable[[dict], str], bool]] = [
    ("variant", lambda r: r["variant"], False),
    ("dtype", lambda r: r["dtype"], False),
    ("kernel", lambda r: r["kernel"], False),
    ("sm", lambda r: str(r["arch"]), True),
    ("regs", lambda r: _f(r.get("regs"), "{}") + ("*" if r.get("register_cap") else ""), True),
    ("spill", lambda r: _f(r.get("spills"), "{}"), True),
    ("smem", lambda r: _f(r.get("smem"), "{}"), True),
    ("CTA/SM", lambda r: _f(r.get("ctas_per_sm"), "{}"), True),
    ("ld16", lambda r: _f(r.get("vec16_loads_per_elem"), "{:.3g}"), True),
    ("st16", lambda r: _f(r.get("vec16_stores_per_elem"), "{:.3g}"), True),
    ("B/el", _bytes_cell, True),
    ("instr", lambda r: _f(r.get("instr_per_elem"), "{:.1f}"), True),
    ("reload", lambda r: _f(r.get("hyper_loads_in_loop"), "{}"), True),
    ("narrow", lambda r: _f(r.get("scalar_loads_in_loop"), "{}"), True),
    ("KB/SM", lambda r: _f(r.get("inflight_kb_per_sm"), "{:.0f}"), True),
    ("shm", lambda r: _f(r.get("shared_memory_ops"), "{}"), True),
    ("fence", _fence_cell, False),
    ("%H100", lambda r: _f(r.get("predicted_pct_h100"), "{:.0f}%"), True),
    ("%H200", lambda r: _f(r.get("predicted_pct_h200"), "{:.0f}%"), True),
    ("%own", lambda r: _f(r.get("predicted_pct"), "{:.0f}%"), True),
    ("limit", lambda r: r.get("limit") or "-", False),
    ("check", lambda r: ("error" if r.get("status") != "ok"
                         else " ".join(r.get("findings") or []) or "ok"), False),
]


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """The printed table, notes on what it found and the legend of every column."""
    from .report import format_columns, legend

    columns = [c for c in _COLUMNS if c[0] != "%own" or any(r["arch"] != 90 for r in rows)]
    head = [c[0] for c in columns]
    cells = [[cell(r) if r.get("status") == "ok" or name in ("variant", "dtype", "kernel", "sm",
                                                              "check") else "-"
              for name, cell, _ in columns] for r in rows]
    out = []
    if meta:
        out.append(f"triton {meta.get('triton_version')}, compiled on this machine (no GPU): "
                   f"{len(rows)} kernel(s), {meta.get('elapsed_s', 0):.0f} s; hot path counts "
                   f"per element, {meta.get('threads_per_program', '?')} threads per program")
        if meta.get("subset"):
            out.append(meta["subset"])
    out += format_columns(head, cells, {i for i, c in enumerate(columns) if c[2]})
    out += _notes(rows, meta or {})
    out += ["", legend(head, COLUMN_LEGEND)]
    return "\n".join(out)


def _notes(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    notes = []
    notes.append(f"model: needed in flight per SM = bandwidth x {DRAM_LATENCY_NS:g} ns / SMs "
                 f"= {_NEEDED_H100:.1f} KB (H100, {H100.bandwidth / 1e12:g} TB/s) and "
                 f"{_NEEDED_H200:.1f} KB (H200, {H200.bandwidth / 1e12:g} TB/s); issue: "
                 f"{H100.sms} SMs x {ISSUE_PER_SM_PER_CLOCK} thread-instructions per clock x "
                 f"{H100.clock_hz / 1e9:g} GHz. Loops on the hot path are counted {LOOP_TRIPS} "
                 f"times (step {STEP}). Every number is from the SASS, not a measurement.")
    counted = Counter(f for r in ok for f in r.get("findings") or [])
    if counted:
        notes.append("findings: " + ", ".join(f"{k} in {v} row(s)" for k, v in
                                              sorted(counted.items())))
    mismatch = [r for r in ok if r.get("bytes_match") is False]
    if mismatch:
        notes.append("BYTES: the SASS moves other bytes per element than the bytes model on "
                     + ", ".join(f"{r['variant']} {r['kernel']} {r['dtype']} sm_{r['arch']} "
                                 f"({r['bytes_per_param']:g} vs {r['bytes_model_bytes_per_param']})"
                                 for r in mismatch[:6]) + (" ..." if len(mismatch) > 6 else ""))
    differs = [r for r in ok if r.get("inflight_kb_per_sm_first_use") is not None
               and r["inflight_kb_per_sm_first_use"] < r["inflight_kb_per_sm"] - 1e-9]
    if differs:
        notes.append(f"{len(differs)} row(s) use a loaded value before issuing all the loads "
                     "counted in KB/SM (static.json: inflight_kb_per_sm_first_use): their warps "
                     "stall with fewer bytes in flight than KB/SM says.")
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        notes.append(f"{len(errors)} kernel(s) failed:")
        notes += [f"  {r['variant']} {r['kernel']} {r['dtype']} sm_{r['arch']}: {r['error']}"
                  for r in errors]
    if meta.get("skipped"):
        notes.append(f"skipped {len(meta['skipped'])} flag combination(s): "
                     + "; ".join(f"{s['variant']}: {s['reason']}" for s in meta["skipped"][:6])
                     + (" ..." if len(meta["skipped"]) > 6 else ""))
    return [""] + notes


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path,
                  plots: bool = True) -> list[Path]:
    """static.json, static.csv and (with matplotlib) static.png; the SASS files are written
    by the workers."""
    from .report import write_csv

    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": "fusedopt-bench-static/1", "meta": meta,
           "rows": [{k: r.get(k) for k in FIELDS} for r in rows]}
    (out / "static.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    flat = [{**r, "flags": ",".join(f"{k}={int(v)}" for k, v in r["flags"].items()),
             "states": ",".join(r["states"]), "findings": " ".join(r.get("findings") or [])}
            for r in rows]
    write_csv(out / "static.csv", flat, fields=FIELDS)
    files = [out / "static.json", out / "static.csv"]
    if plots and any(r.get("status") == "ok" for r in rows):
        try:
            from .plots import plot_static

            files += plot_static(rows, out)
        except ImportError as err:
            print(f"plots skipped: {err} (pip install matplotlib)", file=sys.stderr)
    sass = out / "sass"
    if sass.is_dir():
        files.append(sass)
    return files


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def section(jobs: list[StaticJob], skipped: list[dict[str, str]], out: Path, *,
            workers: int = DEFAULT_WORKERS, plots: bool = True, subset: str = "",
            command: str = "") -> Any:
    """A :class:`fusedopt.perf.plan.Section` compiling ``jobs`` in a pool of ``workers``
    processes (started by its first job), then writing the outputs to ``out``."""
    from . import plan
    from .report import versions

    pool = Pool(jobs, workers, out / "sass")
    times = planned_seconds(len(jobs), workers)

    def run(job: StaticJob) -> dict[str, Any]:
        return make_row(job, pool.result(job))

    planned = [plan.Job(f"static {j.label}", t, (lambda j=j: run(j))) for j, t in
               zip(jobs, times)]

    def finish(rows: list[dict[str, Any]]) -> Any:
        results = [pool.results.get(j.key, {}) for j in jobs]
        constants = next((r.get("kernel_constants") for r in results if r.get("status") == "ok"),
                         {})
        per_dtype = {}
        for j, r in zip(jobs, results):
            if r.get("status") == "ok":
                per_dtype[j.dtype] = r["elements_per_program"]
        threads = next((r["threads"] for r in results if r.get("status") == "ok"), None)
        meta = {**versions(), "archs": sorted({j.arch for j in jobs}),
                "dtypes": list(dict.fromkeys(j.dtype for j in jobs)),
                "kernel_constants": constants,
                "elements_per_program": per_dtype, "threads_per_program": threads,
                "model": model_constants(), "skipped": skipped, "subset": subset,
                "command": command, "workers": pool.workers,
                "elapsed_s": (pool.end_time or 0.0) - (pool.start_time or 0.0),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        files = write_outputs(rows, meta, out, plots)
        ok = bool(rows) and all(r.get("status") == "ok" for r in rows)
        return plan.SectionOutput(format_table(rows, meta), files, ok)

    return plan.Section(TITLE, planned, finish, finish_s=plan.PLOT_S if plots else 0.0)


TITLE = "Static roofline of the kernels, from the SASS (compiled here, no GPU)"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        raise SystemExit(_worker_main(sys.argv[2] if len(sys.argv) > 2 else None))
    from .cli import main

    raise SystemExit(main(["static", *sys.argv[1:]]))
