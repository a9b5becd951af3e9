"""fusedopt.LBFGS against torch.optim.LBFGS, and the multi-tensor vector kernels it runs on.

Trajectories are compared step by step in float64 (params, returned loss, n_iter, func_evals,
the history and the state vectors), on the reference backend and on the triton kernels (the
CPU interpreter here, so the triton runs are short: few tensors, few iterations). Differences
come only from the summation order of dot products and norms (about 1e-16 relative, grown
to 1e-13 over these runs).
"""

import copy
import inspect
import io
import pickle

import pytest
import torch

import fusedopt
from fusedopt import kernels

F64 = torch.float64
RTOL = 1e-10  # params, losses
ATOL = 1e-12  # times the largest |value| of the compared tensor
STATE_RTOL = 1e-8  # state vectors (d, history): differences of nearly equal gradients


@pytest.fixture(params=["reference", "triton"])
def backend_device(request) -> tuple[str, str]:
    """(backend, device): the reference path on the CPU, the kernels where they run."""
    if request.param == "triton":
        return "triton", request.getfixturevalue("kernel_device")
    return "reference", "cpu"


# ---- problems -----------------------------------------------------------------------------------


def rosenbrock(device, seed=0, sizes=((1,), (3,), (2, 3))):
    """The N-dimensional Rosenbrock function over params of odd shapes (10 elements)."""
    gen = torch.Generator().manual_seed(seed)
    start = [(torch.rand(s, generator=gen, dtype=F64) * 2 - 1.5).to(device) for s in sizes]

    def loss_fn(params):
        x = torch.cat([p.reshape(-1) for p in params])
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    return start, loss_fn


def mlp(device, seed=0, hidden=5):
    """A 3-hidden-1 tanh MLP on fresh random regression data: four tensors."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 3, generator=gen, dtype=F64)
    y = torch.sin(x @ torch.randn(3, 1, generator=gen, dtype=F64))
    y += 0.05 * torch.randn(y.shape, generator=gen, dtype=F64)
    x, y = x.to(device), y.to(device)
    shapes = ((hidden, 3), (hidden,), (1, hidden), (1,))
    start = [(0.5 * torch.randn(s, generator=gen, dtype=F64)).to(device) for s in shapes]

    def loss_fn(params):
        w1, b1, w2, b2 = params
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    return start, loss_fn


def clone_leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def make_closure(opt, params, loss_fn, set_to_none=True):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = loss_fn(params)
        loss.backward()
        return loss
    return closure


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, where=""):
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1e-300),
                               msg=lambda m: f"{where}: {m}")


def assert_same_state(fused, torch_opt, where=""):
    """n_iter, func_evals and history length equal; the state vectors close. The y vectors
    (old_dirs) are differences of grads: they are compared at the grads' scale."""
    a = fused.state_dict()["state"].get(0, {})
    b = torch_opt.state_dict()["state"].get(0, {})
    assert list(a) == list(b), f"{where}: state keys {list(a)} != {list(b)}"
    for key in ("n_iter", "func_evals"):
        assert a[key] == b[key], f"{where}: {key} {a[key]} != {b[key]}"
    for key in ("d", "prev_flat_grad"):
        if key in a:
            assert_close(a[key], b[key], STATE_RTOL, ATOL, f"{where} {key}")
    for key in ("old_dirs", "old_stps"):
        if key in a:
            assert len(a[key]) == len(b[key]), f"{where}: {key} length"
            for i, (va, vb) in enumerate(zip(a[key], b[key])):
                scale = b["prev_flat_grad"] if key == "old_dirs" else vb
                atol = ATOL * scale.abs().max().item() / max(vb.abs().max().item(), 1e-300)
                assert_close(va, vb, STATE_RTOL, atol, f"{where} {key}[{i}]")


def run_side_by_side(problem, backend, device, steps, set_to_none=True, **options):
    """Step fusedopt.LBFGS and torch.optim.LBFGS from the same start; compare every step."""
    start, loss_fn = problem(device)
    params_f, params_t = clone_leaves(start), clone_leaves(start)
    fused = fusedopt.LBFGS(params_f, backend=backend, **options)
    reference = torch.optim.LBFGS(params_t, **options)
    for step in range(steps):
        loss_f = fused.step(make_closure(fused, params_f, loss_fn, set_to_none))
        loss_t = reference.step(make_closure(reference, params_t, loss_fn, set_to_none))
        assert_close(loss_f, loss_t, where=f"step {step} loss")
        for i, (pf, pt) in enumerate(zip(params_f, params_t)):
            assert_close(pf, pt, where=f"step {step} param {i}")
        assert_same_state(fused, reference, f"step {step}")
    return fused, reference, params_f, params_t


# ---- trajectories -------------------------------------------------------------------------------

# Short on the interpreter, and still: history shifts (history_size 2), both line searches.
TRAJECTORY = {"max_iter": 4, "history_size": 2}


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_rosenbrock_trajectory(backend_device, line_search_fn):
    backend, device = backend_device
    # grads zeroed in place: the line search must keep copies of the grads it returns
    fused, reference, *_ = run_side_by_side(rosenbrock, backend, device, steps=2,
                                            set_to_none=False, line_search_fn=line_search_fn,
                                            **TRAJECTORY)
    assert fused.state[fused._params[0]]["n_iter"] == 8


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_mlp_trajectory(backend_device, line_search_fn):
    backend, device = backend_device
    # lr 5 with the line search: some searches take a second evaluation (interpolation)
    run_side_by_side(mlp, backend, device, steps=2, lr=5.0 if line_search_fn else 1.0,
                     line_search_fn=line_search_fn, **TRAJECTORY)


@pytest.mark.parametrize("options", [
    pytest.param({"steps": 1}, id="defaults"),  # 20 fixed-length iterations
    pytest.param({"steps": 2, "line_search_fn": "strong_wolfe"}, id="wolfe-defaults"),
    pytest.param({"max_iter": 6, "max_eval": 4}, id="max-eval"),
    pytest.param({"max_iter": 6, "max_eval": 9, "line_search_fn": "strong_wolfe"},
                 id="wolfe-max-eval"),
    pytest.param({"lr": 0.5, "max_iter": 5, "history_size": 3}, id="lr"),
    pytest.param({"lr": torch.tensor(0.7, dtype=F64), "max_iter": 5}, id="lr-tensor"),
    pytest.param({"tolerance_change": 1e-2}, id="tolerance-change"),
    pytest.param({"tolerance_grad": 5.0, "line_search_fn": "strong_wolfe"},
                 id="tolerance-grad"),
])
@pytest.mark.parametrize("problem", [rosenbrock, mlp], ids=["rosenbrock", "mlp"])
def test_reference_options(problem, options):
    """Every stopping rule and option, on the reference path (the logic the backends share)."""
    options = {"steps": 3} | options
    run_side_by_side(problem, "reference", "cpu", **options)


def test_rejected_pairs_and_params_without_grad(backend_device):
    """A linear loss has no curvature: every (y, s) pair fails y.s > 1e-10 and is dropped.
    One param takes no part (its grad stays None): torch counts it as zeros."""
    backend, device = backend_device
    coeffs = torch.tensor([0.3, -1.2, 0.5], dtype=F64, device=device)
    start = [torch.ones(3, dtype=F64, device=device), torch.ones(2, dtype=F64, device=device)]

    def problem(device):
        return start, lambda params: (coeffs * params[0]).sum()

    fused, _, params_f, _ = run_side_by_side(problem, backend, device, steps=2, lr=0.1,
                                             max_iter=3)
    assert fused.state[params_f[0]]["n_iter"] >= 3  # (max_eval, 3, ends each step early)
    assert fused.state[params_f[0]]["old_dirs"] == []
    assert params_f[1].grad is None and torch.equal(params_f[1].detach(), start[1])


def test_optimum_returns_at_once(backend_device):
    """At the minimum (grad 0) step evaluates once and returns, as torch does."""
    backend, device = backend_device
    start = [torch.ones(3, dtype=F64, device=device), torch.ones(2, dtype=F64, device=device)]
    _, loss_fn = rosenbrock(device)
    params_f, params_t = clone_leaves(start), clone_leaves(start)
    fused = fusedopt.LBFGS(params_f, backend=backend)
    reference = torch.optim.LBFGS(params_t)
    for opt, params in ((fused, params_f), (reference, params_t)):
        assert opt.step(make_closure(opt, params, loss_fn)).item() == 0.0
    assert_same_state(fused, reference)
    assert dict(fused.state[params_f[0]]) == {"func_evals": 1, "n_iter": 0}


def test_complex_params_like_torch(backend_device):
    """Complex params are optimized as their real views, as torch does."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(4, dtype=torch.complex128, generator=gen).to(device)
    start = [torch.randn(4, dtype=torch.complex128, generator=gen).to(device),
             torch.randn(2, dtype=F64, generator=gen).to(device)]

    def problem(device):
        def loss_fn(params):
            z, r = params
            return ((z - target).abs() ** 2).sum() + (z.real[:2] * r).sum() ** 2 + (r ** 4).sum()
        return start, loss_fn

    run_side_by_side(problem, backend, device, steps=2, max_iter=3, history_size=2,
                     line_search_fn="strong_wolfe")


def test_sparse_grads_densified_like_torch():
    """torch.optim.LBFGS makes sparse grads dense (it does not refuse them): so does this."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 2, dtype=F64, generator=gen)
    bias = torch.randn(2, dtype=F64, generator=gen)
    index = torch.tensor([0, 2, 2, 5])

    def problem(device):
        def loss_fn(params):
            rows = torch.nn.functional.embedding(index, params[0], sparse=True)
            return ((rows + params[1] - 1.0) ** 2).sum() + (rows ** 4).sum()
        return [weight, bias], loss_fn

    fused, *_, params_f, _ = run_side_by_side(problem, "reference", "cpu", steps=2,
                                              max_iter=4)
    assert params_f[0].grad.is_sparse


def test_line_search_keeps_copies_of_gradients():
    """Gradients the line search keeps (its bracket) are copies: a closure that zeroes the
    grads in place (zero_grad(set_to_none=False)) must not change them afterwards. (The
    trajectories rarely show it: the line search mostly returns its last evaluation.)"""
    start, loss_fn = rosenbrock("cpu")
    params = clone_leaves(start)
    opt = fusedopt.LBFGS(params, max_iter=1, line_search_fn="strong_wolfe", backend="reference")
    closure = make_closure(opt, params, loss_fn, set_to_none=False)
    opt.step(closure)
    closure = torch.enable_grad()(closure)  # as step runs it
    x = opt._new_vector()
    opt._ops.copy(opt._param_vector, x)
    d = opt.state[params[0]]["d"]
    with torch.no_grad():
        _, first = opt._evaluate_along(closure, x, 0.5, d)
        expected = [t.clone() for t in first]
        live = opt._gather_grads()
        assert live.live and opt._own(live) is not live
        _, second = opt._evaluate_along(closure, x, 0.25, d)
    assert all(torch.equal(a, b) for a, b in zip(first, expected))
    assert not all(torch.equal(a, b) for a, b in zip(second, expected))
    assert all(torch.equal(p, q) for p, q in zip(opt._param_vector, x))  # moved back


# ---- one launch per operation, whatever the number of tensors ----------------------------------


def test_launches_do_not_grow_with_tensors(kernel_device):
    """The same problem split into 3 or into 9 tensors costs the same launches per step."""
    counts = []
    for pieces in (3, 9):
        gen = torch.Generator().manual_seed(5)
        x = torch.rand(18, generator=gen, dtype=F64) * 2 - 1.5
        params = [t.clone().to(kernel_device).requires_grad_() for t in x.chunk(pieces)]

        def loss_fn(ps):
            v = torch.cat(ps)
            return (100 * (v[1:] - v[:-1] ** 2) ** 2 + (1 - v[:-1]) ** 2).sum()

        opt = fusedopt.LBFGS(params, max_iter=2, backend="triton")
        before = kernels.vector_launch_count()
        opt.step(make_closure(opt, params, loss_fn))
        counts.append(kernels.vector_launch_count() - before)
    assert counts[0] == counts[1] > 0


# ---- construction and validation, as torch ------------------------------------------------------


def _error(fn, *args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return type(info.value), str(info.value)


def _param(n=3):
    return torch.zeros(n, dtype=F64, requires_grad=True)


@pytest.mark.parametrize("args", [
    pytest.param(lambda: ([_param()],), id="ok"),
    pytest.param(lambda: ([_param()], -1.0), id="negative-lr"),
    pytest.param(lambda: ([_param()], torch.tensor([1.0, 2.0])), id="lr-two-elements"),
    pytest.param(lambda: ([{"params": [_param()]}, {"params": [_param()], "lr": 0.1}],),
                 id="param-groups"),
    pytest.param(lambda: ([],), id="empty"),
    pytest.param(lambda: (_param(),), id="tensor-not-iterable-of-tensors"),
    pytest.param(lambda: ([_param()[1:]],), id="non-leaf"),
])
def test_constructor_matches_torch(args):
    """Same errors (type and message) as torch.optim.LBFGS, or the same defaults and groups."""
    built = []
    for cls in (fusedopt.LBFGS, torch.optim.LBFGS):
        try:
            built.append(cls(*args()))
        except Exception as e:  # noqa: BLE001 - the error itself is compared
            built.append((type(e), str(e)))
    fused, reference = built
    if isinstance(reference, tuple):
        assert fused == reference
    else:
        assert isinstance(fused, torch.optim.LBFGS)
        assert fused.defaults == reference.defaults
        assert [{k: v for k, v in g.items() if k != "params"} for g in fused.param_groups] == \
            [{k: v for k, v in g.items() if k != "params"} for g in reference.param_groups]


def test_defaults_are_torchs():
    fused, reference = fusedopt.LBFGS([_param()]), torch.optim.LBFGS([_param()])
    assert fused.defaults == reference.defaults
    assert fused.defaults["max_eval"] == 25  # filled in from max_iter, as torch does


TORCH_HAS_MAXIMIZE = "maximize" in inspect.signature(torch.optim.LBFGS).parameters


@pytest.mark.skipif(not TORCH_HAS_MAXIMIZE, reason="this torch's LBFGS has no maximize "
                    "(tests/test_twins.py checks that fusedopt.LBFGS then refuses it)")
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_maximize_trajectory(backend_device, line_search_fn):
    """maximize=True on the negated Rosenbrock function: torch's iterates, state and the
    returned (not negated) losses; the grads the closure left are not negated in place."""
    backend, device = backend_device
    start, loss_fn = rosenbrock(device)

    def problem(device):
        return start, lambda params: -loss_fn(params)

    _, _, params_f, params_t = run_side_by_side(problem, backend, device, steps=2,
                                                maximize=True, line_search_fn=line_search_fn,
                                                **TRAJECTORY)
    for p, q in zip(params_f, params_t):
        assert_close(p.grad, q.grad, where="grad left by the last closure call")


def test_empty_group_evaluates_the_closure(backend_device):
    backend, _ = backend_device
    opt = fusedopt.LBFGS([{"params": []}], backend=backend)
    assert opt.step(lambda: torch.tensor(3.0)).item() == 3.0


def test_unknown_line_search_raises_as_torch(backend_device):
    """torch raises only inside step, after one evaluation and iteration: so does this."""
    backend, device = backend_device
    start, loss_fn = rosenbrock(device)
    results = []
    for cls, extra in ((fusedopt.LBFGS, {"backend": backend}), (torch.optim.LBFGS, {})):
        params = clone_leaves(start)
        opt = cls(params, line_search_fn="armijo", **extra)
        results.append(_error(opt.step, make_closure(opt, params, loss_fn)))
        results.append({k: opt.state[params[0]][k] for k in ("func_evals", "n_iter")})
    assert results[0] == results[2] == (RuntimeError, "only 'strong_wolfe' is supported")
    assert results[1] == results[3] == {"func_evals": 1, "n_iter": 1}


def test_step_without_one_group_raises_as_torch():
    results = []
    for cls in (fusedopt.LBFGS, torch.optim.LBFGS):
        opt = cls([_param()])
        opt.add_param_group({"params": [_param()]})
        results.append(_error(opt.step, lambda: torch.tensor(0.0)))
    # (the type only: torch's message has changed between versions, a bare assert before)
    assert results[0][0] is results[1][0] is AssertionError


@pytest.mark.parametrize("params, message", [
    pytest.param(lambda: [_param(), torch.zeros(2, device="meta", requires_grad=True)],
                 "one device", id="mixed-devices"),
    pytest.param(lambda: [_param(), torch.zeros(2, requires_grad=True)], "one dtype",
                 id="mixed-dtypes"),
    pytest.param(lambda: [torch.zeros(3, 4, dtype=F64).t().requires_grad_()], "contiguous",
                 id="non-contiguous"),
    pytest.param(lambda: [torch.zeros(3, dtype=torch.int64)], "dtype", id="integer"),
])
def test_refuses_what_it_cannot_run(params, message):
    with pytest.raises(ValueError, match=message):
        fusedopt.LBFGS(params())


def test_params_moved_later_are_checked_before_anything_changes():
    start, loss_fn = rosenbrock("cpu")
    params = clone_leaves(start)
    opt = fusedopt.LBFGS(params, max_iter=2, backend="reference")
    opt.step(make_closure(opt, params, loss_fn))
    before = copy.deepcopy(opt.state_dict())
    params[2].data = torch.zeros(3, 2, dtype=F64).t()  # re-pointed, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        opt.step(make_closure(opt, params, loss_fn))
    assert_state_dicts_equal(opt.state_dict(), before)


def test_backend_name_checked():
    with pytest.raises(ValueError, match="Invalid backend"):
        fusedopt.LBFGS([_param()], backend="cuda")


# ---- state_dict: torch's format, both ways -------------------------------------------------------


def assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert list(a["state"]) == list(b["state"])
    for index, state in a["state"].items():
        assert list(state) == list(b["state"][index])
        for key, value in state.items():
            other = b["state"][index][key]
            if isinstance(value, list):
                assert len(value) == len(other), key
                pairs = list(zip(value, other))
            else:
                pairs = [(value, other)]
            for x, y in pairs:
                if isinstance(x, torch.Tensor):
                    assert isinstance(y, torch.Tensor) and torch.equal(x, y), key
                else:
                    assert x == y, key


def _trained(cls, backend, steps=2, **options):
    start, loss_fn = mlp("cpu", seed=7)
    params = clone_leaves(start)
    extra = {"backend": backend} if cls is fusedopt.LBFGS else {}
    opt = cls(params, max_iter=4, history_size=3, **options, **extra)
    for _ in range(steps):
        opt.step(make_closure(opt, params, loss_fn))
    return opt, params, loss_fn


def test_state_dict_has_torchs_format():
    fused, _, _ = _trained(fusedopt.LBFGS, "reference", line_search_fn="strong_wolfe")
    reference, _, _ = _trained(torch.optim.LBFGS, None, line_search_fn="strong_wolfe")
    a, b = fused.state_dict(), reference.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert list(a["state"]) == list(b["state"]) == [0]
    sa, sb = a["state"][0], b["state"][0]
    assert list(sa) == list(sb)
    for key in sa:
        va, vb = sa[key], sb[key]
        assert type(va) is type(vb), key
        if isinstance(vb, torch.Tensor):
            assert va.shape == vb.shape and va.dtype == vb.dtype, key
        elif isinstance(vb, list):
            assert len(va) == len(vb), key
            for x, y in zip(va, vb):
                assert type(x) is type(y), key
                assert not isinstance(y, torch.Tensor) or x.shape == y.shape, key
    assert sa["d"].shape == (sum(p.numel() for p in fused._params),)
    # the internal vectors stay per parameter
    internal = fused.state[fused._params[0]]
    assert [t.shape for t in internal["d"]] == [p.shape for p in fused._params]


@pytest.mark.parametrize("backend, direction, line_search_fn", [
    ("reference", "fused-to-torch", None),
    ("reference", "fused-to-torch", "strong_wolfe"),
    ("reference", "torch-to-fused", None),
    ("reference", "torch-to-fused", "strong_wolfe"),
    ("triton", "torch-to-fused", "strong_wolfe"),  # loaded vectors in the kernels' tables
])
def test_checkpoint_continues_identically(backend, direction, line_search_fn, request):
    """Save after two steps, load into the other class (through torch.save/torch.load with
    weights_only), then both continue: the same trajectory as never having switched."""
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    start, loss_fn = mlp(device, seed=7)
    source_cls, target_cls = ((fusedopt.LBFGS, torch.optim.LBFGS) if direction == "fused-to-torch"
                              else (torch.optim.LBFGS, fusedopt.LBFGS))
    options = {"max_iter": 3, "history_size": 2, "line_search_fn": line_search_fn}

    def make(cls, params):
        return cls(params, **options, **({"backend": backend} if cls is fusedopt.LBFGS else {}))

    params = clone_leaves(start)
    source = make(source_cls, params)
    for _ in range(2):
        source.step(make_closure(source, params, loss_fn))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    target_params = clone_leaves(params)
    target = make(target_cls, target_params)
    target.load_state_dict(saved)
    assert_state_dicts_equal(target.state_dict(), source.state_dict())
    for step in range(2):
        loss_s = source.step(make_closure(source, params, loss_fn))
        loss_t = target.step(make_closure(target, target_params, loss_fn))
        assert_close(loss_t, loss_s, where=f"step {step} loss")
        for pt, ps in zip(target_params, params):
            assert_close(pt, ps, where=f"step {step}")
        fused, reference = ((source, target) if source_cls is fusedopt.LBFGS
                            else (target, source))
        assert_same_state(fused, reference, f"step {step}")


def test_deepcopy_and_pickle_continue_identically():
    opt, params, loss_fn = _trained(fusedopt.LBFGS, "reference")
    for duplicate in (copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))):
        clone_opt, clone_params = duplicate((opt, params))
        assert clone_opt._backend_request == "reference"
        # the copy's vectors are its own (and so are their kernel tables)
        assert opt.state[params[0]]["d"][0].data_ptr() != \
            clone_opt.state[clone_params[0]]["d"][0].data_ptr()
        loss_a = opt.step(make_closure(opt, params, loss_fn))
        loss_b = clone_opt.step(make_closure(clone_opt, clone_params, loss_fn))
        assert_close(loss_b, loss_a)
        for pa, pb in zip(params, clone_params):
            assert_close(pb, pa)


def _bad_state_dicts(good):
    state = good["state"][0]
    n = state["d"].numel()

    def edit(**changes):
        bad = copy.deepcopy(good)
        for key, value in changes.items():
            if value is None:
                del bad["state"][0][key]
            else:
                bad["state"][0][key] = value
        return bad

    adam = torch.optim.Adam([_param()]).state_dict()
    adam_like = copy.deepcopy(good)
    adam_like["state"] = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}}
    no_group_key = copy.deepcopy(good)
    del no_group_key["param_groups"][0]["history_size"]
    other_param = copy.deepcopy(good)
    other_param["state"][1] = {"d": torch.zeros(n)}
    return {
        "not-a-state-dict": ([good], "expects a dict"),
        "adam-groups": (adam | {"param_groups": [dict(adam["param_groups"][0],
                                                      params=good["param_groups"][0]["params"])]},
                        "not saved by LBFGS"),
        "adam-state": (adam_like, "not L-BFGS's"),
        "group-without-key": (no_group_key, "history_size"),
        "state-on-other-param": (other_param, "other than the first"),
        "short-d": (edit(d=torch.zeros(n - 1, dtype=F64)), "'d' must be a real flat vector"),
        "complex-d": (edit(d=torch.zeros(n, dtype=torch.complex128)), "real flat vector"),
        "list-d": (edit(d=[1.0, 2.0]), "'d' must be a flat tensor"),
        "long-history-entry": (edit(old_dirs=[torch.zeros(n + 1, dtype=F64)]
                                    * len(state["old_dirs"])),
                               "'old_dirs' must be a real flat vector"),
        "history-lengths": (edit(ro=state["ro"][:1]), "same length"),
        "history-not-list": (edit(old_stps=torch.zeros(n, dtype=F64)), "must be a list"),
    }


def test_bad_state_dicts_raise_and_change_nothing():
    opt, params, loss_fn = _trained(fusedopt.LBFGS, "reference")
    good = copy.deepcopy(opt.state_dict())
    for name, (bad, message) in _bad_state_dicts(good).items():
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(bad)
        assert_state_dicts_equal(opt.state_dict(), good), name
    # torch's own structural errors are kept
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(good | {"param_groups": good["param_groups"] * 2})
    opt.step(make_closure(opt, params, loss_fn))  # and it still runs


# ---- the vector kernels against torch -----------------------------------------------------------

SIZES = (1, 3, 1023, 4097, 8192, 0)
KERNEL_TOL = {F64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 2e-6, "atol": 1e-4},
              torch.bfloat16: {"rtol": 2 ** -7, "atol": 1e-2}}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in KERNEL_TOL]


def _vectors(device, dtype, seed, count=2, unaligned=True):
    """``count`` lists of tensors of SIZES (plus a view at storage offset 1 that is a full,
    unaligned chunk), fresh random values."""
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for _ in range(count):
        tensors = [torch.randn(n, generator=gen, dtype=F64).to(dtype).to(device) for n in SIZES]
        if unaligned:
            base = torch.randn(4097 + 1, generator=gen, dtype=F64).to(dtype).to(device)
            tensors.insert(2, base[1:])  # storage offset 1: 2-8 bytes off 16-byte alignment
            assert tensors[2].data_ptr() % 16 != 0
        lists.append(tensors)
    return lists


def _flat64(tensors):
    return torch.cat([t.reshape(-1).to(F64).cpu() for t in tensors])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_match_torch(kernel_device, dtype):
    xs, ys = _vectors(kernel_device, dtype, seed=11)
    x, y = _flat64(xs), _flat64(ys)
    tol = KERNEL_TOL[dtype]
    for result, expected in ((kernels.dot(xs, ys), x @ y),
                             (kernels.abs_sum(xs), x.abs().sum()),
                             (kernels.abs_max(xs), x.abs().max())):
        assert result.dim() == 0 and result.dtype == dtype and result.device == xs[0].device
        torch.testing.assert_close(result.cpu().to(F64), expected, **tol)
    assert kernels.abs_max(xs).item() == x.abs().max().to(dtype).item()  # exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_match_torch(kernel_device, dtype):
    xs, ys = _vectors(kernel_device, dtype, seed=12)
    compute = F64 if dtype == F64 else torch.float32  # torch's opmath
    tol = KERNEL_TOL[dtype]
    alpha_tensor = torch.tensor(-0.3711, dtype=F64, device=kernel_device)
    cases = {
        "axpy": (lambda zs: kernels.axpy(0.7312, xs, zs),
                 lambda x, y: y.to(compute) + 0.7312 * x.to(compute)),
        "axpy-device-alpha": (lambda zs: kernels.axpy(alpha_tensor, xs, zs),
                              lambda x, y: y.to(compute) + alpha_tensor.item() * x.to(compute)),
        "scale": (lambda zs: kernels.scale(-2.5, zs), lambda x, y: -2.5 * y.to(compute)),
        "scale-device-alpha": (lambda zs: kernels.scale(alpha_tensor, zs),
                               lambda x, y: alpha_tensor.to(compute) * y.to(compute)),
        "copy": (lambda zs: kernels.copy(xs, zs), lambda x, y: x),
        "scaled-copy": (lambda zs: kernels.copy(xs, zs, alpha_tensor),
                        lambda x, y: alpha_tensor.to(compute) * x.to(compute)),
    }
    for name, (run, expect) in cases.items():
        zs = [y.clone() for y in ys]
        zs[2] = torch.empty(len(ys[2]) + 1, dtype=dtype, device=kernel_device)[1:]  # unaligned
        zs[2].copy_(ys[2])
        run(zs)
        for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
            expected = expect(x, y).to(dtype)
            if name == "copy":
                assert torch.equal(z, expected), f"{name} tensor {i}"
            else:
                torch.testing.assert_close(z, expected, **tol, msg=f"{name} tensor {i}")


def test_each_operation_is_one_launch(kernel_device):
    """One launch per operation over a list of 12 tensors (and results still right)."""
    gen = torch.Generator().manual_seed(13)
    sizes = [1, 5, 17, 0, 2, 33, 7, 1, 9, 4, 3, 64]
    xs = [torch.randn(n, generator=gen, dtype=F64).to(kernel_device) for n in sizes]
    ys = [torch.randn(n, generator=gen, dtype=F64).to(kernel_device) for n in sizes]
    tx = kernels.TensorTable(xs)
    ty = kernels.TensorTable(ys, tx.layout)
    x, y = _flat64(xs), _flat64(ys)
    expected_y = y.clone()
    ops = [
        (lambda: kernels.dot(tx, ty), lambda r: torch.testing.assert_close(r.cpu(), x @ y)),
        (lambda: kernels.abs_sum(tx), lambda r: torch.testing.assert_close(r.cpu(),
                                                                            x.abs().sum())),
        (lambda: kernels.abs_max(tx), lambda r: torch.testing.assert_close(r.cpu(),
                                                                            x.abs().max())),
        (lambda: kernels.axpy(2.0, tx, ty), lambda r: expected_y.add_(x, alpha=2.0)),
        (lambda: kernels.scale(0.5, ty), lambda r: expected_y.mul_(0.5)),
        (lambda: kernels.copy(tx, ty, -1.0), lambda r: expected_y.copy_(-x)),
    ]
    for run, check in ops:
        before = kernels.vector_launch_count()
        result = run()
        assert kernels.vector_launch_count() - before == 1
        check(result)
        torch.testing.assert_close(_flat64(ys), expected_y)


@pytest.mark.parametrize("combine_block", [8, 1024])
def test_reductions_combine_many_partials(kernel_device, monkeypatch, combine_block):
    """The last program sums the partials COMBINE_BLOCK at a time: 21 partials take three
    loads of 8 (the loop runs for more than 1024 chunks in real use)."""
    monkeypatch.setattr(kernels.vector, "COMBINE_BLOCK", combine_block)
    gen = torch.Generator().manual_seed(14)
    xs = [torch.randn(n, generator=gen, dtype=F64).to(kernel_device) for n in range(1, 22)]
    x = _flat64(xs)
    torch.testing.assert_close(kernels.abs_sum(xs).cpu(), x.abs().sum())
    torch.testing.assert_close(kernels.dot(xs, xs).cpu(), x @ x)
    for i, value in ((0, 100.0), (-1, 200.0)):  # the max in the first load, then in the last
        xs[i][-1] = value
        assert kernels.abs_max(xs).item() == value


def test_max_propagates_nan_and_handles_empties(kernel_device):
    xs = [torch.zeros(0, device=kernel_device), torch.tensor([1.0, -3.0], device=kernel_device)]
    assert kernels.abs_max(xs).item() == 3.0
    xs[1][0] = float("nan")
    assert kernels.abs_max(xs).isnan().item() and kernels.abs_sum(xs).isnan().item()
    xs[1][0] = float("-inf")
    assert kernels.abs_max(xs).item() == float("inf")
    assert kernels.abs_max([torch.zeros(0, device=kernel_device)]).item() == 0.0
    empty = [torch.zeros(0, device=kernel_device)] * 2
    assert kernels.dot(empty, empty).item() == 0.0


def test_tables_refuse_what_the_kernels_cannot_read():
    with pytest.raises(ValueError, match="at least one"):
        kernels.TensorTable([])
    with pytest.raises(ValueError, match="one dtype"):
        kernels.TensorTable([torch.zeros(2), torch.zeros(2, dtype=F64)])
    with pytest.raises(ValueError, match="contiguous"):
        kernels.TensorTable([torch.zeros(3, 4).t()])
    with pytest.raises(TypeError, match="view_as_real"):
        kernels.TensorTable([torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(ValueError, match="same tensor sizes"):
        kernels.dot([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="one-element"):
        kernels.axpy(torch.ones(2), [torch.zeros(2)], [torch.zeros(2)])


# ---- a closure or a user that moves what the step works on ---------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_closure_that_rebinds_param_storage(backend_device, line_search_fn):
    """A closure that re-points ``p.data`` (same values, new storage) at every call: torch
    reads its params afresh at each operation, so the step must follow the new storage (the
    old engine kept writing the old one)."""
    backend, device = backend_device
    start, loss_fn = rosenbrock(device)
    results = []
    for cls, extra in ((fusedopt.LBFGS, {"backend": backend}), (torch.optim.LBFGS, {})):
        params = clone_leaves(start)
        opt = cls(params, line_search_fn=line_search_fn, **extra, **TRAJECTORY)

        def closure(opt=opt, params=params):
            opt.zero_grad()
            for p in params:
                p.data = p.data.clone()
            loss = loss_fn(params)
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert_close(a, b, where="params after closures that rebind p.data")


def test_closure_that_reshapes_a_param_raises(backend_device):
    backend, device = backend_device
    start, loss_fn = rosenbrock(device, sizes=((2, 3), (4,)))
    params = clone_leaves(start)
    opt = fusedopt.LBFGS(params, backend=backend, max_iter=3)
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        if calls:  # (after the backward: autograd itself refuses a param of a new shape)
            params[0].data = params[0].data.reshape(3, 2)
        calls.append(1)
        return loss

    with pytest.raises(RuntimeError, match="changed shape"):
        opt.step(closure)


def test_grad_of_another_size_raises(backend_device):
    """A grad given another size through ``.data`` (torch's grad setter cannot see it): a clear
    error, not a read past its end."""
    backend, device = backend_device
    x = torch.randn(8192, dtype=F64, device=device, requires_grad=True)
    opt = fusedopt.LBFGS([x], backend=backend, max_iter=2)

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        x.grad.data = torch.ones(3, dtype=F64, device=device)
        return loss

    with pytest.raises(RuntimeError, match="grad of parameter 0"):
        opt.step(closure)


def test_vector_table_refuses_a_rebound_tensor(kernel_device):
    xs = [torch.randn(5000, device=kernel_device), torch.randn(7, device=kernel_device)]
    table = kernels.TensorTable(xs)
    assert kernels.dot(table, table).item() == pytest.approx(sum(float(x @ x) for x in xs),
                                                                rel=1e-5)
    xs[0].data = torch.randn(3, device=kernel_device)  # the old storage is freed
    with pytest.raises(ValueError, match="changed after its table was made"):
        kernels.dot(table, table)
