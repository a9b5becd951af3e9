"""What selects one compiled kernel: :class:`Variant`. No triton here: the engine builds
variants where triton is not installed (the reference path runs them too)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fusedopt.kernels.algorithms import Algorithm


@dataclass(frozen=True)
class Variant:
    """Everything that selects a compiled kernel: the algorithm, the states this variant has
    (amsgrad adds one), its flag values, the storage dtype, and which AMP/clip inputs it
    takes. :func:`fusedopt.kernels.skeleton.constexprs` turns it into the kernels' constexpr
    arguments, for :func:`fusedopt.kernels.launch` and :mod:`fusedopt.kernels.codegen` alike."""

    algorithm: Algorithm
    states: tuple[str, ...]
    flags: tuple[bool, ...]
    dtype: torch.dtype
    unscale: bool = False
    skip_on_inf: bool = False
    clip: bool = False

    def __post_init__(self) -> None:
        alg = self.algorithm
        if [s for s in alg.states if s in self.states] != list(self.states):
            raise ValueError(f"{alg.name}: states {self.states} are not among {alg.states}, "
                             "in that order")
        if len(self.flags) != len(alg.flags):
            raise ValueError(f"{alg.name}: {len(self.flags)} flag values for {alg.flags}")

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
