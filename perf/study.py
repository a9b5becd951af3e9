"""The precision study: does each of fusedopt's precision options train a bf16 model as well as
fp32 does, where plain bf16 does not?

The task is real and needs no download: a character-level GPT (:mod:`fusedopt.perf.gpt`) learns
to continue Python source code, the text of the Python standard library that ships with the
interpreter running it (a fixed, sorted list of its top-level modules: about 2 MB; the last
tenth held out). Every run starts from the same initial weights and sees the same batches in
the same order (the same seeds); only the optimizer's precision changes:

* ``fp32``: fp32 params, fusedopt.AdamW (torch.optim.AdamW's math): the baseline;
* ``bf16``: bf16 params, plain AdamW (torch's bf16 AdamW: states in bf16, each update rounded
  to nearest into the bf16 params);
* ``bf16 + master_weights``, ``bf16 + stochastic_rounding``, ``bf16 + kahan_summation``;
* ``fp32 + state_dtype=bf16``, ``fp32 + state_dtype=8bit`` and
  ``bf16 + master_weights + state_dtype=8bit`` (block-wise 8-bit states; the model's params
  below 4096 elements, its layer norms and biases, keep fp32 states).

The forward and backward run in the params' dtype. The lr warms up, then decays on a cosine to a
tenth: the late, small updates are the ones bf16 rounding loses. The runs use fusedopt's
reference backend (the same math the kernels are tested against; a CPU runs it at this size
in minutes). Output: ``study.json``, ``study.csv``, ``study.png`` and a Markdown table
(``study.md``) with the final held-out loss (the mean of the last three evaluations) and its
distance from fp32, and the optimizer's
state bytes per param (measured: the bytes of every state tensor after training, divided by
the parameter count).

    python -m fusedopt.perf.study --out perf/results/precision
    python -m fusedopt.perf.study --runs "fp32 + state_dtype=8bit" --out perf/results/precision
    python -m fusedopt.perf.study --memory --out perf/results/precision

``--runs`` runs some of the runs; those already in the output's ``study.json`` (made with the
same steps, batch, lr and seed) are kept, so a new run joins the table without the others
being run again.

``--memory`` measures the other half: the optimizer state each mode keeps, in bytes per param,
on GPT-2 124M's parameter shapes (:func:`fusedopt.perf.workloads.gpt2_124m`), next to
torch.optim.AdamW's: after one step, the bytes of every state tensor the optimizer holds
(scalars included), divided by the parameter count. Written to ``memory.json`` and
``memory.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch

from .gpt import GPT, GPTConfig, num_params

#: (name, param dtype, fusedopt options)
RUNS = (
    ("fp32", torch.float32, {}),
    ("bf16", torch.bfloat16, {}),
    ("bf16 + master_weights", torch.bfloat16, {"master_weights": True}),
    ("bf16 + stochastic_rounding", torch.bfloat16, {"stochastic_rounding": True}),
    ("bf16 + kahan_summation", torch.bfloat16, {"kahan_summation": True}),
    ("fp32 + state_dtype=bf16", torch.float32, {"state_dtype": torch.bfloat16}),
    ("fp32 + state_dtype=8bit", torch.float32, {"state_dtype": "8bit"}),
    ("bf16 + master_weights + state_dtype=8bit", torch.bfloat16,
     {"master_weights": True, "state_dtype": "8bit"}),
)
CONFIG = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)
CORPUS_BYTES = 2_000_000


def corpus(limit: int = CORPUS_BYTES) -> bytes:
    """The standard library's top-level modules, sorted by name, up to ``limit`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = bytearray()
    for path in sorted(root.glob("*.py")):
        text += path.read_bytes()
        if len(text) >= limit:
            break
    return bytes(text[:limit])


def batches(data: torch.Tensor, steps: int, batch: int, block: int, seed: int):
    """``steps`` random (input, target) batches of ``data``, the same for every run."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + block] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + block + 1] for s in starts.tolist()])
        yield x, y


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, block: int, batches_: int = 8) -> float:
    """Mean held-out loss over fixed windows of ``data``."""
    stride = (len(data) - block - 1) // (batches_ * 16)
    losses = []
    for b in range(batches_):
        starts = [(b * 16 + i) * stride for i in range(16)]
        x = torch.stack([data[s:s + block] for s in starts])
        y = torch.stack([data[s + 1:s + block + 1] for s in starts])
        losses.append(model(x, y).item())
    return sum(losses) / len(losses)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (the 0-dim scalars, step counts, left out)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim())


def run_one(name: str, dtype: torch.dtype, options: dict, train: torch.Tensor,
            held_out: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
            eval_every: int) -> dict:
    import fusedopt

    torch.manual_seed(seed)
    model = GPT(CONFIG).to(dtype)
    opt = fusedopt.AdamW(model.parameters(), lr=lr, weight_decay=0.1, backend="reference",
                         **options)
    curve = []
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches(train, steps, batch, CONFIG.block_size, seed + 1)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, steps // 20)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(model, held_out, CONFIG.block_size)))
    seconds = time.perf_counter() - start
    final = sum(loss for _, loss in curve[-3:]) / len(curve[-3:])
    return {"name": name, "param_dtype": str(dtype).removeprefix("torch."),
            "options": {k: str(v) for k, v in options.items()}, "curve": curve,
            "final_loss": final, "state_bytes_per_param": state_bytes(opt) / num_params(model),
            "seconds": seconds}


def write(results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    base = results[0]["final_loss"]
    lines = ["| run | final held-out loss | vs fp32 | optimizer state, bytes/param |",
             "|---|---|---|---|"]
    csv = ["run,final_loss,vs_fp32_percent,state_bytes_per_param"]
    for r in results:
        gap = 100 * (r["final_loss"] - base) / base
        lines.append(f"| {r['name']} | {r['final_loss']:.4f} | {gap:+.2f}% | "
                     f"{r['state_bytes_per_param']:.1f} |")
        csv.append(f"{r['name']},{r['final_loss']:.5f},{gap:.3f},"
                   f"{r['state_bytes_per_param']:.2f}")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "study.csv").write_text("\n".join(csv) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (full, late) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps, losses = zip(*r["curve"])
        style = "--" if r["param_dtype"] == "float32" else "-"
        for ax in (full, late):
            ax.plot(steps, losses, style, label=r["name"])
    tail = [loss for r in results for _, loss in r["curve"][len(r["curve"]) // 2:]]
    late.set_xlim(results[0]["curve"][len(results[0]["curve"]) // 2][0], None)
    late.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    for ax, title in ((full, "held-out loss"), (late, "second half, zoomed")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/char)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    full.legend(fontsize=8)
    fig.suptitle(f"char-level GPT ({meta['params']:,} params) on the Python stdlib source, "
                 f"AdamW, {meta['steps']} steps")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)
    plt.close(fig)


#: (row name, param dtype, the optimizer: "torch" or fusedopt's options)
MEMORY_ROWS = (
    ("torch.optim.AdamW, fp32 params", torch.float32, "torch"),
    ("torch.optim.AdamW, bf16 params", torch.bfloat16, "torch"),
    ("fusedopt.AdamW, fp32 params", torch.float32, {}),
    ("fusedopt.AdamW, fp32 params, state_dtype=bf16", torch.float32,
     {"state_dtype": torch.bfloat16}),
    ("fusedopt.AdamW, bf16 params", torch.bfloat16, {}),
    ("fusedopt.AdamW, bf16 params, master_weights", torch.bfloat16, {"master_weights": True}),
    ("fusedopt.AdamW, bf16 params, master_weights, state_dtype=bf16", torch.bfloat16,
     {"master_weights": True, "state_dtype": torch.bfloat16}),
    ("fusedopt.AdamW, bf16 params, stochastic_rounding", torch.bfloat16,
     {"stochastic_rounding": True}),
    ("fusedopt.AdamW, bf16 params, kahan_summation", torch.bfloat16, {"kahan_summation": True}),
    ("fusedopt.AdamW, fp32 params, state_dtype=8bit", torch.float32, {"state_dtype": "8bit"}),
    ("fusedopt.AdamW, bf16 params, master_weights, state_dtype=8bit", torch.bfloat16,
     {"master_weights": True, "state_dtype": "8bit"}),
)


def memory(out: Path) -> list[dict]:
    """Optimizer state bytes per param on GPT-2 124M's shapes, per MEMORY_ROWS row."""
    import fusedopt

    from .workloads import gpt2_124m

    shapes = gpt2_124m().shapes
    rows = []
    for name, dtype, how in MEMORY_ROWS:
        params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt = (torch.optim.AdamW(params, foreach=False) if how == "torch"
               else fusedopt.AdamW(params, backend="reference", **how))
        opt.step()
        numel = sum(p.numel() for p in params)
        held = sum(v.numel() * v.element_size() for s in opt.state.values()
                   for v in s.values() if isinstance(v, torch.Tensor))
        weights = sum(p.numel() * p.element_size() for p in params)
        rows.append({"name": name, "params": numel, "state_bytes_per_param": held / numel,
                     "param_bytes_per_param": weights / numel,
                     "total_bytes_per_param": (held + weights) / numel})
        del opt, params
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"workload": "gpt2 (124M, HF shapes)",
                                                 "torch": torch.__version__, "rows": rows},
                                                indent=1))
    lines = ["| optimizer | state, bytes/param | params + state, bytes/param | state, GPT-2 124M |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['state_bytes_per_param']:.2f} | "
                     f"{r['total_bytes_per_param']:.2f} | "
                     f"{r['state_bytes_per_param'] * r['params'] / 2**20:.0f} MiB |")
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    return rows


def _earlier_runs(out: Path, settings: dict) -> tuple[dict[str, dict], list[str]]:
    """The runs of ``out``'s study.json, by name, if it was made with these settings (steps,
    batch, lr, seed; a run made with others is not comparable, and is an error), and the
    commands that made them."""
    path = out / "study.json"
    if not path.exists():
        return {}, []
    saved = json.loads(path.read_text())
    differ = {k: (saved["meta"].get(k), v) for k, v in settings.items()
              if saved["meta"].get(k) != v}
    if differ:
        raise SystemExit(f"{path} was made with other settings (saved, now): {differ}; "
                         "rerun every run, or choose another --out")
    commands = saved["meta"].get("commands") or [saved["meta"]["command"]]
    return {r["name"]: r for r in saved["runs"]}, commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME",
                        help="a subset of: " + ", ".join(name for name, _, _ in RUNS))
    parser.add_argument("--memory", action="store_true",
                        help="measure the optimizer state per param on GPT-2 124M's shapes "
                             "instead of training")
    parser.add_argument("--out", type=Path, default=Path("bench-out/precision"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        for row in memory(args.out):
            print(f"{row['name']:64s} {row['state_bytes_per_param']:6.2f} B/param")
        return 0
    data = torch.frombuffer(bytearray(corpus()), dtype=torch.uint8).long()
    split = len(data) * 9 // 10
    train, held_out = data[:split], data[split:]
    unknown = set(args.runs or ()) - {name for name, _, _ in RUNS}
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose among "
                     + ", ".join(name for name, _, _ in RUNS))
    chosen = [r for r in RUNS if args.runs is None or r[0] in args.runs]
    settings = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed}
    earlier, commands = _earlier_runs(args.out, settings) if args.runs else ({}, [])
    results = []
    for name, dtype, options in chosen:
        result = run_one(name, dtype, options, train, held_out, args.steps, args.batch,
                         args.lr, args.seed, args.eval_every)
        print(f"{name:32s} final loss {result['final_loss']:.4f}  "
              f"state {result['state_bytes_per_param']:.1f} B/param  {result['seconds']:.0f} s",
              flush=True)
        results.append(result)
    done = {r["name"]: r for r in results}
    results = [done.get(name) or earlier[name] for name, _, _ in RUNS
               if name in done or name in earlier]
    import fusedopt

    meta = {**settings,
            "params": num_params(GPT(CONFIG)), "corpus_bytes": len(data),
            "config": CONFIG.__dict__, "python": platform.python_version(),
            "torch": torch.__version__, "fusedopt": fusedopt.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "commands": [*commands, shlex.join(["python", "-m", "fusedopt.perf.study",
                                              *(argv or sys.argv[1:])])]}
    write(results, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
