"""Timing: the copy-bandwidth ceiling and one (workload, optimizer, dtype, impl) row.

Method (the same for every implementation):

1. allocate params (0.02 * randn, like a transformer init) and random grads
   (randn, never zeros), set once;
2. build the implementation and time its first ``step()`` alone, synchronised:
   that is the first-step latency, compile / capture / state init included;
3. warm up, and pick a step count so one timed run lasts about
   ``target_run_s`` (tiny workloads would otherwise be timer noise);
4. ``repeats`` times: sync, run the steps back to back, sync. The wall clock
   gives ms/step with host overhead included; on CUDA, events recorded around
   the same run give the device-side time. Medians are reported with min/max;
5. check that params are finite and did change (a no-op would look infinitely
   fast).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from .bytes_model import bytes_per_param
from .impls import Impl, OptSpec
from .workloads import Workload

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "fp64": torch.float64}  # fmt: skip


@dataclass
class Settings:
    """How long and how often to measure."""

    warmup: int = 3
    repeats: int = 5
    target_run_s: float = 0.1  # wall time of one timed run of steps
    min_steps: int = 2
    max_steps: int = 200
    seed: int = 0

    @classmethod
    def for_device(cls, device: str, quick: bool = False) -> Settings:
        """Defaults: a little longer on CUDA (more steps are cheap), much shorter with quick.
        The CPU default keeps a bare ``fusedopt-bench`` on a 2-core machine under 2 minutes."""
        if quick:
            return cls(warmup=1, repeats=3, target_run_s=0.02, min_steps=1, max_steps=20)
        if device == "cuda":
            return cls(warmup=5, repeats=7, target_run_s=0.2, min_steps=3, max_steps=1000)
        return cls(warmup=2, repeats=5, target_run_s=0.04)


def sync(device: str) -> None:
    """Wait for queued device work (no-op on CPU, where ops are synchronous)."""
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model and thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            names = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            model = next(names, "")
    except OSError:
        import platform

        model = platform.processor()
    return f"{model or 'CPU'} ({torch.get_num_threads()} threads)"


def error_text(e: BaseException) -> str:
    """``Type: first line of the message`` (kept short for tables and CSV cells)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure_ceiling(device: str, nbytes: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Copy bandwidth of ``dst.copy_(src)``: (bytes read + bytes written) / time, in GB/s.

    The buffer is large (1 GiB on CUDA, 256 MiB on CPU) so caches do not help.
    Returns the median and min/max over ``repeats`` runs of several copies.
    """
    if nbytes is None:
        nbytes = 1 << 30 if device == "cuda" else 256 << 20
        if device == "cuda":  # leave room: two buffers must fit comfortably
            nbytes = min(nbytes, torch.cuda.mem_get_info()[0] // 4)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)  # touched: no lazy zero pages
    dst = torch.empty_like(src)
    inner = 10 if device == "cuda" else 3
    for _ in range(2):
        dst.copy_(src)
    rates = []
    for _ in range(repeats):
        sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                dst.copy_(src)
            seconds = time.perf_counter() - t0
        rates.append(2 * n * 4 * inner / seconds / 1e9)
    del src, dst
    _free_memory(device)
    return {"gbps": statistics.median(rates), "gbps_min": min(rates), "gbps_max": max(rates),
            "nbytes": float(n * 4)}  # fmt: skip


def make_params(workload: Workload, dtype: str, device: str, seed: int) -> list[torch.nn.Parameter]:
    """Fresh params (0.02*randn) with random grads (randn), reproducible from ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    params = []
    for shape in workload.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=tdt) * 0.02)
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=tdt)
        params.append(p)
    return params


def _tensor_bytes(params: list[torch.Tensor], optimizer: Any) -> int:
    """Bytes of params, grads and every tensor in ``optimizer.state`` (unique storages)."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for p in params:
        add(p)
        add(p.grad)
    for state in getattr(optimizer, "state", {}).values():
        if isinstance(state, dict):
            for v in state.values():
                add(v)
    return sum(seen.values())


def _picks(params: list[torch.Tensor]) -> list[int]:
    nonempty = [i for i, p in enumerate(params) if p.numel()]
    return sorted({nonempty[0], nonempty[-1]}) if nonempty else []


def _sample(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of a slice of the first and last param, to check that steps change them."""
    return [params[i].detach().reshape(-1)[:4096].clone() for i in _picks(params)]


def _changed(params: list[torch.Tensor], before: list[torch.Tensor]) -> bool:
    return all(
        not torch.equal(params[i].detach().reshape(-1)[:4096], b)
        for i, b in zip(_picks(params), before)
    )


def _finite(params: list[torch.Tensor]) -> bool:
    # One max per tensor then one host sync, instead of one sync per tensor.
    maxes = torch.stack([p.detach().abs().amax().float() for p in params if p.numel()])
    return bool(torch.isfinite(maxes).all())


def _timed_run(step: Any, steps: int, device: str) -> tuple[float, float | None]:
    """One run of ``steps`` back-to-back steps: (wall seconds, CUDA-event seconds or None)."""
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        wall = time.perf_counter() - t0
        return wall, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0, None


def measure_one(
    workload: Workload, spec: OptSpec, dtype: str, impl: Impl, device: str, settings: Settings
) -> dict[str, Any]:
    """Measure one configuration and return its result row (see ``report.FIELDS``).

    Exceptions from the implementation are caught and returned as an ``error``
    row so that one broken kernel does not end a long run.
    """
    bpp = bytes_per_param(spec.name, dtype, spec.hparams)
    row: dict[str, Any] = {
        "workload": workload.name, "family": workload.family,
        "num_tensors": workload.num_tensors, "numel": workload.numel,
        "optimizer": spec.label, "dtype": dtype, "impl": impl.name,
        "bytes_per_param": bpp, "status": "ok", "error": "", "note": "",
    }  # fmt: skip
    _free_memory(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem_base = torch.cuda.memory_allocated()
    params: list[torch.nn.Parameter] = []
    built = None
    try:
        params = make_params(workload, dtype, device, settings.seed)
        before = _sample(params)
        built = impl.build(params, spec, device)
        row["note"] = built.note

        sync(device)
        t0 = time.perf_counter()
        built.step()
        sync(device)
        first = time.perf_counter() - t0
        row["first_step_ms"] = first * 1e3
        if built.extra.get("compiled"):
            row["compile_s"] = first  # one step included; negligible next to compiling

        t0 = time.perf_counter()
        for _ in range(settings.warmup):
            built.step()
        sync(device)
        est = (time.perf_counter() - t0) / max(settings.warmup, 1) if settings.warmup else first
        steps = math.ceil(settings.target_run_s / max(est, 1e-7))
        steps = max(settings.min_steps, min(settings.max_steps, steps))

        walls, events = [], []
        for _ in range(settings.repeats):
            wall, ev = _timed_run(built.step, steps, device)
            walls.append(wall / steps)
            if ev is not None:
                events.append(ev / steps)

        ms = statistics.median(walls) * 1e3
        row.update(
            steps=steps, repeats=settings.repeats, ms_per_step=ms,
            ms_min=min(walls) * 1e3, ms_max=max(walls) * 1e3,
            spread_pct=(max(walls) - min(walls)) / statistics.median(walls) * 100,
            gbps=bpp * workload.numel / (ms / 1e3) / 1e9,
        )  # fmt: skip
        if events:
            ms_ev = statistics.median(events) * 1e3
            row["ms_per_step_events"] = ms_ev
            row["gbps_events"] = bpp * workload.numel / (ms_ev / 1e3) / 1e9
        row["params_finite"] = _finite(params)
        row["params_changed"] = _changed(params, before)
        if device == "cuda":
            row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - mem_base) / 2**20
            row["mem_source"] = "cuda-allocator"
        else:
            row["peak_mem_mb"] = _tensor_bytes(params, built.optimizer) / 2**20
            row["mem_source"] = "tensor-bytes"
    except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
        row["status"] = "error"
        row["error"] = error_text(e)
    finally:
        del built, params
        _free_memory(device)
    return row
