"""Results: the stdout table, JSON and CSV files, and reading the CSV back.

One row per (workload, optimizer, dtype, implementation). The CSV repeats the
run's environment (device, versions, ceiling) on every row so that a CSV alone
is enough to re-plot, compare, or concatenate runs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = "fusedopt-bench/1"

#: CSV columns, in order. Keys missing from a row are written empty (null in JSON).
FIELDS = [
    "workload", "family", "num_tensors", "numel", "optimizer", "dtype", "impl", "status",
    "ms_per_step", "ms_min", "ms_max", "spread_pct", "ms_per_step_events",
    "gbps", "gbps_events", "pct_of_ceiling", "speedup", "baseline_impl",
    "first_step_ms", "compile_s", "peak_mem_mb", "mem_source", "bytes_per_param",
    "steps", "repeats", "params_finite", "params_changed", "note", "error",
    "device", "device_name", "torch_version", "triton_version", "fusedopt_version",
    "ceiling_gbps",
]  # fmt: skip
#: Run-level fields copied from ``meta`` into every row.
META_FIELDS = ["device", "device_name", "torch_version", "triton_version", "fusedopt_version",
               "ceiling_gbps"]  # fmt: skip

_INT = {"num_tensors", "numel", "bytes_per_param", "steps", "repeats"}
_FLOAT = {"ms_per_step", "ms_min", "ms_max", "spread_pct", "ms_per_step_events", "gbps",
          "gbps_events", "pct_of_ceiling", "speedup", "first_step_ms", "compile_s",
          "peak_mem_mb", "ceiling_gbps"}  # fmt: skip
_BOOL = {"params_finite", "params_changed"}


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
    """Run-level metadata: device, versions, the measured ceiling, time and anything extra."""
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
    """Fill % of ceiling, speedup vs the baseline impl, and the run-level columns, in place.

    The baseline is the first impl in ``baseline_order`` with an ``ok`` row for the
    same (workload, optimizer, dtype); rows without one get no speedup.
    """
    ok = {(r["workload"], r["optimizer"], r["dtype"], r["impl"]): r for r in rows
          if r.get("status") == "ok"}  # fmt: skip
    for r in rows:
        for k in META_FIELDS:
            r[k] = meta.get(k)
        if r.get("status") != "ok":
            continue
        r["pct_of_ceiling"] = 100.0 * r["gbps"] / meta["ceiling_gbps"]
        for b in baseline_order:
            base = ok.get((r["workload"], r["optimizer"], r["dtype"], b))
            if base is not None:
                r["baseline_impl"] = b
                r["speedup"] = base["ms_per_step"] / r["ms_per_step"]
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


def format_table(rows: list[dict], meta: dict | None = None) -> str:
    """A fixed-width table of ok rows plus a list of errored rows and sanity warnings."""
    ok = [r for r in rows if r.get("status") == "ok"]
    has_events = any(r.get("ms_per_step_events") is not None for r in ok)
    head = ["workload", "tensors", "params", "optimizer", "dtype", "impl", "ms/step", "±%"]
    if has_events:
        head.append("ms(ev)")
    head += ["GB/s", "%ceil", "speedup", "1st ms", "peak MB", "check"]
    lines = []
    prev_group = None
    for r in ok:
        group = (r["workload"], r["optimizer"], r["dtype"])
        if prev_group is not None and group[0] != prev_group[0]:
            lines.append(None)  # blank separator between workloads
        prev_group = group
        check = []
        if r.get("params_finite") is False:
            check.append("NONFINITE")
        if r.get("params_changed") is False:
            check.append("UNCHANGED")
        cells = [r["workload"], str(r["num_tensors"]), human_count(r["numel"]), r["optimizer"],
                 r["dtype"], r["impl"], _ms(r.get("ms_per_step")),
                 _num(r.get("spread_pct"), "{:.0f}")]  # fmt: skip
        if has_events:
            cells.append(_ms(r.get("ms_per_step_events")))
        speed = r.get("speedup")
        cells += [
            _num(r.get("gbps"), "{:.1f}"),
            _num(r.get("pct_of_ceiling"), "{:.0f}%"),
            "-" if speed is None else f"{speed:.2f}x",
            _ms(r.get("first_step_ms")),
            _num(r.get("peak_mem_mb"), "{:.0f}"),
            " ".join(check),
        ]
        lines.append(cells)
    widths = [len(h) for h in head]
    for cells in filter(None, lines):
        widths = [max(w, len(c)) for w, c in zip(widths, cells)]
    right = {1, 2, *range(6, len(head) - 1)}  # numbers right-aligned

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # fmt: skip

    out = []
    if meta:
        out.append(
            f"device: {meta.get('device_name')} [{meta.get('device')}]  "
            f"copy ceiling: {meta.get('ceiling_gbps', 0):.1f} GB/s  "
            f"torch {meta.get('torch_version')}  triton {meta.get('triton_version')}"
        )
        base = sorted({r["baseline_impl"] for r in ok if r.get("baseline_impl")})
        if base:
            out.append(f"speedup is vs {' / '.join(base)}; GB/s counts the minimum bytes per param")
    out += [fmt(head), fmt(["-" * w for w in widths])]
    out += ["" if cells is None else fmt(cells) for cells in lines]
    if any((r.get("pct_of_ceiling") or 0) > 105 for r in ok):
        out.append("(% of ceiling above 100: the working set fits in cache, or the traffic is "
                   "read-heavy; the ceiling is one large copy, read + write)")
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        out.append("")
        out.append(f"{len(errors)} configuration(s) failed:")
        out += [f"  {r['workload']} {r['optimizer']} {r['dtype']} {r['impl']}: {r.get('error')}"
                for r in errors]  # fmt: skip
    return "\n".join(out)


def write_summary(path: Path, meta: dict, table: str, files: list[Path]) -> None:
    """A short README for a results folder: device, versions, command, the table, the files.

    Makes ``--out perf/results/<gpu>`` directly committable as evidence.
    """
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
        f"- measured {meta.get('timestamp')}; command: "
        f"`fusedopt-bench {' '.join(meta.get('argv', []))}`".rstrip(),
        "",
        "```",
        table,
        "```",
        "",
        "Files: " + ", ".join(f"`{Path(f).name}`" for f in files),
        "",
    ]
    Path(path).write_text("\n".join(lines))
