"""The multi-tensor engine every fusedopt optimizer runs on.

An optimizer is a small spec (see :class:`FusedOptimizer`); this module does the rest:

1. **Buckets.** Parameters are grouped once by (device, dtype, variant flags). Each bucket is one
   kernel launch per step, whatever the number of tensors and param groups in it.
2. **Cached tables.** A bucket keeps a device-resident tensor table (pointers, numel, group,
   alignment), a work list of chunks and a per-group hyperparameter table. Per step the host
   only compares pointer lists and re-uploads what changed: the grad column after
   ``zero_grad(set_to_none=True)`` gave new grads, the hyperparameter rows after a scheduler
   changed lr. A full rebuild happens when the set of params with grads changes, a param's
   storage moves, a param is replaced in its group, the user changes ``optimizer.state``, or
   after ``add_param_group`` / ``load_state_dict``. Every bucket checks its inputs before any
   bucket updates anything, so an error leaves params and state as they were.
3. **Backends.** ``triton`` launches :func:`fusedopt.kernels.launch`; ``reference`` loops over the
   tensors with the readable functions of :mod:`fusedopt.reference`. Both share everything above,
   state creation included, so they differ only in who does the arithmetic.
"""

from __future__ import annotations

import array
import importlib
import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fusedopt.backend import check_backend_name, resolve_backend
from fusedopt.twin import check_options, torch_twin, twin_constructor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _WatchedDict(dict):
    """A param's state dict that counts its changes, so that a state tensor replaced, added
    or deleted by the user (a reset, an offload) makes the next step rebuild the cached
    tables rather than keep updating tensors that are no longer the state. It pickles and
    copies as a plain dict, so checkpoints stay torch.optim's."""

    def __init__(self, changes: list[int], *args: Any):
        super().__init__(*args)
        self.changes = changes  # one counter shared by the optimizer's whole state

    def __reduce__(self):
        return dict, (dict(self),)


class _WatchedStates(defaultdict):
    """``optimizer.state``: param -> :class:`_WatchedDict`, counting changes at both levels."""

    def __init__(self, state: dict):
        self.changes = [0]
        super().__init__(lambda: _WatchedDict(self.changes))
        for key, value in state.items():
            dict.__setitem__(self, key, _WatchedDict(self.changes, value))

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter(self.items())


def _counting(method_name: str) -> Callable:
    base = getattr(dict, method_name)

    def method(self, *args: Any, **kwargs: Any) -> Any:
        self.changes[0] += 1
        return base(self, *args, **kwargs)

    method.__name__ = method_name
    return method


for _cls in (_WatchedDict, _WatchedStates):
    for _name in ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem",
                  "setdefault", "update"):
        setattr(_cls, _name, _counting(_name))
del _cls, _name


def _real(t: Tensor) -> Tensor:
    """Complex tensors are updated as their real view, element-wise, as torch.optim does."""
    return torch.view_as_real(t) if t.is_complex() else t


def _is_dtensor(t: Tensor) -> bool:
    """A torch.distributed DTensor (FSDP2's sharded params, their grads and states)."""
    return type(t) is not Tensor and type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard, else ``t`` itself. The
    kernels address memory, and a DTensor's own address is not its shard's."""
    return t._local_tensor if _is_dtensor(t) else t


def _is_dense(t: Tensor) -> bool:
    """True if ``t`` covers one gap-free, non-overlapping run of memory (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_param(p: Tensor, owner: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{owner} can only optimize Tensors, got {type(p).__name__}")
    real_dtype = p.real.dtype if p.is_complex() else p.dtype
    if real_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{owner} supports parameters of dtype float16, bfloat16, float32, "
                         f"float64 and their complex forms, got {p.dtype}")
    if p.layout != torch.strided or not _is_dense(p):
        raise ValueError(f"{owner} needs dense, non-overlapping parameter storage; got a "
                         f"{p.layout} tensor of shape {tuple(p.shape)} and strides {p.stride()}")


class FusedOptimizer(torch.optim.Optimizer):
    """Base of every fusedopt optimizer. A subclass is a spec:

    * ``kernel_update``: name of its ``@triton.jit`` update in :mod:`fusedopt.kernels.updates`;
    * ``reference_update``: its readable per-tensor function in :mod:`fusedopt.reference`;
    * ``uses_step``: whether it keeps a per-parameter ``state["step"]``;
    * ``_hyperparams(group)``: the numbers the update reads, in the kernel's order (floats,
      or one-element tensors as torch allows for lr and the Adam family's betas);
    * ``_flags(group)``: at most three booleans, the kernel's constexpr variants;
    * ``_state_names(flags)``: its state tensors (at most three), in the kernel's order;
    * ``_state_init(name, group)``: the value a new state tensor starts at (default 0).

    Optional, for optimizers that need more than an element-wise map per step:

    * ``scalar_state``: (key, initial value, kernel function) of one more per-parameter scalar
      state, which the kernel function advances once per step (NAdam's ``mu_product``); the
      reference update receives it as a keyword, a 0-dim tensor to update in place;
    * ``kernel_terms``: a ``@triton.jit`` function of two element-wise terms that one launch
      sums per tensor before the update launch, which reads the sums (LAMB's norms).
    """

    kernel_update: str
    reference_update: Callable[..., None]
    uses_step: bool = False
    scalar_state: tuple[str, float, str] | None = None
    kernel_terms: str | None = None

    @property
    def launches_per_step(self) -> int:
        """Kernel launches per step for each (device, dtype, variant) bucket."""
        return 2 if self.kernel_terms else 1

    def _state_init(self, name: str, group: dict) -> float:
        return 0.0

    def _hyperparams(self, group: dict) -> dict[str, float]:
        raise NotImplementedError

    def _flags(self, group: dict) -> dict[str, bool]:
        raise NotImplementedError

    def _state_names(self, flags: dict[str, bool]) -> tuple[str, ...]:
        raise NotImplementedError

    # ---- construction -------------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A twin of a torch.optim class (a subclass of it) that defines no ``__init__`` of its
        own gets the installed torch class's constructor, plus ``backend`` (see
        :mod:`fusedopt.twin`)."""
        super().__init_subclass__(**kwargs)
        twin = torch_twin(cls)
        if twin is not None and "__init__" not in cls.__dict__:
            cls.__init__ = twin_constructor(twin)

    #: The torch arguments this optimizer implements; with the engine options (foreach, fused,
    #: capturable, differentiable) they must cover its torch twin's arguments.
    torch_options: tuple[str, ...] = ()

    def _before_torch_init(self, backend: str | None, options: dict[str, Any]) -> None:
        """Called first in every __init__: check the backend name, and refuse the options that
        choose another implementation or that fusedopt lacks, loudly, before anything is built.
        (``capturable`` is accepted: see :meth:`step`.)"""
        check_backend_name(backend)
        self._check_group_options(options)
        self._backend_request = backend
        self._buckets: list[_Bucket] | None = None
        self._layout: Any = None

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

    def _after_torch_init(self) -> None:
        self._record_engine()

    def _record_engine(self) -> None:
        """Called after torch.optim's __init__, which has recorded the engine options in the
        groups as torch does (so a checkpoint loaded into torch.optim selects what was asked)."""
        # GradScaler then hands step() grad_scale / found_inf (as optimizer attributes) instead
        # of unscaling the grads itself: the kernel unscales and skips on the device.
        self._step_supports_amp_scaling = True
        self.state = _WatchedStates(self.state)
        self._seen_state_changes = -1
        if "_compile_handle" not in self.__dict__:  # registered eagerly: dynamo only reads it
            from fusedopt import compiled

            self._compile_handle = compiled.register(self)
        self._compile_params = [p for g in self.param_groups for p in g["params"]]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group_options(self.param_groups[-1])
            for p in self.param_groups[-1]["params"]:
                _check_param(p, f"fusedopt.{type(self).__name__}")
        except (TypeError, ValueError, NotImplementedError):
            self.param_groups.pop()
            raise
        self._layout = None
        self._compile_params = [p for g in self.param_groups for p in g["params"]]

    def __getstate__(self) -> dict[str, Any]:
        state = {**super().__getstate__(), "_backend_request": self._backend_request}
        state.pop("_compile_handle", None)  # a copy registers itself afresh
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, deepcopy or load_state_dict: torch's attributes; the caches restart."""
        super().__setstate__(state)  # also called by torch's load_state_dict, with 2 keys
        self.__dict__.setdefault("_backend_request", None)
        self._buckets = None
        self._layout = None
        self._record_engine()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, with each param's state a plain dict (as torch's own, so
        that ``torch.load(weights_only=True)`` and torch.optim read it)."""
        saved = super().state_dict()
        saved["state"] = {key: dict(value) for key, value in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's loader, after checking the state really is this optimizer's.

        A state_dict from another optimizer, or with state tensors of the wrong shape, raises
        ValueError before anything is changed.
        """
        self._check_loaded_state(state_dict)
        super().load_state_dict(state_dict)  # ends in __setstate__, which restarts the caches

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
                self._hyperparams(saved)
                names = self._state_names(self._flags(saved))
            except KeyError as e:
                raise ValueError(f"loaded state dict has a parameter group without {e}: it was "
                                 f"not saved by {owner} or its torch.optim twin") from None
            required = self._scalar_names() + names
            for param_id, p in zip(saved["params"], group["params"]):
                state = saved_state.get(param_id)
                if not state:
                    continue
                missing = [k for k in required if k not in state]
                if missing:
                    raise ValueError(f"loaded state dict has no {missing} for a parameter: it "
                                     f"was not saved by {owner} or its torch.optim twin")
                for k in names:
                    value = state[k]
                    if value is not None and (not isinstance(value, Tensor)
                                              or value.shape != p.shape):
                        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
                        raise ValueError(f"loaded state {k!r} has shape {shape}, but its "
                                         f"parameter has shape {tuple(p.shape)}")

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
        flags = [self._flags(g) for g in groups]
        if type(self.state) is not _WatchedStates:  # reassigned: by the user, or unpickled
            self._record_engine()
        # A param replaced in its group's list, or state changed by the user: rebuild.
        layout = tuple((tuple(map(id, g["params"])), tuple(f.values()))
                       for g, f in zip(groups, flags))
        if layout != self._layout or self.state.changes[0] != self._seen_state_changes:
            self._buckets = self._make_buckets(flags)
            self._layout = layout
        try:
            try:
                for bucket in self._buckets:
                    bucket.gather()
            except _ParamsRegrouped:  # a param changed dtype or device through ``p.data``
                self._buckets = self._make_buckets(flags)
                for bucket in self._buckets:
                    bucket.gather()
        except BaseException:
            for bucket in self._buckets:
                bucket.pending = None  # do not keep this step's grads alive
            raise
        hyper = [self._hyperparams(g) for g in groups]
        clip_coef, self._clip_coef = getattr(self, "_clip_coef", None), None  # used once
        capturable = any(g.get("capturable", False) for g in groups)
        for bucket in self._buckets:
            bucket.run(hyper, grad_scale, found_inf, clip_coef, capturable)
        self._seen_state_changes = self.state.changes[0]  # our own state writes included
        self.last_step_skipped = self._skipped_flag(found_inf)
        return loss

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
        if self.__dict__.get("_clip_coef") is not None:  # (no setattr traced by dynamo 2.11
            self._clip_coef = None                       # in a compiled train step without one)
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
        device: the next ``step()`` multiplies the grads by it inside its update kernel. The
        grads in memory are not rewritten; ``zero_grad()`` drops a pending ``c``. Under a
        GradScaler call ``scaler.unscale_(opt)`` first, as torch documents for clipping.
        Returns the total norm ``n`` (a 0-dim tensor, as torch's).
        """
        from fusedopt.backend import resolve_backend

        norm_type = float(norm_type)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._clip_coef = None
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
                     and all(g.is_contiguous() and not _is_dtensor(g) for g in same))
            norms.append((self._multi_tensor_norm(same, norm_type) if fused
                          else torch.linalg.vector_norm(
                              torch.stack(torch._foreach_norm(same, norm_type)), norm_type)
                          ).to(first_device))
        total = (norms[0] if len(norms) == 1
                 else torch.linalg.vector_norm(torch.stack(norms), norm_type))
        if _is_dtensor(total):  # FSDP2: the norm over every shard, on every process
            total = total.full_tensor()
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        self._clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return total

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
        device = self.param_groups[0]["params"][0].device
        flag = getattr(self, "_never_skipped", None)
        if flag is None or flag.device != device:
            flag = self._never_skipped = torch.zeros((), dtype=torch.bool, device=device)
        return flag

    def _scalar_names(self) -> tuple[str, ...]:
        """The per-parameter 0-dim state, first in torch's key order: step, then the spec's."""
        return ((("step",) if self.uses_step else ())
                + ((self.scalar_state[0],) if self.scalar_state else ()))

    def _make_buckets(self, flags: list[dict[str, bool]]) -> list[_Bucket]:
        members: dict[tuple, list[tuple[Tensor, int]]] = {}
        for index, (group, group_flags) in enumerate(zip(self.param_groups, flags)):
            for p in group["params"]:
                dtype = p.real.dtype if p.is_complex() else p.dtype
                key = (p.device, dtype, tuple(group_flags.values()))
                members.setdefault(key, []).append((p, index))
        return [_Bucket(self, device, dtype, flags[entries[0][1]], entries)
                for (device, dtype, _), entries in members.items()]


class _ParamsRegrouped(Exception):
    """A param no longer belongs in its bucket: the optimizer must regroup."""


class _Bucket:
    """All params of one (device, dtype, variant flags): one launch per step."""

    def __init__(self, opt: FusedOptimizer, device: torch.device, dtype: torch.dtype,
                 flags: dict[str, bool], entries: list[tuple[Tensor, int]]):
        self.opt = opt
        self.device = device
        self.dtype = dtype
        self.flags = flags
        self.params = [p for p, _ in entries]
        self.group_of = [g for _, g in entries]
        self.state_names = opt._state_names(flags)
        self.backend = resolve_backend(opt._backend_request, device)
        # The reference path runs DTensor ops as they are; the kernels take the local shards.
        self.sharded = self.backend == "triton" and any(map(_is_dtensor, self.params))
        if self.sharded and opt.kernel_terms:
            raise NotImplementedError(
                f"fusedopt.{type(opt).__name__} with sharded (FSDP2/DTensor) parameters: its "
                "per-tensor norms would need a reduction across the shards; use "
                "backend='reference' for it")
        # What the cached tables were built for: -1 marks a param without a grad.
        self.grad_ptrs: list[int] | None = None
        self.param_ptrs: list[int] | None = None
        self.present: list[bool] | None = None
        self.pending: tuple | None = None  # what gather() read, for run()
        self.created: list[tuple[dict, str]] = []  # state entries made by _prepare, until run

    def gather(self) -> None:
        """Read this step's grads and check what is new; raises before anything changes.

        Every bucket gathers before any bucket runs, so a bad grad anywhere leaves every param
        and state untouched (torch.optim, too, checks a group's grads before updating).
        The steady state costs three passes over the params: ``p.grad``, the grads' and the
        params' data pointers. Grads that merely moved (``zero_grad(set_to_none=True)``) need
        no check: torch's grad setter already enforces the param's dtype, shape and device.
        """
        grads = [p.grad for p in self.params]
        # FSDP2: the kernels work on this process's shards (params, grads and states alike)
        kernel_grads = ([None if g is None else _local(g) for g in grads] if self.sharded
                        else grads)
        try:
            grad_ptrs = [-1 if g is None else g.data_ptr() for g in kernel_grads]
        except RuntimeError:  # a sparse grad has no data pointer: say so clearly
            self._check_inputs([i for i, g in enumerate(grads) if g is not None], grads)
            raise
        param_ptrs = [_local(p).data_ptr() if self.sharded else p.data_ptr()
                      for p in self.params]
        moved = param_ptrs != self.param_ptrs
        if moved and any(p.device != self.device or _real(p).dtype != self.dtype
                         for p in self.params):
            raise _ParamsRegrouped
        live = None  # set when the tables must be rebuilt: which params have grads
        if moved or (
                grad_ptrs != self.grad_ptrs
                and [ptr != -1 for ptr in grad_ptrs] != self.present):
            live = [i for i, ptr in enumerate(grad_ptrs) if ptr != -1]
            self._check_inputs(live, grads)
        self.pending = (kernel_grads, grad_ptrs, param_ptrs, live)

    def run(self, hyper: list[dict[str, Any]], grad_scale: Tensor | None = None,
            found_inf: Tensor | None = None, clip_coef: Tensor | None = None,
            capturable: bool = False) -> None:
        """Update every param of the bucket that has a grad: one kernel launch. AMP's
        ``grad_scale`` / ``found_inf`` (0-dim tensors) unscale the grads / skip the update;
        ``clip_coef`` multiplies the (unscaled) grads."""
        grads, grad_ptrs, param_ptrs, live = self.pending
        self.pending = None  # the grads are not kept alive past the step
        try:
            if live is not None:
                self._prepare(live, param_ptrs)
            if not self.live:
                return
            if self.backend == "triton":
                if grad_ptrs != self.grad_ptrs:
                    self._patch_grads(grads, grad_ptrs)
                self._run_triton(grads, hyper, self._on_device(grad_scale),
                                 self._on_device(found_inf),
                                 self._on_device(clip_coef, self.opmath), capturable)
            else:
                self._run_reference([grads[i] for i in self.live], hyper, grad_scale,
                                    found_inf, clip_coef)
        except BaseException:
            # Nothing ran (say, out of memory): forget the state this step created, so that
            # a retry starts it afresh (SGD's first momentum step is not its later ones).
            for state, name in self.created:
                state.pop(name, None)
            self.param_ptrs = None
            raise
        finally:
            self.created = []

    # ---- shared preparation: state creation and checks -----------------------------------------

    def _prepare(self, live: list[int], param_ptrs: list[int]) -> None:
        """(Re)build everything that depends on which params have grads, and where params are."""
        self.live = live
        self.created = []
        self.states: list[list[Tensor]] = []
        self.scalars: list[dict[str, Tensor]] = []
        # State that was created and has not had its first update yet (SGD's first momentum
        # step sets buf = g): an int64 device flag per such state, kept by the optimizer and
        # keyed by the state's first tensor, so that it outlives rebuilds of the buckets and
        # goes with the state. A step that AMP skips leaves it set, as torch.optim, which is
        # then not stepped at all, would have no state yet; the step that runs clears it.
        new_state = self.opt.__dict__.setdefault("_new_state", WeakIdKeyDictionary())
        self.new_flags: list[Tensor | None] = []
        for i in self.live:
            states, scalars, created = self._state_of(self.params[i], self.group_of[i])
            self.states.append(states)
            self.scalars.append(scalars)
            if states and created:
                new_state[states[0]] = torch.ones((), dtype=torch.int64, device=self.device)
            self.new_flags.append(new_state.get(states[0]) if states else None)
        self.param_ptrs = param_ptrs
        self.present = [False] * len(self.params)
        for i in live:
            self.present[i] = True
        self.grad_ptrs = None  # the grad column is filled by _patch_grads
        if self.backend == "triton":
            self._build_tables()

    def _state_of(self, p: Tensor, group_index: int
                  ) -> tuple[list[Tensor], dict[str, Tensor], bool]:
        """The state tensors of ``p`` in kernel order, its 0-dim scalar states by name, and
        whether a state tensor was just created (at ``_state_init``, as torch creates it)."""
        opt = self.opt
        scalar_names = opt._scalar_names()
        if not self.state_names and not scalar_names:
            return [], {}, False  # e.g. SGD without momentum: torch keeps no state either
        state = opt.state[p]
        group = opt.param_groups[group_index]
        fresh = False
        tensors = []
        for name in self.state_names:
            value = state.get(name)
            if value is None:
                init = opt._state_init(name, group)
                value = (torch.full_like(p, complex(init, init) if p.is_complex() else init,
                                         memory_format=torch.preserve_format)
                         if init else torch.zeros_like(p, memory_format=torch.preserve_format))
                fresh = True
                self.created.append((state, name))
            elif value.stride() != p.stride():
                # e.g. a contiguous state loaded for a channels_last param: same values,
                # the param's layout, so that one flat index addresses both.
                value = torch.empty_like(p).copy_(value)
            state[name] = value
            tensors.append(value)
        scalars = {}
        initial = {"step": 0.0, **({opt.scalar_state[0]: opt.scalar_state[1]}
                                   if opt.scalar_state else {})}
        for name in scalar_names:
            value = state.get(name)
            if (not isinstance(value, Tensor) or value.dtype != torch.float32
                    or value.device != p.device or value.dim() != 0):
                # torch keeps these on the CPU unless fused; here the kernel reads and writes
                # them, so they live next to the param (as torch's fused and capturable do).
                value = torch.tensor(float(value if value is not None else initial[name]),
                                     dtype=torch.float32, device=p.device)
                if name not in state:
                    self.created.append((state, name))
                state[name] = value
            scalars[name] = value
        order = [k for k in (*scalar_names, *self.state_names) if k in state]
        if list(state)[:len(order)] != order:  # torch's key order: step first, and so on
            others = {k: v for k, v in state.items() if k not in order}
            entries = {k: state[k] for k in order}
            state.clear()
            state.update(entries, **others)
        return tensors, scalars, fresh

    def _check_inputs(self, live: list[int], grads: list[Tensor | None]) -> None:
        """``grads[i]`` for ``i`` in ``live`` must be dense and match its param, the param must
        still be dense, and any state it already has must match its dtype, shape and device.
        Checked before any bucket runs, so that an error changes nothing."""
        owner = f"fusedopt.{type(self.opt).__name__}"
        for i in live:
            g, p = grads[i], self.params[i]
            _check_param(p, owner)  # ``p.data`` may have been re-pointed since add_param_group
            if g.is_sparse or g.layout != torch.strided:
                raise RuntimeError(f"{owner} does not support sparse gradients")
            if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
                raise RuntimeError(f"{owner}: a grad is {g.dtype} of shape {tuple(g.shape)} on "
                                   f"{g.device}, but its parameter is {p.dtype} of shape "
                                   f"{tuple(p.shape)} on {p.device}")
            state = self.opt.state.get(p, {})
            for name in self.state_names:
                value = state.get(name)
                if value is not None and (value.dtype != p.dtype or value.device != p.device
                                          or value.shape != p.shape):
                    raise ValueError(
                        f"state {name!r} is {value.dtype} of shape {tuple(value.shape)} on "
                        f"{value.device}, but its parameter is {p.dtype} of shape "
                        f"{tuple(p.shape)} on {p.device}; fusedopt keeps state in the "
                        "parameter's dtype, shape and device (move the optimizer's state "
                        "along with the model)")

    # ---- reference backend --------------------------------------------------------------------

    @property
    def opmath(self) -> torch.dtype:
        """The dtype the kernels compute in: float64 for float64 storage, else float32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _on_device(self, scalar: Tensor | None, dtype: torch.dtype = torch.float32
                   ) -> Tensor | None:
        """A 0-dim tensor (AMP's, GradScaler's float32 ones, or the clip coefficient) on this
        bucket's device in ``dtype``; the copy, when one is needed, does not wait."""
        if scalar is None:
            return None
        return scalar.to(self.device, dtype, non_blocking=True)

    def _run_reference(self, grads: list[Tensor], hyper: list[dict[str, float]],
                       grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                       clip_coef: Tensor | None = None) -> None:
        if found_inf is not None and found_inf.item() != 0:
            return  # AMP saw an inf or NaN: GradScaler skips this step
        if grad_scale is not None:  # GradScaler's unscale: times its float32 1/scale
            inv_scale = grad_scale.double().reciprocal().float()
            grads = [g * inv_scale.to(g.device) for g in grads]
        if clip_coef is not None:  # clip_grad_norm_'s coefficient, as torch multiplies by it
            grads = [g * clip_coef.to(g.device, g.dtype) for g in grads]
        update = self.opt.reference_update
        hyper = [{k: float(v) for k, v in h.items()} for h in hyper]
        aux_name = self.opt.scalar_state[0] if self.opt.scalar_state else None
        for k, (i, grad) in enumerate(zip(self.live, grads)):
            step = self.scalars[k].get("step")
            if step is not None:
                step.add_(1)
            aux = {aux_name: self.scalars[k][aux_name]} if aux_name else {}
            update(_real(self.params[i]), _real(grad), *(_real(s) for s in self.states[k]),
                   step=None if step is None else step.item(),
                   fresh=self.new_flags[k] is not None and bool(self.new_flags[k]), **aux,
                   **hyper[self.group_of[i]], **self.flags)
        for flag in self.new_flags:
            if flag is not None:
                flag.zero_()

    # ---- triton backend -----------------------------------------------------------------------

    def _build_tables(self) -> None:
        from fusedopt import kernels

        self.kernels = kernels
        # what the FRESH column points at for state that is not new (the kernel only reads it)
        self.not_new = torch.zeros((), dtype=torch.int64, device=self.device)
        n = len(self.live)
        columns: dict[str, list[int]] = {name: [0] * n for name in kernels.COLUMNS}
        local = _local if self.sharded else (lambda t: t)
        for k, i in enumerate(self.live):
            p = local(self.params[i])
            columns["PARAM"][k] = p.data_ptr()
            for j, s in enumerate(self.states[k]):
                columns[f"STATE{j}"][k] = local(s).data_ptr()
            if "step" in self.scalars[k]:
                columns["STEP"][k] = self.scalars[k]["step"].data_ptr()
            if self.opt.scalar_state:
                columns["AUX"][k] = self.scalars[k][self.opt.scalar_state[0]].data_ptr()
            columns["NUMEL"][k] = _real(p).numel()
            columns["GROUP"][k] = self.group_of[i]
            columns["FRESH"][k] = (self.new_flags[k] if self.new_flags[k] is not None
                                   else self.not_new).data_ptr()
        table = torch.tensor([columns[name] for name in kernels.COLUMNS], dtype=torch.int64)
        self.kernel_params = [local(self.params[i]) for i in self.live]
        self.param_strides = [p.stride() for p in self.kernel_params]
        self.params_contiguous = all(p.is_contiguous() for p in self.kernel_params)
        self.table = table.to(self.device, non_blocking=True)  # (no wait: see _upload_column)
        self.num_tensors = n
        self.cols = {name: i for i, name in enumerate(kernels.COLUMNS)}
        self.work, self.num_work = kernels.work_list(columns["NUMEL"], self.device)
        self.done_counts = torch.zeros(n, dtype=torch.int32, device=self.device)
        self.grad_copies: dict[int, Tensor] = {}  # grads whose strides differ from the param's
        self.hyper_rows: list[tuple[float, ...]] | None = None
        updates = importlib.import_module("fusedopt.kernels.updates")
        self.update = getattr(updates, self.opt.kernel_update)
        self.advance_aux = (getattr(updates, self.opt.scalar_state[2])
                            if self.opt.scalar_state else None)
        self.terms = getattr(updates, self.opt.kernel_terms) if self.opt.kernel_terms else None
        # Per-tensor sums of the terms, in the opmath dtype; the update launch re-zeroes them.
        self.sums = (torch.zeros(n, 2, device=self.device, dtype=self.opmath)
                     if self.terms is not None else None)

    def _upload_column(self, name: str, values: list[int]) -> None:
        # array -> frombuffer is ~10x faster than torch.tensor(list) for thousands of ints;
        # non_blocking: torch skips the stream synchronisation a blocking copy ends with (the
        # driver stages the pageable source, so these small tables go without waiting)
        host = torch.frombuffer(array.array("q", values), dtype=torch.int64)
        self.table[self.cols[name]].copy_(host, non_blocking=True)

    def _run_triton(self, grads: list[Tensor | None], hyper: list[dict[str, float]],
                    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                    clip_coef: Tensor | None = None, capturable: bool = False) -> None:
        for k, copy in self.grad_copies.items():
            copy.copy_(grads[self.live[k]])
        self._update_hyper_table(hyper, capturable)
        # Triton launches on the current CUDA device: make it this bucket's.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            self.kernels.launch(
                self.update, tuple(self.flags.values()), num_states=len(self.state_names),
                uses_step=self.opt.uses_step, dtype=self.dtype, tensors=self.table,
                num_tensors=self.num_tensors, work=self.work, num_work=self.num_work,
                hyper=self.hyper, done_counts=self.done_counts, advance_aux=self.advance_aux,
                terms=self.terms, sums=self.sums, grad_scale=grad_scale, found_inf=found_inf,
                clip_coef=clip_coef)

    def _update_hyper_table(self, hyper: list[dict[str, Any]], capturable: bool) -> None:
        """Re-upload the float64 hyperparameter table when a value changed. Tensor values on
        an accelerator (a CUDA lr), and with capturable every tensor value, are not read on
        the host (that would sync) but copied into their slots on the device at every step,
        so a CUDA graph replays the copies with the current values. CPU tensors are read."""

        def in_slot(value: Any) -> bool:
            return isinstance(value, Tensor) and (capturable or value.device.type != "cpu")

        rows = [tuple(h.values()) for h in hyper]
        slots = [(r, c, v) for r, row in enumerate(rows) for c, v in enumerate(row)
                 if in_slot(v)]
        rows = [tuple(None if in_slot(v) else float(v) for v in row) for row in rows]
        if rows != self.hyper_rows:
            table = [[0.0 if v is None else v for v in row] for row in rows]
            self.hyper = torch.tensor(table, dtype=torch.float64).to(self.device,
                                                                      non_blocking=True)
            self.hyper_rows = rows
        for r, c, value in slots:  # (reshape: torch takes any one-element tensor)
            self.hyper[r, c].copy_(value.reshape(()), non_blocking=True)

    def _patch_grads(self, grads: list[Tensor | None], grad_ptrs: list[int]) -> None:
        """New grad storage (after zero_grad(set_to_none=True)): re-point the grad column."""
        self.grad_ptrs = grad_ptrs
        self.grad_copies = {}
        if len(self.live) != len(grads):
            grads = [grads[i] for i in self.live]
            grad_ptrs = [grad_ptrs[i] for i in self.live]
        # Grads match their params' dtype and shape (torch's grad setter enforces it), so for
        # contiguous params a contiguous grad is laid out alike; otherwise compare strides.
        if self.params_contiguous and all(map(Tensor.is_contiguous, grads)):
            strides = self.param_strides
        else:
            strides = [g.stride() for g in grads]
        if strides != self.param_strides:
            # The kernel indexes param and grad alike; give it the grad in the param's layout
            # (a copy each step: autograd never produces this, but an assigned grad may).
            grad_ptrs = list(grad_ptrs)
            for k, (stride, param_stride) in enumerate(zip(strides, self.param_strides)):
                if stride != param_stride:
                    self.grad_copies[k] = torch.empty_like(self.kernel_params[k])
                    grad_ptrs[k] = self.grad_copies[k].data_ptr()
        self._upload_column("GRAD", grad_ptrs)
