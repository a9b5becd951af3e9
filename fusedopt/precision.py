"""The precision options of the element-wise optimizers: what they mean for each param, and
checkpoints in torch.optim's full-precision format.

Every optimizer whose update is element-wise (the skeleton's: SGD, Adam, AdamW, Adagrad,
Adadelta, RMSprop, NAdam, RAdam, Adamax, Rprop, ASGD, Lion, LAMB) takes four keyword-only
options, kept in each param group like torch's own options (so groups can differ):

* ``master_weights=True``: a bf16/fp16 param gets an fp32 copy, ``state["master_param"]``,
  which the update reads and writes; the param is stored as its round-to-nearest-even value
  in the same launch. (A param changed by the user since the last step, so that it no longer
  is the master's rounding, is taken as it is: the master follows it.)
* ``stochastic_rounding=True``: a bf16 param is updated in fp32 and rounded to bf16
  stochastically, with Philox random bits from a seed drawn from torch's generator and a
  launch count kept on the device (capturable, reproducible from ``torch.manual_seed``).
* ``kahan_summation=True``: a bf16/fp16 param gets a compensation ``state["kahan_comp"]`` of its
  dtype; param + compensation is the value the update reads, and keeps what rounding the param
  loses.
* ``state_dtype``: the dtype of the algorithm's states (``torch.bfloat16``, ``torch.float16``
  or ``torch.float32``, or their names: ``"bf16"``, ``"fp32"``...); by default the param's
  (as torch.optim), fp32 with master weights. The update's math runs in fp32 in any case.
  ``"8bit"``: block-wise quantized states (:mod:`fusedopt.kernels.quantization`): each state
  ``uint8`` codes shaped as the param, with its float32 ``<state>_absmax`` per block of 256
  elements (bitsandbytes' dynamic code: signed for first moments and momenta, unsigned for
  second moments and accumulators), dequantized in registers and requantized in the same
  launch. Params of fewer than 4096 elements keep full-precision states (the default
  dtype). Rprop and ASGD do not take it (their states are step sizes, previous grads and a
  parameter average, not moment estimates), nor does centered RMSprop (its variance
  estimate, a difference of two quantized states, turns negative), nor do sharded (FSDP2)
  params yet.

The first three apply to low-precision params only: fp32/fp64 params in the same group are
updated as usual. They exclude each other (each is another way of keeping the param's lost
bits); each combines with any ``state_dtype``. Whole-tensor and sparse updates (Adafactor,
Muon, SparseAdam) and L-BFGS do not take them; stochastic rounding and Kahan summation do
not take FSDP2's sharded params yet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedopt.kernels import quantization
from fusedopt.kernels.variant import KAHAN, MASTER, QUANTIZED, Precision
from fusedopt.tensors import is_dtensor

#: The options and their defaults.
OPTIONS = {"master_weights": False, "stochastic_rounding": False, "kahan_summation": False,
           "state_dtype": None}
STATE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LOW_PRECISION = (torch.bfloat16, torch.float16)
EXTRAS = (MASTER, KAHAN)
#: The state_dict key of stochastic rounding's seed and launch count (per device).
ROUNDING_KEY = "fusedopt_stochastic_rounding"
_STATE_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                      "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
                      "float32": torch.float32, "float": torch.float32, "8bit": QUANTIZED}


def state_dtype_of(value: Any) -> torch.dtype | None:
    """The torch dtype a ``state_dtype`` option names (None: the default; ``torch.uint8``:
    8-bit states), or ValueError."""
    if value is None or value in STATE_DTYPES:
        return value
    if isinstance(value, str) and value.lower() in _STATE_DTYPE_NAMES:
        return _STATE_DTYPE_NAMES[value.lower()]
    raise ValueError(f"state_dtype must be None, torch.bfloat16, torch.float16, "
                     f"torch.float32 (or 'bf16', 'fp16', 'fp32') or '8bit', not {value!r}")


def check_options(owner: str, group: dict[str, Any], states: tuple[str, ...] = ()) -> None:
    """ValueError for a precision option of the wrong type, options that exclude each
    other, or 8-bit states for an algorithm whose ``states`` are not moment estimates."""
    for name in ("master_weights", "stochastic_rounding", "kahan_summation"):
        if not isinstance(group.get(name, False), bool):
            raise ValueError(f"{owner}: {name} must be True or False, not "
                             f"{group[name]!r}")
    chosen = [n for n in ("master_weights", "stochastic_rounding", "kahan_summation")
              if group.get(n, False)]
    if len(chosen) > 1:
        raise ValueError(f"{owner}: {' and '.join(chosen)} exclude each other (each keeps the "
                         "bits a low-precision param loses in its own way); choose one")
    try:
        state_dtype = state_dtype_of(group.get("state_dtype"))
    except ValueError as e:
        raise ValueError(f"{owner}: {e}") from None
    if state_dtype == QUANTIZED and not quantization.quantizable(states):
        others = [s for s in states if not quantization.quantizable((s,))]
        raise ValueError(f"{owner}: state_dtype='8bit' quantizes moment estimates; "
                         f"{', '.join(others)} are not (keep them in torch.bfloat16 or "
                         "torch.float32)")
    if state_dtype == QUANTIZED and group.get("centered"):
        raise ValueError(f"{owner}: state_dtype='8bit' with centered=True: square_avg - "
                         "grad_avg**2 turns negative (a NaN square root) once the two are "
                         "quantized apart; use torch.bfloat16 states (bitsandbytes refuses it "
                         "too)")


def precision_of(group: dict[str, Any], p: Tensor, owner: str) -> Precision:
    """What a param of ``group`` gets: its :class:`Precision`, normalised (a state_dtype that
    is the default one is None), so that params treated alike share a bucket."""
    dtype = p.dtype
    low = dtype in LOW_PRECISION
    write = ("master" if group.get("master_weights") and low else
             "stochastic" if group.get("stochastic_rounding") and low else
             "kahan" if group.get("kahan_summation") and low else "nearest")
    state_dtype = state_dtype_of(group.get("state_dtype"))
    if write == "stochastic" and dtype != torch.bfloat16:
        raise NotImplementedError(f"{owner}: stochastic_rounding rounds to bfloat16; a float16 "
                                  "parameter can take master_weights or kahan_summation")
    if p.is_complex() and (state_dtype is not None or write != "nearest"):
        raise NotImplementedError(f"{owner}: the precision options with complex parameters")
    if write in ("stochastic", "kahan") and is_dtensor(p):
        option = "stochastic_rounding" if write == "stochastic" else "kahan_summation"
        raise NotImplementedError(f"{owner}: {option} with sharded (FSDP2/DTensor) parameters "
                                  "is not supported yet; master_weights is")
    if state_dtype == QUANTIZED and is_dtensor(p):
        raise NotImplementedError(f"{owner}: state_dtype='8bit' with sharded (FSDP2/DTensor) "
                                  "parameters is not supported yet; torch.bfloat16 is")
    default = torch.float32 if write == "master" else dtype
    if state_dtype == QUANTIZED and p.numel() < quantization.MIN_NUMEL:
        state_dtype = None  # (small params keep full-precision states)
    if state_dtype == default:
        state_dtype = None
    return Precision(state_dtype, write)


def check_rounding_state(saved: Any, owner: str) -> tuple[int, dict[str, int]] | None:
    """A state_dict's stochastic-rounding entry (:data:`ROUNDING_KEY`: the seed and the
    launch count per device) as (seed, counts), or ValueError if it is not one; None if
    absent."""
    if saved is None:
        return None
    seed = saved.get("seed") if isinstance(saved, dict) else None
    counts = saved.get("counts") if isinstance(saved, dict) else None
    if (not isinstance(seed, int) or not isinstance(counts, dict)
            or not all(isinstance(k, str) and isinstance(v, int) for k, v in counts.items())):
        raise ValueError(f"{owner}.load_state_dict: {ROUNDING_KEY!r} should be "
                         "{'seed': int, 'counts': {device: int}}, as state_dict() saves it")
    return seed, dict(counts)


def quantized(value: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """State ``name`` in 8 bits: (uint8 codes, float32 absmax per block)."""
    from fusedopt.reference import quantize

    return quantize(value, quantization.signed(name))


def dequantized(codes: Tensor, absmax: Tensor, name: str) -> Tensor:
    """The float32 values of 8-bit state ``name``."""
    from fusedopt.reference import dequantize

    return dequantize(codes, absmax, quantization.signed(name))


def check_quantized(codes: Tensor, absmax: Any, name: str, owner: str) -> None:
    """ValueError unless ``codes`` (a uint8 state) comes with its absmax: a float32 tensor
    of one value per block, on the same device, of a state that can be kept in 8 bits."""
    scale = quantization.absmax_name(name)
    if not quantization.quantizable((name,)):
        raise ValueError(f"{owner}: state {name!r} is uint8, but it is never kept in 8 bits")
    blocks = quantization.num_blocks(codes.numel())
    if (not isinstance(absmax, Tensor) or absmax.dtype != torch.float32
            or absmax.shape != (blocks,) or absmax.device != codes.device
            or not absmax.is_contiguous()):
        found = "missing" if absmax is None else (
            f"{absmax.dtype} {tuple(absmax.shape)} with strides {absmax.stride()} on "
            f"{absmax.device}" if isinstance(absmax, Tensor) else type(absmax).__name__)
        raise ValueError(f"{owner}: the 8-bit state {name!r} needs {scale!r}, a contiguous "
                         f"float32 tensor of shape ({blocks},) on {codes.device}; it is "
                         f"{found}")


def saved_state(values: dict[str, Any]) -> dict[str, Any]:
    """A param's state as ``state_dict()`` saves it: each 8-bit state's codes under
    ``<state>_codes`` (:data:`fusedopt.kernels.quantization.CODES_SUFFIX`)."""
    def key(name: str, value: Any) -> str:
        if (isinstance(value, Tensor) and value.dtype == QUANTIZED
                and quantization.absmax_name(name) in values):
            return name + quantization.CODES_SUFFIX
        return name

    return {key(name, value): value for name, value in values.items()}


def live_state(values: dict[str, Any]) -> dict[str, Any]:
    """A saved param state with each 8-bit state's codes under the state's own name again,
    as ``optimizer.state`` keeps them (the inverse of :func:`saved_state`): uint8
    ``<state>_codes`` of a state that can be kept in 8 bits, where ``<state>`` itself is not
    there (anything else, a user's own ``..._codes`` in a torch checkpoint, keeps its name)."""
    def key(name: str, value: Any) -> str:
        state = name.removesuffix(quantization.CODES_SUFFIX)
        if (name.endswith(quantization.CODES_SUFFIX) and isinstance(value, Tensor)
                and value.dtype == QUANTIZED and state not in values
                and quantization.quantizable((state,))):
            return state
        return name

    return {key(name, value): value for name, value in values.items()}


def torch_state_dict(state_dict: dict[str, Any], dtype: torch.dtype = torch.float32
                     ) -> dict[str, Any]:
    """A fusedopt state_dict in torch.optim's format, for checkpoints that leave fusedopt:
    every floating-point state tensor copied in at least ``dtype`` (float32 by default: states
    kept in bf16 are widened, fp64 ones stay), 8-bit states dequantized (their absmax left
    out), the precision modes' own states (``master_param``, ``kahan_comp``) and options left
    out. The result loads into the
    torch.optim twin (which casts the states to its params' dtype) and into a fusedopt
    optimizer without precision options.

    The master weights are the model's full-precision values: to leave fusedopt with them,
    copy :func:`master_params` into a float32 model."""
    def converted(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.is_floating_point() and value.dim():  # a state tensor (not a scalar state)
            return value.to(torch.promote_types(value.dtype, dtype), copy=True)  # (widened)
        return value.clone()  # (a copy: nothing is shared with the live optimizer)

    def full_precision(values: dict[str, Any]) -> dict[str, Any]:
        codes = {name: value for name, value in values.items()
                 if isinstance(value, Tensor) and value.dtype == QUANTIZED
                 and quantization.quantizable((name,))}
        scales = {quantization.absmax_name(name) for name in codes}
        for name, value in codes.items():
            check_quantized(value, values.get(quantization.absmax_name(name)), name,
                            "torch_state_dict")
        return {name: converted(dequantized(value, values[quantization.absmax_name(name)], name)
                                if name in codes else value)
                for name, value in values.items() if name not in EXTRAS and name not in scales}

    state = {key: full_precision(live_state(values))
             for key, values in state_dict["state"].items()}
    groups = [{k: v for k, v in group.items() if k not in OPTIONS}
              for group in state_dict["param_groups"]]
    others = {k: v for k, v in state_dict.items()
              if k not in ("state", "param_groups", ROUNDING_KEY)}
    return {**others, "state": state, "param_groups": groups}


def master_params(optimizer) -> list[Tensor]:
    """Each param's full-precision value, in param-group order: the value its next update
    would start from (:func:`fusedopt.reference.working_value`): its fp32 master where its
    precision mode keeps one, its Kahan pair summed in fp32 where its mode keeps one (in each
    case unless the user changed the param since), else the param itself."""
    from fusedopt.reference import working_value

    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            write = optimizer._precision(group, p).write
            extra = state.get(MASTER if write == "master" else KAHAN)
            if write in ("master", "kahan") and isinstance(extra, Tensor):
                out.append(working_value(p.detach(), extra, write))
            else:
                out.append(p.detach())
    return out
