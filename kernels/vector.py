"""Multi-tensor vector kernels: a vector is a list of tensors, and each operation on it is one
kernel launch over the whole list, whatever its length.

These are the linear algebra of :class:`fusedopt.LBFGS` (two-loop recursion, line search):

* ``dot(xs, ys)``, ``abs_sum(xs)``, ``abs_max(xs)`` -> 0-dim tensor in the vectors' dtype
  (torch's ``torch.dot``, ``x.abs().sum()``, ``x.abs().max()`` of the concatenation);
  ``norm(xs, p)`` -> the 1-, 2- or inf-norm in the opmath dtype (gradient clipping's);
* ``axpy(alpha, xs, ys)``: ``ys += alpha * xs``;  ``scale(alpha, xs)``: ``xs *= alpha``;
  ``copy(xs, ys, alpha=1)``: ``ys = alpha * xs``.

``alpha`` is a Python number, or a one-element tensor read by the kernel on the device (no
host synchronisation). Math runs in fp64 for fp64 storage and in fp32 otherwise, as torch's
opmath does; reductions accumulate in that dtype too.

Each list is described by a :class:`TensorTable`: a device ``int64`` column of its tensors'
addresses, plus a :class:`Layout` shared by every table of the same sizes: the numel column
and the chunk work list of :func:`fusedopt.kernels.work_list`. One program handles one chunk
of ``CHUNK`` elements, so tensor sizes never cause a recompile. Offsets are int64, full
chunks of 16-byte aligned tensors take an unmasked path with alignment hints, tails and odd
views a masked one.

Reductions are deterministic and need no zero-filled output: every program writes its partial
result, and the last program to finish (an acq_rel atomic counter, reset by that program)
combines the partials in program order and writes the result. That scratch belongs to the
:class:`Layout`: reductions over one layout must not run concurrently on several streams.
"""

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# tl.sum and tl.max are @triton.jit functions of triton.language.standard that call into
# triton.language.core. Triton's CPU interpreter patches the language modules that a kernel's
# module binds: binding tl.core here keeps it patched for them even when nested calls skip
# their own patching (as tests/conftest.py's speed-up does).
import triton.language.core as _tl_core  # noqa: F401

from fusedopt.kernels import interpreting as _interpreting
from fusedopt.kernels.skeleton import (
    _TL_DTYPES,
    BLOCK,
    NUM_WARPS,
    VECTOR_ITERS,
    _to_storage,
    work_list,
)

# Operations, passed to the kernels as constexprs.
_DOT = 0
_ABS_SUM = 1
_ABS_MAX = 2
_AXPY = 0
_SCALE = 1
_COPY = 2
_SCALED_COPY = 3

# Partials the last program of a reduction sums per load (a runtime loop covers the rest).
COMBINE_BLOCK = 1024

_launches = 0


def launch_count() -> int:
    """How many vector kernels this process has launched (tests count launches per op)."""
    return _launches


# ---- the kernels --------------------------------------------------------------------------------


@triton.jit
def _combine(acc, OP: tl.constexpr):
    """A block's sum, or its max with NaN propagated (as torch.max does): tl.max may drop
    NaNs, so the NaNs are added back (their sum is 0 when there are none)."""
    if OP == 2:
        nan = acc != acc
        return tl.max(tl.where(nan, 0.0, acc), 0) + tl.sum(tl.where(nan, acc, 0.0), 0)
    else:
        return tl.sum(acc, 0)


# The per-block bodies below are written out in each kernel rather than called as helpers:
# every nested @triton.jit call costs the CPU interpreter a re-patch of triton.language.


@triton.jit(do_not_specialize=["num_work"])
def _reduce_kernel(x_addrs, y_addrs, numels, work, num_work, partials, counter, out,
                   OP: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                   BLOCK: tl.constexpr, ITERS: tl.constexpr, COMBINE: tl.constexpr,
                   ROUND_BF16_BY_HAND: tl.constexpr):
    """One chunk's partial sum (or max); the last program combines them into ``out``.
    OP: 0 dot, 1 sum |x|, 2 max |x|."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(work + 2 * pid)
    start = tl.load(work + 2 * pid + 1)
    numel = tl.load(numels + t)
    x_addr = tl.load(x_addrs + t)
    y_addr = tl.load(y_addrs + t)  # the x column again for one-operand reductions
    aligned = ((x_addr | y_addr) & 15) == 0
    xs = x_addr.to(tl.pointer_type(STORAGE))
    ys = y_addr.to(tl.pointer_type(STORAGE))
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    if (start + BLOCK * ITERS <= numel) & aligned:
        # Triton cannot see the alignment of an address read from a table: state it (it was
        # just checked), so that loads are 16-byte vectors.
        xs = tl.multiple_of(xs, 16)
        ys = tl.multiple_of(ys, 16)
        for i in tl.static_range(ITERS):
            base = tl.multiple_of(start + i * BLOCK, BLOCK)
            offs = tl.max_contiguous(tl.multiple_of(base + lanes, BLOCK), BLOCK)
            x = tl.load(xs + offs).to(COMPUTE)
            if OP == 0:
                acc += x * tl.load(ys + offs).to(COMPUTE)
            elif OP == 1:
                acc += tl.abs(x)
            else:  # NaN sticks
                acc = tl.where((x != x) | (tl.abs(x) > acc), tl.abs(x), acc)
    else:
        # A tensor's tail, or storage that is not 16-byte aligned: masked, unhinted loads.
        # Masked lanes read 0, which adds nothing and is no larger than any |x|.
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + lanes
            mask = offs < numel
            x = tl.load(xs + offs, mask=mask, other=0.0).to(COMPUTE)
            if OP == 0:
                acc += x * tl.load(ys + offs, mask=mask, other=0.0).to(COMPUTE)
            elif OP == 1:
                acc += tl.abs(x)
            else:
                acc = tl.where((x != x) | (tl.abs(x) > acc), tl.abs(x), acc)
    tl.store(partials + pid, _combine(acc, OP))

    # acq_rel: every program's partial is stored before the last one reads them all.
    if tl.atomic_add(counter, 1) == num_work - 1:
        total = tl.zeros([COMBINE], dtype=COMPUTE)
        first = tl.full([], 0, tl.int32)
        while first < num_work:  # (not range(): triton 3.6's interpreter cannot take it)
            index = first + tl.arange(0, COMBINE)
            # .cg: read the partials from L2, where the other programs' stores landed
            part = tl.load(partials + index, mask=index < num_work, other=0.0,
                           cache_modifier=".cg")
            if OP == 2:
                total = tl.where((part != part) | (part > total), part, total)
            else:
                total += part
            first += COMBINE
        result = _combine(total, OP)
        out_dtype = out.dtype.element_ty  # the vectors' dtype, or COMPUTE for norms
        if ROUND_BF16_BY_HAND and out_dtype == tl.bfloat16:
            result = _to_storage(result, out_dtype, ROUND_BF16_BY_HAND)
        tl.store(out, result.to(out_dtype))
        tl.store(counter, 0)  # ready for the next launch


@triton.jit
def _elementwise_kernel(x_addrs, y_addrs, numels, work, alpha_ptr, alpha_value: tl.float64,
                        OP: tl.constexpr, ALPHA_ON_DEVICE: tl.constexpr,
                        STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                        BLOCK: tl.constexpr, ITERS: tl.constexpr,
                        ROUND_BF16_BY_HAND: tl.constexpr):
    """One chunk of ``ys = op(alpha, xs, ys)``. OP: 0 axpy (ys += alpha * xs), 1 scale
    (ys *= alpha, xs unused), 2 copy (ys = xs, bit for bit), 3 scaled copy (ys = alpha * xs).
    ``alpha_value`` is annotated fp64: a compiled kernel would take a plain float as fp32."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(work + 2 * pid)
    start = tl.load(work + 2 * pid + 1)
    numel = tl.load(numels + t)
    x_addr = tl.load(x_addrs + t)
    y_addr = tl.load(y_addrs + t)
    aligned = ((x_addr | y_addr) & 15) == 0
    xs = x_addr.to(tl.pointer_type(STORAGE))
    ys = y_addr.to(tl.pointer_type(STORAGE))
    if ALPHA_ON_DEVICE:
        alpha = tl.load(alpha_ptr).to(COMPUTE)
    else:
        alpha = tl.full([], alpha_value, COMPUTE)  # (.to() fails on the interpreter's float)
    lanes = tl.arange(0, BLOCK)
    if (start + BLOCK * ITERS <= numel) & aligned:
        xs = tl.multiple_of(xs, 16)
        ys = tl.multiple_of(ys, 16)
        for i in tl.static_range(ITERS):
            base = tl.multiple_of(start + i * BLOCK, BLOCK)
            offs = tl.max_contiguous(tl.multiple_of(base + lanes, BLOCK), BLOCK)
            if OP == 2:
                tl.store(ys + offs, tl.load(xs + offs))
            else:
                if OP == 0:
                    y = tl.load(ys + offs).to(COMPUTE) + alpha * tl.load(xs + offs).to(COMPUTE)
                elif OP == 1:
                    y = alpha * tl.load(ys + offs).to(COMPUTE)
                else:
                    y = alpha * tl.load(xs + offs).to(COMPUTE)
                if ROUND_BF16_BY_HAND and STORAGE == tl.bfloat16:
                    y = _to_storage(y, STORAGE, ROUND_BF16_BY_HAND)
                tl.store(ys + offs, y.to(STORAGE))
    else:
        # A tensor's tail, or storage that is not 16-byte aligned: masked, unhinted.
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + lanes
            mask = offs < numel
            if OP == 2:
                tl.store(ys + offs, tl.load(xs + offs, mask=mask), mask=mask)
            else:
                if OP == 0:
                    y = (tl.load(ys + offs, mask=mask).to(COMPUTE)
                         + alpha * tl.load(xs + offs, mask=mask).to(COMPUTE))
                elif OP == 1:
                    y = alpha * tl.load(ys + offs, mask=mask).to(COMPUTE)
                else:
                    y = alpha * tl.load(xs + offs, mask=mask).to(COMPUTE)
                if ROUND_BF16_BY_HAND and STORAGE == tl.bfloat16:
                    y = _to_storage(y, STORAGE, ROUND_BF16_BY_HAND)
                tl.store(ys + offs, y.to(STORAGE), mask=mask)


# ---- tables -------------------------------------------------------------------------------------


class Layout:
    """What every table of the same tensor sizes shares: the numel column, the chunk work list
    and the reductions' scratch (per-program partials, the finishing counter)."""

    def __init__(self, numels: Sequence[int], device: torch.device):
        self.numels = tuple(numels)
        self.device = torch.device(device)
        # non_blocking: torch skips the stream synchronisation a blocking copy ends with (the
        # driver stages the pageable source, so these small tables go without waiting)
        self.numel_column = torch.tensor(self.numels, dtype=torch.int64).to(self.device,
                                                                             non_blocking=True)
        self.work, self.num_work = work_list(list(self.numels), self.device)
        self._scratch: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def scratch(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._scratch:
            self._scratch[dtype] = (
                torch.empty(self.num_work, dtype=dtype, device=self.device),
                torch.zeros(1, dtype=torch.int32, device=self.device))  # reset by each launch
        return self._scratch[dtype]


class TensorTable:
    """One list of tensors as the kernels see it: a device column of their addresses and a
    :class:`Layout`. Tensors must be real, contiguous, of one floating dtype and one device.

    The table keeps its tensors alive, so its addresses stay valid. Every operation checks,
    before it launches, that each tensor still has the address, dtype, size and contiguity the
    table was made with (:meth:`check`): a tensor rebound with ``t.data = ...``, resized or
    re-viewed since is a ValueError, never a read of the old memory. Pass ``layout=``
    (another table's) to share the numel column and work list between lists of the same sizes.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], layout: Layout | None = None):
        tensors = tuple(tensors)
        if not tensors:
            raise ValueError("a vector kernel needs at least one tensor")
        first = tensors[0]
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                raise TypeError("vector kernels take dense (strided) tensors")
            if t.dtype not in _TL_DTYPES:
                raise TypeError(f"vector kernels take float16, bfloat16, float32 or float64 "
                                f"tensors (view complex ones with torch.view_as_real), got "
                                f"{t.dtype}")
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"vector kernels need one dtype and one device per list, got "
                                 f"{first.dtype} on {first.device} and {t.dtype} on {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"vector kernels need contiguous tensors, got shape "
                                 f"{tuple(t.shape)} with strides {t.stride()}")
        numels = tuple(t.numel() for t in tensors)
        if layout is None:
            layout = Layout(numels, first.device)
        elif layout.numels != numels or layout.device != first.device:
            raise ValueError("a shared layout must have the same tensor sizes and device")
        self.tensors = tensors
        self.layout = layout
        self.dtype = first.dtype
        self.device = first.device
        # non_blocking: torch skips the stream synchronisation a blocking copy ends with (the
        # driver stages the pageable source, so these small tables go without waiting)
        self.pointers = [t.data_ptr() for t in tensors]
        self.addresses = torch.tensor(self.pointers, dtype=torch.int64).to(self.device,
                                                                           non_blocking=True)

    def check(self) -> None:
        """ValueError unless every tensor is where, and what, the table says."""
        for t, pointer, numel in zip(self.tensors, self.pointers, self.layout.numels):
            if (t.data_ptr() != pointer or t.numel() != numel or t.dtype != self.dtype
                    or not t.is_contiguous()):
                raise ValueError(
                    f"a tensor of this vector changed after its table was made (now "
                    f"{t.dtype} of shape {tuple(t.shape)} at {t.data_ptr():#x}): its storage "
                    "was rebound, resized or re-viewed; make a new TensorTable")


def _table(xs: TensorTable | Sequence[torch.Tensor], layout: Layout | None = None) -> TensorTable:
    return xs if isinstance(xs, TensorTable) else TensorTable(xs, layout)


def _pair(xs, ys) -> tuple[TensorTable, TensorTable]:
    xs = _table(xs)
    ys = _table(ys, xs.layout)
    if ys.layout.numels != xs.layout.numels:
        raise ValueError("the two lists of a vector operation need the same tensor sizes")
    if ys.dtype != xs.dtype or ys.device != xs.device:
        raise ValueError(f"the two lists of a vector operation need one dtype and device, got "
                         f"{xs.dtype} on {xs.device} and {ys.dtype} on {ys.device}")
    return xs, ys


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


# ---- the operations -----------------------------------------------------------------------------


def _reduce(op: int, xs: TensorTable, ys: TensorTable, out_dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    global _launches
    xs.check()
    ys.check()
    layout = xs.layout
    partials, counter = layout.scratch(_compute(xs.dtype))
    out = torch.empty((), dtype=out_dtype or xs.dtype, device=xs.device)
    with _device_guard(xs.device):
        _reduce_kernel[(layout.num_work,)](
            xs.addresses, ys.addresses, layout.numel_column, layout.work, layout.num_work,
            partials, counter, out, OP=op, STORAGE=_TL_DTYPES[xs.dtype],
            COMPUTE=_TL_DTYPES[_compute(xs.dtype)], BLOCK=BLOCK, ITERS=VECTOR_ITERS,
            COMBINE=COMBINE_BLOCK, ROUND_BF16_BY_HAND=_interpreting(), num_warps=NUM_WARPS)
    _launches += 1
    return out


def dot(xs, ys) -> torch.Tensor:
    """``sum_i <xs[i], ys[i]>`` over the whole lists, as a 0-dim tensor of their dtype."""
    xs, ys = _pair(xs, ys)
    return _reduce(_DOT, xs, ys)


def abs_sum(xs) -> torch.Tensor:
    """``sum |x|`` over every element of every tensor (the L1 norm), as a 0-dim tensor."""
    xs = _table(xs)
    return _reduce(_ABS_SUM, xs, xs)


def abs_max(xs) -> torch.Tensor:
    """``max |x|`` over every element of every tensor (the inf-norm; NaN if any is NaN, 0 if
    every tensor is empty), as a 0-dim tensor."""
    xs = _table(xs)
    return _reduce(_ABS_MAX, xs, xs)


def norm(xs, norm_type: float = 2.0) -> torch.Tensor:
    """The p-norm (p = 1, 2 or inf) of every element of every tensor, as one vector: one
    launch. Accumulated *and returned* in the opmath dtype (fp32 for half storage): the sum
    of squares of fp16 grads overflows fp16 long before their norm does."""
    xs = _table(xs)
    compute = _compute(xs.dtype)
    if norm_type == 2.0:
        return _reduce(_DOT, xs, xs, compute).sqrt()
    if norm_type == 1.0:
        return _reduce(_ABS_SUM, xs, xs, compute)
    if norm_type == math.inf:
        return _reduce(_ABS_MAX, xs, xs, compute)
    raise ValueError(f"the vector kernels compute 1-, 2- and inf-norms, not {norm_type}")


def _elementwise(op: int, alpha, xs: TensorTable, ys: TensorTable) -> None:
    global _launches
    xs.check()
    ys.check()
    layout = xs.layout
    on_device = isinstance(alpha, torch.Tensor) and alpha.device == xs.device
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a number or a one-element tensor, got shape "
                             f"{tuple(alpha.shape)}")
        if alpha.is_complex():
            raise TypeError("alpha must be real")
        if not on_device:  # e.g. a CPU scalar for CUDA vectors: reading it costs no sync
            alpha = alpha.item()
    alpha_value = 0.0 if on_device else float(alpha)
    with _device_guard(xs.device):
        _elementwise_kernel[(layout.num_work,)](
            xs.addresses, ys.addresses, layout.numel_column, layout.work,
            alpha if on_device else layout.numel_column, alpha_value,
            OP=op, ALPHA_ON_DEVICE=on_device, STORAGE=_TL_DTYPES[xs.dtype],
            COMPUTE=_TL_DTYPES[_compute(xs.dtype)], BLOCK=BLOCK, ITERS=VECTOR_ITERS,
            ROUND_BF16_BY_HAND=_interpreting(), num_warps=NUM_WARPS)
    _launches += 1


def axpy(alpha, xs, ys) -> None:
    """``ys[i] += alpha * xs[i]`` for every tensor, in place."""
    xs, ys = _pair(xs, ys)
    _elementwise(_AXPY, alpha, xs, ys)


def scale(alpha, xs) -> None:
    """``xs[i] *= alpha`` for every tensor, in place."""
    xs = _table(xs)
    _elementwise(_SCALE, alpha, xs, xs)


def copy(xs, ys, alpha=1.0) -> None:
    """``ys[i] = alpha * xs[i]`` for every tensor (a bit-exact copy when alpha is 1)."""
    xs, ys = _pair(xs, ys)
    plain = not isinstance(alpha, torch.Tensor) and alpha == 1
    _elementwise(_COPY if plain else _SCALED_COPY, alpha, xs, ys)
