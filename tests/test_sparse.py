"""Sparse grads: the SparseAdam twin, and SGD and Adagrad taking sparse grads as torch does.

Compared with torch.optim itself on fresh random sparse grads (duplicate rows, rows absent,
no rows at all, one and two sparse dims, grads missing on some steps), on the reference path
and on the kernels (under the interpreter on CPU), next to dense grads in the same step. Then
torch's errors before anything changes, state_dicts both ways, GradScaler, an
``nn.Embedding(sparse=True)`` training run, and one launch per step whatever the count.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import assert_states_close, assert_unchanged, snapshot_all

import fusedopt
from fusedopt import kernels

SHAPES = ((20, 8), (13,), (6, 5, 3), (4, 1))
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-14},
       torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def _sparse_grad(shape, step, k, dtype, sparse_dims=1, device="cpu"):
    """A sparse COO grad for a param of ``shape``: random rows, duplicates among them (as an
    embedding's backward gives), none at all on some steps."""
    gen = torch.Generator().manual_seed(1000 * step + k)
    nnz = 0 if (step + k) % 4 == 3 else int(torch.randint(1, 2 * shape[0] + 1, (),
                                                         generator=gen))
    indices = torch.stack([torch.randint(0, n, (nnz,), generator=gen)
                           for n in shape[:sparse_dims]])
    values = torch.randn(nnz, *shape[sparse_dims:], generator=gen, dtype=torch.float64)
    return torch.sparse_coo_tensor(indices, values.to(dtype), shape).to(device)


def _params(dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device)
            .requires_grad_() for s in SHAPES]


def _groups(params, per_group):
    return [{"params": params[:2]}, {"params": params[2:], **per_group}]


CASES = {
    "sparse_adam": (fusedopt.SparseAdam, torch.optim.SparseAdam,
                    {"lr": 0.01, "betas": (0.8, 0.99)}, {"lr": 0.002, "eps": 1e-6}),
    "sparse_adam-maximize": (fusedopt.SparseAdam, torch.optim.SparseAdam,
                             {"maximize": True}, {"betas": (0.95, 0.9)}),
    "adagrad": (fusedopt.Adagrad, torch.optim.Adagrad,
                {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.2},
                {"lr": 0.02, "eps": 1e-6, "maximize": True}),
    "sgd": (fusedopt.SGD, torch.optim.SGD, {"lr": 0.05}, {"lr": 0.2, "maximize": True}),
    "sgd-momentum": (fusedopt.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9},
                     {"lr": 0.2, "momentum": 0.5, "dampening": 0.3, "maximize": True}),
    "sgd-nesterov": (fusedopt.SGD, torch.optim.SGD,
                     {"lr": 0.05, "momentum": 0.9, "nesterov": True}, {"lr": 0.2}),
}


def _dense_states(opt):
    """torch's SGD keeps its momentum buffer sparse after sparse grads; fusedopt's is dense
    with the same values: compared densified."""
    for state in opt.state.values():
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.layout == torch.sparse_coo:
                state[key] = value.to_dense()


def _pair(key, dtype, backend, device="cpu"):
    fused_cls, torch_cls, defaults, per_group = CASES[key]
    params, ref_params = _params(dtype, device), _params(dtype)
    opt = fused_cls(_groups(params, per_group), **defaults, backend=backend)
    ref = torch_cls(_groups(ref_params, per_group), **defaults)
    return opt, params, ref, ref_params


def _run(opt, params, ref, ref_params, steps, tol, sparse_dims=1, seed=0):
    for step in range(steps):
        for k, (p, q) in enumerate(zip(params, ref_params)):
            if (step + k) % 5 == 4:
                p.grad = q.grad = None
                continue
            dims = min(sparse_dims, p.dim())
            g = _sparse_grad(p.shape, step + 100 * seed, k, p.dtype, dims)
            p.grad, q.grad = g.to(p.device), g.clone()
        opt.step()
        ref.step()
        if any(isinstance(v, torch.Tensor) and v.layout == torch.sparse_coo
               for s in ref.state.values() for v in s.values()):
            theirs = copy.deepcopy(ref)  # (compared densified; torch keeps its own going)
            _dense_states(theirs)
            ref_view = theirs.param_groups and [p for g in theirs.param_groups
                                                for p in g["params"]]
            assert_states_close(opt, params, theirs, ref_view, **tol, msg=f"step {step}:")
        else:
            assert_states_close(opt, params, ref, ref_params, **tol, msg=f"step {step}:")


def _tol(key, dtype):
    # SGD adds the duplicate rows of an uncoalesced grad one by one, fusedopt their sum;
    # Adagrad's dense s + g*g may fuse where torch adds the rounded g^2: rounding apart
    return TOL[dtype] if key.startswith("sparse_adam") else {
        torch.float64: {"rtol": 1e-12, "atol": 1e-14},
        torch.float32: {"rtol": 2e-6, "atol": 2e-6}}[dtype]


@pytest.mark.parametrize("sparse_dims", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("key", list(CASES))
def test_reference_is_torch(key, dtype, sparse_dims):
    opt, params, ref, ref_params = _pair(key, dtype, "reference")
    tol = ({"rtol": 0, "atol": 0} if key.startswith("sparse_adam") else _tol(key, dtype))
    _run(opt, params, ref, ref_params, 6, tol, sparse_dims)


@pytest.mark.parametrize("sparse_dims", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("key", list(CASES))
def test_kernels_are_torch(key, dtype, sparse_dims, kernel_device):
    opt, params, ref, ref_params = _pair(key, dtype, "triton", kernel_device)
    _run(opt, params, ref, ref_params, 5, _tol(key, dtype), sparse_dims)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["adagrad", "sgd"])
def test_dense_and_sparse_grads_in_one_step(name, backend, request):
    """An embedding with sparse grads next to dense layers, and a param whose grad is dense
    on one step and sparse on the next: torch's result, and a launch per kind of grad."""
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    fused_cls, torch_cls, defaults, _ = CASES[name]
    params, ref_params = _params(torch.float32, device), _params(torch.float32)
    opt, ref = fused_cls(params, **defaults, backend=backend), torch_cls(ref_params, **defaults)
    for step in range(5):
        for k, (p, q) in enumerate(zip(params, ref_params)):
            g = _sparse_grad(p.shape, step, k, p.dtype)
            if k == 1 or (k == 2 and step % 2):
                g = g.to_dense()
            p.grad, q.grad = g.to(device), g.clone()
        before = kernels.launch_count()
        opt.step()
        ref.step()
        if backend == "triton":
            assert kernels.launch_count() - before == 2  # the dense params, the sparse rows
        assert_states_close(opt, params, ref, ref_params, **_tol(name, torch.float32),
                            msg=f"step {step}:")


def test_one_launch_for_the_rows_of_every_grad(kernel_device):
    counts = []
    for n in (2, 40):
        params = [torch.randn(9, 4, requires_grad=True, device=kernel_device) for _ in range(n)]
        opt = fusedopt.SparseAdam(params, backend="triton")
        for step in range(2):
            for k, p in enumerate(params):
                p.grad = _sparse_grad(p.shape, step, k, p.dtype, device=kernel_device)
            before = kernels.launch_count()
            opt.step()
        counts.append(kernels.launch_count() - before)
    assert counts == [1, 1]


def test_embedding_training_matches_torch(kernel_device):
    """nn.Embedding(sparse=True) in a small model (its backward gives uncoalesced grads with
    duplicate rows), SparseAdam for the embedding and Adam for the rest, as documented."""
    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.ModuleDict({"emb": torch.nn.Embedding(50, 16, sparse=True),
                                    "out": torch.nn.Linear(16, 50)})

    ours, theirs = model(0).to(kernel_device), model(0)
    opts = [fusedopt.SparseAdam(ours["emb"].parameters(), lr=0.01, backend="triton"),
            fusedopt.Adam(ours["out"].parameters(), lr=0.01, backend="triton")]
    refs = [torch.optim.SparseAdam(theirs["emb"].parameters(), lr=0.01),
            torch.optim.Adam(theirs["out"].parameters(), lr=0.01, foreach=False)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        tokens = torch.randint(0, 50, (8, 12), generator=gen)
        for m, os_, dev in ((ours, opts, kernel_device), (theirs, refs, "cpu")):
            for o in os_:
                o.zero_grad()
            x = tokens.to(dev)
            logits = m["out"](m["emb"](x[:, :-1]))
            torch.nn.functional.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1)
                                              ).backward()
            for o in os_:
                o.step()
        assert ours["emb"].weight.grad.is_sparse
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=2e-5, atol=2e-6)


# ---- torch's errors, before anything changes ----------------------------------------------------


def _two_params_one_step(opt_cls, grads, **options):
    params = [torch.randn(6, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    opt = opt_cls(params, **options)
    for p, g in zip(params, grads):
        p.grad = g
    return opt, params


def _sparse(shape):
    return torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.randn(2, *shape[1:]), shape)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", [
    ("sparse-adam-dense-grad", fusedopt.SparseAdam, {}, RuntimeError,
     "SparseAdam does not support dense gradients, please consider Adam instead"),
    ("adagrad-weight-decay", fusedopt.Adagrad, {"weight_decay": 0.1}, RuntimeError,
     "weight_decay option is not compatible with sparse gradients"),
    ("sgd-weight-decay", fusedopt.SGD, {"lr": 0.1, "weight_decay": 0.1}, RuntimeError,
     "add\\(sparse, dense\\) is not supported"),
    ("adam", fusedopt.Adam, {}, RuntimeError, "does not support sparse gradients"),
], ids=lambda c: c[0])
def test_refused_before_anything_changes(case, backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    _, cls, options, error, message = case
    dense_first = cls is fusedopt.SparseAdam  # its first param's sparse grad is fine
    grads = [_sparse((6, 3)), torch.randn(4)] if dense_first else [_sparse((6, 3)),
                                                                  _sparse((4,))]
    opt, params = _two_params_one_step(cls, grads, **options, backend=backend)
    before = snapshot_all(opt, params)
    with pytest.raises(error, match=message):
        opt.step()
    assert_unchanged(opt, params, before)


def test_a_sparse_grad_of_another_shape_is_refused():
    p = torch.randn(6, 3, requires_grad=True)
    opt = fusedopt.SparseAdam([p])
    p.grad = _sparse((6, 3))
    p.grad.data = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.randn(2, 4), (6, 4))
    with pytest.raises(RuntimeError, match="a sparse grad is .* of shape \\(6, 4\\)"):
        opt.step()
    assert not opt.state


def test_sparse_adam_refuses_what_torch_refuses_at_construction():
    with pytest.raises(ValueError, match="dense"):  # (fusedopt's check speaks first)
        fusedopt.SparseAdam([torch.randn(3, 2).to_sparse().requires_grad_()])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fusedopt.SparseAdam([torch.randn(3, 2, requires_grad=True)], lr=0.0)


# ---- state_dicts and AMP ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sparse_adam_state_dict_is_torchs_both_ways(backend, request):
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    opt, params, ref, ref_params = _pair("sparse_adam", torch.float32, backend, device)
    _run(opt, params, ref, ref_params, 3, TOL[torch.float32])
    ours, theirs = opt.state_dict(), ref.state_dict()
    for k, state in theirs["state"].items():
        assert list(ours["state"][k]) == list(state)
        assert type(ours["state"][k]["step"]) is int and ours["state"][k]["step"] == state["step"]
    # each loads the other's and the two trajectories continue as one
    opt.load_state_dict(copy.deepcopy(theirs))
    ref.load_state_dict(copy.deepcopy(ours))
    _run(opt, params, ref, ref_params, 3, TOL[torch.float32], seed=5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grad_scaler_with_sparse_grads(backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    torch.manual_seed(0)
    emb, twin = torch.nn.Embedding(30, 8, sparse=True), torch.nn.Embedding(30, 8, sparse=True)
    twin.load_state_dict(emb.state_dict())
    opt = fusedopt.SparseAdam(emb.parameters(), lr=0.05, backend=backend)
    ref = torch.optim.SparseAdam(twin.parameters(), lr=0.05)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        tokens = torch.randint(0, 30, (16,), generator=gen)
        for m, o, s in ((emb, opt, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            s.scale(m(tokens).square().sum()).backward()
            if step == 2:
                m.weight.grad._values()[0, 0] = torch.inf
            s.step(o)
            s.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_states_close(opt, [emb.weight], ref, [twin.weight], rtol=1e-5, atol=1e-6,
                            msg=f"step {step}:")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("key", ["sgd-momentum", "sgd-nesterov"])
def test_sgd_momentum_buffers_move_both_ways(key, backend, request):
    """After sparse grads torch's SGD momentum buffers are sparse tensors; fusedopt's are
    dense ones of the same values, saved sparse as torch's: each loads the other's and the
    trajectories continue as one (Nesterov too, whose torch step adds the buffer to the
    sparse grad)."""
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    opt, params, ref, ref_params = _pair(key, torch.float32, backend, device)
    tol = _tol(key, torch.float32)
    _run(opt, params, ref, ref_params, 3, tol)
    ours, theirs = opt.state_dict(), ref.state_dict()
    for saved in (ours, theirs):
        layouts = {k: s["momentum_buffer"].layout for k, s in saved["state"].items()}
        assert set(layouts.values()) == {torch.sparse_coo}, layouts
    opt.load_state_dict(copy.deepcopy(theirs))
    ref.load_state_dict(copy.deepcopy(ours))
    _run(opt, params, ref, ref_params, 3, tol, seed=5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("key", ["sparse_adam", "adagrad", "sgd-momentum"])
def test_grads_with_no_sparse_dims(key, backend, request):
    """A sparse grad whose every dim is dense (``sparse_dim() == 0``): one value holding the
    whole tensor, or none (torch then updates nothing but the step), next to a dense grad."""
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    fused_cls, torch_cls, defaults, _ = CASES[key]
    params, ref_params = _params(torch.float32, device)[:2], _params(torch.float32)[:2]
    opt, ref = fused_cls(params, **defaults, backend=backend), torch_cls(ref_params, **defaults)
    for step in range(4):
        for k, (p, q) in enumerate(zip(params, ref_params)):
            nnz = step % 2 if k == 0 else 1
            g = torch.sparse_coo_tensor(torch.zeros(0, nnz, dtype=torch.long),
                                        torch.randn(nnz, *p.shape), p.shape)
            if k == 1 and key != "sparse_adam":
                g = g.to_dense()
            p.grad, q.grad = g.to(device), g.clone()
        opt.step()
        ref.step()
        theirs = copy.deepcopy(ref)
        _dense_states(theirs)
        assert_states_close(opt, params, theirs,
                            [p for g in theirs.param_groups for p in g["params"]],
                            **_tol(key, torch.float32), msg=f"step {step}:")
