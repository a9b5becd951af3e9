"""Benchmark workloads: named lists of parameter shapes.

A workload is only shapes; the harness allocates the tensors itself, so the
same workload can be run for every dtype and implementation. Shapes follow the
layout each model has in its reference implementation (HF GPT-2, HF Llama,
torchvision ResNet-50) so tensor counts and sizes match what an optimizer sees
in real training.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import re
import sys
from dataclasses import dataclass

Shape = tuple[int, ...]

#: Default log2 range of the flat sweep, (first, last, step), per device. On CPU the sweep
#: stops at 2^18: larger steps take milliseconds each on one thread, and the CPU run is a
#: sanity check of the reference path, not a bandwidth measurement.
FLAT_RANGE = {"cuda": (12, 28, 2), "cpu": (12, 18, 3)}


@dataclass(frozen=True)
class Workload:
    """A named list of parameter shapes.

    ``family`` groups workloads that belong to one chart (every point of the
    flat sweep is family ``flat``).
    """

    name: str
    family: str
    shapes: tuple[Shape, ...]
    description: str = ""

    @property
    def numel(self) -> int:
        """Total number of elements over all tensors."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def num_tensors(self) -> int:
        """Number of parameter tensors."""
        return len(self.shapes)


class UnknownNameError(ValueError):
    """A workload/optimizer/impl/dtype name that is not known; lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]):
        self.kind, self.name, self.valid = kind, name, list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")


# ---------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------


def gpt2_124m() -> Workload:
    """GPT-2 small (124M) as in HF ``GPT2LMHeadModel``: 148 tensors, 124,439,808 params.

    lm_head is tied to wte, so it is not a separate parameter. Linear weights use
    HF's Conv1D layout (in x out); the layout does not change the element count.
    """
    d, vocab, ctx, n_layer = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),  # ln_1 weight, bias
            (d, 3 * d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]  # fmt: skip
    shapes += [(d,), (d,)]  # ln_f
    return Workload("gpt2", "gpt2", tuple(shapes), "GPT-2 124M (HF layout, tied lm_head)")


def llama_1b() -> Workload:
    """A Llama-style 1B model: hidden 2048, 16 layers, GQA (k/v 512 wide), MLP 8192.

    Vocab 32000 with untied embedding and lm_head; RMSNorm weights only (no
    biases anywhere). 147 tensors, 1,104,218,112 params.
    """
    h, n_layer, kv, ffn, vocab = 2048, 16, 512, 8192, 32000
    shapes: list[Shape] = [(vocab, h)]  # embed_tokens
    for _ in range(n_layer):
        shapes += [
            (h, h), (kv, h), (kv, h), (h, h),  # q, k, v, o projections
            (ffn, h), (ffn, h), (h, ffn),  # gate, up, down
            (h,), (h,),  # input / post-attention RMSNorm
        ]  # fmt: skip
    shapes += [(h,), (vocab, h)]  # final norm, lm_head
    return Workload("llama1b", "llama1b", tuple(shapes), "Llama-style 1B, GQA, untied lm_head")


def resnet50() -> Workload:
    """ResNet-50 (torchvision v1.5 layout) trainable params: 161 tensors, 25,557,032 params.

    BatchNorm running statistics are buffers, not parameters, so they are not
    included. Written from the architecture since torchvision is optional.
    """
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out = width * 4  # bottleneck expansion
        for b in range(blocks):
            shapes += [
                (width, inplanes, 1, 1), (width,), (width,),  # conv1 1x1, bn1
                (width, width, 3, 3), (width,), (width,),  # conv2 3x3, bn2
                (out, width, 1, 1), (out,), (out,),  # conv3 1x1, bn3
            ]  # fmt: skip
            if b == 0:  # first block of each stage projects the shortcut
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]  # fc
    return Workload("resnet50", "resnet50", tuple(shapes), "ResNet-50 (torchvision layout)")


def small_tensors(count: int = 2000, lo: float = 1e3, hi: float = 2.6e5, seed: int = 0) -> Workload:
    """``count`` 1-D tensors with log-uniform sizes in [lo, hi], from a fixed seed.

    Uses Python's ``random`` (stable across versions and devices) so the shapes
    are the same everywhere.
    """
    rng = random.Random(seed)
    a, b = math.log(lo), math.log(hi)
    shapes = tuple((int(round(math.exp(rng.uniform(a, b)))),) for _ in range(count))
    return Workload(
        f"small{count}",
        "small",
        shapes,
        f"{count} tensors, log-uniform {lo:.0e}-{hi:.1e} elements, seed {seed}",
    )


def flat(exponent: int) -> Workload:
    """One flat tensor of 2**exponent elements (one point of the sweep)."""
    n = 1 << exponent
    return Workload(f"flat-2^{exponent}", "flat", ((n,),), f"one tensor of 2^{exponent}")


def flat_sweep(first: int = 12, last: int = 28, step: int = 2) -> list[Workload]:
    """The flat sweep: one workload per power of two from 2**first to 2**last."""
    if not (0 <= first <= last <= 40 and step >= 1):
        raise ValueError(f"bad flat range {first}:{last}:{step} (log2 exponents, 0..40)")
    return [flat(e) for e in range(first, last + 1, step)]


def from_model(spec: str) -> Workload:
    """Shapes of a user model, built on the meta device so it costs no memory.

    ``spec`` is ``module:factory`` (``factory`` may be dotted, e.g.
    ``mypkg.models:Net.small``); ``factory()`` must return an ``nn.Module``.
    Only parameters with ``requires_grad`` are counted; tied parameters once.
    """
    import torch

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model expects MODULE:FACTORY, got {spec!r}")
    # Console scripts do not put the working directory on sys.path; users expect
    # `--model mymodel:build` to find ./mymodel.py.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    factory = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    with torch.device("meta"):
        model = factory()
    shapes = tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad)
    if not shapes:
        raise ValueError(f"{spec}: the model has no trainable parameters")
    return Workload(f"model:{attr}", "model", shapes, f"parameters of {spec}()")


# ---------------------------------------------------------------------------
# Name resolution
# ---------------------------------------------------------------------------

FIXED = {"gpt2": gpt2_124m, "llama1b": llama_1b, "resnet50": resnet50}
VALID_NAMES = ("flat", "flat:LO-HI[:STEP]", "flat:E", "gpt2", "llama1b", "resnet50",
               "small2000", "small<N>")  # fmt: skip

_FLAT_RE = re.compile(r"^flat:(\d+)(?:-(\d+))?(?::(\d+))?$")
_SMALL_RE = re.compile(r"^small(\d+)$")


def resolve(
    names: list[str], *, flat_range: tuple[int, int, int] = FLAT_RANGE["cuda"], seed: int = 0
) -> list[Workload]:
    """Turn workload names into workloads, in order, without duplicates.

    ``flat`` expands to the sweep given by ``flat_range``; ``flat:16-24`` or
    ``flat:20`` to an explicit sweep or point; ``small<N>`` to N small tensors.
    Raises :class:`UnknownNameError` listing the valid names.
    """
    out: list[Workload] = []
    for raw in names:
        name = raw.strip().lower()
        if name == "flat":
            ws = flat_sweep(*flat_range)
        elif m := _FLAT_RE.match(name):
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            ws = flat_sweep(lo, hi, int(m.group(3) or 2))
        elif m := _SMALL_RE.match(name):
            if int(m.group(1)) < 1:
                raise ValueError("small<N> needs N >= 1")
            ws = [small_tensors(int(m.group(1)), seed=seed)]
        elif name in FIXED:
            ws = [FIXED[name]()]
        else:
            raise UnknownNameError("workload", raw, VALID_NAMES)
        out += [w for w in ws if w.name not in {o.name for o in out}]
    return out
