"""Block-wise 8-bit states: the layout and the code (no triton here; the reference path and
the engine use it too).

A state kept in 8 bits (``state_dtype="8bit"``) is a ``uint8`` tensor of the param's shape
and a float32 ``absmax`` per block of :data:`BLOCK` consecutive elements (in the param's
memory order). Element ``i`` stands for ``CODE[index_of(q[i])] * absmax[i // BLOCK]``, where
``CODE`` is a sorted table of 256 values in [-1, 1] (signed: first moments, momenta) or [0, 1]
(unsigned: second moments, accumulators): bitsandbytes' *dynamic* code, whose values are
spread over seven decades, so that small elements of a block keep about two significant
digits. A value is stored as the code nearest to ``x / absmax`` (ties to the lower code;
a positive value of an unsigned state never as 0), with ``absmax`` the block's largest
magnitude. The byte stored is the code's index in the sorted table less the index of 0
(modulo 256, :func:`byte_of`), so that a zero byte is the value 0 in both codes: a state
zeroed in place (``state["exp_avg"].zero_()``, a reset of the moments) reads back as zeros,
as long as its absmax is finite (a block that went non-finite keeps an infinite absmax, and
0 times it is NaN: reset ``<state>_absmax`` too, ``.zero_()`` it, after a divergence).

The blocks are runs of the codes' memory, laid out as the param (the engine quantizes codes
of another layout again in the param's). Codes re-laid by hand or by a checkpoint tool
(``.contiguous()`` on a channels_last param's codes) without their absmax cannot be told
from right ones and read wrong: save them as they are, or through
:func:`fusedopt.precision.torch_state_dict`.
"""

from __future__ import annotations

import functools

import torch

#: Elements per quantization block (one float32 absmax each: 4/256 bytes per element more).
BLOCK = 256
#: Params with fewer elements keep their states in full precision (as bitsandbytes does):
#: their states weigh little and take the largest relative errors.
MIN_NUMEL = 4096
#: The states that are never negative (second moments, accumulators, running maxima): their
#: code is the unsigned one, twice as fine. The states in neither set (Rprop's step sizes and
#: previous grads, ASGD's parameter average) are not moment estimates, and are not quantized.
UNSIGNED_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta",
                             "exp_inf"})
SIGNED_STATES = frozenset({"exp_avg", "momentum_buffer", "grad_avg"})
#: The suffix of the absmax state of a quantized state ("exp_avg" -> "exp_avg_absmax").
ABSMAX_SUFFIX = "_absmax"
#: The suffix a quantized state's codes take in a state_dict ("exp_avg" -> "exp_avg_codes"),
#: so that torch.optim, given such a checkpoint, cannot take the codes for the values (it
#: would cast them to floats: 0..255); in ``optimizer.state`` they keep the state's name.
CODES_SUFFIX = "_codes"


def absmax_name(state: str) -> str:
    """The name of the per-block absmax of quantized state ``state``."""
    return state + ABSMAX_SUFFIX


def quantizable(states: tuple[str, ...]) -> bool:
    """Whether an algorithm with these states can keep them in 8 bits."""
    return all(s in SIGNED_STATES or s in UNSIGNED_STATES for s in states)


def signed(state: str) -> bool:
    """Whether 8-bit state ``state`` takes the signed code (it may be negative)."""
    return state not in UNSIGNED_STATES


def num_blocks(numel: int) -> int:
    """Quantization blocks of a tensor of ``numel`` elements."""
    return (numel + BLOCK - 1) // BLOCK


@functools.cache
def dynamic_code(signed: bool) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code (``create_dynamic_map(signed, 7, 8)``), sorted:
    float32[256]. For each decade 10**-6 ... 10**0, the midpoints of an even split of
    [0.1, 1] times that decade (2**k points in decade k, twice as many unsigned), each
    negated too if signed; then 0 and 1."""
    values: list[float] = []
    for decade in range(7):
        points = 2 ** decade + 1 if signed else 2 ** (decade + 1) + 1
        bounds = torch.linspace(0.1, 1, points, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (decade - 6) * means).tolist()
        if signed:
            values += (-(10 ** (decade - 6)) * means).tolist()
    values += [0.0, 1.0]
    code = torch.tensor(sorted(values), dtype=torch.float32)
    assert len(code) == 256 and code[ZERO_INDEX[signed]] == 0
    return code


#: The index of 0 in each sorted code (signed: after its 127 negative values).
ZERO_INDEX = {True: 127, False: 0}


def byte_of(index: torch.Tensor, signed: bool) -> torch.Tensor:
    """The stored byte of a code index: the index less that of 0, modulo 256."""
    return ((index - ZERO_INDEX[signed]) & 255).to(torch.uint8)


def index_of(byte: torch.Tensor, signed: bool) -> torch.Tensor:
    """The code index of a stored byte (int64)."""
    return (byte.long() + ZERO_INDEX[signed]) & 255


@functools.cache
def _codes_on(device: torch.device) -> torch.Tensor:
    return torch.stack([dynamic_code(True), dynamic_code(False)]).to(device)


def code_table(device: torch.device) -> torch.Tensor:
    """float32[2, 256]: the signed code, then the unsigned one, on ``device`` (what the
    kernels read)."""
    return _codes_on(torch.device(device))
