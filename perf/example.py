"""A complete fusedopt training loop: mixed precision, GradScaler, fused clipping, an LR
schedule and, optionally, a compiled optimizer step, on a small GPT with synthetic tokens.

    python -m fusedopt.perf.example                       # bf16 autocast, on CUDA if present
    python -m fusedopt.perf.example --dtype fp16          # fp16 autocast with a GradScaler
    python -m fusedopt.perf.example --compile --steps 50

fp16 needs the GradScaler (its grads can overflow: those steps are skipped on the device and
the scale shrinks); bf16 does not, so the scaler is disabled and its calls become no-ops.
Clipping follows torch's recipe: unscale, then clip, then ``scaler.step``.
"""

from __future__ import annotations

import argparse

import torch

import fusedopt

from .gpt import GPT, GPTConfig


def train(steps: int = 20, dtype: str = "bf16", device: str | None = None,
          compile_step: bool = False, config: GPTConfig | None = None, seed: int = 0,
          log=print) -> list[float]:
    """Train for ``steps`` steps; returns the losses."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    cfg = config or GPTConfig()
    model = GPT(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = fusedopt.AdamW([{"params": decay, "weight_decay": 0.1},
                          {"params": no_decay, "weight_decay": 0.0}],
                         lr=torch.tensor(3e-3), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    if compile_step:  # after the scheduler has wrapped step: one fusedopt::step op compiled
        opt.step = torch.compile(opt.step)
    amp_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device, enabled=dtype == "fp16")
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (8, cfg.block_size + 1), generator=gen)
        tokens = tokens.to(device)
        opt.zero_grad()
        with torch.autocast(device, dtype=amp_dtype):
            loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = opt.clip_grad_norm_(1.0)  # one norm launch; the coefficient stays on device
        scaler.step(opt)  # skipped on the device if fp16 grads overflowed
        scaler.update()
        sched.step()
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {losses[-1]:.4f}  grad norm {float(norm):.3f}  "
                f"lr {float(opt.param_groups[0]['lr']):.2e}  "
                f"skipped {bool(opt.last_step_skipped)}")
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusedopt.perf.example",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the opt step")
    args = parser.parse_args(argv)
    train(args.steps, args.dtype, args.device, args.compile)


if __name__ == "__main__":
    main()
