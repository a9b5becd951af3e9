"""Fused global-norm gradient clipping: ``opt.clip_grad_norm_(max_norm, norm_type)``.

It measures the norm of every grad of the optimizer with one multi-tensor launch per
(device, dtype) on the triton backend, turns it into the clip coefficient on the device, and
the next ``step()`` multiplies the grads by it inside the update kernel (no host sync, no pass
that rewrites the grads). The trajectory must be ``torch.nn.utils.clip_grad_norm_`` followed
by torch.optim's step, also under a GradScaler (unscale_, clip, step), and the returned norm
torch's.
"""

import math

import pytest
import torch
from cases import CASE_BY_ID, TOL, assert_states_close, cases

from fusedopt import kernels

STEPS = 6


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.Tanh(),
                               torch.nn.Linear(33, 5)).to(dtype)


def _batches(dtype):
    gen = torch.Generator().manual_seed(4)
    return [(torch.randn(16, 9, generator=gen, dtype=torch.float64).to(dtype),
             torch.randn(16, 5, generator=gen, dtype=torch.float64).to(dtype) * 10)
            for _ in range(STEPS)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=["l2", "l1", "inf"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", cases("adamw-default", "sgd-momentum-dampening-wd",
                                       "lamb-default"))
def test_clip_matches_torch(case, backend, norm_type, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    dtype = torch.float64
    model, twin = _model(dtype=dtype), _model(dtype=dtype)
    opt = case.fused_cls(model.parameters(), **case.defaults(), backend=backend)
    ref = case.torch_cls(twin.parameters(), **case.defaults(), foreach=False)
    clipped = 0
    for x, y in _batches(dtype):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        launches = kernels.vector_launch_count()
        norm = opt.clip_grad_norm_(0.5, norm_type=norm_type)
        if backend == "triton":
            assert kernels.vector_launch_count() - launches == 1  # one dtype, one launch
        expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5, norm_type=norm_type)
        assert isinstance(norm, torch.Tensor) and norm.dim() == 0
        torch.testing.assert_close(norm, expected, rtol=1e-12, atol=0)
        clipped += bool(expected > 0.5)
        opt.step()
        ref.step()
        assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                            **TOL[dtype])
    assert clipped >= STEPS // 2, "the grads were rarely clipped: vacuous"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_clip_after_unscale_composes_with_grad_scaler(backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    case = CASE_BY_ID["adamw-default"]
    model, twin = _model(), _model()
    opt = case.fused_cls(model.parameters(), lr=1e-2, backend=backend)
    ref = case.torch_cls(twin.parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
               for _ in range(2)]
    for step, (x, y) in enumerate(_batches(torch.float32)):
        norms = []
        for m, o, scaler in ((model, opt, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step == 3:
                next(m.parameters()).grad[0, 0] = torch.inf
            scaler.unscale_(o)
            norms.append(o.clip_grad_norm_(0.5) if o is opt
                         else torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
            scaler.step(o)
            scaler.update()
        torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0, equal_nan=True)
        assert bool(opt.last_step_skipped) == (step == 3)
        assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                            **TOL[torch.float32])
    assert scalers[0].get_scale() == scalers[1].get_scale()


def test_clip_is_dropped_by_zero_grad_and_consumed_by_step():
    """The coefficient belongs to the grads it was measured on: zero_grad() drops it, and a
    step uses it once."""
    case = CASE_BY_ID["sgd-momentum-dampening-wd"]
    model, twin = _model(), _model()
    opt = case.fused_cls(model.parameters(), lr=0.1, backend="reference")
    ref = case.torch_cls(twin.parameters(), lr=0.1, foreach=False)
    (x, y), (x2, y2) = _batches(torch.float32)[:2]
    for m in (model, twin):
        torch.nn.functional.mse_loss(m(x), y).backward()
    opt.clip_grad_norm_(1e-3)
    opt.zero_grad()  # the clip above no longer applies
    ref.zero_grad()
    for m, o in ((model, opt), (twin, ref)):
        torch.nn.functional.mse_loss(m(x2), y2).backward()
        o.step()
    for o in (opt, ref):  # same grads again, no clip: a plain step
        o.step()
    assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                        **TOL[torch.float32])


def test_clip_without_grads_and_nonfinite():
    case = CASE_BY_ID["adamw-default"]
    model = _model()
    opt = case.fused_cls(model.parameters(), backend="reference")
    assert float(opt.clip_grad_norm_(1.0)) == 0.0
    x, y = _batches(torch.float32)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = torch.nan
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)


def test_clip_follows_new_grad_storage_and_keeps_no_grad_alive(kernel_device):
    """The norm launch keeps its sizes between calls, not its grads: grads in new storage
    (zero_grad(set_to_none=True)) are measured where they now are, a param that loses its
    grad drops out of the norm, and a dropped grad is freed."""
    import gc
    import weakref

    model = _model().to(kernel_device)
    opt = CASE_BY_ID["adamw-default"].fused_cls(model.parameters(), backend="triton")
    params = list(model.parameters())
    for step, (x, y) in enumerate(_batches(torch.float32)[:4]):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x.to(kernel_device)), y.to(kernel_device)).backward()
        if step == 2:
            params[0].grad = None  # a smaller set of grads: other sizes
        if step == 3:
            params[1].grad = params[1].grad.clone() * 3  # one grad in fresh storage
        with_grads = [p for p in params if p.grad is not None]
        expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in with_grads]))
        torch.testing.assert_close(opt.clip_grad_norm_(0.5), expected, rtol=1e-6, atol=0)
    dropped = weakref.ref(params[1].grad)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert dropped() is None, "the clip kept a grad alive"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_half_grads_whose_squares_overflow(dtype, kernel_device):
    """fp16 grads of norm ~570 have a sum of squares past fp16's max (65504): the norm must be
    accumulated in fp32, as torch's is, not come out inf (which would zero every grad)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(300, 700), (1000,), (33, 7)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(kernel_device))
            for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(kernel_device) * 2
        q.grad = p.grad.clone()
    opt = CASE_BY_ID["adamw-default"].fused_cls(ours, backend="triton")
    norm = opt.clip_grad_norm_(1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert float(expected) ** 2 > torch.finfo(torch.float16).max
    assert norm.dtype == dtype
    torch.testing.assert_close(norm, expected, rtol=1e-2, atol=0)
    opt.step()
    moved = max(float((p - q).abs().max()) for p, q in zip(ours, theirs))
    assert moved > 1e-4, "clipping by an infinite norm zeroed the update"
