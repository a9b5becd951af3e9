"""Every twin follows the *installed* torch: its signature, its defaults, and every argument.

Nothing here lists torch's arguments by hand: the twins are found among what fusedopt exports,
and each is compared with its torch.optim class as the installed torch defines it. A torch
release that adds an argument makes ``test_every_torch_argument_is_implemented`` fail (and
the twin refuse that argument at any non-default value) until fusedopt implements it.
"""

import inspect

import pytest
import torch

import fusedopt
from fusedopt import precision
from fusedopt.twin import ENGINE_OPTIONS, torch_arguments, torch_twin

TWINS = [getattr(fusedopt, name) for name in fusedopt.__all__
         if isinstance(getattr(fusedopt, name), type) and torch_twin(getattr(fusedopt, name))]
IDS = [cls.__name__ for cls in TWINS]


def _params():
    return [torch.randn(3, 2, requires_grad=True)]  # 2-D: Muon takes nothing else


def test_the_twins_are_found():
    # not a list of torch's arguments: a floor, so that a broken discovery cannot pass vacuously
    assert {"Adam", "AdamW", "SGD", "LBFGS"} <= set(IDS)
    assert all(issubclass(cls, torch_twin(cls)) for cls in TWINS)


@pytest.mark.parametrize("ours", TWINS, ids=IDS)
def test_signature_is_the_installed_torchs_plus_backend(ours):
    """torch's arguments, then (element-wise optimizers) the keyword-only precision options
    (fusedopt.precision), then ``backend``."""
    theirs = torch_twin(ours)
    described = [(p.name, p.kind, p.default) for p in inspect.signature(ours).parameters.values()]
    expected = [(p.name, p.kind, p.default)
                for p in inspect.signature(theirs).parameters.values()]
    keyword = inspect.Parameter.KEYWORD_ONLY
    added = ([(name, keyword, default) for name, default in precision.OPTIONS.items()]
             if getattr(ours, "precision_modes", False) else [])
    assert described == expected + added + [("backend", keyword, None)]


@pytest.mark.parametrize("ours", TWINS, ids=IDS)
def test_defaults_and_groups_are_the_installed_torchs(ours):
    theirs = torch_twin(ours)
    opt, ref = ours(_params(), backend="reference"), theirs(_params())
    assert opt.defaults == ref.defaults
    assert opt.defaults.keys() >= torch_arguments(theirs).keys()
    strip = [{k: v for k, v in g.items() if k != "params"} for g in (opt.param_groups[0],
                                                                      ref.param_groups[0])]
    assert strip[0] == strip[1]


@pytest.mark.parametrize("ours", TWINS, ids=IDS)
def test_every_torch_argument_is_implemented(ours):
    """Each argument of the installed torch class is one the twin implements (its spec reads
    it) or an engine option (foreach, fused, capturable, differentiable)."""
    theirs = torch_twin(ours)
    missing = set(torch_arguments(theirs)) - set(ours.torch_options) - set(ENGINE_OPTIONS)
    assert not missing, (f"torch {torch.__version__}'s torch.optim.{theirs.__name__} has "
                         f"arguments fusedopt.{ours.__name__} does not implement: {missing}")


@pytest.mark.parametrize("ours", TWINS, ids=IDS)
def test_arguments_torch_lacks_are_not_offered(ours):
    """An argument the twin knows from another torch release but the installed one lacks
    (LBFGS's maximize before 2.14) is a TypeError, as it is for torch."""
    theirs = torch_twin(ours)
    absent = [name for name in ours.torch_options if name not in torch_arguments(theirs)]
    for name in absent:
        for cls in (ours, theirs):
            with pytest.raises(TypeError, match=name):
                cls(_params(), **{name: True})


def test_a_new_torch_argument_is_refused_unless_at_its_default():
    """A torch release adds an argument fusedopt does not know: the twin offers it (torch's
    signature), accepts torch's default, and refuses any other value before building anything,
    in the constructor, in add_param_group and in load_state_dict."""

    class NewerSGD(torch.optim.SGD):
        def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                     nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                     fused=None, shiny=False):
            super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                             maximize=maximize, foreach=foreach,
                             differentiable=differentiable, fused=fused)
            self.defaults["shiny"] = shiny  # as torch would have put it in its defaults
            for group in self.param_groups:
                group["shiny"] = shiny

    NewerSGD.__module__ = "torch.optim.sgd"  # as if torch itself defined it

    class SGD(fusedopt.SGD, NewerSGD):
        pass

    assert torch_twin(SGD) is NewerSGD
    assert "shiny" in inspect.signature(SGD).parameters
    p = torch.randn(4, requires_grad=True)
    opt = SGD([p], lr=0.1, backend="reference")
    assert opt.defaults["shiny"] is False
    with pytest.raises(NotImplementedError, match="shiny=True"):
        SGD([p], lr=0.1, shiny=True)
    with pytest.raises(NotImplementedError, match="shiny"):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], "shiny": True})
    assert len(opt.param_groups) == 1
    saved = opt.state_dict()
    saved["param_groups"][0]["shiny"] = True
    with pytest.raises(NotImplementedError, match="shiny"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["shiny"] is False
    with pytest.raises(TypeError, match="unexpected keyword argument 'glossy'"):
        SGD([p], glossy=True)
