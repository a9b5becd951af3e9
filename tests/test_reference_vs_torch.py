"""Check 1: the reference backend against torch.optim itself (foreach=False), on the CPU.

The reference path is the spec the kernels are tested against, so it must reproduce torch.optim:
every case of the table, three param groups with different hyperparameters, the full odd sizes
(1, 3, 1023, 4097, 65537, an empty tensor, a 2-D one), fresh random grads every step, grads
missing on some steps, a param that never gets a grad, in float64 and float32, and complex.
"""

import pytest
import torch
from cases import (
    COMPLEX_SHAPES,
    FULL_SHAPES,
    TOL,
    assert_states_close,
    cases,
    clone_params,
    dtype_id,
    flat,
    make_params,
    run_side_by_side,
)

STEPS = 8


def _with_frozen(param_lists, dtype):
    """Add, to the last group, a param that never gets a grad."""
    frozen = torch.randn(5, dtype=torch.float64).to(dtype).requires_grad_()
    return [*param_lists[:-1], [*param_lists[-1], frozen]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("case", cases())
def test_reference_matches_torch(case, dtype):
    ours = _with_frozen(make_params(FULL_SHAPES, dtype), dtype)
    theirs = clone_params(ours)
    opt = case.make_fused(ours, backend="reference")
    ref = case.make_torch(theirs)
    frozen_index = len(flat(ours)) - 1

    def skip(step, i):  # the frozen param never has a grad; the others miss one step in five
        return i != frozen_index and (step + i) % 5 != 4

    start = [p.detach().clone() for p in flat(ours)]
    run_side_by_side(opt, flat(ours), ref, flat(theirs), STEPS, TOL[dtype], skip=skip)

    assert opt._buckets and all(b.backend == "reference" for b in opt._buckets)
    # a param that never had a grad has state exactly where torch gives it some (Adagrad
    # creates it in __init__), and then it is torch's untouched initial state
    assert (flat(ours)[frozen_index] in opt.state) == (flat(theirs)[frozen_index] in ref.state)
    # the run really moved every param that had grads (so the comparison was not vacuous)
    for i, (p, p0) in enumerate(zip(flat(ours), start)):
        if i != frozen_index and p.numel():
            assert not torch.equal(p.detach(), p0), f"param {i} never changed"


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=dtype_id)
@pytest.mark.parametrize("case", cases("adam-amsgrad-wd", "adamw-amsgrad-maximize",
                                       "adam-decoupled-wd", "sgd-momentum-dampening-wd",
                                       "sgd-nesterov", "sgd-maximize-lr-tensor",
                                       "adagrad-decay-init-wd", "adadelta-rho-wd-maximize",
                                       "rmsprop-momentum-centered-wd",
                                       "nadam-decoupled-maximize-lr-tensor", "radam-wd",
                                       "adamax-wd-maximize"))
def test_reference_matches_torch_complex(case, dtype):
    ours = make_params(COMPLEX_SHAPES, dtype)
    theirs = clone_params(ours)
    opt = case.make_fused(ours, backend="reference")
    ref = case.make_torch(theirs)
    run_side_by_side(opt, flat(ours), ref, flat(theirs), STEPS, TOL[dtype])
    for p in flat(ours):
        for value in opt.state.get(p, {}).values():
            if value.dim():  # state keeps the param's complex dtype, as torch's does
                assert value.dtype == dtype


@pytest.mark.parametrize("case", cases("adamw-default", "sgd-nesterov"))
def test_reference_runs_many_steps(case):
    """Bias corrections stay right well past the first few steps (float64, 60 steps)."""
    ours = make_params((((3,), (0,)), ((1023,),)), torch.float64)
    theirs = clone_params(ours)
    opt = case.make_fused(ours, backend="reference")
    ref = case.make_torch(theirs)
    run_side_by_side(opt, flat(ours), ref, flat(theirs), 60, TOL[torch.float64],
                     check_every_step=False)
    assert_states_close(opt, flat(ours), ref, flat(theirs), **TOL[torch.float64])


@pytest.mark.parametrize("case", cases("adam-lr-tensor", "adamw-lr-tensor-wd",
                                       "sgd-maximize-lr-tensor"))
def test_lr_tensor_dtype_rounding(case):
    """A float32 lr tensor with float64 params: torch computes ``lr / bias_correction1`` and
    ``1 - lr * weight_decay`` as float32 tensors, fusedopt in float64 from ``float(lr)``. The
    trajectories agree to float32 rounding of those scalars, not to float64 rounding."""
    ours = make_params(FULL_SHAPES[:2], torch.float64)
    theirs = clone_params(ours)
    groups = [{"params": g, "lr": torch.tensor(lr)} for g, lr in zip(ours, (5e-3, 2e-2))]
    opt = case.fused_cls(groups, **{**case.options, "lr": torch.tensor(1e-2)},
                         backend="reference")
    groups = [{"params": g, "lr": torch.tensor(lr)} for g, lr in zip(theirs, (5e-3, 2e-2))]
    ref = case.torch_cls(groups, **{**case.options, "lr": torch.tensor(1e-2)}, foreach=False)
    run_side_by_side(opt, flat(ours), ref, flat(theirs), STEPS, {"rtol": 1e-6, "atol": 1e-8})
