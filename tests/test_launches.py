"""One kernel launch per step per (device, dtype, variant) bucket, whatever the number of
tensors and param groups, and cached tables that are reused rather than rebuilt.

Launches are counted with fusedopt.kernels.launch_count() (on CUDA, test_gpu.py also counts
them with torch.profiler)."""

import pytest
import torch
from cases import (
    ONE_PER_OPTIMIZER,
    TOL,
    assert_states_close,
    assert_unchanged,
    cases,
    clone_params,
    flat,
    fresh_grads,
    set_grads,
    snapshot_all,
)

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


def _kernel_and_reference(device, n):
    """AdamW on the kernels and on the reference path, over the same ``n`` params."""
    param_lists = _many_params(device, n=n)
    ref_lists = clone_params(param_lists)
    opt = fusedopt.AdamW(_adamw_groups(param_lists), backend="triton")
    ref = fusedopt.AdamW(_adamw_groups(ref_lists), backend="reference")
    return opt, flat(param_lists), ref, flat(ref_lists)


def _step_side_by_side(opt, params, ref, ref_params, grads, launches=None):
    """The same grads into both optimizers, one step each; ``launches``: kernel launches."""
    set_grads(params, grads)
    set_grads(ref_params, grads)
    before = kernels.launch_count()
    opt.step()
    if launches is not None:
        assert kernels.launch_count() - before == launches
    ref.step()


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
        _step_side_by_side(opt, params, ref, ref_params, grads, launches=1)
        assert_states_close(opt, params, ref, ref_params, **TOL[torch.float32])
    assert len(opt._buckets) == 1


@pytest.mark.parametrize("case", cases(*(c for c in ONE_PER_OPTIMIZER
                                         if not c.startswith(("adam-", "adamw", "sgd")))))
def test_one_launch_per_step_for_every_optimizer(case, kernel_device):
    """Every optimizer of the family: one launch per step over 60 tensors in three groups
    with different hyperparameters and some grads None (LAMB: two, its norms and its update),
    with the kernels' result the reference's."""
    param_lists = _many_params(kernel_device, n=60)
    ref_lists = clone_params(param_lists)
    opt = case.make_fused(param_lists, "triton")
    ref = case.make_fused(ref_lists, "reference")
    params, ref_params = flat(param_lists), flat(ref_lists)
    expected = 2 if case.fused_cls is fusedopt.LAMB else 1
    assert opt.launches_per_step == expected
    for step in range(2):
        grads = fresh_grads(params, step, skip=_skip)
        _step_side_by_side(opt, params, ref, ref_params, grads, launches=expected)
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
    table, runner = bucket.table, bucket.runner
    device_table, work = runner.tensors, runner.work

    opt.step()  # the same grads again
    assert opt._buckets[0] is bucket and bucket.table is table and bucket.runner is runner
    assert runner.tensors is device_table and runner.work is work

    opt.zero_grad(set_to_none=True)  # new grad tensors: patched in place, not rebuilt
    set_grads(params, fresh_grads(params, 1, skip=None))
    scheduler.step()  # a new lr: the hyperparameter table changes, not the tensor table
    hyper = runner.hyper
    opt.step()
    assert opt._buckets[0] is bucket and bucket.table is table and bucket.runner is runner
    assert runner.tensors is device_table and runner.work is work
    assert runner.hyper is not hyper
    assert runner.tensors[runner.columns["GRAD"]].tolist() == [
        p.grad.data_ptr() for p in params]

    opt.zero_grad(set_to_none=False)
    for p in params:
        p.grad.normal_()
    opt.step()
    assert bucket.table is table


def test_new_grad_set_rebuilds(kernel_device):
    """When a param loses its grad the table must change (and the result stay right)."""
    opt, params, ref, ref_params = _kernel_and_reference(kernel_device, n=40)
    for step, skip in enumerate((None, _skip, None)):
        grads = fresh_grads(params, step, skip=skip)
        _step_side_by_side(opt, params, ref, ref_params, grads, launches=1)
        live = sum(g is not None for g in grads)
        assert opt._buckets[0].runner.num_tensors == live
        assert_states_close(opt, params, ref, ref_params, **TOL[torch.float32])


def test_moved_param_storage_rebuilds(kernel_device):
    """``p.data = ...`` moves a param's storage: the kernel must write the new storage."""
    opt, params, ref, ref_params = _kernel_and_reference(kernel_device, n=12)
    for step in range(3):
        if step == 2:
            for p in params[::3]:
                p.data = p.data.clone()
        grads = fresh_grads(params, step, skip=None)
        before = [p.detach().clone() for p in params]
        _step_side_by_side(opt, params, ref, ref_params, grads, launches=1)
        assert_states_close(opt, params, ref, ref_params, **TOL[torch.float32])
    assert any(not torch.equal(p, b) for p, b in zip(params[::3], before[::3]) if p.numel())


def test_grad_not_matching_its_moved_param_raises_before_any_update(kernel_device):
    """A param re-typed through ``p.data`` keeps its old grad: a clear error, nothing changed
    in any bucket (the float64 one is checked before the float32 one runs)."""
    params = [torch.randn(5, device=kernel_device, requires_grad=True),
              torch.randn(7, device=kernel_device, requires_grad=True),
              torch.randn(3, dtype=torch.float64, device=kernel_device, requires_grad=True)]
    opt = fusedopt.AdamW(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[2].data = params[2].data.clone()
    params[1].data = params[1].data.double()  # its grad stays float32
    before = snapshot_all(opt, params)
    with pytest.raises(RuntimeError, match="grad is torch.float32"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_param_retyped_through_data_is_regrouped(kernel_device):
    """``p.data = p.data.double()`` before any step (as ``model.double()`` does) moves the param
    to the float64 bucket: the same trajectory as an optimizer built after the change."""
    params = [torch.randn(6, device=kernel_device, requires_grad=True) for _ in range(3)]
    opt = fusedopt.Adam(params, lr=0.1, backend="triton")
    opt.step()  # no grads yet: builds float32 buckets, creates no state
    for p in params[1:]:
        p.data = p.data.double()
    twins = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.Adam(twins, lr=0.1, foreach=False)
    for step in range(3):
        grads = fresh_grads(params, step, skip=None)
        _step_side_by_side(opt, params, ref, twins, grads, launches=2)
    assert sorted(str(b.dtype) for b in opt._buckets) == ["torch.float32", "torch.float64"]
    assert_states_close(opt, params, ref, twins, **TOL[torch.float32])


def test_param_retyped_after_its_state_exists_raises_before_any_update(kernel_device):
    params = [torch.randn(5, device=kernel_device, requires_grad=True) for _ in range(3)]
    opt = fusedopt.AdamW(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[2].data = params[2].data.double()  # its exp_avg/exp_avg_sq stay float32
    for p in params:
        p.grad = torch.randn_like(p)
    before = snapshot_all(opt, params)
    with pytest.raises(ValueError, match="'exp_avg' is torch.float32"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_prepared_launch_passes_every_argument_in_signature_order(monkeypatch):
    """After the JIT's first launch has compiled the kernel, the next ones call the compiled
    kernel directly, as triton's own launcher does: every argument in signature order
    (constexprs in their places), the grid, the current stream. A pointer argument whose
    16-byte alignment differs from the compiled kernel's goes back through the JIT.
    (Checked with stand-ins here: no GPU in CI; the gpu-marked tests run the real thing.)"""
    import importlib

    from fusedopt.kernels import skeleton

    driver_module = importlib.import_module("triton.runtime.driver")

    calls = []

    class Compiled:
        function, packed_metadata = "function", "packed"

        def launch_metadata(self, grid, stream, *args):
            return ("metadata", grid, stream, len(args))

        def run(self, *args):
            calls.append(("run", args))

    class JIT:
        arg_names = skeleton.multi_tensor_step.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(("jit", grid, args, kwargs))
                return Compiled()
            return launch

    class Active:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return f"stream{device}"

    monkeypatch.setattr(type(driver_module.driver), "active", property(lambda self: Active()))
    constexprs = {name: f"const-{name}" for name in JIT.arg_names if name.isupper()}
    kernel = skeleton.Prepared(JIT(), constexprs)
    tensors = [torch.zeros(4) for _ in range(10)]
    runtime = (tensors[0], 7, tensors[1], tensors[2], 3, tensors[3], tensors[4], tensors[5],
               tensors[6], tensors[7], tensors[8], tensors[9])
    kernel((5,), runtime)
    kernel((5,), runtime)
    assert [c[0] for c in calls] == ["jit", "run"]
    assert calls[0][2] == runtime and calls[0][3] == {**constexprs, **skeleton.LAUNCH_OPTIONS}
    args = calls[1][1]
    assert args[:9] == (5, 1, 1, "stream0", "function", "packed",
                        ("metadata", (5,), "stream0", len(JIT.arg_names)), args[7], args[8])
    bound = dict(zip(JIT.arg_names, args[9:]))
    assert len(args[9:]) == len(JIT.arg_names)
    runtime_names = [n for n in JIT.arg_names if n not in constexprs]
    assert [bound[n] for n in runtime_names] == list(runtime)
    assert all(bound[n] == v for n, v in constexprs.items())
    odd = torch.zeros(8)[1:5]  # 4 bytes past its storage's (aligned) start
    kernel((5,), (odd, *runtime[1:]))
    assert [c[0] for c in calls] == ["jit", "run", "jit"]


@pytest.mark.parametrize(("builds", "launched"), [
    # (registers, spills) of the plain build, then of the capped one where it is compiled
    ([(80, 0)], "plain"),  # within the cap: kept, no second build
    ([(118, 0), (96, 0)], "capped"),  # over the cap: the capped build, which does not spill
    ([(80, 6), (93, 0)], "capped"),  # the plain build spills, the capped one does not
    ([(118, 0), (96, 10)], "plain"),  # the capped build spills: the plain one stays
])
def test_prepared_launch_takes_the_register_cap_only_where_it_helps(monkeypatch, builds,
                                                                    launched):
    """The compile options a Prepared kernel settles on at its first launch, from what each
    build reports (stand-ins for triton's compiled kernel: n_regs / n_spills as the driver
    fills them in). The capped build is compiled then, not launched, so that no later step
    (a CUDA graph capture) compiles anything."""
    import importlib

    from fusedopt.kernels import skeleton

    driver_module = importlib.import_module("triton.runtime.driver")
    compiles = []

    class Compiled:
        function, packed_metadata = "function", "packed"

        def __init__(self, capped):
            self.capped = capped
            self.n_regs, self.n_spills = builds[1 if capped else 0]

        def launch_metadata(self, *args):
            return None

        def run(self, *args):
            runs.append("capped" if self.capped else "plain")

    def options(kwargs):
        return {k: v for k, v in kwargs.items() if not k.isupper()}

    class JIT:
        arg_names = skeleton.multi_tensor_step.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                compiles.append(("launch", options(kwargs)))
                runs.append("capped" if "maxnreg" in kwargs else "plain")
                return Compiled("maxnreg" in kwargs)
            return launch

        def warmup(self, *args, grid, **kwargs):
            compiles.append(("warmup", options(kwargs)))
            return Compiled("maxnreg" in kwargs)

    class Active:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return "stream"

    runs = []
    monkeypatch.setattr(type(driver_module.driver), "active", property(lambda self: Active()))
    constexprs = {name: 0 for name in JIT.arg_names if name.isupper()}
    kernel = skeleton.Prepared(JIT(), constexprs)
    runtime = (torch.zeros(4), 1, torch.zeros(4), torch.zeros(4), 1, torch.zeros(4),
               torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4),
               torch.zeros(4))
    for _ in range(5):
        kernel((1,), runtime)
    plain, capped = skeleton.LAUNCH_OPTIONS, skeleton.CAPPED_OPTIONS
    assert capped == {**plain, "maxnreg": 96}
    # the first launch is the plain build's, through the JIT; the capped build is compiled
    # then where the plain one needs it, and nothing is compiled after the first launch
    assert compiles == [("launch", plain)] + [("warmup", capped)] * (len(builds) - 1)
    assert runs == ["plain"] + [launched] * 4
