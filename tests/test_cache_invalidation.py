"""The engine's cached tables follow what the user changes between steps, checked against
torch.optim (which caches nothing): state tensors replaced or deleted, the whole state reset,
params replaced in their group, params re-pointed to bad storage, and a failed step retried."""

import pickle

import pytest
import torch
from cases import (
    TOL,
    assert_states_close,
    assert_unchanged,
    fresh_grads,
    set_grads,
    snapshot_all,
)

import fusedopt
from fusedopt import kernels

BACKENDS = ["triton", "reference"]
SHAPES = [(64,), (8, 8), (3,), (5, 7)]


def _pair(cls, torch_cls, backend, device, **options):
    params = [torch.randn(s, device=device, generator=torch.Generator().manual_seed(i))
              .requires_grad_() for i, s in enumerate(SHAPES)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    return (cls(params, backend=backend, **options), params,
            torch_cls(twins, foreach=False, **options), twins)


def _steps(opt, params, ref, twins, steps):
    for step in steps:
        grads = fresh_grads(params, step, skip=None)
        set_grads(params, grads)
        set_grads(twins, grads)
        opt.step()
        ref.step()


@pytest.fixture(params=BACKENDS)
def backend_device(request):
    if request.param == "triton":
        return "triton", request.getfixturevalue("kernel_device")
    return "reference", "cpu"


def test_replaced_state_tensors_are_used(backend_device):
    """Resetting moments and step by assigning new tensors, as reset/offload helpers do."""
    backend, device = backend_device
    opt, params, ref, twins = _pair(fusedopt.AdamW, torch.optim.AdamW, backend, device, lr=0.1)
    _steps(opt, params, ref, twins, range(2))
    for o, ps in ((opt, params), (ref, twins)):
        for p in ps:
            state = o.state[p]
            state["exp_avg"] = torch.zeros_like(state["exp_avg"])
            state["exp_avg_sq"] = state["exp_avg_sq"].clone()
            state["step"] = torch.tensor(0.0)
    _steps(opt, params, ref, twins, range(2, 4))
    assert [float(opt.state[p]["step"]) for p in params] == [2.0] * len(params)
    assert_states_close(opt, params, ref, twins, **TOL[torch.float32])


def test_deleted_momentum_buffer_restarts_like_torch(backend_device):
    """SGD's first momentum step copies the grad: deleting the buffer must restart it."""
    backend, device = backend_device
    opt, params, ref, twins = _pair(fusedopt.SGD, torch.optim.SGD, backend, device, lr=0.1,
                                    momentum=0.9, dampening=0.5)
    _steps(opt, params, ref, twins, range(2))
    for o, ps in ((opt, params), (ref, twins)):
        del o.state[ps[1]]["momentum_buffer"]
        o.state[ps[2]].clear()
    _steps(opt, params, ref, twins, range(2, 4))
    assert_states_close(opt, params, ref, twins, **TOL[torch.float32])


def test_whole_state_reset_by_reassignment(backend_device):
    backend, device = backend_device
    opt, params, ref, twins = _pair(fusedopt.Adam, torch.optim.Adam, backend, device, lr=0.1)
    _steps(opt, params, ref, twins, range(2))
    opt.state = type(ref.state)(dict)
    ref.state = type(ref.state)(dict)
    _steps(opt, params, ref, twins, range(2, 4))
    assert_states_close(opt, params, ref, twins, **TOL[torch.float32])


def test_param_replaced_in_its_group(backend_device):
    backend, device = backend_device
    opt, params, ref, twins = _pair(fusedopt.AdamW, torch.optim.AdamW, backend, device, lr=0.1)
    _steps(opt, params, ref, twins, range(2))
    new = torch.randn(6, device=device).requires_grad_()
    new_twin = new.detach().clone().requires_grad_()
    opt.param_groups[0]["params"][1] = new
    ref.param_groups[0]["params"][1] = new_twin
    params[1], twins[1] = new, new_twin
    before = new.detach().clone()
    _steps(opt, params, ref, twins, range(2, 4))
    assert not torch.equal(new, before)
    assert_states_close(opt, params, ref, twins, **TOL[torch.float32])


def test_param_re_pointed_to_a_strided_view_is_refused(backend_device):
    backend, device = backend_device
    opt, params, ref, twins = _pair(fusedopt.AdamW, torch.optim.AdamW, backend, device)
    _steps(opt, params, ref, twins, range(1))
    params[0].data = torch.randn(128, device=device)[::2]  # 64 elements with gaps
    set_grads(params, fresh_grads(params, 1, skip=None))
    before = snapshot_all(opt, params)
    with pytest.raises(ValueError, match="dense"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_param_resized_after_its_state_exists_is_refused(backend_device):
    """The state no longer fits the param: an error, never a write past the state's end."""
    backend, device = backend_device
    opt, params, ref, twins = _pair(fusedopt.AdamW, torch.optim.AdamW, backend, device)
    _steps(opt, params, ref, twins, range(1))
    params[1].data = torch.cat([params[1].data, params[1].data])  # (16, 8)
    set_grads(params, fresh_grads(params, 1, skip=None))
    before = snapshot_all(opt, params)
    with pytest.raises(ValueError, match=r"'exp_avg' is .* of shape \(8, 8\)"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_failed_step_is_retried_like_a_first_step(kernel_device, monkeypatch):
    """A launch that fails (out of memory, say) leaves no half-made state behind."""
    opt, params, ref, twins = _pair(fusedopt.SGD, torch.optim.SGD, "triton", kernel_device,
                                    lr=0.1, momentum=0.9, dampening=0.5)

    def failing_launch(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    set_grads(params, fresh_grads(params, 0, skip=None))
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "launch", failing_launch)
        with pytest.raises(torch.OutOfMemoryError):
            opt.step()
    assert all(not opt.state[p] for p in params)
    _steps(opt, params, ref, twins, range(3))
    assert_states_close(opt, params, ref, twins, **TOL[torch.float32])


def test_state_pickles_and_copies_as_plain_dicts():
    opt, params, ref, twins = _pair(fusedopt.AdamW, torch.optim.AdamW, "reference", "cpu")
    _steps(opt, params, ref, twins, range(1))
    restored = pickle.loads(pickle.dumps(opt.state_dict()))
    assert restored["state"] and all(type(v) is dict for v in restored["state"].values())
    state_copy = pickle.loads(pickle.dumps(opt.state))
    assert type(state_copy) is type(ref.state)
    assert all(type(v) is dict for v in state_copy.values())
    ref.load_state_dict(restored)  # torch.optim takes it
    _steps(opt, params, ref, twins, range(1, 3))
    assert_states_close(opt, params, ref, twins, **TOL[torch.float32])


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_copied_optimizer_continues_like_torch(copier):
    import copy

    opt, params, ref, twins = _pair(fusedopt.AdamW, torch.optim.AdamW, "reference", "cpu")
    _steps(opt, params, ref, twins, range(2))
    bundle = {"opt": opt, "params": params}  # copied together, so the copy's state keys match
    copied = (copy.deepcopy(bundle) if copier == "deepcopy"
              else pickle.loads(pickle.dumps(bundle)))
    new_opt, new_params = copied["opt"], copied["params"]
    assert new_opt._backend_request == "reference"
    _steps(new_opt, new_params, ref, twins, range(2, 4))
    assert_states_close(new_opt, new_params, ref, twins, **TOL[torch.float32])
