"""What the engine needs to know about a tensor: its kernel view, its memory, and checks.

The kernels address memory: a complex tensor is updated as its real view (as torch.optim
does), a DTensor (FSDP2's sharded params, grads and states) through its local shard. The
cached tables rely on a few facts about each tensor, checked here: it is dense (one gap-free,
non-overlapping run of memory, in any dim order, so one flat index walks it), of a supported
dtype, and where it says it is.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def real(t: Tensor) -> Tensor:
    """Complex tensors are updated as their real view, element-wise, as torch.optim does."""
    return torch.view_as_real(t) if t.is_complex() else t


def real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def is_dtensor(t: Tensor) -> bool:
    """A torch.distributed DTensor (FSDP2's sharded params, their grads and states)."""
    return type(t) is not Tensor and type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard, else ``t`` itself. The
    kernels address memory, and a DTensor's own address is not its shard's."""
    return t._local_tensor if is_dtensor(t) else t


def is_dense(t: Tensor) -> bool:
    """True if ``t`` covers one gap-free, non-overlapping run of memory (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def span(t: Tensor) -> tuple[int, int]:
    """The bytes a tensor (or its local shard) can touch: [first, last + 1); empty for an empty
    tensor. (For a dense tensor, numel * element size; strides are non-negative in torch.)"""
    t = local(t)
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def describe(t: Tensor) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)} and strides {t.stride()} on {t.device}"


def check_param(p: Tensor, owner: str) -> None:
    """A tensor fusedopt can optimize: a supported (real or complex) dtype, dense storage."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{owner} can only optimize Tensors, got {type(p).__name__}")
    if real_dtype(p) not in SUPPORTED_DTYPES:
        raise ValueError(f"{owner} supports parameters of dtype float16, bfloat16, float32, "
                         f"float64 and their complex forms, got {p.dtype}")
    if p.layout != torch.strided or not is_dense(local(p)):
        raise ValueError(f"{owner} needs dense, non-overlapping parameter storage; got a "
                         f"{p.layout} tensor of shape {tuple(p.shape)} and strides {p.stride()}")


def check_grad(g: Tensor, p: Tensor, owner: str, name: str) -> None:
    """A grad the kernels can read for ``p``: dense, and of the param's dtype, shape and device
    (torch's grad setter enforces these, but ``g.data = ...`` and ``grad_dtype`` do not)."""
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{owner} does not support sparse gradients ({name})")
    if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
        raise RuntimeError(f"{owner}: a grad is {describe(g)}, but its parameter ({name}) "
                           f"is {describe(p)}; fusedopt needs grads of the parameter's dtype, "
                           "shape and device")
    if not is_dense(local(g)):
        raise RuntimeError(f"{owner}: the grad of {name} is not dense ({describe(g)})")


def overlapping(spans: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The indices of two of ``spans`` that share memory, or None. Empty spans share none."""
    order = sorted((s for s in enumerate(spans) if s[1][1] > s[1][0]), key=lambda s: s[1][0])
    for (i, (_, end)), (j, (start, _)) in zip(order, order[1:]):
        if start < end:
            return i, j
    return None
