"""Implementations to benchmark and how to build each one's step callable.

Every implementation turns (params, optimizer spec) into a zero-argument
``step()``. The harness only ever calls ``step()``, so a CUDA graph replay, a
compiled function and a plain ``optimizer.step`` are measured the same way.
Lazy work (state init, table build, compile, graph capture) happens in the
first ``step()`` call, which the harness times separately as first-step latency.

Third-party libraries are imported only when asked for and are never required.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .bytes_model import KNOWN as KNOWN_OPTIMIZERS
from .workloads import UnknownNameError

#: Hyperparameters used unless the user overrides them. The lr is small so the
#: params stay finite over thousands of steps with fixed random grads.
BENCH_HPARAMS: dict[str, dict[str, Any]] = {name: {"lr": 1e-4} for name in KNOWN_OPTIMIZERS}
BENCH_HPARAMS["AdamW"]["weight_decay"] = 0.01
BENCH_HPARAMS["SGD"]["momentum"] = 0.9  # the common training config; plain SGD is SGD:momentum=0


@dataclass(frozen=True)
class OptSpec:
    """An optimizer name plus hyperparameter overrides, parsed from ``Name[:k=v,...]``."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def hparams(self) -> dict[str, Any]:
        """Benchmark defaults for this optimizer with the overrides applied."""
        return {**BENCH_HPARAMS[self.name], **dict(self.overrides)}

    @property
    def precision_options(self) -> dict[str, Any]:
        """fusedopt's precision options among the overrides (master_weights, ...): only
        fusedopt runs them (see :func:`unsupported`)."""
        from fusedopt.precision import OPTIONS

        return {k: v for k, v in self.overrides if k in OPTIONS and v != OPTIONS[k]}

    @property
    def label(self) -> str:
        """``AdamW`` or ``AdamW[amsgrad=True]``: the name used in tables and files."""
        if not self.overrides:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in self.overrides)}]"

    @classmethod
    def parse(cls, text: str) -> OptSpec:
        """Parse ``AdamW`` / ``adamw:amsgrad=True,weight_decay=0.1`` (name is case-insensitive)."""
        name, _, rest = text.strip().partition(":")
        canon = {n.lower(): n for n in KNOWN_OPTIMIZERS}.get(name.lower())
        if canon is None:
            raise UnknownNameError("optimizer", name, KNOWN_OPTIMIZERS)
        overrides = []
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"bad optimizer option {item!r} in {text!r}; use key=value")
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value  # a bare word, e.g. a string option
            overrides.append((key.strip(), parsed))
        return cls(canon, tuple(overrides))


def fusedopt_optimizers() -> list[str]:
    """The known optimizer names that ``fusedopt`` currently exports, in canonical order."""
    try:
        import fusedopt
    except Exception:  # noqa: BLE001 - a broken package simply has no optimizers to bench
        return []
    return [n for n in KNOWN_OPTIMIZERS if isinstance(getattr(fusedopt, n, None), type)]


@dataclass
class Built:
    """A ready-to-run implementation: ``step()`` plus the optimizer for inspection."""

    step: Callable[[], Any]
    optimizer: Any
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    first_call_steps: int = 1  # optimizer steps the first step() call takes (warm-up + capture)


def _construct(cls: Any, params: list, hparams: dict[str, Any], **extra: Any) -> tuple[Any, str]:
    """Call ``cls(params, ...)`` passing only the keywords its signature accepts.

    Third-party optimizers name things differently; a dropped hyperparameter is
    reported in the row's note rather than silently ignored.
    """
    kwargs = {**hparams, **extra}
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return cls(params, **kwargs), ""
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if accepts_any:
        return cls(params, **kwargs), ""
    dropped = sorted(k for k in kwargs if k not in sig.parameters)
    kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    return cls(params, **kwargs), (f"ignored: {','.join(dropped)}" if dropped else "")


def unsupported(impl: Impl, spec: OptSpec, device: str, dtype: str) -> str | None:
    """Why ``impl`` has no row for ``spec``: its own reason, or, for any implementation but
    fusedopt's, the precision options it does not have (the plain optimizer's row is the one
    to compare with)."""
    why = impl.unsupported(spec.name, device, dtype)
    if why is None and spec.precision_options and not isinstance(impl, FusedOpt):
        names = ", ".join(spec.precision_options)
        why = f"{impl.name} has no {names} (fusedopt's precision options)"
    return why


class Impl:
    """One implementation. Subclasses override the three hooks below."""

    name = ""
    description = ""
    opt_in = False  # only run when named explicitly
    devices: tuple[str, ...] = ("cpu", "cuda")

    def unavailable(self, device: str) -> str | None:
        """Why this implementation cannot run at all on ``device`` (None if it can)."""
        if device not in self.devices:
            return f"{self.name} needs {' or '.join(self.devices)}"
        return None

    def unsupported(self, opt: str, device: str, dtype: str) -> str | None:
        """Why this implementation has no variant for ``opt`` (None if it has)."""
        return None

    def build(self, params: list, spec: OptSpec, device: str) -> Built:
        """Construct the optimizer and its ``step()``."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# fusedopt
# ---------------------------------------------------------------------------


class FusedOpt(Impl):
    """fusedopt's optimizer classes, with the default or a forced backend."""

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self.name = "fusedopt" if backend is None else f"fusedopt-{backend}"
        self.description = {
            None: "fusedopt, default backend (triton on CUDA or under TRITON_INTERPRET=1, else "
                  "reference)",
            "reference": "fusedopt with backend='reference': per-tensor torch ops, what "
                         "fusedopt runs without a GPU (not the Triton kernel)",
        }.get(backend, f"fusedopt with backend={backend!r}")

    def unavailable(self, device: str) -> str | None:
        try:
            import fusedopt  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"import fusedopt failed: {e}"
        interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if self.backend == "triton" and device == "cpu" and not interpreting:
            return "triton on CPU needs TRITON_INTERPRET=1 set before start (and is very slow)"
        return None

    def unsupported(self, opt: str, device: str, dtype: str) -> str | None:
        return None if opt in fusedopt_optimizers() else f"fusedopt has no {opt} yet"

    def build(self, params: list, spec: OptSpec, device: str) -> Built:
        import fusedopt

        cls = getattr(fusedopt, spec.name)
        kw = {} if self.backend is None else {"backend": self.backend}
        opt = cls(params, **spec.hparams, **kw)  # exact torch.optim signature: no filtering
        note = ""
        if hasattr(fusedopt, "resolve_backend"):  # record what "auto" picked, per row
            note = f"backend={fusedopt.resolve_backend(self.backend, torch.device(device))}"
        return Built(opt.step, opt, note=note)


# ---------------------------------------------------------------------------
# torch.optim
# ---------------------------------------------------------------------------


def _torch_cls(opt: str) -> Any:
    return getattr(torch.optim, opt, None)


def _accepts(cls: Any, kw: str) -> bool:
    return kw in inspect.signature(cls).parameters


class TorchOptim(Impl):
    """torch.optim with its default choice, or forced for-loop / foreach / fused."""

    _FLAGS = {
        "default": {},
        "forloop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    _DESC = {
        "default": "torch.optim with no flags (foreach on CUDA, for-loop on CPU)",
        "forloop": "torch.optim, foreach=False (one op per tensor)",
        "foreach": "torch.optim, foreach=True (multi-tensor ops)",
        "fused": "torch.optim, fused=True",
    }

    def __init__(self, mode: str):
        self.mode = mode
        self.name = "torch" if mode == "default" else f"torch-{mode}"
        self.description = self._DESC[mode]

    def unsupported(self, opt: str, device: str, dtype: str) -> str | None:
        cls = _torch_cls(opt)
        if cls is None:
            return f"torch.optim has no {opt}"
        for kw in self._FLAGS[self.mode]:
            if not _accepts(cls, kw):
                return f"torch.optim.{opt} has no {kw} implementation"
        return None

    def build(self, params: list, spec: OptSpec, device: str) -> Built:
        opt = _torch_cls(spec.name)(params, **spec.hparams, **self._FLAGS[self.mode])
        return Built(opt.step, opt)


class TorchFusedGraph(Impl):
    """torch.optim fused, captured once into a CUDA graph and replayed.

    Needs static grads (the harness sets them once) and, for optimizers with a
    step counter, ``capturable=True`` so the counter lives on the device.
    """

    name = "torch-fused-graph"
    description = "torch.optim fused (capturable) step replayed from a CUDA graph"
    devices = ("cuda",)
    warmup_steps = 3  # on a side stream, before capture, as the CUDA-graph docs require

    def unsupported(self, opt: str, device: str, dtype: str) -> str | None:
        return TorchOptim("fused").unsupported(opt, device, dtype)

    def build(self, params: list, spec: OptSpec, device: str) -> Built:
        cls = _torch_cls(spec.name)
        extra = {"fused": True}
        if _accepts(cls, "capturable"):
            extra["capturable"] = True
        opt = cls(params, **spec.hparams, **extra)
        graph: list[torch.cuda.CUDAGraph] = []

        def step() -> None:
            if not graph:  # first call: warm up, capture (timed as first-step latency)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.warmup_steps):
                        opt.step()
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    opt.step()
                graph.append(g)
            graph[0].replay()

        return Built(step, opt, note=f"capture after {self.warmup_steps} warmup steps",
                     first_call_steps=self.warmup_steps + 1)  # warm-ups, then the replay


class TorchCompile(Impl):
    """``torch.compile`` of ``optimizer.step``, torch's documented recipe (opt-in: slow)."""

    name = "torch-compile"
    description = "torch.compile'd torch.optim step (opt-in; compile time reported)"
    opt_in = True

    def unsupported(self, opt: str, device: str, dtype: str) -> str | None:
        return None if _torch_cls(opt) is not None else f"torch.optim has no {opt}"

    def build(self, params: list, spec: OptSpec, device: str) -> Built:
        # A fresh dynamo cache per build: otherwise new optimizers pile up
        # recompiles until the cache limit silently falls back to eager.
        torch._dynamo.reset()
        opt = _torch_cls(spec.name)(params, **spec.hparams)

        @torch.compile(fullgraph=False)
        def step() -> None:
            opt.step()

        return Built(step, opt, extra={"compiled": True})


# ---------------------------------------------------------------------------
# Third-party libraries (each optional)
# ---------------------------------------------------------------------------


class ThirdParty(Impl):
    """An optional library; ``mapping`` maps our optimizer name to (class name, fixed kwargs)."""

    def __init__(
        self,
        name: str,
        module: str,
        mapping: dict[str, tuple[str, dict[str, Any]]],
        description: str,
        devices: tuple[str, ...] = ("cuda",),
    ):
        self.name, self.module, self.mapping = name, module, mapping
        self.description, self.devices = description, devices
        self._mod: Any = None
        self._err: str | None = None

    def _load(self) -> Any:
        if self._mod is None and self._err is None:
            try:
                self._mod = importlib.import_module(self.module)
            except Exception as e:  # noqa: BLE001 - some raise RuntimeError without a GPU
                self._err = f"not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        return self._mod

    def unavailable(self, device: str) -> str | None:
        if (why := super().unavailable(device)) is not None:
            return why
        self._load()
        return self._err

    def unsupported(self, opt: str, device: str, dtype: str) -> str | None:
        if opt not in self.mapping:
            return f"{self.name} has no {opt}"
        if not hasattr(self._load(), self.mapping[opt][0]):
            return f"{self.module} has no {self.mapping[opt][0]}"
        return None

    def build(self, params: list, spec: OptSpec, device: str) -> Built:
        cls_name, fixed = self.mapping[spec.name]
        opt, note = _construct(getattr(self._load(), cls_name), params, spec.hparams, **fixed)
        return Built(opt.step, opt, note=f"{self.module}.{cls_name} {note}".strip())


def _same(names: list[str], **fixed: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    return {n: (n, dict(fixed)) for n in names}


THIRD_PARTY = [
    ThirdParty(
        "apex", "apex.optimizers",
        {"Adam": ("FusedAdam", {"adam_w_mode": False}),
         "AdamW": ("FusedAdam", {"adam_w_mode": True}),
         "SGD": ("FusedSGD", {}), "Adagrad": ("FusedAdagrad", {}), "LAMB": ("FusedLAMB", {})},
        "NVIDIA apex FusedAdam/FusedSGD/FusedAdagrad/FusedLAMB",
    ),
    ThirdParty(
        "bitsandbytes", "bitsandbytes.optim",
        _same(["Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "Lion", "LAMB"], optim_bits=32),
        "bitsandbytes optimizers with 32-bit states (same bytes as torch)",
    ),
    ThirdParty(
        "torchao", "torchao.optim",
        {"Adam": ("_Adam", {}), "AdamW": ("_AdamW", {})},
        "torchao full-precision Adam/AdamW (torch.compile'd single-tensor steps)",
    ),
    ThirdParty(
        "optimi", "optimi",
        _same(["Adam", "AdamW", "SGD", "Lion", "RAdam"]),
        "torch-optimi (Triton/foreach kernels)",
        devices=("cpu", "cuda"),
    ),
    ThirdParty(
        "flashoptim", "flashoptim",
        {"Adam": ("FlashAdam", {}), "AdamW": ("FlashAdamW", {}), "SGD": ("FlashSGD", {}),
         "Lion": ("FlashLion", {})},
        "FlashOptim (Databricks) fused Triton optimizers",
    ),
]  # fmt: skip


def all_impls() -> dict[str, Impl]:
    """Every implementation the harness knows, by name, in display order."""
    impls: list[Impl] = [
        FusedOpt(),
        FusedOpt("reference"),
        FusedOpt("triton"),
        TorchOptim("default"),
        TorchOptim("forloop"),
        TorchOptim("foreach"),
        TorchOptim("fused"),
        TorchFusedGraph(),
        TorchCompile(),
        *THIRD_PARTY,
    ]
    return {i.name: i for i in impls}


#: Implementations run when ``--impls`` is not given (third-party added when importable).
#: On CPU, fusedopt's kernels cannot run (triton needs a GPU), so the default compares its
#: pure-torch reference path, named explicitly, with torch.optim's default: a sanity check.
DEFAULT_IMPLS = {
    "cuda": ["fusedopt", "torch-foreach", "torch-fused", "torch-fused-graph"],
    "cpu": ["fusedopt-reference", "torch"],
}

#: Speedup baseline, first one present wins: torch fused on CUDA; torch's default on CPU.
BASELINE_ORDER = {
    "cuda": ["torch-fused", "torch-foreach", "torch"],
    "cpu": ["torch", "torch-foreach", "torch-forloop", "torch-fused"],
}


def default_impls(device: str) -> list[str]:
    """The default set for ``device``: fusedopt, torch's variants, and importable libraries."""
    names = list(DEFAULT_IMPLS[device])
    for tp in THIRD_PARTY:
        if tp.unavailable(device) is None:
            names.append(tp.name)
    return names


def resolve(names: list[str]) -> list[Impl]:
    """Look implementations up by name; raises :class:`UnknownNameError` listing valid ones."""
    table = all_impls()
    out = []
    for n in names:
        key = n.strip().lower()
        if key not in table:
            raise UnknownNameError("impl", n, list(table))
        if table[key] not in out:
            out.append(table[key])
    return out
