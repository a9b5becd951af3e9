"""Minimum bytes each optimizer step must move per parameter.

An element-wise optimizer step is memory bound, so its floor is the traffic it
cannot avoid: read the param and its grad, read and write every param-sized
state buffer, and write the param back. For AdamW in fp32 that is
read p, g, m, v + write p, m, v = 7 x 4 = 28 B. Dividing that by the measured
step time gives an effective GB/s that is comparable with the copy bandwidth.

The state buffers come from each optimizer's own fusedopt spec, so a new optimizer is known
here as soon as it exists. The model counts only param-sized tensors; scalars (step counts,
lr) are negligible. It is a floor: an implementation that needs two passes (LAMB's trust
ratio) or extra temporaries moves more and shows up below the ceiling.

fusedopt's precision options (:mod:`fusedopt.precision`, given in ``hparams``) change it, for
bf16/fp16 params: ``master_weights`` adds the fp32 master (read and written: 8 B) and keeps
the states in fp32; ``kahan_summation`` adds the compensation (read and written, the param's
dtype); ``stochastic_rounding`` moves nothing more; ``state_dtype`` sets the states' size:
``"8bit"`` states are a byte per element and a float32 absmax per 256 elements (1.015625 B;
the model is that of params large enough to have them, see
:mod:`fusedopt.kernels.quantization`). bf16 AdamW: 14 B plain, 30 B with master weights (p
and g, the master, fp32 m and v), 18 B with Kahan; fp32 AdamW with 8-bit states 16.0625 B.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Bytes per element of each dtype configuration name.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
            "half": "fp16", "float64": "fp64", "double": "fp64"}  # fmt: skip


def canonical_dtype(name: str) -> str:
    """Map ``float32``/``bfloat16``/... to the short names used everywhere (fp32, bf16, ...)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        from .workloads import UnknownNameError

        raise UnknownNameError("dtype", name, list(DTYPE_BYTES))
    return key


def element_wise_specs() -> dict[str, type]:
    """fusedopt's element-wise optimizers (its FusedOptimizer specs on the skeleton), by name,
    in the order fusedopt exports them. Adafactor and Muon (whole-tensor updates on the tile
    kernels) and SparseAdam (the rows of sparse grads) are not among them: their traffic is
    not this model's."""
    import fusedopt

    return {name: cls for name in fusedopt.__all__
            if isinstance(cls := getattr(fusedopt, name), type)
            and issubclass(cls, fusedopt.FusedOptimizer) and cls is not fusedopt.FusedOptimizer
            and not cls.whole_tensors and cls.sparse_grads != "only"}


def state_buffers(optimizer: str, hparams: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Names of the param-sized state tensors an optimizer reads and writes each step, read
    off its fusedopt spec (the states its variant for ``hparams`` has: ``amsgrad``, SGD and
    RMSprop ``momentum``, RMSprop ``centered`` add buffers). Names are torch.optim's state keys.
    """
    specs = element_wise_specs()
    if optimizer not in specs:
        from .workloads import UnknownNameError

        raise UnknownNameError("optimizer", optimizer, list(specs))
    import torch

    from fusedopt.precision import OPTIONS

    # (the precision options change no state buffer; stochastic rounding would draw a seed)
    plain = {k: v for k, v in dict(hparams or {}).items() if k not in OPTIONS}
    opt = specs[optimizer]([torch.zeros(1)], **plain, backend="reference")
    return opt._variant_states(opt._group_flags(opt.param_groups[0]))


#: Optimizers the bytes model knows: every element-wise optimizer fusedopt has.
KNOWN = tuple(element_wise_specs())


def bytes_per_param(
    optimizer: str,
    dtype: str = "fp32",
    hparams: Mapping[str, Any] | None = None,
    *,
    grad_dtype: str | None = None,
    state_dtype: str | None = None,
) -> int | float:
    """Minimum bytes moved per parameter element by one step.

    ``dtype`` is the param dtype; grads and states default to the same dtype
    (as torch.optim creates them). Pass ``grad_dtype``/``state_dtype`` for mixed
    configurations, e.g. bf16 params with fp32 states.

    >>> bytes_per_param("AdamW", "fp32")
    28
    >>> bytes_per_param("AdamW", "bf16")
    14
    >>> bytes_per_param("SGD", "fp32", {"momentum": 0.9})
    20
    """
    p = DTYPE_BYTES[canonical_dtype(dtype)]
    g = DTYPE_BYTES[canonical_dtype(grad_dtype or dtype)]
    s, extra = _precision_sizes(dtype, hparams, state_dtype)
    n_states = len(state_buffers(optimizer, hparams))
    # p read+write, g read, each state and the precision mode's extra read+write
    return 2 * p + g + 2 * s * n_states + 2 * extra


def _precision_sizes(dtype: str, hparams: Mapping[str, Any] | None,
                     state_dtype: str | None = None) -> tuple[int | float, int]:
    """(bytes of a state element, bytes of the precision mode's extra state element) for
    params of ``dtype`` with the precision options in ``hparams`` (params large enough for
    8-bit states: their absmax adds 4 bytes per block)."""
    import dataclasses

    import torch

    from fusedopt.kernels import quantization
    from fusedopt.precision import precision_of, state_dtype_of

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                   "fp64": torch.float64}[canonical_dtype(dtype)]
    large = torch.empty(quantization.MIN_NUMEL, dtype=torch_dtype, device="meta")
    mode = precision_of(dict(hparams or {}), large, "bytes model")
    if state_dtype is not None:
        mode = dataclasses.replace(mode, state_dtype=state_dtype_of(canonical_dtype(state_dtype)))
    extra = sum(mode.dtype_of(name, torch_dtype).itemsize for name in mode.extras)
    state = mode.dtype_of("state", torch_dtype).itemsize
    return (state + 4 / quantization.BLOCK if mode.quantized else state), extra


def state_bytes_per_param(optimizer: str, dtype: str = "fp32",
                          hparams: Mapping[str, Any] | None = None) -> int | float:
    """Bytes of optimizer state kept per parameter element: the state buffers and the
    precision mode's extra one (scalars left out).

    >>> state_bytes_per_param("AdamW", "bf16", {"master_weights": True})
    12
    >>> state_bytes_per_param("AdamW", "fp32", {"state_dtype": "bf16"})
    4
    >>> state_bytes_per_param("AdamW", "fp32", {"state_dtype": "8bit"})
    2.03125
    """
    s, extra = _precision_sizes(dtype, hparams)
    return s * len(state_buffers(optimizer, hparams)) + extra


def describe(optimizer: str, hparams: Mapping[str, Any] | None = None) -> str:
    """Human-readable traffic, e.g. ``read p,g,exp_avg,exp_avg_sq; write p,exp_avg,exp_avg_sq``."""
    st = state_buffers(optimizer, hparams)
    return f"read {','.join(('p', 'g', *st))}; write {','.join(('p', *st))}"


def resident_bytes_per_param(optimizer: str, dtype: str = "fp32",
                             hparams: Mapping[str, Any] | None = None) -> int | float:
    """Bytes per parameter element that a step touches: param, grad and each state buffer
    (and a precision mode's extra one), once each. Times the parameter count, it is the
    working set that has to fit in a cache for the step to run from it instead of from memory.

    >>> resident_bytes_per_param("AdamW", "fp32")
    16
    """
    size = DTYPE_BYTES[canonical_dtype(dtype)]
    return size * 2 + state_bytes_per_param(optimizer, dtype, hparams)
