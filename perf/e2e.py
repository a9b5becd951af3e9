"""End-to-end: train a small GPT on synthetic tokens with each optimizer.

Answers "what share of a real training step is the optimizer, and what does a
faster one buy in tokens/s". Each step is split with a device sync between
phases (forward+backward | optimizer step | zero_grad), so the split is exact
at the cost of the little overlap a real loop would have. The first steps are
warm-up (compile, graph capture, allocator) and are not counted.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import torch

from .gpt import CONFIGS, GPT, num_params
from .impls import Impl, OptSpec, TorchFusedGraph, unsupported
from .measure import TORCH_DTYPES, error_text, sync

E2E_FIELDS = [
    "model", "num_params", "optimizer", "dtype", "impl", "status", "steps", "batch", "seq_len",
    "fwd_bwd_ms", "opt_ms", "other_ms", "step_ms", "opt_pct", "tokens_per_s",
    "first_opt_step_ms", "loss_first", "loss_last", "note", "error",
    "device", "device_name", "torch_version", "triton_version", "fusedopt_version",
]  # fmt: skip

#: Default model per device: GPT-2 124M where it is cheap, a 4M toy on CPU.
DEFAULT_MODEL = {"cuda": "gpt2", "cpu": "tiny"}


def train_one(
    model_name: str, spec: OptSpec, dtype: str, impl: Impl, device: str, *,
    steps: int, warmup: int, batch: int, seed: int = 0,
) -> dict[str, Any]:
    """Train ``model_name`` for ``warmup + steps`` steps; return the timing row."""
    cfg = CONFIGS[model_name]
    row: dict[str, Any] = {"model": model_name, "optimizer": spec.label, "dtype": dtype,
                           "impl": impl.name, "status": "ok", "steps": steps, "batch": batch,
                           "seq_len": cfg.block_size, "note": "", "error": ""}  # fmt: skip
    model = built = None
    try:
        torch.manual_seed(seed)  # same init for every optimizer
        model = GPT(cfg).to(device=device, dtype=TORCH_DTYPES[dtype])
        row["num_params"] = num_params(model)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        tokens = torch.randint(cfg.vocab_size, (batch, cfg.block_size + 1), generator=gen,
                               device=device)  # fmt: skip
        idx, targets = tokens[:, :-1], tokens[:, 1:].contiguous()
        built = impl.build(list(model.parameters()), spec, device)
        row["note"] = built.note
        # A captured graph reads fixed grad addresses: keep grads allocated for it.
        set_to_none = not isinstance(impl, TorchFusedGraph)
        fb, op, other, losses = [], [], [], []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            loss = model(idx, targets)
            loss.backward()
            sync(device)
            t1 = time.perf_counter()
            built.step()
            sync(device)
            t2 = time.perf_counter()
            built.optimizer.zero_grad(set_to_none=set_to_none)
            sync(device)
            t3 = time.perf_counter()
            losses.append(float(loss.detach()))
            if i == 0:
                row["first_opt_step_ms"] = (t2 - t1) * 1e3
            if i >= warmup:
                fb.append(t1 - t0)
                op.append(t2 - t1)
                other.append(t3 - t2)
        totals = [a + b + c for a, b, c in zip(fb, op, other)]
        step_s = statistics.median(totals)
        row.update(
            fwd_bwd_ms=statistics.median(fb) * 1e3, opt_ms=statistics.median(op) * 1e3,
            other_ms=statistics.median(other) * 1e3, step_ms=step_s * 1e3,
            tokens_per_s=batch * cfg.block_size / step_s,
            loss_first=losses[0], loss_last=losses[-1],
        )  # fmt: skip
        row["opt_pct"] = 100 * row["opt_ms"] / row["step_ms"]
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        row["status"] = "error"
        row["error"] = error_text(e)
    finally:
        del model, built
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def run_e2e(
    device: str, specs: list[OptSpec], dtypes: list[str], impls: list[Impl], *,
    model_name: str, steps: int, warmup: int, batch: int, seed: int = 0,
    progress: Any = None,
) -> tuple[list[dict], list[dict]]:
    """Every (optimizer, dtype, impl) that can run: (rows, skipped).

    ``progress`` (optional) gets ``start(label)`` before and ``advance()`` after each item.
    """
    rows, skipped = [], []
    for dtype in dtypes:
        for spec in specs:
            for impl in impls:
                why = impl.unavailable(device) or unsupported(impl, spec, device, dtype)
                label = f"e2e {model_name} {spec.label} {dtype} {impl.name}"
                if why:
                    skipped.append({"optimizer": spec.label, "dtype": dtype, "impl": impl.name,
                                    "reason": why})  # fmt: skip
                    continue
                if progress is not None:
                    progress.start(label)
                rows.append(train_one(model_name, spec, dtype, impl, device, steps=steps,
                                      warmup=warmup, batch=batch, seed=seed))  # fmt: skip
                if progress is not None:
                    progress.advance()
    return rows, skipped


def format_e2e(rows: list[dict]) -> str:
    """A fixed-width table of the end-to-end rows."""
    head = ["optimizer", "dtype", "impl", "fwd+bwd ms", "opt ms", "other ms", "step ms", "opt %",
            "tokens/s", "1st opt ms", "loss first->last"]  # fmt: skip
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["optimizer"], r["dtype"], r["impl"], f"ERROR {r['error']}"])
            continue
        lines.append([r["optimizer"], r["dtype"], r["impl"], f"{r['fwd_bwd_ms']:.1f}",
                      f"{r['opt_ms']:.2f}", f"{r['other_ms']:.2f}", f"{r['step_ms']:.1f}",
                      f"{r['opt_pct']:.1f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['first_opt_step_ms']:.1f}",
                      f"{r['loss_first']:.3f}->{r['loss_last']:.3f}"])  # fmt: skip
    widths = [max([len(h)] + [len(c[i]) for c in lines if len(c) > i and len(c) == len(head)])
              for i, h in enumerate(head)]  # fmt: skip

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # fmt: skip

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(c) for c in lines)])
