"""One ``@triton.jit`` element-wise update per algorithm.

Each has the signature the skeleton calls:
``update(param, grad, s0, s1, s2, step, fresh, hyper, F0, F1, F2) -> (param, s0, s1, s2)``

* ``param, grad, s*``: one block of values in the opmath dtype; states a spec does not use are
  placeholders, passed through untouched and never stored.
* ``step``: this update's step number (already incremented), float32 scalar; 0 if unused.
* ``fresh``: nonzero on the first update after the state was created.
* ``hyper``: pointer to this tensor's group row of the float64 hyperparameter table, in the
  order the optimizer spec lists them.
* ``F0..F2``: constexpr variant flags, in the order the spec lists them.

Scalar math (bias corrections, step sizes) runs in float64: it costs a few instructions per
program and keeps ``1 - beta2**step`` accurate when it is tiny. The vector math follows torch's
op order, so that fp64 storage reproduces the reference to rounding.
"""

import triton
import triton.language as tl


@triton.jit
def _power(base, exponent):
    """base ** exponent for a float64 scalar base and a non-negative integral exponent.

    Square-and-multiply needs only multiplications, so it lowers the same on every backend
    (no libdevice pow) and is accurate to a few ulp of float64 for any step count.
    """
    result = base * 0.0 + 1.0
    e = exponent.to(tl.int32)
    while e > 0:
        result = tl.where(e % 2 == 1, result * base, result)
        base = base * base
        e = e // 2
    return result


@triton.jit
def _sqrt(x):
    """IEEE-rounded square root, as torch computes it (tl.sqrt is approximate for fp32)."""
    if x.dtype == tl.float64:
        out = tl.sqrt(x)  # float64 sqrt is always correctly rounded
    else:
        out = tl.sqrt_rn(x)
    return out


@triton.jit
def _div(a, b):
    """IEEE-rounded division, as torch computes it (fp32 ``/`` is approximate in Triton)."""
    if a.dtype == tl.float64:
        out = a / b
    else:
        out = tl.div_rn(a, b)
    return out


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp with a scalar weight, with torch's two-branch formula for accuracy."""
    if weight < 0.5:
        out = start + weight * (end - start)
    else:
        out = end - (end - start) * (1.0 - weight)
    return out


@triton.jit
def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, fresh, hyper,
         MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr):
    """Adam / AdamW. hyper = (lr, beta1, beta2, eps, weight_decay).

    g = -g if maximize;  decoupled: p *= 1 - lr*wd, else g += wd*p
    m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g;  vmax = max(vmax, v) if amsgrad
    p -= lr/(1-beta1^t) * m / (sqrt(v or vmax)/sqrt(1-beta2^t) + eps)
    """
    dt = param.dtype
    lr = tl.load(hyper + 0)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    weight_decay = tl.load(hyper + 4)
    step64 = step.to(tl.float64)
    step_size = (lr / (1.0 - _power(beta1, step64))).to(dt)
    bias_correction2_sqrt = tl.sqrt(1.0 - _power(beta2, step64)).to(dt)

    if MAXIMIZE:
        grad = -grad
    if weight_decay != 0.0:
        if DECOUPLED:
            param = param * (1.0 - lr * weight_decay).to(dt)
        else:
            grad = grad + weight_decay.to(dt) * param
    exp_avg = _lerp(exp_avg, grad, (1.0 - beta1).to(dt))
    exp_avg_sq = exp_avg_sq * beta2.to(dt) + (1.0 - beta2).to(dt) * grad * grad
    if AMSGRAD:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq,
                                    propagate_nan=tl.PropagateNan.ALL)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = _div(_sqrt(second_moment), bias_correction2_sqrt) + eps.to(dt)
    param = param - step_size * _div(exp_avg, denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@triton.jit
def sgd(param, grad, momentum_buffer, _unused1, _unused2, step, fresh, hyper,
        MAXIMIZE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """SGD with momentum, dampening and Nesterov. hyper = (lr, momentum, dampening, weight_decay).

    g = -g if maximize;  g += wd*p
    b = g on the first step, else momentum*b + (1-dampening)*g
    g = g + momentum*b if nesterov else b;  p -= lr*g
    """
    dt = param.dtype
    lr = tl.load(hyper + 0)
    momentum = tl.load(hyper + 1)
    dampening = tl.load(hyper + 2)
    weight_decay = tl.load(hyper + 3)
    if MAXIMIZE:
        grad = -grad
    if weight_decay != 0.0:
        grad = grad + weight_decay.to(dt) * param
    if HAS_MOMENTUM:
        if fresh != 0:
            momentum_buffer = grad
        else:
            momentum_buffer = momentum_buffer * momentum.to(dt) + (1.0 - dampening).to(dt) * grad
        if NESTEROV:
            grad = grad + momentum.to(dt) * momentum_buffer
        else:
            grad = momentum_buffer
    param = param - lr.to(dt) * grad
    return param, momentum_buffer, _unused1, _unused2
