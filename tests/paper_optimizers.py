"""Lion and LAMB transcribed line by line from their papers' pseudocode, as the yardsticks
that torch.optim is for the other optimizers (torch has neither).

They are deliberately naive: one tensor at a time, plain tensor arithmetic, each line of the
paper's algorithm one line here, no fusion and no shared code with fusedopt. The state keys
are fusedopt's, so that state_dicts move between them and fusedopt as they do with torch.optim.
"""

import torch


class PaperLion(torch.optim.Optimizer):
    """Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2:

        c_t  <- beta1 * m_{t-1} + (1 - beta1) * g_t
        th_t <- th_{t-1} - eta_t * (sign(c_t) + lambda * th_{t-1})
        m_t  <- beta2 * m_{t-1} + (1 - beta2) * g_t
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize=False, foreach=None):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                                  "maximize": maximize})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eta, lam = float(group["lr"]), group["weight_decay"]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                g = -theta.grad if group["maximize"] else theta.grad
                state = self.state[theta]
                if not state:
                    state["exp_avg"] = torch.zeros_like(theta)
                m = state["exp_avg"]
                c = beta1 * m + (1 - beta1) * g
                theta.copy_(theta - eta * (torch.sign(c) + lam * theta))
                m.copy_(beta2 * m + (1 - beta2) * g)


class PaperLAMB(torch.optim.Optimizer):
    """You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2 (LAMB), with
    phi the identity and the ratio taken as 1 where a norm is 0:

        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_t = m_t / (1 - beta1^t);  v_t = v_t / (1 - beta2^t)     (the bias correction)
        r_t = m_t / (sqrt(v_t) + eps)
        x_{t+1} = x_t - eta_t * phi(||x_t||) / ||r_t + lambda x_t|| * (r_t + lambda x_t)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction=True, *, maximize=False, foreach=None):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay,
                                  "bias_correction": bias_correction, "maximize": maximize})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eta, lam, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            for x in group["params"]:
                if x.grad is None:
                    continue
                g = -x.grad if group["maximize"] else x.grad
                state = self.state[x]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(x)
                    state["exp_avg_sq"] = torch.zeros_like(x)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.copy_(beta1 * m + (1 - beta1) * g)
                v.copy_(beta2 * v + (1 - beta2) * g * g)
                m_hat, v_hat = m, v
                if group["bias_correction"]:
                    m_hat = m / (1 - beta1**t)
                    v_hat = v / (1 - beta2**t)
                r = m_hat / (torch.sqrt(v_hat) + eps)
                u = r + lam * x
                x_norm, u_norm = x.double().norm().item(), u.double().norm().item()
                ratio = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
                x.copy_(x - eta * ratio * u)
