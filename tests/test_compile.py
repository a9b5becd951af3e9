"""torch.compile: a compiled ``opt.step()`` is one ``fusedopt::step`` custom op in the graph
(no graph break, ``fullgraph=True``), and compiled training matches eager torch.optim.
Runs on the reference path and on the kernels (under the interpreter on CPU, on CUDA there)."""

import pytest
import torch
from cases import CASE_BY_ID, TOL, assert_states_close

CASES = ["adamw-default", "sgd-momentum-dampening-wd", "nadam-wd-momentum-decay", "lamb-default"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles the one FusedOptimizer.step code object anew (other instances, other
    backends): start from an empty cache, so earlier tests in this process (pytest-xdist mixes
    files) cannot use up its recompile limit."""
    torch._dynamo.reset()
    yield


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.Tanh(),
                               torch.nn.Linear(33, 5)).to(device)


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case_id", CASES)
def test_compiled_step_is_one_custom_op_and_matches_torch(case_id, backend, request):
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    case = CASE_BY_ID[case_id]
    model, twin = _model(device), _model(device)
    opt = case.fused_cls(model.parameters(), **case.defaults(), backend=backend)
    ref = case.torch_cls(twin.parameters(), **case.defaults(), foreach=False)
    graphs = []
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=_recording_backend(graphs))
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        x = torch.randn(16, 9, generator=gen).to(device)
        y = torch.randn(16, 5, generator=gen).to(device)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        compiled_step()
        ref.step()
        for o in (opt, ref):  # a new lr reaches the op, without a recompile
            for g in o.param_groups:
                g["lr"] *= 0.8
        assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                            **TOL[torch.float32], msg=f"step {step}:")
    assert len(graphs) == 1, "the step recompiled (or broke into several graphs)"
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.fusedopt.step.default in ops


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(compile_backend, kernel_device):
    """Forward, backward and step in one compiled function (autograd splits it), through
    AOTAutograd's functionalization of the op's declared mutation, and inductor's."""
    case = CASE_BY_ID["adamw-default"]
    model, twin = _model(kernel_device), _model(kernel_device)
    opt = case.fused_cls(model.parameters(), lr=1e-2, backend="triton")
    ref = case.torch_cls(twin.parameters(), lr=1e-2, foreach=False)

    def train_step(m, o, x, y):
        o.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        o.step()
        return loss

    compiled = torch.compile(train_step, backend=compile_backend)
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        x = torch.randn(16, 9, generator=gen).to(kernel_device)
        y = torch.randn(16, 5, generator=gen).to(kernel_device)
        loss = compiled(model, opt, x, y)
        expected = train_step(twin, ref, x, y)
        torch.testing.assert_close(loss, expected, **TOL[torch.float32])
        assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                            **TOL[torch.float32], msg=f"step {step}:")


def test_compiled_step_runs_hooks_once_and_eager_step_stays_eager():
    case = CASE_BY_ID["adamw-default"]
    model = _model("cpu")
    opt = case.fused_cls(model.parameters(), lr=1e-2, backend="reference")
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.step = torch.compile(opt.step)  # as one would in a training script
    for _ in range(2):
        model(torch.randn(4, 9)).sum().backward()
        opt.step()
    assert calls == ["pre", "post"] * 2


def test_compiled_step_refuses_a_param_replaced_in_its_group():
    """The compiled graph holds the params it was traced with: after a param is swapped for
    another in ``param_groups`` the op must say so, not write the old param's values into
    the new one."""
    model = _model("cpu")
    opt = CASE_BY_ID["adamw-default"].fused_cls(model.parameters(), backend="reference")
    compiled_step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    model(torch.randn(4, 9)).sum().backward()
    compiled_step()
    old = opt.param_groups[0]["params"][0]
    new = torch.nn.Parameter(torch.randn_like(old))
    new.grad = torch.randn_like(old)
    opt.param_groups[0]["params"][0] = new
    before = new.detach().clone()
    with pytest.raises(RuntimeError, match="replaced in its group"):
        compiled_step()
    assert torch.equal(new.detach(), before)
    # the next call retraces with the current params, and steps the new one as eager would
    twin = torch.nn.Parameter(new.detach().clone())
    twin.grad = new.grad.clone()
    eager = CASE_BY_ID["adamw-default"].fused_cls([twin], backend="reference")
    compiled_step()
    eager.step()
    torch.testing.assert_close(new.detach(), twin.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(new.detach(), before)
