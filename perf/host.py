"""Host overhead of a fusedopt step: the Python work around the one kernel launch.

The kernel launch is replaced by a no-op, so what is timed is exactly what the host does per
step (read grads and data pointers, compare them with the cached tables, re-upload what changed)
and nothing the device does. Three timings over the same tensors, each call timed alone:

* ``floor``: one Python pass reading ``p.grad.data_ptr()`` over the params: the least any step
  that looks at every grad can cost in Python;
* ``steady``: the same grad tensors every step (``zero_grad(set_to_none=False)``);
* ``new_grads``: new grad storage every step, as ``zero_grad(set_to_none=True)`` gives after
  each backward: the engine re-points its device-side grad column.

``steady / floor`` and ``new_grads / floor`` say how far the engine is from that floor. When the
step's host time is below the kernel's device time, the host runs ahead and the step is
device-bound; above it, the host is the bottleneck.

The tensors are allocated with ``torch.empty``: with nothing launched, nothing reads them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .impls import OptSpec
from .measure import NOISY_SPREAD_PCT, TORCH_DTYPES, error_text, gc_paused, spread_of, too_noisy
from .workloads import Workload

#: What ``fusedopt-bench host`` (and the host section of the bare CPU run) measures by default.
DEFAULT_WORKLOADS = ("small2000", "gpt2")
DEFAULT_OPTIMIZERS = ("AdamW",)
DEFAULT_DTYPES = ("fp32",)
#: (steps per repeat, repeats): normal and --quick.
DEFAULT_STEPS = {False: (100, 7), True: (10, 3)}

#: host.csv columns, in order.
FIELDS = ["workload", "tensors", "params", "optimizer", "dtype", "device", "status", "steps",
          "repeats", "floor_ms", "steady_ms", "new_grads_ms", "steady_per_floor",
          "new_grads_per_floor", "steady_us_per_tensor", "floor_spread_pct",
          "steady_spread_pct", "new_grads_spread_pct", "noisy", "error"]  # fmt: skip

#: What each column of the host table means (the legend under it).
COLUMN_LEGEND = {
    "workload": "parameter shapes (small2000: 2000 tensors of 1e3-2.6e5 elements; gpt2: GPT-2 "
                "124M, 148 tensors)",
    "tensors": "number of parameter tensors",
    "optimizer": "fusedopt optimizer (backend='triton', kernel launch replaced by a no-op)",
    "dtype": "dtype of params, grads and state",
    "device": "where the tensors live",
    "floor ms": "one Python pass reading p.grad.data_ptr() over the same tensors, timed like "
                "the step: the least a step that looks at every grad can cost",
    "steady ms": "host time of opt.step() with the same grad tensors every step (median)",
    "new-grads ms": "host time of opt.step() with new grad storage every step, as after "
                    "zero_grad(set_to_none=True) and backward (median)",
    "steady/floor": "steady ms / floor ms",
    "new/floor": "new-grads ms / floor ms",
    "us/tensor": "steady ms per tensor, in microseconds",
    "check": f"ok; noisy: <timings> whose repeats spread more than {NOISY_SPREAD_PCT:g}% "
             "(interquartile range / median; rerun); or error (see the note below)",
}


@contextmanager
def launch_stubbed() -> Iterator[None]:
    """Replace the kernel launch with a no-op and let the triton backend build its tables on
    the CPU too (TRITON_INTERPRET=1 only changes the backend choice here: nothing launches).

    The one place that knows how the engine launches: if the engine changes how it reaches
    ``fusedopt.kernels.launch``, this is what to update."""
    from fusedopt import kernels

    real_launch, saved_env = kernels.launch, os.environ.get("TRITON_INTERPRET")
    kernels.launch = lambda *args, **kwargs: None
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        kernels.launch = real_launch
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def _ms_per_call(fn: Callable[[], Any], steps: int, repeats: int,
                 before_each: Callable[[int], None] | None = None) -> list[float]:
    """Milliseconds per call of ``fn``, one value per repeat. Each call is timed alone so that
    ``before_each`` (autograd's work in training, not the step's) stays out of the time."""
    per_repeat = []
    with gc_paused():
        for _ in range(repeats):
            total = 0.0
            for i in range(steps):
                if before_each is not None:
                    before_each(i)
                start = time.perf_counter()
                fn()
                total += time.perf_counter() - start
            per_repeat.append(total / steps * 1e3)
    return per_repeat


def _empty_params(workload: Workload, dtype: str, device: str) -> list[torch.nn.Parameter]:
    tdt = TORCH_DTYPES[dtype]
    params = [torch.nn.Parameter(torch.empty(s, dtype=tdt, device=device)) for s in workload.shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


def measure_host(workload: Workload, spec: OptSpec, dtype: str, device: str,
                 steps: int = DEFAULT_STEPS[False][0],
                 repeats: int = DEFAULT_STEPS[False][1]) -> dict[str, Any]:
    """Median (over ``repeats``) host milliseconds per step: floor, steady and new grads.

    An error (the engine changed under the stub, say) is returned as an ``error`` row."""
    row: dict[str, Any] = {"workload": workload.name, "tensors": workload.num_tensors,
                           "params": workload.numel, "optimizer": spec.label, "dtype": dtype,
                           "device": device, "status": "ok", "steps": steps, "repeats": repeats,
                           "error": ""}  # fmt: skip
    try:
        row.update(_measure(workload, spec, dtype, device, steps, repeats))
    except Exception as e:  # noqa: BLE001 - reported in the row and the table
        row.update(status="error", error=error_text(e))
    return row


def _measure(workload: Workload, spec: OptSpec, dtype: str, device: str, steps: int,
             repeats: int) -> dict[str, Any]:
    import fusedopt

    params = _empty_params(workload, dtype, device)
    grad_sets = [[p.grad for p in params], [torch.empty_like(p) for p in params]]

    def read_grad_pointers() -> None:
        for p in params:
            p.grad.data_ptr()

    def swap_grads(i: int) -> None:
        for p, g in zip(params, grad_sets[(i + 1) % 2]):
            p.grad = g

    out: dict[str, Any] = {}
    with launch_stubbed():
        opt = getattr(fusedopt, spec.name)(params, **spec.hparams, backend="triton")
        opt.step()  # builds the tables and creates the state
        for case, fn, before_each in (("floor", read_grad_pointers, None),
                                      ("steady", opt.step, None),
                                      ("new_grads", opt.step, swap_grads)):  # fmt: skip
            per_step = _ms_per_call(fn, steps, repeats, before_each)
            out[f"{case}_ms"] = statistics.median(per_step)
            out[f"{case}_spread_pct"] = spread_of(per_step)
    out["steady_per_floor"] = out["steady_ms"] / out["floor_ms"]
    out["new_grads_per_floor"] = out["new_grads_ms"] / out["floor_ms"]
    out["steady_us_per_tensor"] = out["steady_ms"] * 1e3 / max(workload.num_tensors, 1)
    out["noisy"] = ",".join(c for c in ("floor", "steady", "new_grads")
                            if too_noisy(out[f"{c}_spread_pct"]))  # which timings, if any
    return out


#: Rough host costs behind the time estimate (a 2-core x86 VM): per row; per parameter
#: element for the engine's state creation (first touch of fresh memory dominates); and per
#: tensor and per call of one floor + steady + new-grads round with its untimed grad swap.
_ROW_S = 0.5
_S_PER_ELEMENT = 1.5e-8
_US_PER_TENSOR_CALL = 2.0
_US_PER_CALL = 150.0


def planned_seconds(workload: Workload, steps: int, repeats: int) -> float:
    """About how long :func:`measure_host` takes for ``workload``."""
    calls = steps * repeats
    setup = _ROW_S + workload.numel * _S_PER_ELEMENT
    return setup + calls * (workload.num_tensors * _US_PER_TENSOR_CALL + _US_PER_CALL) / 1e6


def format_host_table(rows: list[dict[str, Any]]) -> str:
    """The host table, a note per noisy or failed row, and the legend."""
    from .report import format_columns, legend

    head = list(COLUMN_LEGEND)
    lines = []
    for r in rows:
        cells = [r["workload"], str(r["tensors"]), r["optimizer"], r["dtype"], r["device"]]
        if r["status"] == "ok":
            cells += [f"{r['floor_ms']:.3f}", f"{r['steady_ms']:.3f}", f"{r['new_grads_ms']:.3f}",
                      f"{r['steady_per_floor']:.1f}x", f"{r['new_grads_per_floor']:.1f}x",
                      f"{r['steady_us_per_tensor']:.3f}",
                      f"noisy: {r['noisy']}" if r["noisy"] else "ok"]
        else:
            cells += ["-"] * 6 + ["error"]
        lines.append(cells)
    out = format_columns(head, lines, right=set(range(1, 2)) | set(range(5, 11)))
    notes = [f"{r['workload']} {r['optimizer']} {r['dtype']}: {r['error']}"
             for r in rows if r["status"] != "ok"]
    if any(r.get("noisy") for r in rows):
        notes.append(f"noisy: the repeats of the named timing(s) spread more than "
                     f"{NOISY_SPREAD_PCT:g}% (interquartile range / median): the machine was "
                     "busy; rerun before reading the ratios.")
    return "\n".join(out + ([""] + notes if notes else []) + ["", legend(head, COLUMN_LEGEND)])
