"""Readable per-tensor reference updates, written from the algorithms torch.optim documents.

These are the spec the Triton kernels are tested against, and the backend used on CPU when
triton is not running. Each function updates ``param`` and its state tensors in place, in the
tensors' own dtype, exactly as the matching ``torch.optim`` class does with
``foreach=False, fused=False``.

Every function takes the same engine-supplied keywords besides its hyperparameters:
``step`` (this update's step number, already incremented, or None when the algorithm keeps no
step) and ``fresh`` (True on the first update after the state was created).
"""

import math

import torch
from torch import Tensor


def adam(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
         max_exp_avg_sq: Tensor | None = None, *, step: float, fresh: bool,
         lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
         maximize: bool, amsgrad: bool, decoupled_weight_decay: bool) -> None:
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
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
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
        step: float | None, fresh: bool, lr: float, momentum: float, dampening: float,
        weight_decay: float, maximize: bool, has_momentum: bool, nesterov: bool) -> None:
    r"""Stochastic gradient descent with momentum (Sutskever et al., 2013) and Nesterov.

    .. math::
        g &\leftarrow -g \text{ if maximize}, \quad g \leftarrow g + \lambda\theta \\
        b &\leftarrow g \text{ (first step) or } \mu b + (1-\tau) g \\
        g &\leftarrow g + \mu b \text{ if nesterov, else } b, \quad
        \theta \leftarrow \theta - \gamma g
    """
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if has_momentum:
        if fresh:
            momentum_buffer.copy_(grad)
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)
