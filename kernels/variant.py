"""What selects one compiled kernel: :class:`Variant`, with its :class:`Precision`. No triton
here: the engine builds variants where triton is not installed (the reference path runs them
too)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from fusedopt.kernels import quantization
from fusedopt.kernels.algorithms import Algorithm

#: The extra state tensors a precision mode keeps next to the algorithm's, by name.
MASTER = "master_param"
KAHAN = "kahan_comp"
#: The ``state_dtype`` of 8-bit states: codes in uint8, an fp32 absmax per block
#: (:mod:`fusedopt.kernels.quantization`).
QUANTIZED = torch.uint8


@dataclass(frozen=True)
class Precision:
    """How a bucket keeps its numbers, beyond the param's dtype.

    * ``state_dtype``: the storage dtype of the algorithm's states; None: the param's (float32
      with a master copy); :data:`QUANTIZED` (uint8): block-wise 8-bit codes, each state with
      its float32 ``<state>_absmax`` per block (:mod:`fusedopt.kernels.quantization`).
    * ``write``: how the updated param is stored:

      - ``"nearest"``: rounded to nearest even (torch's way);
      - ``"master"``: an fp32 copy (state ``master_param``) is what the update reads and
        writes; the param is its round-to-nearest-even value;
      - ``"stochastic"``: rounded to bf16 stochastically (unbiased: up with probability
        equal to the distance from the value below, in ulps);
      - ``"kahan"``: param + ``kahan_comp`` (both in the param's dtype) is the value the
        update reads; the new value ``x`` is stored as ``p = round(x)`` and
        ``kahan_comp = round(x - p)``, so the pair keeps about twice bf16's bits (an fp16
        compensation underflows into subnormals for params below about 2**-4).
    """

    state_dtype: torch.dtype | None = None
    write: str = "nearest"

    def __post_init__(self) -> None:
        if self.write not in ("nearest", "master", "stochastic", "kahan"):
            raise ValueError(f"unknown write mode {self.write!r}")

    @property
    def extras(self) -> tuple[str, ...]:
        """The extra state tensors this mode keeps (after the algorithm's states)."""
        return {"master": (MASTER,), "kahan": (KAHAN,)}.get(self.write, ())

    @property
    def quantized(self) -> bool:
        """Whether the algorithm's states are kept in 8 bits."""
        return self.state_dtype == QUANTIZED

    def dtype_of(self, name: str, param_dtype: torch.dtype) -> torch.dtype:
        """The storage dtype of ``name`` ("param", a state, an extra or an absmax) for params
        of ``param_dtype``."""
        if name == MASTER or name.endswith(quantization.ABSMAX_SUFFIX):
            return torch.float32
        if name in ("param", KAHAN):
            return param_dtype
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if self.write == "master" else param_dtype


@dataclass(frozen=True)
class Variant:
    """Everything that selects a compiled kernel: the algorithm, the states this variant has
    (amsgrad adds one), its flag values, the param's storage dtype, its precision mode, and
    which AMP/clip inputs it takes. :func:`fusedopt.kernels.skeleton.constexprs` turns it
    into the kernels' constexpr arguments, for :func:`fusedopt.kernels.launch` and
    :mod:`fusedopt.kernels.codegen` alike."""

    algorithm: Algorithm
    states: tuple[str, ...]
    flags: tuple[bool, ...]
    dtype: torch.dtype
    unscale: bool = False
    skip_on_inf: bool = False
    clip: bool = False
    precision: Precision = field(default_factory=Precision)

    def __post_init__(self) -> None:
        alg = self.algorithm
        if [s for s in alg.states if s in self.states] != list(self.states):
            raise ValueError(f"{alg.name}: states {self.states} are not among {alg.states}, "
                             "in that order")
        if len(self.flags) != len(alg.flags):
            raise ValueError(f"{alg.name}: {len(self.flags)} flag values for {alg.flags}")
        if self.precision.quantized and not quantization.quantizable(self.states):
            raise ValueError(f"{alg.name}: states {self.states} cannot be kept in 8 bits")

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every state tensor of a param, in table order: the element-wise ones
        (:attr:`element_tensors`), then the absmax of each 8-bit state (:attr:`scales`)."""
        return self.element_tensors + self.scales

    @property
    def element_tensors(self) -> tuple[str, ...]:
        """The state tensors shaped as the param: the algorithm's, then the precision mode's
        extra one (if any)."""
        return self.states + self.precision.extras

    @property
    def scales(self) -> tuple[str, ...]:
        """The per-block absmax of each of the algorithm's states kept in 8 bits."""
        if not self.precision.quantized:
            return ()
        return tuple(quantization.absmax_name(s) for s in self.states)

    @property
    def unsigned(self) -> tuple[bool, ...]:
        """For each of the algorithm's states, whether it is never negative (its 8-bit code
        is the unsigned one)."""
        return tuple(s in quantization.UNSIGNED_STATES for s in self.states)

    @property
    def state_storage(self) -> torch.dtype:
        """The storage dtype of the algorithm's states."""
        return self.precision.dtype_of("state", self.dtype)

    def dtype_of(self, name: str) -> torch.dtype:
        """The storage dtype of ``name``: "param" (and its grad), a state, or an extra."""
        return self.precision.dtype_of(name, self.dtype)

    @property
    def mixed(self) -> bool:
        """Whether some state is stored in another dtype than the param."""
        return any(self.dtype_of(name) != self.dtype for name in self.element_tensors)

    @property
    def compute(self) -> torch.dtype:
        """The opmath dtype: float64 for float64 storage, else float32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def finishes(self) -> bool:
        """Whether a tensor's last program has per-tensor values to store."""
        return bool(self.algorithm.scalars or self.algorithm.sums)

    def with_amp(self, unscale: bool, skip_on_inf: bool, clip: bool) -> Variant:
        """This variant launched with (or without) AMP's and clipping's inputs."""
        if (unscale, skip_on_inf, clip) == (self.unscale, self.skip_on_inf, self.clip):
            return self
        return replace(self, unscale=unscale, skip_on_inf=skip_on_inf, clip=clip)
