"""``torch.compile`` support: the whole optimizer step as one ``torch.library`` custom op.

Under ``torch.compile`` a fusedopt ``step()`` does not let dynamo trace its engine (cached
pointer tables, host-side bookkeeping). It calls ``fusedopt::step`` instead: an opaque op that
takes the params (declared mutated, so that the compiled graph orders the update after every
read of the old values and before any later one), their grads and AMP's scalars, and runs the
eager step (one kernel launch per bucket) inside. Its fake implementation does nothing: the op
returns nothing and changes no shapes. Optimizer state is internal to the op (nothing in a
compiled graph reads it), as it is for torch's own fused kernels.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

_optimizers: dict[int, weakref.ref] = {}
_handles = itertools.count()


def register(optimizer) -> int:
    """A handle the op can find ``optimizer`` by (a plain int: dynamo treats it as a constant)."""
    handle = next(_handles)
    _optimizers[handle] = weakref.ref(optimizer, lambda _, h=handle: _optimizers.pop(h, None))
    return handle


@torch.library.custom_op("fusedopt::step", mutates_args=("params",))
def step_op(params: list[Tensor], grads: list[Tensor | None], handle: int,
            grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    optimizer = _optimizers[handle]()
    optimizer._step_on(params, grads, grad_scale, found_inf)


@step_op.register_fake
def _(params, grads, handle, grad_scale, found_inf) -> None:
    return None
