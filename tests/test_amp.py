"""AMP: torch.amp.GradScaler drives fusedopt as it drives torch's fused optimizers.

fusedopt optimizers set ``_step_supports_amp_scaling``: GradScaler does not unscale the grads
itself but hands ``grad_scale`` and ``found_inf`` to ``step``, and the kernel unscales the
grads and skips the whole update (steps included) where ``found_inf`` is set, on the device.
The trajectory must be torch.optim's under its own GradScaler, overflowing steps included.
"""

import pytest
import torch
from cases import (
    CASE_BY_ID,
    ONE_PER_OPTIMIZER,
    TOL,
    assert_states_close,
    assert_tensor_close,
    cases,
)

STEPS = 8
OVERFLOW_STEPS = (2, 5)  # an inf (step 2) and a NaN (step 5) in one grad: both skipped


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def _scaler():
    # a small growth interval so that the scale also grows during the run
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)


def _train(model, opt, scaler, unscale_and_clip=False):
    """STEPS scaled steps on fresh data; returns the scale and the skip flag after each."""
    gen = torch.Generator().manual_seed(3)
    record = []
    for step in range(STEPS):
        x, y = torch.randn(16, 9, generator=gen), torch.randn(16, 5, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step in OVERFLOW_STEPS:
            next(model.parameters()).grad[0, 0] = torch.inf if step == 2 else torch.nan
        if unscale_and_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        record.append(scaler.get_scale())
    return record


@pytest.mark.parametrize("unscale_and_clip", [False, True], ids=["scaled", "unscale-clip"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", cases(*ONE_PER_OPTIMIZER))
def test_grad_scaler_matches_torch(case, backend, unscale_and_clip, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    model, twin = _model(), _model()
    opt = case.fused_cls(model.parameters(), **case.defaults(), backend=backend)
    ref = case.torch_cls(twin.parameters(), **case.defaults(), foreach=False)
    assert opt._step_supports_amp_scaling
    scales = _train(model, opt, _scaler(), unscale_and_clip)
    torch_scales = _train(twin, ref, _scaler(), unscale_and_clip)
    assert scales == torch_scales
    assert scales[OVERFLOW_STEPS[0]] < scales[OVERFLOW_STEPS[0] - 1]  # the overflow was seen
    assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                        **TOL[torch.float32])
    if "step" in opt.state[next(model.parameters())]:  # skipped steps did not count
        assert float(opt.state[next(model.parameters())]["step"]) == STEPS - len(OVERFLOW_STEPS)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_found_inf_skips_everything_and_is_reported_on_the_device(backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    case = CASE_BY_ID["adamw-default"]
    params = [torch.randn(5000, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = case.fused_cls(params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p) * 8.0
    opt.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))
    assert isinstance(opt.last_step_skipped, torch.Tensor)
    assert opt.last_step_skipped.device == params[0].device and not opt.last_step_skipped
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    values = [p.detach().clone() for p in params]
    opt.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    assert opt.last_step_skipped
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())
    # grad_scale alone: the same as unscaled grads
    twin = [p.detach().clone().requires_grad_() for p in params]
    ref = case.fused_cls(twin, lr=0.1, backend=backend)
    ref.load_state_dict(opt.state_dict())
    for p, q in zip(params, twin):
        q.grad = p.grad / 8.0
    opt.step(grad_scale=torch.tensor(8.0))
    ref.step()
    assert_states_close(opt, params, ref, twin, **TOL[torch.float32])
    assert not opt.last_step_skipped


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_state_created_by_a_skipped_step_is_still_new(backend, request):
    """SGD's first momentum step sets buf = g, later ones buf = m*buf + (1-d)*g. A first step
    that AMP skips must not use that up, nor may rebuilt tables (a param without a grad for a
    step) or new buckets (add_param_group) in between: torch.optim, which GradScaler does not
    step on an overflow, has no buffer yet. A buffer that did get its first update is not
    treated as new again."""
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(8)
    start = [torch.randn(n, generator=gen) for n in (5000, 33, 7)]
    ours = [p.clone().to(device).requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01)
    opt = CASE_BY_ID["sgd-momentum-dampening-wd"].fused_cls(ours, **hyper, backend=backend)
    ref = torch.optim.SGD(theirs, **hyper, foreach=False)
    scale = torch.tensor(4.0, device=device)
    # (skipped, params with a grad): param 2 first runs at step 3, after two skips and a
    # step without its grad; param 1 is new again only if the flag were not cleared
    schedule = [(True, (0, 1, 2)), (True, (0, 1)), (False, (0, 1)), (False, (0, 1, 2)),
                (True, (0, 1, 2)), (False, (0, 1, 2))]
    for step, (skipped, with_grad) in enumerate(schedule):
        if step == 2:  # new buckets, as after any change of the param groups or the state
            extra = torch.randn(5, generator=gen)
            opt.add_param_group({"params": [extra.clone().to(device).requires_grad_()]})
            ref.add_param_group({"params": [extra.clone().requires_grad_()]})
        for i, (p, q) in enumerate(zip(ours, theirs)):
            g = torch.randn(p.shape, generator=gen) if i in with_grad else None
            p.grad = None if g is None else (g * 4.0).to(device)
            q.grad = g
        opt.step(grad_scale=scale, found_inf=torch.tensor(float(skipped), device=device))
        if not skipped:
            ref.step()
        for p, q in zip(ours, theirs):  # (torch has no state yet where ours holds zeros)
            assert_tensor_close(p, q, **TOL[torch.float32], where=f"step {step}")
    assert_states_close(opt, ours, ref, theirs, **TOL[torch.float32])
