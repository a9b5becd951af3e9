"""Timing: the copy-bandwidth ceiling and one (workload, optimizer, dtype, impl) row.

Method (the same for every implementation):

1. allocate params (0.02 * randn, like a transformer init) and random grads
   (randn, never zeros), set once;
2. build the implementation and time its first ``step()`` alone, synchronised:
   that is the first-step latency, compile / capture / state init included;
3. warm up, and pick a step count so one timed run lasts about
   ``target_run_s`` (tiny workloads would otherwise be timer noise);
4. ``repeats`` times: sync, run the steps back to back, sync, with Python's garbage
   collector paused (a full collection inside a run is 100+ ms of noise). The wall clock
   gives ms/step with host overhead included; on CUDA, events recorded around
   the same run give the device-side time. Medians are reported with min/max and the
   interquartile spread, which decides whether a row is too noisy to trust
   (:func:`too_noisy`, the one place that decides it);
5. check that params are finite and did change (a no-op would look infinitely
   fast), and compare them with torch.optim's for-loop implementation stepped the same
   number of times from the same params and grads (:class:`TorchTwin`).

The caller pins torch's intra-op threads (:func:`pinned_threads`) around all of it: with the
default thread pool on a small, busy machine, one ``torch.sqrt`` on 4096 floats took 8-12 ms
instead of 3 us, and the numbers were noise.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bytes_model import bytes_per_param, resident_bytes_per_param
from .impls import Impl, OptSpec
from .workloads import Workload

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "fp64": torch.float64}  # fmt: skip

#: Intra-op threads while timing, unless --threads says otherwise.
TIMING_THREADS = 1
#: A row whose timed runs spread more than this (interquartile range, % of the median) is
#: flagged noisy: the table says so and the plots draw no bar from it.
NOISY_SPREAD_PCT = 20.0
#: Last-level cache assumed when the system does not say (bytes).
FALLBACK_CACHE_BYTES = 32 << 20
#: Workloads at least this large get a full garbage collection between rows (it costs
#: ~0.15 s once torch.compile's modules are loaded; small ones only need the young generations).
FULL_GC_NUMEL = 1 << 22


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
        The CPU default keeps a bare ``fusedopt-bench`` on a 2-core machine under two minutes."""
        if quick:
            return cls(warmup=1, repeats=3, target_run_s=0.005, min_steps=1, max_steps=20)
        if device == "cuda":
            return cls(warmup=5, repeats=7, target_run_s=0.2, min_steps=3, max_steps=1000)
        return cls(warmup=2, repeats=9, target_run_s=0.04)


def spread_of(samples: list[float]) -> float:
    """Interquartile range of ``samples`` as % of their median: how far the middle half of
    the timed runs disagree. One preempted run moves max - min, not this."""
    if len(samples) < 2:
        return 0.0
    med = statistics.median(samples)
    if len(samples) < 4:
        lo, hi = min(samples), max(samples)
    else:
        lo, _, hi = statistics.quantiles(samples, n=4)
    return (hi - lo) / med * 100 if med > 0 else 0.0


def too_noisy(spread: float | None) -> bool:
    """The one rule for "noisy": a spread (see :func:`spread_of`) above NOISY_SPREAD_PCT."""
    return spread is not None and spread > NOISY_SPREAD_PCT


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside, restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside (what ``timeit`` does while timing)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def sync(device: str) -> None:
    """Wait for queued device work (no-op on CPU, where ops are synchronous)."""
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model and torch's current intra-op thread count."""
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
    threads = torch.get_num_threads()
    return f"{model or 'CPU'} ({threads} thread{'s' if threads != 1 else ''})"


def cache_bytes(device: str) -> int:
    """The last-level cache: a working set this small is served from it, not from memory,
    so the copy ceiling (a copy much larger than it) does not bound its step."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0)) or (50 << 20)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=FALLBACK_CACHE_BYTES)


def error_text(e: BaseException) -> str:
    """``Type: first line of the message`` (kept short for tables and CSV cells)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _free_memory(device: str, numel: int = FULL_GC_NUMEL) -> None:
    if device == "cuda" or numel >= FULL_GC_NUMEL:
        gc.collect()
    else:
        gc.collect(1)  # the last row's cycles are young; a full pass would cost more than the row
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


class TorchTwin:
    """torch.optim's for-loop implementation (``foreach=False``) stepping copies of slices of
    the params, to compare another implementation's params with after the same steps.

    Every optimizer with a torch.optim twin is element-wise, so the first ``slice_numel``
    elements of up to ``max_tensors`` evenly spaced tensors, stepped on their own, must end
    where the same elements of the full tensors end: a cheap check on any workload size.
    """

    max_tensors = 8
    slice_numel = 1 << 16
    #: An element may differ by this fraction of the largest update, plus ULPS of its value.
    #: In bf16/fp16 the fraction is 16 eps (12% / 1.6%): torch's for-loop rounds every op to
    #: the param dtype, a fused kernel computes in fp32 and rounds once.
    update_rtol = 1e-3
    half_update_eps = 16
    ulps = 4

    def __init__(self, params: list[torch.Tensor], spec: OptSpec):
        nonempty = [i for i, p in enumerate(params) if p.numel()]
        step = max(1, math.ceil(len(nonempty) / self.max_tensors))
        self.picks = nonempty[::step]
        self.initial = [self._slice(params[i]).clone() for i in self.picks]
        self.params = []
        for i, start in zip(self.picks, self.initial):
            copy = torch.nn.Parameter(start.clone())
            copy.grad = self._slice(params[i].grad).clone()
            self.params.append(copy)
        self.optimizer = getattr(torch.optim, spec.name)(self.params, **spec.hparams,
                                                         foreach=False)

    @classmethod
    def of(cls, params: list[torch.Tensor], spec: OptSpec) -> TorchTwin | None:
        """The twin, or None when torch.optim has no such optimizer (Lion, LAMB) or does not
        take the row's options: the row is then measured without this check."""
        if not isinstance(getattr(torch.optim, spec.name, None), type):
            return None
        try:
            return cls(params, spec)
        except (TypeError, ValueError):
            return None

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1)[: self.slice_numel]

    def compare(self, params: list[torch.Tensor], steps: int) -> dict[str, Any]:
        """Step the twin ``steps`` times, then: the largest |param - twin param|, the largest
        update the twin made, and whether every element is within tolerance."""
        for _ in range(steps):
            self.optimizer.step()
        eps = torch.finfo(self.params[0].dtype).eps
        rtol = max(self.update_rtol, self.half_update_eps * eps)
        triples = [(self._slice(params[i]).double(), twin.detach().double(), start.double())
                   for i, twin, start in zip(self.picks, self.params, self.initial)]
        if not all(bool(ref.isfinite().all()) for _, ref, _ in triples):
            return {"check_steps": steps}  # torch.optim itself overflowed (fp16): no verdict
        max_update = max(float((ref - start).abs().max()) for _, ref, start in triples)
        max_diff = max(float((ours - ref).abs().max()) for ours, ref, _ in triples)
        ok = all(bool(((ours - ref).abs() <= rtol * max_update + self.ulps * eps * ref.abs()).all())
                 for ours, ref, _ in triples)  # NaN in ours compares False: not ok
        return {"check_steps": steps, "check_max_diff": max_diff,
                "check_max_update": max_update, "check_ok": ok}


def _timed_run(step: Callable[[], Any], steps: int, device: str) -> tuple[float, float | None]:
    """One run of ``steps`` back-to-back steps: (wall seconds, CUDA-event seconds or None)."""
    sync(device)
    with gc_paused():
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
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
        "working_set_mb": resident_bytes_per_param(spec.name, dtype, spec.hparams)
                          * workload.numel / 2**20,
    }  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem_base = torch.cuda.memory_allocated()
    params: list[torch.nn.Parameter] = []
    built = twin = None
    try:
        params = make_params(workload, dtype, device, settings.seed)
        before = _sample(params)
        twin = TorchTwin.of(params, spec)
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
        if twin is not None:  # same data, same number of steps so far: compare with torch
            row.update(twin.compare(params, built.first_call_steps + settings.warmup))
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
            iqr_pct=spread_of(walls),  # ms/step's spread: it decides noisy
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
        del built, params, twin
        _free_memory(device, workload.numel)
    return row
