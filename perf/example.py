"""A complete fusedopt training loop on real text: mixed precision, GradScaler, fused clipping,
an LR schedule and, optionally, a compiled optimizer step, on a small character-level GPT.

    python -m fusedopt.perf.example                       # bf16 autocast, on CUDA if present
    python -m fusedopt.perf.example --dtype fp16          # fp16 autocast with a GradScaler
    python -m fusedopt.perf.example --compile --steps 300

The text is torch's own documentation: the docstrings of the ``torch.nn`` classes (about
370 KB of English with some math), which ships with torch, so nothing is downloaded. The last
10% is held out; the validation loss (nats per character) is reported as it falls from
about ln(vocabulary) ~ 4.6.

fp16 needs the GradScaler (its grads can overflow: those steps are skipped on the device and
the scale shrinks); bf16 does not, so the scaler is disabled and its calls become no-ops.
Clipping follows torch's recipe: unscale, then clip, then ``scaler.step``. The schedule is
OneCycleLR: warm-up from max_lr/10 over the first 10% of steps, then cosine annealing to
max_lr/100 at the last step (beta1 cycles between 0.85 and 0.95 on the way, as OneCycleLR
does for Adam). Each logged lr is the one that step used.
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import dataclass

import torch

import fusedopt

from .gpt import GPT, GPTConfig

MAX_LR = 3e-3


def corpus() -> str:
    """The docstrings of torch.nn's classes, in name order: real text shipped with torch."""
    docs = (inspect.getdoc(getattr(torch.nn, name)) for name in sorted(dir(torch.nn))
            if isinstance(getattr(torch.nn, name), type))
    return "\n\n".join(doc for doc in docs if doc)


@dataclass
class CharData:
    """The corpus as character indices, split 90/10 into training and validation text."""

    train: torch.Tensor
    val: torch.Tensor
    vocab: list[str]

    @classmethod
    def load(cls) -> CharData:
        text = corpus()
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        return cls(data[:split], data[split:], vocab)

    def batch(self, split: str, batch: int, block: int, gen: torch.Generator) -> torch.Tensor:
        """``batch`` random windows of ``block + 1`` characters (inputs and next characters)."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
        return torch.stack([data[s:s + block + 1] for s in starts.tolist()])


def train(steps: int = 200, dtype: str = "bf16", device: str | None = None,
          compile_step: bool = False, config: GPTConfig | None = None, seed: int = 0,
          batch: int = 16, log=print) -> dict[str, list[float]]:
    """Train for ``steps`` steps; returns the training losses, and the validation losses
    measured before the first step and at each logged step (the last after the last step)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    data = CharData.load()
    cfg = config or GPTConfig(vocab_size=len(data.vocab), block_size=64, n_layer=2, n_head=4,
                              n_embd=128)
    if cfg.vocab_size < len(data.vocab):
        raise ValueError(f"the corpus has {len(data.vocab)} characters; vocab_size is "
                         f"{cfg.vocab_size}")
    model = GPT(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = fusedopt.AdamW([{"params": decay, "weight_decay": 0.1},
                          {"params": no_decay, "weight_decay": 0.0}],
                         lr=torch.tensor(MAX_LR), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=steps,
                                                pct_start=0.1, div_factor=10,
                                                final_div_factor=10)
    if compile_step:  # after the scheduler has wrapped step: one fusedopt::step op compiled
        opt.step = torch.compile(opt.step)
    amp_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device, enabled=dtype == "fp16")
    gen = torch.Generator().manual_seed(seed)
    val_batches = [data.batch("val", batch, cfg.block_size, torch.Generator().manual_seed(i))
                   for i in range(4)]

    def loss_of(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)
        with torch.autocast(device, dtype=amp_dtype):
            return model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    @torch.no_grad()
    def validation_loss() -> float:
        model.eval()
        loss = sum(loss_of(b).item() for b in val_batches) / len(val_batches)
        model.train()
        return loss

    history = {"train": [], "val": [validation_loss()]}
    log(f"{len(data.train):,} training / {len(data.val):,} validation characters, "
        f"{len(data.vocab)} symbols; val loss {history['val'][0]:.3f} before training "
        f"(ln {len(data.vocab)} = {math.log(len(data.vocab)):.3f})")
    for step in range(steps):
        lr = float(opt.param_groups[0]["lr"])  # what this step uses (the scheduler moves it)
        opt.zero_grad()
        loss = loss_of(data.batch("train", batch, cfg.block_size, gen))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = opt.clip_grad_norm_(1.0)  # one norm launch; the coefficient stays on device
        scaler.step(opt)  # skipped on the device if fp16 grads overflowed
        scaler.update()
        sched.step()
        history["train"].append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            history["val"].append(validation_loss())
            log(f"step {step:4d}  loss {history['train'][-1]:.3f}  val {history['val'][-1]:.3f}"
                f"  grad norm {float(norm):.3f}  lr {lr:.2e}  "
                f"skipped {bool(opt.last_step_skipped)}")
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusedopt.perf.example",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16",
                        help="autocast dtype (default bf16; fp16 adds a GradScaler)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the opt step")
    args = parser.parse_args(argv)
    train(args.steps, args.dtype, args.device, args.compile)


if __name__ == "__main__":
    main()
