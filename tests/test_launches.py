"""One kernel launch per step per (device, dtype, variant) bucket, whatever the number of
tensors and param groups, and cached tables that are reused rather than rebuilt.

Launches are counted with fusedopt.kernels.launch_count() (on CUDA, test_gpu.py also counts
them with torch.profiler)."""

import pytest
import torch
from cases import TOL, assert_states_close, clone_params, flat, fresh_grads, set_grads

import fusedopt
from fusedopt import kernels

N_TENSORS = 150


def _many_params(device, dtypes=(torch.float32,), seed=0, n=N_TENSORS):
    """``n`` small tensors of mixed sizes (1..300, some 2-D, some empty) in three groups.
    (The interpreter runs one program per tensor: the tests that need not 150 use fewer.)"""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 300, (n,), generator=gen).tolist()
    params = []
    for i, n in enumerate(sizes):
        shape = (0,) if i % 37 == 5 else (n // 10 + 1, 10) if i % 3 == 0 else (n,)
        dtype = dtypes[i % len(dtypes)]
        params.append(torch.randn(shape, generator=gen).to(dtype).to(device).requires_grad_())
    return [params[0::3], params[1::3], params[2::3]]


def _adamw_groups(param_lists):
    return [{"params": param_lists[0], "lr": 1e-3},
            {"params": param_lists[1], "lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1},
            {"params": param_lists[2], "lr": 5e-4, "betas": (0.95, 0.99), "weight_decay": 0.0}]


def _skip(step, i):  # a handful of grads are None on each step, different ones each time
    return (i * 7 + step) % 11 != 0


@pytest.mark.parametrize("opt_name", ["adamw", "sgd-momentum"])
def test_one_launch_per_step_for_150_tensors_in_3_groups(opt_name, kernel_device):
    param_lists = _many_params(kernel_device)
    ref_lists = clone_params(param_lists)
    if opt_name == "adamw":
        opt = fusedopt.AdamW(_adamw_groups(param_lists), backend="triton")
        ref = fusedopt.AdamW(_adamw_groups(ref_lists), backend="reference")
    else:
        def groups(lists):
            return [{"params": lists[0], "lr": 0.01},
                    {"params": lists[1], "lr": 0.03, "dampening": 0.2},
                    {"params": lists[2], "lr": 0.02, "weight_decay": 0.01}]
        opt = fusedopt.SGD(groups(param_lists), lr=0.01, momentum=0.9, backend="triton")
        ref = fusedopt.SGD(groups(ref_lists), lr=0.01, momentum=0.9, backend="reference")
    params, ref_params = flat(param_lists), flat(ref_lists)
    assert len(params) == N_TENSORS and len({p.numel() for p in params}) > 50
    for step in range(2):
        grads = fresh_grads(params, step, skip=_skip)
        assert any(g is None for g in grads)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        before = kernels.launch_count()
        opt.step()
        assert kernels.launch_count() - before == 1
        ref.step()
        assert_states_close(opt, params, ref, ref_params, **TOL[torch.float32])
    assert len(opt._buckets) == 1


def test_two_dtypes_two_launches(kernel_device):
    param_lists = _many_params(kernel_device, dtypes=(torch.float32, torch.bfloat16), n=40)
    opt = fusedopt.AdamW(_adamw_groups(param_lists), backend="triton")
    params = flat(param_lists)
    for step in range(2):
        set_grads(params, fresh_grads(params, step, skip=_skip))
        before = kernels.launch_count()
        opt.step()
        assert kernels.launch_count() - before == 2
    assert len(params) == 40
    assert sorted(str(b.dtype) for b in opt._buckets) == ["torch.bfloat16", "torch.float32"]


def test_variant_flags_split_buckets(kernel_device):
    """amsgrad in one group is another kernel variant: one more launch, not one per group."""
    param_lists = _many_params(kernel_device, n=40)
    groups = _adamw_groups(param_lists)
    groups[1]["amsgrad"] = True
    opt = fusedopt.AdamW(groups, backend="triton")
    params = flat(param_lists)
    set_grads(params, fresh_grads(params, 0, skip=None))
    before = kernels.launch_count()
    opt.step()
    assert kernels.launch_count() - before == 2


def test_cached_tables_are_reused(kernel_device):
    param_lists = _many_params(kernel_device, n=40)
    opt = fusedopt.AdamW(_adamw_groups(param_lists), backend="triton")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    params = flat(param_lists)
    set_grads(params, fresh_grads(params, 0, skip=None))
    opt.step()
    bucket = opt._buckets[0]
    table, work = bucket.table, bucket.work

    opt.step()  # the same grads again
    assert opt._buckets[0] is bucket and bucket.table is table and bucket.work is work

    opt.zero_grad(set_to_none=True)  # new grad tensors: patched in place, not rebuilt
    set_grads(params, fresh_grads(params, 1, skip=None))
    scheduler.step()  # a new lr: the hyperparameter table changes, not the tensor table
    hyper = bucket.hyper
    opt.step()
    assert opt._buckets[0] is bucket and bucket.table is table and bucket.work is work
    assert bucket.hyper is not hyper
    assert bucket.table[kernels.COLUMNS.index("GRAD")].tolist() == [
        p.grad.data_ptr() for p in params]

    opt.zero_grad(set_to_none=False)
    for p in params:
        p.grad.normal_()
    opt.step()
    assert bucket.table is table


def test_new_grad_set_rebuilds(kernel_device):
    """When a param loses its grad the table must change (and the result stay right)."""
    param_lists = _many_params(kernel_device, n=40)
    ref_lists = clone_params(param_lists)
    opt = fusedopt.AdamW(_adamw_groups(param_lists), backend="triton")
    ref = fusedopt.AdamW(_adamw_groups(ref_lists), backend="reference")
    params, ref_params = flat(param_lists), flat(ref_lists)
    for step, skip in enumerate((None, _skip, None)):
        grads = fresh_grads(params, step, skip=skip)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        live = sum(g is not None for g in grads)
        assert opt._buckets[0].num_tensors == live
        assert_states_close(opt, params, ref, ref_params, **TOL[torch.float32])
