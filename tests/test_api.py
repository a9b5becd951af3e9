"""The torch-facing API: signatures, validation, refused options, closures, sparse and
non-float params, backend selection, and ``import fusedopt`` without triton."""

import inspect
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from cases import TOL, assert_states_close, clone_params, fresh_grads, set_grads

import fusedopt

TWINS = ["Adam", "AdamW", "SGD", "Adagrad", "Adadelta", "RMSprop", "NAdam", "RAdam", "Adamax",
         "Rprop", "ASGD"]
PAIRS = [pytest.param(getattr(fusedopt, name), getattr(torch.optim, name), id=name.lower())
         for name in TWINS]
CPU = torch.device("cpu")


def _params(n=3, dtype=torch.float32):
    return [torch.randn(n, dtype=dtype, requires_grad=True)]


# ---- signature and class ------------------------------------------------------------------------


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_is_a_torch_optimizer(ours, theirs):
    opt = ours(_params(), backend="reference")
    assert isinstance(opt, theirs) and isinstance(opt, torch.optim.Optimizer)
    assert type(opt).__name__ == theirs.__name__
    assert opt.defaults == theirs(_params()).defaults


# ---- validation: torch's errors, verbatim -------------------------------------------------------

NAN = math.nan
INVALID = [
    ("adam", {"lr": -1e-3}), ("adam", {"lr": NAN}), ("adam", {"eps": -1e-8}),
    ("adam", {"betas": (1.0, 0.999)}), ("adam", {"betas": (0.9, -0.1)}),
    ("adam", {"betas": (0.9, 1.5)}), ("adam", {"weight_decay": -0.1}),
    ("adam", {"lr": torch.tensor([1e-3, 2e-3])}),
    ("adamw", {"lr": -1.0}), ("adamw", {"lr": NAN}), ("adamw", {"eps": -1.0}),
    ("adamw", {"betas": (-0.5, 0.9)}), ("adamw", {"weight_decay": -1e-2}),
    ("sgd", {"lr": -0.1}), ("sgd", {"lr": NAN}), ("sgd", {"momentum": -0.5}),
    ("sgd", {"weight_decay": -1.0}), ("sgd", {"nesterov": True}),
    ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}),
    ("sgd", {"lr": torch.tensor([0.1, 0.2])}),
    ("adagrad", {"lr": -0.1}), ("adagrad", {"lr_decay": -1.0}),
    ("adagrad", {"weight_decay": -1.0}), ("adagrad", {"initial_accumulator_value": -0.5}),
    ("adagrad", {"eps": -1e-10}),
    ("adadelta", {"lr": -1.0}), ("adadelta", {"rho": 1.5}), ("adadelta", {"eps": -1.0}),
    ("adadelta", {"weight_decay": -0.1}), ("adadelta", {"lr": torch.tensor([1.0, 2.0])}),
    ("rmsprop", {"lr": -0.1}), ("rmsprop", {"eps": -1.0}), ("rmsprop", {"momentum": -0.5}),
    ("rmsprop", {"weight_decay": -0.1}), ("rmsprop", {"alpha": -0.9}),
    ("nadam", {"lr": -0.1}), ("nadam", {"betas": (1.0, 0.999)}), ("nadam", {"eps": -1.0}),
    ("nadam", {"weight_decay": -0.1}), ("nadam", {"momentum_decay": -0.004}),
    ("radam", {"lr": -0.1}), ("radam", {"betas": (0.9, 1.0)}), ("radam", {"eps": -1.0}),
    ("radam", {"weight_decay": -0.1}),
    ("adamax", {"lr": -0.1}), ("adamax", {"betas": (-0.1, 0.9)}), ("adamax", {"eps": -1.0}),
    ("adamax", {"weight_decay": -0.1}), ("adamax", {"lr": torch.tensor([1.0, 2.0])}),
    ("rprop", {"lr": -0.1}), ("rprop", {"etas": (1.2, 0.5)}), ("rprop", {"etas": (0.0, 1.2)}),
    ("rprop", {"etas": (0.5, 1.0)}), ("rprop", {"lr": torch.tensor([1.0, 2.0])}),
    ("asgd", {"lr": -0.1}), ("asgd", {"weight_decay": -0.1}),
    ("asgd", {"lr": torch.tensor([1.0, 2.0])}),
]
CLASSES = {name.lower(): (getattr(fusedopt, name), getattr(torch.optim, name)) for name in TWINS}


def _outcome(make):
    try:
        make()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)
    return None


@pytest.mark.parametrize("name, kwargs", INVALID,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                              for n, kw in INVALID])
def test_invalid_hyperparameters_raise_torchs_error(name, kwargs):
    ours, theirs = CLASSES[name]
    expected = _outcome(lambda: theirs(_params(), **kwargs))
    got = _outcome(lambda: ours(_params(), **kwargs, backend="reference"))
    assert got == expected
    if not (name == "sgd" and kwargs.get("lr") is NAN):  # torch's SGD lets a NaN lr through
        assert expected is not None and expected[0] is ValueError


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_empty_and_malformed_params_raise_torchs_error(ours, theirs):
    for bad in ([], torch.zeros(3)):
        assert _outcome(lambda b=bad: ours(b)) == _outcome(lambda b=bad: theirs(b))
        assert _outcome(lambda b=bad: ours(b)) is not None


@pytest.mark.parametrize("option", [{"foreach": True}, {"fused": False},
                                    {"differentiable": True}],
                         ids=["foreach=True", "fused=False", "differentiable=True"])
@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_refused_torch_options(ours, theirs, option):
    if option.keys() - inspect.signature(theirs).parameters.keys():
        with pytest.raises(TypeError):  # e.g. fused: Adadelta has none, in torch either
            ours(_params(), **option)
        return
    with pytest.raises((ValueError, NotImplementedError), match=next(iter(option))):
        ours(_params(), **option)


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_accepted_options_are_recorded_like_torch(ours, theirs):
    """The torch options fusedopt accepts are kept in param_groups as torch keeps them, so
    that a checkpoint loaded into torch.optim selects what the user asked for."""
    accepted = inspect.signature(theirs).parameters
    kwargs = {k: v for k, v in {"foreach": False, "fused": None, "differentiable": False,
                                "capturable": False}.items() if k in accepted}
    opt = ours(_params(), **kwargs, backend="reference")
    ref = theirs(_params(), **kwargs)
    assert opt.param_groups[0].keys() == ref.param_groups[0].keys()
    for key in kwargs:
        assert opt.param_groups[0][key] == ref.param_groups[0][key], key


# ---- step ---------------------------------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_step_with_closure(ours, theirs, backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    model, twin = _model(), _model()
    opt = ours(model.parameters(), lr=0.01, backend=backend)
    ref = theirs(twin.parameters(), lr=0.01, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
        calls = []

        def closure(m=model, o=opt, x=x, y=y, calls=calls):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            calls.append(torch.is_grad_enabled())
            return loss

        def twin_closure(x=x, y=y):
            ref.zero_grad()
            loss = torch.nn.functional.mse_loss(twin(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        expected = ref.step(twin_closure)
        assert calls == [True], "the closure runs once, with grad enabled"
        assert isinstance(loss, torch.Tensor)
        if backend == "reference":  # the same arithmetic as torch: the same loss, bit for bit
            assert torch.equal(loss, expected)
        else:  # the kernel's fp32 rounding may differ from torch's in the last bit
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert_states_close(opt, list(model.parameters()), ref, list(twin.parameters()),
                            **TOL[torch.float32])
    assert opt.step() is None


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_step_hooks_run(ours, theirs):
    calls = []
    params = _params()
    opt = ours(params, backend="reference")
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    params[0].grad = torch.randn(3)
    opt.step()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_step_without_any_grad_is_a_no_op(ours, theirs, backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    params = _params()
    before = params[0].detach().clone()
    opt = ours(params, momentum=0.9, backend=backend) if ours is fusedopt.SGD \
        else ours(params, backend=backend)
    state = _state_copy(opt)  # empty, but for Adagrad's, which torch makes in __init__
    opt.step()
    assert torch.equal(params[0], before) and _states_equal(_state_copy(opt), state)
    assert len(opt.state) == len(theirs(clone_params([params])[0]).state)


# ---- sparse and non-float params ---------------------------------------------------------------


def _state_copy(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def _states_equal(a, b):
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        for k in a)


@pytest.mark.parametrize("when", ["first-step", "after-dense-steps"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_sparse_grad_raises_and_changes_nothing(ours, theirs, backend, when, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    params = [torch.randn(5, requires_grad=True), torch.randn(4, requires_grad=True)]
    # SGD and Adagrad take sparse grads where torch does: without weight decay (torch fails
    # there too); tests/test_sparse.py compares them with torch
    opt = (ours(params, lr=0.1, weight_decay=0.1, backend=backend)
           if ours in (fusedopt.SGD, fusedopt.Adagrad) else ours(params, backend=backend))
    if when == "after-dense-steps":
        for step in range(2):
            set_grads(params, fresh_grads(params, step, skip=None))
            opt.step()
    values = [p.detach().clone() for p in params]
    state = _state_copy(opt)
    params[0].grad = torch.randn(5)
    params[1].grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="(?i)sparse"):
        opt.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values)), "params changed"
    assert _states_equal(_state_copy(opt), state), "state changed"


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_sparse_grad_in_a_mixed_dtype_group_changes_nothing(ours, theirs):
    """torch.optim.Adam checks a group's grads before updating any of its params; fusedopt
    must too, across its per-dtype buckets (here the float32 bucket runs before the float64
    one). (torch.optim.SGD and Adagrad accept sparse grads without weight decay, and fail on
    it: the same here.)"""
    params = [torch.randn(5, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True)]
    twins = clone_params([params])[0]
    decay = {"weight_decay": 0.1} if theirs in (torch.optim.SGD, torch.optim.Adagrad) else {}
    opt = ours(params, backend="reference", **decay)
    ref = theirs(twins, foreach=False, **decay)
    values = [p.detach().clone() for p in params]
    for ps in (params, twins):
        ps[0].grad = torch.ones(5)
        ps[1].grad = torch.ones(4, dtype=torch.float64).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        ref.step()
    # (torch's SGD and Adagrad loop over params: they update the dense one before failing;
    # fusedopt checks everything first)
    if theirs not in (torch.optim.SGD, torch.optim.Adagrad):
        assert torch.equal(twins[0], values[0])  # torch: no param changes (zero state may)
    state = _state_copy(opt)
    with pytest.raises(RuntimeError, match="(?i)sparse"):
        opt.step()
    assert torch.equal(params[0], values[0]), "the float32 param was updated before the raise"
    assert _states_equal(_state_copy(opt), state), "state was created or changed"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_non_float_params_raise(ours, theirs, dtype):
    with pytest.raises((ValueError, TypeError), match="dtype"):
        ours([torch.zeros(3, dtype=dtype)], backend="reference")
    opt = ours(_params(), backend="reference")
    with pytest.raises((ValueError, TypeError), match="dtype"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=dtype)]})
    assert len(opt.param_groups) == 1, "the refused group was kept"


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_non_dense_param_is_refused(ours, theirs):
    """A strided view (gaps in memory) cannot be walked as one flat range: refused, loudly."""
    base = torch.randn(10)
    with pytest.raises(ValueError, match="dense"):
        ours([base[::2]], backend="reference")


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_params_from_a_generator_and_zero_grad(ours, theirs):
    model = _model()
    opt = ours(model.parameters(), backend="reference")
    assert len(opt.param_groups[0]["params"]) == 4
    model(torch.randn(2, 6)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---- Lion and LAMB: no torch twin, torch's conventions ---------------------------------------

PAPER = [pytest.param(fusedopt.Lion, {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0,
                                      "maximize": False}, id="lion"),
         pytest.param(fusedopt.LAMB, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6,
                                      "weight_decay": 0.01, "bias_correction": True,
                                      "maximize": False}, id="lamb")]


@pytest.mark.parametrize("cls, defaults", PAPER)
def test_paper_optimizers_defaults_and_errors(cls, defaults):
    opt = cls(_params(), backend="reference")
    assert isinstance(opt, torch.optim.Optimizer) and opt.defaults == defaults
    invalid = [({"lr": -1.0}, "Invalid learning rate: -1.0"),
               ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0: 1.0"),
               ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
               ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
               ({"lr": torch.tensor([1.0, 2.0])}, "Tensor lr must be 1-element")]
    if "eps" in defaults:
        invalid.append(({"eps": -1.0}, "Invalid epsilon value: -1.0"))
    for kwargs, message in invalid:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            cls(_params(), **kwargs)
    for engine_option in ("foreach", "fused", "capturable", "differentiable"):
        with pytest.raises(TypeError):
            cls(_params(), **{engine_option: True})
    with pytest.raises(TypeError, match="Tensors"):
        cls(torch.zeros(3))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("cls, defaults", PAPER)
def test_paper_optimizers_closure_and_sparse(cls, defaults, backend, request):
    if backend == "triton":
        request.getfixturevalue("kernel_device")
    model = _model()
    opt = cls(model.parameters(), lr=0.01, backend=backend)
    x, y = torch.randn(8, 6), torch.randn(8, 1)
    losses = []
    for _ in range(5):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        losses.append(opt.step(closure).item())
    assert losses[-1] < losses[0]
    params = list(model.parameters())
    state = _state_copy(opt)
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert _states_equal(_state_copy(opt), state)


# ---- backend selection --------------------------------------------------------------------------


def _bucket_backends(opt, params):
    set_grads(params, fresh_grads(params, 0, skip=None))
    opt.step()
    return {b.backend for b in opt._buckets}


def test_auto_without_interpreter_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FUSEDOPT_BACKEND", raising=False)
    assert fusedopt.resolve_backend(None, CPU) == "reference"
    assert fusedopt.resolve_backend("auto", CPU) == "reference"
    params = _params()
    assert _bucket_backends(fusedopt.AdamW(params), params) == {"reference"}


def test_auto_with_interpreter_on_cpu_is_triton(monkeypatch, kernel_device):
    monkeypatch.delenv("FUSEDOPT_BACKEND", raising=False)
    if kernel_device == "cpu":
        assert fusedopt.resolve_backend(None, CPU) == "triton"
    params = [p.to(kernel_device) for p in _params()]
    assert _bucket_backends(fusedopt.AdamW(params), params) == {"triton"}


def test_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fusedopt.resolve_backend("triton", CPU)
    params = _params()
    opt = fusedopt.SGD(params, lr=0.1, backend="triton")
    before = params[0].detach().clone()
    params[0].grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        opt.step()
    assert torch.equal(params[0], before)


@pytest.mark.parametrize("env", ["reference", "triton"])
def test_env_var_selects_backend(monkeypatch, env, request):
    if env == "triton":
        request.getfixturevalue("kernel_device")
    monkeypatch.setenv("FUSEDOPT_BACKEND", env)
    assert fusedopt.resolve_backend(None, CPU) == env
    params = _params()
    assert _bucket_backends(fusedopt.Adam(params), params) == {env}


def test_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv("FUSEDOPT_BACKEND", "triton")
    params = _params()
    assert _bucket_backends(fusedopt.Adam(params, backend="reference"), params) == {"reference"}


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_invalid_backend_name_raises(ours, theirs, monkeypatch):
    monkeypatch.delenv("FUSEDOPT_BACKEND", raising=False)
    with pytest.raises(ValueError, match="cuda"):
        ours(_params(), backend="cuda")
    with pytest.raises(ValueError):
        fusedopt.resolve_backend("Triton", CPU)
    monkeypatch.setenv("FUSEDOPT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSEDOPT_BACKEND"):
        ours(_params())
    assert fusedopt.BACKENDS == ("auto", "triton", "reference")


def test_reference_backend_launches_no_kernel(kernel_device):
    from fusedopt import kernels

    params = _params(4097)
    opt = fusedopt.AdamW(params, backend="reference")
    before = kernels.launch_count()
    for step in range(2):
        set_grads(params, fresh_grads(params, step, skip=None))
        opt.step()
    assert kernels.launch_count() == before


# ---- import without triton ----------------------------------------------------------------------

_NO_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # as if not installed: `import triton` raises ImportError
    import torch
    import fusedopt

    assert fusedopt.resolve_backend(None, torch.device("cpu")) == "reference"
    torch.manual_seed(0)
    p = torch.randn(1023, requires_grad=True)
    start = p.detach().clone()
    opt = fusedopt.AdamW([p], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn(1023)
        opt.step()
    assert {b.backend for b in opt._buckets} == {"reference"}
    assert not torch.equal(p, start) and float(opt.state[p]["step"]) == 3
    try:
        fusedopt.resolve_backend("triton", torch.device("cpu"))
    except RuntimeError as e:
        assert "not installed" in str(e), e
    else:
        raise AssertionError("backend='triton' without triton did not raise")
    import fusedopt.kernels  # the declarations and the package need no triton ...
    try:
        fusedopt.kernels.launch  # ... its kernels do
    except ImportError:
        pass
    else:
        raise AssertionError("fusedopt.kernels.launch imported without triton")
    print("OK")
""")


def test_import_and_step_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")  # even then, auto must not pick triton
    env.pop("FUSEDOPT_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", _NO_TRITON], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")


def test_import_fusedopt_does_not_import_triton():
    """``import fusedopt`` itself stays torch-only (torch.optim may import triton later)."""
    code = "import sys, torch, fusedopt\nprint('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
