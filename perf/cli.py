"""The ``fusedopt-bench`` command (also ``python -m fusedopt.perf``).

    fusedopt-bench [options]            measure, print a table, write JSON/CSV/PNG
    fusedopt-bench --e2e [options]      end-to-end small-GPT training split
    fusedopt-bench plot RESULTS.csv     re-draw the plots from a results CSV
    fusedopt-bench host [options]       host-side ms per step, kernel launch stubbed out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from . import e2e as e2e_mod
from . import impls as impls_mod
from . import measure, report, workloads
from .bytes_model import DTYPE_BYTES, KNOWN, bytes_per_param, canonical_dtype
from .workloads import UnknownNameError

#: What runs when --workloads is not given.
DEFAULT_WORKLOADS = {
    ("cuda", False): ["flat", "gpt2", "llama1b", "small2000", "resnet50"],
    ("cpu", False): ["flat", "small200", "resnet50"],
    ("cuda", True): ["flat", "gpt2", "small2000"],
    ("cpu", True): ["flat", "small100"],
}
#: Flat sweep (log2 first, last, step) when --flat is not given.
DEFAULT_FLAT = {("cuda", False): (12, 28, 2), ("cpu", False): (12, 21, 3),
                ("cuda", True): (12, 28, 4), ("cpu", True): (12, 20, 4)}  # fmt: skip
DEFAULT_DTYPES = {"cuda": ["fp32", "bf16"], "cpu": ["fp32"]}
FALLBACK_OPTIMIZERS = ["Adam", "AdamW", "SGD"]


class Progress:
    """A plain-stderr progress bar: ``[#####.....] 12/40  0:34<1:10  label``.

    Redraws in place on a terminal; prints one line per item otherwise (CI logs).
    """

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    @staticmethod
    def _clock(seconds: float) -> str:
        m, s = divmod(int(seconds), 60)
        return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"

    def start(self, label: str) -> None:
        """Show that item ``done + 1`` (``label``) is starting."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        width = 24
        fill = int(width * self.done / self.total)
        text = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done + 1}/{self.total} "
                f"{self._clock(elapsed)}<{'?' if eta is None else self._clock(eta)}  {label}")
        if self.tty:
            self.stream.write("\r\033[K" + text[:160])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def advance(self) -> None:
        """Mark the current item finished."""
        self.done += 1

    def close(self) -> None:
        """End the bar (newline on a terminal) and print the total time."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"{self.done}/{self.total} done in "
                          f"{self._clock(time.perf_counter() - self.t0)}\n")
        self.stream.flush()


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` documents every option."""
    p = argparse.ArgumentParser(
        prog="fusedopt-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure optimizer-step throughput of fusedopt against torch.optim (and any\n"
            "importable apex / bitsandbytes / torchao / optimi / flashoptim), as effective\n"
            "GB/s, % of the device's copy bandwidth measured in the same run, and speedup\n"
            "vs torch fused (CUDA) or torch's default implementation (CPU).\n\n"
            "Writes results.json, results.csv, PNG plots and a README.md summary to --out,\n"
            "and prints a table.\n"
            "With no arguments on a machine without a GPU: a short CPU comparison."
        ),
        epilog=(
            "other commands:\n"
            "  fusedopt-bench plot RESULTS.csv [--out DIR]   redraw the plots, no measuring\n\n"
            "examples:\n"
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
                        "fixed seed), resnet50. Default on cuda: flat gpt2 llama1b small2000 "
                        "resnet50; on cpu: flat small200 resnet50")
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
                   help=f"param/grad/state dtype, from: {', '.join(DTYPE_BYTES)} "
                        "(default: fp32 bf16 on cuda, fp32 on cpu)")
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help="implementations, from: " + ", ".join(impls_mod.all_impls()) +
                        ". Default on cuda: fusedopt torch-foreach torch-fused torch-fused-graph "
                        "+ every importable library; on cpu: fusedopt torch torch-foreach "
                        "torch-fused. See --list")
    p.add_argument("--compile", action="store_true",
                   help="also run torch-compile (a torch.compile'd step; slow to compile, its "
                        "compile time is reported)")
    p.add_argument("--quick", action="store_true",
                   help="fewer/smaller workloads and shorter timing: a smoke test, not a result")
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="output directory (default: ./bench-out)")
    p.add_argument("--flat", type=_flat_range, metavar="LO:HI[:STEP]",
                   help="log2 range of the flat sweep (default 12:28:2 on cuda, 12:22:2 on cpu)")
    p.add_argument("--warmup", type=int, help="warm-up steps before timing")
    p.add_argument("--repeats", type=int, help="timed runs per configuration (median reported)")
    p.add_argument("--target-ms", type=float,
                   help="wall time of one timed run; sets the steps per run (default 100 cpu, "
                        "200 cuda)")
    p.add_argument("--max-steps", type=int, help="upper bound on steps per timed run")
    p.add_argument("--seed", type=int, default=0, help="seed for data and small<N> shapes")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true",
                   help="list workloads, optimizers (with bytes/param) and implementations "
                        "(with availability here), then exit")
    e = p.add_argument_group("end-to-end (--e2e)")
    e.add_argument("--e2e", action="store_true",
                   help="instead of the step micro-benchmark, train a small GPT on synthetic "
                        "tokens with each optimizer/impl; report forward+backward vs optimizer "
                        "time and tokens/s (writes e2e.json, e2e.csv, e2e.png)")
    e.add_argument("--e2e-model", choices=list(e2e_mod.CONFIGS),
                   help="model size (default: gpt2 = 124M on cuda, tiny = 4M on cpu)")
    e.add_argument("--e2e-steps", type=int, default=None,
                   help="timed training steps (default 20; 5 with --quick)")
    e.add_argument("--e2e-warmup", type=int, default=None,
                   help="untimed first steps (default 3; 1 with --quick)")
    e.add_argument("--e2e-batch", type=int, default=None, help="sequences per batch (default 8)")
    return p


def _plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fusedopt-bench plot",
                                description="Draw the benchmark plots from a results CSV "
                                            "written by fusedopt-bench, without measuring.")
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


def _host_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fusedopt-bench host",
        description="Time the host side of fusedopt's step (Python work around the launch) "
                    "with the kernel launch replaced by a no-op: with the same grads every "
                    "step, and with new grad storage every step (zero_grad(set_to_none=True)).")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the tensors live (default: cuda if available, else cpu)")
    p.add_argument("--workloads", default="small2000,gpt2",
                   help="comma-separated workload names (default: small2000,gpt2)")
    p.add_argument("--optimizers", default="AdamW", help="comma-separated fusedopt optimizers")
    p.add_argument("--dtypes", default="fp32", help="comma-separated dtypes (default: fp32)")
    p.add_argument("--steps", type=int, default=100, help="steps per repeat (default: 100)")
    p.add_argument("--out", type=Path, default=None, help="also write host.json and host.csv here")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    try:
        loads = workloads.resolve(_split([args.workloads]) or [])
        specs = [impls_mod.OptSpec.parse(n) for n in _split([args.optimizers]) or []]
        dtypes = [canonical_dtype(d) for d in _split([args.dtypes]) or []]
    except (UnknownNameError, ValueError) as err:
        p.error(str(err))
    present = impls_mod.fusedopt_optimizers()
    missing = [s.name for s in specs if s.name not in present]
    if missing:
        p.error(f"not a fusedopt optimizer: {', '.join(missing)}; "
                f"fusedopt has {', '.join(present)}")
    from . import host

    rows = [host.measure_host(w, s, d, device, steps=args.steps)
            for w in loads for s in specs for d in dtypes]
    print(host.format_host_table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": device, "device_name": measure.device_name(device),
                **report.versions(), "command": "fusedopt-bench host " + " ".join(argv)}
        (args.out / "host.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        report.write_csv(args.out / "host.csv", rows, fields=list(rows[0]))
    return 0


def _list(device: str) -> int:
    print("workloads:")
    for w in workloads.resolve(["gpt2", "llama1b", "resnet50", "small2000"]):
        print(f"  {w.name:<10} {w.num_tensors:>5} tensors {w.numel:>14,} params  {w.description}")
    lo, hi, st = workloads.FLAT_RANGE[device]
    print(f"  flat       sweep 2^{lo}..2^{hi} step {st} on {device} (--flat to change);"
          " flat:E, flat:LO-HI[:STEP], small<N>, --model MODULE:FACTORY")
    present = impls_mod.fusedopt_optimizers()
    print("\noptimizers (bytes/param fp32 / bf16; * = exported by fusedopt):")
    for name in KNOWN:
        hp = impls_mod.OptSpec(name).hparams
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
    parser = build_parser()
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    if args.list:
        return _list(device)
    key = (device, args.quick)

    # Resolve every name first so that a typo fails before any measuring.
    try:
        specs = [impls_mod.OptSpec.parse(n) for n in _split(args.optimizers) or []]
        if not specs:
            names = impls_mod.fusedopt_optimizers()
            if not names:
                print(f"warning: fusedopt exports no optimizers; comparing torch on "
                      f"{', '.join(FALLBACK_OPTIMIZERS)}", file=sys.stderr)
                names = FALLBACK_OPTIMIZERS
            specs = [impls_mod.OptSpec(n) for n in names]
        dtypes = [canonical_dtype(d) for d in _split(args.dtypes) or DEFAULT_DTYPES[device]]
        impl_names = _split(args.impls) or impls_mod.default_impls(device)
        if args.compile and "torch-compile" not in impl_names:
            impl_names.append("torch-compile")
        impls = impls_mod.resolve(impl_names)
        if not args.e2e:
            wl_names = _split(args.workloads)
            if wl_names is None:
                wl_names = [] if args.model else DEFAULT_WORKLOADS[key]
            wls = workloads.resolve(wl_names, flat_range=args.flat or DEFAULT_FLAT[key],
                                    seed=args.seed)  # fmt: skip
            wls += [workloads.from_model(m) for m in args.model]
    except UnknownNameError as err:
        parser.error(str(err))
    except (ValueError, ImportError, AttributeError) as err:
        parser.error(str(err))

    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device == "cpu" and interpreting and any(i.name == "fusedopt" for i in impls):
        print("warning: TRITON_INTERPRET is set, so the fusedopt impl runs triton's interpreter "
              "(very slow); use --impls fusedopt-reference ... for the CPU reference path",
              file=sys.stderr)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    if args.e2e:
        return _run_e2e(args, device, specs, dtypes, impls)

    settings = measure.Settings.for_device(device, args.quick)
    settings.seed = args.seed
    for field, value in (("warmup", args.warmup), ("repeats", args.repeats),
                         ("max_steps", args.max_steps)):  # fmt: skip
        if value is not None:
            setattr(settings, field, value)
    if args.target_ms is not None:
        settings.target_run_s = args.target_ms / 1e3

    jobs, skipped = [], []
    for impl in impls:
        if (why := impl.unavailable(device)) is not None:
            skipped.append({"impl": impl.name, "reason": why})
    runnable = [i for i in impls if i.unavailable(device) is None]
    for w in wls:
        for spec in specs:
            for dtype in dtypes:
                for impl in runnable:
                    why = impl.unsupported(spec.name, device, dtype)
                    if why is None:
                        jobs.append((w, spec, dtype, impl))
                    elif w is wls[0]:  # same reason for every workload: report once
                        skipped.append({"optimizer": spec.label, "dtype": dtype,
                                        "impl": impl.name, "reason": why})  # fmt: skip

    dev_name = measure.device_name(device)
    if not args.quiet:
        print(f"measuring copy bandwidth on {dev_name} ...", file=sys.stderr)
    ceiling = measure.measure_ceiling(device)
    meta = report.make_meta(device, dev_name, ceiling, settings=vars(settings),
                            workloads={w.name: {"tensors": w.num_tensors, "numel": w.numel,
                                                "description": w.description} for w in wls})
    progress = Progress(len(jobs), enabled=not args.quiet)
    rows = []
    for w, spec, dtype, impl in jobs:
        progress.start(f"{w.name} {spec.label} {dtype} {impl.name}")
        rows.append(measure.measure_one(w, spec, dtype, impl, device, settings))
        progress.advance()
    progress.close()

    report.add_derived(rows, meta, impls_mod.BASELINE_ORDER[device])
    report.write_json(args.out / "results.json", meta, rows, skipped)
    report.write_csv(args.out / "results.csv", rows)
    table = report.format_table(rows, meta)
    print(table)
    if skipped:
        print(f"\nskipped {len(skipped)} (implementation, optimizer) pair(s): "
              + "; ".join(f"{s['impl']}{' ' + s['optimizer'] if 'optimizer' in s else ''}: "
                          f"{s['reason']}" for s in _dedupe(skipped)))  # fmt: skip
    if not jobs:
        print("nothing to run: no implementation supports the requested optimizers here",
              file=sys.stderr)
        return 1
    written = [args.out / "results.json", args.out / "results.csv"]
    if not args.no_plots:
        written += _plots(rows, args.out)
    report.write_summary(args.out / "README.md", meta, table, written)
    written.append(args.out / "README.md")
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


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


def _run_e2e(args: argparse.Namespace, device: str, specs: list, dtypes: list[str],
             impls: list) -> int:  # fmt: skip
    model = args.e2e_model or ("tiny" if args.quick else e2e_mod.DEFAULT_MODEL[device])
    steps = args.e2e_steps or (5 if args.quick else 20)
    warmup = args.e2e_warmup if args.e2e_warmup is not None else (1 if args.quick else 3)
    batch = args.e2e_batch or (4 if args.quick else 8)
    dev_name = measure.device_name(device)
    n_jobs = sum(1 for _ in dtypes for s in specs for i in impls
                 if i.unavailable(device) is None and i.unsupported(s.name, device, "") is None)
    progress = Progress(n_jobs, enabled=not args.quiet)
    rows, skipped = e2e_mod.run_e2e(device, specs, dtypes, impls, model_name=model, steps=steps,
                                    warmup=warmup, batch=batch, seed=args.seed,
                                    progress=progress)  # fmt: skip
    progress.close()
    env = {"device": device, "device_name": dev_name, **report.versions()}
    for r in rows:
        r.update({k: env.get(k) for k in ("device", "device_name", "torch_version",
                                          "triton_version", "fusedopt_version")})
    import json

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
