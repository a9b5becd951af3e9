"""``fusedopt-bench matrix``: the optimizers that are not element-wise (Muon, Adafactor:
whole tensors; SparseAdam: the rows of sparse grads) against torch.optim.

One row per (optimizer, workload, dtype, implementation), timed as the main harness times a
step (:mod:`fusedopt.perf.measure`: warm-up, runs of back-to-back steps lasting about the
target time, medians of the repeats, the spread deciding ``noisy``), with Python's GC paused
and the intra-op threads pinned. Each row reports:

* bandwidth: the minimum bytes the step must move per element (:func:`bytes_per_element`:
  Muon reads g, reads and writes its momentum and the param, 5 per element of storage;
  Adafactor 3, plus 2 for a vector's ``variance``; SparseAdam 7 per element of the rows its
  grads hold) over ms/step, as GB/s and as % of the copy bandwidth measured in the same run;
* for Muon, the Newton-Schulz FLOPs (per matrix of m x n, m <= n: ``ns_steps`` x
  (4 m^2 n + 2 m^3)) over ms/step, as TFLOP/s and as % of the bf16 matmul throughput measured
  in the same run (:func:`measure_matmul_peak`), since those matmuls, not memory, bound it;
* launches per step: kernel launches and torch ops of the second step, counted on the host
  (:func:`count_step_ops`; each torch op is a launch on a GPU);
* ``vs torch``: after one step from the same params and grads, the largest difference from
  torch.optim's params over the largest change torch made (Muon's bf16 Newton-Schulz makes
  this about 1e-2 by itself; the tests hold the exact bounds).

Without a GPU the fusedopt rows are its reference path (``fusedopt-reference``: what fusedopt
runs there) on scaled-down workloads: a sanity check, not fusedopt's GPU performance.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .measure import (
    NOISY_SPREAD_PCT,
    TORCH_DTYPES,
    Settings,
    _timed_run,
    error_text,
    spread_of,
    sync,
    too_noisy,
)

OPTIMIZERS = ("Muon", "Adafactor", "SparseAdam")
FIELDS = ["optimizer", "impl", "workload", "tensors", "elements", "dtype", "device", "status",
          "ms_step", "spread_pct", "bytes_per_element", "gbps", "pct_copy", "ns_tflops",
          "pct_matmul", "launches", "vs_torch", "noisy", "error"]  # fmt: skip
COLUMN_LEGEND = {
    "optimizer": "the optimizer (its torch.optim defaults)",
    "impl": "fusedopt (backend='triton'), fusedopt-reference (its pure-torch path, without a "
            "GPU), or torch (torch.optim, its default implementation)",
    "workload": "the tensors: a GPT's hidden matrices (per layer qkv 3w x w, out w x w, MLP "
                "4w x w and w x 4w), with its biases and norm weights for Adafactor; an "
                "embedding's rows held by the grads of that many random tokens for SparseAdam",
    "elements": "elements the step updates (SparseAdam: of the rows its grads hold)",
    "dtype": "dtype of params, grads and state",
    "ms/step": "median wall time per step",
    "spread%": "interquartile range of the timed runs, % of the median",
    "B/elem": "minimum bytes the step must move per element updated",
    "GB/s": "B/elem x elements / ms/step",
    "%copy": "GB/s as % of the copy bandwidth measured in this run",
    "NS TFLOP/s": "Muon: Newton-Schulz FLOPs per step / ms/step",
    "%matmul": "NS TFLOP/s as % of the bf16 matmul throughput measured in this run",
    "launches": "kernel launches + torch ops of one step (each op launches on a GPU)",
    "vs torch": "max |params - torch.optim's| / max |torch's change|, one step, same start",
    "check": f"ok, noisy (spread above {NOISY_SPREAD_PCT:g}%: rerun), or error",
}


@dataclass(frozen=True)
class Job:
    """One workload of one optimizer: the param shapes (and, for SparseAdam, the rows of the
    grads per step)."""

    optimizer: str
    workload: str
    shapes: tuple[tuple[int, ...], ...]
    sparse_rows: int = 0

    @property
    def elements(self) -> int:
        if self.sparse_rows:
            return self.sparse_rows * math.prod(self.shapes[0][1:])
        return sum(math.prod(s) for s in self.shapes)


def gpt_matrices(layers: int, width: int) -> tuple[tuple[int, ...], ...]:
    """A GPT's hidden Linear weights (out x in, as nn.Linear): qkv, attention out, MLP in and
    out, per layer (GPT-2 124M: 12 layers of width 768, 48 matrices, 84.9M elements)."""
    return tuple(s for _ in range(layers)
                 for s in ((3 * width, width), (width, width), (4 * width, width),
                           (width, 4 * width)))


def gpt_params(layers: int, width: int) -> tuple[tuple[int, ...], ...]:
    """The matrices of :func:`gpt_matrices` with each layer's biases and norm weights."""
    vectors = tuple((n,) for _ in range(layers)
                    for n in (width, width, 3 * width, width, width, width, 4 * width, width))
    return gpt_matrices(layers, width) + vectors


def default_jobs(device: str, optimizers: tuple[str, ...] = OPTIMIZERS) -> list[Job]:
    """GPT-2 124M's shapes on a GPU; a GPT of width 128 and 2 layers without one."""
    layers, width, vocab, tokens = ((12, 768, 50257, 8192) if device == "cuda"
                                    else (2, 128, 5000, 512))
    name = "gpt2" if device == "cuda" else f"gpt-w{width}-l{layers}"
    jobs = {"Muon": Job("Muon", f"{name} matrices", gpt_matrices(layers, width)),
            "Adafactor": Job("Adafactor", f"{name} (no embeddings)", gpt_params(layers, width)),
            "SparseAdam": Job("SparseAdam", f"embedding {vocab}x{width}, {tokens} tokens",
                              ((vocab, width),), sparse_rows=tokens)}
    return [jobs[o] for o in optimizers]


def bytes_per_element(job: Job, dtype: str) -> float:
    """Minimum bytes per element updated (see the module docstring)."""
    size = TORCH_DTYPES[dtype].itemsize
    if job.optimizer == "Muon":
        return 5 * size
    if job.optimizer == "SparseAdam":
        return 7 * size
    vector = sum(math.prod(s) for s in job.shapes if len(s) < 2)
    return size * (3 + 2 * vector / job.elements)


def newton_schulz_flops(shapes, ns_steps: int = 5) -> float:
    """FLOPs of Muon's Newton-Schulz iterations over matrices of ``shapes``."""
    total = 0.0
    for shape in shapes:
        m, n = min(shape), max(shape)
        total += ns_steps * (4 * m * m * n + 2 * m ** 3)
    return total


def measure_matmul_peak(device: str, repeats: int = 5) -> float:
    """bf16 ``torch.mm`` throughput of square matrices, in TFLOP/s (median)."""
    n = 4096 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        sync(device)
        rates.append(5 * 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    return statistics.median(rates)


# ---- counting what a step launches ---------------------------------------------------------


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops run while active (each one a kernel launch on a GPU), views and
    allocations left out, and the staging of kernel arguments by triton's CPU interpreter."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from fusedopt.kernels import interpreting

        name = func.__name__.split(".")[0]
        if not (func.is_view or name.startswith("empty")
                or name in ("detach", "alias", "_record_function_enter_new",
                            "_record_function_exit")
                or (interpreting() and name in ("new_empty", "set_", "copy_"))):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def count_step_ops(opt, step: Callable[[], Any]) -> tuple[int, list[str]]:
    """(kernel launches, torch ops) of ``step()`` of a built fusedopt optimizer. The ops are
    counted while its buckets run, not while they check their inputs: those checks run ops
    on host tensors, which launch nothing, and compare tensors, which a dispatch mode around
    them would hide."""
    from fusedopt import kernels

    counter = CountOps()
    buckets = list(opt._buckets)
    for bucket in buckets:
        run = bucket.run

        def counted(*args, run=run, **kwargs):
            with counter:
                return run(*args, **kwargs)

        bucket.run = counted
    try:
        before = kernels.launch_count()
        step()
        return kernels.launch_count() - before, counter.ops
    finally:
        for bucket in buckets:
            del bucket.run  # the class's method again


# ---- one row ---------------------------------------------------------------------------------


def _tensors(job: Job, dtype: str, device: str, seed: int = 0):
    """Params (0.02 randn) and a grad maker (randn; SparseAdam: ``sparse_rows`` random rows)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device, dtype=tdt) * 0.02)
              for s in job.shapes]
    if job.sparse_rows:
        p = params[0]
        rows = torch.randint(0, p.shape[0], (1, job.sparse_rows), generator=gen, device=device)
        values = torch.randn(job.sparse_rows, *p.shape[1:], generator=gen, device=device,
                             dtype=tdt)
        grads = [torch.sparse_coo_tensor(rows, values, p.shape).coalesce()]
        # the elements updated are the distinct rows' (tokens repeat)
        job_rows = grads[0]._values().shape[0]
    else:
        grads = [torch.randn(s, generator=gen, device=device, dtype=tdt) for s in job.shapes]
        job_rows = 0
    for p, g in zip(params, grads):
        p.grad = g
    return params, job_rows


def _build(job: Job, impl: str, params):
    import fusedopt

    if impl == "torch":
        return getattr(torch.optim, job.optimizer)(params)
    backend = "triton" if impl == "fusedopt" else "reference"
    return getattr(fusedopt, job.optimizer)(params, backend=backend)


def _vs_torch(job: Job, impl: str, dtype: str, device: str) -> float:
    params, _ = _tensors(job, dtype, device, seed=1)
    twins, _ = _tensors(job, dtype, device, seed=1)
    start = [p.detach().clone() for p in twins]
    _build(job, impl, params).step()
    _build(job, "torch", twins).step()
    diff = max((p.detach() - q.detach()).abs().max().item() for p, q in zip(params, twins))
    change = max((q.detach() - s).abs().max().item() for q, s in zip(twins, start))
    return diff / change if change else math.inf


def measure_row(job: Job, impl: str, dtype: str, device: str, settings: Settings,
                copy_gbps: float, matmul_tflops: float) -> dict[str, Any]:
    """One timed row (see the module docstring); an error is returned as an error row."""
    row: dict[str, Any] = {"optimizer": job.optimizer, "impl": impl, "workload": job.workload,
                           "tensors": len(job.shapes), "dtype": dtype, "device": device,
                           "status": "ok", "error": "", "noisy": ""}
    try:
        params, held_rows = _tensors(job, dtype, device)
        elements = (held_rows * math.prod(job.shapes[0][1:]) if job.sparse_rows
                    else job.elements)
        opt = _build(job, impl, params)
        opt.step()
        if impl == "torch":
            with CountOps() as counter:
                opt.step()
            row["launches"] = len(counter.ops)
        else:
            launches, ops = count_step_ops(opt, opt.step)
            row["launches"] = launches + len(ops)
        for _ in range(settings.warmup):
            opt.step()
        wall, _ = _timed_run(opt.step, 1, device)
        steps = max(settings.min_steps, min(settings.max_steps,
                                            int(settings.target_run_s / max(wall, 1e-6))))
        per_step = []
        for _ in range(settings.repeats):
            wall, device_s = _timed_run(opt.step, steps, device)
            per_step.append((device_s if device_s is not None else wall) / steps * 1e3)
        ms = statistics.median(per_step)
        spread = spread_of(per_step)
        b = bytes_per_element(job, dtype)
        gbps = b * elements / (ms / 1e3) / 1e9
        row.update(elements=elements, ms_step=ms, spread_pct=spread, bytes_per_element=b,
                   gbps=gbps, pct_copy=100 * gbps / copy_gbps,
                   noisy="noisy" if too_noisy(spread) else "")
        if job.optimizer == "Muon":
            tflops = newton_schulz_flops(job.shapes) / (ms / 1e3) / 1e12
            row.update(ns_tflops=tflops, pct_matmul=100 * tflops / matmul_tflops)
        row["vs_torch"] = 0.0 if impl == "torch" else _vs_torch(job, impl, dtype, device)
    except Exception as e:  # noqa: BLE001 - reported in the row and the table
        row.update(status="error", error=error_text(e))
    return row


def planned_seconds(job: Job, device: str, settings: Settings) -> float:
    """About how long :func:`measure_row` takes: the timed runs, plus the untimed steps and a
    per-element setup cost (a 2-core VM's figures on the CPU)."""
    steps = settings.repeats * settings.target_run_s
    setup = job.elements * (2e-9 if device == "cuda" else 4e-8)
    slow = 0.0
    if device == "cpu" and job.optimizer == "Muon":  # the bf16 matmuls, untimed steps included
        slow = (settings.warmup + 4) * newton_schulz_flops(job.shapes) / 2e10
    return 0.5 + steps + setup + slow


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table, its notes and its legend."""
    from .report import format_columns, legend

    head = ["optimizer", "impl", "workload", "elements", "dtype", "ms/step", "spread%",
            "B/elem", "GB/s", "%copy", "NS TFLOP/s", "%matmul", "launches", "vs torch",
            "check"]
    lines = []
    for r in rows:
        cells = [r["optimizer"], r["impl"], r["workload"], f"{r.get('elements', 0):,}",
                 r["dtype"]]
        if r["status"] == "ok":
            muon = r.get("ns_tflops") is not None
            cells += [f"{r['ms_step']:.3f}", f"{r['spread_pct']:.0f}",
                      f"{r['bytes_per_element']:.2f}", f"{r['gbps']:.1f}",
                      f"{r['pct_copy']:.0f}", f"{r['ns_tflops']:.2f}" if muon else "-",
                      f"{r['pct_matmul']:.0f}" if muon else "-", str(r["launches"]),
                      "-" if r["impl"] == "torch" else f"{r['vs_torch']:.1e}",
                      r["noisy"] or "ok"]
        else:
            cells += ["-"] * 9 + ["error"]
        lines.append(cells)
    out = format_columns(head, lines, right=set(range(3, 4)) | set(range(5, 14)))
    notes = [f"copy bandwidth {meta['copy_gbps']:.1f} GB/s, bf16 matmul "
             f"{meta['matmul_tflops']:.2f} TFLOP/s, both measured in this run on "
             f"{meta['device_name']}."]
    if meta["device"] == "cpu":
        notes.append("No GPU: fusedopt's rows are its reference path (pure torch), on scaled-"
                     "down workloads; a sanity check against torch.optim, not fusedopt's GPU "
                     "performance (run this on a GPU for that).")
    notes += [f"{r['optimizer']} {r['impl']} {r['dtype']}: {r['error']}"
              for r in rows if r["status"] != "ok"]
    return "\n".join(out + [""] + notes + ["", legend(head, COLUMN_LEGEND)])
