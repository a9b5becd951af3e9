"""Results: the stdout table (with its legend), JSON and CSV files, and reading the CSV back.

One row per (workload, optimizer, dtype, implementation). The CSV repeats the
run's environment (device, versions, ceiling) on every row so that a CSV alone
is enough to re-plot, compare, or concatenate runs.

:func:`add_derived` is where a row is judged: noisy (via :func:`measure.too_noisy`), cache
resident (no % of ceiling), speedup against its baseline. The table and the plots only read
those verdicts.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .measure import NOISY_SPREAD_PCT, too_noisy

SCHEMA = "fusedopt-bench/1"

#: CSV columns, in order. Keys missing from a row are written empty (null in JSON).
FIELDS = [
    "workload", "family", "num_tensors", "numel", "optimizer", "dtype", "impl", "status",
    "ms_per_step", "ms_min", "ms_max", "spread_pct", "iqr_pct", "noisy", "ms_per_step_events",
    "gbps", "gbps_events", "pct_of_ceiling", "working_set_mb", "cache_resident",
    "speedup", "baseline_impl", "speedup_noisy",
    "first_step_ms", "compile_s", "peak_mem_mb", "mem_source", "bytes_per_param",
    "steps", "repeats", "params_finite", "params_changed",
    "check_steps", "check_max_diff", "check_max_update", "check_ok", "note", "error",
    "device", "device_name", "torch_version", "triton_version", "fusedopt_version",
    "ceiling_gbps", "cache_bytes", "timing_threads",
]  # fmt: skip
#: Run-level fields copied from ``meta`` into every row.
META_FIELDS = ["device", "device_name", "torch_version", "triton_version", "fusedopt_version",
               "ceiling_gbps", "cache_bytes", "timing_threads"]  # fmt: skip

_INT = {"num_tensors", "numel", "steps", "repeats", "check_steps", "cache_bytes",
        "timing_threads"}  # fmt: skip
#: whole numbers but for 8-bit states (their absmax: 4 bytes per 256 elements)
_NUMBER = {"bytes_per_param"}
_FLOAT = {"ms_per_step", "ms_min", "ms_max", "spread_pct", "iqr_pct", "ms_per_step_events",
          "gbps", "gbps_events", "pct_of_ceiling", "working_set_mb", "speedup", "first_step_ms",
          "compile_s", "peak_mem_mb", "ceiling_gbps", "check_max_diff",
          "check_max_update"}  # fmt: skip
_BOOL = {"params_finite", "params_changed", "noisy", "speedup_noisy", "cache_resident",
         "check_ok"}  # fmt: skip


def versions() -> dict[str, Any]:
    """torch / triton / fusedopt versions; a missing package is ``None``."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken triton is recorded as null
        triton_version = None
    try:
        from importlib.metadata import version

        fusedopt_version = version("fusedopt")
    except Exception:  # noqa: BLE001
        fusedopt_version = None
    return {
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "fusedopt_version": fusedopt_version,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def make_meta(device: str, device_name: str, ceiling: dict[str, float], **extra: Any) -> dict:
    """Run-level metadata: device, versions, the measured ceiling, time and anything extra
    (the caller adds ``timing_threads``, ``cache_bytes``, the settings and the plan)."""
    import torch

    return {
        "schema": SCHEMA,
        "device": device,
        "device_name": device_name,
        **versions(),
        "torch_num_threads": torch.get_num_threads(),
        "ceiling_gbps": ceiling["gbps"],
        "ceiling": ceiling,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        **extra,
    }


def add_derived(rows: list[dict], meta: dict, baseline_order: list[str]) -> None:
    """Judge every row, in place: noisy, cache resident, % of ceiling, speedup vs the baseline
    impl, and the run-level columns.

    The baseline is the first impl in ``baseline_order`` with an ``ok`` row for the
    same (workload, optimizer, dtype); rows without one get no speedup. A speedup is only as
    good as both timings: ``speedup_noisy`` when this row or its baseline is noisy. When the
    working set fits in the last-level cache (``meta["cache_bytes"]``), the copy ceiling does
    not bound the step, so there is no % of ceiling.
    """
    ok = {(r["workload"], r["optimizer"], r["dtype"], r["impl"]): r for r in rows
          if r.get("status") == "ok"}  # fmt: skip
    cache = meta.get("cache_bytes") or 0
    for r in rows:
        for k in META_FIELDS:
            r[k] = meta.get(k)
        if r.get("status") == "ok":
            r["noisy"] = too_noisy(r.get("iqr_pct"))
    for r in rows:
        if r.get("status") != "ok":
            continue
        working_set = (r.get("working_set_mb") or 0) * 2**20
        r["cache_resident"] = bool(cache and working_set and working_set <= cache)
        r["pct_of_ceiling"] = (None if r["cache_resident"]
                               else 100.0 * r["gbps"] / meta["ceiling_gbps"])
        for b in baseline_order:
            base = ok.get((r["workload"], r["optimizer"], r["dtype"], b))
            if base is not None:
                r["baseline_impl"] = b
                r["speedup"] = base["ms_per_step"] / r["ms_per_step"]
                r["speedup_noisy"] = bool(r["noisy"] or base["noisy"])
                break


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; write null rather than invalid JSON.
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    return v


def write_json(path: Path, meta: dict, rows: list[dict], skipped: list[dict] | None = None) -> None:
    """``{"schema", "meta", "rows", "skipped"}``; every row has every FIELDS key (null if unset)."""
    doc = {
        "schema": SCHEMA,
        "meta": meta,
        "rows": [{k: _clean(r.get(k)) for k in FIELDS} for r in rows],
        "skipped": skipped or [],
    }
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: Iterable[dict], fields: list[str] | None = None) -> None:
    """One line per row, columns ``fields`` (default FIELDS); None is written empty."""
    fields = fields or FIELDS
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else _clean(r.get(k))) for k in fields})


def _parse(key: str, value: str) -> Any:
    if value == "":
        return None
    if key in _INT:
        return int(float(value))
    if key in _NUMBER:
        number = float(value)
        return int(number) if number.is_integer() else number
    if key in _FLOAT:
        return float(value)
    if key in _BOOL:
        return value.strip().lower() in ("true", "1", "yes")
    return value


def read_csv(path: Path) -> list[dict]:
    """Read a results CSV back into typed rows (ints, floats, bools; None for empty)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"workload", "optimizer", "dtype", "impl", "gbps"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a fusedopt-bench CSV (missing {sorted(missing)})")
        return [{k: _parse(k, v or "") for k, v in r.items() if k is not None} for r in reader]


# ---------------------------------------------------------------------------
# The stdout table
# ---------------------------------------------------------------------------


def human_count(n: int | float | None) -> str:
    """4096 -> '4.1K', 124439808 -> '124.4M'."""
    if n is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suf}"
    return str(int(n))


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1e4 else f"{v:.0f}"


#: What each table column means; the legend under every table is built from this, so a
#: column without an entry here fails the tests.
COLUMN_LEGEND = {
    "workload": "parameter shapes: flat-2^E = one tensor of 2^E elements; small<N> = N tensors of "
                "1e3-2.6e5 elements; gpt2, llama1b, resnet50 = those models' parameters",
    "tensors": "number of parameter tensors",
    "params": "parameter elements, all tensors together",
    "optimizer": "optimizer; [k=v] = overrides of the benchmark hyperparameters (lr 1e-4, ...)",
    "dtype": "dtype of params, grads and optimizer state",
    "impl": "implementation (fusedopt-bench --list describes each)",
    "ms/step": "median wall time per step over the timed runs, host overhead included",
    "spread%": "interquartile range of the timed runs' ms/step, as % of the median; above "
               f"{NOISY_SPREAD_PCT:g}% the row is noisy",
    "ms(ev)": "median device time per step, from CUDA events around the same runs",
    "GB/s": "minimum bytes the step must move (bytes/param in --list) x params / ms/step",
    "%ceil": "GB/s as % of the copy bandwidth measured in this run; '-' where the working set "
             "(params, grads, state) fits in the last-level cache, which that copy does not",
    "speedup": "baseline ms/step / this ms/step (above 1 = faster than the baseline); "
               "'?' = this row or its baseline is noisy, so the ratio is not a result",
    "1st ms": "wall time of the first step alone: state creation, table build, compile or "
              "graph capture included",
    "peak MB": "memory the step holds: on CPU the bytes of params, grads and optimizer state; "
               "on CUDA the allocator's peak above the row's start",
    "vs torch": "largest |param - torch.optim's param| after the first steps from the same "
                "params and grads, torch.optim with foreach=False, on a sample of the tensors; "
                "'-' = no verdict: torch.optim has no such optimizer or options, or overflowed",
    "check": "ok, or what is wrong: noisy (spread% too wide: not a result), MISMATCH (vs torch "
             "beyond rounding), NONFINITE (inf/nan params), UNCHANGED (params did not move)",
}


def legend(columns: list[str], descriptions: dict[str, str]) -> str:
    """``columns:`` then one wrapped line per column, in table order."""
    width = max(len(c) for c in columns)
    lines = ["columns:"]
    for c in columns:
        lines += textwrap.wrap(descriptions[c], width=100, initial_indent=f"  {c:<{width}}  ",
                               subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


def is_reference_path(row: dict) -> bool:
    """A fusedopt row that ran the pure-torch reference path, not the Triton kernel."""
    return row.get("impl") == "fusedopt-reference" or (
        str(row.get("impl", "")).startswith("fusedopt") and row.get("note") == "backend=reference")


def check_flags(row: dict) -> list[str]:
    """What is wrong with an ok row, for the table's check column (empty: nothing)."""
    flags = []
    if row.get("noisy"):
        flags.append("noisy")
    if row.get("check_ok") is False:
        flags.append("MISMATCH")
    if row.get("params_finite") is False:
        flags.append("NONFINITE")
    if row.get("params_changed") is False:
        flags.append("UNCHANGED")
    return flags


def _speedup(r: dict) -> str:
    if r.get("speedup") is None:
        return "-"
    return f"{r['speedup']:.2f}x" + ("?" if r.get("speedup_noisy") else "")


def _vs_torch(r: dict) -> str:
    diff = r.get("check_max_diff")
    return "-" if diff is None else "0" if diff == 0 else f"{diff:.1e}"


#: The table's columns: header, cell text, right-aligned. ms(ev) only when CUDA events ran.
_COLUMNS: list[tuple[str, Any, bool]] = [
    ("workload", lambda r: r["workload"], False),
    ("tensors", lambda r: str(r["num_tensors"]), True),
    ("params", lambda r: human_count(r["numel"]), True),
    ("optimizer", lambda r: r["optimizer"], False),
    ("dtype", lambda r: r["dtype"], False),
    ("impl", lambda r: r["impl"], False),
    ("ms/step", lambda r: _ms(r.get("ms_per_step")), True),
    ("spread%", lambda r: _num(r.get("iqr_pct"), "{:.0f}"), True),
    ("ms(ev)", lambda r: _ms(r.get("ms_per_step_events")), True),
    ("GB/s", lambda r: _num(r.get("gbps"), "{:.1f}"), True),
    ("%ceil", lambda r: _num(r.get("pct_of_ceiling"), "{:.0f}%"), True),
    ("speedup", _speedup, True),
    ("1st ms", lambda r: _ms(r.get("first_step_ms")), True),
    ("peak MB", lambda r: _num(r.get("peak_mem_mb"), "{:.3g}"), True),
    ("vs torch", _vs_torch, True),
    ("check", lambda r: " ".join(check_flags(r)) or "ok", False),
]


def format_columns(head: list[str], rows: list[list[str] | None], right: set[int]) -> list[str]:
    """Fixed-width lines: the header, a rule, then the rows (None = a blank separator)."""
    widths = [len(h) for h in head]
    for cells in filter(None, rows):
        widths = [max(w, len(c)) for w, c in zip(widths, cells)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # fmt: skip

    return [fmt(head), fmt(["-" * w for w in widths])] + [
        "" if cells is None else fmt(cells) for cells in rows]


def format_table(rows: list[dict], meta: dict | None = None) -> str:
    """A fixed-width table of ok rows, the footnotes that apply, failed rows and the legend."""
    ok = [r for r in rows if r.get("status") == "ok"]
    has_events = any(r.get("ms_per_step_events") is not None for r in ok)
    columns = [c for c in _COLUMNS if has_events or c[0] != "ms(ev)"]
    head = [c[0] for c in columns]
    lines: list[list[str] | None] = []
    for i, r in enumerate(ok):
        if i and r["workload"] != ok[i - 1]["workload"]:
            lines.append(None)  # blank separator between workloads
        lines.append([cell(r) for _, cell, _ in columns])
    out = []
    if meta:
        threads = meta.get("timing_threads")
        out.append(
            f"device: {meta.get('device_name')} [{meta.get('device')}]  "
            f"copy ceiling: {meta.get('ceiling_gbps', 0):.1f} GB/s  "
            f"torch {meta.get('torch_version')}  triton {meta.get('triton_version')}"
            + (f"  timing threads: {threads}" if threads else "")
        )
        base = sorted({r["baseline_impl"] for r in ok if r.get("baseline_impl")})
        if base:
            out.append(f"speedup is vs {' / '.join(base)}; GB/s counts the minimum bytes per param")
    out += format_columns(head, lines, {i for i, c in enumerate(columns) if c[2]})
    out += _footnotes(rows, meta or {})
    out += ["", legend(head, COLUMN_LEGEND)]
    return "\n".join(out)


def _footnotes(rows: list[dict], meta: dict) -> list[str]:
    """One line per thing a reader must know to read this table right, only when it applies."""
    ok = [r for r in rows if r.get("status") == "ok"]
    notes = []
    noisy = [r for r in ok if r.get("noisy")]
    if noisy:
        notes.append(f"noisy: {len(noisy)} of {len(ok)} rows' timed runs spread more than "
                     f"{NOISY_SPREAD_PCT:g}% (spread%): the machine was busy or the step too "
                     "short. Their ms/step, GB/s and speedup are not results and the plots draw "
                     "no bar from them; rerun on an idle machine or raise --repeats/--target-ms.")
    resident = [r for r in ok if r.get("cache_resident")]
    if resident:
        cache_mb = (meta.get("cache_bytes") or 0) / 2**20
        copy_mb = (meta.get("ceiling") or {}).get("nbytes", 0) / 2**20
        notes.append(f"%ceil '-' on {len(resident)} rows: the working set fits in the "
                     f"{cache_mb:.0f} MiB last-level cache; the copy ceiling ({copy_mb:.0f} MiB, "
                     "from memory) does not bound a step served from cache.")
    if any((r.get("pct_of_ceiling") or 0) > 105 for r in ok):
        notes.append("% of ceiling above 100: the traffic is read-heavy (the ceiling is one "
                     "large copy, read + write) or partly cached.")
    if any(is_reference_path(r) for r in ok):
        notes.append("fusedopt-reference (and fusedopt with note backend=reference) is fusedopt's "
                     "pure-torch reference path, what it runs without a GPU: its CPU timings "
                     "check it against torch.optim, they are not fusedopt's GPU performance "
                     "(the Triton kernel).")
    mismatched = [r for r in ok if r.get("check_ok") is False]
    if mismatched:
        notes.append(f"MISMATCH on {len(mismatched)} rows: some param differs from torch.optim's "
                     "by more than 1e-3 of the largest update (16 eps in bf16/fp16) plus 4 units "
                     "of rounding of its value.")
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        notes.append(f"{len(errors)} configuration(s) failed:")
        notes += [f"  {r['workload']} {r['optimizer']} {r['dtype']} {r['impl']}: {r.get('error')}"
                  for r in errors]  # fmt: skip
    return [""] + notes if notes else []


def write_summary(path: Path, meta: dict, sections: list[tuple[str, str]],
                  files: list[Path]) -> None:
    """A README for a results folder: device, versions, command, each section's table with its
    notes and legend, and the files. Makes ``--out perf/results/<gpu>`` directly committable
    as evidence."""
    ceiling = meta.get("ceiling", {})
    lines = [
        f"# fusedopt-bench results: {meta.get('device_name')}",
        "",
        f"- device: {meta.get('device')} ({meta.get('device_name')})",
        f"- torch {meta.get('torch_version')}, triton {meta.get('triton_version')}, "
        f"fusedopt {meta.get('fusedopt_version')}, CUDA {meta.get('cuda_version')}, "
        f"Python {meta.get('python_version')}",
        f"- copy-bandwidth ceiling: {meta.get('ceiling_gbps', 0):.1f} GB/s "
        f"(min {ceiling.get('gbps_min', 0):.1f}, max {ceiling.get('gbps_max', 0):.1f}; "
        f"{ceiling.get('nbytes', 0) / 2**20:.0f} MiB device-to-device copy, read + write)",
        f"- timing: {meta.get('timing_threads')} intra-op thread(s) (torch's default here: "
        f"{meta.get('torch_num_threads')}); last-level cache "
        f"{(meta.get('cache_bytes') or 0) / 2**20:.0f} MiB",
        f"- measured {meta.get('timestamp')}; command: "
        f"`fusedopt-bench {' '.join(meta.get('argv', []))}`".rstrip(),
    ]
    if meta.get("planned_s") is not None and meta.get("elapsed_s") is not None:
        lines.append(f"- measuring took {meta['elapsed_s']:.0f} s "
                     f"(planned {meta['planned_s']:.0f} s)")
    for title, text in sections:
        lines += ["", f"## {title}", "", "```", text, "```"]
    lines += ["", "Files: " + ", ".join(f"`{Path(f).name}`" for f in files), ""]
    Path(path).write_text("\n".join(lines))
