"""Adafactor and Muon: the twins on the tile runner (fusedopt.tiled, fusedopt.kernels.tiles).

Each is compared with torch.optim itself (the reference path, exactly; the kernels under the
interpreter or on CUDA, within rounding) on fresh random grads over several steps, with three
param groups of different hyperparameters, grads missing on some steps, tall, wide, square,
batched (3-D and 4-D) and vector params, fp64, fp32 and bf16. Then what the engine promises
every optimizer: GradScaler (inf skip on the device), the fused clip, state_dict round trips
both ways with torch, torch's errors before anything changes, launch counts independent of
the number of tensors, and Muon's Newton-Schulz within the error torch's own bf16 iteration
makes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import (
    assert_states_close,
    assert_unchanged,
    flat,
    fresh_grads,
    run_side_by_side,
    set_grads,
    snapshot_all,
)

import fusedopt
from fusedopt.perf.matrix import CountOps, count_step_ops

# ---- the cases ----------------------------------------------------------------------------------

ADAFACTOR_SHAPES = (((5, 7), (33,), ()), ((3, 33, 40), (1, 9)), ((2, 2, 3, 33), (4, 1), (70,)))
MUON_SHAPES = (((5, 7), (70, 40)), ((40, 70), (33, 33), (7, 5)), ((70, 40), (1, 9), (9, 1)))

ADAFACTOR_OPTIONS = {
    "default": ({}, ({"lr": 0.05}, {"lr": 0.002, "weight_decay": 0.1})),
    "wd-maximize-d": ({"lr": 0.1, "weight_decay": 0.05, "maximize": True, "d": 2.0,
                       "beta2_decay": -0.5, "eps": (1e-20, 1e-2)},
                      ({"lr": 0.02, "maximize": False}, {"eps": (None, 1e-3), "d": 1.0})),
    "lr-tensor": ({"lr": torch.tensor(0.03)}, ({"lr": torch.tensor(0.2)}, {})),
}
MUON_OPTIONS = {
    "default": ({}, ({"lr": 0.01, "momentum": 0.9}, {"weight_decay": 0.0})),
    "plain-momentum-rms": ({"lr": 0.02, "nesterov": False, "adjust_lr_fn": "match_rms_adamw",
                            "weight_decay": 0.05},
                           ({"ns_steps": 4, "adjust_lr_fn": None},
                            {"ns_coefficients": (2.0, -1.5, 0.5), "eps": 1e-4})),
    "lr-tensor": ({"lr": torch.tensor(0.02), "momentum": 0.5}, ({"lr": torch.tensor(0.001)}, {})),
}


def _make(cls, shapes, options, dtype, seed=0, device="cpu", **extra):
    """``cls`` over three groups of params of ``shapes`` (values shared across dtypes)."""
    gen = torch.Generator().manual_seed(seed)
    param_lists = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device)
                    .requires_grad_() for s in group] for group in shapes]
    defaults, overrides = options

    def fresh(options):
        # a tensor lr is float64 for float64 params: torch computes with it in its dtype
        return {k: v.to(torch.float64 if dtype == torch.float64 else v.dtype)
                if isinstance(v, torch.Tensor) else v for k, v in options.items()}

    groups = [{"params": param_lists[0]}] + [
        {"params": ps, **fresh(o)} for ps, o in zip(param_lists[1:], overrides)]
    defaults = fresh(defaults)
    return cls(groups, **defaults, **extra), flat(param_lists), param_lists


def _pair(name, options, dtype, backend, seed=0, device="cpu"):
    """(fusedopt twin on ``backend`` and ``device``, its params, torch.optim's on the CPU,
    its params)."""
    fused_cls, torch_cls, shapes = {
        "adafactor": (fusedopt.Adafactor, torch.optim.Adafactor, ADAFACTOR_SHAPES),
        "muon": (fusedopt.Muon, torch.optim.Muon, MUON_SHAPES)}[name]
    opt, params, _ = _make(fused_cls, shapes, options, dtype, seed, device, backend=backend)
    ref, ref_params, _ = _make(torch_cls, shapes, options, dtype, seed)
    return opt, params, ref, ref_params


def _grid(options):
    return [pytest.param(k, id=k) for k in options]


# torch's own arithmetic, op for op, on the reference path; on the kernels: rounding apart (the
# kernels sum in another order and fuse multiply-adds), and for bf16 a few of its ulps
REFERENCE_TOL = {torch.float64: {"rtol": 0, "atol": 0}, torch.float32: {"rtol": 0, "atol": 0}}
# a float32 tensor lr: torch works its step sizes out in float32 tensor ops, the reference in
# Python floats from the lr's value: an ulp apart
LR_TENSOR_TOL = {"rtol": 1e-6, "atol": 1e-7}
KERNEL_TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12},
              torch.float32: {"rtol": 2e-5, "atol": 2e-6},
              torch.bfloat16: {"rtol": 4e-2, "atol": 2e-2}}


# ---- against torch.optim ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name, key", [*(("adafactor", k) for k in ADAFACTOR_OPTIONS),
                                       *(("muon", k) for k in MUON_OPTIONS)])
def test_reference_is_torch(name, key, dtype):
    options = (ADAFACTOR_OPTIONS if name == "adafactor" else MUON_OPTIONS)[key]
    opt, params, ref, ref_params = _pair(name, options, dtype, "reference")
    tol = LR_TENSOR_TOL if key == "lr-tensor" and dtype == torch.float32 else REFERENCE_TOL[dtype]
    run_side_by_side(opt, params, ref, ref_params, steps=6, tol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("name, key", [*(("adafactor", k) for k in ADAFACTOR_OPTIONS),
                                       *(("muon", k) for k in MUON_OPTIONS)])
def test_kernels_are_torch(name, key, dtype, kernel_device):
    """The tile kernels against torch.optim (and so against the reference, which is torch's
    arithmetic op for op). Muon's bf16 Newton-Schulz is torch's very matmuls, batched."""
    if dtype == torch.bfloat16 and key != "default":
        pytest.skip("bf16: the default options (the others are covered in fp64 and fp32)")
    options = (ADAFACTOR_OPTIONS if name == "adafactor" else MUON_OPTIONS)[key]
    opt, params, ref, ref_params = _pair(name, options, dtype, "triton", device=kernel_device)
    run_side_by_side(opt, params, ref, ref_params, steps=3, tol=KERNEL_TOL[dtype])


def test_adafactor_factored_state_has_torchs_shapes(kernel_device):
    opt, params, ref, ref_params = _pair("adafactor", ADAFACTOR_OPTIONS["default"],
                                         torch.float32, "triton")
    for ps in (params, ref_params):
        set_grads(ps, fresh_grads(ps, 0, skip=None))
    opt.step()
    ref.step()
    for p, q in zip(params, ref_params):
        ours, theirs = opt.state[p], ref.state[q]
        assert list(ours) == list(theirs)
        for key in theirs:
            assert ours[key].shape == theirs[key].shape, key
            assert ours[key].dtype == theirs[key].dtype, key


# ---- Muon's Newton-Schulz: within what torch's bf16 iteration allows -----------------------------


def _newton_schulz_fp64(update, coefficients, steps, eps):
    """The same iteration in fp64 throughout: the value torch's bf16 approximates."""
    a, b, c = coefficients
    x = update.double()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_muon_newton_schulz_error_is_within_torchs(kernel_device):
    """One step from zero momentum on fp32 matrices: the param moves by lr' x NS(update).
    The error of our NS against the fp64 iteration must stay within 2x of torch's own."""
    shapes = (((64, 96), (96, 64)), ((48, 48),), ((32, 128), (128, 32)))
    options = ({"lr": 1.0, "weight_decay": 0.0, "nesterov": False, "momentum": 0.0}, ({}, {}))
    opt, params, _ = _make(fusedopt.Muon, shapes, options, torch.float32, backend="triton")
    ref, ref_params, _ = _make(torch.optim.Muon, shapes, options, torch.float32)
    grads = fresh_grads(params, 0, skip=None)
    before = [p.detach().clone() for p in params]
    set_grads(params, grads)
    set_grads(ref_params, grads)
    opt.step()
    ref.step()
    coefficients = torch.optim.Muon(
        [torch.zeros(2, 2, requires_grad=True)]).defaults["ns_coefficients"]
    for p, q, p0, g in zip(params, ref_params, before, grads):
        scale = fusedopt.reference.muon_lr(1.0, None, p.shape)
        exact = _newton_schulz_fp64(g, coefficients, 5, 1e-7)
        ours = (p0 - p.detach()).double() / scale
        theirs = (p0 - q.detach()).double() / scale
        torch_error = (theirs - exact).norm() / exact.norm()
        our_error = (ours - exact).norm() / exact.norm()
        assert torch_error > 0  # bf16 is not exact: the bound below means something
        assert our_error <= 2 * torch_error, (tuple(p.shape), our_error, torch_error)


def test_muon_bf16_without_nesterov_normalises_the_buffer_as_torch(kernel_device):
    """torch's bf16 Newton-Schulz takes the bf16 momentum buffer itself as its input when it
    is not Nesterov-mixed, and divides it by its norm in place: the twin keeps that."""
    options = ({"nesterov": False}, ({}, {}))
    opt, params, ref, ref_params = _pair("muon", options, torch.bfloat16, "triton")
    run_side_by_side(opt, params, ref, ref_params, steps=3, tol=KERNEL_TOL[torch.bfloat16])
    buf = opt.state[params[0]]["momentum_buffer"].float()
    assert abs(buf.norm().item() - 1.0) < 2e-2  # what torch leaves there


# ---- AMP and clipping ---------------------------------------------------------------------------


def _linear_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 33, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(33, 5, bias=False))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_grad_scaler_skips_and_unscales_as_torch(name, backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    fused_cls, torch_cls = ((fusedopt.Adafactor, torch.optim.Adafactor) if name == "adafactor"
                            else (fusedopt.Muon, torch.optim.Muon))
    model, twin = _linear_model(), _linear_model()
    opt = fused_cls(model.parameters(), lr=0.02, backend=backend)
    ref = torch_cls(twin.parameters(), lr=0.02)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        x, y = torch.randn(16, 9, generator=gen), torch.randn(16, 5, generator=gen)
        for m, o, s in ((model, opt, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step in (1, 4):
                next(m.parameters()).grad[0, 0] = torch.inf if step == 1 else torch.nan
            s.step(o)
            s.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                            rtol=2e-5, atol=2e-6, msg=f"step {step}:")
    assert opt._step_supports_amp_scaling  # the device path, not GradScaler's own unscale


@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_fused_clip_is_torchs(name, kernel_device):
    fused_cls, torch_cls = ((fusedopt.Adafactor, torch.optim.Adafactor) if name == "adafactor"
                            else (fusedopt.Muon, torch.optim.Muon))
    model, twin = _linear_model(), _linear_model()
    opt = fused_cls(model.parameters(), backend="triton")
    ref = torch_cls(twin.parameters())
    gen = torch.Generator().manual_seed(4)
    for step in range(3):
        x, y = torch.randn(16, 9, generator=gen), torch.randn(16, 5, generator=gen)
        for m in (model, twin):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).mul(50).backward()
        ours = opt.clip_grad_norm_(0.1)
        theirs = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
        torch.testing.assert_close(ours, theirs)
        opt.step()
        ref.step()
        assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                            rtol=2e-5, atol=2e-6, msg=f"step {step}:")


# ---- state_dicts, both ways ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_state_dict_moves_both_ways_and_the_trajectory_continues(name, backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    options = (ADAFACTOR_OPTIONS if name == "adafactor" else MUON_OPTIONS)["default"]
    tol = {"rtol": 2e-5, "atol": 2e-6}
    opt, params, ref, ref_params = _pair(name, options, torch.float32, backend)
    run_side_by_side(opt, params, ref, ref_params, steps=2, tol=tol)
    # torch -> fusedopt, into fresh optimizers over copies of the current params
    ours_sd, theirs_sd = opt.state_dict(), ref.state_dict()
    # (the same keys; fusedopt creates state bucket by bucket, so not in torch's order)
    assert sorted(ours_sd["state"]) == sorted(theirs_sd["state"])
    for k, state in theirs_sd["state"].items():
        assert list(ours_sd["state"][k]) == list(state)
    resumed, resumed_params, _ = _make(type(opt), (ADAFACTOR_SHAPES if name == "adafactor"
                                                   else MUON_SHAPES), options, torch.float32,
                                       backend=backend)
    with torch.no_grad():
        for p, q in zip(resumed_params, ref_params):
            p.copy_(q)
    resumed.load_state_dict(copy.deepcopy(theirs_sd))  # (torch's loader keeps the tensors)
    # fusedopt -> torch
    back, back_params, _ = _make(type(ref), (ADAFACTOR_SHAPES if name == "adafactor"
                                             else MUON_SHAPES), options, torch.float32)
    with torch.no_grad():
        for p, q in zip(back_params, params):
            p.copy_(q)
    back.load_state_dict(copy.deepcopy(ours_sd))
    run_side_by_side(resumed, resumed_params, ref, ref_params, steps=2, tol=tol, seed=7)
    run_side_by_side(back, back_params, opt, params, steps=2, tol=tol, seed=7)


def test_adafactor_refuses_a_state_dict_with_wrong_factor_shapes():
    opt, params, _ = _make(fusedopt.Adafactor, (((6, 4),),), ({}, ()), torch.float32)
    set_grads(params, fresh_grads(params, 0, skip=None))
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["row_var"] = torch.zeros(6, 4)
    before = snapshot_all(opt, params)
    with pytest.raises(ValueError, match=r"row_var.*\(6, 1\)"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, before)


# ---- torch's errors, before anything changes ----------------------------------------------------


def test_muon_errors_are_torchs():
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        fusedopt.Muon([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="Adjust learning rate function"):
        fusedopt.Muon([torch.zeros(3, 2, requires_grad=True)], adjust_lr_fn="nope")
    with pytest.raises(ValueError, match="momentum should be >= 0"):
        fusedopt.Muon([torch.zeros(3, 2, requires_grad=True)], momentum=-1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_muon_step_errors_change_nothing(backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    good = [torch.randn(5, 3, requires_grad=True)]
    other = [torch.randn(4, 6, requires_grad=True)]
    opt = fusedopt.Muon([{"params": good}, {"params": other, "ns_steps": 100}], backend=backend)
    for p in good + other:
        p.grad = torch.randn_like(p)
    before = snapshot_all(opt, good + other)
    with pytest.raises(ValueError, match="Number of steps must be less than 100"):
        opt.step()
    assert_unchanged(opt, good + other, before)
    opt.param_groups[1]["ns_steps"] = 5
    opt.param_groups[1]["ns_coefficients"] = (1.0, 2.0)
    before = snapshot_all(opt, good + other)
    with pytest.raises(ValueError, match="Coefficients must be a tuple of exactly 3 values"):
        opt.step()
    assert_unchanged(opt, good + other, before)
    opt.param_groups[1]["ns_coefficients"] = (3.4445, -4.7750, 2.0315)
    with torch.no_grad():  # a param re-pointed to a 3-D tensor, with a grad to match
        other[0].data = torch.randn(2, 2, 2)
    other[0].grad = torch.randn(2, 2, 2)
    with pytest.raises(ValueError, match="Param gradient must be a 2D matrix"):
        opt.step()
    assert torch.equal(good[0], before[1][0])
    assert not opt.state  # nothing was created


@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_complex_and_sparse_are_refused_as_torch(name):
    cls = fusedopt.Adafactor if name == "adafactor" else fusedopt.Muon
    torch_name = "Adafactor" if name == "adafactor" else "Muon"
    p = torch.randn(3, 2, dtype=torch.complex64, requires_grad=True)
    opt = cls([p])
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match=f"{torch_name} does not support complex parameters"):
        opt.step()
    q = torch.randn(3, 2, requires_grad=True)
    opt = cls([q])
    q.grad = torch.randn(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert not opt.state


def test_adafactor_empty_param_is_a_clear_error():
    p = torch.zeros(0, 3, requires_grad=True)
    q = torch.randn(4, requires_grad=True)
    opt = fusedopt.Adafactor([q, p])
    p.grad, q.grad = torch.zeros(0, 3), torch.randn(4)
    before = snapshot_all(opt, [q, p])
    with pytest.raises(RuntimeError, match="has no elements"):
        opt.step()
    assert_unchanged(opt, [q, p], before)
    ref = torch.optim.Adafactor([torch.zeros(0, 3, requires_grad=True)])
    ref.param_groups[0]["params"][0].grad = torch.zeros(0, 3)
    with pytest.raises(ZeroDivisionError):  # what torch does with it
        ref.step()


# ---- layouts the kernels do not index directly ---------------------------------------------------


@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_transposed_params_and_grads_match_torch(name, kernel_device):
    """Params and grads that are transposed views (dense, not row-major) go through
    contiguous copies: same result as torch, and the params stay the very tensors."""
    fused_cls, torch_cls = ((fusedopt.Adafactor, torch.optim.Adafactor) if name == "adafactor"
                            else (fusedopt.Muon, torch.optim.Muon))
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(40, 70, generator=gen).t(), torch.randn(6, 9, generator=gen)]
    params = [b.clone().t().contiguous().t().requires_grad_() for b in base]
    ref_params = [b.clone().requires_grad_() for b in base]
    opt, ref = fused_cls(params, backend="triton"), torch_cls(ref_params)
    for step in range(3):
        grads = fresh_grads(params, step, skip=None)
        for p, q, g in zip(params, ref_params, grads):
            p.grad = g.t().contiguous().t() if step % 2 else g.clone()
            q.grad = g.clone()
        opt.step()
        ref.step()
        assert_states_close(opt, params, ref, ref_params, rtol=2e-5, atol=2e-6,
                            msg=f"step {step}:")
    assert not params[0].is_contiguous()


# ---- launches per step ---------------------------------------------------------------------------


def _gpt_like_matrices(layers: int, width: int) -> list[torch.Tensor]:
    """A transformer's Linear weights (out x in): qkv, attn out, mlp in, mlp out per layer."""
    shapes = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
    gen = torch.Generator().manual_seed(6)
    return [torch.randn(s, generator=gen).requires_grad_() for _ in range(layers)
            for s in shapes]


def _step_counts(opt, params):
    """(kernel launches, torch ops) of one step after the first (which builds the tables)."""
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return count_step_ops(opt, opt.step)


def test_muon_launches_do_not_grow_with_the_matrices(kernel_device):
    """Two tile launches per step plus, per batch of same-shaped matrices, its norm and 3
    matmuls per Newton-Schulz iteration, whatever the number of matrices: GPT-like layers
    give 3 batches (3w x w, w x w, and the 4w x w and w x 4w ones together)."""
    counts = []
    for layers in (1, 4):
        params = [p.to(kernel_device) for p in _gpt_like_matrices(layers, 8)]
        opt = fusedopt.Muon(params, backend="triton")
        launches, ops = _step_counts(opt, params)
        assert launches == opt.launches_per_step == 2
        assert len(opt._buckets[0].runner.batches) == 3
        assert sum(op.startswith(("bmm", "baddbmm")) for op in ops) == 3 * 5 * 3
        counts.append((launches, ops))
    assert counts[0] == counts[1]
    assert len(counts[0][1]) <= 1 + 3 * (5 + 15)  # zeroing, per batch: norm (5 ops) + 15


def test_adafactor_launches_do_not_grow_with_the_tensors(kernel_device):
    counts = []
    for layers in (1, 4):
        params = [p.to(kernel_device) for p in _gpt_like_matrices(layers, 8)] + [
            torch.randn(8, requires_grad=True, device=kernel_device) for _ in range(layers)]
        opt = fusedopt.Adafactor(params, backend="triton")
        counts.append(_step_counts(opt, params))
    # a bucket of matrices (4 launches) and one of vectors (3), each after zeroing its scratch
    assert counts[0] == counts[1] == (4 + 3, ["zero_.default", "zero_.default"])


def test_muon_launches_against_torchs():
    """What torch.optim.Muon runs per step on the same matrices, counted the same way: it
    grows with the number of matrices (the figure for the README's table)."""
    counts = []
    for layers in (1, 4):
        params = _gpt_like_matrices(layers, 8)
        opt = torch.optim.Muon(params)
        for p in params:
            p.grad = torch.randn_like(p)
        with CountOps() as counted:
            opt.step()
        counts.append(len(counted.ops))
    assert counts[1] > 3.5 * counts[0]
    assert counts[0] / 4 >= 20  # per matrix: lerps, the norm, 15 matmuls, the update


def test_grouped_newton_schulz_settings_are_separate_batches(kernel_device):
    """Same shapes, groups with different Newton-Schulz settings: separate batches, each
    with its own iteration count; changed settings re-plan the batches."""
    params = [torch.randn(6, 10, requires_grad=True) for _ in range(4)]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    groups = [{"params": params[:2]}, {"params": params[2:], "ns_steps": 3}]
    ref_groups = [{"params": ref_params[:2]}, {"params": ref_params[2:], "ns_steps": 3}]
    opt, ref = fusedopt.Muon(groups, backend="triton"), torch.optim.Muon(ref_groups)
    for step in range(4):
        if step == 2:
            for o in (opt, ref):
                o.param_groups[1]["ns_steps"] = 6
                o.param_groups[0]["ns_coefficients"] = (3.0, -3.2, 1.2)
        grads = fresh_grads(params, step, skip=None)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_states_close(opt, params, ref, ref_params, rtol=2e-5, atol=2e-6,
                            msg=f"step {step}:")
    runner = opt._buckets[0].runner
    assert len(runner.batches) == 2 and {b.steps for b in runner.batches} == {5, 6}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_compiled_step_is_one_custom_op_and_matches_torch(name, backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    torch._dynamo.reset()
    fused_cls, torch_cls = ((fusedopt.Adafactor, torch.optim.Adafactor) if name == "adafactor"
                            else (fusedopt.Muon, torch.optim.Muon))
    model, twin = _linear_model(), _linear_model()
    opt, ref = fused_cls(model.parameters(), backend=backend), torch_cls(twin.parameters())
    graphs = []

    def backend_fn(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled_step = torch.compile(opt.step, fullgraph=True, backend=backend_fn)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        x, y = torch.randn(16, 9, generator=gen), torch.randn(16, 5, generator=gen)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        compiled_step()
        ref.step()
        assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                            rtol=2e-5, atol=2e-6, msg=f"step {step}:")
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.fusedopt.step.default in ops


@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_rebound_and_replaced_tensors_are_followed_as_torch(name, kernel_device):
    """What the engine follows for every optimizer, on the tile runner: a param moved to new
    storage, a state rebound through ``.data`` (the offload idiom), a state replaced by hand,
    a grad with other strides at the same address."""
    options = (ADAFACTOR_OPTIONS if name == "adafactor" else MUON_OPTIONS)["default"]
    opt, params, ref, ref_params = _pair(name, options, torch.float32, "triton",
                                         device=kernel_device)

    def state_key(o, p):
        return next(k for k, v in o.state[p].items() if k != "step" and v is not None)

    def attack(step):
        for o, ps in ((opt, params), (ref, ref_params)):
            if step == 1:
                ps[0].data = ps[0].data.clone()
            elif step == 2:
                key = state_key(o, ps[1])
                o.state[ps[1]][key].data = o.state[ps[1]][key].data.clone()
            elif step == 3:
                key = state_key(o, ps[0])
                o.state[ps[0]][key] = o.state[ps[0]][key].clone().mul_(0.5)
            elif step == 4 and ps[3].grad is not None:
                g = ps[3].grad
                ps[3].grad.data = g.transpose(-1, -2).contiguous().transpose(-1, -2)

    run_side_by_side(opt, params, ref, ref_params, steps=6, tol={"rtol": 2e-5, "atol": 2e-6},
                     before_step=attack)


@pytest.mark.parametrize("steps", [-1, 0, 1, 2])
def test_muon_any_iteration_count_is_torchs(steps, kernel_device):
    """torch runs ``range(ns_steps)`` iterations: none for 0 or less (its only check is
    < 100); the update is then the normalised momentum."""
    options = ({"ns_steps": steps}, ({}, {}))
    opt, params, ref, ref_params = _pair("muon", options, torch.float32, "triton",
                                         device=kernel_device)
    run_side_by_side(opt, params, ref, ref_params, steps=2, tol=KERNEL_TOL[torch.float32])
