"""torch.optim.lr_scheduler drives fusedopt unchanged: OneCycleLR (which also cycles Adam's
beta1), CosineAnnealingLR and a LambdaLR, with lr a float or a tensor, must give torch.optim's
trajectory. The kernels read lr and betas from param_groups at every step."""

import dataclasses

import pytest
import torch
from cases import (
    CASE_BY_ID,
    SMALL_SHAPES,
    TOL,
    assert_states_close,
    clone_params,
    flat,
    fresh_grads,
    make_params,
    set_grads,
)

import fusedopt
from fusedopt import kernels

STEPS = 10
SCHEDULERS = {
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.02, 0.05, 0.01], total_steps=STEPS),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=1e-4),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step),
}


GRID = [pytest.param(backend, case_id, scheduler, lr_kind,
                     id=f"{backend}-{case_id}-{scheduler}-{lr_kind}")
        for backend in ("reference", "triton")
        for case_id in ("adamw-default", "sgd-nesterov", "nadam-default",
                        "rmsprop-momentum-centered-wd")
        for scheduler in SCHEDULERS for lr_kind in ("float-lr", "tensor-lr")
        # the kernels (slow under the interpreter): each scheduler and lr kind once
        if backend == "reference" or case_id == ("adamw-default", "nadam-default")[
            lr_kind == "tensor-lr"]]


@pytest.mark.parametrize(("backend", "case_id", "scheduler", "lr_kind"), GRID)
def test_scheduler_matches_torch(backend, case_id, scheduler, lr_kind, request):
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    case = dataclasses.replace(CASE_BY_ID[case_id], lr_tensor=lr_kind == "tensor-lr")
    ours = make_params(SMALL_SHAPES, torch.float64, device=device)
    theirs = clone_params(ours)
    opt = case.make_fused(ours, backend)
    ref = case.make_torch(theirs)
    scheds = [SCHEDULERS[scheduler](o) for o in (opt, ref)]
    seen = []
    for step in range(STEPS):
        grads = fresh_grads(flat(ours), step, skip=None)
        set_grads(flat(ours), grads)
        set_grads(flat(theirs), grads)
        seen.append([float(g["lr"]) for g in opt.param_groups])
        before = kernels.launch_count() if backend == "triton" else None
        opt.step()
        if before is not None:  # a changing lr costs no extra launch
            assert kernels.launch_count() - before == len(opt._buckets)
        ref.step()
        for s in scheds:
            s.step()
        assert_states_close(opt, flat(ours), ref, flat(theirs), **TOL[torch.float64],
                            msg=f"step {step}:")
    assert len({tuple(lrs) for lrs in seen}) > STEPS // 2, "the lr barely changed"
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == (lr_kind == "tensor-lr")
    assert isinstance(opt, fusedopt.FusedOptimizer)
