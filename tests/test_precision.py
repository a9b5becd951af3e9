"""The precision options (fusedopt.precision): master weights, stochastic rounding, Kahan
summation and low-precision states, on every element-wise optimizer.

Three kinds of checks, as for the plain optimizers:

1. the reference path against torch-derived expectations: with master weights the masters
   follow torch.optim's fp32 trajectory and the param is the master's rounding; Kahan's pair
   tracks it too; stochastic rounding is unbiased; bf16 states are torch's fp32 states rounded;
2. the real kernels (under the interpreter on a CPU) against the reference, every optimizer
   in every mode;
3. the training integration: AMP's skip, capturable, state_dict round trips (continuing
   exactly), checkpoints to and from torch.optim, and the errors.
"""

import copy

import pytest
import torch
from cases import CASE_BY_ID, ONE_PER_OPTIMIZER, fresh_grads, make_params

import fusedopt
from fusedopt import kernels, precision
from fusedopt.kernels import quantization

MODES = {
    "master": {"master_weights": True},
    "stochastic": {"stochastic_rounding": True},
    "kahan": {"kahan_summation": True},
    "bf16-states": {"state_dtype": torch.bfloat16},
    "8bit": {"state_dtype": "8bit"},
    "master-8bit": {"master_weights": True, "state_dtype": "8bit"},
}
#: the modes for fp32 params (the usual use of low-precision states)
FP32_MODES = ("bf16-states", "8bit")
# small sizes for the interpreter: an element, odd sizes, an empty tensor, and one longer than
# a bf16 chunk (8192 elements: the unmasked aligned path, then a tail)
SHAPES = (((1,), (8195,), (0,)), ((3,), (33, 17)), ((1023,),))


def _flat(groups):
    return [p for group in groups for p in group]


def _param_dtype(mode: str) -> torch.dtype:
    """The param dtype a mode is for: bf16 and 8-bit states are tried on fp32 params (the
    usual use), the rest on bf16 params."""
    return torch.float32 if mode in FP32_MODES else torch.bfloat16


def _quantizable(case) -> bool:
    return quantization.quantizable(case.fused_cls.algorithm.states)


def _codes_close(actual, actual_absmax, expected, expected_absmax, name, where):
    """8-bit states of two implementations (whose float32 math may differ in last bits): the
    same code for nearly every element, and values at most a code step apart."""
    a = precision.dequantized(actual.cpu(), actual_absmax.cpu(), name).reshape(-1)
    e = precision.dequantized(expected, expected_absmax, name).reshape(-1)
    if not e.numel():
        return
    assert (actual.cpu() == expected).float().mean().item() >= 0.99, f"{where}: codes differ"
    assert (a - e).abs().max().item() <= 0.02 * max(e.abs().max().item(), 1e-30), where


def _make(case, params, backend: str, **options):
    return case.make(case.fused_cls, params, backend=backend, **options)


def _grads(params, step):
    """Fresh random grads in the params' dtype (bf16 grads are exact in fp32, so a torch
    run in fp32 sees the same values)."""
    return fresh_grads(params, step)


def _set(params, grads, dtype=None):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach().clone().to(dtype or p.dtype)


def _ulp_close(actual: torch.Tensor, expected: torch.Tensor, where: str,
               exact_fraction: float = 0.99) -> None:
    """Low-precision values computed from float32 values that may differ in their last bits
    (two implementations): nearly all equal, the rest at most an ulp of the tensor's largest
    value apart (a last-bit difference in one step moves the next step's values a little)."""
    a, e = actual.detach().float().reshape(-1), expected.detach().float().reshape(-1)
    if not e.numel():
        return
    bits = 7 if actual.dtype == torch.bfloat16 else 10
    bound = e.abs().max().item() * 2.0 ** -bits
    assert (a - e).abs().max().item() <= bound, f"{where}: more than an ulp of the max apart"
    assert (a == e).float().mean().item() >= exact_fraction, f"{where}: too many differ"


def _mostly_close(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """float32 values of two implementations: close to rounding, but for at most 1% of the
    elements, which may be a step apart (Lion takes the sign of values next to 0; a last-bit
    difference of a bf16 param flips its rounding, which the next update sees)."""
    a, e = actual.detach().cpu().float().reshape(-1), expected.detach().float().reshape(-1)
    if not e.numel():
        return
    scale = max(e.abs().max().item(), 1e-30)
    close = (a - e).abs() <= 1e-5 * e.abs() + 1e-6 * scale
    assert close.float().mean().item() >= 0.99, f"{where}: {int((~close).sum())} differ"
    assert (a - e).abs().max().item() <= 0.01 * scale, f"{where}: far apart"


# ---- 1. the reference against torch-derived expectations -----------------------------------


def _fp32_twin(case, params):
    """The fp32 trajectory to follow: torch.optim's; for Lion and LAMB (not in torch.optim),
    fusedopt's own reference in fp32 (itself tested against the papers' algorithms: a sign
    taken of a value next to 0 flips between two fp32 implementations)."""
    if case.torch_cls.__module__.startswith("torch.optim"):
        return case.make_torch(params)
    return case.make_fused(params, "reference")


@pytest.mark.parametrize("case_id", ONE_PER_OPTIMIZER)
def test_master_weights_follow_torch_fp32(case_id):
    """bf16 params with master weights: the masters follow torch.optim's fp32 trajectory on
    the same grads, and each param is its master rounded to nearest even, exactly."""
    case = CASE_BY_ID[case_id]
    params = make_params(SHAPES, torch.bfloat16)
    opt = _make(case, params, "reference", master_weights=True)
    fp32 = [[p.detach().float().requires_grad_() for p in group] for group in params]
    twin = _fp32_twin(case, fp32)
    ours, theirs = _flat(params), _flat(fp32)
    for step in range(6):
        grads = _grads(ours, step)
        _set(ours, grads)
        _set(theirs, grads, torch.float32)
        opt.step()
        twin.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            state = opt.state.get(p, {})
            if "master_param" not in state:
                assert float(twin.state.get(q, {}).get("step", 0)) == 0  # not stepped yet
                continue
            master = state["master_param"]
            assert master.dtype == torch.float32
            torch.testing.assert_close(master, q.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, i=i, s=step: f"step {s} param {i}: {m}")
            assert torch.equal(p.detach(), master.to(torch.bfloat16))
            for name, value in twin.state[q].items():
                if isinstance(value, torch.Tensor) and value.dim():
                    assert state[name].dtype == torch.float32, name
                    torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["bf16-states", "fp32-states"])
@pytest.mark.parametrize("case_id", ["adamw-default", "sgd-momentum-dampening-wd",
                                     "lion-wd-maximize"])
def test_kahan_pair_tracks_fp32(case_id, state_dtype):
    """bf16 params with Kahan summation, 60 steps: with fp32 states, param + compensation
    stays within a small fraction of a bf16 rounding of the fp32 trajectory, where plain bf16
    params (torch's bf16 run) drift away by many roundings; with bf16 states (the default,
    whose own roundings then dominate) it still stays closer than plain bf16."""
    case = CASE_BY_ID[case_id]
    shapes = (((4000,),),)
    params = make_params(shapes, torch.bfloat16)
    plain = [[p.detach().clone().requires_grad_() for p in g] for g in params]
    fp32 = [[p.detach().float().requires_grad_() for p in g] for g in params]
    opt = _make(case, params, "reference", kahan_summation=True, state_dtype=state_dtype)
    bf16_twin, fp32_twin = case.make_torch(plain), _fp32_twin(case, fp32)
    (p,), (b,), (q,) = _flat(params), _flat(plain), _flat(fp32)
    for step in range(60):
        grads = _grads([p], step)
        for param in (p, b):
            _set([param], grads)
        _set([q], grads, torch.float32)
        for o in (opt, bf16_twin, fp32_twin):
            o.step()
    comp = opt.state[p]["kahan_comp"]
    assert comp.dtype == torch.bfloat16
    pair_error = (p.float() + comp.float() - q).abs().max().item()
    plain_error = (b.float() - q).abs().max().item()
    rounding = (q.abs().max() * 2 ** -8).item()  # half a bf16 ulp of the largest param
    if state_dtype == torch.float32:  # measured: 1/20 (Lion's signs) to 1/150 of a rounding
        assert pair_error < rounding / 10, (pair_error, rounding)
        assert pair_error < plain_error / 20, (pair_error, plain_error)
    else:  # measured: 3.4x (SGD's bf16 momentum) to 120x closer than plain bf16
        assert pair_error < plain_error / 2, (pair_error, plain_error)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_stochastic_rounding_is_unbiased(backend, request):
    """20000 bf16 params at 1.0, SGD steps of 1e-3 (a quarter of a bf16 ulp below 1): round to
    nearest would never move them; stochastic rounding moves their mean by the step."""
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    opt = fusedopt.SGD([p], lr=1e-3, stochastic_rounding=True, backend=backend)
    values = set()
    for step in range(3):
        before = p.detach().float().mean().item()
        p.grad = torch.ones_like(p)
        opt.step()
        moved = before - p.detach().float().mean().item()
        # one rounding of 1 - 1e-3 (or of what came before): its standard deviation is at most
        # half an ulp (2**-9) / sqrt(20000) = 1.4e-5
        assert abs(moved - 1e-3) < 7e-5, (step, moved)
        values |= set(p.detach().float().unique().tolist())
    assert len(values) > 2  # the elements went different ways


def test_stochastic_rounding_reproducible_and_kernel_bits_are_the_reference():
    """The same torch.manual_seed gives the same run; another gives another. The kernels'
    Philox bits are the reference's: SGD's fp32 update is the same on both paths, and the
    stochastically rounded params are bit for bit equal."""

    def run(seed, backend):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen).bfloat16())
                  for n in (5, 8195, 300)]
        opt = fusedopt.SGD(params, lr=3e-3, stochastic_rounding=True, backend=backend)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            opt.step()
        return [p.detach().clone() for p in params]

    a, b, c = run(1, "reference"), run(1, "reference"), run(2, "reference")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    if kernels_runnable():
        k = run(1, "triton")
        assert all(torch.equal(x, y) for x, y in zip(a, k))


def kernels_runnable() -> bool:
    from conftest import KERNELS_RUNNABLE

    return KERNELS_RUNNABLE


@pytest.mark.parametrize("case_id", ["adam-amsgrad-wd", "rmsprop-momentum-centered-wd",
                                     "adagrad-default"])
def test_bf16_states_are_fp32_states_rounded(case_id):
    """fp32 params with bf16 states: after a first step, the param is torch's fp32 step and
    each state is torch's fp32 state rounded to bf16; later steps stay close to torch's."""
    case = CASE_BY_ID[case_id]
    shapes = (((3000,),),)
    params = make_params(shapes, torch.float32)
    twin_params = [[p.detach().clone().requires_grad_() for p in g] for g in params]
    opt = _make(case, params, "reference", state_dtype=torch.bfloat16)
    twin = case.make_torch(twin_params)
    (p,), (q,) = _flat(params), _flat(twin_params)
    for step in range(8):
        grads = _grads([p], step)
        _set([p], grads)
        _set([q], grads)
        opt.step()
        twin.step()
        if step == 0:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            for name, value in twin.state[q].items():
                if isinstance(value, torch.Tensor) and value.dim():
                    assert opt.state[p][name].dtype == torch.bfloat16
                    _ulp_close(opt.state[p][name], value.to(torch.bfloat16), name)
    torch.testing.assert_close(p, q, rtol=0.02, atol=0.02 * q.abs().max().item())


def test_master_follows_a_param_the_user_changed():
    """A param written by the user between steps (a reload of the model's weights) is what the
    next update starts from: the master does not silently overwrite it."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(500, generator=gen).bfloat16())
    opt = fusedopt.AdamW([p], lr=1e-2, master_weights=True, backend="reference")
    p.grad = torch.randn(500, generator=gen).bfloat16()
    opt.step()
    new = torch.randn(500, generator=gen).bfloat16()
    p.data.copy_(new)
    q = torch.nn.Parameter(new.float())
    twin = torch.optim.AdamW([q], lr=1e-2)
    twin.load_state_dict(precision.torch_state_dict(opt.state_dict()))
    g = torch.randn(500, generator=gen).bfloat16()
    p.grad, q.grad = g, g.float()
    opt.step()
    twin.step()
    torch.testing.assert_close(opt.state[p]["master_param"], q.detach(), rtol=1e-5, atol=1e-6)


# ---- 2. the kernels against the reference -------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case_id", ONE_PER_OPTIMIZER)
def test_kernel_matches_reference(case_id, mode, kernel_device):
    case = CASE_BY_ID[case_id]
    dtype = _param_dtype(mode)
    ours = make_params(SHAPES, dtype, device=kernel_device)
    theirs = [[p.detach().clone().requires_grad_() for p in g] for g in ours]
    if "8bit" in mode and not _quantizable(case):  # (not moment estimates: refused)
        with pytest.raises(ValueError, match="8bit"):
            _make(case, ours, "triton", **MODES[mode])
        return
    if "8bit" in mode and case.options.get("centered"):  # (a difference of quantized states)
        with pytest.raises(ValueError, match="centered"):
            _make(case, ours, "triton", **MODES[mode])
        case = CASE_BY_ID["rmsprop-default"]
    torch.manual_seed(7)
    opt = _make(case, ours, "triton", **MODES[mode])
    torch.manual_seed(7)
    ref = _make(case, theirs, "reference", **MODES[mode])
    a, b = _flat(ours), _flat(theirs)
    launches = kernels.launch_count()
    steps = 3
    for step in range(steps):
        grads = _grads(a, step)
        _set(a, grads)
        _set(b, grads)
        opt.step()
        ref.step()
    assert kernels.launch_count() - launches == steps * len(opt._buckets) * opt.launches_per_step
    # every param of the one dtype: one launch per step (8-bit states: another for the small
    # params, whose states stay in full precision)
    assert len(opt._buckets) == (2 if "8bit" in mode else 1)
    for i, (p, q) in enumerate(zip(a, b)):
        where = f"{case_id} {mode} param {i}"
        sp, sq = opt.state.get(p, {}), ref.state.get(q, {})
        assert list(sp) == list(sq), where
        if mode == "kahan":  # the pair's sum: a last-bit difference moves bits between the two
            if "kahan_comp" in sp:
                _mostly_close(p.float() + sp["kahan_comp"].float(),
                              q.float() + sq["kahan_comp"].float(), where)
        elif p.dtype == torch.float32:
            _mostly_close(p, q, where)
        else:
            _ulp_close(p.cpu(), q, where)
        for name in sp:
            x, y = sp[name], sq[name]
            if name == "step":
                assert float(x) == float(y), where
            elif name == "kahan_comp":
                continue
            elif x.dtype == torch.uint8:
                absmax = quantization.absmax_name(name)
                _codes_close(x, sp[absmax], y, sq[absmax], name, f"{where} {name}")
            elif x.dtype == torch.float32 and x.dim():
                _mostly_close(x, y, f"{where} {name}")
            elif x.dim():
                _ulp_close(x.cpu(), y, f"{where} {name}", exact_fraction=0.98)
            else:
                torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["master", "bf16-states", "8bit"])
def test_kernel_unaligned_views(mode, kernel_device):
    """States of another width than the param take the aligned frame only where every
    tensor is 16-byte aligned: params that are views at odd offsets take the element path
    (8-bit states: in blocks of a whole quantization block), with the same results."""
    dtype = _param_dtype(mode)
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(9000, generator=gen).to(dtype).to(kernel_device)
    results = []
    for backend in ("triton", "reference"):
        buffer = base.clone()  # params at odd offsets of a buffer
        params = [torch.nn.Parameter(buffer[1:4500]), torch.nn.Parameter(buffer[4503:8999])]
        opt = fusedopt.Adam(params, lr=1e-2, backend=backend, **MODES[mode])
        g = torch.Generator().manual_seed(12)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype).to(p.device)
            opt.step()
        results.append([p.detach().cpu() for p in params])
        if mode == "8bit":
            results[-1] += [s.cpu() for p in params for s in opt.state[p].values()]
    for x, y in zip(*results):
        if x.dtype == torch.uint8:
            assert (x == y).float().mean() >= 0.99
        elif dtype == torch.float32:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        else:
            _ulp_close(x, y, "view")


# ---- 3. training integration ---------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_amp_skip_changes_nothing(mode, kernel_device):
    """A step GradScaler skips (found_inf) changes nothing: params, states, masters,
    compensations, the rounding count; the next unskipped step unscales."""
    dtype = _param_dtype(mode)
    params = [torch.nn.Parameter(torch.randn(n, dtype=torch.float64).to(dtype)
                                 .to(kernel_device)) for n in (7, 9000)]
    opt = fusedopt.AdamW(params, lr=1e-2, backend="triton", **MODES[mode])
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = fusedopt.AdamW(twin, lr=1e-2, backend="triton", **MODES[mode])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (the rounding count too)
    for q, p in zip(twin, params):
        q.data.copy_(p.data)
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    scale = torch.tensor(1024.0, device=kernel_device)
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.step(grad_scale=scale, found_inf=torch.ones((), device=kernel_device))
    assert bool(opt.last_step_skipped)
    after = opt.state_dict()
    assert all(torch.equal(p, v) for p, v in zip(params, before[1]))
    for k, state in before[0]["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][k][name], value), name
    assert after.get(precision.ROUNDING_KEY) == before[0].get(precision.ROUNDING_KEY)
    # an unskipped scaled step is the unscaled one
    for p, q in zip(params, twin):
        g = torch.randn_like(p)
        p.grad, q.grad = (g.float() * 1024).to(dtype), g
    opt.step(grad_scale=scale, found_inf=torch.zeros((), device=kernel_device))
    twin_opt.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_capturable_matches_eager(mode, kernel_device):
    dtype = _param_dtype(mode)
    results = []
    for capturable in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, dtype=torch.float64).to(dtype)
                                     .to(kernel_device)) for n in (5, 8200)]
        opt = fusedopt.Adam(params, lr=torch.tensor(1e-2, device=kernel_device),
                            capturable=capturable, backend="triton", **MODES[mode])
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(kernel_device)
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(x, y) for x, y in zip(*results))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", list(MODES))
def test_state_dict_round_trip_continues_exactly(mode, backend, request):
    """Save after 2 steps, load into a new optimizer (made without the options: the
    checkpoint's groups carry them, as torch's do), continue: the same as not stopping."""
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    device = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    dtype = _param_dtype(mode)
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype).to(device))
              for n in (3, 5000)]
    opt = fusedopt.NAdam(params, lr=1e-2, backend=backend, **MODES[mode])
    grads = [[torch.randn(p.shape, generator=gen).to(dtype).to(device) for p in params]
             for _ in range(4)]
    for step in range(2):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = fusedopt.NAdam(copies, lr=1e-2, backend=backend)
    resumed.load_state_dict(saved)
    for step in range(2, 4):
        for p, q, g in zip(params, copies, grads[step]):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        for name, value in opt.state[p].items():
            assert resumed.state[q][name].dtype == value.dtype, name
            assert torch.equal(resumed.state[q][name], value), name


def test_checkpoints_to_and_from_torch():
    """torch_state_dict() loads into torch.optim (full-precision states, no extras); a torch
    checkpoint loads into fusedopt with master weights (the masters start from the params,
    the states are kept in fp32)."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(300, generator=gen).bfloat16())
    opt = fusedopt.Adam([p], lr=1e-2, master_weights=True, backend="reference")
    p.grad = torch.randn(300, generator=gen).bfloat16()
    opt.step()
    converted = precision.torch_state_dict(opt.state_dict())
    assert set(converted["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert all(k not in converted["param_groups"][0] for k in precision.OPTIONS)
    q = torch.nn.Parameter(opt.state[p]["master_param"].clone())
    twin = torch.optim.Adam([q], lr=1e-2)
    twin.load_state_dict(converted)
    assert twin.state[q]["exp_avg"].dtype == torch.float32
    # and back: a torch checkpoint of bf16 params into fusedopt with master weights
    b = torch.nn.Parameter(torch.randn(300, generator=gen).bfloat16())
    torch_opt = torch.optim.Adam([b], lr=1e-2)
    b.grad = torch.randn(300, generator=gen).bfloat16()
    torch_opt.step()
    c = torch.nn.Parameter(b.detach().clone())
    ours = fusedopt.Adam([c], lr=1e-2, master_weights=True, backend="reference")
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.param_groups[0]["master_weights"] is True
    assert ours.state[c]["exp_avg"].dtype == torch.float32
    c.grad = torch.randn(300, generator=gen).bfloat16()
    ours.step()
    assert torch.equal(c.detach(), ours.state[c]["master_param"].to(torch.bfloat16))
    assert torch.equal(fusedopt.master_params(ours)[0], ours.state[c]["master_param"])


def test_fp32_params_in_the_group_are_updated_as_usual(kernel_device):
    """master_weights in a group of fp32 and bf16 params: the fp32 ones get no master (two
    buckets, a launch each) and follow torch exactly."""
    gen = torch.Generator().manual_seed(6)
    w32 = torch.nn.Parameter(torch.randn(100, generator=gen).to(kernel_device))
    w16 = torch.nn.Parameter(torch.randn(100, generator=gen).bfloat16().to(kernel_device))
    opt = fusedopt.AdamW([w32, w16], lr=1e-2, master_weights=True, backend="triton")
    ref = torch.nn.Parameter(w32.detach().clone())
    twin = torch.optim.AdamW([ref], lr=1e-2)
    for _ in range(2):
        g = torch.randn(100, generator=gen).to(kernel_device)
        w32.grad, ref.grad = g.clone(), g.clone()
        w16.grad = g.bfloat16()
        opt.step()
        twin.step()
    assert "master_param" not in opt.state[w32] and "master_param" in opt.state[w16]
    torch.testing.assert_close(w32, ref, rtol=1e-6, atol=1e-7)
    assert len(opt._buckets) == 2


def test_errors_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    with pytest.raises(ValueError, match="exclude each other"):
        fusedopt.AdamW([p], master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="exclude each other"):
        fusedopt.SGD([p], lr=0.1, kahan_summation=True, master_weights=True)
    with pytest.raises(ValueError, match="8bit.*step_size"):
        fusedopt.Rprop([p], state_dtype="8bit")
    with pytest.raises(ValueError, match="8bit.*ax"):
        fusedopt.ASGD([p], state_dtype="8bit")
    with pytest.raises(ValueError, match="8bit.*centered"):
        fusedopt.RMSprop([p], state_dtype="8bit", centered=True)
    with pytest.raises(ValueError, match="state_dtype"):
        fusedopt.Adam([p], state_dtype=torch.int8)
    with pytest.raises(ValueError, match="True or False"):
        fusedopt.Lion([p], master_weights="yes")
    with pytest.raises(TypeError):
        fusedopt.Adafactor([p], master_weights=True)
    opt = fusedopt.Muon([torch.nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(NotImplementedError, match="master_weights"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))],
                             "master_weights": True})
    # fp16 params cannot be rounded stochastically (to bf16): an error at the step
    h = torch.nn.Parameter(torch.randn(10).half())
    h.grad = torch.randn(10).half()
    opt = fusedopt.SGD([h], lr=0.1, stochastic_rounding=True)
    before = h.detach().clone()
    with pytest.raises(NotImplementedError, match="bfloat16"):
        opt.step()
    assert torch.equal(h, before)
    # a master replaced by hand with another dtype
    opt = fusedopt.AdamW([p], master_weights=True, backend="reference")
    p.grad = torch.randn(10).bfloat16()
    opt.step()
    opt.state[p]["master_param"] = opt.state[p]["master_param"].bfloat16()
    before = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    with pytest.raises(ValueError, match="master_param"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])
    # sparse grads with a precision option
    e = torch.nn.Parameter(torch.randn(6, 3).bfloat16())
    opt = fusedopt.SGD([e], lr=0.1, master_weights=True, backend="reference")
    e.grad = torch.sparse_coo_tensor([[1, 4]], torch.randn(2, 3), (6, 3)).bfloat16()
    with pytest.raises(NotImplementedError, match="sparse"):
        opt.step()


def test_options_are_group_options():
    """Kept in the defaults and every group, settable per group and changeable between
    steps (the params regroup), as torch's options are; at their defaults, written nowhere
    (defaults and state_dicts stay exactly torch's)."""
    a = torch.nn.Parameter(torch.randn(50).bfloat16())
    b = torch.nn.Parameter(torch.randn(50).bfloat16())
    opt = fusedopt.Adam([{"params": [a]}, {"params": [b], "kahan_summation": True}],
                        lr=1e-2, master_weights=False, backend="reference")
    assert opt.defaults == torch.optim.Adam([a], lr=1e-2).defaults
    assert opt.param_groups[1]["kahan_summation"] is True
    assert "kahan_summation" not in opt.param_groups[0]
    for p in (a, b):
        p.grad = torch.randn(50).bfloat16()
    opt.step()
    assert "kahan_comp" in opt.state[b] and "kahan_comp" not in opt.state[a]
    opt.param_groups[0]["master_weights"] = True
    opt.step()
    assert "master_param" in opt.state[a]
    assert torch.equal(a.detach(), opt.state[a]["master_param"].bfloat16())


@pytest.mark.parametrize(("width", "options"), [
    (16, {"master_weights": True}),
    (128, {"master_weights": True, "state_dtype": "8bit"}),  # (8,192 weights: 8-bit states)
], ids=["master", "master-8bit"])
def test_compiled_train_step_with_master_weights(width, options):
    """A compiled forward, backward and step (the step one fusedopt custom op) with master
    weights (and 8-bit states): the same params and states as eager."""
    torch.manual_seed(0)
    model = torch.nn.Linear(width, 64 if width > 16 else 4).bfloat16()
    twin = copy.deepcopy(model)
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, backend="reference", **options)
    eager = fusedopt.AdamW(twin.parameters(), lr=1e-2, backend="reference", **options)

    @torch.compile(backend="aot_eager")
    def train(x):
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        x = torch.randn(8, width).bfloat16()
        train(x)
        twin(x).float().square().mean().backward()
        eager.step()
        eager.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert list(opt.state[p]) == list(eager.state[q])
        assert all(torch.equal(v, eager.state[q][k]) for k, v in opt.state[p].items())
    if "state_dtype" in options:
        assert opt.state[model.weight]["exp_avg"].dtype == torch.uint8


# ---- hostile use (a review's attacks, each once a bug) ------------------------------------


def _backends():
    from conftest import KERNELS_RUNNABLE

    return ["reference", "triton"] if KERNELS_RUNNABLE else ["reference"]


@pytest.mark.parametrize("backend", _backends())
def test_a_param_changed_by_the_user_drops_its_compensation(backend):
    """Kahan: a compensation left for the old value is not added to a param the user changed
    (zeroed, or rebound); an Adagrad compensation starts at 0, not at the accumulator's value;
    an fp16 param that overflows keeps its inf (no inf - inf)."""
    p = torch.nn.Parameter(torch.full((4,), 100.0, dtype=torch.bfloat16))
    opt = fusedopt.SGD([p], lr=0.3, kahan_summation=True, backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["kahan_comp"].abs().max() > 0
    with torch.no_grad():
        p.zero_()
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, torch.zeros_like(p))
    p.data = torch.ones(4, dtype=torch.bfloat16)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, torch.ones_like(p))
    a = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = fusedopt.Adagrad([a], lr=0.0, initial_accumulator_value=1.0, kahan_summation=True,
                           backend=backend)
    a.grad = torch.ones_like(a)
    opt.step()
    assert torch.equal(a, torch.ones_like(a)) and not opt.state[a]["kahan_comp"].any()
    h = torch.nn.Parameter(torch.full((2,), 65000.0, dtype=torch.float16))
    opt = fusedopt.SGD([h], lr=1.0, kahan_summation=True, backend=backend)
    for _ in range(2):
        h.grad = torch.full_like(h, -1000.0)
        opt.step()
    assert torch.isinf(h).all()


@pytest.mark.parametrize("option", ["master_weights", "kahan_summation"])
def test_an_option_turned_off_drops_its_state(option):
    """Turned off, a mode's own state goes (turned on again it starts from the param, not
    from a value left steps ago), and master_params() gives the param."""
    p = torch.nn.Parameter(torch.full((3,), 100.0, dtype=torch.bfloat16))
    opt = fusedopt.SGD([p], lr=0.3, backend="reference", **{option: True})
    p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0][option] = False
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    assert not set(opt.state[p]) & {"master_param", "kahan_comp"}
    assert torch.equal(fusedopt.master_params(opt)[0], p.detach())
    opt.param_groups[0][option] = True
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(fusedopt.master_params(opt)[0].to(p.dtype), p.detach())


def test_invalid_or_conflicting_options_fail_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    q = torch.nn.Parameter(torch.randn(8).bfloat16())
    with pytest.raises(ValueError, match="exclude each other"):  # a group's own + a default
        fusedopt.AdamW([{"params": [p]}, {"params": [q], "master_weights": True}],
                       kahan_summation=True)
    opt = fusedopt.Adam([p], lr=1e-2, backend="reference")
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    for bad in ({"master_weights": True, "kahan_summation": True}, {"master_weights": "yes"},
                {"state_dtype": "int4"}):
        group = opt.param_groups[0]
        saved = dict(group)
        group.update(bad)
        with pytest.raises(ValueError):
            opt.step()
        group.clear()
        group.update(saved)
        assert torch.equal(p, before[0])
        assert all(torch.equal(opt.state[p][k], v) and opt.state[p][k].dtype == v.dtype
                   for k, v in before[1].items())
    # an fp16 param cannot round stochastically: the failed step converts nothing, and
    # reverting the options leaves a working optimizer
    h = torch.nn.Parameter(torch.randn(8).half())
    opt.add_param_group({"params": [h]})
    opt.param_groups[0]["state_dtype"] = torch.float32
    opt.param_groups[1]["stochastic_rounding"] = True
    p.grad, h.grad = torch.randn(8).bfloat16(), torch.randn(8).half()
    with pytest.raises(NotImplementedError):
        opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    opt.param_groups[0]["state_dtype"] = None
    opt.param_groups[1]["stochastic_rounding"] = False
    opt.step()


def test_copies_and_checkpoints_keep_the_rounding_state():
    """deepcopy continues with the same random bits (and draws nothing from torch's
    generator); a checkpoint from another device continues there; a malformed rounding entry,
    or a malformed extra state, is refused before anything changes."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300).bfloat16())
    opt = fusedopt.SGD([p], lr=1e-3, stochastic_rounding=True, backend="reference")
    p.grad = torch.randn(300).bfloat16()
    opt.step()
    twin = copy.deepcopy(opt)
    q = next(iter(twin.param_groups[0]["params"]))
    g = torch.randn(300).bfloat16()
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    generator = torch.get_rng_state()
    twin.step()
    assert torch.equal(generator, torch.get_rng_state())  # the copy drew no new seed
    assert torch.equal(p, q)
    saved = copy.deepcopy(opt.state_dict())
    saved[precision.ROUNDING_KEY]["counts"] = {"cuda:3": saved[precision.ROUNDING_KEY][
        "counts"]["cpu"]}  # saved by a rank on another device
    r = torch.nn.Parameter(p.detach().clone())
    resumed = fusedopt.SGD([r], lr=1e-3, backend="reference")
    resumed.load_state_dict(saved)
    g = torch.randn(300).bfloat16()
    p.grad, r.grad = g.clone(), g.clone()
    opt.step()
    resumed.step()
    assert torch.equal(p, r)
    resumed.param_groups[0]["lr"] = 0.5
    for bad in ({precision.ROUNDING_KEY: {"cpu": torch.tensor([1, 2])}},
                {"state": {0: {"master_param": torch.zeros(5)}}}):
        with pytest.raises(ValueError):
            resumed.load_state_dict({**saved, **bad})
        assert resumed.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_stochastic_rounding_kernel_bits_follow_memory_order(layout, kernel_device):
    """The random bits of an element are keyed by its place in memory, on both paths."""
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        if layout == "transposed":
            p = torch.nn.Parameter(torch.randn(30, 40, generator=gen).bfloat16().t())
        else:
            p = torch.nn.Parameter(torch.randn(2, 3, 4, 5, generator=gen).bfloat16()
                                   .to(memory_format=torch.channels_last))
        p.data = p.data.to(kernel_device)
        opt = fusedopt.SGD([p], lr=3e-3, stochastic_rounding=True, backend=backend)
        p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(kernel_device)
        opt.step()
        results.append(p.detach().cpu())
    assert torch.equal(*results)


def test_adagrad_state_before_the_first_step_is_in_the_modes_dtype():
    """Adagrad makes its state in torch's constructor: with master weights it is remade in
    fp32 at its initial value, so a state_dict taken before any step loads anywhere."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = fusedopt.Adagrad([p], initial_accumulator_value=0.3, master_weights=True,
                           backend="reference")
    state = opt.state[p]["sum"]
    assert state.dtype == torch.float32 and torch.equal(state, torch.full((4,), 0.3))
    saved = opt.state_dict()
    fusedopt.Adagrad([torch.nn.Parameter(p.detach().clone())]).load_state_dict(saved)
    torch.optim.Adagrad([torch.nn.Parameter(p.detach().float())]).load_state_dict(
        precision.torch_state_dict(saved))


def test_float64_params_with_bf16_states(kernel_device):
    """fp64 params with bf16 states: the kernel rounds through fp32, as torch converts."""
    results = []
    for backend in ("triton", "reference"):
        gen = torch.Generator().manual_seed(2)
        p = torch.nn.Parameter(torch.randn(300, generator=gen, dtype=torch.float64)
                               .to(kernel_device))
        opt = fusedopt.Adam([p], lr=1e-2, state_dtype="bf16", backend=backend)
        for _ in range(2):
            p.grad = torch.randn(300, generator=gen, dtype=torch.float64).to(kernel_device)
            opt.step()
        results.append((p.detach().cpu(), opt.state[p]["exp_avg"].cpu()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    assert torch.equal(results[0][1], results[1][1])


# ---- 8-bit states ----------------------------------------------------------------------------


def test_dynamic_codes_are_bitsandbytes():
    """bitsandbytes' dynamic code: 256 sorted values; signed: 127 negative, 0, 128 positive
    up to 1 (the largest below 1 the midpoint of the last of 64 steps of [0.1, 1]); unsigned:
    0 up to 1, twice as fine; each decade 1e-6 .. 1 has its share."""
    signed, unsigned = quantization.dynamic_code(True), quantization.dynamic_code(False)
    for code in (signed, unsigned):
        assert code.shape == (256,) and code.dtype == torch.float32
        assert (code.diff() > 0).all()
        assert code[-1] == 1.0 and (code == 0).sum() == 1
    assert (signed < 0).sum() == 127 and signed[0] == -signed[-2]
    assert signed[-2].item() == pytest.approx(1 - 0.9 / 128, rel=1e-6)
    assert unsigned[0] == 0 and unsigned[-2].item() == pytest.approx(1 - 0.9 / 256, rel=1e-6)
    assert signed[128].item() == pytest.approx(0.55e-6, rel=1e-6)  # the smallest positive
    assert torch.equal(quantization.code_table("cpu"), torch.stack([signed, unsigned]))
    # the stored byte 0 is the value 0 in both codes (a state zeroed in place reads 0)
    for is_signed, code in ((True, signed), (False, unsigned)):
        index = quantization.index_of(torch.arange(256, dtype=torch.uint8), is_signed)
        assert code[index[0]] == 0 and sorted(index.tolist()) == list(range(256))
        assert torch.equal(quantization.byte_of(index, is_signed),
                           torch.arange(256, dtype=torch.uint8))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_picks_the_nearest_code_per_memory_block(layout, signed):
    """quantize(): each block of 256 elements in memory order gets its largest magnitude as
    absmax, and each element the code nearest to x / absmax (ties to the lower code, checked
    against every code); dequantize() gives code times absmax. Values span seven decades."""
    from fusedopt.reference import dequantize, quantize

    gen = torch.Generator().manual_seed(3)
    shape = {"contiguous": (1000,), "transposed": (40, 30), "channels_last": (3, 5, 7, 11)}
    x = torch.randn(shape[layout], generator=gen) * 10.0 ** (
        -6 * torch.rand(shape[layout], generator=gen))
    if layout == "transposed":
        x = x.t()
    elif layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if not signed:
        x = x.abs()
    x[..., 0] = 0.0
    codes, absmax = quantize(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert codes.stride() == x.stride()
    # memory order: the dims by decreasing stride
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    flat = x.permute(order).reshape(-1)
    flat_codes = quantization.index_of(codes.permute(order).reshape(-1), signed)
    blocks = torch.arange(flat.numel()) // 256
    expected_absmax = torch.zeros(quantization.num_blocks(flat.numel())).index_reduce_(
        0, blocks, flat.abs(), "amax")
    assert torch.equal(absmax, expected_absmax)
    code = quantization.dynamic_code(signed)
    normalized = flat / expected_absmax[blocks]
    distance = (code[None, :] - normalized[:, None]).abs()
    nearest = distance.argmin(dim=1)  # (the first of equal distances: the lower code)
    if not signed:  # a positive value never becomes 0: its smallest positive code instead
        assert ((nearest == 0) & (normalized > 0)).any()  # (the rule is exercised)
        nearest = torch.where((nearest == 0) & (normalized > 0), 1, nearest)
    assert torch.equal(flat_codes, nearest)
    values = dequantize(codes, absmax, signed)
    assert torch.equal(values.permute(order).reshape(-1),
                       code[flat_codes] * expected_absmax[blocks])
    error = (values.permute(order).reshape(-1) - flat).abs()
    assert (error <= code.diff().max() / 2 * 1.001 * expected_absmax[blocks]).all()


@pytest.mark.parametrize("case_id", ["adamw-default", "sgd-momentum-dampening-wd",
                                     "adagrad-decay-init-wd", "rmsprop-default"])
def test_8bit_states_are_fp32_states_quantized(case_id):
    """fp32 params with 8-bit states: after a first step, the param is torch's fp32 step
    and each state is torch's fp32 state quantized; a step from dequantized states is torch's
    step from those states; the run stays near torch's."""
    case = CASE_BY_ID[case_id]
    params = make_params((((5000,),),), torch.float32)
    twin_params = [[p.detach().clone().requires_grad_() for p in g] for g in params]
    opt = _make(case, params, "reference", state_dtype="8bit")
    twin = case.make_torch(twin_params)
    (p,), (q,) = _flat(params), _flat(twin_params)
    start = p.detach().clone()
    for step in range(8):
        grads = _grads([p], step)
        _set([p], grads)
        _set([q], grads)
        if step == 4:  # from here, torch starts from our (dequantized) states
            q.data.copy_(p.data)
            for name, value in twin.state[q].items():
                if isinstance(value, torch.Tensor) and value.dim():
                    absmax = opt.state[p][quantization.absmax_name(name)]
                    value.copy_(precision.dequantized(opt.state[p][name], absmax, name))
        opt.step()
        twin.step()
        if step in (0, 4):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            for name, value in twin.state[q].items():
                if isinstance(value, torch.Tensor) and value.dim():
                    codes, absmax = precision.quantized(value, name)
                    assert opt.state[p][name].dtype == torch.uint8
                    _codes_close(opt.state[p][name], opt.state[p][quantization.absmax_name(name)],
                                 codes, absmax, name, f"{case_id} step {step}")
    moved = (q.detach() - start).abs().max().item()
    torch.testing.assert_close(p, q, rtol=0, atol=0.05 * moved)


def test_small_params_keep_full_precision_states(kernel_device):
    """Params below quantization.MIN_NUMEL elements keep their states in full precision
    (their own bucket, one more launch); from MIN_NUMEL on, states are 8-bit."""
    small = torch.nn.Parameter(torch.randn(quantization.MIN_NUMEL - 1, device=kernel_device))
    large = torch.nn.Parameter(torch.randn(quantization.MIN_NUMEL, device=kernel_device))
    opt = fusedopt.AdamW([small, large], state_dtype="8bit", backend="triton")
    for p in (small, large):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    assert "exp_avg_absmax" not in opt.state[small]
    assert opt.state[large]["exp_avg"].dtype == torch.uint8
    assert opt.state[large]["exp_avg_absmax"].shape == (quantization.MIN_NUMEL // 256,)
    assert len(opt._buckets) == 2


def test_8bit_checkpoints_to_and_from_torch_and_option_changes():
    """torch_state_dict() dequantizes 8-bit states (absmax left out) and loads into
    torch.optim; a torch checkpoint loads into an 8-bit optimizer, quantized; turning the
    option off dequantizes the states (and drops the absmax), turning it on quantizes."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    opt = fusedopt.AdamW([p], lr=1e-2, state_dtype="8bit", backend="reference")
    p.grad = torch.randn(5000, generator=gen)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    converted = precision.torch_state_dict(opt.state_dict())
    assert set(converted["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(converted["state"][0][name], precision.dequantized(
            state[name], state[quantization.absmax_name(name)], name))
    q = torch.nn.Parameter(p.detach().clone())
    twin = torch.optim.AdamW([q], lr=1e-2)
    twin.load_state_dict(converted)
    assert torch.equal(twin.state[q]["exp_avg"], converted["state"][0]["exp_avg"])
    g = torch.randn(5000, generator=gen)
    q.grad = g.clone()
    twin.step()
    # and back: torch's fp32 checkpoint into fusedopt with 8-bit states
    r = torch.nn.Parameter(q.detach().clone())
    ours = fusedopt.AdamW([r], lr=1e-2, state_dtype="8bit", backend="reference")
    ours.load_state_dict(twin.state_dict())
    for name in ("exp_avg", "exp_avg_sq"):
        codes, absmax = precision.quantized(twin.state[q][name], name)
        assert torch.equal(ours.state[r][name], codes)
        assert torch.equal(ours.state[r][quantization.absmax_name(name)], absmax)
    # the option turned off and on again between steps
    ours.param_groups[0]["state_dtype"] = None
    r.grad = torch.randn(5000, generator=gen)
    before = precision.dequantized(ours.state[r]["exp_avg"], ours.state[r]["exp_avg_absmax"],
                                   "exp_avg")
    ours.step()
    assert ours.state[r]["exp_avg"].dtype == torch.float32
    assert set(ours.state[r]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(ours.state[r]["exp_avg"], 0.9 * before + 0.1 * r.grad)
    ours.param_groups[0]["state_dtype"] = "8bit"
    ours.step()
    assert ours.state[r]["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in ours.state[r]


def test_8bit_bad_states_fail_before_anything_changes():
    """An absmax deleted or replaced by hand, or a checkpoint whose 8-bit states lack theirs
    or have them misshapen, raise ValueError before anything changes."""
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    opt = fusedopt.Adam([p], lr=1e-2, state_dtype="8bit", backend="reference")
    p.grad = torch.randn(5000, generator=gen)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}

    def unchanged():
        assert torch.equal(p, before[0])
        assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())

    for bad in (None, torch.zeros(3), torch.zeros(20, dtype=torch.float64)):
        broken = copy.deepcopy(saved)
        if bad is None:
            del broken["state"][0]["exp_avg_absmax"]
        else:
            broken["state"][0]["exp_avg_absmax"] = bad
        with pytest.raises(ValueError, match="exp_avg_absmax"):
            opt.load_state_dict(broken)
        unchanged()
    absmax = opt.state[p].pop("exp_avg_absmax")
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.step()
    assert torch.equal(p, before[0])
    opt.state[p]["exp_avg_absmax"] = absmax[:3].clone()
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.step()
    opt.state[p]["exp_avg_absmax"] = absmax
    unchanged()
    opt.step()  # and it goes on


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_8bit_blocks_follow_memory_order_in_the_kernel(layout, kernel_device):
    """The kernel's quantization blocks are runs of 256 elements in memory, as the
    reference's: the same codes and absmax for params laid out otherwise than row-major."""
    results = []
    for backend in ("triton", "reference"):
        gen = torch.Generator().manual_seed(8)
        if layout == "transposed":
            p = torch.nn.Parameter(torch.randn(70, 80, generator=gen).t())
        else:
            p = torch.nn.Parameter(torch.randn(2, 64, 8, 5, generator=gen)
                                   .to(memory_format=torch.channels_last))
        p.data = p.data.to(kernel_device)
        opt = fusedopt.Adam([p], lr=1e-2, state_dtype="8bit", backend=backend)
        for _ in range(2):
            p.grad = torch.randn(p.shape, generator=gen).to(kernel_device)
            opt.step()
        assert opt.state[p]["exp_avg"].stride() == p.stride()
        results.append({k: v.cpu() for k, v in opt.state[p].items()})
    for name in ("exp_avg", "exp_avg_sq"):
        absmax = quantization.absmax_name(name)
        _codes_close(results[0][name], results[0][absmax], results[1][name],
                     results[1][absmax], name, f"{layout} {name}")


def test_8bit_non_finite_values_poison_their_block(kernel_device):
    """A NaN or infinite state value (a diverged run without GradScaler) makes its whole
    block read back as non-finite, on both backends alike; other blocks are untouched."""
    results = []
    for backend in ("triton", "reference"):
        gen = torch.Generator().manual_seed(9)
        p = torch.nn.Parameter(torch.randn(5000, generator=gen).to(kernel_device))
        opt = fusedopt.AdamW([p], lr=1e-3, state_dtype="8bit", backend=backend)
        g = torch.randn(5000, generator=gen)
        g[300], g[3000] = float("nan"), float("inf")
        p.grad = g.to(kernel_device)
        opt.step()
        state = {k: v.cpu() for k, v in opt.state[p].items()}
        values = precision.dequantized(state["exp_avg"], state["exp_avg_absmax"], "exp_avg")
        blocks = values.reshape(-1)[:4864].reshape(-1, 256)
        poisoned = ~blocks.isfinite().all(dim=1)
        assert poisoned.nonzero().flatten().tolist() == [1, 11]
        assert (~blocks[1].isfinite()).all() and blocks[0].isfinite().all()
        results.append(state)
    assert all(torch.equal(results[0][k], results[1][k]) for k in ("exp_avg", "exp_avg_sq"))


def test_adagrad_state_made_by_torchs_constructor_is_8bit():
    """Adagrad makes its state in torch's constructor: with 8-bit states it is remade,
    quantized at its initial value, so a state_dict taken before any step is fusedopt's and
    converts to torch's."""
    p = torch.nn.Parameter(torch.zeros(5000))
    opt = fusedopt.Adagrad([p], initial_accumulator_value=0.3, state_dtype="8bit",
                           backend="reference")
    state = opt.state[p]
    assert state["sum"].dtype == torch.uint8
    assert torch.equal(precision.dequantized(state["sum"], state["sum_absmax"], "sum"),
                       torch.full((5000,), 0.3))
    converted = precision.torch_state_dict(opt.state_dict())
    torch.optim.Adagrad([torch.nn.Parameter(p.detach().clone())]).load_state_dict(converted)
    assert torch.equal(converted["state"][0]["sum"], torch.full((5000,), 0.3))


@pytest.mark.parametrize("backend", _backends())
def test_8bit_state_zeroed_in_place_reads_zero(backend):
    """A zero byte is the value 0 in both codes: moments reset in place
    (``state["exp_avg"].zero_()``) continue as torch's moments reset to zeros would."""
    gen = torch.Generator().manual_seed(10)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    opt = fusedopt.Adam([p], lr=1e-2, state_dtype="8bit", backend=backend)
    twin = torch.optim.Adam([q], lr=1e-2)
    for step in range(3):
        g = torch.randn(5000, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
        if step == 2:  # both reset their moments; the params are made equal too
            for name in ("exp_avg", "exp_avg_sq"):
                opt.state[p][name].zero_()
                twin.state[q][name].zero_()
            q.data.copy_(p.data)
        opt.step()
        twin.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for name in ("exp_avg", "exp_avg_sq"):
        codes, absmax = precision.quantized(twin.state[q][name], name)
        _codes_close(opt.state[p][name], opt.state[p][quantization.absmax_name(name)], codes,
                     absmax, name, name)


@pytest.mark.parametrize("backend", _backends())
def test_8bit_codes_follow_a_param_re_laid_out(backend):
    """A param re-laid through ``p.data`` (channels_last) after its 8-bit states exist, or a
    checkpoint of another layout: the codes are quantized again in the param's layout (the
    blocks are runs of memory), so that the kernel reads each element with its own block's
    absmax; the run stays next to the same run with fp32 states."""
    gen = torch.Generator().manual_seed(12)
    start = torch.randn(4, 16, 8, 10, generator=gen)
    grads = [torch.randn(4, 16, 8, 10, generator=gen) for _ in range(4)]
    runs = []
    for state_dtype in ("8bit", None):
        p = torch.nn.Parameter(start.clone())
        opt = fusedopt.Adam([p], lr=1e-2, state_dtype=state_dtype, backend=backend)
        for step, g in enumerate(grads):
            if step == 2:
                p.data = p.data.to(memory_format=torch.channels_last)
            p.grad = g.clone().to(memory_format=torch.channels_last if step >= 2 else
                                  torch.contiguous_format)
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]))
    (p8, state), (p32, full) = runs
    assert state["exp_avg"].stride() == p8.stride()
    values = precision.dequantized(state["exp_avg"], state["exp_avg_absmax"], "exp_avg")
    assert (values - full["exp_avg"]).abs().max() <= 0.02 * full["exp_avg"].abs().max()
    assert (p8 - p32).abs().max() <= 0.05 * (p32 - start).abs().max()


def test_8bit_checkpoints_are_not_torchs_and_bad_absmax_fails_cleanly():
    """A raw 8-bit state_dict keeps codes under ``<state>_codes``: torch.optim, given one,
    fails at its step before changing anything (it cannot take codes for values), and
    torch_state_dict() is the way out. A non-contiguous absmax, given by hand or in a
    checkpoint, is refused before anything changes; so is a conversion that would read a
    missing absmax (nothing half converted), which works once the absmax is back."""
    gen = torch.Generator().manual_seed(13)
    a = torch.nn.Parameter(torch.randn(5000, generator=gen))
    b = torch.nn.Parameter(torch.randn(5000, generator=gen))
    opt = fusedopt.AdamW([a, b], lr=1e-2, state_dtype="8bit", backend="reference")
    for p in (a, b):
        p.grad = torch.randn(5000, generator=gen)
    opt.step()
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"step", "exp_avg_codes", "exp_avg_sq_codes",
                                      "exp_avg_absmax", "exp_avg_sq_absmax"}
    q = torch.nn.Parameter(a.detach().clone())
    twin = torch.optim.AdamW([q], lr=1e-2)
    twin.load_state_dict({"state": {0: saved["state"][0]},
                          "param_groups": [{**saved["param_groups"][0], "params": [0]}]})
    q.grad = torch.randn(5000, generator=gen)
    with pytest.raises(KeyError, match="exp_avg"):
        twin.step()
    assert torch.equal(q, a)
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        precision.torch_state_dict({**saved, "state": {0: {
            k: v for k, v in saved["state"][0].items() if k != "exp_avg_absmax"}}})
    # a non-contiguous absmax: by hand, and in a checkpoint
    before = {k: v.clone() for k, v in opt.state[a].items()}
    strided = torch.zeros(20, 2)
    strided[:, 0] = before["exp_avg_absmax"]
    opt.state[a]["exp_avg_absmax"] = strided[:, 0]
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step()
    assert torch.equal(a, q) and torch.equal(strided[:, 1], torch.zeros(20))
    broken = copy.deepcopy(saved)
    broken["state"][0]["exp_avg_absmax"] = strided[:, 0]
    with pytest.raises(ValueError, match="contiguous"):
        opt.load_state_dict(broken)
    opt.state[a]["exp_avg_absmax"] = before["exp_avg_absmax"]
    # a conversion that would read a missing absmax converts nothing
    absmax = opt.state[b].pop("exp_avg_absmax")
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.step()
    assert opt.state[a]["exp_avg"].dtype == torch.uint8
    opt.state[b]["exp_avg_absmax"] = absmax
    opt.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in (a, b))


@pytest.mark.parametrize("backend", _backends())
def test_8bit_relay_keeps_sgds_fresh_buffer_and_skips_same_order(backend):
    """Re-quantizing codes in a re-laid param's layout keeps SGD's "fresh buffer" flag (a
    step AMP skipped made the buffer; the first step that runs takes buf = grad, as torch's
    first step); strides that differ on size-1 dims only (a 1x1 conv's weight made
    channels_last) are the same memory order: nothing is quantized again."""
    gen = torch.Generator().manual_seed(14)
    p = torch.nn.Parameter(torch.randn(8, 16, 8, 8, generator=gen))
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, state_dtype="8bit",
                       backend=backend)
    g = torch.randn(p.shape, generator=gen)
    p.grad = g.clone()
    opt.step(grad_scale=torch.tensor(1.0), found_inf=torch.tensor(1.0))  # skipped
    p.data = p.data.to(memory_format=torch.channels_last)
    p.grad = g.clone().to(memory_format=torch.channels_last)
    opt.step(grad_scale=torch.tensor(1.0), found_inf=torch.tensor(0.0))
    state = opt.state[p]
    buf = precision.dequantized(state["momentum_buffer"], state["momentum_buffer_absmax"],
                                "momentum_buffer")
    assert state["momentum_buffer"].stride() == p.stride()
    codes, absmax = precision.quantized(g.to(memory_format=torch.channels_last),
                                        "momentum_buffer")  # (buf = g, in the param's blocks)
    assert torch.equal(buf, precision.dequantized(codes, absmax, "momentum_buffer"))
    # a 1x1 conv's weight: channels_last changes the strides, not the memory order (the
    # states after another step are those of the run that kept its layout)
    results = []
    for relay in (False, True):
        gen = torch.Generator().manual_seed(16)
        w = torch.nn.Parameter(torch.randn(64, 128, 1, 1, generator=gen))
        opt = fusedopt.Adam([w], lr=1e-2, state_dtype="8bit", backend=backend)
        for step in range(2):
            if relay and step == 1:
                w.data = w.data.to(memory_format=torch.channels_last)
            w.grad = torch.randn(w.shape, generator=gen).to(
                memory_format=torch.channels_last if relay and step else
                torch.contiguous_format)
            opt.step()
        results.append(opt.state[w])
    assert all(torch.equal(v, results[1][k]) for k, v in results[0].items())


def test_8bit_from_torch_checkpoints_of_any_layout():
    """torch.optim checkpoints whose states are not dense (slices of a fused state) or laid
    out otherwise than the param load into 8-bit states, quantized once, in the param's
    layout; a torch state that merely ends in "_codes" keeps its name."""
    gen = torch.Generator().manual_seed(15)
    p = torch.nn.Parameter(torch.randn(64, 128, generator=gen))
    fused = torch.randn(64, 384, generator=gen)
    state = {"step": torch.tensor(3.0), "exp_avg": fused[:, :128],
             "exp_avg_sq": fused[:, 128:256].abs().t().contiguous().t(),
             "cluster_codes": torch.arange(5, dtype=torch.uint8)}
    saved = {"state": {0: state}, "param_groups": [
        {**torch.optim.Adam([p]).state_dict()["param_groups"][0], "params": [0]}]}
    opt = fusedopt.Adam([p], state_dtype="8bit", backend="reference")
    opt.load_state_dict(saved)
    ours = opt.state[p]
    assert torch.equal(ours["cluster_codes"], state["cluster_codes"])
    for name in ("exp_avg", "exp_avg_sq"):
        assert ours[name].dtype == torch.uint8 and ours[name].stride() == p.stride()
        codes, absmax = precision.quantized(state[name].contiguous(), name)
        assert torch.equal(ours[name], codes)
        assert torch.equal(ours[quantization.absmax_name(name)], absmax)
