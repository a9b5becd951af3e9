"""Check 3: state_dict round trips with torch.optim, in both directions, and the loader's checks.

A checkpoint written by torch.optim loads into fusedopt and vice versa, and training continues
on exactly the uninterrupted trajectory (through torch.save / torch.load with weights_only, as
a real checkpoint would go). The format itself (state keys and their order, param_groups keys,
step's dtype and device) is torch's.
"""

import io

import pytest
import torch
from cases import (
    CASE_BY_ID,
    CASES,
    CORE,
    SMALL_SHAPES,
    TOL,
    assert_states_close,
    cases,
    clone_params,
    flat,
    fresh_grads,
    make_params,
    set_grads,
    snapshot,
)

import fusedopt

K, M = 3, 5  # steps before the checkpoint, steps after it


def _skip(step, i):
    """Param 1 gets its first grad only after the checkpoint; param 4 misses step 4."""
    if i == 1:
        return step >= K + 1
    return not (i == 4 and step == 4)


def _checkpoint(opt) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _device_for(backend, request):
    return request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"


CHECKPOINT_GRID = ([pytest.param(c, "reference", id=f"{c.id}-reference") for c in CASES]
                   + [pytest.param(CASE_BY_ID[i], "triton", id=f"{i}-triton") for i in CORE])


@pytest.mark.parametrize(("case", "backend"), CHECKPOINT_GRID)
def test_checkpoint_moves_between_torch_and_fusedopt(case, backend, request):
    device = _device_for(backend, request)
    start = make_params(SMALL_SHAPES, torch.float64, device=device)
    runs = {name: clone_params(start)
            for name in ("straight", "torch>fused", "fused>torch", "torch>torch")}
    straight = case.make_torch(runs["straight"])
    first = {"torch>fused": case.make_torch(runs["torch>fused"]),
             "fused>torch": case.make_fused(runs["fused>torch"], backend),
             "torch>torch": case.make_torch(runs["torch>torch"])}
    for step in range(K):
        grads = fresh_grads(flat(start), step, skip=_skip)
        for params in runs.values():
            set_grads(flat(params), grads)
        straight.step()
        for opt in first.values():
            opt.step()
    # no state yet when saved (but for Adagrad, whose state torch makes in __init__)
    assert (flat(runs["straight"])[1] not in straight.state) != (case.torch_cls is
                                                                torch.optim.Adagrad)
    second = {"torch>fused": case.make_fused(runs["torch>fused"], backend),
              "fused>torch": case.make_torch(runs["fused>torch"]),
              "torch>torch": case.make_torch(runs["torch>torch"])}
    for name, opt in second.items():
        opt.load_state_dict(_checkpoint(first[name]))
    # fusedopt continues the uninterrupted run; torch.optim after loading fusedopt's checkpoint
    # continues as after loading its own (which is not always the uninterrupted run: torch's
    # loader casts NAdam's float32 mu_product to the params' dtype)
    expected = {"torch>fused": "straight", "fused>torch": "torch>torch"}
    for step in range(K, K + M):
        grads = fresh_grads(flat(start), step, skip=_skip)
        for params in runs.values():
            set_grads(flat(params), grads)
        straight.step()
        for opt in second.values():
            opt.step()
        for name, other in expected.items():
            truth = straight if other == "straight" else second[other]
            assert_states_close(second[name], flat(runs[name]), truth, flat(runs[other]),
                                **TOL[torch.float64], msg=f"{name} step {step}:")
    fused = second["torch>fused"]
    assert fused._buckets and all(b.backend == backend for b in fused._buckets)


@pytest.mark.parametrize("case", cases())
def test_state_dict_format_is_torchs(case):
    """Same state keys (and order), same param_groups keys and values as torch.optim."""
    params = make_params(SMALL_SHAPES[:2], torch.float32)
    torch_params = clone_params(params)
    opt = case.make_fused(params, "reference")
    torch_opt = case.make(case.torch_cls, torch_params)  # torch's own defaults, foreach=None
    for step in range(3):
        grads = fresh_grads(flat(params), step)
        set_grads(flat(params), grads)
        set_grads(flat(torch_params), grads)
        opt.step()
        torch_opt.step()
    ours, theirs = opt.state_dict(), torch_opt.state_dict()
    assert list(ours) == list(theirs)
    assert list(ours["state"]) == list(theirs["state"])
    for index, state in theirs["state"].items():
        assert list(ours["state"][index]) == list(state), f"param {index}"
        for key, value in state.items():
            mine = ours["state"][index][key]
            assert type(mine) is type(value)
            if isinstance(value, torch.Tensor):
                assert (mine.dtype, mine.device, mine.shape) == (value.dtype, value.device,
                                                                 value.shape), key
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for mine, group in zip(ours["param_groups"], theirs["param_groups"]):
        assert list(mine) == list(group)
        for key, value in group.items():
            if key == "lr" and isinstance(value, torch.Tensor):
                assert isinstance(mine[key], torch.Tensor) and torch.equal(mine[key], value)
            else:
                assert mine[key] == value, key


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", cases("adam-default", "adamw-amsgrad-maximize"))
def test_step_is_float32_scalar_on_param_device(case, backend, request):
    device = _device_for(backend, request)
    params = make_params(SMALL_SHAPES[:1], torch.float32, device=device)
    opt = case.make_fused(params, backend)
    for step in range(2):
        set_grads(flat(params), fresh_grads(flat(params), step, skip=None))
        opt.step()
    for p in flat(params):
        step = opt.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dim() == 0
        assert step.dtype == torch.float32 and step.device == p.device
        assert step.item() == 2.0


def _stepped(cls, n=3, seed=0, **kwargs):
    params = make_params(SMALL_SHAPES[:2], torch.float32, seed=seed)
    opt = cls([{"params": g} for g in params], **kwargs)
    for step in range(n):
        set_grads(flat(params), fresh_grads(flat(params), step, seed=seed + 1, skip=None))
        opt.step()
    return opt, params


@pytest.mark.parametrize(
    "src_cls, src_kwargs, src_steps, dst_cls, dst_kwargs",
    [pytest.param(fusedopt.SGD, {"momentum": 0.9}, 2, fusedopt.Adam, {}, id="sgd-into-adam"),
     pytest.param(torch.optim.SGD, {"momentum": 0.9}, 2, fusedopt.AdamW, {},
                  id="torch-sgd-into-adamw"),
     pytest.param(fusedopt.AdamW, {}, 2, fusedopt.SGD, {"momentum": 0.9}, id="adamw-into-sgd"),
     pytest.param(torch.optim.SGD, {}, 0, fusedopt.Adam, {}, id="unstepped-sgd-into-adam")])
def test_state_of_another_optimizer_raises_and_changes_nothing(src_cls, src_kwargs, src_steps,
                                                               dst_cls, dst_kwargs):
    src, _ = _stepped(src_cls, n=src_steps, seed=5, **src_kwargs)
    dst, params = _stepped(dst_cls, n=3, backend="reference", **dst_kwargs)
    before = snapshot(dst)
    values = [p.detach().clone() for p in flat(params)]
    with pytest.raises(ValueError):
        dst.load_state_dict(_checkpoint(src))
    after = snapshot(dst)
    _assert_same_state_dict(after, before)
    # and it still steps exactly as before
    twin, twin_params = _stepped(dst_cls, n=3, backend="reference", **dst_kwargs)
    for step in range(3, 5):
        grads = fresh_grads(flat(params), step, skip=None)
        set_grads(flat(params), grads)
        set_grads(flat(twin_params), grads)
        dst.step()
        twin.step()
    assert_states_close(dst, flat(params), twin, flat(twin_params), rtol=0, atol=0)
    assert any(not torch.equal(v, p) for v, p in zip(values, flat(params)))


def _assert_same_state_dict(a: dict, b: dict) -> None:
    assert list(a["state"]) == list(b["state"])
    for index, state in a["state"].items():
        assert list(state) == list(b["state"][index])
        for key, value in state.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    assert len(a["param_groups"]) == len(b["param_groups"])
    for ga, gb in zip(a["param_groups"], b["param_groups"]):
        assert list(ga) == list(gb)
        for key in ga:
            va, vb = ga[key], gb[key]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key


@pytest.mark.parametrize("state_key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_wrong_state_shape_raises_and_changes_nothing(state_key):
    src, _ = _stepped(fusedopt.AdamW, amsgrad=True, backend="reference")
    dst, _ = _stepped(fusedopt.AdamW, seed=7, amsgrad=True, backend="reference")
    sd = _checkpoint(src)
    sd["state"][1][state_key] = sd["state"][1][state_key][:-1].clone()  # 4097 -> 4096
    before = snapshot(dst)
    with pytest.raises(ValueError, match=state_key):
        dst.load_state_dict(sd)
    _assert_same_state_dict(snapshot(dst), before)


@pytest.mark.parametrize("case", cases("sgd-plain", "sgd-mixed-flags-groups"))
def test_sgd_without_momentum_keeps_no_state(case):
    """torch.optim.SGD stores nothing for a param whose group has momentum=0 (its
    state_dict()["state"] stays {}); fusedopt must not add empty per-param entries."""
    params = make_params(SMALL_SHAPES[:2], torch.float32)
    torch_params = clone_params(params)
    opt = case.make_fused(params, "reference")
    torch_opt = case.make_torch(torch_params)
    for step in range(2):
        grads = fresh_grads(flat(params), step, skip=None)
        set_grads(flat(params), grads)
        set_grads(flat(torch_params), grads)
        opt.step()
        torch_opt.step()
    assert list(opt.state_dict()["state"]) == list(torch_opt.state_dict()["state"])
    assert len(opt.state) == len(torch_opt.state)


def test_wrong_momentum_buffer_shape_raises():
    src, _ = _stepped(fusedopt.SGD, momentum=0.9, backend="reference")
    dst, _ = _stepped(fusedopt.SGD, momentum=0.9, backend="reference")
    sd = _checkpoint(src)
    sd["state"][0]["momentum_buffer"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="momentum_buffer"):
        dst.load_state_dict(sd)


@pytest.mark.parametrize("case", cases("adamw-default", "sgd-nesterov"))
def test_wrong_group_count_raises_torchs_error(case):
    params = make_params(SMALL_SHAPES, torch.float32)
    sd = _checkpoint(case.make_torch(clone_params(params)))
    sd["param_groups"] = sd["param_groups"][:2]
    with pytest.raises(ValueError) as theirs:
        case.make_torch(clone_params(params)).load_state_dict(sd)
    opt = case.make_fused(params, "reference")
    before = snapshot(opt)
    with pytest.raises(ValueError) as ours:
        opt.load_state_dict(sd)
    assert str(ours.value) == str(theirs.value)
    _assert_same_state_dict(snapshot(opt), before)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_load_into_a_stepped_optimizer_replaces_cached_state(backend, request):
    """Loading after steps (tables cached, pointing at the old state) must rebuild them."""
    device = _device_for(backend, request)
    case = CASE_BY_ID["adam-amsgrad-wd"]
    a_params = make_params(SMALL_SHAPES[:2], torch.float64, device=device)
    b_params = clone_params(a_params)
    a = case.make_fused(a_params, backend)
    b = case.make_fused(b_params, backend)
    for step in range(3):
        set_grads(flat(a_params), fresh_grads(flat(a_params), step, seed=1))
        set_grads(flat(b_params), fresh_grads(flat(b_params), step, seed=2))  # other grads
        a.step()
        b.step()
    for pa, pb in zip(flat(a_params), flat(b_params)):
        with torch.no_grad():
            pb.copy_(pa)
    b.load_state_dict(_checkpoint(a))
    for step in range(3, 6):
        grads = fresh_grads(flat(a_params), step, seed=3)
        set_grads(flat(a_params), grads)
        set_grads(flat(b_params), grads)
        a.step()
        b.step()
        assert_states_close(b, flat(b_params), a, flat(a_params), **TOL[torch.float64])


def test_named_parameters_round_trip():
    """torch.optim's named-parameter groups ('param_names') survive both ways."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 2))
    twin.load_state_dict(model.state_dict())
    opt = fusedopt.AdamW(model.named_parameters(), lr=1e-2, backend="reference")
    ref = torch.optim.AdamW(twin.named_parameters(), lr=1e-2, foreach=False)
    x = torch.randn(4, 7)
    for o, m in ((opt, model), (ref, twin)):
        m(x).sum().backward()
        o.step()
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["param_groups"][0]["param_names"] == theirs["param_groups"][0]["param_names"]
    ref.load_state_dict(_checkpoint(opt))
    opt.load_state_dict(_checkpoint(ref))
    assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                        **TOL[torch.float32])


@pytest.mark.parametrize("case", cases(*[i for i in CORE if CASE_BY_ID[i].torch_cls.__module__
                                          .startswith("torch.optim")]))
def test_older_torch_checkpoints_without_newer_group_keys_load(case):
    """A group key that an older torch did not save (NAdam's decoupled_weight_decay, SGD's
    nesterov, ...) is filled in by torch's loader: wherever the torch twin loads a checkpoint
    without one such key, fusedopt loads it too, to the same param_groups."""
    params = make_params(SMALL_SHAPES, torch.float32)
    stepped = clone_params(params)
    torch_opt = case.make_torch(stepped)
    set_grads(flat(stepped), fresh_grads(flat(stepped), 0, skip=None))
    torch_opt.step()
    dropped = 0
    for key in _checkpoint(torch_opt)["param_groups"][0]:
        if key in ("params", "lr"):
            continue
        sd = _checkpoint(torch_opt)
        for group in sd["param_groups"]:
            group.pop(key, None)
        twin_params = clone_params(params)
        twin = case.make_torch(twin_params)
        set_grads(flat(twin_params), fresh_grads(flat(twin_params), 1, skip=None))
        try:
            twin.load_state_dict(sd)
            twin.step()
        except (KeyError, ValueError):
            continue  # torch needs this key too (at load or at the step)
        twin.load_state_dict(sd)  # (compare the groups as loaded, not after the step)
        dropped += 1
        opt = case.make_fused(clone_params(params), "reference")
        opt.load_state_dict(sd)
        for ours, theirs in zip(opt.param_groups, twin.param_groups):
            assert {k: v for k, v in ours.items() if k != "params"} == {
                k: v for k, v in theirs.items() if k != "params"}, key
    assert dropped, "torch refused every trimmed checkpoint: the test checked nothing"
