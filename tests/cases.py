"""The one table that drives the optimizer tests, and the helpers that run it.

Each :class:`Case` is one optimizer class, its torch.optim twin and one hyperparameter setting,
with a readable id (``adam-amsgrad-wd``, ``sgd-maximize-lr-tensor``, ...). Every case is run
with three param groups: group 0 takes the case's own options, groups 1 and 2 override lr (and
betas/eps/weight decay, or momentum/dampening/weight decay), so that per-group hyperparameters
are always exercised. ``lr_tensor`` cases give every group a fresh 0-dim tensor lr.

The drivers here feed fresh random gradients every step, leave some grads None on some steps
(a deterministic pattern, so every param skips a step and then comes back), and compare
parameters *and* every state tensor, not just the loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch
from paper_optimizers import PaperLAMB, PaperLion

import fusedopt

# ---- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    fused_cls: type[torch.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    options: dict = field(default_factory=dict)  # group 0 / constructor defaults
    lr_tensor: bool = False
    groups: tuple[dict, ...] = ()  # overrides for groups 1, 2, ...

    @property
    def family(self) -> str:
        return "sgd" if self.torch_cls is torch.optim.SGD else "adam"

    def _lr(self, value: float, lr_dtype: torch.dtype):
        return torch.tensor(value, dtype=lr_dtype) if self.lr_tensor else value

    def defaults(self, lr_dtype: torch.dtype = torch.float32) -> dict:
        """Constructor keyword arguments (a fresh lr tensor each call when lr_tensor)."""
        opts = dict(self.options)
        if self.lr_tensor:
            opts["lr"] = self._lr(opts.get("lr", 1e-3), lr_dtype)
        return opts

    def param_groups(self, param_lists: Sequence[Sequence[torch.Tensor]],
                     lr_dtype: torch.dtype = torch.float32) -> list[dict]:
        """One dict per list of params: group 0 plain, then the case's group overrides."""
        groups = [{"params": list(param_lists[0])}]
        for i, params in enumerate(param_lists[1:]):
            override = dict(self.groups[i % len(self.groups)]) if self.groups else {}
            if "lr" in override:
                override["lr"] = self._lr(override["lr"], lr_dtype)
            groups.append({"params": list(params), **override})
        return groups

    def make(self, cls, param_lists, **extra) -> torch.optim.Optimizer:
        """``cls`` over the case's groups. A tensor lr is float64 for float64 params: torch
        computes lr / bias_correction in the lr tensor's dtype, so a float32 lr would round
        torch's float64 trajectory to float32 step sizes (see test_lr_tensor_dtype_rounding)."""
        first = param_lists[0][0]
        lr_dtype = (torch.float64 if first.dtype in (torch.float64, torch.complex128)
                    else torch.float32)
        return cls(self.param_groups(param_lists, lr_dtype), **self.defaults(lr_dtype),
                   **extra)

    def make_fused(self, param_lists, backend: str) -> torch.optim.Optimizer:
        return self.make(self.fused_cls, param_lists, backend=backend)

    def make_torch(self, param_lists) -> torch.optim.Optimizer:
        return self.make(self.torch_cls, param_lists, foreach=False)


def _adam_groups(lr: float, wd: float) -> tuple[dict, ...]:
    return ({"lr": lr * 2.5, "betas": (0.8, 0.99), "weight_decay": wd + 0.05},
            {"lr": lr * 0.4, "betas": (0.95, 0.9), "eps": 1e-6, "weight_decay": 0.0})


def _sgd_groups(lr: float, momentum: float, nesterov: bool) -> tuple[dict, ...]:
    g1 = {"lr": lr * 2.0, "weight_decay": 0.02}
    g2 = {"lr": lr * 0.5}
    if momentum:
        g1["momentum"] = 0.5
        if not nesterov:
            g2["dampening"] = 0.5
    return g1, g2


A, AW, S = fusedopt.Adam, fusedopt.AdamW, fusedopt.SGD
TA, TAW, TS = torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD

CASES: list[Case] = [
    Case("adam-default", A, TA, {}, groups=_adam_groups(1e-3, 0.0)),
    Case("adam-amsgrad-wd", A, TA, {"lr": 2e-2, "amsgrad": True, "weight_decay": 0.1},
         groups=_adam_groups(2e-2, 0.1)),
    Case("adam-maximize", A, TA, {"lr": 1e-2, "maximize": True, "betas": (0.8, 0.9)},
         groups=_adam_groups(1e-2, 0.0)),
    Case("adam-lr-tensor", A, TA, {"lr": 5e-3, "betas": (0.85, 0.98), "eps": 1e-7},
         lr_tensor=True, groups=_adam_groups(5e-3, 0.0)),
    Case("adam-decoupled-wd", A, TA, {"lr": 1e-2, "weight_decay": 0.2,
                                      "decoupled_weight_decay": True},
         groups=_adam_groups(1e-2, 0.2)),
    Case("adam-mixed-flags-groups", A, TA, {"lr": 1e-2},
         groups=({"amsgrad": True, "lr": 3e-2, "weight_decay": 0.05},
                 {"maximize": True, "lr": 5e-3})),
    Case("adamw-default", AW, TAW, {}, groups=_adam_groups(1e-3, 1e-2)),
    Case("adamw-amsgrad-maximize", AW, TAW, {"lr": 1e-2, "amsgrad": True, "maximize": True,
                                             "weight_decay": 0.1},
         groups=_adam_groups(1e-2, 0.1)),
    Case("adamw-lr-tensor-wd", AW, TAW, {"lr": 1e-2, "weight_decay": 0.3}, lr_tensor=True,
         groups=_adam_groups(1e-2, 0.3)),
    Case("sgd-plain", S, TS, {"lr": 0.05}, groups=_sgd_groups(0.05, 0, False)),
    Case("sgd-momentum-dampening-wd", S, TS, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3,
                                              "weight_decay": 0.01},
         groups=_sgd_groups(0.05, 0.9, False)),
    Case("sgd-nesterov", S, TS, {"lr": 0.03, "momentum": 0.9, "nesterov": True},
         groups=_sgd_groups(0.03, 0.9, True)),
    Case("sgd-maximize-lr-tensor", S, TS, {"lr": 0.02, "momentum": 0.7, "maximize": True,
                                           "weight_decay": 0.05},
         lr_tensor=True, groups=_sgd_groups(0.02, 0.7, False)),
    Case("sgd-mixed-flags-groups", S, TS, {"lr": 0.05},
         groups=({"momentum": 0.9, "nesterov": True, "lr": 0.02},
                 {"momentum": 0.5, "dampening": 0.1, "maximize": True})),
]


def _lr_groups(lr: float, **extra) -> tuple[dict, ...]:
    """Groups 1 and 2: another lr and weight decay, plus per-optimizer overrides in ``extra``
    (a dict per group under the keys "g1" and "g2")."""
    return ({"lr": lr * 2.0, "weight_decay": 0.05, **extra.get("g1", {})},
            {"lr": lr * 0.5, "weight_decay": 0.0, **extra.get("g2", {})})


F = fusedopt
CASES += [
    Case("adagrad-default", F.Adagrad, torch.optim.Adagrad, {}, groups=_lr_groups(1e-2)),
    Case("adagrad-decay-init-wd", F.Adagrad, torch.optim.Adagrad,
         {"lr": 0.05, "lr_decay": 0.02, "weight_decay": 0.1, "initial_accumulator_value": 0.3,
          "eps": 1e-8},
         groups=_lr_groups(0.05, g1={"lr_decay": 0.0}, g2={"eps": 1e-6})),
    Case("adagrad-maximize-lr-tensor", F.Adagrad, torch.optim.Adagrad,
         {"lr": 0.03, "maximize": True, "weight_decay": 0.02}, lr_tensor=True,
         groups=_lr_groups(0.03, g2={"maximize": False})),
    Case("adadelta-default", F.Adadelta, torch.optim.Adadelta, {}, groups=_lr_groups(1.0)),
    Case("adadelta-rho-wd-maximize", F.Adadelta, torch.optim.Adadelta,
         {"lr": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 0.1, "maximize": True},
         groups=_lr_groups(0.5, g1={"rho": 0.95})),
    Case("adadelta-lr-tensor", F.Adadelta, torch.optim.Adadelta, {"lr": 0.7}, lr_tensor=True,
         groups=_lr_groups(0.7, g2={"eps": 1e-4})),
    Case("rmsprop-default", F.RMSprop, torch.optim.RMSprop, {}, groups=_lr_groups(1e-2)),
    Case("rmsprop-momentum-centered-wd", F.RMSprop, torch.optim.RMSprop,
         {"lr": 5e-3, "alpha": 0.9, "momentum": 0.8, "centered": True, "weight_decay": 0.1},
         groups=_lr_groups(5e-3, g1={"alpha": 0.95})),
    Case("rmsprop-centered-maximize-lr-tensor", F.RMSprop, torch.optim.RMSprop,
         {"lr": 1e-2, "centered": True, "maximize": True, "eps": 1e-6}, lr_tensor=True,
         groups=_lr_groups(1e-2)),
    Case("rmsprop-mixed-flags-groups", F.RMSprop, torch.optim.RMSprop, {"lr": 1e-2},
         groups=_lr_groups(1e-2, g1={"momentum": 0.9}, g2={"centered": True, "momentum": 0.5})),
    Case("nadam-default", F.NAdam, torch.optim.NAdam, {}, groups=_adam_groups(2e-3, 0.0)),
    Case("nadam-wd-momentum-decay", F.NAdam, torch.optim.NAdam,
         {"lr": 1e-2, "weight_decay": 0.1, "momentum_decay": 0.01},
         groups=_adam_groups(1e-2, 0.1)),
    Case("nadam-decoupled-maximize-lr-tensor", F.NAdam, torch.optim.NAdam,
         {"lr": 1e-2, "weight_decay": 0.2, "decoupled_weight_decay": True, "maximize": True},
         lr_tensor=True, groups=_adam_groups(1e-2, 0.2)),
    Case("radam-default", F.RAdam, torch.optim.RAdam, {}, groups=_adam_groups(1e-3, 0.0)),
    Case("radam-wd", F.RAdam, torch.optim.RAdam, {"lr": 1e-2, "weight_decay": 0.1},
         groups=_adam_groups(1e-2, 0.1)),
    Case("radam-decoupled-maximize-lr-tensor", F.RAdam, torch.optim.RAdam,
         {"lr": 1e-2, "weight_decay": 0.2, "decoupled_weight_decay": True, "maximize": True,
          "betas": (0.9, 0.9)},
         lr_tensor=True, groups=_adam_groups(1e-2, 0.2)),
    Case("adamax-default", F.Adamax, torch.optim.Adamax, {}, groups=_adam_groups(2e-3, 0.0)),
    Case("adamax-wd-maximize", F.Adamax, torch.optim.Adamax,
         {"lr": 1e-2, "weight_decay": 0.1, "maximize": True, "eps": 1e-4},
         groups=_adam_groups(1e-2, 0.1)),
    Case("adamax-lr-tensor", F.Adamax, torch.optim.Adamax, {"lr": 5e-3, "betas": (0.8, 0.99)},
         lr_tensor=True, groups=_adam_groups(5e-3, 0.0)),
    Case("lion-default", F.Lion, PaperLion, {}, groups=_lr_groups(1e-4)),
    Case("lion-wd-maximize", F.Lion, PaperLion,
         {"lr": 1e-3, "betas": (0.95, 0.98), "weight_decay": 0.5, "maximize": True},
         groups=_lr_groups(1e-3, g1={"betas": (0.8, 0.9)})),
    Case("lion-lr-tensor", F.Lion, PaperLion, {"lr": 3e-4, "weight_decay": 0.1},
         lr_tensor=True, groups=_lr_groups(3e-4)),
    Case("lamb-default", F.LAMB, PaperLAMB, {}, groups=_adam_groups(1e-3, 0.01)),
    Case("lamb-no-bias-correction-maximize", F.LAMB, PaperLAMB,
         {"lr": 1e-2, "bias_correction": False, "maximize": True, "weight_decay": 0.0},
         groups=_adam_groups(1e-2, 0.0)),
    Case("lamb-lr-tensor-wd", F.LAMB, PaperLAMB, {"lr": 5e-3, "weight_decay": 0.1},
         lr_tensor=True, groups=({"lr": 0.01, "bias_correction": False, "weight_decay": 0.2},
                                 {"lr": 0.002, "eps": 1e-8, "weight_decay": 0.0})),
]

CASES += [
    Case("rprop-default", F.Rprop, torch.optim.Rprop, {},
         groups=({"lr": 0.02, "etas": (0.3, 1.5)}, {"lr": 0.005, "step_sizes": (1e-4, 0.02)})),
    Case("rprop-maximize-lr-tensor", F.Rprop, torch.optim.Rprop,
         {"lr": 0.01, "etas": (0.4, 1.3), "step_sizes": (1e-5, 0.1), "maximize": True},
         lr_tensor=True, groups=({"lr": 0.03}, {"lr": 0.002, "maximize": False})),
    Case("asgd-default", F.ASGD, torch.optim.ASGD, {}, groups=_lr_groups(1e-2)),
    Case("asgd-t0-wd-maximize", F.ASGD, torch.optim.ASGD,
         {"lr": 0.05, "lambd": 1e-2, "alpha": 0.6, "t0": 3, "weight_decay": 0.1,
          "maximize": True},
         groups=_lr_groups(0.05, g1={"lambd": 1e-3, "t0": 1}, g2={"alpha": 0.9})),
    Case("asgd-lr-tensor", F.ASGD, torch.optim.ASGD, {"lr": 0.02, "t0": 2}, lr_tensor=True,
         groups=_lr_groups(0.02)),
]

CASE_BY_ID = {c.id: c for c in CASES}

#: one representative case per optimizer class, for the costlier checks
ONE_PER_OPTIMIZER = ("adam-amsgrad-wd", "adamw-default", "sgd-momentum-dampening-wd",
                     "adagrad-decay-init-wd", "adadelta-rho-wd-maximize",
                     "rmsprop-momentum-centered-wd", "nadam-wd-momentum-decay", "radam-wd",
                     "adamax-wd-maximize", "lion-wd-maximize", "lamb-default",
                     "rprop-default", "asgd-t0-wd-maximize")


#: the cases the costlier interpreter checks run (the interpreter is slow; the reference
#: checks and the fp32 kernel check run every case): one per optimizer, plus the groups that
#: mix variant flags and a tensor lr
CORE = tuple(dict.fromkeys([*ONE_PER_OPTIMIZER, "adam-mixed-flags-groups",
                            "sgd-mixed-flags-groups", "adamw-lr-tensor-wd", "sgd-nesterov"]))


def case_grid(every_case: Sequence[torch.dtype], core_cases: Sequence[torch.dtype] = (),
              one_per_optimizer: Sequence[torch.dtype] = ()) -> list:
    """pytest params of (case, dtype): every case in ``every_case`` dtypes, the CORE cases in
    ``core_cases`` dtypes, one case per optimizer in ``one_per_optimizer`` dtypes."""
    grid = [(c, d) for c in CASES for d in every_case]
    grid += [(CASE_BY_ID[i], d) for i in CORE for d in core_cases]
    grid += [(CASE_BY_ID[i], d) for i in ONE_PER_OPTIMIZER for d in one_per_optimizer]
    return [pytest.param(c, d, id=f"{c.id}-{dtype_id(d)}") for c, d in grid]


def cases(*ids: str) -> list:
    """pytest params for the given case ids (all cases when none are given)."""
    chosen = [CASE_BY_ID[i] for i in ids] if ids else CASES
    return [pytest.param(c, id=c.id) for c in chosen]


# ---- sizes --------------------------------------------------------------------------------------

# reference vs torch: the full odd sizes, an empty tensor and a 2-D shape, over three groups
FULL_SHAPES: tuple[tuple[tuple[int, ...], ...], ...] = (
    ((1,), (4097,), (0,)),
    ((3,), (65537,)),
    ((1023,), (33, 17)),
)
# interpreter: small, but crossing the 4096-element chunk (4097), exact full chunks (8192, the
# unmasked path), sizes whose bytes are no multiple of 16 (1, 3, 1023, 4097), and an empty one
SMALL_SHAPES: tuple[tuple[tuple[int, ...], ...], ...] = (
    ((1,), (4097,), (0,)),
    ((3,), (8192,)),
    ((1023,), (5, 7)),
)
COMPLEX_SHAPES: tuple[tuple[tuple[int, ...], ...], ...] = (((1,), (0,)), ((3,), (1023,)),
                                                           ((7, 5),))

TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.complex128: {"rtol": 1e-12, "atol": 1e-14},
    torch.complex64: {"rtol": 1e-5, "atol": 1e-6},
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- driving optimizers side by side ------------------------------------------------------------


def make_params(shapes, dtype: torch.dtype, seed: int = 0,
                device: str | torch.device = "cpu") -> list[list[torch.Tensor]]:
    """Random params per group; float64 draws cast to ``dtype`` so all dtypes share values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for group_shapes in shapes:
        group = []
        for shape in group_shapes:
            real = dtype.to_real() if dtype.is_complex else dtype
            draw = torch.randn(*shape, *((2,) if dtype.is_complex else ()),
                               generator=gen, dtype=torch.float64)
            t = torch.view_as_complex(draw.to(real)) if dtype.is_complex else draw.to(dtype)
            group.append(t.to(device).requires_grad_())
        out.append(group)
    return out


def clone_params(param_lists) -> list[list[torch.Tensor]]:
    return [[p.detach().clone().requires_grad_() for p in group] for group in param_lists]


def flat(param_lists) -> list[torch.Tensor]:
    return [p for group in param_lists for p in group]


def has_grad(step: int, index: int) -> bool:
    """Every param misses its grad on one step in five (param 4 on the very first step)."""
    return (step + index) % 5 != 4


def fresh_grads(params: Sequence[torch.Tensor], step: int, seed: int = 1,
                skip: Callable[[int, int], bool] | None = has_grad) -> list[torch.Tensor | None]:
    """New random grads for this step (None where ``skip`` says so), with per-param scales."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    grads: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        real = p.dtype.to_real() if p.dtype.is_complex else p.dtype
        shape = (*p.shape, 2) if p.dtype.is_complex else p.shape
        scale = 10.0 ** (torch.rand((), generator=gen, dtype=torch.float64).item() * 3 - 2)
        g = torch.randn(tuple(shape), generator=gen, dtype=torch.float64).mul_(scale).to(real)
        if p.dtype.is_complex:
            g = torch.view_as_complex(g)
        g = g.to(p.device)
        grads.append(g if skip is None or skip(step, i) else None)
    return grads


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach().clone().to(p.device)


def assert_tensor_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float,
                        where: str = "") -> None:
    """assert_close with ``atol`` relative to the expected tensor's scale (its max |value|),
    so that small state tensors (exp_avg_sq ~ 1e-7) are compared as strictly as params."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1e-30),
                               msg=lambda m: f"{where}: {m}")


def assert_states_close(opt_a, params_a, opt_b, params_b, rtol: float, atol: float,
                        msg: str = "") -> None:
    """Params equal, and for each param the same state keys, values, step counts."""
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        where = f"{msg} param {i} shape {tuple(pa.shape)}"
        assert_tensor_close(pa, pb, rtol, atol, where)
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert list(sa) == list(sb), f"{where}: state keys {list(sa)} != {list(sb)}"
        for key in sa:
            va, vb = sa[key], sb[key]
            if key == "step":
                assert float(va) == float(vb), f"{where}: step {float(va)} != {float(vb)}"
                continue
            assert_tensor_close(va, vb, rtol, atol, f"{where} state {key}")


def run_side_by_side(opt_a, params_a, opt_b, params_b, steps: int, tol: dict, seed: int = 1,
                     skip=has_grad, check_every_step: bool = True, before_step=None) -> None:
    """Step two optimizers on identical fresh grads and compare after each step."""
    for step in range(steps):
        grads = fresh_grads(params_a, step, seed=seed, skip=skip)
        set_grads(params_a, grads)
        set_grads(params_b, grads)
        if before_step is not None:
            before_step(step)
        opt_a.step()
        opt_b.step()
        if check_every_step or step == steps - 1:
            assert_states_close(opt_a, params_a, opt_b, params_b, **tol, msg=f"step {step}:")


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """A deep copy of an optimizer's state_dict, to compare against later."""
    return copy.deepcopy(opt.state_dict())


def snapshot_all(opt: torch.optim.Optimizer, params) -> tuple[dict, list[torch.Tensor]]:
    """The optimizer's state_dict and the params' values, to check nothing changed."""
    return snapshot(opt), [p.detach().clone() for p in params]


def assert_unchanged(opt: torch.optim.Optimizer, params, before: tuple) -> None:
    state, values = before
    assert_snapshots_equal(snapshot(opt), state)
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))


def assert_snapshots_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"] or _groups_equal(a, b)
    assert list(a["state"]) == list(b["state"])
    for k in a["state"]:
        assert list(a["state"][k]) == list(b["state"][k])
        for name, va in a["state"][k].items():
            vb = b["state"][k][name]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), (k, name)
            else:
                assert va == vb, (k, name)


def _groups_equal(a: dict, b: dict) -> bool:
    for ga, gb in zip(a["param_groups"], b["param_groups"]):
        if list(ga) != list(gb):
            return False
        for key in ga:
            va, vb = ga[key], gb[key]
            same = (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb)
            if not same:
                return False
    return len(a["param_groups"]) == len(b["param_groups"])
