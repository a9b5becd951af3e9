"""Twins follow the installed torch.

A fusedopt twin of a ``torch.optim`` class takes exactly the arguments of that class *in the
torch that is installed*, with torch's defaults, plus a keyword-only ``backend``. Its
constructor is made here from the torch class's own signature, read at import, so a newer
torch that adds an argument (torch 2.14's ``LBFGS(maximize=...)``) is followed without a
hard-coded list, and an older torch that lacks one is not offered it.

What the twin does with an argument is its spec's business: each twin declares the torch
options it implements (``torch_options``). An argument the installed torch has but the twin
does not implement is accepted at torch's default (it then means what torch's default means)
and refused with a clear ``NotImplementedError`` at any other value, never silently ignored;
``tests/test_twins.py`` fails when the installed torch has such an argument, so the gap is
seen the day a torch release adds one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

#: Options that choose among torch's implementations; the engine decides what they mean.
ENGINE_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def torch_twin(cls: type) -> type | None:
    """The torch.optim class that ``cls`` subclasses (its twin), or None (Lion, LAMB)."""
    for base in cls.__mro__[1:]:
        if (issubclass(base, torch.optim.Optimizer) and base is not torch.optim.Optimizer
                and base.__module__.startswith("torch.optim")):
            return base
    return None


def torch_arguments(twin: type) -> dict[str, inspect.Parameter]:
    """The installed torch class's constructor arguments, ``self`` and ``params`` left out."""
    parameters = inspect.signature(twin.__init__).parameters
    return {name: p for name, p in parameters.items() if name not in ("self", "params")}


def check_options(owner: str, twin: type, options: dict[str, Any],
                  implemented: Iterable[str]) -> None:
    """Refuse a torch argument the twin does not implement, unless it is at torch's default.

    ``options`` may be a whole param group: keys that are not arguments of the installed torch
    class are torch's own bookkeeping (``initial_lr``, ``params``, ...) and are left alone.
    """
    implemented = set(implemented) | set(ENGINE_OPTIONS)
    for name, parameter in torch_arguments(twin).items():
        if name in implemented or name not in options:
            continue
        value = options[name]
        default = parameter.default
        same = value is default or (type(value) is type(default) and value == default)
        if not same:
            raise NotImplementedError(
                f"{owner} does not implement {name}={value!r} (an argument of "
                f"torch.optim.{twin.__name__} in torch {torch.__version__}); use "
                f"torch.optim.{twin.__name__} for it, or leave it at its default {default!r}")


def twin_constructor(twin: type, extra_options: dict[str, Any] | None = None
                     ) -> Callable[..., None]:
    """``__init__`` for a twin of ``twin``: torch's signature plus keyword-only ``backend``
    and ``extra_options`` (name: default; fusedopt's own group options, such as the precision
    modes), which go into ``defaults`` and every param group as torch's options do.

    It binds the arguments as torch would (same ``TypeError`` for a wrong one), hands every
    option, defaults filled in, to ``self._before_torch_init(backend, options)`` (which checks
    the backend and refuses what the twin cannot do, before anything is built), runs torch's
    own ``__init__`` (validation, ``defaults``, param groups: torch's, verbatim), then
    ``self._after_torch_init()``.
    """
    torch_signature = inspect.signature(twin.__init__)
    extra_options = dict(extra_options or {})

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        extra = {name: kwargs.pop(name, default) for name, default in extra_options.items()}
        try:
            bound = torch_signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}.__init__() {e}") from None
        options = {name: bound.arguments.get(name, parameter.default)
                   for name, parameter in torch_arguments(twin).items()}
        self._before_torch_init(backend, {**options, **extra})
        twin.__init__(*bound.args, **bound.kwargs)
        if extra_options:
            self._adopt_options(extra)
        self._after_torch_init()

    keyword = inspect.Parameter.KEYWORD_ONLY
    added = [inspect.Parameter(name, keyword, default=default)
             for name, default in extra_options.items()]
    backend_argument = inspect.Parameter("backend", keyword, default=None,
                                         annotation="str | None")
    __init__.__signature__ = torch_signature.replace(
        parameters=[*torch_signature.parameters.values(), *added, backend_argument])
    __init__.__doc__ = (f"The arguments of torch.optim.{twin.__name__} in the installed torch, "
                        "plus ``backend`` (\"auto\", \"triton\" or \"reference\"; default: "
                        "$FUSEDOPT_BACKEND, else \"auto\").")
    return __init__
