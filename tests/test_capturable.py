"""capturable=True: the step does no host synchronisation and no host-to-device copy once
its tables are built, so that it can be captured in a CUDA graph and replayed, and a tensor lr
changed in place between replays takes effect.

On the CPU (the kernels under the interpreter) the no-sync property is checked directly: with
``Tensor.item`` and ``float(tensor)`` made to raise, the step still runs and follows
torch.optim while a scheduler changes the tensor lr in place. On CUDA (gpu-marked) the step is
captured in a ``torch.cuda.CUDAGraph`` and its replays are compared with eager steps.
"""

import inspect
from unittest import mock

import pytest
import torch
from cases import (
    CASE_BY_ID,
    SMALL_SHAPES,
    TOL,
    assert_states_close,
    clone_params,
    flat,
    fresh_grads,
    make_params,
    set_grads,
)

CAPTURABLE = ["adamw-default", "adam-amsgrad-wd", "nadam-wd-momentum-decay", "radam-wd",
              "adamax-wd-maximize", "rmsprop-momentum-centered-wd", "adadelta-rho-wd-maximize"]


def _no_host_reads():
    def refuse(*args, **kwargs):
        raise AssertionError("a capturable step read a tensor on the host")
    return mock.patch.multiple(torch.Tensor, item=refuse, __float__=refuse)


@pytest.mark.parametrize("case_id", CAPTURABLE)
def test_capturable_step_reads_nothing_on_the_host(case_id, kernel_device):
    case = CASE_BY_ID[case_id]
    ours = make_params(SMALL_SHAPES, torch.float32, device=kernel_device)
    theirs = clone_params(ours)
    # tensor lrs (one of shape [1], which torch takes too) and, where there are betas, tensor
    # betas: all read on the device
    lrs = [torch.tensor(v, device=kernel_device) for v in ([1e-2], 3e-2, 5e-3)]
    extra = dict(case.defaults())
    their_extra = dict(extra)
    if "betas" in inspect.signature(case.torch_cls).parameters:
        extra["betas"] = (torch.tensor(0.85, device=kernel_device),
                          torch.tensor(0.98, device=kernel_device))
        their_extra["betas"] = tuple(b.cpu() for b in extra["betas"])
    opt = case.fused_cls([{"params": g, "lr": lr} for g, lr in zip(ours, lrs)],
                         **extra, capturable=True, backend="triton")
    ref = case.torch_cls([{"params": g, "lr": lr.clone()} for g, lr in zip(theirs, lrs)],
                         **their_extra, foreach=False)
    assert all(g["capturable"] for g in opt.param_groups)
    for step in range(6):
        grads = fresh_grads(flat(ours), step, skip=None)
        set_grads(flat(ours), grads)
        set_grads(flat(theirs), grads)
        if step == 0:
            opt.step()  # the warm-up step builds the tables (as before a graph capture)
        else:
            with _no_host_reads():
                opt.step()
        ref.step()
        for o in (opt, ref):  # change every lr in place, as a scheduler on tensor lr does
            for g in o.param_groups:
                g["lr"].mul_(0.7)
        assert_states_close(opt, flat(ours), ref, flat(theirs), **TOL[torch.float32],
                            msg=f"step {step}:")


def test_non_capturable_step_does_read_the_lr(kernel_device):
    """The check above can fail: without capturable the float lr is read on the host."""
    case = CASE_BY_ID["adamw-default"]
    params = make_params(SMALL_SHAPES[:1], torch.float32, device=kernel_device)
    opt = case.fused_cls(params[0], lr=torch.tensor(1e-2), backend="triton")
    set_grads(params[0], fresh_grads(params[0], 0, skip=None))
    opt.step()
    with _no_host_reads(), pytest.raises(AssertionError, match="on the host"):
        opt.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case_id", CAPTURABLE)
def test_cuda_graph_replay_matches_eager(case_id):
    case = CASE_BY_ID[case_id]
    graphed = make_params(SMALL_SHAPES, torch.float32, device="cuda")
    eager = clone_params(graphed)

    def make(params):
        lr = torch.tensor(1e-2, device="cuda")
        return case.fused_cls(flat(params), **{**case.defaults(), "lr": lr}, capturable=True,
                              backend="triton")

    opt, ref = make(graphed), make(eager)
    static_grads = [torch.zeros_like(p) for p in flat(graphed)]
    for p, g in zip(flat(graphed), static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch documents
        for g, new in zip(static_grads, fresh_grads(flat(graphed), 0, skip=None)):
            g.copy_(new)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    set_grads(flat(eager), static_grads)
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(1, 7):
        for g, new in zip(static_grads, fresh_grads(flat(graphed), step, skip=None)):
            g.copy_(new)
        if step == 4:  # an lr changed between replays takes effect
            for o in (opt, ref):
                o.param_groups[0]["lr"].fill_(3e-2)
        graph.replay()
        set_grads(flat(eager), static_grads)
        ref.step()
        torch.cuda.synchronize()
        assert_states_close(opt, flat(graphed), ref, flat(eager), **TOL[torch.float32],
                            msg=f"replay {step}:")
