"""What each optimizer's update reads and writes, declared once, by name.

An :class:`Algorithm` names everything one optimizer's element-wise update touches: its state
tensors, its per-group hyperparameters, its per-tensor scalar states, its per-tensor sums and
its constexpr variant flags. Three things are checked against that one declaration, so that a
name out of place fails at import instead of silently using ``eps`` as ``lr``:

* the ``@triton.jit`` update in :mod:`fusedopt.kernels.updates` (its argument names, in order:
  :meth:`Algorithm.update_args`), and its helpers (:meth:`Algorithm.advance_args`,
  :meth:`Algorithm.terms_args`);
* the readable reference function in :mod:`fusedopt.reference` (:meth:`Algorithm.check_reference`);
* the optimizer spec in :mod:`fusedopt.optimizers`: the dicts its ``_hyperparams`` and ``_flags``
  return must have exactly these keys, and its states must be among these (checked by the
  engine).

The skeleton kernel never sees the names: it calls the update through an adapter generated
from the declaration (:func:`fusedopt.kernels.skeleton.adapter`), which passes each table
slot to the argument of the same name.

This module imports neither triton nor torch: ``import fusedopt`` reads it without triton.

Vocabulary, the same in every layer:

* **states**: tensors shaped like the param (``exp_avg``...), kept in the param's dtype;
* **scalars**: per-tensor float32 scalar states (``step``, NAdam's ``mu_product``, ASGD's
  ``eta`` and ``mu``), each a 0-dim tensor in ``optimizer.state[p]``. The update receives
  ``step`` already incremented (torch counts the step before using it) and every other scalar
  as it was stored before this step; the algorithm's ``advance`` computes their new values;
* **sums**: per-tensor sums of element-wise terms, made by a first launch (LAMB's norms);
* **fresh**: whether a param's state was created and not yet updated (SGD's first momentum
  step is ``buf = g``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    """The names one update reads and writes; see the module docstring."""

    name: str
    states: tuple[str, ...]
    hyper: tuple[str, ...]
    flags: tuple[str, ...]
    scalars: tuple[str, ...] = ()
    sums: tuple[str, ...] = ()
    reads_fresh: bool = False

    def __post_init__(self) -> None:
        if self.scalars and "step" in self.scalars and self.scalars[0] != "step":
            raise ValueError(f"{self.name}: 'step' must be the first scalar")
        names = ("param", "grad", *self.states, *self.hyper, *self.scalars, *self.sums,
                 *self.flags)
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a name is declared twice in {names}")

    @property
    def uses_step(self) -> bool:
        return "step" in self.scalars

    @property
    def advanced(self) -> tuple[str, ...]:
        """The scalars besides ``step``: their new values come from ``<name>_advance``."""
        return tuple(s for s in self.scalars if s != "step")

    @property
    def flag_args(self) -> tuple[str, ...]:
        """The flags as the jit functions name them: upper case, as constexprs."""
        return tuple(f.upper() for f in self.flags)

    def update_args(self) -> tuple[str, ...]:
        """``<name>(param, grad, *states, *hyper, *scalars, *sums, [fresh], *FLAGS)``,
        returning ``(param, *states)``."""
        return ("param", "grad", *self.states, *self.hyper, *self.scalars, *self.sums,
                *(("fresh",) if self.reads_fresh else ()), *self.flag_args)

    def advance_args(self) -> tuple[str, ...]:
        """``<name>_advance(*scalars, *hyper, *FLAGS)``, returning the new values of
        :attr:`advanced`, in order."""
        return (*self.scalars, *self.hyper, *self.flag_args)

    def terms_args(self) -> tuple[str, ...]:
        """``<name>_terms(param, grad, *states, *hyper, *scalars, *FLAGS)``, returning one
        term per sum, in order."""
        return ("param", "grad", *self.states, *self.hyper, *self.scalars, *self.flag_args)

    def check_jit(self, kind: str, fn) -> None:
        """TypeError unless the jit function ``fn`` takes exactly the declared arguments."""
        expected = {"update": self.update_args, "advance": self.advance_args,
                    "terms": self.terms_args}[kind]()
        got = tuple(getattr(fn, "arg_names", ()))
        if got != expected:
            raise TypeError(f"the {kind} of {self.name!r} takes {got}, but its declaration "
                            f"says {expected}")

    def check_reference(self, fn) -> None:
        """TypeError unless the reference function takes ``param, grad, *states`` by position
        and exactly the hyperparameters, scalars, ``fresh`` (if read) and flags (lower case)
        by keyword. Sums are not among them: the reference computes what it needs."""
        params = inspect.signature(fn).parameters.values()
        positional = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
        keywords = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        expected_keywords = {*self.hyper, *self.scalars, *self.flags,
                             *(("fresh",) if self.reads_fresh else ())}
        if positional != ("param", "grad", *self.states) or keywords != expected_keywords:
            raise TypeError(f"the reference {fn.__name__} takes {positional} and keywords "
                            f"{sorted(keywords)}; the declaration of {self.name!r} says "
                            f"{('param', 'grad', *self.states)} and {sorted(expected_keywords)}")


_ADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")

ADAM = Algorithm("adam", states=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), hyper=_ADAM_HYPER,
                 flags=("maximize", "amsgrad", "decoupled_weight_decay"), scalars=("step",))
SGD = Algorithm("sgd", states=("momentum_buffer",),
                hyper=("lr", "momentum", "dampening", "weight_decay"),
                flags=("maximize", "has_momentum", "nesterov"), reads_fresh=True)
ADAGRAD = Algorithm("adagrad", states=("sum",),
                    hyper=("lr", "lr_decay", "weight_decay", "eps"), flags=("maximize",),
                    scalars=("step",))
ADADELTA = Algorithm("adadelta", states=("square_avg", "acc_delta"),
                     hyper=("lr", "rho", "eps", "weight_decay"), flags=("maximize",),
                     scalars=("step",))
RMSPROP = Algorithm("rmsprop", states=("square_avg", "momentum_buffer", "grad_avg"),
                    hyper=("lr", "alpha", "eps", "weight_decay", "momentum"),
                    flags=("maximize", "has_momentum", "centered"), scalars=("step",))
NADAM = Algorithm("nadam", states=("exp_avg", "exp_avg_sq"),
                  hyper=(*_ADAM_HYPER, "momentum_decay"),
                  flags=("maximize", "decoupled_weight_decay"),
                  scalars=("step", "mu_product"))
RADAM = Algorithm("radam", states=("exp_avg", "exp_avg_sq"), hyper=_ADAM_HYPER,
                  flags=("maximize", "decoupled_weight_decay"), scalars=("step",))
ADAMAX = Algorithm("adamax", states=("exp_avg", "exp_inf"), hyper=_ADAM_HYPER,
                   flags=("maximize",), scalars=("step",))
LION = Algorithm("lion", states=("exp_avg",), hyper=("lr", "beta1", "beta2", "weight_decay"),
                 flags=("maximize",))
LAMB = Algorithm("lamb", states=("exp_avg", "exp_avg_sq"), hyper=_ADAM_HYPER,
                 flags=("maximize", "bias_correction"), scalars=("step",),
                 sums=("param_sq", "update_sq"))
RPROP = Algorithm("rprop", states=("prev", "step_size"),
                  hyper=("etaminus", "etaplus", "step_size_min", "step_size_max"),
                  flags=("maximize",), scalars=("step",))
ASGD = Algorithm("asgd", states=("ax",), hyper=("lr", "lambd", "alpha", "t0", "weight_decay"),
                 flags=("maximize",), scalars=("step", "eta", "mu"))

# SparseAdam's update runs on the rows of its sparse grads only (fusedopt.kernels.sparse)
SPARSE_ADAM = Algorithm("sparse_adam", states=("exp_avg", "exp_avg_sq"),
                        hyper=("lr", "beta1", "beta2", "eps"), flags=("maximize",),
                        scalars=("step",))

#: every declaration, by name
ALGORITHMS = {a.name: a for a in (ADAM, SGD, ADAGRAD, ADADELTA, RMSPROP, NADAM, RADAM, ADAMAX,
                                  LION, LAMB, RPROP, ASGD, SPARSE_ADAM)}

# ---- whole-tensor algorithms: per-tensor reductions and matrix work ---------------------------
# Their kernels are the tile kernels of :mod:`fusedopt.kernels.tiles`, not the element-wise
# skeleton: they have no ``@triton.jit`` update checked against the declaration, but their
# reference functions are, and the engine checks their specs' names as for every algorithm.

ADAFACTOR = Algorithm("adafactor", states=("row_var", "col_var", "variance"),
                      hyper=("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay"),
                      flags=("maximize",), scalars=("step",))
MUON = Algorithm("muon", states=("momentum_buffer",),
                 hyper=("lr", "weight_decay", "momentum", "ns_coefficients", "eps", "ns_steps",
                        "adjust_lr_fn"),
                 flags=("nesterov",))

#: the whole-tensor declarations, by name
TILED_ALGORITHMS = {a.name: a for a in (ADAFACTOR, MUON)}
