"""The ``fusedopt-bench`` command (also ``python -m fusedopt.perf``).

    fusedopt-bench [options]            measure, print tables, write JSON/CSV/PNG and a README
    fusedopt-bench --e2e [options]      end-to-end small-GPT training split
    fusedopt-bench plot RESULTS.csv     re-draw the plots from a results CSV
    fusedopt-bench host [options]       host-side ms per step, kernel launch stubbed out
    fusedopt-bench static [options]     static roofline of every kernel variant, from its SASS

A run is a list of sections (``plan.Section``), each with its own table. With no workload
options on a CPU-only machine (:func:`cpu_default_sections`): the engine's host time,
fusedopt's reference path against torch.optim as a sanity check, then a static roofline of a
few kernel variants compiled for sm_90 (``static``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import e2e as e2e_mod
from . import host as host_mod
from . import impls as impls_mod
from . import matrix as matrix_mod
from . import measure, plan, report, workloads
from . import static as static_mod
from .bytes_model import DTYPE_BYTES, KNOWN, bytes_per_param, canonical_dtype
from .impls import Impl, OptSpec
from .plan import Job, Progress, Section, SectionOutput
from .workloads import Workload

__all__ = ["Progress", "build_parser", "build_sections", "main", "resolve_request"]

#: What runs when --workloads is not given, per (device, --quick).
DEFAULT_WORKLOADS = {
    ("cuda", False): ["flat", "gpt2", "llama1b", "small2000", "resnet50"],
    ("cpu", False): ["flat", "small20"],
    ("cuda", True): ["flat", "gpt2", "small2000"],
    ("cpu", True): ["flat", "small10"],
}
#: Flat sweep (log2 first, last, step) when --flat is not given, per (device, --quick).
DEFAULT_FLAT = {("cuda", False): workloads.FLAT_RANGE["cuda"],
                ("cpu", False): workloads.FLAT_RANGE["cpu"],
                ("cuda", True): (12, 28, 4), ("cpu", True): (12, 16, 4)}  # fmt: skip
DEFAULT_DTYPES = {"cuda": ["fp32", "bf16"], "cpu": ["fp32"]}
FALLBACK_OPTIMIZERS = ["Adam", "AdamW", "SGD"]
#: --e2e defaults per --quick: timed steps, untimed warm-up steps, sequences per batch.
E2E_DEFAULTS = {False: {"steps": 20, "warmup": 3, "batch": 8},
                True: {"steps": 5, "warmup": 1, "batch": 4}}  # fmt: skip
E2E_QUICK_MODEL = "tiny"

HOST_TITLE = "Host time per step of fusedopt's engine (kernel launch stubbed out)"
STATIC_TITLE = static_mod.TITLE
STEPS_TITLE = {
    "cuda": "Optimizer step throughput: fusedopt vs torch.optim (and importable libraries)",
    "cpu": "fusedopt's reference path vs torch.optim on CPU: a sanity check, not fusedopt's "
           "GPU performance",
}


def _split(values: list[str] | None) -> list[str] | None:
    """Accept both ``--x a b`` and ``--x a,b``."""
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v.strip()]


def _flat_range(text: str) -> tuple[int, int, int]:
    parts = text.replace("-", ":").split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LO:HI[:STEP] log2 exponents, got {text!r}"
        ) from None
    if len(nums) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected LO:HI[:STEP], got {text!r}")
    return (nums[0], nums[1], nums[2] if len(nums) == 3 else 2)


def _per_device(table: dict[tuple[str, bool], Any], show: Any = str) -> str:
    """``cuda: A; cpu: B; with --quick: cuda: C, cpu: D``, from a (device, quick) table."""
    normal = "; ".join(f"{d}: {show(table[(d, False)])}" for d in ("cuda", "cpu"))
    quick = ", ".join(f"{d}: {show(table[(d, True)])}" for d in ("cuda", "cpu"))
    return f"{normal}; with --quick: {quick}"


def _settings_default(name: str) -> str:
    """A Settings field's default per device and with --quick, for --help."""
    table = {(d, q): getattr(measure.Settings.for_device(d, q), name)
             for d in ("cuda", "cpu") for q in (False, True)}  # fmt: skip
    if name == "target_run_s":
        return _per_device(table, lambda s: f"{s * 1e3:g}")
    return _per_device(table)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` documents every option, with defaults taken from the
    constants the run uses."""
    flat = _per_device(DEFAULT_FLAT, lambda r: ":".join(map(str, r)))
    host_config = " ".join([*host_mod.DEFAULT_WORKLOADS, *host_mod.DEFAULT_OPTIMIZERS,
                            *host_mod.DEFAULT_DTYPES])
    p = argparse.ArgumentParser(
        prog="fusedopt-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure optimizer-step throughput of fusedopt against torch.optim (and any\n"
            "importable apex / bitsandbytes / torchao / optimi / flashoptim), as effective\n"
            "GB/s, % of the device's copy bandwidth measured in the same run, and speedup\n"
            "vs torch fused (CUDA) or torch's default implementation (CPU); every row is also\n"
            "checked against torch.optim after its first steps.\n\n"
            "Prints the plan and its time estimate, a progress bar, then each section's table\n"
            "with a legend of its columns; writes results.json, results.csv, PNG plots and a\n"
            "README.md (the tables and legends) to --out.\n\n"
            "With no workload options on a machine without a GPU, three sections:\n"
            "  1. host time per step of fusedopt's engine, as `fusedopt-bench host`\n"
            f"     ({host_config}), with its floor; written to host.json, host.csv;\n"
            "  2. fusedopt's reference path (pure torch: what fusedopt runs without a GPU) vs\n"
            "     torch.optim on small workloads: a sanity check, not fusedopt's GPU performance;\n"
            "  3. a static roofline, as `fusedopt-bench static`, of a subset of the kernels\n"
            f"     ({static_subset(False)};\n"
            f"     with --quick: {static_subset(True)}), compiled for\n"
            "     sm_90 here; written to static.json, static.csv, static.png, sass/."
        ),
        epilog=(
            "other commands (each has --help):\n"
            "  fusedopt-bench plot RESULTS.csv [--out DIR]   redraw the plots, no measuring\n"
            "  fusedopt-bench host [options]                 host ms/step of fusedopt's engine\n"
            "                                                with the kernel launch stubbed out,\n"
            "                                                against a floor\n"
            "  fusedopt-bench static [options]               static roofline of every kernel\n"
            "                                                variant, compiled for a GPU target\n"
            "                                                here and read from its SASS\n"
            "  fusedopt-bench matrix [options]               Muon, Adafactor and SparseAdam vs\n"
            "                                                torch.optim: GB/s, Newton-Schulz\n"
            "                                                TFLOP/s, launches per step\n\n"
            "examples:\n"
            "  fusedopt-bench --quick\n"
            "  fusedopt-bench --device cuda\n"
            "  fusedopt-bench --device cuda --workloads gpt2 llama1b --dtypes bf16 --compile\n"
            "  fusedopt-bench --optimizers AdamW AdamW:amsgrad=True SGD:momentum=0\n"
            "  fusedopt-bench --model mypkg.models:build_model --workloads flat:20\n"
            "  fusedopt-bench --e2e --e2e-steps 20\n"
            "  fusedopt-bench --list\n\n"
            "exit status: 0 when every configuration ran, 1 when any failed (failures are\n"
            "rows with status=error in the outputs), 2 for bad arguments."
        ),
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--workloads", nargs="+", metavar="NAME",
                   help="parameter-shape workloads: flat (the log-scale sweep, see --flat), "
                        "flat:LO-HI[:STEP] or flat:E (2^E elements), gpt2 (124M, 148 tensors), "
                        "llama1b, small2000 (or small<N>: N log-uniform 1e3-2.6e5 tensors, "
                        "fixed seed), resnet50. Default: "
                        + _per_device(DEFAULT_WORKLOADS, " ".join)
                        + ". Giving it (or --model) also drops the host section of the CPU run")
    p.add_argument("--model", action="append", default=[], metavar="MODULE:FACTORY",
                   help="add a workload with the parameter shapes of FACTORY() from MODULE, "
                        "built on the meta device (no memory); repeatable. With --model and "
                        "no --workloads, only the model(s) run")
    p.add_argument("--optimizers", nargs="+", metavar="NAME[:k=v,...]",
                   help=f"optimizers, case-insensitive, from: {', '.join(KNOWN)}; options "
                        "override the benchmark hyperparameters (lr=1e-4; AdamW "
                        "weight_decay=0.01; SGD momentum=0.9), e.g. AdamW:amsgrad=True. "
                        "Default: every one that fusedopt exports")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help=f"param/grad/state dtype, from: {', '.join(DTYPE_BYTES)} (default: "
                        + "; ".join(f"{d}: {' '.join(v)}" for d, v in DEFAULT_DTYPES.items())
                        + ")")
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help="implementations, from: " + ", ".join(impls_mod.all_impls()) +
                        ". Default: " + "; ".join(f"{d}: {' '.join(v)}" for d, v in
                                                  impls_mod.DEFAULT_IMPLS.items())
                        + "; plus every importable library. See --list")
    p.add_argument("--compile", action="store_true",
                   help="also run torch-compile (a torch.compile'd step; slow to compile, its "
                        "compile time is reported)")
    p.add_argument("--quick", action="store_true",
                   help="fewer/smaller workloads, fewer host steps and shorter timing: a smoke "
                        "test of the whole run, not a result")
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="output directory (default: ./bench-out)")
    p.add_argument("--flat", type=_flat_range, metavar="LO:HI[:STEP]",
                   help=f"log2 range of the flat sweep (default: {flat})")
    p.add_argument("--warmup", type=int,
                   help=f"warm-up steps before timing (default: {_settings_default('warmup')})")
    p.add_argument("--repeats", type=int,
                   help="timed runs per configuration; ms/step is their median and their "
                        f"spread flags noise (default: {_settings_default('repeats')})")
    p.add_argument("--target-ms", type=float,
                   help="wall time of one timed run, which sets the steps per run (default: "
                        f"{_settings_default('target_run_s')})")
    p.add_argument("--max-steps", type=int,
                   help=f"upper bound on steps per timed run (default: "
                        f"{_settings_default('max_steps')})")
    p.add_argument("--threads", type=int, default=measure.TIMING_THREADS,
                   help="torch intra-op threads while measuring, restored afterwards; more "
                        "threads on a small busy machine make CPU timings noise (default: "
                        f"{measure.TIMING_THREADS}; --e2e uses torch's default)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for data and small<N> shapes (default: 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no plan, no progress bar")
    p.add_argument("--list", action="store_true",
                   help="list workloads, optimizers (with bytes/param) and implementations "
                        "(with availability here), then exit")
    e = p.add_argument_group("end-to-end (--e2e)")
    e.add_argument("--e2e", action="store_true",
                   help="instead of the step micro-benchmark, train a small GPT on synthetic "
                        "tokens with each optimizer/impl; report forward+backward vs optimizer "
                        "time and tokens/s (writes e2e.json, e2e.csv, e2e.png)")
    e.add_argument("--e2e-model", choices=list(e2e_mod.CONFIGS),
                   help="model size (default: "
                        + "; ".join(f"{d}: {m}" for d, m in e2e_mod.DEFAULT_MODEL.items())
                        + f"; with --quick: {E2E_QUICK_MODEL})")
    for key, what in (("steps", "timed training steps"), ("warmup", "untimed first steps"),
                      ("batch", "sequences per batch")):
        e.add_argument(f"--e2e-{key}", type=int, default=None,
                       help=f"{what} (default: {E2E_DEFAULTS[False][key]}; "
                            f"{E2E_DEFAULTS[True][key]} with --quick)")
    return p


# ---------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------


@dataclass
class Request:
    """The names on the command line, resolved: every typo fails here, before measuring."""

    specs: list[OptSpec]
    dtypes: list[str]
    impls: list[Impl]
    workloads: list[Workload] = field(default_factory=list)
    jobs: list[tuple[Workload, OptSpec, str, Impl]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def resolve_request(args: argparse.Namespace, device: str) -> Request:
    """Resolve optimizers, dtypes, implementations and workloads, and list the configurations
    to measure and the skipped ones. Raises UnknownNameError / ValueError / ImportError."""
    specs = [OptSpec.parse(n) for n in _split(args.optimizers) or []]
    if not specs:
        names = impls_mod.fusedopt_optimizers()
        if not names:
            print(f"warning: fusedopt exports no optimizers; comparing torch on "
                  f"{', '.join(FALLBACK_OPTIMIZERS)}", file=sys.stderr)
            names = FALLBACK_OPTIMIZERS
        specs = [OptSpec(n) for n in names]
    dtypes = [canonical_dtype(d) for d in _split(args.dtypes) or DEFAULT_DTYPES[device]]
    impl_names = _split(args.impls) or impls_mod.default_impls(device)
    if args.compile and "torch-compile" not in impl_names:
        impl_names.append("torch-compile")
    req = Request(specs, dtypes, impls_mod.resolve(impl_names))
    if args.e2e:
        return req
    key = (device, args.quick)
    wl_names = _split(args.workloads)
    if wl_names is None:
        wl_names = [] if args.model else DEFAULT_WORKLOADS[key]
    req.workloads = workloads.resolve(wl_names, flat_range=args.flat or DEFAULT_FLAT[key],
                                      seed=args.seed)  # fmt: skip
    req.workloads += [workloads.from_model(m) for m in args.model]
    for impl in req.impls:
        if (why := impl.unavailable(device)) is not None:
            req.skipped.append({"impl": impl.name, "reason": why})
    runnable = [i for i in req.impls if i.unavailable(device) is None]
    for w in req.workloads:
        for spec in specs:
            for dtype in dtypes:
                for impl in runnable:
                    why = impls_mod.unsupported(impl, spec, device, dtype)
                    if why is None:
                        req.jobs.append((w, spec, dtype, impl))
                    elif w is req.workloads[0]:  # same reason for every workload: report once
                        req.skipped.append({"optimizer": spec.label, "dtype": dtype,
                                            "impl": impl.name, "reason": why})  # fmt: skip
    return req


def _settings(args: argparse.Namespace, device: str) -> measure.Settings:
    settings = measure.Settings.for_device(device, args.quick)
    settings.seed = args.seed
    for name, value in (("warmup", args.warmup), ("repeats", args.repeats),
                        ("max_steps", args.max_steps)):  # fmt: skip
        if value is not None:
            setattr(settings, name, value)
    if args.target_ms is not None:
        settings.target_run_s = args.target_ms / 1e3
    return settings


def is_cpu_default(args: argparse.Namespace, device: str) -> bool:
    """The bare CPU run: no workloads asked for, so the run says what a CPU can say."""
    return device == "cpu" and args.workloads is None and not args.model


def build_sections(args: argparse.Namespace, device: str, req: Request, meta: dict,
                   copy_gbps: float) -> list[Section]:
    """The run's sections, planned with ``copy_gbps`` (the measured ceiling)."""
    steps = steps_section(req, device, _settings(args, device), meta, args.out,
                          plots=not args.no_plots, copy_gbps=copy_gbps)
    sections = [steps]
    if is_cpu_default(args, device) and impls_mod.fusedopt_optimizers():
        sections = cpu_default_sections(args.quick, meta, args.out, steps)
    plan.add_first_use(sections)
    return sections


def cpu_default_sections(quick: bool, meta: dict, out: Path, steps: Section) -> list[Section]:
    """What a CPU can say about fusedopt, in order: the engine's host time (meaningful on any
    machine), the reference path as a sanity check against torch.optim, then a static
    roofline of a few kernel variants compiled for sm_90 (last: its compile workers start
    after the timed sections are done, so they do not disturb them)."""
    host = host_section(list(host_mod.DEFAULT_WORKLOADS), list(host_mod.DEFAULT_OPTIMIZERS),
                        list(host_mod.DEFAULT_DTYPES), "cpu", *host_mod.DEFAULT_STEPS[quick],
                        meta=meta, out=out)
    return [host, steps, static_section(quick, out)]


def static_subset(quick: bool) -> str:
    """What the bare CPU run's static section compiles, in words."""
    optimizers = (static_mod.BARE_RUN_QUICK_OPTIMIZERS if quick
                  else static_mod.BARE_RUN_OPTIMIZERS)
    dtypes = static_mod.BARE_RUN_QUICK_DTYPES if quick else static_mod.DEFAULT_DTYPES
    return f"{' '.join(optimizers)} in {' '.join(dtypes)}"


def static_section(quick: bool, out: Path) -> Section:
    """The bare CPU run's static roofline: a subset of ``fusedopt-bench static`` (which
    compiles every optimizer), small enough to keep the run under two minutes."""
    optimizers = (static_mod.BARE_RUN_QUICK_OPTIMIZERS if quick
                  else static_mod.BARE_RUN_OPTIMIZERS)
    dtypes = static_mod.BARE_RUN_QUICK_DTYPES if quick else static_mod.DEFAULT_DTYPES
    jobs, skipped = static_mod.enumerate_jobs(optimizers, dtypes, static_mod.DEFAULT_FLAGS,
                                              False, static_mod.DEFAULT_ARCHS)
    subset = (f"subset: {static_subset(quick)} (the bare run's; `fusedopt-bench static` "
              "compiles every optimizer)")
    return static_mod.section(jobs, skipped, out, subset=subset, command="fusedopt-bench")


def steps_section(req: Request, device: str, settings: measure.Settings, meta: dict,
                  out: Path, *, plots: bool, copy_gbps: float) -> Section:
    """The step micro-benchmark: one row per (workload, optimizer, dtype, impl)."""
    jobs = []
    for w, spec, dtype, impl in req.jobs:
        bpp = bytes_per_param(spec.name, dtype, spec.hparams)
        jobs.append(Job(f"{w.name} {spec.label} {dtype} {impl.name}",
                        plan.row_seconds(w, bpp, impl.name, device, settings, copy_gbps),
                        functools.partial(measure.measure_one, w, spec, dtype, impl, device,
                                          settings)))  # fmt: skip
    figures = (len({(s.label, d) for _, s, d, _ in req.jobs})  # GB/s, one per (optimizer, dtype)
               + len({w.family for w, *_ in req.jobs}) + 1) if plots and req.jobs else 0

    def finish(rows: list[dict]) -> SectionOutput:
        if not rows:
            return SectionOutput("nothing to run: no implementation supports the requested "
                                 "optimizers here", [], False)
        report.add_derived(rows, meta, impls_mod.BASELINE_ORDER[device])
        report.write_json(out / "results.json", meta, rows, req.skipped)
        report.write_csv(out / "results.csv", rows)
        text = report.format_table(rows, meta)
        if req.skipped:
            text += (f"\n\nskipped {len(req.skipped)} (implementation, optimizer) pair(s): "
                     + "; ".join(f"{s['impl']}{' ' + s['optimizer'] if 'optimizer' in s else ''}"
                                 f": {s['reason']}" for s in _dedupe(req.skipped)))  # fmt: skip
        files = [out / "results.json", out / "results.csv"]
        if plots:
            files += _plots(rows, out)
        return SectionOutput(text, files, all(r["status"] == "ok" for r in rows))

    return Section(STEPS_TITLE[device], jobs, finish, finish_s=figures * plan.PLOT_S)


def host_section(workload_names: list[str], optimizers: list[str], dtypes: list[str],
                 device: str, steps: int, repeats: int, *, meta: dict,
                 out: Path | None) -> Section:
    """The engine's host time per step (``host.measure_host``), one row per configuration."""
    loads = workloads.resolve(workload_names)
    specs = [OptSpec.parse(n) for n in optimizers]
    jobs = [Job(f"host {w.name} {s.label} {d}", host_mod.planned_seconds(w, steps, repeats),
                functools.partial(host_mod.measure_host, w, s, d, device, steps, repeats))
            for w in loads for s in specs for d in (canonical_dtype(x) for x in dtypes)]

    def finish(rows: list[dict]) -> SectionOutput:
        files = []
        if out is not None and rows:
            out.mkdir(parents=True, exist_ok=True)
            (out / "host.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                      default=str) + "\n")
            report.write_csv(out / "host.csv", rows, fields=host_mod.FIELDS)
            files = [out / "host.json", out / "host.csv"]
        return SectionOutput(host_mod.format_host_table(rows), files,
                             all(r["status"] == "ok" for r in rows))

    return Section(HOST_TITLE, jobs, finish)


def run_sections(sections: list[Section], quiet: bool) -> tuple[list[list[dict]], float]:
    """Run every job, with one progress bar for them all: (rows per section, seconds)."""
    progress = Progress([j.planned_s for s in sections for j in s.jobs], enabled=not quiet)
    results = []
    for section in sections:
        rows = []
        for job in section.jobs:
            progress.start(job.label)
            rows.append(job.run())
            progress.advance()
        results.append(rows)
    progress.close()
    return results, progress.elapsed


def _print_sections(sections: list[Section], outputs: list[SectionOutput]) -> None:
    for i, (section, output) in enumerate(zip(sections, outputs), 1):
        if i > 1:
            print()
        number = f"{i}. " if len(sections) > 1 else ""
        print(f"== {number}{section.title} ==\n")
        print(output.text)


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def _plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fusedopt-bench plot",
                                description="Draw the benchmark plots from a results CSV "
                                            "written by fusedopt-bench, without measuring. "
                                            "As in a fresh run, a noisy row gets no bar.")
    p.add_argument("csv", type=Path, help="results.csv from a previous run")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the PNGs (default: the CSV's directory)")
    args = p.parse_args(argv)
    if not args.csv.is_file():
        p.error(f"no such file: {args.csv}")
    try:
        rows = report.read_csv(args.csv)
    except ValueError as err:
        p.error(str(err))
    from . import plots

    paths = plots.plot_all(rows, args.out or args.csv.parent)
    for path in paths:
        print(path)
    if not paths:
        print("no successful rows to plot", file=sys.stderr)
        return 1
    return 0


def _timing_options(p: argparse.ArgumentParser, files: str) -> None:
    """--threads, --out and --quiet of a subcommand that times and writes ``files``.json/csv."""
    p.add_argument("--threads", type=int, default=measure.TIMING_THREADS,
                   help="torch intra-op threads while timing, restored afterwards "
                        f"(default: {measure.TIMING_THREADS})")
    p.add_argument("--out", type=Path, default=None,
                   help=f"also write {files}.json and {files}.csv here (default: print only)")
    p.add_argument("--quiet", action="store_true", help="no plan, no progress bar")


def build_host_parser() -> argparse.ArgumentParser:
    """The parser of ``fusedopt-bench host``; defaults come from ``host``'s constants."""
    steps, repeats = host_mod.DEFAULT_STEPS[False]
    quick_steps, quick_repeats = host_mod.DEFAULT_STEPS[True]
    p = argparse.ArgumentParser(
        prog="fusedopt-bench host",
        description="Time the host side of fusedopt's step (the Python work around its one "
                    "kernel launch) with the launch replaced by a no-op, on any machine: "
                    "with the same grads every step (steady) and with new grad storage every "
                    "step (new grads, as zero_grad(set_to_none=True) gives), against a floor: "
                    "one Python pass reading p.grad.data_ptr() over the same tensors, timed "
                    "the same way. Prints ms per step and the ratios to the floor.")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the tensors live (default: cuda if available, else cpu)")
    p.add_argument("--workloads", default=",".join(host_mod.DEFAULT_WORKLOADS),
                   help="comma-separated workload names, as for fusedopt-bench --workloads "
                        f"(default: {','.join(host_mod.DEFAULT_WORKLOADS)})")
    p.add_argument("--optimizers", default=",".join(host_mod.DEFAULT_OPTIMIZERS),
                   help="comma-separated fusedopt optimizers, Name[:k=v] "
                        f"(default: {','.join(host_mod.DEFAULT_OPTIMIZERS)})")
    p.add_argument("--dtypes", default=",".join(host_mod.DEFAULT_DTYPES),
                   help=f"comma-separated dtypes (default: {','.join(host_mod.DEFAULT_DTYPES)})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per repeat (default: {steps}; {quick_steps} with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"repeats; the median is reported (default: {repeats}; {quick_repeats} "
                        "with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats: a smoke test")
    _timing_options(p, "host")
    return p


def _host_main(argv: list[str]) -> int:
    p = build_host_parser()
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    default_steps, default_repeats = host_mod.DEFAULT_STEPS[args.quick]
    optimizers = _split([args.optimizers]) or []
    meta = {"device": device, "device_name": measure.device_name(device), **report.versions(),
            "timing_threads": args.threads, "torch_num_threads": torch.get_num_threads(),
            "command": "fusedopt-bench host " + " ".join(argv)}
    try:
        present = impls_mod.fusedopt_optimizers()
        missing = [s.name for s in map(OptSpec.parse, optimizers) if s.name not in present]
        if missing:
            p.error(f"not a fusedopt optimizer: {', '.join(missing)}; "
                    f"fusedopt has {', '.join(present)}")
        section = host_section(_split([args.workloads]) or [], optimizers,
                               _split([args.dtypes]) or [], device,
                               args.steps or default_steps, args.repeats or default_repeats,
                               meta=meta, out=args.out)
    except ValueError as err:  # UnknownNameError is a ValueError
        p.error(str(err))
    if not args.quiet:
        print(plan.describe([section]), file=sys.stderr)
    with measure.pinned_threads(args.threads):
        (rows,), _ = run_sections([section], args.quiet)
    output = section.finish(rows)
    print(output.text)
    return 0 if output.ok else 1


def build_static_parser() -> argparse.ArgumentParser:
    """The parser of ``fusedopt-bench static``; defaults come from ``static``'s constants."""
    archs = " ".join(map(str, static_mod.KNOWN_ARCHS))
    p = argparse.ArgumentParser(
        prog="fusedopt-bench static",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "A static roofline of fusedopt's kernels, without a GPU: compile each kernel\n"
            "variant for a GPU target here (triton's compiler and ptxas run on the CPU),\n"
            "disassemble it (cuobjdump, shipped with triton), find its aligned hot path in\n"
            "the SASS and count what one thread issues there per element: 16-byte loads and\n"
            "stores, bytes (checked against the bytes model), instructions, hyperparameter\n"
            "reloads after stores, reads in flight per SM; plus registers, spills, shared\n"
            "memory, atomics and fences and where they are. A stated model turns the counts\n"
            "into a predicted % of the copy bandwidth on an H100 and an H200 (the legend\n"
            "under the table and the docstring of fusedopt.perf.static give every definition\n"
            "and assumption).\n\n"
            "Writes static.json, static.csv, static.png and sass/<variant>-<kernel>-<dtype>-\n"
            "sm<arch>.sass (each instruction tagged with its place and whether the hot path\n"
            "counts it) to --out. Variants: every optimizer fusedopt exports x its variant\n"
            "flags x dtype x AMP/clip x the kernels it launches (step, and sums for LAMB)."),
        epilog=(
            "examples:\n"
            "  fusedopt-bench static\n"
            "  fusedopt-bench static --optimizers AdamW Adam:amsgrad=True --dtypes bf16 --amp\n"
            "  fusedopt-bench static --flags all --arch 80 90 100\n"
            "  fusedopt-bench static --full --jobs 8\n\n"
            "exit status: 0 when every kernel compiled and was analysed, 1 otherwise, 2 for\n"
            "bad arguments."))
    p.add_argument("--optimizers", nargs="+", metavar="NAME[:k=v,...]",
                   help="optimizers, case-insensitive, from: "
                        + ", ".join(impls_mod.fusedopt_optimizers())
                        + "; Name:k=v,... = the one variant those constructor options give "
                          "(e.g. Adam:amsgrad=True, SGD:momentum=0.9,nesterov=True). Default: "
                          "every optimizer fusedopt exports")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help=f"storage dtypes, from: {', '.join(static_mod.ALL_DTYPES)} (default: "
                        f"{' '.join(static_mod.DEFAULT_DTYPES)})")
    p.add_argument("--flags", choices=["default", "all"], default=static_mod.DEFAULT_FLAGS,
                   help="variant flags: default = those of each optimizer's torch defaults; "
                        "all = every combination of its algorithm's flags that its spec and "
                        f"torch accept (default: {static_mod.DEFAULT_FLAGS})")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="also compile each variant launched with GradScaler's grad_scale and "
                        "found_inf and a clip coefficient (unscale, skip-on-inf and clip on) "
                        "(default: --no-amp)")
    p.add_argument("--arch", nargs="+", type=int, metavar="SM",
                   help=f"target architectures, from: {archs} (sm_80 A100, sm_90 H100/H200, "
                        "sm_100 B200), where the installed triton's ptxas can build them "
                        f"(default: {' '.join(map(str, static_mod.DEFAULT_ARCHS))})")
    p.add_argument("--full", action="store_true",
                   help="the whole set: every optimizer, --flags all, every dtype, --amp, "
                        "every arch this triton can target: over a thousand kernels (--full "
                        "--list counts them), about an hour on 2 cores with a cold compiler "
                        "cache")
    p.add_argument("--jobs", type=int, default=static_mod.DEFAULT_WORKERS,
                   help="compile worker processes (default: min(4, CPU count) = "
                        f"{static_mod.DEFAULT_WORKERS} here)")
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="output directory (default: ./bench-out)")
    p.add_argument("--list", action="store_true",
                   help="list the kernels the options select (and the flag combinations "
                        "skipped, with why), then exit without compiling")
    p.add_argument("--no-plots", action="store_true", help="skip static.png")
    p.add_argument("--quiet", action="store_true", help="no plan, no progress bar")
    return p


def _static_main(argv: list[str]) -> int:
    p = build_static_parser()
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    try:
        supported = static_mod.supported_archs()
    except FileNotFoundError as err:
        p.error(f"cannot compile here: {err}")
    archs = supported if args.full else (args.arch or list(static_mod.DEFAULT_ARCHS))
    unknown = [a for a in archs if a not in supported]
    if unknown:
        p.error(f"sm_{unknown[0]}: the installed triton cannot target it here; it can target "
                + ", ".join(f"sm_{a}" for a in supported))
    try:
        jobs, skipped = static_mod.enumerate_jobs(
            None if args.full else static_mod.split_optimizers(args.optimizers),
            static_mod.ALL_DTYPES if args.full else (_split(args.dtypes)
                                                      or static_mod.DEFAULT_DTYPES),
            "all" if args.full else args.flags, args.full or args.amp, archs)
    except (ValueError, TypeError) as err:  # UnknownNameError is a ValueError
        p.error(str(err))
    if args.list:
        for job in jobs:
            print(f"{job.key:<56} states={','.join(job.states) or '-'}")
        for s in skipped:
            print(f"skipped {s['variant']}: {s['reason']}")
        print(f"{len(jobs)} kernel(s)")
        return 0
    if not jobs:
        p.error("nothing to compile")
    section = static_mod.section(jobs, skipped, args.out, workers=args.jobs,
                                 plots=not args.no_plots,
                                 command="fusedopt-bench static " + " ".join(argv))
    if not args.quiet:
        print(plan.describe([section]), file=sys.stderr)
    (rows,), _ = run_sections([section], args.quiet)
    output = section.finish(rows)
    print(output.text)
    print("\nwrote " + ", ".join(str(f) for f in output.files))
    return 0 if output.ok else 1


MATRIX_TITLE = "Muon, Adafactor and SparseAdam against torch.optim"


def build_matrix_parser() -> argparse.ArgumentParser:
    """The parser of ``fusedopt-bench matrix``."""
    p = argparse.ArgumentParser(
        prog="fusedopt-bench matrix",
        description="Time the optimizers that are not element-wise (Muon and Adafactor: "
                    "whole tensors; SparseAdam: the rows of sparse grads) against torch.optim, "
                    "one step after another: ms/step, GB/s and %% of the copy bandwidth, "
                    "Muon's Newton-Schulz TFLOP/s and %% of the bf16 matmul throughput (both "
                    "measured in the same run), launches per step, and the difference from "
                    "torch.optim after one step. On a GPU: GPT-2 124M's shapes; without one: "
                    "a GPT of width 128 and 2 layers, fusedopt's reference path (a sanity "
                    "check).")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--optimizers", default=",".join(matrix_mod.OPTIMIZERS),
                   help=f"comma-separated, among {', '.join(matrix_mod.OPTIMIZERS)} (default: "
                        "all)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated dtypes (default: fp32,bf16 on cuda, fp32 on cpu)")
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs: a smoke test")
    _timing_options(p, "matrix")
    return p


def matrix_section(optimizers: list[str], dtypes: list[str], device: str,
                   settings: measure.Settings, meta: dict, out: Path | None) -> Section:
    """The rows of ``fusedopt-bench matrix``: each job against torch.optim."""
    impl = "fusedopt" if device == "cuda" else "fusedopt-reference"
    jobs = [Job(f"matrix {j.optimizer} {name} {d}", matrix_mod.planned_seconds(j, device,
                                                                              settings),
                functools.partial(matrix_mod.measure_row, j, name, d, device, settings,
                                  meta["copy_gbps"], meta["matmul_tflops"]))
            for j in matrix_mod.default_jobs(device, tuple(optimizers))
            for d in dtypes for name in (impl, "torch")]

    def finish(rows: list[dict]) -> SectionOutput:
        files = []
        if out is not None and rows:
            out.mkdir(parents=True, exist_ok=True)
            (out / "matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                        default=str) + "\n")
            report.write_csv(out / "matrix.csv", rows, fields=matrix_mod.FIELDS)
            files = [out / "matrix.json", out / "matrix.csv"]
        return SectionOutput(matrix_mod.format_table(rows, meta), files,
                             all(r["status"] == "ok" for r in rows))

    return Section(MATRIX_TITLE, jobs, finish)


def _matrix_main(argv: list[str]) -> int:
    p = build_matrix_parser()
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    optimizers = _split([args.optimizers]) or []
    unknown = [o for o in optimizers if o not in matrix_mod.OPTIMIZERS]
    if unknown:
        p.error(f"not among {', '.join(matrix_mod.OPTIMIZERS)}: {', '.join(unknown)}")
    try:
        dtypes = [canonical_dtype(d) for d in
                  (_split([args.dtypes]) if args.dtypes else DEFAULT_DTYPES[device])]
    except ValueError as err:
        p.error(str(err))
    settings = measure.Settings.for_device(device, args.quick)
    with measure.pinned_threads(args.threads):
        if not args.quiet:
            print("measuring copy bandwidth and bf16 matmul throughput ...", file=sys.stderr)
        meta = {"device": device, "device_name": measure.device_name(device),
                **report.versions(), "timing_threads": args.threads,
                "copy_gbps": measure.measure_ceiling(device)["gbps"],
                "matmul_tflops": matrix_mod.measure_matmul_peak(device),
                "command": "fusedopt-bench matrix " + " ".join(argv)}
        section = matrix_section(optimizers, dtypes, device, settings, meta, args.out)
        if not args.quiet:
            print(plan.describe([section]), file=sys.stderr)
        (rows,), _ = run_sections([section], args.quiet)
    output = section.finish(rows)
    print(output.text)
    return 0 if output.ok else 1


def _list(device: str) -> int:
    print("workloads:")
    for w in workloads.resolve(["gpt2", "llama1b", "resnet50", "small2000"]):
        print(f"  {w.name:<10} {w.num_tensors:>5} tensors {w.numel:>14,} params  {w.description}")
    lo, hi, st = DEFAULT_FLAT[(device, False)]
    print(f"  flat       sweep 2^{lo}..2^{hi} step {st} on {device} (--flat to change);"
          " flat:E, flat:LO-HI[:STEP], small<N>, --model MODULE:FACTORY")
    present = impls_mod.fusedopt_optimizers()
    print("\noptimizers (bytes/param fp32 / bf16; * = exported by fusedopt):")
    for name in KNOWN:
        hp = OptSpec(name).hparams
        b32, b16 = bytes_per_param(name, "fp32", hp), bytes_per_param(name, "bf16", hp)
        star = "*" if name in present else " "
        print(f"  {star} {name:<9} {b32:>3} / {b16:>2} B   bench hparams {hp}")
    print(f"\nimplementations on {device}:")
    for name, impl in impls_mod.all_impls().items():
        why = impl.unavailable(device)
        flag = "opt-in" if impl.opt_in else ("available" if why is None else "unavailable")
        print(f"  {name:<18} {flag:<11} {impl.description}" + (f"  [{why}]" if why else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fusedopt-bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        return _plot_main(argv[1:])
    if argv[:1] == ["host"]:
        return _host_main(argv[1:])
    if argv[:1] == ["static"]:
        return _static_main(argv[1:])
    if argv[:1] == ["matrix"]:
        return _matrix_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.list:
        return _list(device)
    try:  # every name first, so that a typo fails before any measuring
        req = resolve_request(args, device)
    except (ValueError, ImportError, AttributeError) as err:  # UnknownNameError is a ValueError
        parser.error(str(err))

    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device == "cpu" and interpreting and any(i.name == "fusedopt" for i in req.impls):
        print("warning: TRITON_INTERPRET is set, so the fusedopt impl runs triton's interpreter "
              "(very slow); use --impls fusedopt-reference ... for the CPU reference path",
              file=sys.stderr)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    if args.e2e:
        return _run_e2e(args, device, req)

    default_threads = torch.get_num_threads()
    with measure.pinned_threads(args.threads):
        dev_name = measure.device_name(device)
        if not args.quiet:
            print(f"measuring copy bandwidth on {dev_name} ...", file=sys.stderr)
        ceiling = measure.measure_ceiling(device)
        meta = report.make_meta(
            device, dev_name, ceiling, timing_threads=args.threads,
            cache_bytes=measure.cache_bytes(device), settings=vars(_settings(args, device)),
            workloads={w.name: {"tensors": w.num_tensors, "numel": w.numel,
                                "description": w.description} for w in req.workloads})
        meta["torch_num_threads"] = default_threads
        sections = build_sections(args, device, req, meta, ceiling["gbps"])
        meta["planned_s"] = sum(s.planned_s for s in sections)
        meta["sections"] = [s.title for s in sections]
        if not args.quiet:
            print(plan.describe(sections), file=sys.stderr)
        results, meta["elapsed_s"] = run_sections(sections, args.quiet)

    outputs = [s.finish(rows) for s, rows in zip(sections, results)]
    _print_sections(sections, outputs)
    written = [f for o in outputs for f in o.files]
    report.write_summary(args.out / "README.md", meta,
                         [(s.title, o.text) for s, o in zip(sections, outputs)], written)
    written.append(args.out / "README.md")
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0 if all(o.ok for o in outputs) else 1


def _dedupe(skipped: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in skipped:
        k = (s["impl"], s.get("optimizer"), s["reason"])
        if k not in seen:
            seen.add(k)
            out.append(s)
    return out


def _plots(rows: list[dict], out: Path) -> list[Path]:
    try:
        from . import plots

        return plots.plot_all(rows, out)
    except ImportError as err:  # matplotlib is in the [perf] extra, not a hard dependency
        print(f"plots skipped: {err} (pip install matplotlib)", file=sys.stderr)
        return []


def _run_e2e(args: argparse.Namespace, device: str, req: Request) -> int:
    defaults = E2E_DEFAULTS[args.quick]
    model = args.e2e_model or (E2E_QUICK_MODEL if args.quick else e2e_mod.DEFAULT_MODEL[device])
    steps = args.e2e_steps or defaults["steps"]
    warmup = args.e2e_warmup if args.e2e_warmup is not None else defaults["warmup"]
    batch = args.e2e_batch or defaults["batch"]
    dev_name = measure.device_name(device)
    n_jobs = sum(1 for _ in req.dtypes for s in req.specs for i in req.impls
                 if i.unavailable(device) is None
                 and impls_mod.unsupported(i, s, device, "") is None)
    progress = Progress([1.0] * n_jobs, enabled=not args.quiet)  # no time model: equal shares
    rows, skipped = e2e_mod.run_e2e(device, req.specs, req.dtypes, req.impls, model_name=model,
                                    steps=steps, warmup=warmup, batch=batch, seed=args.seed,
                                    progress=progress)  # fmt: skip
    progress.close()
    env = {"device": device, "device_name": dev_name, **report.versions()}
    for r in rows:
        r.update({k: env.get(k) for k in ("device", "device_name", "torch_version",
                                          "triton_version", "fusedopt_version")})
    (args.out / "e2e.json").write_text(json.dumps(
        {"schema": "fusedopt-bench-e2e/1", "meta": {**env, "model": model, "steps": steps,
         "warmup": warmup, "batch": batch, "argv": sys.argv[1:]},
         "rows": [{k: r.get(k) for k in e2e_mod.E2E_FIELDS} for r in rows],
         "skipped": skipped}, indent=2) + "\n")  # fmt: skip
    report.write_csv(args.out / "e2e.csv", rows, e2e_mod.E2E_FIELDS)
    print(f"end-to-end: {model} ({rows[0].get('num_params', 0):,} params) on {dev_name}, "
          f"batch {batch}, {steps} timed steps" if rows else "end-to-end: nothing ran")
    print(e2e_mod.format_e2e(rows))
    written = [args.out / "e2e.json", args.out / "e2e.csv"]
    if not args.no_plots:
        try:
            from . import plots

            written += plots.plot_e2e(rows, args.out)
        except ImportError as err:
            print(f"plots skipped: {err}", file=sys.stderr)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1
