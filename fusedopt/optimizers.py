"""The optimizers: each a small spec on :class:`fusedopt.engine.FusedOptimizer`.

Each class subclasses its torch.optim twin, so name, signature, defaults, validation messages,
``state`` keys and ``state_dict`` layout are torch's own, and ``isinstance(opt, torch.optim.X)``
holds; only ``step`` (and the checks around loading state) come from the engine. The names a
spec gives (hyperparameters, flags, states) are those of its algorithm's declaration in
:mod:`fusedopt.kernels.algorithms`; the engine checks them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedopt.engine import FusedOptimizer
from fusedopt.kernels import algorithms


def _maximize(group: dict) -> bool:
    return bool(group.get("maximize", False))


def _adam_hyperparams(group: dict) -> dict[str, float | Tensor]:
    """lr, betas, eps and weight decay: the numbers the Adam family's kernels read first.
    lr and betas may be tensors (as torch allows): the engine reads them without a sync."""
    beta1, beta2 = group["betas"]
    return {"lr": group["lr"], "beta1": beta1, "beta2": beta2,
            "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}


class _AdamSpec(FusedOptimizer):
    """Adam and AdamW share one update; AdamW only decouples weight decay."""

    torch_options = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                     "decoupled_weight_decay")
    algorithm = algorithms.ADAM
    _decoupled_default = False

    def _hyperparams(self, group: dict) -> dict[str, float]:
        return _adam_hyperparams(group)

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group),
                "amsgrad": bool(group.get("amsgrad", False)),
                "decoupled_weight_decay": bool(group.get("decoupled_weight_decay",
                                                         self._decoupled_default))}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if flags["amsgrad"] else names


class Adam(_AdamSpec, torch.optim.Adam):
    """torch.optim.Adam, one fused multi-tensor Triton launch per step.

    Same arguments as :class:`torch.optim.Adam`, plus ``backend`` ("auto", "triton" or
    "reference"; default: $FUSEDOPT_BACKEND, else "auto"). ``foreach=True``, ``fused=False``
    and ``differentiable=True`` are refused with an error; ``capturable=True`` makes the step
    free of host synchronisation, for CUDA graphs (see :meth:`FusedOptimizer.step`).
    See :func:`fusedopt.reference.adam` for the math.
    """


class AdamW(_AdamSpec, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay), one fused multi-tensor Triton launch per step.

    Same arguments as :class:`torch.optim.AdamW`, plus ``backend`` (see :class:`Adam`).
    """

    _decoupled_default = True


class SGD(FusedOptimizer, torch.optim.SGD):
    """torch.optim.SGD (momentum, dampening, Nesterov), one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.SGD`, plus ``backend`` (see :class:`Adam`). Sparse
    grads (``nn.Embedding(sparse=True)``) are taken as torch takes them (without weight decay,
    on which torch fails too): without momentum one more launch updates the rows they hold;
    with momentum, which decays every row, the grad is densified into the dense launch and
    the buffer kept dense (``state_dict()`` gives it sparse, as torch keeps it).
    See :func:`fusedopt.reference.sgd` for the math.
    """

    torch_options = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    algorithm = algorithms.SGD
    sparse_grads = "rows"

    def _check_sparse_group(self, group: dict) -> None:
        if group["weight_decay"] != 0:
            raise RuntimeError("fusedopt.SGD: weight_decay with a sparse gradient; "
                               "torch.optim.SGD fails on it too (add(sparse, dense) is not "
                               "supported)")

    def _sparse_as_dense(self, group: dict) -> bool:
        # torch's momentum buffer is then a sparse tensor whose rows grow to every row ever
        # touched, all decayed each step: the dense update on the densified grad gives the same
        # values (zeros where torch's buffer has no row)
        return group["momentum"] != 0

    def state_dict(self) -> dict[str, Any]:
        """torch's format: the momentum buffer of a param whose last grad was sparse is a
        sparse tensor, as torch keeps it (which torch's Nesterov step needs: it adds it to
        the sparse grad)."""
        saved = super().state_dict()
        marks = self.__dict__.get("_sparse_dims")
        if marks:
            params = [p for group in self.param_groups for p in group["params"]]
            for index, p in enumerate(params):
                state = saved["state"].get(index)
                buffer = state.get("momentum_buffer") if state else None
                if p in marks and isinstance(buffer, Tensor) and buffer.layout == torch.strided:
                    state["momentum_buffer"] = buffer.to_sparse(marks[p])
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader; a sparse momentum buffer (torch's, after sparse grads) is loaded
        dense, with the same values."""
        states = state_dict.get("state")
        if isinstance(states, dict) and any(
                isinstance(v, Tensor) and v.layout == torch.sparse_coo
                for s in states.values() if isinstance(s, dict) for v in s.values()):
            state_dict = {**state_dict, "state": {
                k: {n: v.to_dense() if isinstance(v, Tensor) and v.layout == torch.sparse_coo
                    else v for n, v in s.items()} if isinstance(s, dict) else s
                for k, s in states.items()}}
        super().load_state_dict(state_dict)


    def _hyperparams(self, group: dict) -> dict[str, float]:
        return {"lr": group["lr"], "momentum": float(group["momentum"]),
                "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group),
                "has_momentum": group["momentum"] != 0,
                "nesterov": bool(group["nesterov"])}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("momentum_buffer",) if flags["has_momentum"] else ()


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    """torch.optim.Adagrad, one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.Adagrad`, plus ``backend`` (see :class:`Adam`).
    Sparse grads are taken as torch takes them (without weight decay): one more launch
    updates the rows they hold. See :func:`fusedopt.reference.adagrad` for the math.
    """

    torch_options = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps",
                     "maximize")
    algorithm = algorithms.ADAGRAD
    sparse_grads = "rows"

    def _check_sparse_group(self, group: dict) -> None:
        if group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")


    def _hyperparams(self, group: dict) -> dict[str, float]:
        return {"lr": group["lr"], "lr_decay": float(group["lr_decay"]),
                "weight_decay": float(group["weight_decay"]), "eps": float(group["eps"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group)}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("sum",)

    def _state_init(self, name: str, group: dict) -> float:
        # torch starts every param's sum there, whatever its group (it reads self.defaults)
        return float(self.defaults["initial_accumulator_value"])


class Adadelta(FusedOptimizer, torch.optim.Adadelta):
    """torch.optim.Adadelta, one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.Adadelta`, plus ``backend`` (see :class:`Adam`).
    See :func:`fusedopt.reference.adadelta` for the math.
    """

    torch_options = ("lr", "rho", "eps", "weight_decay", "maximize")
    algorithm = algorithms.ADADELTA


    def _hyperparams(self, group: dict) -> dict[str, float]:
        return {"lr": group["lr"], "rho": float(group["rho"]),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group)}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """torch.optim.RMSprop (momentum, centered), one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.RMSprop`, plus ``backend`` (see :class:`Adam`).
    See :func:`fusedopt.reference.rmsprop` for the math.
    """

    torch_options = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
    algorithm = algorithms.RMSPROP


    def _hyperparams(self, group: dict) -> dict[str, float]:
        return {"lr": group["lr"], "alpha": float(group["alpha"]),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"]),
                "momentum": float(group["momentum"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group), "has_momentum": group["momentum"] > 0,
                "centered": bool(group["centered"])}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("square_avg", *(("momentum_buffer",) if flags["has_momentum"] else ()),
                *(("grad_avg",) if flags["centered"] else ()))


class NAdam(FusedOptimizer, torch.optim.NAdam):
    """torch.optim.NAdam, one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.NAdam`, plus ``backend`` (see :class:`Adam`).
    ``mu_product`` is advanced on the device, in float32 next to ``step``.
    See :func:`fusedopt.reference.nadam` for the math.
    """

    torch_options = ("lr", "betas", "eps", "weight_decay", "momentum_decay",
                     "decoupled_weight_decay", "maximize")
    algorithm = algorithms.NADAM


    def _hyperparams(self, group: dict) -> dict[str, float]:
        return {**_adam_hyperparams(group), "momentum_decay": float(group["momentum_decay"])}

    def _scalar_init(self, name: str, group: dict) -> float:
        return 1.0 if name == "mu_product" else 0.0

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group),
                "decoupled_weight_decay": bool(group["decoupled_weight_decay"])}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")


class RAdam(FusedOptimizer, torch.optim.RAdam):
    """torch.optim.RAdam (rectified Adam), one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.RAdam`, plus ``backend`` (see :class:`Adam`).
    See :func:`fusedopt.reference.radam` for the math.
    """

    torch_options = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize")
    algorithm = algorithms.RADAM


    def _hyperparams(self, group: dict) -> dict[str, float]:
        return _adam_hyperparams(group)

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group),
                "decoupled_weight_decay": bool(group["decoupled_weight_decay"])}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")


class Adamax(FusedOptimizer, torch.optim.Adamax):
    """torch.optim.Adamax, one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.Adamax`, plus ``backend`` (see :class:`Adam`).
    See :func:`fusedopt.reference.adamax` for the math.
    """

    torch_options = ("lr", "betas", "eps", "weight_decay", "maximize")
    algorithm = algorithms.ADAMAX


    def _hyperparams(self, group: dict) -> dict[str, float]:
        return _adam_hyperparams(group)

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group)}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")


class Rprop(FusedOptimizer, torch.optim.Rprop):
    """torch.optim.Rprop, one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.Rprop`, plus ``backend`` (see :class:`Adam`).
    ``step_size`` starts at the group's lr, as torch's. See :func:`fusedopt.reference.rprop`.
    """

    torch_options = ("lr", "etas", "step_sizes", "maximize")
    algorithm = algorithms.RPROP

    def _hyperparams(self, group: dict) -> dict[str, float]:
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        return {"etaminus": float(etaminus), "etaplus": float(etaplus),
                "step_size_min": float(step_size_min), "step_size_max": float(step_size_max)}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group)}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("prev", "step_size")

    def _state_init(self, name: str, group: dict) -> float:
        return float(group["lr"]) if name == "step_size" else 0.0


class ASGD(FusedOptimizer, torch.optim.ASGD):
    """torch.optim.ASGD, one fused multi-tensor launch per step.

    Same arguments as :class:`torch.optim.ASGD`, plus ``backend`` (see :class:`Adam`). The
    per-param ``eta`` and ``mu`` are float32 scalars advanced on the device, next to ``step``.
    See :func:`fusedopt.reference.asgd` for the math.
    """

    torch_options = ("lr", "lambd", "alpha", "t0", "weight_decay", "maximize")
    algorithm = algorithms.ASGD

    def _hyperparams(self, group: dict) -> dict[str, float]:
        return {"lr": group["lr"], "lambd": float(group["lambd"]),
                "alpha": float(group["alpha"]), "t0": float(group["t0"]),
                "weight_decay": float(group["weight_decay"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group)}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("ax",)

    def _scalar_init(self, name: str, group: dict) -> float:
        return {"eta": float(group["lr"]), "mu": 1.0}.get(name, 0.0)


class SparseAdam(FusedOptimizer, torch.optim.SparseAdam):
    """torch.optim.SparseAdam: one launch per step over the rows every sparse grad holds
    (:mod:`fusedopt.kernels.sparse`), whatever the number of params.

    Same arguments as :class:`torch.optim.SparseAdam`, plus ``backend`` (see :class:`Adam`).
    Sparse grads only, as torch. ``state_dict()`` saves ``step`` as an int, as torch does
    (it is a float32 device scalar between steps). See :func:`fusedopt.reference.sparse_adam`
    for the math.
    """

    precision_modes = False  # not element-wise: see fusedopt.precision

    torch_options = ("lr", "betas", "eps", "maximize")
    algorithm = algorithms.SPARSE_ADAM
    sparse_grads = "only"
    dense_grad_error = "SparseAdam does not support dense gradients, please consider Adam instead"

    def _hyperparams(self, group: dict) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return {"lr": group["lr"], "beta1": float(beta1), "beta2": float(beta2),
                "eps": float(group["eps"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group)}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def state_dict(self) -> dict[str, Any]:
        saved = super().state_dict()
        for state in saved["state"].values():
            if isinstance(state.get("step"), Tensor):
                state["step"] = int(state["step"].item())
        return saved


class Adafactor(FusedOptimizer, torch.optim.Adafactor):
    """torch.optim.Adafactor, four multi-tensor tile launches per step (three for a bucket of
    vectors), whatever the number of tensors.

    Same arguments as :class:`torch.optim.Adafactor`, plus ``backend`` (see :class:`Adam`).
    Params of 2 or more dims keep torch's factored ``row_var`` and ``col_var`` (over the last
    two dims), the others ``variance``; as torch, ``eps=(None, ...)`` takes the machine
    epsilon of the group's first param with a grad. Launches: the sums of g^2 by row and by
    column and ||theta||^2; the new factors and their means; ||U||^2; the update. See
    :func:`fusedopt.reference.adafactor` for the math.
    """

    precision_modes = False  # not element-wise: see fusedopt.precision

    torch_options = ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize")
    algorithm = algorithms.ADAFACTOR
    whole_tensors = True

    def _hyperparams(self, group: dict) -> dict[str, float]:
        eps1, eps2 = group["eps"]
        if eps1 is None:
            # (a loaded group lists param ids, not params: any dtype will do for its checks)
            dtype = next((p.dtype for p in group["params"]
                          if isinstance(p, Tensor) and p.grad is not None),
                         torch.get_default_dtype())
            eps1 = torch.finfo(dtype).eps
        return {"lr": group["lr"], "beta2_decay": float(group["beta2_decay"]),
                "eps1": float(eps1), "eps2": float(eps2), "d": float(group["d"]),
                "weight_decay": float(group["weight_decay"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group)}

    def _param_kind(self, p: Tensor) -> str:
        return "factored" if p.dim() > 1 else "vector"

    def _state_names(self, flags: dict[str, bool], kind: str = "vector") -> tuple[str, ...]:
        return ("row_var", "col_var") if kind == "factored" else ("variance",)

    def _state_shape(self, name: str, p: Tensor) -> torch.Size:
        shape = list(p.shape)
        if name == "row_var":
            shape[-1] = 1
        elif name == "col_var":
            shape[-2] = 1
        return torch.Size(shape)

    def _check_update(self, p: Tensor, grad: Tensor, where: str) -> None:
        if p.is_complex():
            raise RuntimeError("Adafactor does not support complex parameters")
        if p.numel() == 0:
            # torch divides by RMS(U) over no elements (ZeroDivisionError); say why instead
            raise RuntimeError(f"fusedopt.Adafactor: {where} has no elements; torch.optim."
                               "Adafactor fails on it too (its update RMS divides by zero)")

    @property
    def launches_per_step(self) -> int:
        return 4

    def _triton_runner(self, variant, table, groups, fresh, device):
        from fusedopt.tiled import AdafactorRunner

        return AdafactorRunner(variant, table, groups, device)


class Muon(FusedOptimizer, torch.optim.Muon):
    """torch.optim.Muon: two multi-tensor tile launches per step around the Newton-Schulz
    iterations, which run batched over every matrix of the same shape (tall ones transposed
    to join the wide ones), in bf16 as torch's, 3 matmuls per iteration per batch.

    Same arguments as :class:`torch.optim.Muon`, plus ``backend`` (see :class:`Adam`). 2-D
    params only, as torch. See :func:`fusedopt.reference.muon` for the math.
    """

    precision_modes = False  # not element-wise: see fusedopt.precision

    torch_options = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                     "ns_steps", "adjust_lr_fn")
    algorithm = algorithms.MUON
    whole_tensors = True

    def _hyperparams(self, group: dict) -> dict[str, Any]:
        coefficients, steps = group["ns_coefficients"], group["ns_steps"]
        # torch raises these in its Newton-Schulz, at the step: here before any update
        if steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational "
                             "efficiency")
        if len(coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        return {"lr": group["lr"], "weight_decay": float(group["weight_decay"]),
                "momentum": float(group["momentum"]),
                "ns_coefficients": tuple(float(c) for c in coefficients),
                "eps": float(group["eps"]), "ns_steps": int(steps),
                "adjust_lr_fn": group["adjust_lr_fn"]}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"nesterov": bool(group["nesterov"])}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _check_update(self, p: Tensor, grad: Tensor, where: str) -> None:
        if p.is_complex():
            raise RuntimeError("Muon does not support complex parameters")
        if grad.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")

    @property
    def launches_per_step(self) -> int:
        return 2

    def _triton_runner(self, variant, table, groups, fresh, device):
        from fusedopt.tiled import MuonRunner

        return MuonRunner(variant, table, groups, device)


def _check_common(lr, betas, weight_decay) -> None:
    """torch.optim's checks and messages, for the optimizers torch does not have."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class Lion(FusedOptimizer):
    r"""Lion, "EvoLved Sign Momentum" (Chen et al., 2023, "Symbolic Discovery of Optimization
    Algorithms", Algorithm 2), one fused multi-tensor launch per step.

    .. math::
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1} - \eta\,(\mathrm{sign}(c_t) + \lambda\theta_{t-1}) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    Args: ``lr`` (default 1e-4, the paper suggests 3-10x smaller than AdamW's), ``betas``
    (default (0.9, 0.99)), ``weight_decay`` (decoupled, default 0; the paper suggests 3-10x
    AdamW's), ``maximize``, ``backend`` (see :class:`Adam`). State: ``exp_avg``.
    """

    algorithm = algorithms.LION

    def __init__(self, params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 kahan_summation: bool = False, state_dtype: torch.dtype | None = None,
                 backend: str | None = None):
        options = {"master_weights": master_weights, "stochastic_rounding": stochastic_rounding,
                   "kahan_summation": kahan_summation, "state_dtype": state_dtype}
        self._before_torch_init(backend, options)
        _check_common(lr, betas, weight_decay)
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                    "maximize": maximize}
        super().__init__(params, defaults)
        self._adopt_options(options)
        self._after_torch_init()

    def _hyperparams(self, group: dict) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return {"lr": group["lr"], "beta1": float(beta1), "beta2": float(beta2),
                "weight_decay": float(group["weight_decay"])}

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group)}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("exp_avg",)


class LAMB(FusedOptimizer):
    r"""LAMB, layer-wise adaptive moments (You et al., 2019, "Large Batch Optimization for Deep
    Learning: Training BERT in 76 minutes", Algorithm 2), two multi-tensor launches per step.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat m_t &= m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t)
        \quad\text{(if bias\_correction)} \\
        u_t &= \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda\theta_{t-1}, \quad
        \theta_t = \theta_{t-1} - \eta\,\frac{\|\theta_{t-1}\|}{\|u_t\|}\,u_t

    with the trust ratio taken per tensor, and 1 where either norm is 0. The first launch sums
    ``||theta||^2`` and ``||u||^2`` for every tensor at once; the second applies the update.

    Args: ``lr`` (1e-3), ``betas`` ((0.9, 0.999)), ``eps`` (1e-6), ``weight_decay`` (0.01,
    as NVIDIA apex's and timm's LAMB), ``bias_correction`` (True), ``maximize``, ``backend``.
    State: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    algorithm = algorithms.LAMB

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True, *,
                 maximize: bool = False, master_weights: bool = False,
                 stochastic_rounding: bool = False, kahan_summation: bool = False,
                 state_dtype: torch.dtype | None = None, backend: str | None = None):
        options = {"master_weights": master_weights, "stochastic_rounding": stochastic_rounding,
                   "kahan_summation": kahan_summation, "state_dtype": state_dtype}
        self._before_torch_init(backend, options)
        _check_common(lr, betas, weight_decay)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "bias_correction": bias_correction, "maximize": maximize}
        super().__init__(params, defaults)
        self._adopt_options(options)
        self._after_torch_init()

    def _hyperparams(self, group: dict) -> dict[str, float]:
        return _adam_hyperparams(group)

    def _flags(self, group: dict) -> dict[str, bool]:
        return {"maximize": _maximize(group), "bias_correction": bool(group["bias_correction"])}

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")
