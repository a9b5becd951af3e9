"""Host overhead of a fusedopt step: the Python work around the one kernel launch.

The kernel launch is replaced by a no-op, so what is timed is exactly what the host does per
step (read grads and data pointers, compare them with the cached tables, re-upload what changed)
and nothing the device does. Two cases:

* ``steady``: the same grad tensors every step (``zero_grad(set_to_none=False)``);
* ``new_grads``: new grad storage every step, as ``zero_grad(set_to_none=True)`` gives after
  each backward: the engine re-points its device-side grad column.

When this time is below the kernel's device time, the host runs ahead and the step is
device-bound; above it, the host is the bottleneck.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch

from .impls import OptSpec
from .measure import make_params
from .workloads import Workload


@contextmanager
def _launch_stubbed():
    """Replace the kernel launch with a no-op and let the triton backend build its tables on
    the CPU too (TRITON_INTERPRET=1 only changes the backend choice here: nothing launches)."""
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


def measure_host(workload: Workload, spec: OptSpec, dtype: str, device: str,
                 steps: int = 100, repeats: int = 5) -> dict[str, Any]:
    """Median (over ``repeats``) host milliseconds per step, steady and with new grads."""
    import fusedopt

    params = make_params(workload, dtype, device, seed=0)
    grad_sets = [[p.grad for p in params], [torch.empty_like(p) for p in params]]
    row: dict[str, Any] = {"workload": workload.name, "tensors": workload.num_tensors,
                           "params": workload.numel, "optimizer": spec.label, "dtype": dtype,
                           "device": device}
    with _launch_stubbed():
        opt = getattr(fusedopt, spec.name)(params, **spec.hparams, backend="triton")
        opt.step()  # builds the tables and creates the state
        for case, swap in (("steady", False), ("new_grads", True)):
            per_step = []
            for _ in range(repeats):
                total = 0.0
                for i in range(steps):
                    if swap:  # assigning grads is autograd's work, not the step's: untimed
                        for p, g in zip(params, grad_sets[(i + 1) % 2]):
                            p.grad = g
                    start = time.perf_counter()
                    opt.step()
                    total += time.perf_counter() - start
                per_step.append(total / steps * 1e3)
            row[f"{case}_ms"] = statistics.median(per_step)
            row[f"{case}_spread_ms"] = max(per_step) - min(per_step)
    row["steady_us_per_tensor"] = row["steady_ms"] * 1e3 / max(workload.num_tensors, 1)
    return row


def format_host_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<12}{'tensors':>8}{'optimizer':>16}{'dtype':>6}{'device':>7}"
            f"{'steady ms':>11}{'new-grads ms':>14}{'us/tensor':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['workload']:<12}{r['tensors']:>8}{r['optimizer']:>16}{r['dtype']:>6}"
                     f"{r['device']:>7}{r['steady_ms']:>11.3f}{r['new_grads_ms']:>14.3f}"
                     f"{r['steady_us_per_tensor']:>11.3f}")
    return "\n".join(lines)
