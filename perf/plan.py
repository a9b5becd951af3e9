"""Planning a run: its sections and jobs, about how long each job takes, and a progress bar
whose ETA comes from those plans.

A run is a list of :class:`Section` s, each with its own table (on a bare CPU run: the engine's
host time, then the reference path against torch.optim). Every job carries a planned time, so
the estimate printed up front and the ETA on the bar weigh a 124M-parameter row more than a
4096-element one, instead of extrapolating from the count of rows done.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .workloads import Workload


@dataclass
class Job:
    """One measurement: a label for the progress bar, its planned seconds, and what to run."""

    label: str
    planned_s: float
    run: Callable[[], dict[str, Any]]


@dataclass
class SectionOutput:
    """What a finished section gives the run: the text to print (and put in the README), the
    files it wrote, and whether all its rows succeeded."""

    text: str
    files: list[Path]
    ok: bool


@dataclass
class Section:
    """One part of a run: its title, its jobs, and what to do with their rows at the end
    (tables, files, plots), which ``finish_s`` plans for."""

    title: str
    jobs: list[Job]
    finish: Callable[[list[dict[str, Any]]], SectionOutput]
    finish_s: float = 0.0

    @property
    def planned_s(self) -> float:
        """Planned seconds of the jobs and the finish."""
        return sum(j.planned_s for j in self.jobs) + self.finish_s


#: Rough costs behind the plan, per device (a 2-core x86 VM timing on one thread; an H100):
#: per row (build, check against torch, bookkeeping), per randn element (params and grads),
#: per step and per tensor of a step, and the share of the copy ceiling a step's bytes move at.
ROW_OVERHEAD_S = {"cpu": 0.03, "cuda": 0.1}
RANDN_S_PER_ELEMENT = {"cpu": 1.5e-8, "cuda": 2e-11}
STEP_OVERHEAD_S = {"cpu": 2e-5, "cuda": 3e-5}
TENSOR_S = {"cpu": 3e-5, "cuda": 2e-6}
BANDWIDTH_SHARE = {"cpu": 0.8, "cuda": 0.7}
COMPILE_S = 30.0  # torch.compile of one optimizer step
PLOT_S = 0.4  # one PNG
FIRST_USE_S = 1.5  # one-time imports in the first job (torch.optim pulls in torch._dynamo)


def step_seconds(workload: Workload, bytes_per_param: int, device: str,
                 copy_gbps: float) -> float:
    """About how long one step of ``workload`` takes."""
    moved = bytes_per_param * workload.numel / (copy_gbps * 1e9 * BANDWIDTH_SHARE[device])
    return STEP_OVERHEAD_S[device] + workload.num_tensors * TENSOR_S[device] + moved


def row_seconds(workload: Workload, bytes_per_param: int, impl: str, device: str,
                settings: Any, copy_gbps: float) -> float:
    """About how long ``measure.measure_one`` takes with ``settings``: setup, first step and
    warm-up, then ``repeats`` runs of about ``target_run_s`` each (more when even
    ``min_steps`` steps take longer)."""
    step = step_seconds(workload, bytes_per_param, device, copy_gbps)
    steps = max(settings.min_steps, min(settings.max_steps,
                                        math.ceil(settings.target_run_s / step)))
    setup = ROW_OVERHEAD_S[device] + 2 * workload.numel * RANDN_S_PER_ELEMENT[device]
    compile_s = COMPILE_S if impl == "torch-compile" else 0.0
    return setup + compile_s + (1 + settings.warmup) * step + settings.repeats * steps * step


def add_first_use(sections: list[Section]) -> None:
    """Charge the one-time imports to the run's first job."""
    first = next((s.jobs[0] for s in sections if s.jobs), None)
    if first is not None:
        first.planned_s += FIRST_USE_S


def clock(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def describe(sections: list[Section]) -> str:
    """The up-front estimate: the whole run, then one line per section."""
    total = sum(s.planned_s for s in sections)
    lines = [f"plan: about {clock(total)} (m:ss) more on an idle machine, in {len(sections)} "
             f"section{'s' if len(sections) != 1 else ''}:"]
    for i, s in enumerate(sections, 1):
        finish = f" + {clock(s.finish_s)} of tables and plots" if s.finish_s >= 1 else ""
        lines.append(f"  {i}. {s.title}: {len(s.jobs)} configuration"
                     f"{'s' if len(s.jobs) != 1 else ''}, ~{clock(s.planned_s - s.finish_s)}"
                     f"{finish}")
    return "\n".join(lines)


class Progress:
    """A plain-stderr progress bar: ``[#####.....] 12/40  0:34<1:10  label``.

    ``budgets`` are the jobs' planned seconds, in order. The bar fills by planned time, and the
    ETA is the planned time left, scaled by how the jobs done so far compared with their plan
    (once they are a tenth of it: the first jobs carry one-time imports). Redraws in place on
    a terminal; prints one line per job otherwise (CI logs).
    """

    def __init__(self, budgets: list[float], stream: TextIO | None = None, enabled: bool = True,
                 timer: Callable[[], float] = time.perf_counter):
        self.budgets = list(budgets)
        self.total, self.done, self.enabled = len(self.budgets), 0, enabled and bool(budgets)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.timer = timer
        self.t0 = timer()

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was made."""
        return self.timer() - self.t0

    def eta(self) -> float:
        """Seconds left: the planned time of the jobs not done, at the pace seen so far."""
        planned_done, planned = sum(self.budgets[: self.done]), sum(self.budgets)
        pace = self.elapsed / planned_done if planned_done >= 0.1 * planned > 0 else 1.0
        return sum(self.budgets[self.done:]) * pace

    def start(self, label: str) -> None:
        """Show that job ``done + 1`` (``label``) is starting."""
        if not self.enabled:
            return
        width = 24
        share = sum(self.budgets[: self.done]) / max(sum(self.budgets), 1e-9)
        fill = min(width, int(width * share))
        text = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done + 1}/{self.total} "
                f"{clock(self.elapsed)}<{clock(self.eta())}  {label}")
        if self.tty:
            self.stream.write("\r\033[K" + text[:160])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def advance(self) -> None:
        """Mark the current job finished."""
        self.done += 1

    def close(self) -> None:
        """End the bar (newline on a terminal) and print the time taken against the plan."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"{self.done}/{self.total} done in {clock(self.elapsed)} "
                          f"(planned {clock(sum(self.budgets))})\n")
        self.stream.flush()
