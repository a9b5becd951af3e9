"""The multi-tensor engine every fusedopt optimizer runs on.

An optimizer is a small spec (see :class:`FusedOptimizer`); this module does the rest:

1. **Buckets.** Parameters are grouped by (device, dtype, variant flags). Each bucket is one
   kernel launch per step, whatever the number of tensors and param groups in it.
2. **State** (:mod:`fusedopt.state`): found in ``optimizer.state``, checked against its
   param, created where missing, when a bucket (re)builds.
3. **The validated table** (:mod:`fusedopt.table`): the tensors of the launch with their
   addresses and layouts, checked at every step before anything runs. Nothing is assumed:
   a param, grad or state whose storage was rebound, re-viewed, resized or re-typed, a state
   dict replaced by hand, a param replaced in its group, makes the bucket rebuild from
   scratch with every check, or raise a clear error, before any tensor changes. New grad
   objects (the usual ``zero_grad(set_to_none=True)`` and backward) take a shorter path.
   Every bucket checks its inputs before any bucket updates anything.
4. **Runners** (:mod:`fusedopt.runners`): ``triton`` (one launch over a device copy of the
   table) or ``reference`` (the readable per-tensor functions), behind one ``run()``.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fusedopt import precision
from fusedopt.backend import check_backend_name, resolve_backend
from fusedopt.kernels import quantization
from fusedopt.kernels.algorithms import Algorithm
from fusedopt.kernels.variant import QUANTIZED, Precision, Variant
from fusedopt.state import StateOfBucket, WatchedStates, check_existing_state, stored_dtype
from fusedopt.table import TensorTable, WrittenMemory
from fusedopt.tensors import (
    check_grad,
    check_param,
    describe,
    is_dtensor,
    local,
    real_dtype,
    span,
)
from fusedopt.twin import check_options, torch_twin, twin_constructor


class FusedOptimizer(torch.optim.Optimizer):
    """Base of every fusedopt optimizer. A subclass is a spec:

    * ``algorithm``: the :class:`~fusedopt.kernels.algorithms.Algorithm` declaration naming
      what its update reads and writes (its ``@triton.jit`` update and its reference function
      are found by that name, and checked against it at import);
    * ``torch_options``: the torch arguments it implements (see :mod:`fusedopt.twin`);
    * ``_hyperparams(group)``: the group's hyperparameters, a dict with exactly the declared
      names (floats, or one-element tensors as torch allows for lr and the Adam betas);
    * ``_flags(group)``: the variant flags, a dict with exactly the declared names;
    * ``_state_names(flags)``: the state tensors this variant has, among the declared ones;
    * ``_state_init(name, group)`` / ``_scalar_init(name, group)``: the value a new state
      tensor / scalar state starts at (default 0).
    """

    algorithm: Algorithm
    #: The torch arguments this optimizer implements; with the engine options (foreach, fused,
    #: capturable, differentiable) they must cover its torch twin's arguments.
    torch_options: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A twin of a torch.optim class (a subclass of it) that defines no ``__init__`` of its
        own gets the installed torch class's constructor, plus ``backend`` (see
        :mod:`fusedopt.twin`)."""
        super().__init_subclass__(**kwargs)
        twin = torch_twin(cls)
        if twin is not None and "__init__" not in cls.__dict__:
            cls.__init__ = twin_constructor(
                twin, precision.OPTIONS if cls.precision_modes else None)

    @property
    def launches_per_step(self) -> int:
        """Kernel launches per step for each (device, dtype, variant) bucket."""
        return 2 if self.algorithm.sums else 1

    #: Whether the optimizer takes the precision options (:mod:`fusedopt.precision`): the
    #: element-wise ones do, in the one launch of the skeleton.
    precision_modes = True

    #: Whether the update needs each whole tensor (per-tensor norms, row and column sums,
    #: matrix products): the kernels cannot run on FSDP2's local shards then.
    whole_tensors = False

    def _param_kind(self, p: Tensor) -> Any:
        """What else, besides device, dtype and flags, puts params in separate buckets (and
        may give them other states: see :meth:`_state_names`); None: nothing."""
        return None

    def _state_shape(self, name: str, p: Tensor) -> torch.Size:
        """The shape of state ``name`` of ``p``: the param's (every element-wise update), or
        one value per quantization block for an 8-bit state's absmax."""
        if name.endswith(quantization.ABSMAX_SUFFIX):
            return torch.Size([quantization.num_blocks(p.numel())])
        return p.shape

    #: Sparse (COO) grads: "no" (refused, as torch's twin does), "rows" (accepted: the update
    #: runs on the rows the coalesced grad holds, see :mod:`fusedopt.kernels.sparse`) or "only"
    #: (SparseAdam: dense grads are refused).
    sparse_grads = "no"

    def _check_sparse_group(self, group: dict) -> None:
        """The options torch's twin refuses with sparse grads, refused as it does."""

    def _sparse_as_dense(self, group: dict) -> bool:
        """Whether this group's update touches every element whatever the grad holds (SGD's
        momentum decays everywhere): its sparse grads then take the dense path, densified."""
        return False

    def _check_update(self, p: Tensor, grad: Tensor, where: str) -> None:
        """What the spec's torch twin refuses at step time (complex params, shapes), raised
        as torch raises it, before any bucket updates anything."""

    def _triton_runner(self, variant: Variant, table: TensorTable, groups: list[int],
                       fresh: list[Tensor | None], device: torch.device) -> Any:
        """The kernel runner of a bucket: the element-wise skeleton's, unless the spec
        updates whole tensors (see :mod:`fusedopt.tiled`)."""
        from fusedopt.runners import TritonRunner

        return TritonRunner(variant, table, groups, fresh, device)

    def _state_init(self, name: str, group: dict) -> float:
        return 0.0

    def _scalar_init(self, name: str, group: dict) -> float:
        return 0.0

    def _hyperparams(self, group: dict) -> dict[str, float]:
        raise NotImplementedError

    def _flags(self, group: dict) -> dict[str, bool]:
        raise NotImplementedError

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        raise NotImplementedError

    def _named(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` in declaration order; an error naming the difference if its keys are
        not exactly the declared ones (a spec out of step with its algorithm)."""
        declared = getattr(self.algorithm, kind)
        if len(values) != len(declared) or any(name not in values for name in declared):
            raise TypeError(f"fusedopt.{type(self).__name__}._{kind}() gives {list(values)}; "
                            f"the declaration of {self.algorithm.name!r} names {list(declared)}")
        return {name: values[name] for name in declared}

    def _group_flags(self, group: dict) -> dict[str, bool]:
        return self._named("flags", self._flags(group))

    def _group_hyper(self, group: dict) -> dict[str, Any]:
        return self._named("hyper", self._hyperparams(group))

    def _variant_states(self, flags: dict[str, bool], kind: Any = None) -> tuple[str, ...]:
        names = tuple(self._state_names(flags) if kind is None
                      else self._state_names(flags, kind))
        if [s for s in self.algorithm.states if s in names] != list(names):
            raise TypeError(f"fusedopt.{type(self).__name__}._state_names() gives {names}, not "
                            f"among {self.algorithm.states} in that order")
        return names

    # ---- construction -------------------------------------------------------------------------

    def _before_torch_init(self, backend: str | None, options: dict[str, Any]) -> None:
        """Called first in every __init__: check the backend name, and refuse the options that
        choose another implementation or that fusedopt lacks, loudly, before anything is built.
        (``capturable`` is accepted: see :meth:`step`.)"""
        check_backend_name(backend)
        self._check_group_options(options)
        self._backend_request = backend
        self._buckets: list[_Bucket] | None = None
        self._group_params: list[list[Tensor]] | None = None
        self._group_flags_seen: list[dict[str, bool]] | None = None

    def _check_group_options(self, group: dict[str, Any], loaded: bool = False) -> None:
        """The options of a group (constructor arguments, an added or a loaded group) that no
        fusedopt optimizer runs: refused with a clear error instead of silently ignored.
        A loaded group may name another implementation (``foreach``, ``fused``): that was the
        saving side's choice, and a checkpoint moves between implementations."""
        name = f"fusedopt.{type(self).__name__}"
        if group.get("differentiable"):
            raise NotImplementedError(f"{name} does not support differentiable=True")
        if group.get("foreach") and not loaded:
            raise ValueError(f"{name} always runs one fused multi-tensor kernel; foreach=True "
                             "selects torch's foreach implementation, use torch.optim for it")
        if group.get("fused", None) is False and not loaded:
            raise ValueError(f"{name} is always fused; fused=False selects torch's unfused "
                             "implementation, use torch.optim for it")
        twin = torch_twin(type(self))
        if twin is not None:
            check_options(name, twin, group, self.torch_options)
        if self.precision_modes:
            precision.check_options(name, group, self.algorithm.states)
        else:
            chosen = [k for k, default in precision.OPTIONS.items()
                      if group.get(k, default) != default]
            if chosen:
                raise NotImplementedError(f"{name} does not take {', '.join(chosen)}: its "
                                          "update is not element-wise (see fusedopt.precision)")

    def _adopt_options(self, options: dict[str, Any]) -> None:
        """fusedopt's own group options (``options``: name -> value given to the constructor)
        become defaults, and every group's, as torch's options are; those left at their
        default are not written anywhere, so that ``defaults``, the groups and state_dicts are
        exactly torch's unless an option is used."""
        options = {name: value for name, value in options.items()
                   if value != precision.OPTIONS.get(name, value)}
        self.defaults.update(options)
        owner = f"fusedopt.{type(self).__name__}"
        for group in self.param_groups:
            for name, value in options.items():
                group.setdefault(name, value)
            # (a group's own option with the defaults)
            precision.check_options(owner, group, self.algorithm.states)
        if any(g.get("stochastic_rounding") for g in self.param_groups):
            self._rounding_seed()  # drawn now: reproducible from torch.manual_seed before
        # state torch's constructor made (Adagrad's sum) in another dtype than the precision
        # mode keeps it in: made again at the first step, from its initial value
        self._states_in_their_dtypes(remake=True)

    def _precision(self, group: dict, p: Tensor) -> Precision:
        """The precision mode of ``p`` in ``group``."""
        if not self.precision_modes:
            return Precision()
        return precision.precision_of(group, p, f"fusedopt.{type(self).__name__}")

    def _after_torch_init(self) -> None:
        self._record_engine()

    def _record_engine(self) -> None:
        """Called after torch.optim's __init__, which has recorded the engine options in the
        groups as torch does (so a checkpoint loaded into torch.optim selects what was asked)."""
        # GradScaler then hands step() grad_scale / found_inf (as optimizer attributes) instead
        # of unscaling the grads itself: the kernel unscales and skips on the device.
        self._step_supports_amp_scaling = True
        self.state = WatchedStates(self.state)
        self._seen_state_changes = -1
        # the precision options the states are kept for (construction, loading, a step)
        self._group_precision_seen = self._precision_options()
        if "_compile_handle" not in self.__dict__:  # registered eagerly: dynamo only reads it
            from fusedopt import compiled

            self._compile_handle = compiled.register(self)
        self._compile_params = [p for g in self.param_groups for p in g["params"]]

    def add_param_group(self, param_group: dict) -> None:
        """torch's, refusing what fusedopt cannot run: a param given twice (torch only warns;
        one launch would update it twice at once), and the options of
        :meth:`_check_group_options`."""
        super().add_param_group(param_group)
        owner = f"fusedopt.{type(self).__name__}"
        try:
            group = self.param_groups[-1]
            self._check_group_options(group)
            for p in group["params"]:
                check_param(p, owner)
            if len(set(map(id, group["params"]))) != len(group["params"]):
                raise ValueError(f"{owner}: a parameter appears more than once in a parameter "
                                 "group; torch.optim would update it once per appearance, "
                                 "fusedopt refuses it (list each parameter once)")
        except (TypeError, ValueError, NotImplementedError):
            self.param_groups.pop()
            raise
        self._group_params = None
        self._compile_params = [p for g in self.param_groups for p in g["params"]]

    def __getstate__(self) -> dict[str, Any]:
        state = {**super().__getstate__(), "_backend_request": self._backend_request}
        for name in ("_seed", "_rounding", "_rounding_loaded"):  # stochastic rounding's
            if name in self.__dict__:
                state[name] = self.__dict__[name]
        state.pop("_compile_handle", None)  # a copy registers itself afresh
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, deepcopy or load_state_dict: torch's attributes; the caches restart."""
        super().__setstate__(state)  # also called by torch's load_state_dict, with 2 keys
        self.__dict__.setdefault("_backend_request", None)
        if self.precision_modes:  # groups saved without them (torch's) keep this optimizer's
            for group in self.param_groups:
                for name in precision.OPTIONS:
                    if name in self.defaults:
                        group.setdefault(name, self.defaults[name])
        self._buckets = None
        self._group_params = None
        self._record_engine()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, with each param's state a plain dict (as torch's own, so
        that ``torch.load(weights_only=True)`` and torch.optim read it)."""
        saved = super().state_dict()
        # (8-bit states' codes saved as "<state>_codes": torch.optim cannot mistake them)
        saved["state"] = {key: precision.saved_state(dict(value))
                          for key, value in saved["state"].items()}
        if "_seed" in self.__dict__:  # stochastic rounding's seed and launch counts
            counts = dict(self.__dict__.get("_rounding_loaded", {}))
            counts.update({key: int(t[1]) for key, t in self.__dict__.get("_rounding",
                                                                           {}).items()})
            saved[precision.ROUNDING_KEY] = {"seed": self._seed, "counts": counts}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's loader, after checking the state really is this optimizer's.

        A state_dict from another optimizer, or with state tensors of the wrong shape, raises
        ValueError before anything is changed.
        """
        if isinstance(state_dict.get("state"), dict):  # 8-bit codes under their state's name
            state_dict = {**state_dict, "state": {
                key: precision.live_state(value) if isinstance(value, dict) else value
                for key, value in state_dict["state"].items()}}
        self._check_loaded_state(state_dict)
        rounding = precision.check_rounding_state(state_dict.get(precision.ROUNDING_KEY),
                                                  f"fusedopt.{type(self).__name__}")
        kept = self._states_of_other_dtypes(state_dict)
        super().load_state_dict(state_dict)  # ends in __setstate__, which restarts the caches
        self._states_in_their_dtypes(kept)
        if rounding is not None:  # made on each device at its next step, from these
            self._seed, self._rounding_loaded = rounding
            self._rounding = {}

    def _states_of_other_dtypes(self, state_dict: dict) -> dict[tuple[int, int, str], Tensor]:
        """The saved state tensors whose dtype is not their param's (a precision mode's, 8-bit
        codes, and the float32 scalar states of low-precision params: NAdam's
        ``mu_product``), which torch's loader would cast to the param's dtype, losing bits:
        set aside, by (group, position in the group, name)."""
        kept = {}
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            return kept  # torch's loader raises its error
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            for i, (param_id, p) in enumerate(zip(saved["params"], group["params"])):
                for name, value in (state_dict["state"].get(param_id) or {}).items():
                    if (name != "step" and isinstance(value, Tensor)
                            and (value.is_floating_point() or value.dtype == QUANTIZED)
                            and value.dtype != p.dtype):
                        kept[g, i, name] = value
        return kept

    def _states_in_their_dtypes(self, kept: dict[tuple[int, int, str], Tensor] | None = None,
                                remake: bool = False) -> None:
        """Each state tensor in the dtype this optimizer keeps it in (its precision mode's;
        the param's otherwise): after torch's loader (from the saved value itself where torch
        cast it, ``kept``), when a group's precision options change, and after torch's
        constructor (Adagrad makes its state there; ``remake``: such a state is made again in
        its dtype from its initial value, not cast from the param's)."""
        kept = kept or {}
        owner = f"fusedopt.{type(self).__name__}"
        # first every 8-bit state to be read is checked, then states are converted: an error
        # leaves nothing half converted
        for checking in (True, False):
            for g, i, p, state, variant in self._states_by_variant(kept):
                for name in variant.element_tensors:
                    value = kept.get((g, i, name), dict.get(state, name))
                    dtype = stored_dtype(p, name, variant.dtype_of)
                    scale = quantization.absmax_name(name)
                    absmax = kept.get((g, i, scale), dict.get(state, scale))
                    if checking:
                        if (isinstance(value, Tensor) and value.dtype == QUANTIZED
                                and value.dtype != dtype and not remake):
                            # (torch's loader moved the absmax to the param's device, and
                            # not the codes, set aside)
                            precision.check_quantized(
                                value.to(p.device), absmax.to(p.device)
                                if isinstance(absmax, Tensor) else absmax, name, owner)
                        continue
                    self._state_in_its_dtype(p, state, name, value, dtype, absmax,
                                             self.param_groups[g], remake)

    def _states_by_variant(self, kept: dict):
        """(group index, index in the group, param, its state, its variant) of every param
        with state; the scalar states torch's loader would have cast (``kept``) restored."""
        for g, group in enumerate(self.param_groups):
            flags = self._group_flags(group)
            for i, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                try:
                    mode = self._precision(group, p)
                except (NotImplementedError, ValueError):
                    continue  # the step raises it
                for name in self.algorithm.scalars:  # (the step puts them on their device)
                    if (g, i, name) in kept:
                        state[name] = kept[g, i, name]
                yield g, i, p, state, Variant(
                    self.algorithm, self._variant_states(flags, self._param_kind(p)),
                    tuple(flags.values()), real_dtype(p), precision=mode)

    def _state_in_its_dtype(self, p: Tensor, state: dict, name: str, value: Any,
                            dtype: torch.dtype, absmax: Any, group: dict, remake: bool
                            ) -> None:
        """State ``name`` of ``p`` (``value``, as found or saved) in ``dtype``: cast,
        quantized or dequantized; its 8-bit absmax kept, made or dropped alongside."""
        scale = quantization.absmax_name(name)
        if isinstance(value, Tensor) and value.dtype != dtype:
            if remake:  # made by torch's constructor: made again, in its dtype
                value = torch.full_like(value, self._state_init(name, group),
                                        dtype=torch.float32 if dtype == QUANTIZED else dtype,
                                        memory_format=torch.preserve_format)
            elif value.dtype == QUANTIZED:  # 8-bit states kept in another dtype
                value = precision.dequantized(value.to(p.device), absmax.to(p.device), name)
            if dtype == QUANTIZED:  # (quantized in the param's layout: blocks are runs of it)
                values = torch.empty_like(p, dtype=torch.float32,
                                          memory_format=torch.preserve_format)
                state[name], state[scale] = precision.quantized(values.copy_(value), name)
            else:
                state[name] = value.to(device=p.device, dtype=dtype)
                state.pop(scale, None)  # (once the values are in: a failure can be retried)
        elif isinstance(value, Tensor):
            if value is not dict.get(state, name):
                state[name] = value.to(device=p.device)
            if dtype == QUANTIZED and absmax is not dict.get(state, scale):
                state[scale] = absmax.to(device=p.device)

    def _completed_as_torch_would(self, saved_group: dict) -> dict:
        """A saved param group with the keys an older torch did not save filled in by the
        torch twin's own ``__setstate__`` (as its loader does), run on a scratch instance."""
        scratch = object.__new__(type(self))
        scratch.defaults = dict(self.defaults)
        group = {k: v for k, v in saved_group.items() if k != "params"}
        super(FusedOptimizer, scratch).__setstate__(
            {"state": {}, "param_groups": [{**group, "params": []}]})
        return {**scratch.param_groups[0], "params": saved_group["params"]}

    def _check_loaded_state(self, state_dict: dict) -> None:
        owner = f"fusedopt.{type(self).__name__}"
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError(f"{owner}.load_state_dict expects a dict with 'state' and "
                             "'param_groups', as returned by state_dict()")
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"])
                for s, g in zip(saved_groups, self.param_groups)):
            return  # torch.optim's own loader raises its usual error for these
        for saved, group in zip(saved_groups, self.param_groups):
            saved = self._completed_as_torch_would(saved)
            self._check_group_options(saved, loaded=True)
            try:
                self._group_hyper(saved)
                flags = self._group_flags(saved)
                self._variant_states(flags)
            except KeyError as e:
                raise ValueError(f"loaded state dict has a parameter group without {e}: it was "
                                 f"not saved by {owner} or its torch.optim twin") from None
            for param_id, p in zip(saved["params"], group["params"]):
                state = saved_state.get(param_id)
                if not state:
                    continue
                names = self._variant_states(flags, self._param_kind(p))
                required = self.algorithm.scalars + names
                missing = [k for k in required if k not in state]
                if missing:
                    raise ValueError(f"loaded state dict has no {missing} for a parameter: it "
                                     f"was not saved by {owner} or its torch.optim twin")
                for k in precision.EXTRAS:  # a precision mode's own states: the param's shape
                    value = state.get(k)
                    if k in state and (not isinstance(value, Tensor) or value.shape != p.shape):
                        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
                        raise ValueError(f"loaded state {k!r} is {shape}, but its parameter "
                                         f"has shape {tuple(p.shape)}")
                for k in names:
                    value = state[k]
                    if isinstance(value, Tensor) and value.dtype == QUANTIZED:
                        precision.check_quantized(value, state.get(quantization.absmax_name(k)),
                                                  k, owner)
                    expected = self._state_shape(k, p)
                    if value is not None and (not isinstance(value, Tensor)
                                              or value.shape != expected):
                        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
                        raise ValueError(f"loaded state {k!r} has shape {shape}, but its "
                                         f"parameter has shape {tuple(p.shape)}"
                                         + ("" if expected == p.shape else
                                            f" (so {k!r} should have {tuple(expected)})"))

    # ---- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Any:
        """Perform one optimization step: one kernel launch per (device, dtype, variant).

        ``grad_scale`` and ``found_inf`` are AMP's (``torch.amp.GradScaler`` sets them as
        attributes of the optimizer, as for torch's fused optimizers): the grads are
        multiplied by the float32 ``1 / grad_scale`` (as GradScaler unscales), and where
        ``found_inf`` is nonzero nothing changes, step counts included, decided on the device.
        ``last_step_skipped`` is then a device tensor saying whether this step was skipped,
        readable without a host synchronisation.

        With ``capturable=True`` (the twins that have it in torch) a step does no host
        synchronisation and no host-to-device copy once its tables are built, so that after
        an eager warm-up step it can be captured in a CUDA graph: tensor hyperparameters (a
        CUDA tensor lr) are copied into the device table by device-side copies inside the
        step, so an lr changed in place between replays takes effect. Float hyperparameters
        are uploaded when they change, outside a capture (as in torch, a float lr changed
        after capture is not seen by the replays). Without capturable, tensor hyperparameters
        on a GPU take the same device-side copies (no sync); CPU ones are read on the host.
        """
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            return self._traced_step(closure, grad_scale, found_inf)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        flags = [self._group_flags(g) for g in groups]
        # A mapping the user assigned to ``optimizer.state`` is torch's state from then on (what
        # they put in it later must be used): nobody counts its changes, so every step rebuilds.
        watched = type(self.state) is WatchedStates
        precision_changed = self._precision_options() != self._group_precision_seen
        if (self._buckets is None or not watched
                or self.state.changes[0] != self._seen_state_changes
                or not self._same_groups(flags) or precision_changed):
            buckets = self._make_buckets(flags)  # (every group's options checked first)
            if precision_changed:  # a group's precision options changed: states follow
                try:
                    self._states_in_their_dtypes()
                except BaseException:
                    self._group_precision_seen = None  # (converted at the next step)
                    raise
                self._seen_state_changes = getattr(self.state, "changes", [-1])[0]
            self._buckets = buckets
        clip_coef = self._pending_clip_coefficient()  # raises if the grads changed under it
        try:
            try:
                for bucket in self._buckets:
                    bucket.gather()
            except _ParamsRegrouped:  # a param changed dtype or device through ``p.data``
                self._buckets = self._make_buckets(flags)
                for bucket in self._buckets:
                    bucket.gather()
            rebuilt = self._check_memory()
        except BaseException:
            for bucket in self._buckets:
                bucket.pending = bucket.sparse_pending = None  # do not keep the grads alive
            raise
        self._clip = None  # used once
        hyper = [self._group_hyper(g) for g in groups]
        capturable = any(g.get("capturable", False) for g in groups)
        for bucket in self._buckets:
            bucket.run(hyper, grad_scale, found_inf, clip_coef, capturable)
        if rebuilt:  # the memory of the tables just built, for the next steps' new grads
            self._written = self._written_memory(self._tables_memory())
        if watched:
            self._seen_state_changes = self.state.changes[0]  # our own state writes included
        self.last_step_skipped = self._skipped_flag(found_inf)
        return loss

    def _check_memory(self) -> bool:
        """Before any bucket runs: nothing one launch writes (params, states, scalar states,
        over every bucket) shares memory with anything else it writes or reads (grads).
        Checked in full where a bucket rebuilds; only the new grads otherwise. Returns whether
        a bucket rebuilds."""
        if any(b.pending[0] == "rebuild" or b.sparse_pending for b in self._buckets):
            written, grads = [], []
            for bucket in self._buckets:
                bucket.memory(written, grads)
            memory = self._written_memory(written)
            grads = [(g, name) for g, name in grads if g.device.type != "meta"]
            pointers = [g.data_ptr() for g, _ in grads]
            sizes = torch.tensor([g.numel() * g.element_size() for g, _ in grads],
                                 dtype=torch.int64)
            memory.check_grads(pointers, sizes, lambda k: grads[k][1]())
            return True
        written_memory = self.__dict__.get("_written")
        for bucket in self._buckets:
            if bucket.pending[0] == "grads" and written_memory is not None:
                table = bucket.table
                written_memory.check_grads(bucket.pending[3], table.grad_bytes,
                                           lambda k, b=bucket: b._name(b.live[k]))
        return False

    def _written_memory(self, written: list) -> WrittenMemory:
        return WrittenMemory(written, f"fusedopt.{type(self).__name__}")

    def _tables_memory(self) -> list:
        written: list = []
        for bucket in self._buckets:
            bucket.table_memory(written)
        return written

    def _same_groups(self, flags: list[dict[str, bool]]) -> bool:
        """Whether every group holds the same param objects, with the same flags, as when the
        buckets were made (a param replaced in its group's list is picked up)."""
        seen = self._group_params
        if seen is None or len(seen) != len(self.param_groups) or flags != self._group_flags_seen:
            return False
        for group, params in zip(self.param_groups, seen):
            current = group["params"]
            if len(current) != len(params) or not all(map(operator.is_, current, params)):
                return False
        return True

    def _traced_step(self, closure, grad_scale: Tensor | None,
                     found_inf: Tensor | None) -> Any:
        """What torch.compile traces of a step: the closure, then one opaque custom op
        (:mod:`fusedopt.compiled`) that runs the eager step on the params it is given."""
        from fusedopt import compiled

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # not self.param_groups: dynamo would guard on every value in them (a new lr would
        # recompile); the op reads the hyperparameters itself, eagerly
        params = self._compile_params
        compiled.step_op(params, [p.grad for p in params], self._compile_handle, grad_scale,
                         found_inf)
        return loss

    def _step_on(self, params: list[Tensor], grads: list[Tensor | None],
                 grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The custom op's body: an eager step where ``params``/``grads`` stand for the
        optimizer's params and their grads. The compiler normally passes the params
        themselves; where it passes copies, they are updated through the real params."""
        real = [p for group in self.param_groups for p in group["params"]]
        if (len(params) != len(real) or len(self._compile_params) != len(real)
                or any(a.shape != r.shape for a, r in zip(params, real))
                or any(c is not r for c, r in zip(self._compile_params, real))):
            # The list the traced code reads is renewed: dynamo sees it change and retraces.
            self._compile_params = real
            raise RuntimeError("fusedopt: the params of the compiled step are no longer the "
                               "optimizer's (a param was replaced in its group): this step did "
                               "nothing; the next call retraces with the current params")
        copies = [(r, a) for r, a in zip(real, params) if a.data_ptr() != r.data_ptr()]
        for r, a in copies:
            r.data.copy_(a)
        for r, g in zip(real, grads):
            if r.grad is not g:
                r.grad = g
        # The class's step, not the instance's (which may be the compiled one: opt.step =
        # torch.compile(opt.step)), without torch's hook wrapper: the traced call ran the hooks.
        eager_step = type(self).step
        getattr(eager_step, "__wrapped__", eager_step)(self, grad_scale=grad_scale,
                                                       found_inf=found_inf)
        for r, a in copies:
            a.copy_(r.data)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; a clip coefficient measured on the old grads is dropped too."""
        if self.__dict__.get("_clip") is not None:  # (no setattr for dynamo 2.11 to trace
            self._clip = None                       # in a compiled train step without one)
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> Tensor:
        r"""``torch.nn.utils.clip_grad_norm_`` over this optimizer's grads, fused into the step.

        .. math::
            n = \Big(\sum_i \|g_i\|_p^p\Big)^{1/p}, \qquad
            c = \min\Big(1, \frac{\text{max\_norm}}{n + 10^{-6}}\Big)

        The norm takes one multi-tensor launch per (device, dtype) on the triton backend
        (p = 1, 2 or inf; other p and complex grads use torch's norms), and ``c`` stays on the
        device: the next ``step()`` multiplies the grads by it inside its update kernel, which
        is torch's result as long as the grads are the ones measured here. The step checks
        that they are: the same tensors, unmodified (version counter), at the same address,
        and no param that had no grad has one. Otherwise (a second backward that accumulates,
        ``g.add_(...)``, grads replaced, a closure that zeroes and recomputes them) the step
        raises before changing anything: torch would have scaled the grads as they were.
        ``optimizer.zero_grad()`` drops a pending coefficient. A second call before the step
        measures the grads as the first left them (its norm is the first's coefficient times
        theirs) and compounds the coefficients, as two torch calls would. A change made
        through ``g.data`` escapes the check (it bumps no version counter; autograd does not
        see it either). Under a GradScaler call ``scaler.unscale_(opt)`` first, as torch
        documents. Returns the total norm ``n`` (a 0-dim tensor, as torch's).
        """
        norm_type = float(norm_type)
        every = [p for g in self.param_groups for p in g["params"]]
        grads = [p.grad for p in every if p.grad is not None]
        pending = self._pending_clip_coefficient()  # a clip before this one, still unapplied
        self._clip = None
        if not grads:
            return torch.tensor(0.0)
        if any(g.is_sparse or g.layout != torch.strided for g in grads):
            raise RuntimeError(f"fusedopt.{type(self).__name__} does not support sparse "
                               "gradients")
        kinds: dict[tuple, list[Tensor]] = {}
        for g in grads:
            kinds.setdefault((g.device, g.dtype), []).append(g)
        first_device = grads[0].device
        norms = []
        for (device, dtype), same in kinds.items():
            fused = (resolve_backend(self._backend_request, device) == "triton"
                     and norm_type in (1.0, 2.0, math.inf) and not dtype.is_complex
                     and all(g.is_contiguous() and not is_dtensor(g) for g in same))
            norms.append((self._multi_tensor_norm(same, norm_type) if fused
                          else torch.linalg.vector_norm(
                              torch.stack(torch._foreach_norm(same, norm_type)), norm_type)
                          ).to(first_device))
        total = (norms[0] if len(norms) == 1
                 else torch.linalg.vector_norm(torch.stack(norms), norm_type))
        if is_dtensor(total):  # FSDP2: the norm over every shard, on every process
            total = total.full_tensor()
        if pending is not None:  # torch's grads are scaled by it: so is their norm
            total = total * pending.to(total.device, total.dtype)
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if pending is not None:
            coefficient = coefficient * pending.to(coefficient.device, coefficient.dtype)
        self._clip = _PendingClip(coefficient, every)
        return total

    def _pending_clip_coefficient(self) -> Tensor | None:
        """The coefficient of the last ``clip_grad_norm_`` if the grads are still the ones it
        measured (None if there is none); RuntimeError if they are not (torch's result cannot
        be rebuilt then)."""
        clip = self.__dict__.get("_clip")
        if clip is None:
            return None
        verdict = clip.verdict()
        if verdict == "unchanged":
            return clip.coefficient
        self._clip = None
        raise RuntimeError(
            f"fusedopt.{type(self).__name__}.clip_grad_norm_: {verdict} after the norm was "
            "taken; torch.nn.utils.clip_grad_norm_ would have scaled the grads as they were, "
            "and fusedopt applies the coefficient in the step, so it cannot give torch's "
            "result. Clip right before step() (after the last backward; optimizer.zero_grad() "
            "drops a pending clip), or use torch.nn.utils.clip_grad_norm_. Nothing was "
            "updated.")

    def _multi_tensor_norm(self, grads: list[Tensor], norm_type: float) -> Tensor:
        """The p-norm (1, 2 or inf) of same-device, same-dtype grads as one vector: one
        kernel launch. The numel column and work list are kept while the sizes stay (building
        them every step would cost host time); the address column is uploaded afresh each
        call, without a wait, and no grad is kept alive between calls."""
        from fusedopt import kernels

        key = (grads[0].device, grads[0].dtype)
        numels = tuple(g.numel() for g in grads)
        layouts = self.__dict__.setdefault("_norm_layouts", {})
        if key not in layouts or layouts[key].numels != numels:
            layouts[key] = kernels.Layout(numels, key[0])
        # in the opmath dtype, then rounded once, as torch's norms
        return kernels.norm(kernels.TensorTable(grads, layouts[key]), norm_type).to(key[1])

    def _skipped_flag(self, found_inf: Tensor | None) -> Tensor:
        if found_inf is not None:
            return found_inf != 0
        device = next((p.device for g in self.param_groups for p in g["params"]),
                      torch.device("cpu"))  # (the first group may be empty)
        flag = getattr(self, "_never_skipped", None)
        if flag is None or flag.device != device:
            flag = self._never_skipped = torch.zeros((), dtype=torch.bool, device=device)
        return flag

    def _make_buckets(self, flags: list[dict[str, bool]]) -> list[_Bucket]:
        members: dict[tuple, list[tuple[Tensor, int]]] = {}
        owner = f"fusedopt.{type(self).__name__}"
        for index, (group, group_flags) in enumerate(zip(self.param_groups, flags)):
            if self.precision_modes:  # (options set in a group between steps, too)
                precision.check_options(owner, group, self.algorithm.states)
            for p in group["params"]:
                key = (p.device, real_dtype(p), tuple(group_flags.values()), self._param_kind(p),
                       self._precision(group, p))
                members.setdefault(key, []).append((p, index))
        # A precision mode's state no longer used by its param (the option was turned off, the
        # param is fp32 now) is dropped: turned on again, it starts afresh from the param.
        for (*_, mode), entries in members.items():
            for p, _ in entries:
                state = self.state.get(p)
                for name in precision.EXTRAS:
                    if name not in mode.extras and isinstance(state, dict) and name in state:
                        del state[name]
        self._group_params = [list(g["params"]) for g in self.param_groups]
        self._group_flags_seen = flags
        self._group_precision_seen = self._precision_options()
        self._seen_state_changes = getattr(self.state, "changes", [-1])[0]
        return [_Bucket(self, device, dtype, flags[entries[0][1]], entries, kind, mode)
                for (device, dtype, _, kind, mode), entries in members.items()]

    def _precision_options(self) -> list[tuple]:
        """Every group's precision options (a change regroups the params)."""
        if not self.precision_modes:
            return []
        return [tuple(g.get(k, d) for k, d in precision.OPTIONS.items())
                for g in self.param_groups]

    def _rounding_state(self, device: torch.device) -> Tensor:
        """Stochastic rounding's ``int64[3]`` device tensor for ``device``: (seed, launch
        count, programs done: 0 between launches). The seed is :meth:`_rounding_seed`, the
        same on every device; the kernels advance the count on the device. Saved in
        ``state_dict()`` (see :data:`precision.ROUNDING_KEY`)."""
        states = self.__dict__.setdefault("_rounding", {})
        key = str(device)
        if key not in states:
            # a loaded count: this device's, else the checkpoint's (another rank's device:
            # DDP replicas count alike), else 0
            loaded = self.__dict__.get("_rounding_loaded", {})
            count = loaded.get(key, max(loaded.values(), default=0))
            states[key] = torch.tensor([self._rounding_seed(), count, 0], dtype=torch.int64,
                                       device=device)
        return states[key]

    def _rounding_seed(self) -> int:
        """Stochastic rounding's Philox key: drawn from torch's default generator when the
        optimizer is made with the option (else at its first use), so that a run is
        reproducible from ``torch.manual_seed``."""
        if "_seed" not in self.__dict__:
            self._seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
        return self._seed


_GRAD = operator.attrgetter("grad")


class _PendingClip:
    """A clip coefficient and the grads it was measured on (every param's, None included), to
    tell at the step whether they are still those grads: same tensors, same version counter,
    same address and layout. (A change made through ``g.data``, which autograd does not see
    either, bumps no version counter: that one escapes.)"""

    def __init__(self, coefficient: Tensor, params: list[Tensor]):
        self.coefficient = coefficient
        self.params = params
        self.grads = [p.grad for p in params]
        self.marks = [None if g is None else (g._version, g.data_ptr(), g.dtype, g.shape,
                                              g.stride()) for g in self.grads]

    def verdict(self) -> str:
        """"unchanged", or what changed since the clip."""
        for p, then, mark in zip(self.params, self.grads, self.marks):
            now = p.grad
            if then is None:
                if now is not None:
                    return "a parameter without a grad at the clip got one"
            elif now is not then:
                return "a grad was replaced (or dropped)"
            elif (now._version, now.data_ptr(), now.dtype, now.shape, now.stride()) != mark:
                return "a grad was modified in place (or its storage rebound)"
        return "unchanged"


class _ParamsRegrouped(Exception):
    """A param no longer belongs in its bucket: the optimizer must regroup."""


class _Bucket:
    """All params of one (device, dtype, variant flags): one launch per step.

    ``gather()`` reads the grads and decides, before anything changes, between three paths:
    nothing changed (the table is intact: launch as is), only the grad objects are new (the
    usual set_to_none flow: check them against the grads they replace, re-point the grad
    column), or anything else (check every input now; rebuild state, table and runner in
    ``run()``). Every bucket gathers before any bucket runs.
    """

    def __init__(self, opt: FusedOptimizer, device: torch.device, dtype: torch.dtype,
                 flags: dict[str, bool], entries: list[tuple[Tensor, int]], kind: Any = None,
                 mode: Precision | None = None):
        self.opt = opt
        self.owner = f"fusedopt.{type(opt).__name__}"
        self.device = device
        self.dtype = dtype
        self.kind = kind
        self.members = [p for p, _ in entries]
        self.group_of = [g for _, g in entries]
        self.variant = Variant(opt.algorithm, opt._variant_states(flags, kind),
                               tuple(flags.values()), dtype, precision=mode or Precision())
        self.backend = resolve_backend(opt._backend_request, device)
        # The reference path runs DTensor ops as they are; the kernels take the local shards.
        self.sharded = self.backend == "triton" and any(map(is_dtensor, self.members))
        if self.sharded and (opt.algorithm.sums or opt.whole_tensors):
            raise NotImplementedError(
                f"{self.owner} with sharded (FSDP2/DTensor) parameters: its per-tensor "
                "reductions would need the whole tensors, across the shards; use "
                "backend='reference' for it")
        self.table: TensorTable | None = None
        self.runner: Any = None
        self.grads_seen: list[Tensor | None] | None = None  # grads the table was made with
        self.unwatched: list[tuple[dict, list]] = []
        self.live: list[int] = []  # the members the table holds (those with a grad)
        self.exposures_seen = -1  # optimizer.state's exposure count at the last gather
        self.pending: tuple | None = None  # what gather() decided, for run()
        self.sparse_pending: list[tuple[int, Tensor]] | None = None  # (member, sparse grad)
        self.sparse_members: list[int] = []  # the members with a sparse grad at the last step

    def _name(self, i: int) -> str:
        """``param 3 of group 1``: where the user finds the i-th member (for errors)."""
        p = self.members[i]
        group = self.group_of[i]
        index = next(j for j, q in enumerate(self.opt.param_groups[group]["params"]) if q is p)
        return f"param {index} of group {group}"

    def gather(self) -> None:
        """Read this step's grads and check what changed; raises before anything changes."""
        grads = raw = list(map(_GRAD, self.members))
        self.sparse_pending = None
        if self.opt.sparse_grads == "only":
            grads = self._take_sparse(raw, range(len(raw)))
        elif self.sparse_members:
            grads = self._take_sparse(raw, self.sparse_members)
        table = self.table
        counter = getattr(self.opt.state, "exposures", None)  # (none: a mapping of the user's)
        exposures = counter[0] if counter is not None else -2
        exposed, self.exposures_seen = exposures != self.exposures_seen, exposures
        if table is not None and self._dicts_intact():
            if all(map(operator.is_, grads, self.grads_seen)):
                if table.intact(self._live(grads), exposed):
                    self.pending = ("run",)
                    return
            elif self._same_params_have_grads(grads):
                live = self._live(grads)
                if table.params_intact(exposed):
                    pointers = table.check_new_grads(live)
                    if pointers is not None:
                        self.pending = ("grads", grads, live, pointers)
                        return
        grads = self._check_all(raw)
        self.pending = ("rebuild", grads)

    def _take_sparse(self, grads: list[Tensor | None], among) -> list[Tensor | None]:
        """The sparse grads among the members ``among``, checked and set aside for their own
        launch (``sparse_pending``, coalesced now, so that what can fail fails before anything
        runs); the dense path sees those params as having no grad this step. Where the spec's
        update touches every element even so (SGD's momentum), the dense path takes the grad
        densified instead. ``sparse_members`` becomes the members found with a sparse grad.

        Only the members that had a sparse grad at the last step are looked at before the
        dense path's checks (at no cost where there are none): a sparse grad anywhere else
        fails those checks (its layout is not the table's), and :meth:`_check_all` looks at
        every member."""
        found = []
        marks = self.opt.__dict__.get("_sparse_dims")
        for i in among:
            g = grads[i]
            if g is None:
                continue
            if g.layout != torch.sparse_coo:
                if self.opt.sparse_grads == "only":
                    raise RuntimeError(self.opt.dense_grad_error)
                if marks is not None:
                    marks.pop(self.members[i], None)
                continue
            self._check_sparse(i, g)
            found.append(i)
            if found == [i]:
                grads = list(grads)
            if self.opt._sparse_as_dense(self.opt.param_groups[self.group_of[i]]):
                grads[i] = g.to_dense()  # (a new tensor each step: the new-grads path)
                # torch keeps such a state sparse: the spec's state_dict() can say so
                marks = self.opt.__dict__.setdefault("_sparse_dims", WeakIdKeyDictionary())
                marks[self.members[i]] = g.sparse_dim()
            else:
                self.sparse_pending = [*(self.sparse_pending or ()), (i, g.coalesce())]
                grads[i] = None
        self.sparse_members = found
        return grads

    def _check_sparse(self, i: int, g: Tensor) -> None:
        p = self.members[i]
        if (p.device != self.device or real_dtype(p) != self.dtype
                or self.opt._param_kind(p) != self.kind):
            raise _ParamsRegrouped
        name = self._name(i)
        check_param(p, self.owner)
        if p.is_complex():
            raise RuntimeError(f"{self.owner} does not support sparse gradients of complex "
                               f"parameters ({name})")
        if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
            raise RuntimeError(f"{self.owner}: a sparse grad is {g.dtype} of shape "
                               f"{tuple(g.shape)} on {g.device}, but its parameter ({name}) is "
                               f"{describe(p)}; fusedopt needs grads of the parameter's dtype, "
                               "shape and device")
        self.opt._check_sparse_group(self.opt.param_groups[self.group_of[i]])
        if self.variant.precision != Precision():
            raise NotImplementedError(f"{self.owner}: sparse grads with the precision options "
                                      f"({name}); they are for dense training")
        check_existing_state(self.opt, p, self.variant.tensors, self.owner, name,
                             self.variant.dtype_of)

    def table_memory(self, written: list) -> bool:
        """Add (span, describe) of the params and states of this bucket's table to
        ``written``; False where there is no table (or only meta tensors) to add."""
        table = self.table
        if table is None or not table.params or table.params[0].device.type == "meta":
            return False
        for k, p in enumerate(table.local_params):
            name = self._namer(self.live[k])
            written.append((span(p), lambda name=name: f"parameter {name()}"))
        written.extend((span(t), lambda: "an optimizer state") for t in table.owned)
        return True

    def memory(self, written: list, grads: list) -> None:
        """Add (span, describe) of what this bucket's launch writes this step (params with a
        grad, their existing states and scalar states: states yet to be created are new
        memory) to ``written``, and (grad, describe) of its grads to ``grads``; the same for
        the params with sparse grads (their grads' values)."""
        for i, g in self.sparse_pending or ():
            self._member_memory(i, written)
            grads.append((g._values(), self._namer(i)))
        pending = self.pending
        if pending[0] != "rebuild":
            if not self.table_memory(written):
                return
            step_grads = pending[2] if pending[0] == "grads" else self.table.grads
            grads.extend((local(g), self._namer(self.live[k]))
                         for k, g in enumerate(step_grads))
            return
        for i, g in enumerate(pending[1]):
            if g is None or self.members[i].device.type == "meta":
                continue
            self._member_memory(i, written)
            grads.append((local(g), self._namer(i)))

    def _member_memory(self, i: int, written: list) -> None:
        """Add (span, describe) of member ``i`` and of its existing states to ``written``."""
        p = self.members[i]
        if p.device.type == "meta":
            return
        name = self._namer(i)
        written.append((span(p), lambda name=name: f"parameter {name()}"))
        state = self.opt.state.get(p)
        for n in (*self.variant.tensors, *self.opt.algorithm.scalars):
            value = dict.get(state, n) if isinstance(state, dict) else None
            if isinstance(value, Tensor) and value.device == p.device:
                written.append((span(value), lambda name=name, n=n: f"state {n!r} of {name()}"))

    def _namer(self, i: int) -> Callable[[], str]:
        return lambda: self._name(i)

    def _same_params_have_grads(self, grads: list[Tensor | None]) -> bool:
        if not self.any_missing:  # the usual case: every param has one (a C-level pass)
            return all(map(operator.is_not, grads, itertools.repeat(None)))
        return [g is None for g in grads] == self.missing

    def _live(self, grads: list[Tensor | None]) -> list[Tensor]:
        """The grads of the params that have one (all of them, usually: no copy then)."""
        return [g for g in grads if g is not None] if self.any_missing else grads

    def _dicts_intact(self) -> bool:
        """The state dicts assigned by hand (nobody counts their changes) hold what they held."""
        for state, values in self.unwatched:
            names = (*self.variant.tensors, *self.opt.algorithm.scalars)
            if any(dict.get(state, n) is not v for n, v in zip(names, values)):
                return False
        return True

    def _check_all(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """Every input of a rebuild: params (dense, still of this bucket's device and dtype),
        grads (dense, the param's dtype, shape and device; sparse ones where the spec takes
        them, set aside by :meth:`_take_sparse`) and any state they already have. Returns the
        grads of the dense path."""
        if self.opt.sparse_grads != "no":
            self.sparse_pending = None
            grads = self._take_sparse(grads, range(len(grads)))
        for i, (p, g) in enumerate(zip(self.members, grads)):
            if (p.device != self.device or real_dtype(p) != self.dtype
                    or self.opt._param_kind(p) != self.kind):
                raise _ParamsRegrouped
            if g is None:
                continue
            name = self._name(i)
            check_param(p, self.owner)  # ``p.data`` may have been re-pointed since
            check_grad(g, p, self.owner, name)
            self.opt._check_update(p, g, name)
            check_existing_state(self.opt, p, self.variant.tensors, self.owner, name,
                                 self.variant.dtype_of)
        return grads

    def run(self, hyper: list[dict[str, Any]], grad_scale: Tensor | None = None,
            found_inf: Tensor | None = None, clip_coef: Tensor | None = None,
            capturable: bool = False) -> None:
        """Update every param of the bucket that has a grad: one kernel launch. AMP's
        ``grad_scale`` / ``found_inf`` (0-dim tensors) unscale the grads / skip the update;
        ``clip_coef`` multiplies the (unscaled) grads."""
        pending, self.pending = self.pending, None  # the grads are not kept alive past it
        sparse, self.sparse_pending = self.sparse_pending, None
        state = None
        try:
            if pending[0] == "rebuild":
                state = self._rebuild(pending[1])
            elif pending[0] == "grads":
                _, grads, live, pointers = pending
                self.table.take_grads(live, pointers)
                self.grads_seen = grads
                if self.runner is not None:
                    self.runner.accept_grads(pointers)
            if self.runner is not None:
                self.runner.run(hyper, self._on_device(grad_scale), self._on_device(found_inf),
                                self._on_device(clip_coef, self.variant.compute), capturable)
        except BaseException:
            # Nothing ran (say, out of memory): forget the state this step created, so that
            # a retry starts it afresh (SGD's first momentum step is not its later ones).
            if state is not None:
                state.forget_created()
            self.table = None
            raise

        if sparse:
            self._run_sparse(sparse, hyper, grad_scale, found_inf)

    def _run_sparse(self, sparse: list[tuple[int, Tensor]], hyper: list[dict[str, Any]],
                    grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The params with sparse grads: their state (found or created), then one launch over
        the rows of every grad (or the reference, row by row). Built anew each step: sparse
        grads come with new rows every step."""
        from fusedopt.runners import SparseRunner

        params = [self.members[i] for i, _ in sparse]
        groups = [self.group_of[i] for i, _ in sparse]
        state = StateOfBucket(self.opt, params, groups, self.variant.states)
        try:
            runner = SparseRunner(self.variant, params, [g for _, g in sparse],
                                  state.states, state.scalars, groups, self.device,
                                  self.backend)
            runner.run(hyper, self._on_device(grad_scale), self._on_device(found_inf))
        except BaseException:
            state.forget_created()
            raise

    def _rebuild(self, grads: list[Tensor | None]) -> StateOfBucket:
        """State, table and runner for the params that have grads now."""
        from fusedopt.runners import ReferenceRunner

        live = self.live = [i for i, g in enumerate(grads) if g is not None]
        params = [self.members[i] for i in live]
        groups = [self.group_of[i] for i in live]
        state = StateOfBucket(self.opt, params, groups, self.variant.tensors,
                              self.variant.dtype_of, self.variant.precision.extras)
        self.table = None
        table = TensorTable(params, [grads[i] for i in live], state.states, state.scalars,
                            lambda k: self._name(live[k]), self.owner, self.sharded,
                            self.opt.__dict__.get("_new_state", ()))
        if not live:
            self.runner = None  # nothing to update until a param has a grad
        elif self.backend == "triton":
            self.runner = self.opt._triton_runner(self.variant, table, groups, state.fresh,
                                                  self.device)
        else:
            self.runner = ReferenceRunner(self.variant, table, groups, state.fresh)
        if self.runner is not None and self.variant.precision.write == "stochastic":
            self.runner.rng = self.opt._rounding_state(self.device)
        self.table = table
        self.grads_seen = grads
        self.missing = [g is None for g in grads]
        self.any_missing = any(self.missing)
        self.unwatched = state.unwatched
        return state

    def _on_device(self, scalar: Tensor | None, dtype: torch.dtype = torch.float32
                   ) -> Tensor | None:
        """A 0-dim tensor (AMP's, GradScaler's float32 ones, or the clip coefficient) on this
        bucket's device in ``dtype``; the copy, when one is needed, does not wait."""
        if scalar is None:
            return None
        return scalar.to(self.device, dtype, non_blocking=True)
