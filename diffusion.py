"""
The parameter-free maths of the diffusion families: noise schedules, the three forward processes in discrete and
continuous time, time draws and the bound's time proposal, the bit code and categorical draws. Float64 where
precision matters, no learned parameter: model.py's families import these and keep their networks, losses, samplers
and bounds beside each other.

The three processes have one shape: the marginal q(x_t | x_0) (`q_sample`), the posterior q(x_s | x_t, x_0) for
any s < t, the prior at the end of the chain, the likelihood of a noisy state under each clean token where the
family's decoder needs it, and the KL of one step of the bound against the model's reverse step, given the model's
output (`step_kl`: of an x0 estimate for the Gaussian, of logits over the ids for the bit flips).
  GaussianDiffusion  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t = 1..T        (embed, analog)
  BitFlipDiffusion   each bit flips with probability (1 - abar_t) / 2, t = 1..T      (bits)
  MaskSchedule       each token is [MASK] with probability 1 - alpha_t, t in [0, 1]  (mask)
The first two also run with t real in [0, T] (ModelConfig.continuous_time): ContinuousGaussianDiffusion and
ContinuousBitFlipDiffusion, whose bounds are integrals over t. The discrete-time bounds' sums over steps, and those
integrals, are importance-sampled with BoundTimeProposal.
"""

import math

import numpy as np
import torch
import torch.nn as nn

NUM_BITS = 16  # GPT-2's 50,257 ids < 2**16 = 65,536; a compact vocabulary needs fewer (code_bits)


# ----------------------------------------------------------------------------------------------------
# Randomness: float64 draws (the precision of categorical sampling changes the result, see MDLM sec. 4.2)

def rand(shape, generator, device):
    """Uniform [0, 1) in float64, drawn on the generator's device (a seeded CPU generator gives the same
    numbers on any device), else directly on `device` (no host-to-device copy in the training loop)."""
    gdev = generator.device if generator is not None else torch.device(device)
    return torch.rand(shape, generator=generator, device=gdev, dtype=torch.float64).to(device)


def randn(shape, generator, device):
    gdev = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float64).to(device)


def stream_seed(*parts):
    """A well-mixed 63-bit seed from integers, so (seed, rank, step) streams never collide or correlate."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]) >> 1


def check_draw_options(temperature, top_k, top_p):
    if not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1):
        raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: expected temperature >= 0 "
                         f"(0 = argmax), top_k >= 0 (0 = off) and 0 < top_p <= 1")


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Temperature, then keep the top_k largest logits (ties at the k-th value are kept) and the smallest set
    of most likely tokens whose mass reaches top_p."""
    logits = logits.double() / max(temperature, 1e-8)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float('-inf'))
    return logits


def draw_categorical(logits, generator, temperature=1.0, top_k=0, top_p=1.0, chunk=512):
    """One draw per row of `logits` (N, V) by inverse-CDF in float64; temperature 0 is argmax.

    Rows are processed in chunks so a large batch never holds an (N, V) float64 matrix at once.
    """
    check_draw_options(temperature, top_k, top_p)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i in range(0, logits.shape[0], chunk):
        rows = logits[i:i + chunk]
        if temperature == 0:
            out[i:i + chunk] = rows.argmax(-1)
            continue
        probs = filter_logits(rows, temperature, top_k, top_p).softmax(-1)
        u = rand((rows.shape[0], 1), generator, rows.device)
        cdf = probs.cumsum(-1)
        idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        out[i:i + chunk] = idx.clamp_max(rows.shape[1] - 1)
    return out


def categorical_mean(logp, table):
    """E_p[table[w]] under p = exp(logp), the vocabulary's log-probabilities: (..., V) x (V, D) -> (..., D)."""
    return logp.float().exp() @ table


def rounding_logits(x, table):
    """logit_v = -||x - c_v||^2 + ||x||^2 = 2 x.c_v - ||c_v||^2 over the rows c_v of table: ||x||^2 is the same for
    every v, so dropping it changes neither the softmax nor the argmax. One GEMM, [x, 1] . [2 c_v, -||c_v||^2]: the
    (V-wide) output is written once. Float32, autocast off: in bf16 the cancellation between terms of size ~D costs
    ~0.5 logits."""
    with torch.autocast(x.device.type, enabled=False):
        E = table.float()
        flat = x.float().reshape(-1, x.shape[-1])
        lhs = torch.cat([flat, torch.ones_like(flat[:, :1])], -1)
        return (lhs @ torch.cat([2 * E, -(E * E).sum(-1, keepdim=True)], -1).t()).view(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------------
# Noise schedules and the three processes

def abar_schedule(name, T):
    """alpha-bar_t for t = 0..T (float64, abar_0 = 1): the fraction of signal variance left at step t.

    linear: betas linear in [1e-4, 0.02] * 1000/T (DDPM, rescaled so any T spans the same noise range);
    cosine: abar(u) = cos^2((u + 0.008)/1.008 * pi/2) (Nichol & Dhariwal);  sqrt: abar(u) = 1 - sqrt(u + 1e-4)
    (Diffusion-LM), with u = t/T. Betas are clipped at 0.999 so the chain stays invertible near t = T.
    """
    u = torch.arange(T + 1, dtype=torch.float64) / T
    if name == 'linear':
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64).clamp(max=0.999)
    else:
        f = (lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2) if name == 'cosine' else \
            (lambda u: 1 - torch.sqrt(u + 1e-4))
        a = f(u)
        betas = (1 - a[1:] / a[:-1]).clamp(min=0.0, max=0.999)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


class DiscreteTime:
    """The time of a process with a schedule table: t = 0..T indexes abar (float64); abar_dev is the same table on
    the model's device (the family's _apply keeps it there). ContinuousTime replaces both."""
    time_dtype = torch.long  # t is a step index

    def __init__(self, abar):
        self.abar, self.abar_dev, self.T = abar, abar, len(abar) - 1

    def abar_of(self, t):
        return self.abar_dev[t]


class GaussianDiffusion(DiscreteTime):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t = 0..T, and everything derived from it.

    Holds the schedule in float64; `at(t, x)` gathers abar_t per sample, in float64, shaped to broadcast on x.
    Coefficients are formed in float64 and cast to x's dtype only at the end (1 - abar_1 ~ 1e-3 must not be
    rounded away).
    """

    def __init__(self, abar):
        super().__init__(abar)
        # Python floats, so the compiled graph holds constants rather than syncing on .item()
        self.abar_1, self.abar_T = float(abar[1]), float(abar[-1])

    def at(self, t, x):
        return self.abar_of(t).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        a = self.at(t, x0)
        return a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * noise

    def x0_from_eps(self, x_t, t, eps):
        a = self.at(t, x_t)
        return (x_t - (1 - a).sqrt().to(x_t.dtype) * eps) * a.rsqrt().to(x_t.dtype)

    def eps_from_x0(self, x_t, t, x0):
        a = self.at(t, x_t)
        return (x_t - a.sqrt().to(x_t.dtype) * x0) * (1 - a).rsqrt().to(x_t.dtype)

    def q_posterior(self, x0, x_t, t, s):
        """Mean and variance of q(x_s | x_t, x_0) for any s < t (s = t - 1 is DDPM's posterior).

        With abar_{t|s} = abar_t / abar_s:  var = (1 - abar_s)(1 - abar_{t|s}) / (1 - abar_t),
        mean = sqrt(abar_s)(1 - abar_{t|s}) / (1 - abar_t) x_0 + sqrt(abar_{t|s})(1 - abar_s) / (1 - abar_t) x_t.
        """
        a_t, a_s = self.at(t, x_t), self.at(s, x_t)
        a_ts = a_t / a_s
        c0 = (a_s.sqrt() * (1 - a_ts) / (1 - a_t)).to(x_t.dtype)
        ct = (a_ts.sqrt() * (1 - a_s) / (1 - a_t)).to(x_t.dtype)
        var = (1 - a_s) * (1 - a_ts) / (1 - a_t)
        return c0 * x0 + ct * x_t, var.to(x_t.dtype)

    def ddpm_step(self, x0_hat, x_t, t, s, noise):
        """Ancestral step: x_s ~ q(x_s | x_t, x_0 = x0_hat)."""
        mean, var = self.q_posterior(x0_hat, x_t, t, s)
        return mean + var.sqrt() * noise

    def ddim_step(self, x0_hat, x_t, t, s, eta, noise):
        """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z,

        sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s); eta = 0 is deterministic and
        eta = 1 gives exactly the ancestral (posterior) variance of ddpm_step.
        """
        a_t, a_s = self.at(t, x_t), self.at(s, x_t)
        eps = self.eps_from_x0(x_t, t, x0_hat)
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt()
        c_eps = (1 - a_s - sigma ** 2).clamp(min=0).sqrt()
        dt = x_t.dtype
        return a_s.sqrt().to(dt) * x0_hat + c_eps.to(dt) * eps + sigma.to(dt) * noise

    def token_loglik(self, x_t, a, table, dtype=torch.float32, add_to=None):
        """log q(x_t | w) = log N(x_t; sqrt(a) c_w, (1 - a) I) for every row c_w of table (V, D), up to a constant
        per position: (2 sqrt(a) x_t.c_w - a ||c_w||^2) / (2 (1 - a)); a = abar_t, a float or a float64 tensor
        shaped to broadcast on x_t. With add_to (dtype, shaped (..., V)), the term is added to it in place and it is
        returned. Autocast off: the term reaches ~1e3 nats, whose differences bf16 would lose."""
        a = torch.as_tensor(a, dtype=torch.float64, device=x_t.device)
        B, D = x_t.shape[0], x_t.shape[-1]
        assert a.numel() in (1, B), (a.shape, x_t.shape)  # one abar for all, or one per row of x_t (shaped (B, 1, ...))
        a = a.reshape(-1, 1, 1).expand(B, 1, 1)
        with torch.autocast(x_t.device.type, enabled=False):
            E = table.to(dtype)
            # [sqrt(a) x_t / (1 - a), -a / (2 (1 - a))] . [c_w, ||c_w||^2]: one GEMM of D + 1 columns writes the
            # (V-wide) output once, with no separate scale, bias or add
            x = (a.sqrt() / (1 - a)).to(dtype) * x_t.to(dtype).reshape(B, -1, D)
            lhs = torch.cat([x, (-(a / (2 * (1 - a)))).to(dtype).expand(B, x.shape[1], 1)], -1)
            rhs = torch.cat([E, (E * E).sum(-1, keepdim=True)], -1).t().expand(B, -1, -1)
            if add_to is None:
                return torch.bmm(lhs, rhs).view(*x_t.shape[:-1], E.shape[0])
            assert add_to.shape == (B, x.shape[1], E.shape[0]), (add_to.shape, x_t.shape)
            return add_to.baddbmm_(lhs, rhs)

    def prior_kl(self, x0):
        """KL(q(x_T | x_0) || N(0, I)) per element, in nats, in x0's dtype (coefficients in float64)."""
        a = self.abar_T
        return 0.5 * (a * x0 ** 2 + (1 - a) - 1 - math.log1p(-a))

    def step_kl(self, x0, x0_hat, t):
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) per element, in nats, where p is the posterior at
        x0_hat with the same variance: ||mu(x0) - mu(x0_hat)||^2 / (2 var) and mu is linear in x0 with
        coefficient c = sqrt(abar_{t-1}) (1 - abar_t/abar_{t-1}) / (1 - abar_t), so KL = c^2 (x0 - x0_hat)^2 / (2 var).
        """
        a_t, a_s = self.at(t, x0), self.at(t - 1, x0)
        c = a_s.sqrt() * (1 - a_t / a_s) / (1 - a_t)
        var = (1 - a_s) * (1 - a_t / a_s) / (1 - a_t)
        return c ** 2 * (x0.double() - x0_hat.double()) ** 2 / (2 * var)


def log_q_bits(b, q1):
    """log q(b_k) per bit of a code b (0/1) under independent bits with q(b_k = 1) = q1, floored off log(0)."""
    return torch.where(b > 0.5, q1, 1 - q1).clamp_min(torch.finfo(q1.dtype).tiny).log()


class BitFlipDiffusion(DiscreteTime):
    """Each bit of a 16-bit code flips independently: q(b_t != b_0) = (1 - abar_t) / 2, so at t = T the bits are
    uniform. Between any s < t a bit flips with probability (1 - abar_t/abar_s) / 2. Bits are 0/1 floats."""

    def stay_prob(self, t, s, like):
        """P(bit unchanged from time s to time t) = (1 + abar_t / abar_s) / 2, shaped to broadcast on `like`."""
        return ((1 + self.abar_of(t) / self.abar_of(s)) / 2).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, b0, t, generator=None):
        """Flip each bit of b0 (0/1) with probability (1 - abar_t) / 2."""
        flip = rand(b0.shape, generator, b0.device) >= self.stay_prob(t, torch.zeros_like(t), b0)
        return (b0.long() ^ flip.long()).to(b0.dtype)

    def posterior_prob_one(self, b_t, p0, t, s):
        """P(b_s = 1 | b_t) when P(b_0 = 1) = p0 (0/1 for the exact posterior, a model's marginal otherwise):

        q(b_s = 1 | b_t, b_0) = q(b_t | b_s = 1) q(b_s = 1 | b_0) / sum over b_s, mixed over b_0 with p0.
        """
        stay_st = self.stay_prob(t, s, b_t)                    # s -> t
        stay_0s = self.stay_prob(s, torch.zeros_like(s), b_t)  # 0 -> s
        like1 = torch.where(b_t > 0.5, stay_st, 1 - stay_st)   # q(b_t | b_s = 1)
        like0 = 1 - like1                                      # q(b_t | b_s = 0)
        post_given = []
        for b0 in (1.0, 0.0):
            prior1 = stay_0s if b0 == 1.0 else 1 - stay_0s     # q(b_s = 1 | b_0)
            post_given.append(like1 * prior1 / (like1 * prior1 + like0 * (1 - prior1)))
        return p0 * post_given[0] + (1 - p0) * post_given[1]

    def bit_logliks(self, b_s, b_t, t, s, dtype=torch.float64):
        """log q(b_s,k | b_t,k, b_0,k = 1) and the same given b_0,k = 0, per bit: two (..., 16) tables."""
        tiny = torch.finfo(dtype).tiny  # log(0) would make -inf x 0 = nan in the matmuls that use these
        up = b_s > 0.5
        post1 = self.posterior_prob_one(b_t, torch.ones_like(b_t), t, s).to(dtype)   # P(b_s,k=1 | b_t, b_0,k=1)
        post0 = self.posterior_prob_one(b_t, torch.zeros_like(b_t), t, s).to(dtype)  # P(b_s,k=1 | b_t, b_0,k=0)
        return (torch.where(up, post1, 1 - post1).clamp_min(tiny).log(),
                torch.where(up, post0, 1 - post0).clamp_min(tiny).log())

    def joint_logprob(self, b_s, b_t, logits, codes, t, s, dtype=torch.float64):
        """log p(w | b_t) + log q(b_s | b_t, b_0 = codes[w]) for every id w, p(w | b_t) = softmax(logits): (..., V),
        one (k x V) matmul per position. Its logsumexp over w is log p(b_s | b_t) (transition_logprob)."""
        log_if1, log_if0 = self.bit_logliks(b_s, b_t, t, s, dtype)
        codes = codes.to(dtype)
        return logits.to(dtype).log_softmax(-1) + log_if1 @ codes.t() + log_if0 @ (1 - codes).t()

    def transition_logprob(self, b_s, b_t, logits, codes, t, s, dtype=torch.float64):
        """log p(b_s | b_t) = log sum_w p(w | b_t) prod_k q(b_s,k | b_t,k, b_0,k = bit_k(w)) per position, the
        model's transition (D3PM's x0-parameterisation): the bits of a token stay correlated through w, which a
        product of per-bit marginals would lose."""
        return torch.logsumexp(self.joint_logprob(b_s, b_t, logits, codes, t, s, dtype), -1)

    def step_kl(self, b0, b_t, logits, codes, t, generator=None, dtype=torch.float64, near=True):
        """KL(q(b_{t-1} | b_t, b_0) || p(b_{t-1} | b_t)) per position, in nats, estimated without bias, p the
        transition above. q, a product over the k bits, puts almost all its mass on its mode m and the k codes m^j
        one flip away (S: 17 codes for GPT-2's 16 bits); near=True sums those 17 terms exactly and draws the rest:
        KL = sum_{b in S} q(b) log(q(b) / p(b)) + E_{b ~ q}[1{b not in S} log(q(b) / p(b))]. The one-draw estimate
        (near=False, what training records) is heavy-tailed: a surprising draw costs ~-log p(w | b_t), tens of nats."""
        q1 = self.posterior_prob_one(b_t, b0, t, t - 1).to(dtype)  # q(b_{t-1},k = 1 | b_t, b_0) per bit
        b_draw = (rand(q1.shape, generator, q1.device) < q1).to(dtype)
        if not near:
            return log_q_bits(b_draw, q1).sum(-1) - self.transition_logprob(b_draw, b_t, logits, codes, t, t - 1, dtype)
        mode = (q1 > 0.5).to(dtype)
        kl = self.kl_on_mode_and_neighbours(mode, q1, b_t, logits, codes, t, dtype)
        # the rest, one draw: log q(b) / p(b) where the draw left S (2+ bits from the mode; p needed only there)
        far = (b_draw != mode).sum(-1) > 1
        t_far = t.view(-1, *([1] * (far.dim() - 1))).expand(far.shape)[far]
        log_q_far = log_q_bits(b_draw[far], q1[far]).sum(-1)
        log_p_far = self.transition_logprob(b_draw[far], b_t[far], logits[far], codes, t_far, t_far - 1, dtype)
        return kl.index_put((far,), kl[far] + log_q_far - log_p_far)

    def kl_on_mode_and_neighbours(self, mode, q1, b_t, logits, codes, t, dtype):
        """sum_{b in S} q(b) log(q(b) / p(b)) over S = the mode m of q and its one-flip neighbours m^j, exactly. With
        a_w = p(w | b_t) q(m | b_t, codes[w]) (joint_logprob), p(m) = sum_w a_w; flipping bit j scales a_w by r1_j =
        q(1 - m_j | b_t, b_0,j = 1) / q(m_j | b_t, b_0,j = 1) if bit_j(w) = 1, else by r0_j (the same given 0), so
        p(m^j) = r1_j sum_{bit_j(w)=1} a_w + r0_j sum_{bit_j(w)=0} a_w: two matmuls for all k neighbours."""
        a = self.joint_logprob(mode, b_t, logits, codes, t, t - 1, dtype)
        top = a.amax(-1, keepdim=True)
        e = (a - top).exp()                                                          # a_w / max_w a_w
        codes = codes.to(dtype)
        log_s1, log_s0 = (e @ codes).log(), (e @ (1 - codes)).log()                 # (..., k)
        keep1, keep0 = self.bit_logliks(mode, b_t, t, t - 1, dtype)
        flip1, flip0 = self.bit_logliks(1 - mode, b_t, t, t - 1, dtype)
        log_p_mode = top.squeeze(-1) + e.sum(-1).log()
        log_p_flip = top + torch.logaddexp(log_s1 + flip1 - keep1, log_s0 + flip0 - keep0)  # (..., k): p(m^j)
        log_q = log_q_bits(mode, q1)
        log_q_mode = log_q.sum(-1)
        log_q_flip = log_q_mode.unsqueeze(-1) - log_q + log_q_bits(1 - mode, q1)     # (..., k): q(m^j)
        return log_q_mode.exp() * (log_q_mode - log_p_mode) + (log_q_flip.exp() * (log_q_flip - log_p_flip)).sum(-1)

    def prior_kl(self, num_bits):
        """KL(q(b_T | b_0) || uniform) of `num_bits` bits (one code), in nats (the same for every b_0)."""
        m = (1 + float(self.abar[-1])) / 2
        return num_bits * (m * math.log(2 * m) + (1 - m) * math.log(2 * (1 - m)) if m < 1 else 0.0)

    def code_loglik(self, b_t, t, codes):
        """log q(b_t | w) for every row of codes (V, 16), up to a constant per position:
        n_agree log(stay_t) + (16 - n_agree) log(1 - stay_t) = logit(stay_t) (s_t . s_w) / 2 + const, s = 2b - 1.
        Float32, autocast off."""
        stay = self.stay_prob(t, torch.zeros_like(t), b_t)
        half_logit = (0.5 * (stay.log() - (1 - stay).log())).float()
        with torch.autocast(b_t.device.type, enabled=False):
            return half_logit * ((2 * b_t.float() - 1) @ (2 * codes.float() - 1).t())


class MaskSchedule:
    """Absorbing-state masking (MDLM): a token is still clean at time t in [0, 1] with probability alpha_t,
    [MASK] otherwise; at t = 1 every token is masked, so the prior term is zero."""

    def __init__(self, name):
        self.name = name

    def alpha(self, t):
        """Probability that a token is still clean at time t: 1 - t (loglinear) or cos(pi t / 2)."""
        return 1 - t if self.name == 'loglinear' else torch.cos(math.pi / 2 * t)

    def time_of_mask_rate(self, u):
        """Inverse of u = 1 - alpha_t."""
        return u if self.name == 'loglinear' else (2 / math.pi) * torch.acos(1 - u)

    def random_subset(self, B, L, generator, device, stratified):
        """Per row, m ~ U{1..L} (stratified: the B draws share one uniform shift of a regular grid) and a uniform
        subset of m of the L positions: (masked (B, L) bool, m (B,))."""
        u = rand((B,), generator, device)
        if stratified:
            u = (u[:1] + torch.arange(B, device=device, dtype=torch.float64) / B) % 1.0
        m = 1 + (u * L).floor().long().clamp(max=L - 1)
        return rand((B, L), generator, device).argsort(1).argsort(1) < m[:, None], m

    def time_given_count(self, m, L, generator, device):
        """A time t whose mask rate 1 - alpha_t is drawn from its posterior given m of L tokens masked,
        Beta(m, L - m + 1), from two gamma draws on the generator's device (float32, on `device`)."""
        gdev = generator.device if generator is not None else device
        g1 = torch._standard_gamma(m.double().to(gdev), generator=generator)
        g2 = torch._standard_gamma((L - m + 1).double().to(gdev), generator=generator)
        return self.time_of_mask_rate((g1 / (g1 + g2)).to(device)).float()

    def reveal_prob(self, t, s):
        """q(token clean at s | masked at t) = (alpha_s - alpha_t) / (1 - alpha_t) for s < t (Python floats)."""
        a_t = self.alpha(torch.tensor(t, dtype=torch.float64))
        a_s = self.alpha(torch.tensor(s, dtype=torch.float64))
        return 1.0 if s == 0 else float((a_s - a_t) / (1 - a_t))


# ----------------------------------------------------------------------------------------------------
# Continuous time (continuous_time=True): t real in [0, T], abar(t) the function the discrete tables sample,
# the bound's sum over steps an integral over (1, T] whose integrand each process gives

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
    holds for real s < t; the bound's sum over steps becomes an integral (the subclasses' step_kl / rate_kl)."""
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
    cell, so L_inf is the limit the discrete bounds approach as the steps get finer. `step_kl(x0, x0_hat, t)` is
    the integrand at real t: averaged over t uniform in a cell it is that cell's term."""

    def step_kl(self, x0, x0_hat, t):
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


# ----------------------------------------------------------------------------------------------------
# Time draws: training's stratified t, and the bounds' proposal over steps (an nn.Module for its buffers
# alone, whose statistics travel in checkpoints as a family's `time_proposal.*` entries)

def stratified_times(n, T, generator, device, low=1, continuous=False):
    """Low-discrepancy draw of n times: one uniform shift of a regular grid, integers in [low, T] (or reals in
    (low - 1, T] with continuous=True)."""
    u = (rand((1,), generator, device) + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
    if continuous:  # not below 1e-6: at t -> 0, 1 - abar_t rounds to 0 and the flip odds and SNR become infinite
        return (T - u * (T - low + 1)).clamp(min=1e-6)
    return (low + (u * (T - low + 1)).floor().long()).clamp(max=T)


def log_snr_drop_proposal(abar):
    """A time proposal for t = 2..T (index t - 2) from the schedule alone: half uniform, half proportional to
    log SNR_{t-1} - log SNR_t. A trained model's KL_t ~ (SNR_{t-1} - SNR_t) mmse_t follows that drop."""
    T = len(abar) - 1
    log_snr = torch.log(abar[1:]) - torch.log1p(-abar[1:].clamp(max=1 - 1e-12))  # t = 1..T
    drop = (log_snr[:-1] - log_snr[1:]).clamp(min=0)
    return 0.5 * drop / drop.sum() + 0.5 / (T - 1)


class BoundTimeProposal(nn.Module):
    """The proposal q(t), t = 2..T, for the importance-sampled sum over the steps of a discrete-time bound, adapted
    to the model's own terms (improved-diffusion's second-moment resampler).

    Training records each sequence's term KL_t (nats/token) as a running mean of KL_t^2 in `bins` bins of t. The
    variance of KL_t / q(t) is smallest for q(t) ~ sqrt(E[KL_t^2]) (Nichol & Dhariwal 2021, sec. 3.3): q is that
    level per bin, shaped inside it by the schedule's proposal, and mixed with that proposal (weight `floor`) so
    no step is starved and KL_t / q(t) stays bounded; until every bin has `warm` values, the schedule's alone.
    The statistics are buffers: they travel in checkpoints (and the EMA copies them). In continuous time (an
    integral over (1, T]) step t is the cell (t - 1, t], and a draw is a real time uniform inside the cell drawn."""

    def __init__(self, abar, bins=50, decay=0.99, warm=10, floor=0.1, continuous=False):
        super().__init__()
        T = len(abar) - 1
        self.T, self.bins, self.decay, self.warm, self.floor = T, min(bins, T - 1), decay, warm, floor
        self.continuous = continuous
        self.register_buffer('base', log_snr_drop_proposal(abar), persistent=False)
        self.register_buffer('bin_of', (torch.arange(T - 1) * self.bins) // (T - 1), persistent=False)  # t - 2 -> bin
        self.register_buffer('m2', torch.zeros(self.bins, dtype=torch.float64))
        self.register_buffer('count', torch.zeros(self.bins, dtype=torch.float64))

    @torch.no_grad()
    def update(self, t, kl):
        """Record per-sequence terms kl (B,) at times t (B,); sequences at t = 1 (the decoder's step) are skipped. A
        real t (continuous time) counts in the cell (t - 1, t] that holds it."""
        if t.is_floating_point():
            t = t.ceil().long()
        keep = (t >= 2) & torch.isfinite(kl)
        b = self.bin_of[(t - 2).clamp(min=0)]
        n = torch.zeros_like(self.count).index_add_(0, b, keep.double())
        s = torch.zeros_like(self.m2).index_add_(0, b, torch.where(keep, kl.double() ** 2, 0.0))
        hit = n > 0
        # a running mean over the first 1/(1 - decay) values of a bin, an exponential average after
        w = torch.where(hit, torch.maximum(n / (self.count + n), torch.full_like(n, 1 - self.decay)), 0.0)
        self.m2.copy_((1 - w) * self.m2 + w * s / n.clamp(min=1))
        self.count.add_(n)

    def probs(self):
        """q(t) for t = 2..T, float64, summing to 1."""
        if bool((self.count < self.warm).any()):
            return self.base
        level = self.m2.sqrt()[self.bin_of]
        mass_in_bin = torch.zeros(self.bins, dtype=torch.float64, device=self.base.device).index_add_(
            0, self.bin_of, self.base)[self.bin_of]
        adapted = level * self.base / mass_in_bin
        adapted = adapted / adapted.sum()
        return (1 - self.floor) * adapted + self.floor * self.base

    def draw(self, n, generator, device):
        """n times t in 2..T drawn from q by inverse CDF (float64, any generator device) and q(t) of each; in
        continuous time, t - U[0, 1): a real time in the cell, whose density is q(t) too."""
        q = self.probs().to(device)
        cdf = q.cumsum(0)
        idx = torch.searchsorted(cdf, rand((n,), generator, device) * cdf[-1], right=True).clamp(max=self.T - 2)
        return (idx + 2 - rand((n,), generator, device) if self.continuous else idx + 2), q[idx]


# ----------------------------------------------------------------------------------------------------
# The bit code (bits, analog)

def code_bits(vocab_size):
    """Bits of the code of ids 0..vocab_size-1: 16 for GPT-2's 50,257, 13 for a compact vocabulary of 8k."""
    return max(1, (vocab_size - 1).bit_length())


def ids_to_bits(idx, num_bits=NUM_BITS):
    """Token ids -> num_bits bits, most significant first: bit k of id is (id >> (num_bits - 1 - k)) & 1."""
    shifts = torch.arange(num_bits - 1, -1, -1, device=idx.device)
    return (idx.unsqueeze(-1) >> shifts) & 1


def bits_to_ids(bits):
    """The inverse of ids_to_bits: a code of k bits (0/1, or booleans; k = the last dim) -> the integer it spells,
    in [0, 2**k)."""
    shifts = torch.arange(bits.shape[-1] - 1, -1, -1, device=bits.device)
    return (bits.long() << shifts).sum(-1)


def valid_codes(vocab_size):
    """The bit codes of the valid ids 0..vocab_size-1 as a (V, code_bits(V)) 0/1 float table (the bit families keep
    it as a buffer, so it lives on their device)."""
    return ids_to_bits(torch.arange(vocab_size), code_bits(vocab_size)).float()
