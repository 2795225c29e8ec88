"""
Continuous time for the Gaussian and bit-flip processes of diffusion.py (ModelConfig.continuous_time=True): t is
real in [0, T], abar(t) is the function the discrete tables sample, and the bound's sum over steps becomes an
integral over (1, T] whose integrand each process gives (VDM's for the Gaussian, the path KL of two jump processes
for the bit flips). Parameter-free and float64, like diffusion.py.
"""

import math

import torch

from diffusion import BitFlipDiffusion, GaussianDiffusion, abar_schedule


def abar_continuous(name, T):
    """abar(t) and d abar / dt for real t in [0, T] (float64 tensors in, float64 out): the function the discrete
    tables of abar_schedule sample at t = 0..T, where they are not clipped. cosine and sqrt: abar(t) = f(t/T) / f(0)
    (the discrete product of 1 - beta telescopes to that); linear: -log abar = 1000 int_0^u (1e-4 + 0.0199 v) dv =
    0.1 u + 9.95 u^2, the limit of the rescaled betas. Floored at the discrete chain's abar_T (its betas are
    clipped at 0.999, f(1) = 0 for cosine and < 0 for sqrt), where the slope is 0."""
    floor = float(abar_schedule(name, T)[-1])

    def schedule(t):
        u = t.double() / T
        if name == 'linear':
            a = torch.exp(-(0.1 * u + 9.95 * u ** 2))
            da = -a * (0.1 + 19.9 * u)
        elif name == 'cosine':
            k = math.pi / 2 / 1.008
            f0 = math.cos(0.008 * k) ** 2
            a = torch.cos((u + 0.008) * k) ** 2 / f0
            da = -torch.sin(2 * (u + 0.008) * k) * k / f0
        else:
            f0 = 1 - math.sqrt(1e-4)
            a = (1 - torch.sqrt(u + 1e-4)) / f0
            da = -0.5 / torch.sqrt(u + 1e-4) / f0
        low = a <= floor
        return torch.where(low, floor, a), torch.where(low, 0.0, da / T)
    return schedule


class ContinuousTime:
    """Mixin for a process class, in place of its DiscreteTime: t real in [0, T], abar(t) from abar_continuous
    instead of the table (which still holds abar at the integer times, for the time proposal's cells). Everything
    the process derives from abar_t
    holds for real s < t; the bound's sum over steps becomes an integral (the subclasses' kl_step / rate_kl)."""
    time_dtype = torch.float64

    def __init__(self, name, T):
        self.schedule = abar_continuous(name, T)
        super().__init__(self.schedule(torch.arange(T + 1, dtype=torch.float64))[0])

    def abar_of(self, t):
        return self.schedule(t)[0]


class ContinuousGaussianDiffusion(ContinuousTime, GaussianDiffusion):
    """GaussianDiffusion with t real in [0, T] (VDM, Kingma et al. 2021). The KL of one ancestral step
    from t to s is 0.5 (SNR_s - SNR_t) ||x0 - x0_hat||^2 (SNR = abar / (1 - abar)), so the sum over steps becomes

        L_inf = int_1^T 0.5 (-dSNR/dt) E_q ||x0 - x0_hat(x_t, t)||^2 dt,

    with the decoder at t = 1 and the prior at t = T as before. For an x0_hat that does not depend on t the integral
    over the cell (t - 1, t] is the discrete step's KL exactly; a network's x0_hat improves as t falls inside the
    cell, so L_inf is the limit the discrete bounds approach as the steps get finer. `kl_step(x0, x0_hat, t)` is
    the integrand at real t: averaged over t uniform in a cell it is that cell's term."""

    def kl_step(self, x0, x0_hat, t):
        """0.5 (-dSNR/dt) (x0 - x0_hat)^2 per element at real t, nats per unit of t; dSNR/dt = abar' / (1 - abar)^2."""
        a, da = (v.view(-1, *([1] * (x0.dim() - 1))) for v in self.schedule(t))
        return 0.5 * (-da / (1 - a) ** 2) * (x0.double() - x0_hat.double()) ** 2


class ContinuousBitFlipDiffusion(ContinuousTime, BitFlipDiffusion):
    """BitFlipDiffusion with t real in [0, T]: each bit flips at rate lambda(t) = -abar'(t) / (2 abar(t)), so that
    q(b_t != b_0) = (1 - abar_t) / 2 as before. The reverse process is a jump process too: in time dt a bit in
    state b flips with rate lambda(t) q_t(1 - b | b_0) / q_t(b | b_0), i.e. lambda r_s when b = b_0 and lambda r_d
    when it is not, r_s = (1 - abar_t) / (1 + abar_t) = 1 / r_d. The model's rate mixes the same over its clean
    ids; being linear in p(w | b_t) it needs only the marginal pi = P(b_0,k = b_t,k): lambda (pi r_s + (1 - pi) r_d).
    The sum of the discrete steps' KLs becomes the path KL of the two jump processes (Campbell et al. 2022):

        L_inf = int_1^T E_q sum_k [ R_model - R_true + R_true log(R_true / R_model) ] dt   (per bit k),

    decoder at t = 1 and prior at t = T as before; `rate_kl` is the integrand at real t."""

    def rate_kl(self, b0, b_t, p1, t):
        """sum over the bits of R_model - R_true + R_true log(R_true / R_model), nats per unit of t, per position;
        p1 = the model's P(b_0,k = 1 | b_t) (..., 16), float64."""
        a, da = (v.view(-1, *([1] * (b_t.dim() - 1))) for v in self.schedule(t))
        rate = -da / (2 * a)
        r_s = (1 - a) / (1 + a)
        up = b_t > 0.5
        pi = torch.where(up, p1, 1 - p1).clamp(0.0, 1.0)                   # model: P(clean bit = current bit)
        r_model = pi * r_s + (1 - pi) / r_s
        r_true = torch.where(b0 == b_t, r_s, 1 / r_s).expand_as(r_model)
        return (rate * (r_model - r_true + r_true * (r_true.log() - r_model.log()))).sum(-1)
