"""PNG plots from result rows (fresh, or read back from a results CSV).

* ``gbps_<optimizer>_<dtype>.png``: effective GB/s vs parameter count, one line
  per implementation over the flat sweep, other workloads as labelled markers,
  and the measured copy ceiling as a dashed line.
* ``speedup_<family>.png``: speedup vs the baseline implementation, grouped
  bars, one panel per (optimizer, dtype).
* ``first_step.png``: first-step latency (compile / capture included), log scale.

Rows are drawn as ``report.add_derived`` judged them: a noisy row (or a speedup leaning on
one) gets no bar, only a "noisy" mark where its bar would be; noisy throughput points are
hollow; working sets that fit in the last-level cache are shaded, since the copy ceiling does
not bound them; on CPU every title says that fusedopt there is its reference path.

matplotlib is imported lazily with the Agg backend, so the rest of the harness
works on machines without a display (or without matplotlib).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

_MARKERS = "osD^v<>pPX*h"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede importing pyplot
    import matplotlib.pyplot as plt

    return plt


def _func_formatter(fn: Any) -> Any:
    """matplotlib.ticker.FuncFormatter, imported lazily like the rest of matplotlib."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(fn)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("gbps") is not None]


def _styles(impls: list[str]) -> dict[str, dict[str, Any]]:
    """A stable colour and marker per implementation (same across all figures)."""
    plt = _pyplot()
    colors = plt.get_cmap("tab10").colors
    return {name: {"color": colors[i % len(colors)], "marker": _MARKERS[i % len(_MARKERS)]}
            for i, name in enumerate(impls)}  # fmt: skip


def _caption(rows: list[dict]) -> str:
    """What the figure is of, and on CPU what it is not."""
    dev = next((r.get("device_name") or r.get("device") for r in rows
                if r.get("device_name") or r.get("device")), "")  # fmt: skip
    if any(r.get("device") == "cpu" for r in rows):
        return (f"{dev}\nfusedopt here is its pure-torch reference path: a sanity check, "
                "not fusedopt's GPU performance")
    return dev


def _grid(n: int, ncols: int = 3) -> tuple[int, int]:
    ncols = min(ncols, n)
    return math.ceil(n / ncols), ncols


def plot_throughput(rows: list[dict], out_dir: Path) -> list[Path]:
    """One GB/s-vs-params figure per (optimizer, dtype)."""
    plt = _pyplot()
    ok = _ok(rows)
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    style = _styles(impls)
    paths = []
    for (opt, dtype), group in _by(ok, "optimizer", "dtype").items():
        fig, ax = plt.subplots(figsize=(10.5, 5.5))
        ceiling = next((r.get("ceiling_gbps") for r in group if r.get("ceiling_gbps")), None)
        for impl in impls:
            mine = [r for r in group if r["impl"] == impl]
            flat = sorted((r for r in mine if r.get("family") == "flat"), key=lambda r: r["numel"])
            other = [r for r in mine if r.get("family") != "flat"]
            st = style[impl]
            if flat:
                ax.plot([r["numel"] for r in flat], [r["gbps"] for r in flat], label=impl,
                        color=st["color"], marker=st["marker"], markersize=4, linewidth=1.5)
                noisy = [r for r in flat if r.get("noisy")]
                ax.scatter([r["numel"] for r in noisy], [r["gbps"] for r in noisy], s=60,
                           facecolors="white", edgecolors=st["color"], zorder=3)
            if other:
                ax.scatter([r["numel"] for r in other], [r["gbps"] for r in other],
                           color=st["color"], marker=st["marker"], s=60, edgecolors="black",
                           linewidths=0.5, label=None if flat else impl, zorder=3)
                noisy = [r for r in other if r.get("noisy")]
                ax.scatter([r["numel"] for r in noisy], [r["gbps"] for r in noisy], s=60,
                           facecolors="white", edgecolors=st["color"], zorder=4)
        resident = [r["numel"] for r in group if r.get("cache_resident")]
        if resident:
            ax.axvspan(min(r["numel"] for r in group) / 1.5, max(resident) * 1.2,
                       color="0.85", zorder=0, label="fits in cache: ceiling does not apply")
        if any(r.get("noisy") for r in group):
            ax.scatter([], [], facecolors="white", edgecolors="black", s=60,
                       label="hollow: noisy timing, not a result")
        # Label each non-flat workload once, above its best point.
        for wl, pts in _by([r for r in group if r.get("family") != "flat"], "workload").items():
            best = max(pts, key=lambda r: r["gbps"])
            ax.annotate(wl[0], (best["numel"], best["gbps"]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
        if ceiling:
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"copy ceiling {ceiling:.0f} GB/s", (0.01, ceiling),
                        xycoords=("axes fraction", "data"), textcoords="offset points",
                        xytext=(0, 4), fontsize=8)
        bpp = group[0].get("bytes_per_param")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (elements)")
        ax.set_ylabel(f"effective GB/s ({bpp} B/param minimum)")
        ax.set_title(f"{opt} {dtype}: throughput vs size\n{_caption(group)}", fontsize=10)
        ax.set_ylim(bottom=0, top=max([ceiling or 0] + [r["gbps"] for r in group]) * 1.15)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        path = out_dir / f"gbps_{_safe(opt)}_{_safe(dtype)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _bar_panels(
    rows: list[dict], value: str, title: str, ylabel: str, path: Path, *, log: bool = False,
    ref_line: float | None = None, untrusted: str | None = None,
) -> Path | None:
    """Grouped bars: one panel per (optimizer, dtype), groups = workloads, bars = impls.

    A row whose ``untrusted`` key is true gets no bar: a "noisy" mark stands in its place."""
    plt = _pyplot()
    rows = [r for r in rows if r.get(value) is not None]
    if not rows:
        return None
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    style = _styles(impls)
    panels = _by(rows, "optimizer", "dtype")
    nrows, ncols = _grid(len(panels), ncols=2)
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    # Panels widen with the number of bars, within reason.
    panel_w = min(9.0, max(4.5, 1.5 + 0.18 * len(workloads) * len(impls)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols, 3.6 * nrows + 0.9),
                             squeeze=False)
    for ax, ((opt, dtype), group) in zip(axes.flat, panels.items()):
        wls = [w for w in workloads if any(r["workload"] == w for r in group)]
        bar_w = 0.8 / len(impls)
        trusted = [r for r in group if not (untrusted and r.get(untrusted))]
        for j, impl in enumerate(impls):
            xs, ys, noisy_xs = [], [], []
            for i, w in enumerate(wls):
                hit = next((r for r in group if r["workload"] == w and r["impl"] == impl), None)
                if hit is None:
                    continue
                x = i - 0.4 + bar_w * (j + 0.5)
                if not (untrusted and hit.get(untrusted)):
                    xs.append(x)
                    ys.append(hit[value])
                else:
                    noisy_xs.append(x)
            if xs:
                ax.bar(xs, ys, width=bar_w, color=style[impl]["color"], label=impl)
            for x in noisy_xs:  # no bar: its height would be noise
                ax.annotate("noisy", (x, 0), xycoords=("data", "axes fraction"),
                            xytext=(0, 3), textcoords="offset points", rotation=90,
                            ha="center", va="bottom", fontsize=7, color=style[impl]["color"])
        if ref_line is not None:
            ax.axhline(ref_line, color="black", linewidth=1, linestyle="--")
        ax.set_xlim(-0.5, len(wls) - 0.5)  # every group in view, with or without its bars
        ax.set_xticks(range(len(wls)))
        ax.set_xticklabels(wls, rotation=30 if len(wls) > 3 else 0, ha="right" if len(wls) > 3
                           else "center", fontsize=8)  # fmt: skip
        if log and trusted:
            # Bars on a log axis need a fixed floor, or their heights mean nothing.
            ax.set_yscale("log")
            ax.set_ylim(bottom=min(r[value] for r in trusted) / 3)
            ax.yaxis.set_major_formatter(_func_formatter(lambda v, _pos: f"{v:g}"))
        ax.set_title(f"{opt} {dtype}", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    # one legend entry per implementation, whether or not any of its bars could be drawn
    from matplotlib.patches import Patch

    seen = {impl: Patch(color=style[impl]["color"]) for impl in impls}
    if untrusted and any(r.get(untrusted) for r in rows):
        fig.text(0.01, 0.005, "noisy: no bar; the timing (this row's or its baseline's) spread "
                 "too widely to be a result", fontsize=7, va="bottom")
    extra = 0.2 * title.count("\n")  # each further title line
    height = 3.6 * nrows + 0.9 + extra  # 0.9 in of header: title, then one legend row
    fig.set_figheight(height)
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / height, va="top")
    fig.legend(seen.values(), seen.keys(), loc="center", ncol=min(len(seen), 6), fontsize=8,
               bbox_to_anchor=(0.5, 1 - (0.55 + extra) / height), frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.02, 1, 1 - (0.8 + extra) / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedups(rows: list[dict], out_dir: Path) -> list[Path]:
    """One speedup bar chart per workload family (the flat sweep is one chart)."""
    ok = [r for r in _ok(rows) if r.get("speedup") is not None]
    paths = []
    for (family,), group in _by(ok, "family").items():
        base = sorted({r["baseline_impl"] for r in group if r.get("baseline_impl")})
        p = _bar_panels(group, "speedup", f"{family}: speedup vs {' / '.join(base)} (higher is "
                        f"better)\n{_caption(group)}", "speedup (x)",
                        out_dir / f"speedup_{_safe(family)}.png", ref_line=1.0,
                        untrusted="speedup_noisy")  # fmt: skip
        if p:
            paths.append(p)
    return paths


def plot_first_step(rows: list[dict], out_dir: Path) -> list[Path]:
    """First-step latency (includes compile, graph capture, state init)."""
    p = _bar_panels(_ok(rows), "first_step_ms", "first-step latency (compile/capture included)",
                    "ms (log)", out_dir / "first_step.png", log=True)  # fmt: skip
    return [p] if p else []


def plot_all(rows: list[dict], out_dir: Path) -> list[Path]:
    """Every benchmark plot for ``rows``; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return plot_throughput(rows, out_dir) + plot_speedups(rows, out_dir) + plot_first_step(
        rows, out_dir
    )


def plot_e2e(rows: list[dict], out_dir: Path) -> list[Path]:
    """Stacked bars of the end-to-end step: forward+backward, optimizer, other."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("status") == "ok"]
    if not rows:
        return []
    labels = [f"{r['optimizer']} {r['dtype']}\n{r['impl']}" for r in rows]
    fb = [r["fwd_bwd_ms"] for r in rows]
    op = [r["opt_ms"] for r in rows]
    other = [r["other_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 5))
    xs = range(len(rows))
    ax.bar(xs, fb, label="forward+backward", color="#4c72b0")
    ax.bar(xs, op, bottom=fb, label="optimizer step", color="#dd8452")
    ax.bar(xs, other, bottom=[a + b for a, b in zip(fb, op)], label="zero_grad/other",
           color="#999999")  # fmt: skip
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['opt_pct']:.0f}% opt\n{human_tokens(r['tokens_per_s'])} tok/s",
                    (x, r["step_ms"]), textcoords="offset points", xytext=(0, 3), ha="center",
                    fontsize=7)  # fmt: skip
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"end-to-end: {rows[0].get('model')} on {rows[0].get('device_name')}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_ylim(top=max(r["step_ms"] for r in rows) * 1.25)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "e2e.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_static(rows: list[dict], out_dir: Path) -> list[Path]:
    """``static.png`` of ``fusedopt-bench static``: the predicted % of the copy bandwidth per
    kernel (H100 and H200; other archs' rows: their own GPU's), and instructions per element
    against registers, one point per kernel (labelled), both from the SASS, not measured."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("instr_per_elem") is not None]
    if not ok:
        return []
    labels = [f"{r['variant']} {r['kernel']} {r['dtype']} sm{r['arch']}" for r in ok]
    height = max(3.5, 0.22 * len(ok) + 1.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, height),
                                      gridspec_kw={"width_ratios": [1.2, 1]})
    ys = range(len(ok))
    h100 = [r.get("predicted_pct_h100") if r.get("predicted_pct_h100") is not None
            else r.get("predicted_pct") or 0 for r in ok]
    h200 = [r.get("predicted_pct_h200") or 0 for r in ok]
    left.barh([y - 0.2 for y in ys], h100, height=0.4, label="H100 (other archs: own GPU)")
    left.barh([y + 0.2 for y in ys], h200, height=0.4, label="H200")
    left.set_yticks(list(ys))
    left.set_yticklabels(labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlim(0, 105)
    left.axvline(100, color="grey", linestyle="--", linewidth=0.8)
    left.set_xlabel("predicted % of copy bandwidth: min(reads in flight, instruction issue)")
    left.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    left.grid(True, axis="x", alpha=0.3)
    colors = plt.get_cmap("tab10").colors
    dtypes = list(dict.fromkeys(r["dtype"] for r in ok))
    for i, dtype in enumerate(dtypes):
        pts = [r for r in ok if r["dtype"] == dtype]
        right.scatter([r["regs"] for r in pts], [r["instr_per_elem"] for r in pts],
                      color=colors[i % len(colors)], label=dtype, s=18)
        for r in pts:
            right.annotate(f"{r['variant']}{'/sums' if r['kernel'] == 'sums' else ''}",
                           (r["regs"], r["instr_per_elem"]), fontsize=6,
                           textcoords="offset points", xytext=(3, 2))
    right.set_xlabel("registers per thread")
    right.set_ylabel("SASS instructions per element per thread (hot path)")
    right.legend(fontsize=7)
    right.grid(True, alpha=0.3)
    fig.suptitle("static roofline from the SASS (compiled without a GPU; a model, not a "
                 "measurement)", fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "static.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def human_tokens(n: float) -> str:
    """12345.6 -> '12.3K'."""
    for div, suf in ((1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suf}"
    return f"{n:.0f}"


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Group rows by ``keys``, keeping first-seen order."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r.get(k) for k in keys)].append(r)
    return dict(out)
