"""The optimizers: each a small spec on :class:`fusedopt.engine.FusedOptimizer`.

Each class subclasses its torch.optim twin, so name, signature, defaults, validation messages,
``state`` keys and ``state_dict`` layout are torch's own, and ``isinstance(opt, torch.optim.X)``
holds; only ``step`` (and the checks around loading state) come from the engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt import reference
from fusedopt.engine import FusedOptimizer


class _AdamSpec(FusedOptimizer):
    """Adam and AdamW share one update; AdamW only decouples weight decay."""

    kernel_update = "adam"
    reference_update = staticmethod(reference.adam)
    uses_step = True
    _decoupled_default = False

    def _hyperparams(self, group: dict) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return {"lr": float(group["lr"]), "beta1": float(beta1), "beta2": float(beta2),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": bool(group.get("maximize", False)),
                "amsgrad": bool(group.get("amsgrad", False)),
                "decoupled_weight_decay": bool(group.get("decoupled_weight_decay",
                                                         self._decoupled_default))}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if flags["amsgrad"] else names


class Adam(_AdamSpec, torch.optim.Adam):
    """torch.optim.Adam, one fused multi-tensor Triton launch per step.

    Same arguments as :class:`torch.optim.Adam`, plus ``backend`` ("auto", "triton" or
    "reference"; default: $FUSEDOPT_BACKEND, else "auto"). ``foreach=True``, ``fused=False``,
    ``capturable=True`` and ``differentiable=True`` are refused with an error.
    See :func:`fusedopt.reference.adam` for the math.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 backend: str | None = None):
        self._init_engine(backend, foreach=foreach, fused=fused, capturable=capturable,
                          differentiable=differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._record_engine()


class AdamW(_AdamSpec, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay), one fused multi-tensor Triton launch per step.

    Same arguments as :class:`torch.optim.AdamW`, plus ``backend`` (see :class:`Adam`).
    """

    _decoupled_default = True

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None):
        self._init_engine(backend, foreach=foreach, fused=fused, capturable=capturable,
                          differentiable=differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._record_engine()


class SGD(FusedOptimizer, torch.optim.SGD):
    """torch.optim.SGD (momentum, dampening, Nesterov), one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.SGD`, plus ``backend`` (see :class:`Adam`).
    See :func:`fusedopt.reference.sgd` for the math.
    """

    kernel_update = "sgd"
    reference_update = staticmethod(reference.sgd)

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float | Tensor = 0, nesterov: bool = False,
                 *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None):
        self._init_engine(backend, foreach=foreach, fused=fused, differentiable=differentiable)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        self._record_engine()

    def _hyperparams(self, group: dict) -> dict[str, float]:
        return {"lr": float(group["lr"]), "momentum": float(group["momentum"]),
                "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": bool(group.get("maximize", False)),
                "has_momentum": group["momentum"] != 0,
                "nesterov": bool(group["nesterov"])}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("momentum_buffer",) if flags["has_momentum"] else ()
