"""Readable per-tensor reference updates, written from the algorithms torch.optim documents.

These are the spec the Triton kernels are tested against, and the backend used on CPU when
triton is not running. Each function updates ``param`` and its state tensors in place, in the
tensors' own dtype, exactly as the matching ``torch.optim`` class does with
``foreach=False, fused=False``.

Each function's arguments are named by its declaration in :mod:`fusedopt.kernels.algorithms`
(checked at import, at the bottom of this module): the param, its grad and its states by
position (``None`` for a state the variant lacks), then by keyword the hyperparameters, the
scalar states (``step``: this update's step number, already incremented, as a number; any other
scalar state as its 0-dim tensor, which the function advances in place), ``fresh`` where read
(True on the first update after the state was created) and the flags.
"""

import math

import torch
from torch import Tensor

from fusedopt.kernels import quantization
from fusedopt.kernels.algorithms import ALGORITHMS, TILED_ALGORITHMS

# ---- pieces the algorithms share -------------------------------------------------------------


def _signed(grad: Tensor, maximize: bool) -> Tensor:
    return -grad if maximize else grad


def _weight_decay(param: Tensor, grad: Tensor, lr: float, weight_decay: float,
                  decoupled: bool) -> Tensor:
    """Decoupled (AdamW, Lion): shrink the param in place. L2 (the rest): return g + wd*p."""
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    return grad


def _ema_square(average: Tensor, x: Tensor, beta: float) -> None:
    """average = beta * average + (1 - beta) * x * x, in place."""
    average.mul_(beta).addcmul_(x, x, value=1 - beta)


def _moments(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float,
             beta2: float) -> None:
    """Adam's first and second moments, in place (Adam/AdamW, NAdam, RAdam, LAMB)."""
    exp_avg.lerp_(grad, 1 - beta1)
    _ema_square(exp_avg_sq, grad, beta2)


# ---- the algorithms ---------------------------------------------------------------------------


def adam(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
         max_exp_avg_sq: Tensor | None = None, *, step: float, lr: float, beta1: float,
         beta2: float, eps: float, weight_decay: float, maximize: bool, amsgrad: bool,
         decoupled_weight_decay: bool) -> None:
    r"""Adam (Kingma & Ba, 2014) and AdamW (Loshchilov & Hutter, 2019).

    .. math::
        g &\leftarrow -g \text{ if maximize} \\
        \theta &\leftarrow \theta(1 - \gamma\lambda) \text{ (decoupled) or }
            g \leftarrow g + \lambda\theta \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        \hat v \leftarrow \max(\hat v, v) \text{ if amsgrad} \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m}{\sqrt{v\text{ or }\hat v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    grad = _signed(grad, maximize)
    grad = _weight_decay(param, grad, lr, weight_decay, decoupled_weight_decay)
    _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def sgd(param: Tensor, grad: Tensor, momentum_buffer: Tensor | None = None, *,
        fresh: bool, lr: float, momentum: float, dampening: float,
        weight_decay: float, maximize: bool, has_momentum: bool, nesterov: bool) -> None:
    r"""Stochastic gradient descent with momentum (Sutskever et al., 2013) and Nesterov.

    .. math::
        g &\leftarrow -g \text{ if maximize}, \quad g \leftarrow g + \lambda\theta \\
        b &\leftarrow g \text{ (first step) or } \mu b + (1-\tau) g \\
        g &\leftarrow g + \mu b \text{ if nesterov, else } b, \quad
        \theta \leftarrow \theta - \gamma g
    """
    grad = _signed(grad, maximize)
    grad = _weight_decay(param, grad, lr, weight_decay, False)
    if has_momentum:
        if fresh:
            momentum_buffer.copy_(grad)
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)


def adagrad(param: Tensor, grad: Tensor, sum: Tensor, *, step: float, lr: float,
            lr_decay: float, weight_decay: float, eps: float, maximize: bool) -> None:
    r"""Adagrad (Duchi et al., 2011).

    .. math::
        g \leftarrow g + \lambda\theta, \quad s \leftarrow s + g^2, \quad
        \theta \leftarrow \theta - \frac{\gamma}{1 + (t-1)\eta}\,\frac{g}{\sqrt{s} + \epsilon}
    """
    grad = _weight_decay(param, _signed(grad, maximize), lr, weight_decay, False)
    clr = lr / (1 + (step - 1) * lr_decay)
    sum.addcmul_(grad, grad, value=1)
    param.addcdiv_(grad, sum.sqrt().add_(eps), value=-clr)


def adadelta(param: Tensor, grad: Tensor, square_avg: Tensor, acc_delta: Tensor, *,
             step: float, lr: float, rho: float, eps: float, weight_decay: float,
             maximize: bool) -> None:
    r"""Adadelta (Zeiler, 2012).

    .. math::
        v &\leftarrow \rho v + (1-\rho) g^2, \quad
        \Delta \leftarrow \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\, g, \quad
        u \leftarrow \rho u + (1-\rho)\Delta^2, \quad \theta \leftarrow \theta - \gamma\Delta
    """
    grad = _weight_decay(param, _signed(grad, maximize), lr, weight_decay, False)
    _ema_square(square_avg, grad, rho)
    std = square_avg.add(eps).sqrt_()
    delta = acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
    _ema_square(acc_delta, delta, rho)
    param.add_(delta, alpha=-lr)


def rmsprop(param: Tensor, grad: Tensor, square_avg: Tensor,
            momentum_buffer: Tensor | None = None, grad_avg: Tensor | None = None, *,
            step: float, lr: float, alpha: float, eps: float, weight_decay: float,
            momentum: float, maximize: bool, has_momentum: bool, centered: bool) -> None:
    r"""RMSprop (Hinton, 2012), with momentum and the centered variant (Graves, 2013).

    .. math::
        v &\leftarrow \alpha v + (1-\alpha) g^2, \quad
        \bar g \leftarrow \alpha \bar g + (1-\alpha) g \text{ if centered}, \quad
        a = \sqrt{v - \bar g^2 \text{ or } v} + \epsilon \\
        b &\leftarrow \mu b + g / a, \quad \theta \leftarrow \theta - \gamma b
        \quad\text{(or } \theta \leftarrow \theta - \gamma g / a \text{ without momentum)}
    """
    grad = _weight_decay(param, _signed(grad, maximize), lr, weight_decay, False)
    _ema_square(square_avg, grad, alpha)
    if centered:
        grad_avg.lerp_(grad, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(eps)
    if has_momentum:
        momentum_buffer.mul_(momentum).addcdiv_(grad, avg)
        param.add_(momentum_buffer, alpha=-lr)
    else:
        param.addcdiv_(grad, avg, value=-lr)


def nadam_mu(beta1: float, step: float, momentum_decay: float) -> float:
    """NAdam's momentum schedule: mu_t = beta1 (1 - 0.5 * 0.96^(t psi))."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def nadam(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: float,
          mu_product: Tensor, lr: float, beta1: float, beta2: float, eps: float,
          weight_decay: float, momentum_decay: float, maximize: bool,
          decoupled_weight_decay: bool) -> None:
    r"""NAdam (Dozat, 2016), with torch's momentum schedule and optional decoupled decay.
    ``mu_product`` is the param's 0-dim running product of the mu_t, updated in place.

    .. math::
        \mu_t &= \beta_1(1 - \tfrac12 0.96^{t\psi}), \quad \Pi_t = \Pi_{t-1}\mu_t, \quad
        m, v \text{ as Adam}, \quad d = \sqrt{v / (1-\beta_2^t)} + \epsilon \\
        \theta &\leftarrow \theta - \gamma\frac{1-\mu_t}{1-\Pi_t}\frac{g}{d}
            - \gamma\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m}{d}
    """
    grad = _signed(grad, maximize)
    grad = _weight_decay(param, grad, lr, weight_decay, decoupled_weight_decay)
    mu = nadam_mu(beta1, step, momentum_decay)
    mu_next = nadam_mu(beta1, step + 1, momentum_decay)
    mu_product.mul_(mu)
    _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    denom = exp_avg_sq.div(1 - beta2**step).sqrt_().add_(eps)
    product = mu_product.item()
    param.addcdiv_(grad, denom, value=-lr * (1.0 - mu) / (1.0 - product))
    param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - product * mu_next))


def radam(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: float,
          lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
          maximize: bool, decoupled_weight_decay: bool) -> None:
    r"""RAdam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond").

    .. math::
        \rho_\infty &= \frac{2}{1-\beta_2} - 1, \quad
        \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t}, \quad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
        \theta &\leftarrow \theta - \gamma\frac{m}{1-\beta_1^t}
            \cdot \frac{\sqrt{1-\beta_2^t}}{\sqrt v + \epsilon}\, r_t
            \text{ if } \rho_t > 5, \text{ else }
            \theta - \gamma\frac{m}{1-\beta_1^t}
    """
    grad = _signed(grad, maximize)
    grad = _weight_decay(param, grad, lr, weight_decay, decoupled_weight_decay)
    _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    update = exp_avg / bias_correction1 * lr
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    if rho_t > 5.0:
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                         / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        adaptive_lr = math.sqrt(bias_correction2) / exp_avg_sq.sqrt().add_(eps)
        update = update * adaptive_lr * rect
    param.sub_(update)


def adamax(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_inf: Tensor, *, step: float,
           lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
           maximize: bool) -> None:
    r"""Adamax (Kingma & Ba, 2014, section 7), Adam with the infinity norm.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        u \leftarrow \max(\beta_2 u, |g| + \epsilon), \quad
        \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\frac{m}{u}
    """
    grad = _weight_decay(param, _signed(grad, maximize), lr, weight_decay, False)
    exp_avg.lerp_(grad, 1 - beta1)
    torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    param.addcdiv_(exp_avg, exp_inf, value=-lr / (1 - beta1**step))


def lion(param: Tensor, grad: Tensor, exp_avg: Tensor, *, lr: float, beta1: float,
         beta2: float, weight_decay: float, maximize: bool) -> None:
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", Alg. 2).

    .. math::
        c &= \beta_1 m + (1-\beta_1) g, \quad
        \theta \leftarrow \theta - \eta\,(\mathrm{sign}(c) + \lambda\theta), \quad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    The decay is applied as ``theta *= 1 - lr*wd`` first, the same update. The sign of NaN
    is NaN here (torch.sign gives 0): a NaN grad makes its param NaN, on both backends, rather
    than leaving it silently unchanged.
    """
    grad = _signed(grad, maximize)
    _weight_decay(param, grad, lr, weight_decay, True)
    interpolated = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    direction = torch.where(interpolated.isnan(), interpolated, interpolated.sign())
    param.add_(direction, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def lamb(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: float,
         lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
         maximize: bool, bias_correction: bool) -> None:
    r"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning", Alg. 2).

    .. math::
        m, v &\text{ as Adam}, \quad
        \hat m = \frac{m}{1-\beta_1^t}, \ \hat v = \frac{v}{1-\beta_2^t}
        \text{ (if bias\_correction)}, \quad
        u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda\theta \\
        \theta &\leftarrow \theta - \eta\,\frac{\|\theta\|}{\|u\|}\,u
        \quad(\text{the ratio is 1 where either norm is 0})
    """
    _moments(exp_avg, exp_avg_sq, _signed(grad, maximize), beta1, beta2)
    exp_avg_hat, exp_avg_sq_hat = exp_avg, exp_avg_sq
    if bias_correction:
        exp_avg_hat = exp_avg / (1 - beta1**step)
        exp_avg_sq_hat = exp_avg_sq / (1 - beta2**step)
    update = (exp_avg_hat / exp_avg_sq_hat.sqrt().add_(eps)).add_(param, alpha=weight_decay)
    param_norm = torch.linalg.vector_norm(param, dtype=_opmath(param.dtype)).item()
    update_norm = torch.linalg.vector_norm(update, dtype=_opmath(param.dtype)).item()
    trust_ratio = param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
    param.add_(update, alpha=-lr * trust_ratio)


def rprop(param: Tensor, grad: Tensor, prev: Tensor, step_size: Tensor, *, step: float,
          etaminus: float, etaplus: float, step_size_min: float, step_size_max: float,
          maximize: bool) -> None:
    r"""Rprop (Riedmiller & Braun, 1993), as torch.optim.Rprop.

    .. math::
        s &= \eta_+ \text{ where } g\,g_{prev} > 0, \ \eta_- \text{ where } < 0,
            \ 1 \text{ else}, \quad \Delta \leftarrow \mathrm{clamp}(\Delta s,
            \Delta_{min}, \Delta_{max}) \\
        g &\leftarrow 0 \text{ where } g\,g_{prev} < 0, \quad
        \theta \leftarrow \theta - \mathrm{sign}(g)\,\Delta, \quad g_{prev} \leftarrow g
    """
    grad = _signed(grad, maximize)
    sign = grad.mul(prev).sign()
    sign[sign.gt(0)] = etaplus
    sign[sign.lt(0)] = etaminus
    sign[sign.eq(0)] = 1
    step_size.mul_(sign).clamp_(step_size_min, step_size_max)
    grad = grad.clone(memory_format=torch.preserve_format)
    grad[sign.eq(etaminus)] = 0
    param.addcmul_(grad.sign(), step_size, value=-1)
    prev.copy_(grad)


def asgd(param: Tensor, grad: Tensor, ax: Tensor, *, step: float, eta: Tensor, mu: Tensor,
         lr: float, lambd: float, alpha: float, t0: float, weight_decay: float,
         maximize: bool) -> None:
    r"""ASGD, averaged stochastic gradient descent (Polyak & Juditsky, 1992), as
    torch.optim.ASGD. ``eta`` and ``mu`` are the param's 0-dim scalar states, advanced in
    place after the update.

    .. math::
        \theta &\leftarrow \theta(1 - \lambda\eta_t) - \eta_t g, \quad
        \bar\theta \leftarrow \bar\theta + \mu_t(\theta - \bar\theta)
        \ (\bar\theta \leftarrow \theta \text{ while } \mu_t = 1) \\
        \eta_{t+1} &= \frac{\gamma}{(1 + \lambda\gamma t)^\alpha}, \quad
        \mu_{t+1} = \frac{1}{\max(1, t - t_0)}
    """
    grad = _signed(grad, maximize)
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    eta_value = eta.item()
    param.mul_(1 - lambd * eta_value)
    param.add_(grad, alpha=-eta_value)
    if mu.item() != 1:
        ax.add_(param.sub(ax).mul_(mu))
    else:
        ax.copy_(param)
    eta.copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha)))
    mu.copy_(torch.as_tensor(1 / max(1, step - t0)))


def adafactor(param: Tensor, grad: Tensor, row_var: Tensor | None, col_var: Tensor | None,
              variance: Tensor | None, *, step: float, lr: float, beta2_decay: float,
              eps1: float, eps2: float, d: float, weight_decay: float, maximize: bool) -> None:
    r"""Adafactor (Shazeer & Stern, 2018), as torch.optim.Adafactor: second moments factored
    into row and column means for params of 2 or more dims (``row_var``, ``col_var``, over the
    last two dims), kept whole for the rest (``variance``); relative step size, update
    clipping, and lr-scaled decoupled weight decay.

    .. math::
        \hat\beta_t &= t^{\tau}, \quad \rho_t = \min(\gamma, 1/\sqrt t), \quad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta))\,\rho_t \\
        R &\leftarrow \mathrm{lerp}(R, \overline{g^2}_{\text{row}}, \hat\beta_t), \quad
        C \leftarrow \mathrm{lerp}(C, \overline{g^2}_{\text{col}}, \hat\beta_t), \quad
        \hat V = \frac{R\,C}{\max(\bar R, \epsilon_1)} \\
        U &= g / \sqrt{\max(\hat V, \epsilon_1^2)}, \quad
        \theta \leftarrow \theta(1 - \gamma\lambda)
            - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U)/d)}\,U

    ``eps1`` is the group's (torch takes ``finfo(dtype).eps`` of its first param with a grad
    when it is None: the spec resolves that).
    """
    grad = _signed(grad, maximize)
    one_minus_beta2_t = step ** beta2_decay
    rho_t = min(lr, 1 / (step ** 0.5))
    alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    if grad.dim() > 1:
        row_mean = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_()
        row_var.lerp_(row_mean.div_(grad.size(-1)), one_minus_beta2_t)
        col_mean = torch.linalg.vector_norm(grad, dim=-2, keepdim=True).square_()
        col_var.lerp_(col_mean.div_(grad.size(-2)), one_minus_beta2_t)
        var_estimate = row_var @ col_var
        var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        variance.lerp_(grad * grad, one_minus_beta2_t)
        var_estimate = variance.clone()
    update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
    denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))
    param.add_(update, alpha=-alpha / denom)


def newton_schulz(update: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                  eps: float) -> Tensor:
    r"""Muon's orthogonalisation of a matrix, as torch.optim.Muon: in bfloat16, on the wide
    orientation (the transpose of a tall matrix), ``ns_steps`` quintic Newton-Schulz steps

    .. math::
        X \leftarrow X / \max(\|X\|_F, \epsilon), \qquad
        A = X X^\top, \quad X \leftarrow aX + (bA + cA^2)X
    """
    a, b, c = ns_coefficients
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(int(ns_steps)):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's lr for a matrix of ``shape``: the installed torch's own rule (``adjust_lr_fn``:
    None or "original" scales by sqrt(max(1, A/B)), "match_rms_adamw" by 0.2 sqrt(max(A, B)),
    and whatever else that torch knows)."""
    from torch.optim._muon import _adjust_lr

    return _adjust_lr(lr, adjust_lr_fn, shape)


def muon(param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr: float,
         weight_decay: float, momentum: float, ns_coefficients: tuple[float, float, float],
         eps: float, ns_steps: int, adjust_lr_fn: str | None, nesterov: bool) -> None:
    r"""Muon (Jordan et al., 2024), as torch.optim.Muon: momentum (Nesterov by default), the
    update orthogonalised by :func:`newton_schulz`, lr-scaled decoupled weight decay.

    .. math::
        B \leftarrow \mathrm{lerp}(B, g, 1 - \mu), \quad
        U = \mathrm{NS}(\mathrm{lerp}(g, B, \mu) \text{ (Nesterov) or } B), \quad
        \theta \leftarrow \theta(1 - \gamma\lambda) - \gamma'\,U

    with :math:`\gamma'` the lr adjusted to the matrix's shape (:func:`muon_lr`).
    """
    momentum_buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    update = newton_schulz(update, ns_coefficients, ns_steps, eps)
    param.mul_(1 - lr * weight_decay)
    param.add_(update, alpha=-muon_lr(lr, adjust_lr_fn, param.shape))


def sparse_adam(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                step: float, lr: float, beta1: float, beta2: float, eps: float,
                maximize: bool) -> None:
    r"""SparseAdam, as torch.optim.SparseAdam, on the rows its sparse grad holds: ``param``,
    ``grad`` and the states are those rows (the engine gathers and scatters them; the rows
    a grad does not hold keep their moments and values).

    .. math::
        \Delta m = (1-\beta_1)(g - m), \quad \Delta v = (1-\beta_2)(g^2 - v), \quad
        m \leftarrow m + \Delta m, \quad v \leftarrow v + \Delta v \\
        \theta \leftarrow \theta - \gamma\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
            \frac{m}{\sqrt v + \epsilon}
    """
    grad = _signed(grad, maximize)
    old_exp_avg = exp_avg.clone()
    exp_avg_update = grad.sub(old_exp_avg).mul_(1 - beta1)
    exp_avg.add_(exp_avg_update)
    old_exp_avg_sq = exp_avg_sq.clone()
    exp_avg_sq_update = grad.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
    exp_avg_sq.add_(exp_avg_sq_update)
    numer = exp_avg_update.add_(old_exp_avg)
    denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(eps)
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    param.add_(-step_size * numer.div_(denom))


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch computes in for ``dtype`` storage: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- precision modes: how the update's numbers are kept ----------------------------------------

_WORD = 0xFFFFFFFF


def _mul_words(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 32-bit words of ``a * b`` for a 32-bit constant and 32-bit words held
    in int64 (their product would overflow int64: ``b`` is split into 16-bit halves)."""
    b_high, b_low = b >> 16, b & 0xFFFF
    low_part, high_part = a * b_low, a * b_high  # each < 2**48
    high = (high_part + (low_part >> 16)) >> 16
    low = (low_part + ((high_part & 0xFFFF) << 16)) & _WORD
    return high, low


def philox(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> Tensor:
    """The first word of Philox-4x32-10 (Salmon et al., 2011) for the counter (c0, c1, c2, c3)
    (32-bit words in int64 tensors) and the 64-bit key ``seed``: the random bits
    ``tl.philox`` gives the kernels, computed the same way."""
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    for _ in range(10):
        high_b, low_b = _mul_words(0xCD9E8D57, c2)
        high_a, low_a = _mul_words(0xD2511F53, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + 0x9E3779B9) & _WORD, (k1 + 0xBB67AE85) & _WORD
    return c0


def round_stochastic(x: Tensor, seed: int, count: int, tensor_index: int) -> Tensor:
    """fp32 ``x`` rounded to bf16 stochastically: 16 random bits (Philox keyed by ``seed``,
    counter (element index, tensor index, launch count)) added below bf16's last bit, then
    cut off. A value ``f`` of the way (in ulps) from the bf16 value below it rounds up with
    probability ``f``: the rounding is unbiased. Infinities and NaNs are kept. An element's
    index is its place in memory (``x`` is dense, laid out as its param), as the kernels walk
    it."""
    index = memory_index(x)
    bits = philox(seed, index & _WORD, index >> 32, torch.full_like(index, tensor_index),
                  torch.full_like(index, count & _WORD)) & 0xFFFF
    raw = x.view(torch.int32).to(torch.int64) & _WORD
    rounded = (raw + bits) & 0xFFFF0000
    rounded = torch.where(rounded >= 2 ** 31, rounded - 2 ** 32, rounded)  # as int32 bits
    special = (raw & 0x7F800000) == 0x7F800000  # inf or NaN
    return torch.where(special, x, rounded.to(torch.int32).view(torch.float32)).to(
        torch.bfloat16)


def working_value(param: Tensor, extra: Tensor | None, write: str) -> Tensor:
    """The value a precision mode's update works on (in the opmath dtype): the param; its
    master (``write`` "master"), where the param still is the master's rounding (a param the
    user changed is taken as it is); or param + compensation ("kahan"), where the compensation
    is at most half an ulp of the param, as each step leaves it (a larger one was left for
    another value: the user changed the param, which is taken as it is)."""
    working = param.to(_opmath(param.dtype))
    if write == "master":
        return torch.where(extra.to(param.dtype).to(working.dtype) == working, extra, working)
    if write == "kahan":
        power = (working.view(torch.int32) & 0x7F800000).view(torch.float32)
        if param.dtype == torch.bfloat16:
            half_ulp = torch.clamp(power * 2.0 ** -8, min=2.0 ** -134)
        else:
            half_ulp = torch.clamp(power * 2.0 ** -11, min=2.0 ** -25)
        compensation = extra.to(working.dtype)
        return torch.where(compensation.abs() <= half_ulp, working + compensation, working)
    return working


def memory_index(x: Tensor) -> Tensor:
    """Each element's place in memory (``x`` dense, laid out as its param): the index the
    kernels walk it by."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    return torch.as_strided(index, x.shape, x.stride())


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """A state's values (rounded to float32) in 8 bits (:mod:`fusedopt.kernels.quantization`):
    ``(codes, absmax)``, codes uint8 laid out as ``x`` (each the byte of a code index,
    :func:`fusedopt.kernels.quantization.byte_of`: 0 is the value 0), absmax float32 per block
    of ``BLOCK`` elements in memory order. Each element's code is the one nearest to
    x / absmax of its block (ties to the lower code), except that a positive value of an
    unsigned state never takes the code 0 but the smallest positive one: a second moment
    rounded to 0 would make Adam's step m / (sqrt(v) + eps) into m / eps, where rounding up
    only makes the step smaller. A block of zeros has absmax 0 and the code of 0. A block
    with a NaN or an infinity gets an infinite absmax (its finite values become 0, its others
    NaN, which take the lowest code): all of it reads back as non-finite, as a training run
    that diverged should, never as made-up finite values."""
    x = x.to(torch.float32)
    blocks = memory_index(x) // quantization.BLOCK
    absmax = torch.zeros(quantization.num_blocks(x.numel()), dtype=torch.float32,
                         device=x.device)
    magnitude = torch.where(x.isnan(), torch.inf, x.abs())
    absmax.scatter_reduce_(0, blocks.reshape(-1), magnitude.reshape(-1), "amax")
    scale = absmax[blocks]
    normalized = torch.where(scale > 0, x / scale, 0.0)
    code = quantization.dynamic_code(signed).to(x.device)
    low = (torch.searchsorted(code, normalized, right=True) - 1).clamp(0, 255)
    low = torch.where(normalized.isnan(), 0, low)
    high = (low + 1).clamp(max=255)
    up = (code[high] - normalized) < (normalized - code[low])
    if not signed:
        up |= (low == 0) & (normalized > 0)
    codes = torch.empty_like(x, dtype=torch.uint8, memory_format=torch.preserve_format)
    return codes.copy_(quantization.byte_of(torch.where(up, high, low), signed)), absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The float32 values 8-bit states ``(codes, absmax)`` stand for: code times the
    block's absmax."""
    code = quantization.dynamic_code(signed).to(codes.device)
    index = quantization.index_of(codes, signed)
    return code[index] * absmax[memory_index(codes) // quantization.BLOCK]


def precise_update(update, param: Tensor, grad: Tensor, states: dict[str, Tensor | None],
                   extra: Tensor | None, *, write: str, rng: tuple[int, int, int] | None,
                   scales: dict[str, Tensor] | None = None, **arguments) -> None:
    """One update of a param in a precision mode (:class:`fusedopt.kernels.variant.Precision`),
    ``update`` being the algorithm's reference function.

    The update runs once on upcast copies (float32; float64 for float64 params), on the
    param's working value: the param (``write`` "nearest" or "stochastic"), its fp32 master
    copy ``extra`` ("master"; where the param no longer is the master's rounding, the user
    changed it, and the param is taken), or param + compensation ``extra`` ("kahan"). Then
    each state is stored rounded to nearest even in its own dtype, and the param as the mode
    writes it: rounded to nearest (the master keeps the full value; Kahan's compensation keeps
    what the rounding lost, itself rounded), or stochastically (``rng``: seed, launch count,
    the param's index in its bucket). ``scales``: the absmax of each state kept in 8 bits
    (:func:`quantize`), which the update reads dequantized and which is stored quantized
    again."""
    compute = _opmath(param.dtype)
    scales = scales or {}
    working = working_value(param, extra, write)
    upcast = {name: None if s is None else
              dequantize(s, scales[name], quantization.signed(name)).to(compute)
              if name in scales else s.to(compute) for name, s in states.items()}
    update(working, grad.to(compute), **upcast, **arguments)
    for name, s in states.items():
        if s is not None and name in scales:
            codes, absmax = quantize(upcast[name], quantization.signed(name))
            s.copy_(codes)
            scales[name].copy_(absmax)
        elif s is not None:
            s.copy_(upcast[name])
    if write == "stochastic":
        param.copy_(round_stochastic(working, *rng))
        return
    param.copy_(working)
    if write == "master":
        extra.copy_(working)
    elif write == "kahan":  # (none where the param overflowed: inf - inf)
        rounded = param.to(compute)
        extra.copy_(torch.where(rounded.isfinite(), working - rounded, 0.0))


# ---- every reference function takes exactly what its declaration names ------------------------

for _name, _algorithm in {**ALGORITHMS, **TILED_ALGORITHMS}.items():
    _algorithm.check_reference(globals()[_name])
del _name, _algorithm
