"""L-BFGS on per-parameter vectors: torch.optim.LBFGS's iterates, without its flat copies.

torch.optim.LBFGS concatenates every gradient into one new flat vector at each evaluation and
keeps its direction and history as flat vectors. :class:`LBFGS` keeps each of them as a list
of per-parameter tensors and does its vector work (the two-loop recursion, the history
update, the line search's moves of the parameters) with multi-tensor operations: on the
``triton`` backend each dot product, norm, axpy, scale or copy is one kernel launch over the
whole parameter list (:mod:`fusedopt.kernels.vector`); on the ``reference`` backend they are
per-tensor torch operations. The scalar logic (step length, line search, stopping tests) is
torch's own, line for line, so the iterates are torch's up to the summation order of dot
products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.lbfgs import _cubic_interpolate

from fusedopt.backend import check_backend_name, resolve_backend
from fusedopt.twin import check_options, twin_constructor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# torch.optim.LBFGS's state, all of it on the first parameter: these hold flat vectors there
# (lists of per-parameter tensors here), the others numbers, 0-dim tensors or lists of them.
_VECTOR_KEYS = ("d", "prev_flat_grad")
_HISTORY_KEYS = ("old_dirs", "old_stps")
_STATE_KEYS = ("func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
               "prev_flat_grad", "prev_loss", "al")
_GROUP_KEYS = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change",
               "history_size", "line_search_fn")
_OWNER = "fusedopt.LBFGS"


def _real(t: Tensor) -> Tensor:
    """Complex tensors are optimized as their real view, as torch.optim.LBFGS does."""
    return torch.view_as_real(t) if t.is_complex() else t


def _real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Vector(list):
    """One L-BFGS vector: its per-parameter pieces, contiguous real tensors shaped like the
    parameters' real views. ``table`` caches the kernels' address table of the pieces.
    ``live`` marks the grads as autograd left them: the next closure call may overwrite them.
    Copies and pickles are plain lists, so that no copy shares the address table."""

    def __init__(self, parts: Sequence[Tensor] = (), live: bool = False):
        super().__init__(parts)
        self.table: Any = None
        self.live = live

    def __reduce__(self):
        return list, (list(self),)


# ---- the vector operations of the two backends ------------------------------------------------


class _ReferenceOps:
    """The readable spec: per-tensor torch operations (torch._foreach ones where they exist),
    each computing what torch.optim.LBFGS computes on its flat vectors."""

    def dot(self, xs: _Vector, ys: _Vector) -> Tensor:
        acc = _accumulation_dtype(xs[0].dtype)
        partial = [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc))
                   for x, y in zip(xs, ys)]
        return torch.stack(partial).sum().to(xs[0].dtype)

    def abs_sum(self, xs: _Vector) -> Tensor:
        acc = _accumulation_dtype(xs[0].dtype)
        return torch.stack([x.abs().sum(dtype=acc) for x in xs]).sum().to(xs[0].dtype)

    def abs_max(self, xs: _Vector) -> Tensor:
        maxima = [x.abs().max() for x in xs if x.numel()]  # max() refuses empty tensors
        if not maxima:
            return torch.zeros((), dtype=xs[0].dtype, device=xs[0].device)
        return torch.stack(maxima).max()

    def axpy(self, alpha: float | Tensor, xs: _Vector, ys: _Vector) -> None:
        # torch's add_(alpha=tensor) reads the tensor on the host too
        torch._foreach_add_(list(ys), list(xs), alpha=_number(alpha))

    def scale(self, alpha: float | Tensor, xs: _Vector) -> None:
        torch._foreach_mul_(list(xs), _on(alpha, xs[0].device))

    def copy(self, xs: _Vector, ys: _Vector, alpha: float | Tensor = 1.0) -> None:
        torch._foreach_copy_(list(ys), list(xs))
        if isinstance(alpha, Tensor) or alpha != 1:
            torch._foreach_mul_(list(ys), _on(alpha, ys[0].device))


class _TritonOps:
    """One multi-tensor kernel launch per operation. Tables: the layout (numels, work list)
    is built once per parameter list; each vector builds its address table on first use
    and keeps it (its pieces are written in place, never replaced)."""

    def __init__(self, numels: list[int], device: torch.device):
        from fusedopt import kernels

        self.kernels = kernels
        self.layout = kernels.Layout(numels, device)

    def _table(self, xs: _Vector):
        if xs.table is None:
            xs.table = self.kernels.TensorTable(xs, self.layout)
        return xs.table

    def dot(self, xs: _Vector, ys: _Vector) -> Tensor:
        return self.kernels.dot(self._table(xs), self._table(ys))

    def abs_sum(self, xs: _Vector) -> Tensor:
        return self.kernels.abs_sum(self._table(xs))

    def abs_max(self, xs: _Vector) -> Tensor:
        return self.kernels.abs_max(self._table(xs))

    def axpy(self, alpha: float | Tensor, xs: _Vector, ys: _Vector) -> None:
        self.kernels.axpy(alpha, self._table(xs), self._table(ys))

    def scale(self, alpha: float | Tensor, xs: _Vector) -> None:
        self.kernels.scale(alpha, self._table(xs))

    def copy(self, xs: _Vector, ys: _Vector, alpha: float | Tensor = 1.0) -> None:
        self.kernels.copy(self._table(xs), self._table(ys), alpha)


def _number(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else x


def _on(x: float | Tensor, device: torch.device) -> float | Tensor:
    """A scalar tensor on the vectors' device stays there; one elsewhere (a CPU lr) is read."""
    return x if not isinstance(x, Tensor) or x.device == device else x.item()


# ---- the optimizer ------------------------------------------------------------------------------


class LBFGS(torch.optim.LBFGS):
    r"""torch.optim.LBFGS, with its vector work done as multi-tensor operations over the
    parameter list instead of on flat copies of it.

    Same arguments, defaults, validation errors, ``step(closure)`` behaviour and
    ``state_dict`` format as :class:`torch.optim.LBFGS`, plus ``backend`` ("auto", "triton" or
    "reference"; default: $FUSEDOPT_BACKEND, else "auto"). ``isinstance(opt,
    torch.optim.LBFGS)`` holds.

    **The method.** With the gradient :math:`g` at :math:`x` and the last :math:`m` pairs
    :math:`s_i = x_{i+1} - x_i` (``old_stps``), :math:`y_i = g_{i+1} - g_i` (``old_dirs``),
    :math:`\rho_i = 1 / (y_i^\top s_i)` (``ro``), the search direction
    :math:`d = -H g` applies the L-BFGS inverse-Hessian approximation :math:`H` by the
    two-loop recursion:

    .. math::
        q &\leftarrow -g \\
        \text{for } i = k-1, \dots, k-m:\quad
            \alpha_i &\leftarrow \rho_i\, s_i^\top q, \qquad q \leftarrow q - \alpha_i y_i \\
        r &\leftarrow \gamma\, q, \qquad
            \gamma = \frac{s_{k-1}^\top y_{k-1}}{y_{k-1}^\top y_{k-1}} \quad (\texttt{H\_diag}) \\
        \text{for } i = k-m, \dots, k-1:\quad
            \beta_i &\leftarrow \rho_i\, y_i^\top r, \qquad
            r \leftarrow r + (\alpha_i - \beta_i)\, s_i \\
        d &\leftarrow r

    then :math:`x \leftarrow x + t\,d`, with :math:`t` = ``lr`` (the first iteration ever:
    :math:`\min(1, 1/\lVert g\rVert_1)\,` ``lr``), or :math:`t` from a strong-Wolfe line
    search. A pair is stored only if :math:`y^\top s > 10^{-10}` (so :math:`H` stays positive
    definite); the oldest is dropped beyond ``history_size``. Iterations stop as torch's do:
    ``max_iter``, ``max_eval``, :math:`\lVert g\rVert_\infty \le` ``tolerance_grad``, or
    progress below ``tolerance_change``.

    **What runs where.** Every vector here is a list of per-parameter tensors (complex
    parameters as their real views). Each dot product, :math:`\lVert\cdot\rVert_1`,
    :math:`\lVert\cdot\rVert_\infty`, axpy, scale or copy is one multi-tensor kernel launch
    on the ``triton`` backend, and per-tensor torch ops on ``reference``. Nothing is
    concatenated, except by :meth:`state_dict`, which returns torch's flat vectors.
    Scalars stay 0-dim tensors on the device as in torch; where torch reads one on the host
    (``y^\top s > 10^{-10}``, the stopping tests, the line search), so does this.

    **Differences from torch.optim.LBFGS.** All parameters must share one device and one
    (real) dtype (torch's concatenation fails on several devices; with several dtypes it
    promotes them), and be contiguous (torch's ``grad.view(-1)`` fails on non-contiguous
    ones). ``optimizer.state`` holds lists of per-parameter tensors where torch holds flat
    vectors; ``state_dict`` and ``load_state_dict`` convert. As in torch, a param without a
    grad counts as a zero gradient, and sparse grads are made dense.
    """

    #: torch.optim.LBFGS's arguments in the torch versions fusedopt follows (``maximize`` is
    #: torch 2.14's; with an older torch it is not an argument, as in torch).
    torch_options = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change",
                     "history_size", "line_search_fn", "maximize")
    __init__ = twin_constructor(torch.optim.LBFGS)

    def _before_torch_init(self, backend: str | None, options: dict[str, Any]) -> None:
        check_backend_name(backend)
        check_options(_OWNER, torch.optim.LBFGS, options, self.torch_options)
        self._backend_request = backend

    def _after_torch_init(self) -> None:
        self._check_params()
        self._reset_caches()

    # ---- parameters, caches ---------------------------------------------------------------------

    def _check_params(self) -> None:
        """One device, one real dtype among float16/bfloat16/float32/float64, contiguous."""
        first = self._params[0] if self._params else None
        for p in self._params:
            if p.layout != torch.strided:
                raise ValueError(f"{_OWNER} needs dense parameters, got a {p.layout} tensor")
            if _real_dtype(p) not in SUPPORTED_DTYPES:
                raise ValueError(f"{_OWNER} supports parameters of dtype float16, bfloat16, "
                                 f"float32, float64 and their complex forms, got {p.dtype}")
            if p.device != first.device:
                raise ValueError(f"{_OWNER} needs all parameters on one device, as "
                                 f"torch.optim.LBFGS does; got {first.device} and {p.device}")
            if _real_dtype(p) != _real_dtype(first):
                raise ValueError(f"{_OWNER} needs all parameters of one dtype (complex ones "
                                 f"count as their real dtype); got {first.dtype} and {p.dtype}")
            if not p.is_contiguous():
                raise ValueError(f"{_OWNER} needs contiguous parameters; got shape "
                                 f"{tuple(p.shape)} with strides {p.stride()}")

    def _reset_caches(self) -> None:
        self._param_layout: list | None = None  # what _param_vector was built for
        self._in_step = False
        self._param_vector: _Vector | None = None
        self._layout_key: tuple | None = None
        self._ops: _ReferenceOps | _TritonOps | None = None
        self._grad_vector: _Vector | None = None  # the last evaluation's grads, with table
        self._zero_grads: dict[int, Tensor] = {}  # stand-ins for params without a grad
        self._spare: list[_Vector] = []  # history vectors dropped or refused, for reuse
        self._x_init: _Vector | None = None  # the line search's copy of the params

    def _prepare(self) -> None:
        """(Re)build what depends on the params: checked, then cached until a param's storage
        moves or is re-viewed (``p.data = ...``, ``model.to(...)``, also from inside a closure:
        this runs again after every closure call, as torch.optim.LBFGS reads ``self._params``
        afresh at each of its operations) or the param list changes. A change of shape, dtype
        or device in the middle of a step is an error: the step's vectors no longer fit."""
        layout = [(p.data_ptr(), p.dtype, p.shape, p.stride()) for p in self._params]
        if layout == self._param_layout:
            return
        self._check_params()
        real = [_real(p) for p in self._params]
        key = (real[0].device, real[0].dtype, tuple(t.shape for t in real))
        if key != self._layout_key:
            if self._in_step:
                raise RuntimeError(f"{_OWNER}: a parameter changed shape, dtype or device "
                                   "during step() (in the closure): the step's vectors no "
                                   "longer fit it; change parameters between steps")
            device = real[0].device
            backend = resolve_backend(self._backend_request, device)
            numels = [t.numel() for t in real]
            self._ops = _TritonOps(numels, device) if backend == "triton" else _ReferenceOps()
            self._shapes = [t.shape for t in real]
            self._dtype, self._device = real[0].dtype, device
            self._zero_grads, self._spare, self._x_init = {}, [], None
            self._grad_vector = None
            self._layout_key = key
        self._param_vector = _Vector(real)
        self._param_layout = layout

    def _closure(self, closure: Callable[[], Any]) -> Any:
        """Evaluate the closure, then re-read the params (it may have re-pointed them)."""
        loss = closure()
        self._prepare()
        return loss

    def _new_vector(self) -> _Vector:
        if self._spare:
            return self._spare.pop()
        return _Vector([torch.empty(s, dtype=self._dtype, device=self._device)
                        for s in self._shapes])

    def _gather_grads(self) -> _Vector:
        """This evaluation's gradient as a vector of views (no copy): zeros for params without
        a grad, sparse grads made dense, as torch's _gather_flat_grad does. With ``maximize``
        (torch 2.14+), a negated copy instead, as torch negates its flat gradient."""
        parts = []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                g = self._zero_grads.get(i)
                if g is None:
                    g = self._zero_grads[i] = torch.zeros(
                        self._shapes[i], dtype=self._dtype, device=self._device)
            else:
                if g.layout != torch.strided:
                    g = g.to_dense()
                g = _real(g)
                if g.dtype != self._dtype or g.shape != self._shapes[i]:
                    raise RuntimeError(
                        f"{_OWNER}: the grad of parameter {i} is {g.dtype} of shape "
                        f"{tuple(g.shape)} (as real numbers), but the parameter is "
                        f"{self._dtype} of shape {tuple(self._shapes[i])}")
                if not g.is_contiguous():
                    g = g.contiguous()
            parts.append(g)
        if self.param_groups[0].get("maximize", False):
            negated = self._new_vector()
            self._ops.copy(_Vector(parts), negated, -1.0)
            return negated
        cached = self._grad_vector
        if cached is not None and len(cached) == len(parts) and all(
                a.data_ptr() == b.data_ptr() for a, b in zip(cached, parts)):
            return cached  # same storage as last time (zero_grad(set_to_none=False)): its table
        self._grad_vector = _Vector(parts, live=True)
        return self._grad_vector

    def _own(self, vector: _Vector) -> _Vector:
        """``vector``, or a copy of it if it is live grads, which a closure call may change."""
        if not vector.live:
            return vector
        copy = self._new_vector()
        self._ops.copy(vector, copy)
        return copy

    def _evaluate_along(self, closure: Callable, x: _Vector, t, d: _Vector) -> tuple:
        """Loss and gradient at ``x + t d``; the params are ``x`` again afterwards."""
        self._ops.axpy(t, d, self._param_vector)
        loss = float(self._closure(closure))
        if self.param_groups[0].get("maximize", False):
            loss = -loss
        flat_grad = self._own(self._gather_grads())
        self._ops.copy(x, self._param_vector)
        return loss, flat_grad

    # ---- the step (torch.optim.LBFGS.step, on vectors) -------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]):  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable): A closure that reevaluates the model
                and returns the loss.
        """
        self._in_step = False  # (the first _prepare may still rebuild for new shapes)
        try:
            return self._step(closure)
        finally:
            self._in_step = False

    def _step(self, closure: Callable[[], Any]):
        if len(self.param_groups) != 1:
            raise AssertionError(
                f"Expected exactly one param_group, but got {len(self.param_groups)}")

        # Make sure the closure is always called with grad enabled
        closure = torch.enable_grad()(closure)

        # Nothing to optimize (an empty group): skip the step but still evaluate the closure,
        # as torch 2.14 does (older torch failed on the empty flat gradient instead).
        if len(self._params) == 0:
            return closure()

        group = self.param_groups[0]
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        max_iter = group["max_iter"]
        max_eval = group["max_eval"]
        tolerance_grad = group["tolerance_grad"]
        tolerance_change = group["tolerance_change"]
        line_search_fn = group["line_search_fn"]
        history_size = group["history_size"]
        maximize = group.get("maximize", False)

        self._prepare()
        self._in_step = True
        ops = self._ops
        # LBFGS has only global state; torch registers it on the first param
        state = self.state[self._params[0]]
        self._to_internal(state)
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        # evaluate initial f(x) and df/dx
        orig_loss = self._closure(closure)
        loss = -float(orig_loss) if maximize else float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1

        flat_grad = self._gather_grads()
        opt_cond = ops.abs_max(flat_grad) <= tolerance_grad

        # optimal condition
        if opt_cond:
            self._grad_vector = None  # do not keep the grads alive between steps
            return orig_loss

        d = state.get("d")
        t = state.get("t")
        old_dirs = state.get("old_dirs")
        old_stps = state.get("old_stps")
        ro = state.get("ro")
        H_diag = state.get("H_diag")
        prev_flat_grad = state.get("prev_flat_grad")
        prev_loss = state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # ---- descent direction ----
            if state["n_iter"] == 1:
                d = self._new_vector()
                ops.copy(flat_grad, d, -1.0)
                old_dirs = []
                old_stps = []
                ro = []
                H_diag = 1
            else:
                # update the history with y = g - g_prev, s = t d
                y = self._new_vector()
                ops.copy(flat_grad, y)
                ops.axpy(-1.0, prev_flat_grad, y)
                s = self._new_vector()
                ops.copy(d, s, t)
                ys = ops.dot(y, s)
                if ys > 1e-10:
                    if len(old_dirs) == history_size:
                        # shift history by one (limited-memory)
                        self._spare += [old_dirs.pop(0), old_stps.pop(0)]
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    # scale of the initial Hessian approximation
                    H_diag = ys / ops.dot(y, y)
                else:
                    self._spare += [y, s]

                # two-loop recursion, in one buffer: q, then r = d
                num_old = len(old_dirs)
                if "al" not in state:
                    state["al"] = [None] * history_size
                al = state["al"]
                q = d  # the old direction is spent (s holds t d): reuse its storage
                ops.copy(flat_grad, q, -1.0)
                for i in range(num_old - 1, -1, -1):
                    al[i] = ops.dot(old_stps[i], q) * ro[i]
                    ops.axpy(-al[i], old_dirs[i], q)
                ops.scale(H_diag, q)
                d = r = q
                for i in range(num_old):
                    be_i = ops.dot(old_dirs[i], r) * ro[i]
                    ops.axpy(al[i] - be_i, old_stps[i], r)

            if prev_flat_grad is None:
                prev_flat_grad = self._new_vector()
            ops.copy(flat_grad, prev_flat_grad)
            prev_loss = loss

            # ---- step length ----
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / ops.abs_sum(flat_grad)) * lr
            else:
                t = lr

            # directional derivative
            gtd = ops.dot(flat_grad, d)

            # directional derivative is below tolerance
            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                else:
                    if self._x_init is None:
                        self._x_init = self._new_vector()
                    x_init = self._x_init
                    ops.copy(self._param_vector, x_init)

                    def obj_func(x, t, d):
                        return self._evaluate_along(closure, x, t, d)

                    loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                        self, obj_func, x_init, t, d, loss, flat_grad, gtd,
                        max_ls=max_eval - current_evals)
                ops.axpy(t, d, self._param_vector)
                opt_cond = ops.abs_max(flat_grad) <= tolerance_grad
            else:
                # no line search, simply move with fixed-step
                ops.axpy(t, d, self._param_vector)
                if n_iter != max_iter:
                    # re-evaluate the function only if not in the last iteration: in a
                    # stochastic setting there is no use in re-evaluating it here
                    with torch.enable_grad():
                        loss = self._closure(closure)
                    loss = -float(loss) if maximize else float(loss)
                    flat_grad = self._gather_grads()
                    opt_cond = ops.abs_max(flat_grad) <= tolerance_grad
                    ls_func_evals = 1

            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            # ---- stopping conditions ----
            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                break
            # optimal condition
            if opt_cond:
                break
            # lack of progress: max |t d| is max |d| * |t| (rounding is monotonic)
            if ops.abs_max(d) * _like(abs(t), self._dtype) <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state["d"] = d
        state["t"] = t
        state["old_dirs"] = old_dirs
        state["old_stps"] = old_stps
        state["ro"] = ro
        state["H_diag"] = H_diag
        state["prev_flat_grad"] = prev_flat_grad
        state["prev_loss"] = prev_loss
        self._grad_vector = None  # do not keep the grads alive between steps
        return orig_loss

    # ---- state: per-parameter lists here, torch's flat vectors in state_dict -------------------

    def _split(self, value: Any, key: str, check_only: bool = False) -> _Vector | None:
        """A flat vector (torch's format) or a list of pieces (ours, or a copy of ours) as a
        vector of this optimizer's pieces; ValueError if it does not fit the params."""
        shapes = [_real(p).shape for p in self._params]
        numel = sum(s.numel() for s in shapes)
        dtype, device = _real_dtype(self._params[0]), self._params[0].device
        if isinstance(value, Tensor):
            if value.is_complex() or not value.is_floating_point() or value.numel() != numel:
                raise ValueError(f"L-BFGS state {key!r} must be a real flat vector of {numel} "
                                 f"elements (one per real parameter element), got "
                                 f"{value.dtype} of shape {tuple(value.shape)}")
            if check_only:
                return None
            pieces = value.reshape(-1).to(device=device, dtype=dtype).split(
                [s.numel() for s in shapes])
            # clone: each piece its own (aligned) storage, none a view into the loaded vector
            return _Vector([piece.reshape(s).clone() for piece, s in zip(pieces, shapes)])
        if isinstance(value, _Vector) and len(value) == len(shapes):
            # ours: only a move of the params (device, dtype) can have made it unfit
            if value[0].device == device and value[0].dtype == dtype:
                return value
            raise ValueError(f"L-BFGS state {key!r} is {value[0].dtype} on {value[0].device}, "
                             f"but the parameters are {dtype} on {device}: move the "
                             "optimizer's state with them (state_dict, then load_state_dict)")
        if isinstance(value, list) and len(value) == len(shapes) and all(
                isinstance(v, Tensor) and v.shape == s and v.dtype == dtype
                and v.device == device and v.is_contiguous() for v, s in zip(value, shapes)):
            return _Vector(value)  # a copy of ours (copies are plain lists)
        raise ValueError(f"L-BFGS state {key!r} must be a flat tensor of {numel} elements, "
                         f"got {type(value).__name__}")

    def _to_internal(self, state: dict) -> None:
        """Make torch-format (flat) vectors in ``state`` per-parameter ones, in place, and
        check that the vectors already per-parameter still fit the params."""
        for key in _VECTOR_KEYS:
            if state.get(key) is not None:
                state[key] = self._split(state[key], key)
        for key in _HISTORY_KEYS:
            history = state.get(key)
            if history:
                vectors = [self._split(v, key) for v in history]
                if any(a is not b for a, b in zip(vectors, history)):
                    state[key] = vectors

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.LBFGS's state_dict: the vectors as flat tensors (concatenated here)."""
        saved = super().state_dict()
        saved["state"] = {index: _torch_format(value) for index, value in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this class or of torch.optim.LBFGS (the same format).

        A state_dict that is not L-BFGS's, or whose vectors do not fit the parameters, raises
        ValueError before anything is changed.
        """
        self._check_loaded_state(state_dict)
        super().load_state_dict(state_dict)  # deep copy, cast to the params; __setstate__
        state = self.state.get(self._params[0])
        if state:
            self._to_internal(state)

    def _check_loaded_state(self, state_dict: dict) -> None:
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        saved_state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError(f"{_OWNER}.load_state_dict expects a dict with 'state' and "
                             "'param_groups', as returned by state_dict()")
        if len(saved_groups) != 1 or len(saved_groups[0].get("params", ())) != len(self._params):
            return  # torch.optim's own loader raises its usual error for these
        group = saved_groups[0]
        missing = [k for k in _GROUP_KEYS if k not in group]
        if missing:
            raise ValueError(f"loaded state dict has a parameter group without {missing}: it "
                             "was not saved by LBFGS")
        check_options(_OWNER, torch.optim.LBFGS, group, self.torch_options)
        first, *others = group["params"]
        if any(saved_state.get(i) not in (None, {}) for i in others):
            raise ValueError("loaded state dict has state for a parameter other than the first: "
                             "it was not saved by LBFGS (which keeps its state on the first)")
        state = saved_state.get(first)
        if not state:
            return
        unknown = [k for k in state if k not in _STATE_KEYS]
        if unknown:
            raise ValueError(f"loaded state dict has state {unknown}, which is not L-BFGS's: "
                             "it was not saved by LBFGS")
        for key in _VECTOR_KEYS:
            if state.get(key) is not None:
                self._split(state[key], key, check_only=True)
        lengths = set()
        for key in (*_HISTORY_KEYS, "ro"):
            value = state.get(key)
            if value is not None:
                if not isinstance(value, list):
                    raise ValueError(f"L-BFGS state {key!r} must be a list, got "
                                     f"{type(value).__name__}")
                lengths.add(len(value))
        if len(lengths) > 1:
            raise ValueError("L-BFGS state 'old_dirs', 'old_stps' and 'ro' must have the same "
                             "length")
        for key in _HISTORY_KEYS:
            for value in state.get(key) or ():
                self._split(value, key, check_only=True)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_backend_request": self._backend_request}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, deepcopy or load_state_dict: torch's attributes; the caches restart."""
        super().__setstate__(state)
        self.__dict__.setdefault("_backend_request", None)
        self._params = self.param_groups[0]["params"]
        self._numel_cache = None
        self._reset_caches()


def _torch_format(state: dict) -> dict:
    """A copy of ``state`` with every vector concatenated into torch's flat tensor."""
    out = dict(state)
    for key in _VECTOR_KEYS:
        if isinstance(out.get(key), list):
            out[key] = _flat(out[key])
    for key in _HISTORY_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [_flat(v) if isinstance(v, list) else v for v in out[key]]
    return out


def _flat(pieces: Sequence[Tensor]) -> Tensor:
    return torch.cat([piece.reshape(-1) for piece in pieces])


def _like(x: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """A tensor ``x`` in ``dtype``, so that a product with a vector's 0-dim result rounds as
    torch's product with the vector does (a float already does)."""
    return x.to(dtype) if isinstance(x, Tensor) else x


def _strong_wolfe(opt: LBFGS, obj_func, x, t, d, f, g, gtd, c1=1e-4, c2=0.9,
                  tolerance_change=1e-9, max_ls=25):
    """torch.optim.lbfgs._strong_wolfe on vectors. The gradients obj_func returns are copies
    that nothing writes to, so torch's defensive clones of them are not needed."""
    ops = opt._ops
    d_norm = ops.abs_max(d)
    g = opt._own(g)
    # evaluate objective and gradient using initial step
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = ops.dot(g_new, d)

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        # check conditions
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            break

        if abs(gtd_new) <= -c2 * gtd:
            bracket = [t]
            bracket_f = [f_new]
            bracket_g = [g_new]
            done = True
            break

        if gtd_new >= 0:
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            break

        # interpolate
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(
            t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))

        # next step
        t_prev = tmp
        f_prev = f_new
        g_prev = g_new
        gtd_prev = gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = ops.dot(g_new, d)
        ls_iter += 1

    # reached max number of iterations?
    if ls_iter == max_ls:
        bracket = [0, t]
        bracket_f = [f, f_new]
        bracket_g = [g, g_new]

    # zoom phase: we now have a point satisfying the criteria, or a bracket around it.
    # Refine the bracket until we find the exact point satisfying the criteria.
    insuf_progress = False
    # find high and low points in bracket
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        # line-search bracket is so small
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break

        # compute new trial value
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                               bracket[1], bracket_f[1], bracket_gtd[1])

        # test that we are making sufficient progress: if `t` is so close to a boundary
        # that we make insufficient progress, and if we made insufficient progress in the
        # last step or `t` is at a boundary, move `t` to 0.1 * len(bracket) away from the
        # nearest boundary point.
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            # interpolation close to boundary
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                # evaluate at 0.1 away from boundary
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        # Evaluate new point
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = ops.dot(g_new, d)
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not satisfied or not lower than lowest point
            bracket[high_pos] = t
            bracket_f[high_pos] = f_new
            bracket_g[high_pos] = g_new
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                # Wolfe conditions satisfied
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # old high becomes new low
                bracket[high_pos] = bracket[low_pos]
                bracket_f[high_pos] = bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]

            # new point becomes new low
            bracket[low_pos] = t
            bracket_f[low_pos] = f_new
            bracket_g[low_pos] = g_new
            bracket_gtd[low_pos] = gtd_new

    # return stuff
    t = bracket[low_pos]
    f_new = bracket_f[low_pos]
    g_new = bracket_g[low_pos]
    return f_new, g_new, t, ls_func_evals
