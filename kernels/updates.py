"""One ``@triton.jit`` element-wise update per algorithm, and the pieces they share.

Each update has the signature the skeleton calls:
``update(param, grad, s0, s1, s2, step, aux, fresh, sum0, sum1, hyper, F0, F1, F2)
-> (param, s0, s1, s2)``

* ``param, grad, s*``: one block of values in the opmath dtype; states a spec does not use are
  placeholders, passed through untouched and never stored.
* ``step``: this update's step number (already incremented), float32 scalar; 0 if unused.
* ``aux``: the spec's per-tensor scalar state after this step's advance (NAdam's
  ``mu_product``); 0 if unused.
* ``fresh``: nonzero on the first update after the state was created.
* ``sum0, sum1``: this tensor's sums from the spec's ``terms`` launch (LAMB); 0 if unused.
* ``hyper``: pointer to this tensor's group row of the float64 hyperparameter table, in the
  order the optimizer spec lists them.
* ``F0..F2``: constexpr variant flags, in the order the spec lists them.

Scalar math (bias corrections, step sizes) runs in float64: it costs a few instructions per
program and keeps ``1 - beta2**step`` accurate when it is tiny. The vector math follows torch's
op order, so that fp64 storage reproduces the reference to rounding. Scalars enter the vector
math rounded to the opmath dtype, as torch's Python-float scalars do.
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
def _exp_power(base, exponent):
    """base ** exponent for a float64 scalar and a real exponent (NAdam's 0.96 ** (t * psi))."""
    return tl.exp(exponent * tl.log(base))


@triton.jit
def _sign(x):
    """torch.sign: -1, 0 or 1, and NaN for NaN."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, x)).to(x.dtype)


@triton.jit
def _signed(grad, MAXIMIZE: tl.constexpr):
    """The descent direction's gradient: -g when maximizing."""
    if MAXIMIZE:
        grad = -grad
    return grad


@triton.jit
def _weight_decay(param, grad, lr, weight_decay, DECOUPLED: tl.constexpr):
    """Decoupled (AdamW, Lion): p *= 1 - lr*wd. Otherwise L2: g += wd*p. Returns (p, g)."""
    dt = param.dtype
    if weight_decay != 0.0:
        if DECOUPLED:
            param = param * (1.0 - lr * weight_decay).to(dt)
        else:
            grad = grad + weight_decay.to(dt) * param
    return param, grad


@triton.jit
def _ema_square(average, x, beta):
    """average * beta + (1 - beta) * x * x (torch: ``mul_(beta).addcmul_(x, x, 1 - beta)``)."""
    dt = average.dtype
    return average * beta.to(dt) + (1.0 - beta).to(dt) * x * x


@triton.jit
def _adam_hyperparams(hyper):
    """The Adam family's first five hyperparameters: (lr, beta1, beta2, eps, weight_decay)."""
    return (tl.load(hyper + 0), tl.load(hyper + 1), tl.load(hyper + 2), tl.load(hyper + 3),
            tl.load(hyper + 4))


@triton.jit
def _moments(exp_avg, exp_avg_sq, grad, beta1, beta2):
    """Adam's moments, shared by Adam/AdamW, NAdam, RAdam and LAMB:
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g."""
    exp_avg = _lerp(exp_avg, grad, (1.0 - beta1).to(grad.dtype))
    return exp_avg, _ema_square(exp_avg_sq, grad, beta2)


# ---- the updates, one per algorithm (the math is in each optimizer's reference docstring) ----


@triton.jit
def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, aux, fresh, sum0, sum1, hyper,
         MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr):
    """Adam / AdamW. hyper = (lr, beta1, beta2, eps, weight_decay).

    m, v = moments;  vmax = max(vmax, v) if amsgrad
    p -= lr/(1-beta1^t) * m / (sqrt(v or vmax)/sqrt(1-beta2^t) + eps)
    """
    dt = param.dtype
    lr, beta1, beta2, eps, weight_decay = _adam_hyperparams(hyper)
    t = step.to(tl.float64)
    step_size = (lr / (1.0 - _power(beta1, t))).to(dt)
    bias_correction2_sqrt = tl.sqrt(1.0 - _power(beta2, t)).to(dt)

    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, DECOUPLED)
    exp_avg, exp_avg_sq = _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
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
def sgd(param, grad, momentum_buffer, _unused1, _unused2, step, aux, fresh, sum0, sum1, hyper,
        MAXIMIZE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """SGD with momentum, dampening and Nesterov. hyper = (lr, momentum, dampening, weight_decay).

    b = g on the first step, else momentum*b + (1-dampening)*g
    g = g + momentum*b if nesterov else b;  p -= lr*g
    """
    dt = param.dtype
    lr = tl.load(hyper + 0)
    momentum = tl.load(hyper + 1)
    dampening = tl.load(hyper + 2)
    weight_decay = tl.load(hyper + 3)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
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


@triton.jit
def adagrad(param, grad, state_sum, _unused1, _unused2, step, aux, fresh, sum0, sum1, hyper,
            MAXIMIZE: tl.constexpr, _F1: tl.constexpr, _F2: tl.constexpr):
    """Adagrad. hyper = (lr, lr_decay, weight_decay, eps).

    s += g*g;  p -= lr/(1 + (t-1)*lr_decay) * g / (sqrt(s) + eps)
    """
    dt = param.dtype
    lr = tl.load(hyper + 0)
    lr_decay = tl.load(hyper + 1)
    weight_decay = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    clr = (lr / (1.0 + (step.to(tl.float64) - 1.0) * lr_decay)).to(dt)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    state_sum = state_sum + grad * grad
    param = param - clr * _div(grad, _sqrt(state_sum) + eps.to(dt))
    return param, state_sum, _unused1, _unused2


@triton.jit
def adadelta(param, grad, square_avg, acc_delta, _unused, step, aux, fresh, sum0, sum1, hyper,
             MAXIMIZE: tl.constexpr, _F1: tl.constexpr, _F2: tl.constexpr):
    """Adadelta. hyper = (lr, rho, eps, weight_decay).

    v = ema(v, g*g);  d = sqrt(u + eps) / sqrt(v + eps) * g;  u = ema(u, d*d);  p -= lr*d
    """
    dt = param.dtype
    lr = tl.load(hyper + 0)
    rho = tl.load(hyper + 1)
    eps = tl.load(hyper + 2).to(dt)
    weight_decay = tl.load(hyper + 3)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    square_avg = _ema_square(square_avg, grad, rho)
    delta = _div(_sqrt(acc_delta + eps), _sqrt(square_avg + eps)) * grad
    acc_delta = _ema_square(acc_delta, delta, rho)
    param = param - lr.to(dt) * delta
    return param, square_avg, acc_delta, _unused


@triton.jit
def rmsprop(param, grad, square_avg, s1, s2, step, aux, fresh, sum0, sum1, hyper,
            MAXIMIZE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, CENTERED: tl.constexpr):
    """RMSprop. hyper = (lr, alpha, eps, weight_decay, momentum).
    States: square_avg, then momentum_buffer if momentum, then grad_avg if centered.

    v = ema(v, g*g);  c = lerp(c, g, 1-alpha) if centered
    a = sqrt(v - c*c if centered else v) + eps
    b = momentum*b + g/a, p -= lr*b  (with momentum);  p -= lr * g/a  (without)
    """
    dt = param.dtype
    lr = tl.load(hyper + 0).to(dt)
    alpha = tl.load(hyper + 1)
    eps = tl.load(hyper + 2).to(dt)
    weight_decay = tl.load(hyper + 3)
    momentum = tl.load(hyper + 4).to(dt)
    if HAS_MOMENTUM:
        momentum_buffer = s1
        grad_avg = s2
    else:
        momentum_buffer = s2
        grad_avg = s1
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    square_avg = _ema_square(square_avg, grad, alpha)
    if CENTERED:
        grad_avg = _lerp(grad_avg, grad, (1.0 - alpha).to(dt))
        avg = _sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = _sqrt(square_avg) + eps
    if HAS_MOMENTUM:
        momentum_buffer = momentum_buffer * momentum + _div(grad, avg)
        param = param - lr * momentum_buffer
        s1 = momentum_buffer
        s2 = grad_avg
    else:
        param = param - lr * _div(grad, avg)
        s1 = grad_avg
    return param, square_avg, s1, s2


@triton.jit
def _nadam_mu(beta1, t, momentum_decay):
    """NAdam's momentum schedule mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi)), in float64."""
    return beta1 * (1.0 - 0.5 * _exp_power(0.96 + t * 0.0, t * momentum_decay))


@triton.jit
def nadam_mu_product(mu_product, step, hyper):
    """NAdam's per-tensor scalar state: mu_product *= mu_t, in float32 as torch keeps it."""
    mu = _nadam_mu(tl.load(hyper + 1), step.to(tl.float64), tl.load(hyper + 5))
    return mu_product * mu.to(tl.float32)


@triton.jit
def nadam(param, grad, exp_avg, exp_avg_sq, _unused, step, mu_product, fresh, sum0, sum1,
          hyper, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, _F2: tl.constexpr):
    """NAdam. hyper = (lr, beta1, beta2, eps, weight_decay, momentum_decay); ``mu_product``
    is prod(mu_1..mu_t), already advanced by :func:`nadam_mu_product`.

    m, v = moments;  d = sqrt(v / (1-beta2^t)) + eps
    p -= lr (1-mu_t)/(1-prod_t) g/d + lr mu_{t+1}/(1-prod_t mu_{t+1}) m/d
    """
    dt = param.dtype
    lr, beta1, beta2, eps, weight_decay = _adam_hyperparams(hyper)
    momentum_decay = tl.load(hyper + 5)
    t = step.to(tl.float64)
    bias_correction2 = (1.0 - _power(beta2, t)).to(dt)
    mu = _nadam_mu(beta1, t, momentum_decay)
    mu_next = _nadam_mu(beta1, t + 1.0, momentum_decay)
    product = mu_product.to(tl.float64)
    grad_coef = (-lr * (1.0 - mu) / (1.0 - product)).to(dt)
    avg_coef = ((-lr * mu_next) / (1.0 - product * mu_next)).to(dt)

    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, DECOUPLED)
    exp_avg, exp_avg_sq = _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    denom = _sqrt(_div(exp_avg_sq, bias_correction2)) + eps.to(dt)
    param = param + grad_coef * _div(grad, denom)
    param = param + avg_coef * _div(exp_avg, denom)
    return param, exp_avg, exp_avg_sq, _unused


@triton.jit
def radam(param, grad, exp_avg, exp_avg_sq, _unused, step, aux, fresh, sum0, sum1, hyper,
          MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, _F2: tl.constexpr):
    """RAdam. hyper = (lr, beta1, beta2, eps, weight_decay).

    m, v = moments;  rho_inf = 2/(1-beta2) - 1;  rho_t = rho_inf - 2 t beta2^t / (1-beta2^t)
    p -= lr m/(1-beta1^t) * [rho_t > 5: sqrt(1-beta2^t)/(sqrt(v)+eps) * rect_t]
    """
    dt = param.dtype
    lr, beta1, beta2, eps, weight_decay = _adam_hyperparams(hyper)
    t = step.to(tl.float64)
    bias_correction1 = 1.0 - _power(beta1, t)
    beta2_t = _power(beta2, t)
    bias_correction2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2_t / bias_correction2

    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, DECOUPLED)
    exp_avg, exp_avg_sq = _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    update = _div(exp_avg, bias_correction1.to(dt)) * lr.to(dt)
    if rho_t > 5.0:
        rect = tl.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                       / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
        # (zeros_like: the numerator must be block-shaped; 0 * v would be NaN where v is inf)
        adaptive_lr = _div(tl.sqrt(bias_correction2).to(dt) + tl.zeros_like(exp_avg_sq),
                           _sqrt(exp_avg_sq) + eps.to(dt))
        update = update * adaptive_lr * rect.to(dt)
    param = param - update
    return param, exp_avg, exp_avg_sq, _unused


@triton.jit
def adamax(param, grad, exp_avg, exp_inf, _unused, step, aux, fresh, sum0, sum1, hyper,
           MAXIMIZE: tl.constexpr, _F1: tl.constexpr, _F2: tl.constexpr):
    """Adamax. hyper = (lr, beta1, beta2, eps, weight_decay).

    m = lerp(m, g, 1-beta1);  u = max(beta2*u, |g| + eps);  p -= lr/(1-beta1^t) * m/u
    """
    dt = param.dtype
    lr, beta1, beta2, eps, weight_decay = _adam_hyperparams(hyper)
    clr = (lr / (1.0 - _power(beta1, step.to(tl.float64)))).to(dt)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    exp_avg = _lerp(exp_avg, grad, (1.0 - beta1).to(dt))
    exp_inf = tl.maximum(exp_inf * beta2.to(dt), tl.abs(grad) + eps.to(dt),
                         propagate_nan=tl.PropagateNan.ALL)
    param = param - clr * _div(exp_avg, exp_inf)
    return param, exp_avg, exp_inf, _unused


@triton.jit
def lion(param, grad, exp_avg, _unused1, _unused2, step, aux, fresh, sum0, sum1, hyper,
         MAXIMIZE: tl.constexpr, _F1: tl.constexpr, _F2: tl.constexpr):
    """Lion. hyper = (lr, beta1, beta2, weight_decay).

    p *= 1 - lr*wd;  p -= lr * sign(beta1*m + (1-beta1)*g);  m = beta2*m + (1-beta2)*g
    """
    dt = param.dtype
    lr = tl.load(hyper + 0)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    weight_decay = tl.load(hyper + 3)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, True)
    interpolated = exp_avg * beta1.to(dt) + (1.0 - beta1).to(dt) * grad
    param = param - lr.to(dt) * _sign(interpolated)
    exp_avg = exp_avg * beta2.to(dt) + (1.0 - beta2).to(dt) * grad
    return param, exp_avg, _unused1, _unused2


@triton.jit
def _lamb_direction(param, grad, exp_avg, exp_avg_sq, step, hyper,
                    MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr):
    """LAMB's update before the trust ratio: (r + wd*p, new m, new v), r = m^ / (sqrt(v^)+eps).
    The norms launch and the update launch both call this, so they agree bit for bit."""
    dt = param.dtype
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3).to(dt)
    weight_decay = tl.load(hyper + 4).to(dt)
    grad = _signed(grad, MAXIMIZE)
    exp_avg, exp_avg_sq = _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    if BIAS_CORRECTION:
        t = step.to(tl.float64)
        exp_avg_hat = _div(exp_avg, (1.0 - _power(beta1, t)).to(dt))
        exp_avg_sq_hat = _div(exp_avg_sq, (1.0 - _power(beta2, t)).to(dt))
    else:
        exp_avg_hat = exp_avg
        exp_avg_sq_hat = exp_avg_sq
    update = _div(exp_avg_hat, _sqrt(exp_avg_sq_hat) + eps) + weight_decay * param
    return update, exp_avg, exp_avg_sq


@triton.jit
def lamb_norms(param, grad, exp_avg, exp_avg_sq, _unused, step, aux, fresh, hyper,
               MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, _F2: tl.constexpr):
    """LAMB's terms: (p*p, u*u), summed per tensor into ||p||^2 and ||r + wd p||^2."""
    update, exp_avg, exp_avg_sq = _lamb_direction(param, grad, exp_avg, exp_avg_sq, step, hyper,
                                                  MAXIMIZE, BIAS_CORRECTION)
    return param * param, update * update


@triton.jit
def lamb(param, grad, exp_avg, exp_avg_sq, _unused, step, aux, fresh, param_sq, update_sq,
         hyper, MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, _F2: tl.constexpr):
    """LAMB. hyper = (lr, beta1, beta2, eps, weight_decay); ``param_sq``, ``update_sq``: this
    tensor's sums from :func:`lamb_norms`.

    u = r + wd*p;  p -= lr * (||p|| / ||u|| if both nonzero else 1) * u
    """
    dt = param.dtype
    lr = tl.load(hyper + 0)
    update, exp_avg, exp_avg_sq = _lamb_direction(param, grad, exp_avg, exp_avg_sq, step, hyper,
                                                  MAXIMIZE, BIAS_CORRECTION)
    param_norm = _sqrt(param_sq)
    update_norm = _sqrt(update_sq)
    both = (param_norm > 0.0) & (update_norm > 0.0)
    trust_ratio = tl.where(both, _div(param_norm, tl.where(both, update_norm, 1.0)), 1.0)
    param = param - (lr * trust_ratio.to(tl.float64)).to(dt) * update
    return param, exp_avg, exp_avg_sq, _unused
