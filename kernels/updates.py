"""One ``@triton.jit`` element-wise update per algorithm, and the pieces they share.

Each update's arguments are named by its declaration in :mod:`fusedopt.kernels.algorithms`
(checked at import, at the bottom of this module):
``<name>(param, grad, *states, *hyper, *scalars, *sums, [fresh], *FLAGS) -> (param, *states)``

* ``param, grad`` and the states: one block of values in the opmath dtype. A state the variant
  does not have (``max_exp_avg_sq`` without amsgrad) holds the param's values; what the update
  returns for it is dropped.
* the hyperparameters: this tensor's group's values, float64 scalars, loaded once per program.
* the scalars: ``step`` is this update's step number (already incremented), float32; any other
  scalar state is its value before this step (``<name>_advance`` computes the new one).
* the sums: this tensor's sums from the ``<name>_terms`` launch before this one (LAMB).
* ``fresh``: nonzero on the first update after the state was created (SGD).
* the FLAGS: constexpr variant flags.

Scalar math (bias corrections, step sizes) runs in float64: it costs a few instructions per
program and keeps ``1 - beta2**step`` accurate when it is tiny. The vector math follows torch's
op order, so that fp64 storage reproduces the reference to rounding. Scalars enter the vector
math rounded to the opmath dtype, as torch's Python-float scalars do.
"""

import triton
import triton.language as tl

from fusedopt.kernels.algorithms import ALGORITHMS


@triton.jit
def _power(base, exponent):
    """base ** exponent for a float64 scalar base in [0, 1) and a step count >= 1, as
    exp(exponent * log(base)) in float64: straight-line code (no loop), computed once per
    program. Its relative error is about |exponent * log(base)| ulps of float64, so
    ``1 - beta**t`` matches Python's ``beta ** t`` (torch.optim's own scalar math) to ~1e-16
    wherever ``beta**t`` is not negligible (tests/test_kernels_vs_reference.py checks it).
    """
    return tl.exp(exponent * tl.log(base))


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
def _div_scalar(a, b):
    """a / b for a per-program scalar b, as torch computes a tensor divided by a number on
    CUDA: a times b's reciprocal (one IEEE division per program, then a multiplication per
    element, instead of an IEEE division per element)."""
    return a * _div(1.0 + tl.zeros_like(b), b).to(a.dtype)


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
def _moments(exp_avg, exp_avg_sq, grad, beta1, beta2):
    """Adam's moments, shared by Adam/AdamW, NAdam, RAdam and LAMB:
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g."""
    exp_avg = _lerp(exp_avg, grad, (1.0 - beta1).to(grad.dtype))
    return exp_avg, _ema_square(exp_avg_sq, grad, beta2)


# ---- the updates, one per algorithm (the math is in each optimizer's reference docstring) ----


@triton.jit
def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
         step, MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr,
         DECOUPLED_WEIGHT_DECAY: tl.constexpr):
    """Adam / AdamW.

    m, v = moments;  vmax = max(vmax, v) if amsgrad
    p -= lr/(1-beta1^t) * m / (sqrt(v or vmax)/sqrt(1-beta2^t) + eps)
    """
    dt = param.dtype
    t = step.to(tl.float64)
    step_size = (lr / (1.0 - _power(beta1, t))).to(dt)
    bias_correction2_sqrt = tl.sqrt(1.0 - _power(beta2, t)).to(dt)

    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, DECOUPLED_WEIGHT_DECAY)
    exp_avg, exp_avg_sq = _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    if AMSGRAD:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq,
                                    propagate_nan=tl.PropagateNan.ALL)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = _div_scalar(_sqrt(second_moment), bias_correction2_sqrt) + eps.to(dt)
    param = param - step_size * _div(exp_avg, denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@triton.jit
def sgd(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, fresh,
        MAXIMIZE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """SGD with momentum, dampening and Nesterov.

    b = g on the first step, else momentum*b + (1-dampening)*g
    g = g + momentum*b if nesterov else b;  p -= lr*g
    """
    dt = param.dtype
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
    return param, momentum_buffer


@triton.jit
def adagrad(param, grad, sum, lr, lr_decay, weight_decay, eps, step, MAXIMIZE: tl.constexpr):
    """Adagrad.

    s += g*g;  p -= lr/(1 + (t-1)*lr_decay) * g / (sqrt(s) + eps)
    """
    dt = param.dtype
    clr = (lr / (1.0 + (step.to(tl.float64) - 1.0) * lr_decay)).to(dt)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    sum = sum + grad * grad
    param = param - clr * _div(grad, _sqrt(sum) + eps.to(dt))
    return param, sum


@triton.jit
def adadelta(param, grad, square_avg, acc_delta, lr, rho, eps, weight_decay, step,
             MAXIMIZE: tl.constexpr):
    """Adadelta.

    v = ema(v, g*g);  d = sqrt(u + eps) / sqrt(v + eps) * g;  u = ema(u, d*d);  p -= lr*d
    """
    dt = param.dtype
    eps = eps.to(dt)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    square_avg = _ema_square(square_avg, grad, rho)
    delta = _div(_sqrt(acc_delta + eps), _sqrt(square_avg + eps)) * grad
    acc_delta = _ema_square(acc_delta, delta, rho)
    param = param - lr.to(dt) * delta
    return param, square_avg, acc_delta


@triton.jit
def rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, lr, alpha, eps, weight_decay,
            momentum, step, MAXIMIZE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
            CENTERED: tl.constexpr):
    """RMSprop.

    v = ema(v, g*g);  c = lerp(c, g, 1-alpha) if centered
    a = sqrt(v - c*c if centered else v) + eps
    b = momentum*b + g/a, p -= lr*b  (with momentum);  p -= lr * g/a  (without)
    """
    dt = param.dtype
    eps = eps.to(dt)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    square_avg = _ema_square(square_avg, grad, alpha)
    if CENTERED:
        grad_avg = _lerp(grad_avg, grad, (1.0 - alpha).to(dt))
        avg = _sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = _sqrt(square_avg) + eps
    if HAS_MOMENTUM:
        momentum_buffer = momentum_buffer * momentum.to(dt) + _div(grad, avg)
        param = param - lr.to(dt) * momentum_buffer
    else:
        param = param - lr.to(dt) * _div(grad, avg)
    return param, square_avg, momentum_buffer, grad_avg


@triton.jit
def _nadam_mu(beta1, t, momentum_decay):
    """NAdam's momentum schedule mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi)), in float64."""
    return beta1 * (1.0 - 0.5 * _exp_power(0.96 + t * 0.0, t * momentum_decay))


@triton.jit
def _nadam_product(mu_product, step, beta1, momentum_decay):
    """mu_product * mu_t, in float32 as torch keeps the product."""
    return mu_product * _nadam_mu(beta1, step.to(tl.float64), momentum_decay).to(tl.float32)


@triton.jit
def nadam_advance(step, mu_product, lr, beta1, beta2, eps, weight_decay, momentum_decay,
                  MAXIMIZE: tl.constexpr, DECOUPLED_WEIGHT_DECAY: tl.constexpr):
    """NAdam's per-tensor scalar state after this step: mu_product * mu_t."""
    return _nadam_product(mu_product, step, beta1, momentum_decay)


@triton.jit
def nadam(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
          momentum_decay, step, mu_product, MAXIMIZE: tl.constexpr,
          DECOUPLED_WEIGHT_DECAY: tl.constexpr):
    """NAdam. ``mu_product`` is prod(mu_1..mu_(t-1)), as stored before this step.

    m, v = moments;  d = sqrt(v / (1-beta2^t)) + eps;  P = mu_product * mu_t
    p -= lr (1-mu_t)/(1-P) g/d + lr mu_{t+1}/(1-P mu_{t+1}) m/d
    """
    dt = param.dtype
    t = step.to(tl.float64)
    bias_correction2 = (1.0 - _power(beta2, t)).to(dt)
    mu = _nadam_mu(beta1, t, momentum_decay)
    mu_next = _nadam_mu(beta1, t + 1.0, momentum_decay)
    product = _nadam_product(mu_product, step, beta1, momentum_decay).to(tl.float64)
    grad_coef = (-lr * (1.0 - mu) / (1.0 - product)).to(dt)
    avg_coef = ((-lr * mu_next) / (1.0 - product * mu_next)).to(dt)

    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, DECOUPLED_WEIGHT_DECAY)
    exp_avg, exp_avg_sq = _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    denom = _sqrt(_div_scalar(exp_avg_sq, bias_correction2)) + eps.to(dt)
    param = param + grad_coef * _div(grad, denom)
    param = param + avg_coef * _div(exp_avg, denom)
    return param, exp_avg, exp_avg_sq


@triton.jit
def radam(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
          MAXIMIZE: tl.constexpr, DECOUPLED_WEIGHT_DECAY: tl.constexpr):
    """RAdam.

    m, v = moments;  rho_inf = 2/(1-beta2) - 1;  rho_t = rho_inf - 2 t beta2^t / (1-beta2^t)
    p -= lr m/(1-beta1^t) * [rho_t > 5: sqrt(1-beta2^t)/(sqrt(v)+eps) * rect_t]
    """
    dt = param.dtype
    t = step.to(tl.float64)
    bias_correction1 = 1.0 - _power(beta1, t)
    beta2_t = _power(beta2, t)
    bias_correction2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2_t / bias_correction2

    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, DECOUPLED_WEIGHT_DECAY)
    exp_avg, exp_avg_sq = _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    update = _div_scalar(exp_avg, bias_correction1.to(dt)) * lr.to(dt)
    # Rectified once rho_t > 5. One per-program choice instead of a branch around the block
    # (a branch doubled the live registers of the pipelined loop); where it is not rectified
    # the factor is unused, so an inf v there cannot leak in.
    rectified = rho_t > 5.0
    rect = tl.sqrt(tl.maximum((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                              / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.0))
    # (zeros_like: the numerator must be block-shaped; 0 * v would be NaN where v is inf)
    adaptive_lr = _div(tl.sqrt(bias_correction2).to(dt) + tl.zeros_like(exp_avg_sq),
                       _sqrt(exp_avg_sq) + eps.to(dt))
    update = tl.where(rectified, update * adaptive_lr * rect.to(dt), update)
    param = param - update
    return param, exp_avg, exp_avg_sq


@triton.jit
def adamax(param, grad, exp_avg, exp_inf, lr, beta1, beta2, eps, weight_decay, step,
           MAXIMIZE: tl.constexpr):
    """Adamax.

    m = lerp(m, g, 1-beta1);  u = max(beta2*u, |g| + eps);  p -= lr/(1-beta1^t) * m/u
    """
    dt = param.dtype
    clr = (lr / (1.0 - _power(beta1, step.to(tl.float64)))).to(dt)
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    exp_avg = _lerp(exp_avg, grad, (1.0 - beta1).to(dt))
    exp_inf = tl.maximum(exp_inf * beta2.to(dt), tl.abs(grad) + eps.to(dt),
                         propagate_nan=tl.PropagateNan.ALL)
    param = param - clr * _div(exp_avg, exp_inf)
    return param, exp_avg, exp_inf


@triton.jit
def lion(param, grad, exp_avg, lr, beta1, beta2, weight_decay, MAXIMIZE: tl.constexpr):
    """Lion.

    p *= 1 - lr*wd;  p -= lr * sign(beta1*m + (1-beta1)*g);  m = beta2*m + (1-beta2)*g
    (sign(NaN) is NaN: a NaN grad makes its param NaN, on both backends)
    """
    dt = param.dtype
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, True)
    interpolated = exp_avg * beta1.to(dt) + (1.0 - beta1).to(dt) * grad
    param = param - lr.to(dt) * _sign(interpolated)
    exp_avg = exp_avg * beta2.to(dt) + (1.0 - beta2).to(dt) * grad
    return param, exp_avg


@triton.jit
def _lamb_direction(param, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, weight_decay, step,
                    MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr):
    """LAMB's update before the trust ratio: (r + wd*p, new m, new v), r = m^ / (sqrt(v^)+eps).
    The terms launch and the update launch both call this, so they agree bit for bit."""
    dt = param.dtype
    grad = _signed(grad, MAXIMIZE)
    exp_avg, exp_avg_sq = _moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
    if BIAS_CORRECTION:
        t = step.to(tl.float64)
        exp_avg_hat = _div_scalar(exp_avg, (1.0 - _power(beta1, t)).to(dt))
        exp_avg_sq_hat = _div_scalar(exp_avg_sq, (1.0 - _power(beta2, t)).to(dt))
    else:
        exp_avg_hat = exp_avg
        exp_avg_sq_hat = exp_avg_sq
    update = _div(exp_avg_hat, _sqrt(exp_avg_sq_hat) + eps.to(dt)) + weight_decay.to(dt) * param
    return update, exp_avg, exp_avg_sq


@triton.jit
def lamb_terms(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr):
    """LAMB's terms: (p*p, u*u), summed per tensor into ||p||^2 and ||r + wd p||^2."""
    update, exp_avg, exp_avg_sq = _lamb_direction(param, grad, exp_avg, exp_avg_sq, beta1, beta2,
                                                  eps, weight_decay, step, MAXIMIZE,
                                                  BIAS_CORRECTION)
    return param * param, update * update


@triton.jit
def lamb(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, param_sq,
         update_sq, MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr):
    """LAMB. ``param_sq``, ``update_sq``: this tensor's sums from :func:`lamb_terms`.

    u = r + wd*p;  p -= lr * (||p|| / ||u|| if both nonzero else 1) * u
    """
    dt = param.dtype
    update, exp_avg, exp_avg_sq = _lamb_direction(param, grad, exp_avg, exp_avg_sq, beta1, beta2,
                                                  eps, weight_decay, step, MAXIMIZE,
                                                  BIAS_CORRECTION)
    param_norm = _sqrt(param_sq)
    update_norm = _sqrt(update_sq)
    both = (param_norm > 0.0) & (update_norm > 0.0)
    trust_ratio = tl.where(both, _div(param_norm, tl.where(both, update_norm, 1.0)), 1.0)
    param = param - (lr * trust_ratio.to(tl.float64)).to(dt) * update
    return param, exp_avg, exp_avg_sq


@triton.jit
def _torch_sign(x):
    """torch.sign as torch computes it: -1, 0 or 1, and 0 for NaN ((0 < x) - (x < 0))."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0)).to(x.dtype)


@triton.jit
def rprop(param, grad, prev, step_size, etaminus, etaplus, step_size_min, step_size_max, step,
          MAXIMIZE: tl.constexpr):
    """Rprop (resilient backpropagation).

    s = etaplus where g*prev > 0, etaminus where < 0, else 1;  step_size = clamp(step_size*s)
    g = 0 where g*prev < 0;  p -= sign(g) * step_size;  prev = g
    """
    dt = param.dtype
    grad = _signed(grad, MAXIMIZE)
    product = grad * prev
    factor = tl.where(product > 0.0, etaplus.to(dt), tl.where(product < 0.0, etaminus.to(dt),
                                                                 1.0))
    step_size = tl.minimum(tl.maximum(step_size * factor, step_size_min.to(dt),
                                      propagate_nan=tl.PropagateNan.ALL),
                           step_size_max.to(dt), propagate_nan=tl.PropagateNan.ALL)
    grad = tl.where(product < 0.0, 0.0, grad)
    param = param - _torch_sign(grad) * step_size
    return param, grad, step_size


@triton.jit
def asgd_advance(step, eta, mu, lr, lambd, alpha, t0, weight_decay, MAXIMIZE: tl.constexpr):
    """ASGD's scalar states after step t: eta = lr / (1 + lambd lr t)^alpha,
    mu = 1 / max(1, t - t0), in float64 and stored as float32 (as torch computes them)."""
    t = step.to(tl.float64)
    new_eta = lr / _exp_power(1.0 + lambd * lr * t, alpha)
    new_mu = 1.0 / tl.maximum(t - t0, 1.0)
    return new_eta.to(tl.float32), new_mu.to(tl.float32)


@triton.jit
def asgd(param, grad, ax, lr, lambd, alpha, t0, weight_decay, step, eta, mu,
         MAXIMIZE: tl.constexpr):
    """ASGD (averaged SGD). ``eta``, ``mu``: as stored before this step.

    p *= 1 - lambd*eta;  p -= eta*g;  ax += (p - ax)*mu  (ax = p where mu == 1)
    """
    dt = param.dtype
    grad = _signed(grad, MAXIMIZE)
    param, grad = _weight_decay(param, grad, lr, weight_decay, False)
    eta = eta.to(tl.float64)
    param = param * (1.0 - lambd * eta).to(dt)
    param = param - eta.to(dt) * grad
    if mu != 1.0:
        ax = ax + (param - ax) * mu.to(dt)
    else:
        ax = param
    return param, ax


@triton.jit
def sparse_adam(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step,
                MAXIMIZE: tl.constexpr):
    """SparseAdam, on the rows a sparse grad holds (the others are left alone).

    dm = (g - m)(1-beta1);  dv = (g*g - v)(1-beta2);  m += dm;  v += dv
    p -= lr sqrt(1-beta2^t)/(1-beta1^t) * m / (sqrt(v) + eps)
    """
    dt = param.dtype
    t = step.to(tl.float64)
    step_size = lr * tl.sqrt(1.0 - _power(beta2, t)) / (1.0 - _power(beta1, t))
    grad = _signed(grad, MAXIMIZE)
    exp_avg_update = (grad - exp_avg) * (1.0 - beta1).to(dt)
    exp_avg_sq_update = (grad * grad - exp_avg_sq) * (1.0 - beta2).to(dt)
    exp_avg = exp_avg + exp_avg_update
    exp_avg_sq = exp_avg_sq + exp_avg_sq_update
    denom = _sqrt(exp_avg_sq) + eps.to(dt)
    param = param + (-step_size).to(dt) * _div(exp_avg, denom)
    return param, exp_avg, exp_avg_sq


# ---- every update, advance and terms function takes exactly what its declaration names ------


def _check_declarations() -> None:
    for name, algorithm in ALGORITHMS.items():
        algorithm.check_jit("update", globals()[name])
        if algorithm.advanced:
            algorithm.check_jit("advance", globals()[f"{name}_advance"])
        if algorithm.sums:
            algorithm.check_jit("terms", globals()[f"{name}_terms"])


_check_declarations()
