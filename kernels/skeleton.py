"""The one generic multi-tensor kernel every fusedopt optimizer launches.

One launch updates every tensor of one (device, dtype, variant) bucket, across all param groups.
It walks two device-resident tables that the engine builds once and patches on change:

* the **tensor table**, ``int64[len(columns), num_tensors]`` stored column-major, so that one
  column (all grad pointers, say) is a contiguous row the host can re-upload in one copy. Its
  columns (:func:`columns`): PARAM, GRAD, NUMEL, GROUP, FRESH, then one per state tensor the
  variant has, then one per scalar state, in the order the algorithm declares them;
* the **work list**, ``int64[num_work, 2]``: (tensor index, first element) of each chunk of
  ``CHUNK = BLOCK * ITERS`` elements. One program handles one chunk, so a 2-element bias and a
  40M-element embedding share a launch without either waiting on the other.

Per-group hyperparameters come from a ``float64[num_groups, hyper_stride]`` table: changing a
group's lr never means another launch or a recompile. Sizes and counts are runtime values
(int64 offsets, no specialisation on them), so no shape triggers a recompile.

The algorithm is one ``@triton.jit`` element-wise update (:mod:`fusedopt.kernels.updates`)
whose arguments are named by its :class:`~fusedopt.kernels.algorithms.Algorithm` declaration.
The kernel reaches it through an **adapter** generated from that declaration
(:func:`adapter`): the kernel hands the adapter tuples (the block's state values, the group's
hyperparameters, the tensor's scalars and sums) and the adapter passes each element to the
update's argument of that name. Every per-program value (hyperparameters, scalars, sums, the
AMP and clip factors) is loaded once, before the element loop. Math runs in the opmath dtype
(fp64 for fp64 storage, fp32 otherwise).

Per-tensor work done once per step rides on the same launch: the tensor's last program to
finish (an acq_rel atomic counter) stores its new scalars (``step``, and what the algorithm's
``advance`` computes), clears its sums and its fresh flag. Sums come from
:func:`multi_tensor_sums`, one read-only launch before the update (LAMB's norms).

Training integration: three optional device scalars read by every program (no host
synchronisation): ``grad_scale`` (UNSCALE: grads are multiplied by its fp32 reciprocal, as
GradScaler's unscale does), ``found_inf`` (SKIP_ON_INF: a nonzero value makes every program
return before touching anything, scalars included) and ``clip_coef`` (CLIP: the coefficient of
``clip_grad_norm_``, applied after unscaling).
"""

from __future__ import annotations

import functools
import itertools
import linecache

import torch
import triton
import triton.language as tl

from fusedopt.kernels import quantization
from fusedopt.kernels.algorithms import Algorithm
from fusedopt.kernels.variant import Variant

# Leading columns of the tensor table; the state and scalar columns follow (see columns()).
FIXED_COLUMNS = ("PARAM", "GRAD", "NUMEL", "GROUP", "FRESH")
COL_PARAM: tl.constexpr = tl.constexpr(0)
COL_GRAD: tl.constexpr = tl.constexpr(1)
COL_NUMEL: tl.constexpr = tl.constexpr(2)
COL_GROUP: tl.constexpr = tl.constexpr(3)
COL_FRESH: tl.constexpr = tl.constexpr(4)
COL_STATES: tl.constexpr = tl.constexpr(5)

# How the updated param is written (the PRECISION constexpr's WRITE): rounded to nearest even,
# rounded stochastically (bf16), from an fp32 master copy (the extra state "master_param",
# which the update reads and writes), or as a compensated pair with "kahan_comp".
WRITE_NEAREST: tl.constexpr = tl.constexpr(0)
WRITE_STOCHASTIC: tl.constexpr = tl.constexpr(1)
WRITE_MASTER: tl.constexpr = tl.constexpr(2)
WRITE_KAHAN: tl.constexpr = tl.constexpr(3)
WRITES = {"nearest": 0, "stochastic": 1, "master": 2, "kahan": 3}
# The PRECISION constexpr: (algorithm states' storage dtype, extra state's storage dtype,
# number of extra states (0 or 1, after the algorithm's), WRITE, number of 8-bit states (0 or
# all the algorithm's: their absmax columns follow the element-wise states'), a bit mask of
# the 8-bit states whose code is the unsigned one)
P_STATE: tl.constexpr = tl.constexpr(0)
P_EXTRA: tl.constexpr = tl.constexpr(1)
P_NUM_EXTRA: tl.constexpr = tl.constexpr(2)
P_WRITE: tl.constexpr = tl.constexpr(3)
P_NUM_SCALES: tl.constexpr = tl.constexpr(4)
P_UNSIGNED: tl.constexpr = tl.constexpr(5)
# 8-bit states: elements per absmax, entries per code (kernels/quantization.py)
QUANT_BLOCK: tl.constexpr = tl.constexpr(quantization.BLOCK)
CODE_SIZE: tl.constexpr = tl.constexpr(256)
# the index of 0 in the signed code (the stored byte is the index less it: a zero byte is 0)
SIGNED_ZERO: tl.constexpr = tl.constexpr(quantization.ZERO_INDEX[True])

# A program handles one chunk of ITERS blocks; a block is one 16-byte vector per thread per
# tensor (BLOCK = threads x elements per 16 bytes), so every access of the aligned path is one
# 16-byte load or store whatever the dtype. (The H100 prototype: 4-8 warps, 4-8 iterations of
# 1-2K elements reached 94-99% of copy bandwidth once loads were hinted as aligned.)
NUM_WARPS = 4
THREADS = 32 * NUM_WARPS
ITERS = 8
# blocks whose loads are in flight while one is computed and stored
PREFETCH = 2
# The L-BFGS vector kernels (kernels/vector.py) and work lists made without a chunk size keep
# fixed blocks of this size, VECTOR_ITERS per chunk.
BLOCK = 1024
VECTOR_ITERS = 4
CHUNK = BLOCK * VECTOR_ITERS
# Compile options of every launch (and of kernels/codegen.py): FMA contraction on, as nvcc
# compiles torch's CUDA kernels by default, set here so that no triton upgrade changes it.
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}
# At most 96 registers per thread keep 5 programs of THREADS threads on an SM (65,536
# registers): the reads in flight a bandwidth-bound kernel needs. ptxas left alone takes
# 104-118 for some bf16 variants, and now and then spills a few words at fewer registers.
REGISTER_CAP = 96
CAPPED_OPTIONS = {**LAUNCH_OPTIONS, "maxnreg": REGISTER_CAP}


def needs_cap(regs: int, spills: int) -> bool:
    """Whether a kernel compiled with LAUNCH_OPTIONS (``regs`` registers per thread,
    ``spills`` words of local memory) should be compiled again with CAPPED_OPTIONS."""
    return regs > REGISTER_CAP or spills > 0


def keep_cap(spills: int) -> bool:
    """Whether the CAPPED_OPTIONS build (``spills`` words of local memory) is the one to
    launch; otherwise the uncapped build is. (The cap changes register allocation only: both
    builds run the same PTX and compute the same bits.)"""
    return spills == 0


def vector_elements(dtype: torch.dtype) -> int:
    """Elements in 16 bytes of ``dtype``."""
    return 16 // dtype.itemsize


def variant_vector(variant: Variant) -> int:
    """Elements per thread per block: 16 bytes of the variant's widest storage (a narrower
    tensor then takes 8- or 4-byte accesses: registers stay those of one 16-byte vector per
    tensor)."""
    return min(vector_elements(variant.dtype_of(name))
               for name in ("param", *variant.element_tensors))


def chunk_elements(variant: Variant) -> int:
    """Elements one program of the step kernel handles for ``variant``."""
    return THREADS * variant_vector(variant) * ITERS


_TL_DTYPES = {
    torch.uint8: tl.uint8,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

_launches = 0


def columns(num_states: int, num_scalars: int) -> tuple[str, ...]:
    """The rows of a tensor table with this many state and scalar columns."""
    return (*FIXED_COLUMNS, *(f"STATE{i}" for i in range(num_states)),
            *(f"SCALAR{i}" for i in range(num_scalars)))


def work_list(numels: list[int], device: torch.device, chunk: int = CHUNK
              ) -> tuple[torch.Tensor, int]:
    """The chunk schedule of a tensor table: ``int64[num_work, 2]`` rows of (tensor index,
    first element), one per ``chunk`` elements. An empty tensor still gets one chunk, so that
    the per-tensor work a kernel does once (advancing ``step``) happens for it too."""
    numel = torch.tensor(numels, dtype=torch.int64)
    chunks = torch.clamp((numel + chunk - 1) // chunk, min=1)
    tensor_of = torch.repeat_interleave(torch.arange(len(numels)), chunks)
    first_chunk = torch.cumsum(chunks, 0) - chunks
    starts = (torch.arange(len(tensor_of)) - first_chunk[tensor_of]) * chunk
    # non_blocking: torch skips the stream synchronisation a blocking copy ends with (the
    # driver stages the pageable source, so these small tables go without waiting)
    work = torch.stack([tensor_of, starts], dim=1).contiguous()
    return work.to(device, non_blocking=True), len(tensor_of)


def launch_count() -> int:
    """How many multi-tensor kernels this process has launched (tests count launches per step)."""
    return _launches


# ---- adapters: the declared names, generated once per (algorithm, kind, present states) ---------

_adapter_ids = itertools.count()


@functools.cache
def adapter(algorithm: Algorithm, kind: str, present: tuple[str, ...]):
    """A ``@triton.jit`` function that calls ``algorithm``'s jit function of ``kind``
    ("update", "advance" or "terms", from :mod:`fusedopt.kernels.updates`) with each tuple
    element the skeleton holds bound to the argument of the same name.

    The skeleton's uniform call is ``adapter(param, grad, states, hyper, scalars, sums, fresh,
    FLAGS)``, ``states`` holding only the ``present`` states (the variant's; an absent one,
    such as ``max_exp_avg_sq`` without amsgrad, is given the param's values and its result is
    dropped). It returns ``(param, states)`` for an update, the new scalars (``step`` first,
    unchanged) for an advance, and the terms for a terms function. The source is generated
    from the declaration, so no position is written by hand anywhere.
    """
    from fusedopt.kernels import updates

    fn_name = algorithm.name if kind == "update" else f"{algorithm.name}_{kind}"
    fn = getattr(updates, fn_name)
    index = {name: i for i, name in enumerate(present)}
    slot = {"param": "param", "grad": "grad", "fresh": "fresh"}
    slot.update({s: f"states[{index[s]}]" if s in index else "param" for s in algorithm.states})
    slot.update({h: f"hyper[{i}]" for i, h in enumerate(algorithm.hyper)})
    slot.update({s: f"scalars[{i}]" for i, s in enumerate(algorithm.scalars)})
    slot.update({s: f"sums[{i}]" for i, s in enumerate(algorithm.sums)})
    slot.update({f: f"FLAGS[{i}]" for i, f in enumerate(algorithm.flag_args)})
    args = {"update": algorithm.update_args, "advance": algorithm.advance_args,
            "terms": algorithm.terms_args}[kind]()
    call = f"FN({', '.join(slot[a] for a in args)})"
    if kind == "update":
        outs = [f"outs[{1 + algorithm.states.index(s)}]" for s in present]
        body = f"    outs = {call}\n    return outs[0], ({''.join(o + ', ' for o in outs)})\n"
    elif kind == "advance":
        kept = ["scalars[0]"] if algorithm.uses_step else []
        if len(algorithm.advanced) == 1:
            body = f"    new = {call}\n    return ({', '.join([*kept, 'new'])},)\n"
        else:
            new = [f"outs[{i}]" for i in range(len(algorithm.advanced))]
            body = f"    outs = {call}\n    return ({', '.join([*kept, *new])},)\n"
    else:
        if len(algorithm.sums) == 1:
            body = f"    return ({call},)\n"
        else:
            body = f"    outs = {call}\n    return ({', '.join(f'outs[{i}]' for i in range(len(algorithm.sums)))},)\n"  # noqa: E501
    name = f"_{kind}_{algorithm.name}_{next(_adapter_ids)}"
    source = (f"def {name}(param, grad, states, hyper, scalars, sums, fresh, "
              f"FLAGS: tl.constexpr):\n{body}")
    # triton reads a jit function's source through linecache, as inspect does
    filename = f"<fusedopt adapter {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"tl": tl, "FN": fn}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - generated above
    return triton.jit(namespace[name])


# ---- what one launch is compiled with -----------------------------------------------------------


def prefetch(variant: Variant) -> int:
    """Blocks whose loads are in flight while one is computed: PREFETCH, but 1 for Kahan's
    compensation (a fifth bf16 tensor) and stochastic rounding's Philox bits, whose two-block
    builds take 128-154 registers and spill with triton 3.6 (122 and none with one block;
    which is faster needs a GPU)."""
    return 1 if variant.precision.write in ("kahan", "stochastic") else PREFETCH


def constexprs(variant: Variant, kernel: str = "step", interpreting: bool = False) -> dict:
    """The constexpr arguments of ``multi_tensor_step`` (kernel="step") or
    ``multi_tensor_sums`` (kernel="sums") for ``variant``."""
    alg = variant.algorithm
    vector = variant_vector(variant)
    precision = variant.precision
    extras = precision.extras
    common = dict(
        FLAGS=tuple(bool(f) for f in variant.flags), NUM_STATES=len(variant.element_tensors),
        NUM_HYPER=len(alg.hyper), NUM_SCALARS=len(alg.scalars), USES_STEP=alg.uses_step,
        ADVANCE=adapter(alg, "advance", variant.states) if alg.advanced else None,
        NUM_SUMS=len(alg.sums), UNSCALE=variant.unscale, SKIP_ON_INF=variant.skip_on_inf,
        CLIP=variant.clip, SCALE_GRADS=variant.unscale or variant.clip,
        STORAGE=_TL_DTYPES[variant.dtype], COMPUTE=_TL_DTYPES[variant.compute],
        BLOCK=THREADS * vector, ITERS=ITERS, VECTOR=vector, PREFETCH=prefetch(variant),
        # (8-bit states: element blocks of a whole quantization block)
        THREADS=max(THREADS, quantization.BLOCK) if precision.quantized else THREADS,
        CHECK_ALIGNMENT=interpreting, ROUND_BF16_BY_HAND=interpreting,
        PRECISION=(_TL_DTYPES[variant.state_storage],
                   _TL_DTYPES[variant.dtype_of(extras[0]) if extras else variant.dtype],
                   len(extras), WRITES[precision.write], len(variant.scales),
                   sum(1 << i for i, u in enumerate(variant.unsigned) if u)),
        ALIGNED_ONLY=variant.mixed or precision.write == "stochastic")
    if kernel == "sums":
        return dict(common, TERMS=adapter(alg, "terms", variant.states))
    return dict(common, UPDATE=adapter(alg, "update", variant.states),
                FINISH=variant.finishes)


# ---- the kernels --------------------------------------------------------------------------------


@triton.jit
def _to_storage(x, STORAGE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    """Round an opmath value to the storage dtype, to nearest even (as torch does).

    Compiled Triton does this in one cvt.rn instruction. Triton's CPU interpreter truncates
    fp32 -> bf16 instead, so under the interpreter (only) the rounding is done on the bits.
    fp64 values bound for a 16-bit dtype (fp64 params with bf16 states) go through fp32, as
    torch converts them (round to fp32, then to the 16-bit dtype).
    """
    if x.dtype == tl.float64 and (STORAGE == tl.bfloat16 or STORAGE == tl.float16):
        x = x.to(tl.float32)
    if ROUND_BF16_BY_HAND and STORAGE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # keep NaNs NaN
    return x.to(STORAGE)


@triton.jit
def _load_raw(param, grad, states, offs, mask, NUM_STATES: tl.constexpr,
              NUM_SCALES: tl.constexpr):
    """One block of the param, the grad and the present states, as stored; then, for 8-bit
    states (``states`` holds their absmax pointers after the element-wise states), each
    element's block absmax."""
    raw = (tl.load(param + offs, mask=mask), tl.load(grad + offs, mask=mask))
    for i in tl.static_range(NUM_STATES):
        raw = raw + (tl.load(states[i] + offs, mask=mask),)
    for i in tl.static_range(NUM_STATES, NUM_STATES + NUM_SCALES):
        raw = raw + (tl.load(states[i] + offs // QUANT_BLOCK, mask=mask),)
    return raw


@triton.jit
def _state_values(raw, codes, NUM_STATES: tl.constexpr, COMPUTE: tl.constexpr,
                  PRECISION: tl.constexpr):
    """The algorithm's states of a loaded block in the opmath dtype: as stored, or an 8-bit
    state's code times its block's absmax."""
    values = ()
    for i in tl.static_range(NUM_STATES - PRECISION[P_NUM_EXTRA]):
        if PRECISION[P_NUM_SCALES] > 0:
            unsigned = (PRECISION[P_UNSIGNED] >> i) & 1
            index = (raw[2 + i].to(tl.int32) + (1 - unsigned) * SIGNED_ZERO) & (CODE_SIZE - 1)
            value = tl.load(codes + unsigned * CODE_SIZE + index) * raw[2 + NUM_STATES + i]
            values = values + (value.to(COMPUTE),)
        else:
            values = values + (raw[2 + i].to(COMPUTE),)
    return values


@triton.jit
def _store_quantized(x, state, scale, code, offs, mask, UNSIGNED: tl.constexpr):
    """Store a block of new state values ``x`` in 8 bits: per quantization block (whole
    blocks of lanes: the lanes start at a multiple of QUANT_BLOCK), the absmax of the lanes
    in ``mask``, and for each element the byte of the code nearest to x / absmax (ties to the
    lower code; a binary search over the sorted code, as bitsandbytes does), but never 0 for
    a positive value of an UNSIGNED state; a block with a NaN or an infinity gets an infinite
    absmax, so that all of it reads back as non-finite (see fusedopt.reference.quantize)."""
    LANES: tl.constexpr = x.shape[0]
    BLOCKS: tl.constexpr = LANES // QUANT_BLOCK
    x = x.to(tl.float32)
    magnitude = tl.abs(x)
    magnitude = tl.where(magnitude == magnitude, magnitude, float("inf"))  # (NaN: see above)
    if mask is not None:
        magnitude = tl.where(mask, magnitude, 0.0)
    absmax = tl.max(tl.reshape(magnitude, [BLOCKS, QUANT_BLOCK]), axis=1)
    lane_absmax = tl.reshape(tl.broadcast_to(absmax[:, None], [BLOCKS, QUANT_BLOCK]), [LANES])
    nonzero = lane_absmax > 0.0
    normalized = tl.where(nonzero, tl.div_rn(x, tl.where(nonzero, lane_absmax, 1.0)), 0.0)
    low = tl.zeros([LANES], dtype=tl.int32)  # the largest index whose code is <= normalized
    for bit in tl.static_range(8):
        candidate = low + (CODE_SIZE >> (bit + 1))
        low = tl.where(tl.load(code + candidate) <= normalized, candidate, low)
    high = tl.minimum(low + 1, CODE_SIZE - 1)
    up = (tl.load(code + high) - normalized) < (normalized - tl.load(code + low))
    if UNSIGNED:  # (code[0] is 0)
        up = up | ((low == 0) & (normalized > 0.0))
        zero = 0
    else:
        zero = SIGNED_ZERO
    index = tl.where(up, high, low)
    tl.store(state + offs, ((index - zero) & (CODE_SIZE - 1)).to(tl.uint8), mask=mask)
    blocks = tl.min(offs, axis=0) // QUANT_BLOCK + tl.arange(0, BLOCKS)
    if mask is None:
        tl.store(scale + blocks, absmax)
    else:
        present = tl.max(tl.reshape(mask.to(tl.int32), [BLOCKS, QUANT_BLOCK]), axis=1) > 0
        tl.store(scale + blocks, absmax, mask=present)


@triton.jit
def _round_stochastic(x, rng, offs):
    """Round fp32 ``x`` to bf16 stochastically: up (in magnitude) with probability equal to
    its distance from the bf16 value below, in ulps, so that the rounding is unbiased. The
    16 random bits of an element come from Philox (10 rounds) keyed by the optimizer's
    seed, with the counter (element index, tensor index, launch count): ``rng`` is (seed,
    launch count, tensor index), ``offs`` the elements' indices in their tensor. Infinities
    and NaNs are kept; a value rounded up past the largest bf16 becomes infinity, as in round
    to nearest."""
    seed, count, t = rng
    offs = offs.to(tl.int64)  # (the head's offsets are int32 lanes)
    low = offs.to(tl.uint32)
    zero = low * 0
    bits, _, _, _ = tl.philox(seed, low, (offs >> 32).to(tl.uint32), zero + t.to(tl.uint32),
                              zero + count.to(tl.uint32))
    raw = x.to(tl.uint32, bitcast=True)
    rounded = ((raw + (bits & 0xFFFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    special = (raw & 0x7F800000) == 0x7F800000  # inf or NaN: nothing to round
    return tl.where(special, x, rounded).to(tl.bfloat16)


@triton.jit
def _half_ulp(p, STORAGE: tl.constexpr):
    """Half an ulp of the bf16/fp16 values ``p`` (fp32): 2**exponent(p) times 2**-8 (bf16's
    7 stored mantissa bits) or 2**-11 (fp16's 10), and at least half the dtype's smallest
    subnormal (2**-134, 2**-25)."""
    power = (p.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    if STORAGE == tl.bfloat16:
        half = tl.maximum(power * 0.00390625, 4.591774807899561e-41)
    else:
        half = tl.maximum(power * 0.00048828125, 2.9802322387695312e-08)
    return half


@triton.jit
def _working_param(raw, NUM_STATES: tl.constexpr, COMPUTE: tl.constexpr,
                   STORAGE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
                   PRECISION: tl.constexpr):
    """The param value the update works on: the param; or its fp32 master copy (where the
    param still is the master's rounding: a param the user changed since is taken as it is,
    as torch would); or param + compensation (Kahan), where the compensation is at most half
    an ulp of the param, as each step leaves it (a larger one was left for another value: the
    user changed the param since, which is then taken as it is)."""
    p = raw[0].to(COMPUTE)
    if PRECISION[P_WRITE] == WRITE_MASTER:
        master = raw[2 + NUM_STATES - 1].to(COMPUTE)
        same = _to_storage(master, STORAGE, ROUND_BF16_BY_HAND).to(COMPUTE) == p
        p = tl.where(same, master, p)
    elif PRECISION[P_WRITE] == WRITE_KAHAN:
        compensation = raw[2 + NUM_STATES - 1].to(COMPUTE)
        half_ulp = _half_ulp(p, STORAGE)
        p = tl.where(tl.abs(compensation) <= half_ulp, p + compensation, p)
    return p


@triton.jit
def _update_body(raw, param, states, offs, mask, per_tensor, acc, FN: tl.constexpr,
                 FLAGS: tl.constexpr, NUM_STATES: tl.constexpr, NUM_SUMS: tl.constexpr,
                 STORAGE: tl.constexpr, COMPUTE: tl.constexpr, SCALE_GRADS: tl.constexpr,
                 ROUND_BF16_BY_HAND: tl.constexpr, PRECISION: tl.constexpr):
    """One loaded block: the update in the opmath dtype, stored in the storage dtypes, the
    param as the precision mode writes it."""
    hyper, scalars, sums, fresh, scaling, rng, codes = per_tensor
    p = _working_param(raw, NUM_STATES, COMPUTE, STORAGE, ROUND_BF16_BY_HAND, PRECISION)
    g = raw[1].to(COMPUTE)
    if SCALE_GRADS:
        g = g * scaling.to(COMPUTE)
    values = _state_values(raw, codes, NUM_STATES, COMPUTE, PRECISION)
    p, values = FN(p, g, values, hyper, scalars, sums, fresh, FLAGS)
    if PRECISION[P_WRITE] == WRITE_STOCHASTIC:
        tl.store(param + offs, _round_stochastic(p, rng, offs), mask=mask)
    else:
        stored = _to_storage(p, STORAGE, ROUND_BF16_BY_HAND)
        tl.store(param + offs, stored, mask=mask)
        if PRECISION[P_WRITE] == WRITE_MASTER:
            tl.store(states[NUM_STATES - 1] + offs, p, mask=mask)
        elif PRECISION[P_WRITE] == WRITE_KAHAN:
            rounded = stored.to(COMPUTE)  # (none where the param overflowed: inf - inf)
            compensation = tl.where(tl.abs(rounded) < float("inf"), p - rounded, 0.0)
            tl.store(states[NUM_STATES - 1] + offs,
                     _to_storage(compensation, STORAGE, ROUND_BF16_BY_HAND), mask=mask)
    for i in tl.static_range(NUM_STATES - PRECISION[P_NUM_EXTRA]):
        if PRECISION[P_NUM_SCALES] > 0:
            _store_quantized(values[i], states[i], states[NUM_STATES + i],
                             codes + ((PRECISION[P_UNSIGNED] >> i) & 1) * CODE_SIZE, offs, mask,
                             ((PRECISION[P_UNSIGNED] >> i) & 1) == 1)
        else:
            tl.store(states[i] + offs,
                     _to_storage(values[i], PRECISION[P_STATE], ROUND_BF16_BY_HAND), mask=mask)
    return acc


@triton.jit
def _terms_body(raw, param, states, offs, mask, per_tensor, acc, FN: tl.constexpr,
                FLAGS: tl.constexpr, NUM_STATES: tl.constexpr, NUM_SUMS: tl.constexpr,
                STORAGE: tl.constexpr, COMPUTE: tl.constexpr, SCALE_GRADS: tl.constexpr,
                ROUND_BF16_BY_HAND: tl.constexpr, PRECISION: tl.constexpr):
    """One loaded block: the algorithm's terms, added to the per-lane sums (lanes outside
    the mask count 0)."""
    hyper, scalars, sums, fresh, scaling, rng, codes = per_tensor
    p = _working_param(raw, NUM_STATES, COMPUTE, STORAGE, ROUND_BF16_BY_HAND, PRECISION)
    g = raw[1].to(COMPUTE)
    if SCALE_GRADS:
        g = g * scaling.to(COMPUTE)
    values = _state_values(raw, codes, NUM_STATES, COMPUTE, PRECISION)
    terms = FN(p, g, values, hyper, scalars, (), fresh, FLAGS)
    summed = ()
    for i in tl.static_range(NUM_SUMS):
        term = terms[i]
        if mask is not None:
            term = tl.where(mask, term, 0.0)
        summed = summed + (acc[i] + term,)
    return summed


@triton.jit
def _walk(param, grad, states, start, numel, shift, same, per_tensor, acc, element_acc,
          BODY: tl.constexpr, FN: tl.constexpr, FLAGS: tl.constexpr,
          NUM_STATES: tl.constexpr, NUM_SUMS: tl.constexpr, STORAGE: tl.constexpr,
          COMPUTE: tl.constexpr, SCALE_GRADS: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
          PRECISION: tl.constexpr,
          BLOCK: tl.constexpr, ITERS: tl.constexpr, VECTOR: tl.constexpr,
          PREFETCH: tl.constexpr, THREADS: tl.constexpr):
    """Apply BODY to every element of this program's chunk, in the fastest way its memory
    allows. A block is one 16-byte vector per thread per tensor.

    * ``same``: every tensor is 16-byte aligned after the same ``shift`` (elements; 0 for
      aligned storage). In that frame, a full chunk takes the unmasked path: 16-byte accesses
      hinted as aligned, the loads of the next two blocks issued before the current block is
      stored (the compiler cannot move loads past stores through pointers it cannot tell
      apart, so the code issues them early itself). A tensor's tail takes masked 16-byte
      accesses up to its last whole vector, then masked elements; the first chunk also does
      the ``shift`` elements before the frame, element by element. (8-bit states: the
      tail takes the element path below, in blocks of a whole quantization block.)
    * otherwise (tensors misaligned differently): masked element accesses, correct for any
      address.

    Element accesses work on blocks of THREADS lanes, one element per thread (for 8-bit
    states, THREADS is a quantization block: two elements per thread), and keep their
    own accumulator (``element_acc``, the sums kernel's per-lane sums): a block of BLOCK lanes
    would have its loads laid out four or eight to a thread, like the vector accesses of the
    same lanes, and its stores, whose alignment is unknown, one to a thread, with a relayout
    through shared memory between the two. Returns (acc, element_acc).
    """
    lanes = tl.arange(0, BLOCK)
    threads = tl.arange(0, THREADS)
    if same:
        framed_param = tl.multiple_of(param + shift, 16)
        framed_grad = tl.multiple_of(grad + shift, 16)
        framed_states = ()
        for i in tl.static_range(NUM_STATES):
            framed_states = framed_states + (tl.multiple_of(states[i] + shift, 16),)
        for i in tl.static_range(NUM_STATES, NUM_STATES + PRECISION[P_NUM_SCALES]):
            framed_states = framed_states + (states[i],)  # (8-bit states' absmax: shift is 0)
        end = numel - shift  # the frame's length
        if start + BLOCK * ITERS <= end:
            # The loads of the next PREFETCH blocks are in flight while a block is computed
            # and stored; block i + PREFETCH is loaded right after block i is stored, when its
            # registers are free again.
            ring = ()
            for i in tl.static_range(PREFETCH):
                if i < ITERS:
                    ring = ring + (_load_raw(framed_param, framed_grad, framed_states,
                                             _block_offsets(start, i, lanes, BLOCK), None,
                                             NUM_STATES, PRECISION[P_NUM_SCALES]),)
            for i in tl.static_range(ITERS):
                acc = BODY(ring[0], framed_param, framed_states,
                           _block_offsets(start, i, lanes, BLOCK), None, per_tensor, acc, FN,
                           FLAGS, NUM_STATES, NUM_SUMS, STORAGE, COMPUTE, SCALE_GRADS,
                           ROUND_BF16_BY_HAND, PRECISION)
                rest = ()
                for j in tl.static_range(1, PREFETCH):
                    if i + j < ITERS:
                        rest = rest + (ring[j],)
                if i + PREFETCH < ITERS:
                    rest = rest + (_load_raw(framed_param, framed_grad, framed_states,
                                             _block_offsets(start, i + PREFETCH, lanes, BLOCK),
                                             None, NUM_STATES, PRECISION[P_NUM_SCALES]),)
                ring = rest
        elif PRECISION[P_NUM_SCALES] > 0:
            # 8-bit states: the tail in element blocks of whole quantization blocks (a
            # runtime loop: the quantization code is long)
            element_acc = _element_loop(framed_param, framed_grad, framed_states, start, end,
                                        per_tensor, element_acc, BODY, FN, FLAGS, NUM_STATES,
                                        NUM_SUMS, STORAGE, COMPUTE, SCALE_GRADS,
                                        ROUND_BF16_BY_HAND, PRECISION, BLOCK, ITERS, THREADS)
        else:
            # the end of the last whole vector (VECTOR elements: 16 bytes)
            whole = tl.multiple_of(start + tl.maximum(end - start, 0) // VECTOR * VECTOR, VECTOR)
            for i in tl.static_range(ITERS):
                if start + i * BLOCK < whole:  # (blocks past the end are skipped whole)
                    offs = _block_offsets(start, i, lanes, BLOCK)
                    mask = offs < whole
                    raw = _load_raw(framed_param, framed_grad, framed_states, offs, mask,
                                    NUM_STATES, PRECISION[P_NUM_SCALES])
                    acc = BODY(raw, framed_param, framed_states, offs, mask, per_tensor, acc,
                               FN, FLAGS, NUM_STATES, NUM_SUMS, STORAGE, COMPUTE,
                               SCALE_GRADS, ROUND_BF16_BY_HAND, PRECISION)
            if whole < end:  # the last, partial vector (< VECTOR elements), one per thread
                offs = whole + threads
                element_acc = _elements(framed_param, framed_grad, framed_states, offs,
                                        offs < end, per_tensor, element_acc, BODY, FN, FLAGS,
                                        NUM_STATES, NUM_SUMS, STORAGE, COMPUTE, SCALE_GRADS,
                                        ROUND_BF16_BY_HAND, PRECISION)
        if (start == 0) & (shift > 0):  # the elements before the frame (< VECTOR)
            element_acc = _elements(param, grad, states, threads,
                                    threads < tl.minimum(shift, numel), per_tensor, element_acc,
                                    BODY, FN, FLAGS, NUM_STATES, NUM_SUMS, STORAGE, COMPUTE,
                                    SCALE_GRADS, ROUND_BF16_BY_HAND, PRECISION)
    else:
        element_acc = _element_loop(param, grad, states, start, numel, per_tensor, element_acc,
                                    BODY, FN, FLAGS, NUM_STATES, NUM_SUMS, STORAGE, COMPUTE,
                                    SCALE_GRADS, ROUND_BF16_BY_HAND, PRECISION, BLOCK, ITERS,
                                    THREADS)
    return acc, element_acc


@triton.jit
def _element_loop(param, grad, states, start, numel, per_tensor, acc, BODY: tl.constexpr,
                  FN: tl.constexpr, FLAGS: tl.constexpr, NUM_STATES: tl.constexpr,
                  NUM_SUMS: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                  SCALE_GRADS: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  THREADS: tl.constexpr):
    """BODY on the chunk's elements from ``start`` (up to ``numel``), THREADS at a time,
    masked, with no claim on alignment: a runtime loop, so that code and registers stay those
    of one small block, whatever ITERS and VECTOR are."""
    # (a while loop: triton 3.6's interpreter cannot take a loaded value as a range bound)
    stop = start + tl.minimum(tl.maximum(numel - start, 0), BLOCK * ITERS)
    first = start
    while first < stop:
        offs = first + tl.arange(0, THREADS)
        acc = _elements(param, grad, states, offs, offs < stop, per_tensor, acc, BODY, FN,
                        FLAGS, NUM_STATES, NUM_SUMS, STORAGE, COMPUTE, SCALE_GRADS,
                        ROUND_BF16_BY_HAND, PRECISION)
        first += THREADS
    return acc


@triton.jit
def _block_offsets(start, i, lanes, BLOCK: tl.constexpr):
    """The element offsets of block ``i`` of a chunk, hinted contiguous and aligned."""
    base = tl.multiple_of(start + i * BLOCK, BLOCK)
    return tl.max_contiguous(tl.multiple_of(base + lanes, BLOCK), BLOCK)


@triton.jit
def _elements(param, grad, states, offs, mask, per_tensor, acc, BODY: tl.constexpr,
              FN: tl.constexpr, FLAGS: tl.constexpr, NUM_STATES: tl.constexpr,
              NUM_SUMS: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
              SCALE_GRADS: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
 PRECISION: tl.constexpr):
    """BODY on masked elements, with no claim on alignment (any address)."""
    raw = _load_raw(param, grad, states, offs, mask, NUM_STATES, PRECISION[P_NUM_SCALES])
    return BODY(raw, param, states, offs, mask, per_tensor, acc, FN, FLAGS, NUM_STATES,
                NUM_SUMS, STORAGE, COMPUTE, SCALE_GRADS, ROUND_BF16_BY_HAND, PRECISION)


@triton.jit
def _chunk(tensors, num_tensors, work, NUM_STATES: tl.constexpr, NUM_SCALARS: tl.constexpr,
           VECTOR: tl.constexpr, CHECK_ALIGNMENT: tl.constexpr, ALIGNED_ONLY: tl.constexpr,
           NUM_SCALES: tl.constexpr):
    """This program's chunk and its tensor's row of the table, read once: (tensor index,
    first element, numel, shift, same, param address, grad address, state addresses, group,
    fresh pointer, scalar pointers). ``same``: every tensor's address has the same remainder
    modulo 16 bytes, and ``shift`` elements bring them all to a 16-byte boundary. The kernels
    cast the addresses to pointers themselves: a pointer made in here and hinted
    ``multiple_of`` on the aligned path carried the hint onto the masked path too (triton
    3.9, seen in the PTX), which would misread unaligned storage (tests/test_codegen.py).
    With ALIGNED_ONLY, ``same`` also needs every address 16-byte aligned (``shift`` 0).
    With CHECK_ALIGNMENT (the interpreter), numel is 0 where an access of the aligned paths
    would be misaligned, so that the program updates nothing and the tests see it."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(work + 2 * pid)
    start = tl.load(work + 2 * pid + 1)
    row = tensors + t  # column c of tensor t lives at row + c * num_tensors
    numel = tl.load(row + COL_NUMEL * num_tensors)
    param_addr = tl.load(row + COL_PARAM * num_tensors)
    grad_addr = tl.load(row + COL_GRAD * num_tensors)
    offset = param_addr & 15
    differs = (grad_addr & 15) != offset
    state_addrs = ()
    for i in tl.static_range(NUM_STATES):
        addr = tl.load(row + (COL_STATES + i) * num_tensors)
        differs = differs | ((addr & 15) != offset)
        state_addrs = state_addrs + (addr,)
    # (8-bit states' absmax: read per block, no alignment needed beyond their float32's)
    for i in tl.static_range(NUM_STATES, NUM_STATES + NUM_SCALES):
        state_addrs = state_addrs + (tl.load(row + (COL_STATES + i) * num_tensors),)
    scalar_ptrs = ()
    for i in tl.static_range(NUM_SCALARS):
        addr = tl.load(row + (COL_STATES + NUM_STATES + NUM_SCALES + i) * num_tensors)
        scalar_ptrs = scalar_ptrs + (addr.to(tl.pointer_type(tl.float32)),)
    group = tl.load(row + COL_GROUP * num_tensors)
    fresh_ptr = tl.load(row + COL_FRESH * num_tensors).to(tl.pointer_type(tl.int64))
    shift = ((16 - offset) & 15) // (16 // VECTOR)  # (addresses are whole elements apart)
    if ALIGNED_ONLY:
        # States of another width than the param's (a shift of k elements moves each by
        # another number of bytes), or stochastic rounding (whose random bits are keyed by
        # the element's index: the frame's offsets must be the tensor's): the aligned
        # frame only where every tensor starts 16-byte aligned.
        differs = differs | (offset != 0)
    if CHECK_ALIGNMENT:  # (the interpreter only: see _frame_misaligned)
        misaligned = _frame_misaligned(param_addr, grad_addr, state_addrs, shift, NUM_STATES,
                                       VECTOR)
        numel = tl.where((differs == 0) & misaligned, 0, numel)
    return (t, start, numel, shift, differs == 0, param_addr, grad_addr, state_addrs, group,
            fresh_ptr, scalar_ptrs)


@triton.jit
def _frame_misaligned(param_addr, grad_addr, state_addrs, shift, NUM_STATES: tl.constexpr,
                      VECTOR: tl.constexpr):
    """Whether some 16-byte access of the aligned paths would be misaligned after the shift.
    Checked under the interpreter (real CPU addresses), where a misaligned access would still
    read the right values: a program that finds one updates nothing, so that the tests
    comparing with the reference see it (the interpreter ignores tl.device_assert)."""
    skip = shift * (16 // VECTOR)
    bits = (param_addr + skip) | (grad_addr + skip)
    for i in tl.static_range(NUM_STATES):
        bits = bits | (state_addrs[i] + skip)
    return (bits & 15) != 0


@triton.jit
def _amp(grad_scale, found_inf, clip_coef, UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr,
         CLIP: tl.constexpr):
    """AMP's and clipping's inputs: (run, grad multiplier). ``run`` is false when found_inf is
    set: the whole update is skipped on the device, scalars included. The multiplier is
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
def _per_tensor(hyper_row, scalar_ptrs, sums, t, fresh, FLAGS: tl.constexpr,
                NUM_HYPER: tl.constexpr, NUM_SCALARS: tl.constexpr, USES_STEP: tl.constexpr,
                ADVANCE: tl.constexpr, NUM_SUMS: tl.constexpr):
    """The values every program of a tensor shares, loaded once, before the element loop:
    its group's hyperparameters (float64), its scalars as the update reads them (``step``
    incremented, the others as stored), their new values (``advanced``: what the tensor's
    last program stores), and its sums."""
    hyper = ()
    for i in tl.static_range(NUM_HYPER):
        hyper = hyper + (tl.load(hyper_row + i),)
    scalars = ()
    for i in tl.static_range(NUM_SCALARS):
        value = tl.load(scalar_ptrs[i])
        if USES_STEP and i == 0:
            value = value + 1.0
        scalars = scalars + (value,)
    sum_values = ()
    for i in tl.static_range(NUM_SUMS):
        sum_values = sum_values + (tl.load(sums + NUM_SUMS * t + i),)
    if ADVANCE is not None:
        # (an advance reads no element values: the first three are placeholders)
        advanced = ADVANCE(fresh, fresh, (), hyper, scalars, sum_values, fresh, FLAGS)
    else:
        advanced = scalars
    return hyper, scalars, advanced, sum_values


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def multi_tensor_step(tensors, num_tensors, work, hyper, hyper_stride, done_counts, sums,
                      grad_scale, found_inf, clip_coef, rng, codes, UPDATE: tl.constexpr,
                      FLAGS: tl.constexpr, NUM_STATES: tl.constexpr, NUM_HYPER: tl.constexpr,
                      NUM_SCALARS: tl.constexpr, USES_STEP: tl.constexpr,
                      ADVANCE: tl.constexpr, NUM_SUMS: tl.constexpr, FINISH: tl.constexpr,
                      UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr,
                      SCALE_GRADS: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr, VECTOR: tl.constexpr,
                      PREFETCH: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
                      THREADS: tl.constexpr, CHECK_ALIGNMENT: tl.constexpr,
                      PRECISION: tl.constexpr, ALIGNED_ONLY: tl.constexpr):
    """Update one chunk of one tensor; the grid is the whole work list of the bucket.

    ``rng`` (stochastic rounding only): ``int64[3]``, the seed, the launch count (Philox's
    counter: new random bits every step) and a count of finished programs; the bucket's last
    program to finish advances the launch count, on the device (capturable). ``codes``
    (8-bit states only): the signed and the unsigned code, float32[2, 256]."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        (t, start, numel, shift, same, param_addr, grad_addr, state_addrs, group, fresh_ptr,
         scalar_ptrs) = _chunk(tensors, num_tensors, work, NUM_STATES, NUM_SCALARS, VECTOR,
                               CHECK_ALIGNMENT, ALIGNED_ONLY, PRECISION[P_NUM_SCALES])
        param = param_addr.to(tl.pointer_type(STORAGE))
        grad = grad_addr.to(tl.pointer_type(STORAGE))
        states = _state_pointers(state_addrs, NUM_STATES, PRECISION)
        fresh = tl.load(fresh_ptr)
        hyper_values, scalars, advanced, sum_values = _per_tensor(
            hyper + group * hyper_stride, scalar_ptrs, sums, t, fresh, FLAGS, NUM_HYPER,
            NUM_SCALARS, USES_STEP, ADVANCE, NUM_SUMS)
        stochastic = PRECISION[P_WRITE] == WRITE_STOCHASTIC
        if stochastic:
            seed = tl.load(rng)
            count = tl.load(rng + 1)
        else:
            seed = t
            count = t
        nothing = tl.full([], 0, tl.int32)  # (the update accumulates nothing)
        _walk(param, grad, states, start, numel, shift, same,
              (hyper_values, scalars, sum_values, fresh, scaling, (seed, count, t), codes),
              nothing,
              nothing, _update_body, UPDATE,
              FLAGS, NUM_STATES, NUM_SUMS, STORAGE, COMPUTE, SCALE_GRADS, ROUND_BF16_BY_HAND,
              PRECISION, BLOCK, ITERS, VECTOR, PREFETCH, THREADS)
        if FINISH or fresh != 0:
            _finish(t, numel, done_counts, scalar_ptrs, advanced, sums, fresh, fresh_ptr,
                    NUM_SCALARS, NUM_SUMS, BLOCK * ITERS)
        if stochastic:
            # every program has read the launch count before the last one advances it
            tl.debug_barrier()
            if tl.atomic_add(rng + 2, 1) == tl.num_programs(0) - 1:
                tl.store(rng + 1, count + 1)
                tl.store(rng + 2, 0)


@triton.jit
def _state_pointers(state_addrs, NUM_STATES: tl.constexpr, PRECISION: tl.constexpr):
    """The state addresses as pointers: the algorithm's states in their storage dtype, the
    precision mode's extra state in its own, then 8-bit states' absmax (float32)."""
    states = ()
    for i in tl.static_range(NUM_STATES):
        if i < NUM_STATES - PRECISION[P_NUM_EXTRA]:
            states = states + (state_addrs[i].to(tl.pointer_type(PRECISION[P_STATE])),)
        else:
            states = states + (state_addrs[i].to(tl.pointer_type(PRECISION[P_EXTRA])),)
    for i in tl.static_range(NUM_STATES, NUM_STATES + PRECISION[P_NUM_SCALES]):
        states = states + (state_addrs[i].to(tl.pointer_type(tl.float32)),)
    return states


@triton.jit
def _finish(t, numel, done_counts, scalar_ptrs, advanced, sums, fresh, fresh_ptr,
            NUM_SCALARS: tl.constexpr, NUM_SUMS: tl.constexpr, CHUNK: tl.constexpr):
    """The tensor's last program to finish stores its new scalars, clears its sums and its
    fresh flag for the next step. A one-chunk tensor's program is its last; of several, the
    last is told by an acq_rel atomic counter, which orders every other program's reads of
    the old values before these writes. No extra launch."""
    chunks = tl.maximum((numel + CHUNK - 1) // CHUNK, 1)
    # every warp of this program has read the old scalars and sums before the stores below
    # (or before one thread's release lets the tensor's last program make them)
    tl.debug_barrier()
    if chunks == 1:
        last = True
    else:
        last = tl.atomic_add(done_counts + t, 1) == chunks - 1
    if last:
        for i in tl.static_range(NUM_SCALARS):
            tl.store(scalar_ptrs[i], advanced[i])
        for i in tl.static_range(NUM_SUMS):
            tl.store(sums + NUM_SUMS * t + i, 0.0)
        if fresh != 0:
            tl.store(fresh_ptr, 0)
        if chunks > 1:
            tl.store(done_counts + t, 0)


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def multi_tensor_sums(tensors, num_tensors, work, hyper, hyper_stride, sums, grad_scale,
                      found_inf, clip_coef, codes, TERMS: tl.constexpr, FLAGS: tl.constexpr,
                      NUM_STATES: tl.constexpr, NUM_HYPER: tl.constexpr,
                      NUM_SCALARS: tl.constexpr, USES_STEP: tl.constexpr,
                      ADVANCE: tl.constexpr, NUM_SUMS: tl.constexpr, UNSCALE: tl.constexpr,
                      SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr,
                      SCALE_GRADS: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr, VECTOR: tl.constexpr,
                      PREFETCH: tl.constexpr, THREADS: tl.constexpr,
                      CHECK_ALIGNMENT: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
                      PRECISION: tl.constexpr, ALIGNED_ONLY: tl.constexpr):
    """Per-tensor sums of the algorithm's terms over the same tables: one read-only launch
    whose results (``sums[t, :]``) the update launch reads (LAMB's trust-ratio norms).
    Skipped, like the update, where AMP found an inf (the sums then stay zero)."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        (t, start, numel, shift, same, param_addr, grad_addr, state_addrs, group, fresh_ptr,
         scalar_ptrs) = _chunk(tensors, num_tensors, work, NUM_STATES, NUM_SCALARS, VECTOR,
                               CHECK_ALIGNMENT, ALIGNED_ONLY, PRECISION[P_NUM_SCALES])
        param = param_addr.to(tl.pointer_type(STORAGE))
        grad = grad_addr.to(tl.pointer_type(STORAGE))
        states = _state_pointers(state_addrs, NUM_STATES, PRECISION)
        fresh = tl.load(fresh_ptr)
        hyper_values, scalars, advanced, sum_values = _per_tensor(
            hyper + group * hyper_stride, scalar_ptrs, sums, t, fresh, FLAGS, NUM_HYPER,
            NUM_SCALARS, USES_STEP, None, 0)
        acc = ()
        for _ in tl.static_range(NUM_SUMS):
            acc = acc + (tl.zeros([BLOCK], dtype=COMPUTE),)
        element_acc = ()
        for _ in tl.static_range(NUM_SUMS):
            element_acc = element_acc + (tl.zeros([THREADS], dtype=COMPUTE),)
        acc, element_acc = _walk(param, grad, states, start, numel, shift, same,
                                 (hyper_values, scalars, sum_values, fresh, scaling,
                                  (t, t, t), codes), acc, element_acc, _terms_body, TERMS, FLAGS,
                                 NUM_STATES, NUM_SUMS, STORAGE, COMPUTE, SCALE_GRADS,
                                 ROUND_BF16_BY_HAND, PRECISION, BLOCK, ITERS, VECTOR,
                                 PREFETCH, THREADS)
        for i in tl.static_range(NUM_SUMS):
            total = tl.sum(acc[i], axis=0) + tl.sum(element_acc[i], axis=0)
            tl.atomic_add(sums + NUM_SUMS * t + i, total)


class Prepared:
    """One kernel with its constexprs fixed, launched straight through triton's compiled kernel
    once the JIT has compiled it.

    A plain ``kernel[grid](...)`` call binds and specialises every argument, hashes the cache
    key and checks the kernel's globals on the host at every launch: 15-20 µs, as much as
    the host work of a whole step of a small model. After the first (JIT) launch has compiled
    the kernel, the same compiled kernel is launched the way triton's own launcher does
    (``CompiledKernel.run`` with every argument in signature order), as long as each pointer
    argument keeps the 16-byte alignment the kernel was specialised for; otherwise, and under
    the interpreter, the JIT path runs.

    The first launch also settles the compile options (:func:`needs_cap`, :func:`keep_cap`):
    where its build uses more than REGISTER_CAP registers or spills, the capped build is
    compiled right then (``warmup``: compiled and loaded, not launched) and is the one launched
    from the next step on, unless it spills. Builds for other alignments use the same options.
    """

    def __init__(self, fn, constexprs: dict):
        self.fn = fn
        self.constexprs = constexprs
        self.compiled = None
        self.aligned: tuple[bool, ...] | None = None
        self.options = LAUNCH_OPTIONS
        self.options_settled = False

    def bound(self, args: tuple) -> list:
        """Every argument in the kernel's signature order: the runtime ones as given (in that
        order), the constexprs from the dict, as triton's binder returns them."""
        runtime = iter(args)
        return [self.constexprs[name] if name in self.constexprs else next(runtime)
                for name in self.fn.arg_names]

    def __call__(self, grid: tuple[int], args: tuple) -> None:
        aligned = tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))
        if self.compiled is not None and aligned == self.aligned:
            from triton import knobs
            from triton.runtime.driver import driver

            kernel = self.compiled
            bound = self.bound(args)
            device = driver.active.get_current_device()
            stream = driver.active.get_current_stream(device)
            metadata = kernel.launch_metadata(grid, stream, *bound)
            kernel.run(grid[0], 1, 1, stream, kernel.function, kernel.packed_metadata, metadata,
                       knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound)
            return
        kernel = self.fn[grid](*args, **self.constexprs, **self.options)
        if (kernel is None or not hasattr(kernel, "launch_metadata")
                or not hasattr(kernel, "run") or hasattr(kernel, "result")):
            return  # the interpreter's launch: the JIT path stays
        if not self.options_settled:
            # Settled at the first launch, so that later steps (a CUDA graph capture, say)
            # compile nothing: the capped build is compiled and loaded here, not launched.
            # (n_regs / n_spills: filled in when triton loaded the build; reading ``run`` loads)
            self.options_settled = True
            if needs_cap(getattr(kernel, "n_regs", 0), getattr(kernel, "n_spills", 0)):
                capped = self.fn.warmup(*args, grid=grid, **self.constexprs, **CAPPED_OPTIONS)
                if capped is not None and hasattr(capped, "run") and keep_cap(
                        getattr(capped, "n_spills", 0)):
                    self.options, kernel = CAPPED_OPTIONS, capped
        self.compiled, self.aligned = kernel, aligned


def launch(variant: Variant, *, tensors: torch.Tensor, num_tensors: int, work: torch.Tensor,
           num_work: int, hyper: torch.Tensor, done_counts: torch.Tensor,
           sums: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
           found_inf: torch.Tensor | None = None, clip_coef: torch.Tensor | None = None,
           rng: torch.Tensor | None = None, codes: torch.Tensor | None = None,
           interpreting: bool = False,
           prepared: dict | None = None) -> None:
    """Launch one multi-tensor step over a bucket's tables (see the module docstring).

    With sums (an algorithm that declares them), first one :func:`multi_tensor_sums` launch
    fills ``sums`` (``[num_tensors, len(algorithm.sums)]`` in the opmath dtype, zero on entry;
    the step launch zeroes it again). ``grad_scale`` / ``found_inf``: AMP's float32 scalars on
    this device, and ``clip_coef`` a float32 scalar the grads are multiplied by; present
    exactly when ``variant`` says so. ``rng``: stochastic rounding's ``int64[3]`` device
    tensor (seed, launch count, finished programs: 0 between launches; see
    :func:`multi_tensor_step`). ``codes``: 8-bit states' float32[2, 256] code table
    (:func:`fusedopt.kernels.quantization.code_table`, on this device). ``prepared``: a dict the
    caller keeps for its launches (a bucket's): its :class:`Prepared` kernels skip the JIT's
    per-call binding.
    """
    global _launches
    prepared = {} if prepared is None else prepared
    # unused pointer arguments get any tensor of the right kind: they are never read
    amp = tuple(t if t is not None else hyper for t in (grad_scale, found_inf, clip_coef))
    if variant.algorithm.sums:
        kernel = prepared.get(("sums", variant))
        if kernel is None:
            kernel = prepared[("sums", variant)] = Prepared(
                multi_tensor_sums, constexprs(variant, "sums", interpreting))
        kernel((num_work,), (tensors, num_tensors, work, hyper, hyper.shape[1], sums, *amp,
                             codes if codes is not None else hyper))
        _launches += 1
    kernel = prepared.get(("step", variant))
    if kernel is None:
        kernel = prepared[("step", variant)] = Prepared(
            multi_tensor_step, constexprs(variant, "step", interpreting))
    kernel((num_work,), (tensors, num_tensors, work, hyper, hyper.shape[1], done_counts,
                         sums if sums is not None else done_counts, *amp,
                         rng if rng is not None else tensors,
                         codes if codes is not None else hyper))
    _launches += 1
