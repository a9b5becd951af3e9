"""The one generic multi-tensor kernel every fusedopt optimizer launches.

One launch updates every tensor of one (device, dtype, variant) bucket, across all param groups.
It walks two device-resident tables that the engine builds once and patches on change:

* the **tensor table**, ``int64[len(COLUMNS), num_tensors]`` stored column-major, so that one
  column (all grad pointers, say) is a contiguous row the host can re-upload in one copy;
* the **work list**, ``int64[num_work, 2]``: (tensor index, first element) of each chunk of
  ``CHUNK = BLOCK * ITERS`` elements. One program handles one chunk, so a 2-element bias and a
  40M-element embedding share a launch without either waiting on the other.

Per-group hyperparameters come from a ``float64[num_groups, hyper_stride]`` table: changing a
group's lr never means another launch or a recompile. Sizes and counts are runtime values
(int64 offsets, no specialisation on them), so no shape triggers a recompile.

The algorithm itself is one ``@triton.jit`` element-wise function passed in as ``UPDATE``
(see :mod:`fusedopt.kernels.updates` for its signature), all values in the opmath dtype (fp64
for fp64 storage, fp32 otherwise), with up to three constexpr variant flags (maximize,
amsgrad, nesterov, ...). Two optional pieces serve the optimizers that need more than an
element-wise map, still without a per-tensor launch:

* ``ADVANCE_AUX``: a per-tensor scalar state advanced once per step, next to ``step``
  (NAdam's ``mu_product``);
* ``TERMS``: two element-wise terms summed per tensor by :func:`multi_tensor_sums` in one
  launch before the update, which reads the sums (LAMB's norms ``||p||`` and ``||r + wd p||``).

Training integration rides on the same launch, as three optional device scalars read by every
program (no host synchronisation): ``grad_scale`` (UNSCALE: grads are multiplied by its fp32
reciprocal, as GradScaler's unscale does), ``found_inf`` (SKIP_ON_INF: a nonzero value makes
every program return before touching anything, ``step`` included) and ``clip_coef`` (CLIP:
the global-norm clipping coefficient of ``clip_grad_norm_``, applied after unscaling).
SCALE_GRADS is set when either factor applies, so the plain step pays for neither.
"""

import torch
import triton
import triton.language as tl

from fusedopt.backend import interpreting as _interpreting

# Rows of the column-major tensor table. STATE0..2 are the optimizer's state tensors in the
# order its spec names them; STEP points at the per-tensor float32 ``state["step"]``, AUX at
# the spec's per-tensor float32 scalar state, if any (NAdam's ``mu_product``), FRESH at the
# param's int64 flag "state created, not yet updated" (the kernel clears it when it runs).
COLUMNS = ("PARAM", "GRAD", "STATE0", "STATE1", "STATE2", "STEP", "NUMEL", "GROUP", "FRESH",
           "AUX")
COL_PARAM: tl.constexpr = tl.constexpr(0)
COL_GRAD: tl.constexpr = tl.constexpr(1)
COL_STATE0: tl.constexpr = tl.constexpr(2)
COL_STATE1: tl.constexpr = tl.constexpr(3)
COL_STATE2: tl.constexpr = tl.constexpr(4)
COL_STEP: tl.constexpr = tl.constexpr(5)
COL_NUMEL: tl.constexpr = tl.constexpr(6)
COL_GROUP: tl.constexpr = tl.constexpr(7)
COL_FRESH: tl.constexpr = tl.constexpr(8)
COL_AUX: tl.constexpr = tl.constexpr(9)
MAX_STATES = 3

# Measured on the H100 prototype: BLOCK 1024-2048, 4-8 iterations, 4-8 warps all reach
# 94-99% of copy bandwidth once loads are hinted as 16-byte aligned.
BLOCK = 1024
ITERS = 4
CHUNK = BLOCK * ITERS
NUM_WARPS = 4

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

_launches = 0


def work_list(numels: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """The chunk schedule of a tensor table: ``int64[num_work, 2]`` rows of (tensor index,
    first element), one per CHUNK elements. An empty tensor still gets one chunk, so that the
    per-tensor work a kernel does once (advancing ``step``) happens for it too."""
    numel = torch.tensor(numels, dtype=torch.int64)
    chunks = torch.clamp((numel + CHUNK - 1) // CHUNK, min=1)
    tensor_of = torch.repeat_interleave(torch.arange(len(numels)), chunks)
    first_chunk = torch.cumsum(chunks, 0) - chunks
    starts = (torch.arange(len(tensor_of)) - first_chunk[tensor_of]) * CHUNK
    # non_blocking: torch skips the stream synchronisation a blocking copy ends with (the
    # driver stages the pageable source, so these small tables go without waiting)
    work = torch.stack([tensor_of, starts], dim=1).contiguous()
    return work.to(device, non_blocking=True), len(tensor_of)


def launch_count() -> int:
    """How many multi-tensor kernels this process has launched (tests count launches per step)."""
    return _launches


@triton.jit
def _to_storage(x, STORAGE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    """Round an opmath value to the storage dtype, to nearest even (as torch does).

    Compiled Triton does this in one cvt.rn instruction. Triton's CPU interpreter truncates
    fp32 -> bf16 instead, so under the interpreter (only) the rounding is done on the bits.
    """
    if ROUND_BF16_BY_HAND and STORAGE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # keep NaNs NaN
    return x.to(STORAGE)


@triton.jit
def _load_block(param, grad, s0, s1, s2, offs, mask, scaling, NUM_STATES: tl.constexpr,
                COMPUTE: tl.constexpr, SCALE_GRADS: tl.constexpr):
    """One block of param, grad (times ``scaling``, AMP's 1/scale and the clip coefficient,
    when SCALE_GRADS) and the states, in the opmath dtype. Absent states are placeholders
    (copies of the param): never loaded, never stored."""
    p = tl.load(param + offs, mask=mask).to(COMPUTE)
    g = tl.load(grad + offs, mask=mask).to(COMPUTE)
    if SCALE_GRADS:
        g = g * scaling.to(COMPUTE)
    a = p
    b = p
    c = p
    if NUM_STATES > 0:
        a = tl.load(s0 + offs, mask=mask).to(COMPUTE)
    if NUM_STATES > 1:
        b = tl.load(s1 + offs, mask=mask).to(COMPUTE)
    if NUM_STATES > 2:
        c = tl.load(s2 + offs, mask=mask).to(COMPUTE)
    return p, g, a, b, c


@triton.jit
def _update_block(param, grad, s0, s1, s2, offs, mask, step, aux, fresh, sum0, sum1, hyper,
                  scaling, UPDATE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                  F2: tl.constexpr, NUM_STATES: tl.constexpr, STORAGE: tl.constexpr,
                  COMPUTE: tl.constexpr, SCALE_GRADS: tl.constexpr,
                  ROUND_BF16_BY_HAND: tl.constexpr):
    """Load one block, apply UPDATE in the opmath dtype, store in the storage dtype."""
    p, g, a, b, c = _load_block(param, grad, s0, s1, s2, offs, mask, scaling, NUM_STATES,
                                COMPUTE, SCALE_GRADS)
    p, a, b, c = UPDATE(p, g, a, b, c, step, aux, fresh, sum0, sum1, hyper, F0, F1, F2)
    tl.store(param + offs, _to_storage(p, STORAGE, ROUND_BF16_BY_HAND), mask=mask)
    if NUM_STATES > 0:
        tl.store(s0 + offs, _to_storage(a, STORAGE, ROUND_BF16_BY_HAND), mask=mask)
    if NUM_STATES > 1:
        tl.store(s1 + offs, _to_storage(b, STORAGE, ROUND_BF16_BY_HAND), mask=mask)
    if NUM_STATES > 2:
        tl.store(s2 + offs, _to_storage(c, STORAGE, ROUND_BF16_BY_HAND), mask=mask)


@triton.jit
def _chunk(tensors, num_tensors, work):
    """This program's chunk: its tensor's row of the table, read once.

    Returns (tensor index, first element, numel, aligned, the param/grad/s0/s1/s2 addresses,
    fresh pointer, fresh, group, step pointer, aux pointer); ``aligned``: every address is
    16-byte aligned.
    The kernels cast the addresses to pointers themselves: a pointer made in here and hinted
    ``multiple_of`` on the aligned path carried the hint onto the masked path too (triton
    3.9, seen in the PTX: predicated 16-byte loads there), which would misread unaligned
    storage. tests/test_codegen.py counts the vector loads to keep it that way."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(work + 2 * pid)
    start = tl.load(work + 2 * pid + 1)
    row = tensors + t  # column c of tensor t lives at row + c * num_tensors
    numel = tl.load(row + COL_NUMEL * num_tensors)
    param_addr = tl.load(row + COL_PARAM * num_tensors)
    grad_addr = tl.load(row + COL_GRAD * num_tensors)
    s0_addr = tl.load(row + COL_STATE0 * num_tensors)  # 0 for states the spec lacks
    s1_addr = tl.load(row + COL_STATE1 * num_tensors)
    s2_addr = tl.load(row + COL_STATE2 * num_tensors)
    aligned = ((param_addr | grad_addr | s0_addr | s1_addr | s2_addr) & 15) == 0
    fresh_ptr = tl.load(row + COL_FRESH * num_tensors).to(tl.pointer_type(tl.int64))
    fresh = tl.load(fresh_ptr)
    group = tl.load(row + COL_GROUP * num_tensors)
    step_ptr = tl.load(row + COL_STEP * num_tensors).to(tl.pointer_type(tl.float32))
    aux_ptr = tl.load(row + COL_AUX * num_tensors).to(tl.pointer_type(tl.float32))
    return (t, start, numel, aligned, param_addr, grad_addr, s0_addr, s1_addr, s2_addr,
            fresh_ptr, fresh, group, step_ptr, aux_ptr)


@triton.jit
def _amp(grad_scale, found_inf, clip_coef, UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr,
         CLIP: tl.constexpr):
    """AMP's and clipping's inputs: (run, grad multiplier). ``run`` is false when found_inf is
    set: the whole update is skipped on the device, step counts included. The multiplier is
    GradScaler's 1/scale (taken in float64 and rounded to float32, as GradScaler computes its
    inv_scale) times the clip coefficient of ``clip_grad_norm_``."""
    if SKIP_ON_INF:
        run = tl.load(found_inf) == 0.0
    else:
        run = True
    multiplier = 1.0
    if UNSCALE:
        multiplier = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)
    if CLIP:
        multiplier = multiplier * tl.load(clip_coef)
    return run, multiplier


@triton.jit
def _scalars(step_ptr, aux_ptr, hyper_row, USES_STEP: tl.constexpr, ADVANCE_AUX: tl.constexpr):
    """This step's per-tensor scalars: ``step`` (old count + 1) and the spec's auxiliary
    scalar state (NAdam's mu_product) advanced by ADVANCE_AUX. Every program of a tensor
    computes the same values from the old ones; only the tensor's last program stores them."""
    if USES_STEP:
        step = tl.load(step_ptr) + 1.0
    else:
        step = 0.0
    if ADVANCE_AUX is not None:
        aux = ADVANCE_AUX(tl.load(aux_ptr), step, hyper_row)
    else:
        aux = 0.0
    return step, aux


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def multi_tensor_step(tensors, num_tensors, work, hyper, hyper_stride, done_counts, sums,
                      grad_scale, found_inf, clip_coef,
                      UPDATE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
                      NUM_STATES: tl.constexpr, USES_STEP: tl.constexpr,
                      ADVANCE_AUX: tl.constexpr, HAS_SUMS: tl.constexpr, FINISH: tl.constexpr,
                      UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr,
                      SCALE_GRADS: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr,
                      ROUND_BF16_BY_HAND: tl.constexpr):
    """Update one chunk of one tensor; the grid is the whole work list of the bucket."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        _step_chunk(tensors, num_tensors, work, hyper, hyper_stride, done_counts, sums,
                    scaling, UPDATE, F0, F1, F2, NUM_STATES, USES_STEP, ADVANCE_AUX,
                    HAS_SUMS, FINISH, SCALE_GRADS, STORAGE, COMPUTE, BLOCK, ITERS,
                    ROUND_BF16_BY_HAND)


@triton.jit
def _step_chunk(tensors, num_tensors, work, hyper, hyper_stride, done_counts, sums, scaling,
                UPDATE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
                NUM_STATES: tl.constexpr, USES_STEP: tl.constexpr, ADVANCE_AUX: tl.constexpr,
                HAS_SUMS: tl.constexpr, FINISH: tl.constexpr, SCALE_GRADS: tl.constexpr,
                STORAGE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                ITERS: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    (t, start, numel, aligned, param, grad, s0, s1, s2, fresh_ptr, fresh, group, step_ptr,
     aux_ptr) = _chunk(tensors, num_tensors, work)
    param = param.to(tl.pointer_type(STORAGE))
    grad = grad.to(tl.pointer_type(STORAGE))
    s0 = s0.to(tl.pointer_type(STORAGE))
    s1 = s1.to(tl.pointer_type(STORAGE))
    s2 = s2.to(tl.pointer_type(STORAGE))
    hyper_row = hyper + group * hyper_stride
    step, aux = _scalars(step_ptr, aux_ptr, hyper_row, USES_STEP, ADVANCE_AUX)
    if HAS_SUMS:  # this tensor's two sums from the reduction launch before this one
        sum0 = tl.load(sums + 2 * t)
        sum1 = tl.load(sums + 2 * t + 1)
    else:
        sum0 = 0.0
        sum1 = 0.0

    lanes = tl.arange(0, BLOCK)
    if (start + BLOCK * ITERS <= numel) & aligned:
        # Triton cannot see the alignment of a pointer read from a table: state it, so that
        # loads and stores are 16-byte vectors. It was just checked on the addresses.
        param = tl.multiple_of(param, 16)
        grad = tl.multiple_of(grad, 16)
        s0 = tl.multiple_of(s0, 16)
        s1 = tl.multiple_of(s1, 16)
        s2 = tl.multiple_of(s2, 16)
        for i in tl.static_range(ITERS):
            base = tl.multiple_of(start + i * BLOCK, BLOCK)
            offs = tl.max_contiguous(tl.multiple_of(base + lanes, BLOCK), BLOCK)
            _update_block(param, grad, s0, s1, s2, offs, None, step, aux, fresh, sum0, sum1,
                          hyper_row, scaling, UPDATE, F0, F1, F2, NUM_STATES, STORAGE,
                          COMPUTE, SCALE_GRADS, ROUND_BF16_BY_HAND)
    else:
        # A tensor's tail, or storage that is not 16-byte aligned (an odd view): masked,
        # unhinted loads that are correct for any address.
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + lanes
            _update_block(param, grad, s0, s1, s2, offs, offs < numel, step, aux, fresh, sum0,
                          sum1, hyper_row, scaling, UPDATE, F0, F1, F2, NUM_STATES, STORAGE,
                          COMPUTE, SCALE_GRADS, ROUND_BF16_BY_HAND)

    if FINISH or fresh != 0:
        # The last program to finish a tensor stores its new scalars, clears its sums and its
        # fresh flag for the next step: acq_rel atomics order every other program's reads of
        # the old values before these writes. No extra launch.
        chunks = tl.maximum((numel + BLOCK * ITERS - 1) // (BLOCK * ITERS), 1)
        # every warp of this program has read the old scalars and sums before one thread's
        # release below can let the tensor's last program overwrite them
        tl.debug_barrier()
        if tl.atomic_add(done_counts + t, 1) == chunks - 1:
            if USES_STEP:
                tl.store(step_ptr, step)
            if ADVANCE_AUX is not None:
                tl.store(aux_ptr, aux)
            if HAS_SUMS:
                tl.store(sums + 2 * t, 0.0)
                tl.store(sums + 2 * t + 1, 0.0)
            if fresh != 0:
                tl.store(fresh_ptr, 0)
            tl.store(done_counts + t, 0)


@triton.jit
def _terms_block(param, grad, s0, s1, s2, offs, mask, step, aux, fresh, hyper, scaling,
                 TERMS: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
                 NUM_STATES: tl.constexpr, COMPUTE: tl.constexpr, SCALE_GRADS: tl.constexpr):
    """TERMS of one block, with lanes past the end counted as 0."""
    p, g, a, b, c = _load_block(param, grad, s0, s1, s2, offs, mask, scaling, NUM_STATES,
                                COMPUTE, SCALE_GRADS)
    x, y = TERMS(p, g, a, b, c, step, aux, fresh, hyper, F0, F1, F2)
    if mask is not None:
        x = tl.where(mask, x, 0.0)
        y = tl.where(mask, y, 0.0)
    return x, y


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def multi_tensor_sums(tensors, num_tensors, work, hyper, hyper_stride, sums, grad_scale,
                      found_inf, clip_coef, TERMS: tl.constexpr, F0: tl.constexpr,
                      F1: tl.constexpr, F2: tl.constexpr, NUM_STATES: tl.constexpr,
                      USES_STEP: tl.constexpr, ADVANCE_AUX: tl.constexpr,
                      UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr,
                      SCALE_GRADS: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Per-tensor sums of two element-wise TERMS over the same tables: one read-only launch
    whose results (``sums[t, 0..1]``) the update launch reads (LAMB's trust-ratio norms).
    Skipped, like the update, where AMP found an inf (the sums then stay zero)."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        _sums_chunk(tensors, num_tensors, work, hyper, hyper_stride, sums, scaling, TERMS,
                    F0, F1, F2, NUM_STATES, USES_STEP, ADVANCE_AUX, SCALE_GRADS, STORAGE,
                    COMPUTE, BLOCK, ITERS)


@triton.jit
def _sums_chunk(tensors, num_tensors, work, hyper, hyper_stride, sums, scaling,
                TERMS: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
                NUM_STATES: tl.constexpr, USES_STEP: tl.constexpr, ADVANCE_AUX: tl.constexpr,
                SCALE_GRADS: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                BLOCK: tl.constexpr, ITERS: tl.constexpr):
    (t, start, numel, aligned, param, grad, s0, s1, s2, fresh_ptr, fresh, group, step_ptr,
     aux_ptr) = _chunk(tensors, num_tensors, work)
    param = param.to(tl.pointer_type(STORAGE))
    grad = grad.to(tl.pointer_type(STORAGE))
    s0 = s0.to(tl.pointer_type(STORAGE))
    s1 = s1.to(tl.pointer_type(STORAGE))
    s2 = s2.to(tl.pointer_type(STORAGE))
    hyper_row = hyper + group * hyper_stride
    step, aux = _scalars(step_ptr, aux_ptr, hyper_row, USES_STEP, ADVANCE_AUX)
    lanes = tl.arange(0, BLOCK)
    acc0 = tl.zeros([BLOCK], dtype=COMPUTE)
    acc1 = tl.zeros([BLOCK], dtype=COMPUTE)
    if (start + BLOCK * ITERS <= numel) & aligned:
        param = tl.multiple_of(param, 16)
        grad = tl.multiple_of(grad, 16)
        s0 = tl.multiple_of(s0, 16)
        s1 = tl.multiple_of(s1, 16)
        s2 = tl.multiple_of(s2, 16)
        for i in tl.static_range(ITERS):
            base = tl.multiple_of(start + i * BLOCK, BLOCK)
            offs = tl.max_contiguous(tl.multiple_of(base + lanes, BLOCK), BLOCK)
            x, y = _terms_block(param, grad, s0, s1, s2, offs, None, step, aux, fresh,
                                hyper_row, scaling, TERMS, F0, F1, F2, NUM_STATES, COMPUTE,
                                SCALE_GRADS)
            acc0 += x
            acc1 += y
    else:
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + lanes
            x, y = _terms_block(param, grad, s0, s1, s2, offs, offs < numel, step, aux, fresh,
                                hyper_row, scaling, TERMS, F0, F1, F2, NUM_STATES, COMPUTE,
                                SCALE_GRADS)
            acc0 += x
            acc1 += y
    tl.atomic_add(sums + 2 * t, tl.sum(acc0, axis=0))
    tl.atomic_add(sums + 2 * t + 1, tl.sum(acc1, axis=0))


def launch(update, flags, *, num_states: int, uses_step: bool, dtype: torch.dtype,
           tensors: torch.Tensor, num_tensors: int, work: torch.Tensor, num_work: int,
           hyper: torch.Tensor, done_counts: torch.Tensor, advance_aux=None, terms=None,
           sums: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
           found_inf: torch.Tensor | None = None,
           clip_coef: torch.Tensor | None = None) -> None:
    """Launch one multi-tensor step over a bucket's tables (see the module docstring).

    With ``terms``, first one :func:`multi_tensor_sums` launch fills ``sums`` (float
    ``[num_tensors, 2]`` in the opmath dtype, zero on entry; the step launch zeroes it again).
    ``grad_scale`` / ``found_inf``: AMP's float32 scalars on this device (GradScaler's): the
    grads are multiplied by the scale's float32 reciprocal, and nothing at all changes where
    found_inf is nonzero.
    ``clip_coef``: a float32 scalar on this device the grads are multiplied by (clipping).
    """
    global _launches
    f0, f1, f2 = (tuple(bool(f) for f in flags) + (False, False, False))[:3]
    common = dict(F0=f0, F1=f1, F2=f2, NUM_STATES=num_states, USES_STEP=uses_step,
                  ADVANCE_AUX=advance_aux, UNSCALE=grad_scale is not None,
                  SKIP_ON_INF=found_inf is not None, CLIP=clip_coef is not None,
                  SCALE_GRADS=grad_scale is not None or clip_coef is not None,
                  STORAGE=_TL_DTYPES[dtype],
                  COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                  BLOCK=BLOCK, ITERS=ITERS, num_warps=NUM_WARPS)
    # unused pointer arguments get any tensor of the right kind: they are never read
    amp = tuple(t if t is not None else hyper for t in (grad_scale, found_inf, clip_coef))
    if terms is not None:
        multi_tensor_sums[(num_work,)](tensors, num_tensors, work, hyper, hyper.shape[1], sums,
                                       *amp, TERMS=terms, **common)
        _launches += 1
    multi_tensor_step[(num_work,)](
        tensors, num_tensors, work, hyper, hyper.shape[1], done_counts,
        sums if sums is not None else done_counts, *amp, UPDATE=update,
        HAS_SUMS=terms is not None,
        FINISH=uses_step or advance_aux is not None or terms is not None,
        ROUND_BF16_BY_HAND=_interpreting(), **common)
    _launches += 1
