"""CUDA-only checks at real sizes (skipped without a GPU): parity with torch.optim's fused
implementation on GPT-2-like shapes plus 1000 small tensors, in float32 and bfloat16, and one
kernel launch per step counted by torch.profiler, not by our own counter.

The CPU-sized kernel tests (test_kernels_vs_reference.py, test_launches.py, ...) also run on
CUDA when it is present: their ``kernel_device`` fixture picks it.
"""

import pytest
import torch
from cases import ONE_PER_OPTIMIZER, TOL, assert_states_close, cases, flat, set_grads

import fusedopt
from fusedopt import kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# GPT-2 124M-like: token embedding, attention and MLP matrices, then 1000 small tensors
# (biases, layer norms, odd sizes) in a third group.
LARGE = (((50257, 768), (1024, 768)), ((768, 2304), (768, 3072), (3072, 768)))
SMALL_SIZES = (768, 2304, 3072, 1, 3, 64, 1023, 4097)
STEPS = 5


def _gpt2_like(dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    groups = [[torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32)
               for shape in shapes] for shapes in LARGE]
    small = [torch.randn(SMALL_SIZES[i % len(SMALL_SIZES)], generator=gen, device="cuda")
             for i in range(1000)]
    groups.append(small)
    return [[p.to(dtype).requires_grad_() for p in g] for g in groups]


def _clone(param_lists, dtype=None):
    return [[p.detach().to(dtype or p.dtype).clone().requires_grad_() for p in g]
            for g in param_lists]


def _grads(params, step, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen, device="cuda").mul_(0.1).to(p.dtype)
            for p in params]


GPU_CASES = cases("adamw-default", "adam-amsgrad-wd", "adamw-amsgrad-maximize",
                  "adamw-lr-tensor-wd", "sgd-nesterov", "sgd-momentum-dampening-wd")


@pytest.mark.parametrize("case", GPU_CASES)
def test_float32_matches_torch_fused(case):
    ours = _gpt2_like(torch.float32)
    theirs = _clone(ours)
    opt = case.make_fused(ours, "triton")
    ref = case.make(case.torch_cls, theirs, fused=True)
    _step_both(opt, ours, ref, theirs)
    assert {b.backend for b in opt._buckets} == {"triton"}
    assert_states_close(opt, flat(ours), ref, flat(theirs), **TOL[torch.float32])


@pytest.mark.parametrize("case", GPU_CASES)
def test_bfloat16_error_at_most_torch_fused(case):
    """bf16 params and state: error against a float32 run at most ~2x torch fused's own."""
    low = _gpt2_like(torch.bfloat16)
    theirs = _clone(low)
    truth = _clone(low, torch.float32)
    opt = case.make_fused(low, "triton")
    ref = case.make(case.torch_cls, theirs, fused=True)
    exact = case.make(case.torch_cls, truth, fused=True)
    for step in range(STEPS):
        grads = _grads(flat(low), step)
        set_grads(flat(low), grads)
        set_grads(flat(theirs), grads)
        set_grads(flat(truth), [g.float() for g in grads])
        for o in (opt, ref, exact):
            o.step()
    slack = torch.finfo(torch.bfloat16).eps
    for i, (p, q, t) in enumerate(zip(flat(low), flat(theirs), flat(truth))):
        ours = (p.float() - t).abs()
        yardstick = (q.float() - t).abs()
        assert torch.isfinite(ours).all()
        assert ours.max() <= 2 * yardstick.max() + slack, f"param {i} {tuple(p.shape)}"
        assert ours.mean() <= 2 * yardstick.mean() + slack / 100, f"param {i} {tuple(p.shape)}"


def _step_both(opt, ours, ref, theirs):
    """STEPS steps of both optimizers on the same fresh grads, then wait for the GPU."""
    for step in range(STEPS):
        grads = _grads(flat(ours), step)
        set_grads(flat(ours), grads)
        set_grads(flat(theirs), grads)
        opt.step()
        ref.step()
    torch.cuda.synchronize()


def _kernel_launches(opt, params, grads):
    """Launches of the fusedopt kernel in one step, as the CUDA profiler saw them."""
    from torch.profiler import ProfilerActivity, profile

    set_grads(params, grads)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum("multi_tensor_" in name for name in names), names


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,),
                                    (torch.float32, torch.bfloat16)],
                         ids=["fp32", "bf16", "fp32+bf16"])
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD], ids=["adamw", "sgd"])
def test_one_launch_per_step_in_the_profiler(cls, dtypes):
    param_lists = _gpt2_like(torch.float32)
    param_lists = [[p.detach().to(dtypes[i % len(dtypes)]).requires_grad_()
                    for i, p in enumerate(g)] for g in param_lists]
    groups = [{"params": param_lists[0]},
              {"params": param_lists[1], "lr": 3e-3, "weight_decay": 0.05},
              {"params": param_lists[2], "lr": 1e-4}]
    opt = cls(groups, lr=1e-3, momentum=0.9, backend="triton") if cls is fusedopt.SGD \
        else cls(groups, lr=1e-3, backend="triton")
    params = flat(param_lists)
    assert len(params) > 1000
    set_grads(params, _grads(params, 0))
    opt.step()  # warm up: compile, build the tables
    for step in (1, 2):
        grads = _grads(params, step)
        if step == 2:
            opt.zero_grad(set_to_none=True)  # new grad storage: still one launch
        before = kernels.launch_count()
        count, names = _kernel_launches(opt, params, grads)
        assert kernels.launch_count() - before == len(dtypes)
        assert count == len(dtypes), (count, sorted(set(names))[:20])


# The rest of the family: one case per optimizer (Lion and LAMB against the paper transcriptions)
FAMILY = cases(*(c for c in ONE_PER_OPTIMIZER if not c.startswith(("adam-", "adamw", "sgd"))))


@pytest.mark.parametrize("case", FAMILY)
def test_family_float32_matches_torch(case):
    ours = _gpt2_like(torch.float32)
    theirs = _clone(ours)
    opt = case.make_fused(ours, "triton")
    ref = case.make_torch(theirs)
    _step_both(opt, ours, ref, theirs)
    assert {b.backend for b in opt._buckets} == {"triton"}
    if case.fused_cls is fusedopt.Lion:
        # sign(c) flips where c is within rounding of 0 (the kernel may fuse c's multiply-add
        # on the GPU): a handful of 124M elements may move by 2*lr, the rest must agree
        for p, q in zip(flat(ours), flat(theirs)):
            close = torch.isclose(p, q, **TOL[torch.float32])
            assert close.float().mean() > 1 - 1e-5, tuple(p.shape)
        return
    assert_states_close(opt, flat(ours), ref, flat(theirs), **TOL[torch.float32])


@pytest.mark.parametrize("case", FAMILY)
def test_family_launches_in_the_profiler(case):
    """One launch per step whatever the tensor count (LAMB: its norms launch and its update)."""
    params = _gpt2_like(torch.float32)
    opt = case.make_fused(params, "triton")
    set_grads(flat(params), _grads(flat(params), 0))
    opt.step()
    count, names = _kernel_launches(opt, flat(params), _grads(flat(params), 1))
    assert count == opt.launches_per_step == (2 if case.fused_cls is fusedopt.LAMB else 1), (
        count, sorted(set(names))[:20])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.NAdam, fusedopt.RAdam, fusedopt.LAMB])
def test_launched_kernels_are_the_static_roofline_builds(cls, dtype):
    """What the driver loaded, after one step: the build the register-cap rule settled on
    (kernels/skeleton.py, Prepared) has no spills, and its step kernel at most REGISTER_CAP
    registers as fusedopt-bench static predicts for sm_90 (LAMB's sums kernel may take more
    in bf16: README, static roofline). Every later launch is that build's."""
    from fusedopt.kernels import skeleton

    params = [torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
              for n in (5000, 70000, 3)]
    opt = cls(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    prepared = {key: kernel for bucket in opt._buckets
                for key, kernel in bucket.runner.prepared.items()}
    assert ("step", next(iter(opt._buckets)).variant) in prepared
    for (kind, _), kernel in prepared.items():
        assert kernel.options_settled and kernel.compiled is not None
        assert kernel.compiled.n_spills == 0, (kind, kernel.options)
        if kind == "step":
            assert kernel.compiled.n_regs <= skeleton.REGISTER_CAP, kernel.options


# ---- Muon, Adafactor and SparseAdam at GPT-2 124M's sizes --------------------------------------

GPT2_MATRICES = ((2304, 768), (768, 768), (3072, 768), (768, 3072)) * 12


def _cuda_params(shapes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, generator=gen, device="cuda").mul_(0.02).to(dtype).requires_grad_()
            for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_whole_tensor_optimizers_match_torch_at_gpt2_sizes(name, dtype):
    """GPT-2's 48 hidden matrices (plus a vector per matrix for Adafactor), 3 steps, against
    torch.optim on the same GPU. Muon: torch's own bf16 Newton-Schulz, per matrix, against
    fusedopt's batched one; the param change may differ by what bf16 matmuls round."""
    shapes = GPT2_MATRICES + (((768,),) * 48 if name == "Adafactor" else ())
    ours = _cuda_params(shapes, dtype)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = getattr(fusedopt, name)(ours, backend="triton")
    ref = getattr(torch.optim, name)(theirs)
    for step in range(3):
        grads = _grads(ours, step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
    for p, q, s in zip(ours, theirs, start):
        change = (q.detach() - s).abs().max().float()
        diff = (p.detach() - q.detach()).abs().max().float()
        bound = (0.05 if name == "Muon" or dtype == torch.bfloat16 else 1e-4) * change
        assert diff <= bound + 1e-6, (name, tuple(p.shape), float(diff), float(change))


def test_sparse_adam_matches_torch_on_an_embedding():
    ours = _cuda_params(((50257, 768),), torch.float32)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref = fusedopt.SparseAdam(ours, backend="triton"), torch.optim.SparseAdam(theirs)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(3):
        rows = torch.randint(0, 50257, (1, 8192), generator=gen, device="cuda")
        values = torch.randn(8192, 768, generator=gen, device="cuda")
        grad = torch.sparse_coo_tensor(rows, values, (50257, 768))
        ours[0].grad, theirs[0].grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert_states_close(opt, ours, ref, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"master_weights": True}, {"stochastic_rounding": True},
                                     {"kahan_summation": True}, {"state_dtype": "bf16"},
                                     {"state_dtype": "8bit"}],
                         ids=lambda o: "-".join(map(str, next(iter(o.items())))))
def test_precision_modes_at_gpt2_sizes(options):
    """Each precision mode on the GPU at GPT-2 sizes, bf16 params (fp32 for bf16 and 8-bit
    states): one launch per step and bucket (8-bit states: the small params' full-precision
    states are a second bucket), and the kernels' results equal the reference path's on the
    same device (but for the last-bit differences that flip a rounding or a code)."""
    dtype = torch.float32 if "state_dtype" in options else torch.bfloat16
    ours = _gpt2_like(dtype)
    theirs = _clone(ours)
    torch.manual_seed(0)
    opt = fusedopt.AdamW(flat(ours), lr=1e-3, backend="triton", **options)
    torch.manual_seed(0)
    ref = fusedopt.AdamW(flat(theirs), lr=1e-3, backend="reference", **options)
    launches = kernels.launch_count()
    _step_both(opt, ours, ref, theirs)
    assert len(opt._buckets) == (2 if options.get("state_dtype") == "8bit" else 1)
    assert kernels.launch_count() - launches == STEPS * len(opt._buckets)
    for p, q in zip(flat(ours), flat(theirs)):
        differ = (p != q).float().mean().item()
        assert differ < 0.01, differ  # a last-bit fp32 difference may flip a rounding
        torch.testing.assert_close(p.float(), q.float(), rtol=0.02, atol=1e-3)
        for name, value in opt.state[p].items():
            if value.dtype == torch.uint8:  # 8-bit codes: a flipped code now and then
                assert (value != ref.state[q][name]).float().mean().item() < 0.01, name
