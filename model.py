"""
The shared transformer backbone and every model family of the project.

Read it in three parts, DiT-style: the network (a transformer whose blocks are modulated by a time
embedding through adaLN-zero), the processes (the Gaussian schedule maths, bit flips, masking), and the
families (`embed`, `bits`, `analog`, `mask`, `ar`), each of which says what goes into the network, what
comes out, the training loss, the sampler step and the likelihood bound. The sampling loop skeleton is
shared by all five (DiffusionLM.sample).

Conventions: token ids are GPT-2 BPE ids (50,257 of them, 50256 = <|endoftext|>). Time is discrete,
t = 1..T, for the Gaussian and bit families (abar_0 = 1 is the clean data) and continuous in [0, 1]
for `mask`; the network always sees t normalised to [0, 1]. Likelihoods are reported in bits per token.
"""

import functools
import math
import os
import tempfile
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_TYPES = ('embed', 'bits', 'analog', 'mask', 'ar')
NUM_BITS = 16  # 50,257 GPT-2 ids < 2**16 = 65,536


@dataclass
class ModelConfig:
    model_type: str = 'embed'        # embed | bits | analog | mask | ar (see DESIGN.md)
    vocab_size: int = 50257          # real vocabulary (GPT-2); embedding tables are padded to a multiple of 64
    block_size: int = 256            # sequence length the network sees
    n_layer: int = 6                 # transformer blocks
    n_head: int = 6                  # attention heads
    n_embd: int = 384                # model width
    dropout: float = 0.0             # dropout in attention and MLP (0 for pretraining)
    bias: bool = True                # biases in Linear layers
    rotary: bool = False             # rotary position embedding instead of a learned absolute one
    T: int = 1000                    # diffusion steps of the discrete-time process (embed, bits, analog)
    noise_schedule: str = 'cosine'   # beta schedule: linear | cosine | sqrt (embed, bits, analog)
    predict: str = 'x0'              # embed: the network predicts eps or x0
    embed_dim: int = 64              # embed: width of the diffused token embedding (projected to n_embd)
    self_cond: bool = True           # embed/analog: feed the previous estimate of x0 back (self-conditioning)
    cfg_drop: float = 0.0            # embed: >0 trains a prompt-condition channel, dropped with this rate (CFG)
    analog_scale: float = 1.0        # analog: bits are mapped to -scale / +scale
    mask_schedule: str = 'loglinear' # mask: alpha_t = 1 - t (loglinear) or cos(pi t / 2) (cosine)
    time_cond: bool = False          # mask: condition the network on t (MDLM's default is off)

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")
        need(self.model_type in MODEL_TYPES, f"model_type={self.model_type!r}, expected one of {MODEL_TYPES}")
        need(self.vocab_size >= 2, f"vocab_size={self.vocab_size}, expected >= 2")
        need(self.block_size >= 1, f"block_size={self.block_size}, expected >= 1")
        need(self.n_layer >= 1 and self.n_head >= 1, "n_layer and n_head must be >= 1")
        need(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        need(not self.rotary or (self.n_embd // self.n_head) % 2 == 0, "rotary needs an even head size")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout}, expected in [0, 1)")
        need(self.T >= 2, f"T={self.T}, expected >= 2")
        need(self.noise_schedule in ('linear', 'cosine', 'sqrt'),
             f"noise_schedule={self.noise_schedule!r}, expected linear | cosine | sqrt")
        need(self.predict in ('eps', 'x0'), f"predict={self.predict!r}, expected eps | x0")
        need(self.predict == 'x0' or self.model_type == 'embed', "predict='eps' is only for model_type='embed'")
        need(self.embed_dim >= 1, f"embed_dim={self.embed_dim}, expected >= 1")
        need(0.0 <= self.cfg_drop < 1.0, f"cfg_drop={self.cfg_drop}, expected in [0, 1)")
        need(self.cfg_drop == 0.0 or self.model_type == 'embed', "cfg_drop (guidance) is only for model_type='embed'")
        need(self.analog_scale > 0, f"analog_scale={self.analog_scale}, expected > 0")
        need(self.mask_schedule in ('loglinear', 'cosine'),
             f"mask_schedule={self.mask_schedule!r}, expected loglinear | cosine")
        need(not self.time_cond or self.model_type == 'mask', "time_cond is a mask-family switch")
        need(self.model_type not in ('bits', 'analog') or self.vocab_size <= 2 ** NUM_BITS,
             f"vocab_size={self.vocab_size} does not fit in {NUM_BITS} bits")


# ----------------------------------------------------------------------------------------------------
# The network: DiT blocks (adaLN-zero) over a token sequence

def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with one (shift, scale) per sequence broadcast over positions."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP -> n_embd.

    features = [cos(1000 t omega_k), sin(1000 t omega_k)], omega_k = exp(-log(10000) k / (d/2)), k < d/2.
    t is normalised to [0, 1] so discrete (t/T) and continuous-time families share one embedder; the factor
    1000 makes the frequencies span the range DiT sees with integer timesteps 0..999.
    """

    def __init__(self, n_embd, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))

    @staticmethod
    def timestep_features(t, dim):
        half = dim // 2
        omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * omega[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_features(t, self.freq_dim))


def rotary_tables(positions, head_dim):
    """cos/sin tables of rotary position embedding for integer positions, shape (T, head_dim/2)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (x1, x2) of x (B, H, T, D) by the position angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, config, causal):
        super().__init__()
        self.n_head, self.causal, self.rotary = config.n_head, causal, config.rotary
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, pos_offset=0):
        B, L, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.rotary:
            cos, sin = rotary_tables(torch.arange(pos_offset, pos_offset + L, device=x.device), C // self.n_head)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = kv_cache is not None and kv_cache[0] is not None
        if kv_cache is not None:  # incremental decoding (ar): keys/values of earlier positions are kept
            if past:
                k, v = torch.cat([kv_cache[0], k], dim=2), torch.cat([kv_cache[1], v], dim=2)
            kv_cache[0], kv_cache[1] = k, v
        # with a cache, new queries sit after every cached key, so no mask is needed for one new token
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal and not past)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, L, C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class DiTBlock(nn.Module):
    """Pre-LN attention and MLP, each modulated (shift, scale) and gated by the conditioning vector c.

    The modulation layer is zero-initialised, so both gates start at 0 and the block is the identity.
    """

    def __init__(self, config, causal):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(config, causal)
        self.ln_2 = nn.LayerNorm(config.n_embd, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(config)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.n_embd, 6 * config.n_embd))

    def forward(self, x, c, kv_cache=None, pos_offset=0):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.ln_1(x), shift_a, scale_a), kv_cache, pos_offset)
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.ln_2(x), shift_m, scale_m))
        return x


class Backbone(nn.Module):
    """Positions + time conditioning + DiT blocks + final adaLN LayerNorm. Families own input and head.

    Without time conditioning (ar, and mask by default) the adaLN vector is a learned constant.
    """

    def __init__(self, config, causal=False, time_cond=True):
        super().__init__()
        self.config = config
        self.wpe = None if config.rotary else nn.Embedding(config.block_size, config.n_embd)
        self.t_embedder = TimestepEmbedder(config.n_embd) if time_cond else None
        # a generic non-zero constant: with c = 0 the adaLN weights would get no gradient (SiLU(0) = 0)
        self.c_const = None if time_cond else nn.Parameter(torch.randn(config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([DiTBlock(config, causal) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.n_embd, 2 * config.n_embd))

    def forward(self, h, t=None, kv_caches=None, pos_offset=0):
        B, L, _ = h.shape
        if pos_offset + L > self.config.block_size:
            raise ValueError(f"sequence of {pos_offset + L} positions exceeds block_size={self.config.block_size}")
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(pos_offset, pos_offset + L, device=h.device))
        c = self.t_embedder(t) if self.t_embedder is not None else self.c_const.to(h.dtype).expand(B, -1)
        h = self.drop(h)
        for i, block in enumerate(self.blocks):
            h = block(h, c, None if kv_caches is None else kv_caches[i], pos_offset)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        return modulate(self.ln_f(h), shift, scale)


def init_weights(module, n_layer):
    """nanoGPT init (N(0, 0.02), scaled residual projections), then zero the adaLN modulations (adaLN-zero)."""
    for name, p in module.named_parameters():
        if name.endswith('bias'):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith('c_proj.weight') else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
    for m in module.modules():
        if isinstance(m, (DiTBlock, Backbone)):
            last = m.adaLN_modulation[-1] if isinstance(m, DiTBlock) else m.final_modulation[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


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


def on_device(table, device, _cache={}):
    """A float64 schedule table on `device`, copied once per (table, device) rather than at every call."""
    key = (id(table), str(device))
    if key not in _cache or _cache[key][0] is not table:
        _cache[key] = (table, table.to(device))
    return _cache[key][1]


def in_eval_mode(method):
    """Run a method with the module in eval mode (no dropout), restoring the previous mode afterwards."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.train(was_training)
    return wrapper


def exact(method):
    """For nll(): no gradients, eval mode, and no autocast. The Gaussian bounds multiply every error in the x0
    estimate by SNR/2 (~1e4 near t = 1), so bf16 rounding alone would add bits per token."""
    @functools.wraps(method)
    @in_eval_mode
    def wrapper(self, idx, *args, **kwargs):
        with torch.no_grad(), torch.autocast(idx.device.type, enabled=False):
            return method(self, idx, *args, **kwargs)
    return wrapper


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


# ----------------------------------------------------------------------------------------------------
# Noise schedules and the Gaussian process (shared by embed and analog; abar also drives bit flips)

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


class GaussianDiffusion:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t = 0..T, and everything derived from it.

    Holds the schedule in float64; `at(t, x)` gathers abar_t per sample, in float64, shaped to broadcast on x.
    Coefficients are formed in float64 and cast to x's dtype only at the end (1 - abar_1 ~ 1e-3 must not be
    rounded away).
    """

    def __init__(self, abar):
        self.abar = abar
        self.T = len(abar) - 1

    def at(self, t, x):
        return on_device(self.abar, x.device)[t].view(-1, *([1] * (x.dim() - 1)))

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

    def t_proposal(self):
        """q(t) for t = 2..T (index t - 2): half uniform, half proportional to log SNR_{t-1} - log SNR_t."""
        log_snr = torch.log(self.abar[1:]) - torch.log1p(-self.abar[1:])  # t = 1..T
        drop = (log_snr[:-1] - log_snr[1:]).clamp(min=0)
        return 0.5 * drop / drop.sum() + 0.5 / (self.T - 1)

    def prior_kl(self, x0):
        """KL(q(x_T | x_0) || N(0, I)) per element, in nats, in x0's dtype (coefficients in float64)."""
        a = self.abar[self.T].item()
        return 0.5 * (a * x0 ** 2 + (1 - a) - 1 - math.log1p(-a))

    def kl_step(self, x0, x0_hat, t):
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) per element, in nats, where p is the posterior at
        x0_hat with the same variance: ||mu(x0) - mu(x0_hat)||^2 / (2 var) and mu is linear in x0 with
        coefficient c = sqrt(abar_{t-1}) (1 - abar_t/abar_{t-1}) / (1 - abar_t), so KL = c^2 (x0 - x0_hat)^2 / (2 var).
        """
        a_t, a_s = self.at(t, x0), self.at(t - 1, x0)
        c = a_s.sqrt() * (1 - a_t / a_s) / (1 - a_t)
        var = (1 - a_s) * (1 - a_t / a_s) / (1 - a_t)
        return c ** 2 * (x0.double() - x0_hat.double()) ** 2 / (2 * var)


def stratified_times(n, T, generator, device, low=1):
    """Low-discrepancy draw of n integer times in [low, T]: one uniform shift of a regular grid."""
    u = (rand((1,), generator, device) + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
    return (low + (u * (T - low + 1)).floor().long()).clamp(max=T)


# ----------------------------------------------------------------------------------------------------
# The shared skeleton of every family

class DiffusionLM(nn.Module):
    """Base of the families: parameter accounting, optimizer, MFU, and the sampling loop skeleton.

    A family implements `forward(idx) -> loss`, `nll(idx) -> bits/token per sequence` and the sampler hooks
    `init_state`, `time_grid`, `step`, `current_tokens`, `final_tokens`.
    """
    extra_tokens = 0        # windows are block_size + extra_tokens long (ar needs one more for its targets)
    sample_options = {}     # option -> default, the sampler knobs of the family
    lookup_only = ('backbone.wpe.weight',)  # tables only indexed, never multiplied (no FLOPs, not "model size")
    no_decay = ()           # matrices that must not be weight-decayed

    def __init__(self, config):
        super().__init__()
        self.config = config
        extra = 1 if config.model_type == 'mask' else 0  # room for the [MASK] id
        self.padded_vocab = ((config.vocab_size + extra + 63) // 64) * 64
        self.nfe = 0

    # -- accounting
    def get_num_params(self, non_embedding=True):
        skip = set(self.lookup_only) if non_embedding else set()
        return sum(p.numel() for n, p in self.named_parameters() if n not in skip)

    def flops_per_token(self):
        """6N for the matmuls (forward + backward) plus 12 L d T for attention scores and values. The
        conditioning path (time MLP, adaLN modulations) runs once per sequence, so it counts 1/block_size."""
        c = self.config
        per_seq = sum(p.numel() for n, p in self.named_parameters()
                      if any(k in n for k in ('t_embedder', 'adaLN_modulation', 'final_modulation', 'c_const')))
        per_tok = self.get_num_params() - per_seq
        return 6 * per_tok + 6 * per_seq / c.block_size + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (measured for the device, passed in)."""
        tokens = fwdbwd_per_iter * self.config.block_size
        return self.flops_per_token() * tokens / dt / peak_flops

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not biases, gains or the tables in `no_decay`)."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.dim() >= 2 and n not in self.no_decay]
        other = [p for n, p in params if not (p.dim() >= 2 and n not in self.no_decay)]
        groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': other, 'weight_decay': 0.0}]
        fused = device_type == 'cuda'
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))

    # -- sampling skeleton
    default_steps = None
    max_steps = None

    def check_sample_args(self, length, steps, options):
        unknown = sorted(set(options) - set(self.sample_options))
        if unknown:
            raise ValueError(f"model_type={self.config.model_type!r} has no sampling option(s) {unknown}; "
                             f"its options are {sorted(self.sample_options)}")
        if not 1 <= length <= self.config.block_size:
            raise ValueError(f"length={length} must be in [1, block_size={self.config.block_size}]")
        if steps is not None and not (isinstance(steps, int) and 1 <= steps <= self.max_steps):
            raise ValueError(f"steps={steps} out of range for model_type={self.config.model_type!r}: "
                             f"expected an integer in [1, {self.max_steps}]")
        return {**self.sample_options, **options}

    @torch.no_grad()
    @in_eval_mode
    def sample(self, num_samples, length, steps=None, fixed=None, generator=None, callback=None, **options):
        """Generate `num_samples` sequences of `length` tokens.

        fixed: LongTensor (num_samples or 1, length), -1 where free, else the token the output must hold
        (prefix prompts and infilling). callback(i, n, tokens) after each of the n steps with the current
        best guess (-1 where there is none yet). Afterwards self.nfe is the number of network evaluations.
        """
        opts = self.check_sample_args(length, steps, options)
        steps = self.default_steps if steps is None else steps
        device = next(self.parameters()).device
        if fixed is None:
            fixed = torch.full((num_samples, length), -1, dtype=torch.long, device=device)
        fixed = fixed.to(device).long().expand(num_samples, length).clone()
        if (fixed >= self.config.vocab_size).any():
            raise ValueError(f"fixed tokens must be ids < vocab_size={self.config.vocab_size}")
        self.nfe = 0
        state = self.init_state(num_samples, length, fixed, generator, opts)
        grid = self.time_grid(steps, fixed)
        for i, (t, s) in enumerate(grid):
            state = self.step(state, t, s, fixed, generator, opts)
            if callback is not None:
                callback(i, len(grid), torch.where(fixed >= 0, fixed, self.current_tokens(state)))
        return torch.where(fixed >= 0, fixed, self.final_tokens(state, generator, opts))

    def discrete_grid(self, steps):
        """`steps` pairs (t, s) of integer times from T down to 0, evenly spaced (DDIM's striding)."""
        ts = torch.linspace(self.config.T, 0, steps + 1).round().long().tolist()
        return list(zip(ts[:-1], ts[1:]))


# ----------------------------------------------------------------------------------------------------
# Bit code shared by bits and analog

def ids_to_bits(idx):
    """Token ids -> NUM_BITS bits, most significant first: bit k of id is (id >> (15 - k)) & 1."""
    shifts = torch.arange(NUM_BITS - 1, -1, -1, device=idx.device)
    return (idx.unsqueeze(-1) >> shifts) & 1


def bits_to_ids(bits):
    shifts = torch.arange(NUM_BITS - 1, -1, -1, device=bits.device)
    return (bits.long() << shifts).sum(-1)


def valid_id_logprobs(bit_logits, vocab_size):
    """log p(id) for the valid ids 0..vocab_size-1 from independent per-bit logits (..., 16) -> (..., V).

    log p(id) = sum_k log sigmoid(+-logit_k) (sign from bit k of id), renormalised over the valid ids, so
    the mass the bits put on the invalid codes vocab_size..65535 is removed rather than silently lost.
    With log sigmoid(l) - log sigmoid(-l) = l this is sum_k log sigmoid(-l_k) + code . l: one matmul, in float64
    (autocast leaves float64 alone; bf16 would blur ids that differ in one low bit).
    """
    codes = valid_codes(vocab_size, bit_logits.device)  # (V, 16) float64
    logits = bit_logits.double()
    logp = F.logsigmoid(-logits).sum(-1, keepdim=True) + logits @ codes.t()
    return logp.log_softmax(-1)


@functools.lru_cache(maxsize=8)
def valid_codes(vocab_size, device):
    return ids_to_bits(torch.arange(vocab_size, device=device)).double()


def bit_token_nll(bit_logits, idx, vocab_size, chunk=1024):
    """-log p(idx) in nats under the valid-id distribution, computed in row chunks (no (N, V) at once)."""
    flat_l, flat_i = bit_logits.reshape(-1, NUM_BITS), idx.reshape(-1)
    out = torch.empty(flat_i.shape, dtype=torch.float64, device=idx.device)
    for i in range(0, flat_i.numel(), chunk):
        lp = valid_id_logprobs(flat_l[i:i + chunk], vocab_size)
        out[i:i + chunk] = -lp.gather(1, flat_i[i:i + chunk, None]).squeeze(1).double()
    return out.view(idx.shape)


def bit_decode(bit_logits, vocab_size, generator=None, temperature=0.0, chunk=1024):
    """Ids drawn (or argmax with temperature 0) from the valid-id distribution; never an invalid code."""
    flat = bit_logits.reshape(-1, NUM_BITS)
    out = torch.cat([draw_categorical(valid_id_logprobs(flat[i:i + chunk], vocab_size), generator, temperature)
                     for i in range(0, flat.shape[0], chunk)])
    return out.view(bit_logits.shape[:-1])


# ----------------------------------------------------------------------------------------------------
# Gaussian families: embed (token embeddings) and analog (bits as +-scale)

class GaussianLM(DiffusionLM):
    """Shared loss, sampler and bound of the families whose state is continuous under GaussianDiffusion.

    A subclass defines: clean(idx) -> x0 (B, L, D); predict(x_t, t, x0_sc, cond) -> (x0_hat, out) where out is
    the raw head output; round_tokens(x0_hat, out) -> ids; decoder_nll(x0_hat, out, idx) -> nats (B, L);
    denoising_loss(out, x0, noise, idx, x0_hat) -> scalar.
    """
    def __init__(self, config):
        super().__init__(config)
        self.diffusion = GaussianDiffusion(abar_schedule(config.noise_schedule, config.T))
        self.default_steps = self.max_steps = config.T

    def denoise(self, x_t, t, cond=None, x0_sc=None):
        """x0 estimate at (x_t, t); with self-conditioning and no previous estimate, a first pass supplies it."""
        if self.config.self_cond and x0_sc is None:
            x0_sc = self.predict(x_t, t, torch.zeros_like(x_t), cond)[0]
        if x0_sc is None:
            x0_sc = torch.zeros_like(x_t)
        return self.predict(x_t, t, x0_sc, cond)

    def forward(self, idx):
        B = idx.shape[0]
        x0 = self.clean(idx)
        t = stratified_times(B, self.config.T, None, idx.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        cond = self.training_condition(idx)
        x0_sc = torch.zeros_like(x_t)
        if self.config.self_cond and torch.rand(()) < 0.5:
            # half the batches see the stop-gradient estimate they would get at sampling time
            with torch.no_grad():
                x0_sc = self.predict(x_t, t, x0_sc, cond)[0].detach()
        x0_hat, out = self.predict(x_t, t, x0_sc, cond)
        return self.denoising_loss(out, x0, noise, idx, x0_hat)

    def training_condition(self, idx):
        return None

    # -- likelihood
    @exact
    def nll(self, idx, generator=None):
        """Discrete-time variational bound in bits per token, one unbiased estimate per sequence:

        -log p(w) <= E_q[-log p(w | x_1)] + sum_{t=2}^T E_q KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
                     + KL(q(x_T|x_0) || N(0, I)),   x_0 = clean(w) a deterministic function of the tokens.
        The prior KL is exact; the sum over t is estimated without bias by importance sampling one t per
        sequence, KL_t / q(t), with q(t) half uniform on {2..T} and half proportional to the drop in log-SNR
        over step t: a trained model's KL_t ~ (SNR_{t-1} - SNR_t) * mmse_t ~ that drop, so the weights stay
        bounded where a uniform t would rarely hit the huge terms near t = 1; the decoder term uses one draw of x_1. The standard error comes from the spread over sequences.
        With self-conditioning, p(x_{t-1} | x_t) uses the two-pass estimate x0(x_t, x0(x_t, 0)), a function of x_t
        alone, so this bounds a Markov model; the sampler instead feeds the previous step's estimate, and it
        rounds instead of drawing from p(w | x_1): the bound is for the model, not for the sampler's output.
        """
        B, L = idx.shape
        device = idx.device
        x0 = self.clean(idx)
        prior = self.diffusion.prior_kl(x0.double()).sum((1, 2))
        q = self.diffusion.t_proposal()
        t = 2 + torch.multinomial(q, B, replacement=True, generator=generator).to(device)
        x_t = self.diffusion.q_sample(x0, t, randn(x0.shape, generator, device).to(x0.dtype))
        x0_hat = self.denoise(x_t, t)[0]
        diffusion = self.diffusion.kl_step(x0, x0_hat, t).sum((1, 2)) / q.to(device)[t - 2]
        one = torch.ones(B, dtype=torch.long, device=device)
        x_1 = self.diffusion.q_sample(x0, one, randn(x0.shape, generator, device).to(x0.dtype))
        decoder = self.decoder_nll(*self.denoise(x_1, one), idx).sum(1)
        return (prior + diffusion + decoder) / (L * math.log(2))

    # -- sampler hooks
    def time_grid(self, steps, fixed):
        return self.discrete_grid(steps)

    def init_state(self, n, length, fixed, generator, opts):
        if opts['sampler'] not in ('ddpm', 'ddim'):
            raise ValueError(f"sampler={opts['sampler']!r}, expected 'ddpm' or 'ddim'")
        if opts.get('guidance_scale', 1.0) != 1.0 and self.config.cfg_drop == 0.0:
            raise ValueError("guidance_scale != 1 needs a model trained with cfg_drop > 0")
        dim = self.clean(torch.zeros(1, 1, dtype=torch.long, device=fixed.device)).shape[-1]
        x = randn((n, length, dim), generator, fixed.device).to(self.dtype_)
        known = self.clean(fixed.clamp(min=0))
        return {'x': x, 'x0_sc': None, 'x0_hat': None, 'out': None, 'known': known}

    @property
    def dtype_(self):
        return next(self.parameters()).dtype

    def step(self, state, t, s, fixed, generator, opts):
        x = state['x']
        n, device = x.shape[0], x.device
        tt = torch.full((n,), t, dtype=torch.long, device=device)
        # Analog Bits' asymmetric time intervals: step further, to s - td (t - s), while the network keeps
        # being told the grid time; td > 0 helps when few steps are used (Chen et al. 2023, sec. 3)
        ss = torch.full((n,), max(0, s - round(opts.get('td', 0.0) * (t - s))), dtype=torch.long, device=device)
        x0_hat, out = self.guided_prediction(x, tt, fixed, state['x0_sc'], opts)
        self.nfe += (2 if self.config.self_cond and state['x0_sc'] is None else 1) * \
            (2 if opts.get('guidance_scale', 1.0) != 1.0 else 1)
        if opts['clamp']:
            x0_hat = self.clamp_to_tokens(x0_hat, out)
        noise = randn(x.shape, generator, device).to(x.dtype)
        if opts['sampler'] == 'ddpm':
            x_s = self.diffusion.ddpm_step(x0_hat, x, tt, ss, noise)
        else:
            x_s = self.diffusion.ddim_step(x0_hat, x, tt, ss, opts['eta'], noise)
        # infilling by imputation: known positions are reset to a fresh draw of q(x_s | x_0 = known)
        known_s = self.diffusion.q_sample(state['known'], ss, randn(x.shape, generator, device).to(x.dtype))
        x_s = torch.where((fixed >= 0).unsqueeze(-1), known_s, x_s)
        return {**state, 'x': x_s, 'x0_sc': x0_hat if self.config.self_cond else None, 'x0_hat': x0_hat, 'out': out}

    def guided_prediction(self, x, t, fixed, x0_sc, opts):
        """x0 estimate, with classifier-free guidance x0_u + w (x0_c - x0_u) when the model has a condition."""
        cond = fixed if self.config.cfg_drop > 0 else None
        x0_hat, out = self.denoise(x, t, cond, x0_sc)
        w = opts.get('guidance_scale', 1.0)
        if w != 1.0:
            x0_u, out_u = self.denoise(x, t, torch.full_like(fixed, -1), x0_sc)
            x0_hat, out = x0_u + w * (x0_hat - x0_u), out_u + w * (out - out_u)
        return x0_hat, out

    def current_tokens(self, state):
        return self.round_tokens(state['x0_hat'], state['out'])

    def final_tokens(self, state, generator, opts):
        # the last step lands on s = 0 where x_0 = x0_hat; round that estimate to tokens
        return self.round_tokens(state['x0_hat'], state['out'])


class EmbedDiffusion(GaussianLM):
    """Diffusion-LM: Gaussian diffusion over learned token embeddings (width embed_dim), rounded to tokens.

    Rounding logits are negative squared distances to the embedding table, logit_v(x) = -||x - E_v||^2, so
    the most likely token is the nearest embedding and the cross-entropy keeps embeddings apart.
    """
    sample_options = {'sampler': 'ddim', 'eta': 0.0, 'clamp': False, 'guidance_scale': 1.0}
    lookup_only = ('backbone.wpe.weight', 'cond_emb.weight')
    no_decay = ('tok_emb.weight',)  # decaying the diffused embeddings would shrink the signal to the noise

    def __init__(self, config):
        super().__init__(config)
        D = config.embed_dim
        self.tok_emb = nn.Embedding(self.padded_vocab, D)
        in_dim = 2 * D if config.self_cond else D
        self.in_proj = nn.Linear(in_dim, config.n_embd, bias=config.bias)
        # the prompt condition: a clean token embedding per conditioned position, a learned null elsewhere
        self.cond_emb = nn.Embedding(self.padded_vocab + 1, config.n_embd) if config.cfg_drop > 0 else None
        self.backbone = Backbone(config, causal=False, time_cond=True)
        self.head = nn.Linear(config.n_embd, D, bias=config.bias)
        init_weights(self, config.n_layer)
        nn.init.normal_(self.tok_emb.weight, std=1.0)  # unit-scale embeddings match the unit-variance noise

    def clean(self, idx):
        return self.tok_emb(idx)

    def predict(self, x_t, t, x0_sc, cond):
        h = self.in_proj(torch.cat([x_t, x0_sc], -1) if self.config.self_cond else x_t)
        if self.cond_emb is not None:
            c = torch.full(x_t.shape[:2], self.padded_vocab, dtype=torch.long, device=x_t.device) \
                if cond is None else torch.where(cond >= 0, cond, self.padded_vocab)
            h = h + self.cond_emb(c)
        out = self.head(self.backbone(h, t.float() / self.config.T))
        if self.config.predict == 'x0':
            return out, out
        # an eps-model's x0 explodes where abar_t -> 0; clip it to the range the embeddings occupy
        x0_hat = self.diffusion.x0_from_eps(x_t, t, out)
        lim = self.tok_emb.weight[:self.config.vocab_size].abs().max().detach()
        return x0_hat.clamp(-lim, lim), out

    def rounding_logits(self, x):
        """logit_v = -||x - E_v||^2 + ||x||^2 = 2 x.E_v - ||E_v||^2 over the real vocabulary (padding rows are
        never a token). ||x||^2 is the same for every v, so dropping it changes neither the softmax nor the
        argmax. In fp32 with autocast off: in bf16 the cancellation between terms of size ~D costs ~0.5 logits."""
        with torch.autocast(x.device.type, enabled=False):
            E = self.tok_emb.weight[:self.config.vocab_size].float()
            flat = torch.addmm(-(E * E).sum(-1), x.float().reshape(-1, x.shape[-1]), E.t(), alpha=2)
        return flat.view(*x.shape[:-1], -1)

    def training_condition(self, idx):
        """With cfg_drop > 0: condition on a random-length prefix (up to half the sequence), dropped with
        probability cfg_drop so the same network also learns the unconditional model guidance needs."""
        if self.cond_emb is None:
            return None
        B, L = idx.shape
        plen = (torch.rand(B, device=idx.device) * (L // 2 + 1)).long()
        plen = torch.where(torch.rand(B, device=idx.device) < self.config.cfg_drop, 0, plen)
        keep = torch.arange(L, device=idx.device)[None] < plen[:, None]
        return torch.where(keep, idx, -1)

    def denoising_loss(self, out, x0, noise, idx, x0_hat):
        """MSE on eps or x0 + rounding cross-entropy -log p(w | x_0) + the prior term at t = T."""
        target = noise if self.config.predict == 'eps' else x0
        mse = F.mse_loss(out.float(), target.float())
        ce = F.cross_entropy(self.rounding_logits(x0).flatten(0, 1).float(), idx.flatten())
        prior = self.diffusion.prior_kl(x0).mean()
        return mse + ce + prior.to(mse.dtype)

    def decoder_nll(self, x0_hat, out, idx):
        return -self.rounding_logits(x0_hat).float().log_softmax(-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1).double()

    def round_tokens(self, x0_hat, out):
        return self.rounding_logits(x0_hat).argmax(-1)

    def clamp_to_tokens(self, x0_hat, out):
        """The clamping trick: snap the x0 estimate to its nearest embedding."""
        return self.tok_emb(self.round_tokens(x0_hat, out))


class AnalogBitDiffusion(GaussianLM):
    """Analog Bits (Chen, Zhang & Hinton 2023): the 16 bits of the id as +-scale reals under the Gaussian process.

    The network outputs one logit per bit, trained with binary cross-entropy: the target is discrete, BCE is
    its exact log-likelihood with bounded gradients, and the logits give the per-bit probabilities that the
    valid-id decoder needs. The x0 estimate is the posterior mean scale * (2 sigmoid(logit) - 1) = scale * tanh(logit/2).
    """
    sample_options = {'sampler': 'ddim', 'eta': 0.0, 'clamp': False, 'td': 0.0}

    def __init__(self, config):
        super().__init__(config)
        in_dim = 2 * NUM_BITS if config.self_cond else NUM_BITS
        self.in_proj = nn.Linear(in_dim, config.n_embd, bias=config.bias)
        self.backbone = Backbone(config, causal=False, time_cond=True)
        self.head = nn.Linear(config.n_embd, NUM_BITS, bias=config.bias)
        init_weights(self, config.n_layer)

    def clean(self, idx):
        return (2 * ids_to_bits(idx) - 1).to(self.head.weight.dtype) * self.config.analog_scale

    def predict(self, x_t, t, x0_sc, cond):
        h = self.in_proj(torch.cat([x_t, x0_sc], -1) if self.config.self_cond else x_t)
        logits = self.head(self.backbone(h, t.float() / self.config.T))
        return self.config.analog_scale * torch.tanh(logits / 2), logits

    def denoising_loss(self, out, x0, noise, idx, x0_hat):
        return F.binary_cross_entropy_with_logits(out.float(), ids_to_bits(idx).float())

    def decoder_nll(self, x0_hat, out, idx):
        return bit_token_nll(out, idx, self.config.vocab_size)

    def round_tokens(self, x0_hat, out):
        return bit_decode(out, self.config.vocab_size)

    def clamp_to_tokens(self, x0_hat, out):
        return self.clean(self.round_tokens(x0_hat, out))


def vocab_logits(h, tok_emb, vocab_size):
    """Output layer tied to the input embedding, over the real vocabulary only: slicing the weight rows (not
    the logits) keeps [MASK] and the padding ids out of every softmax at no extra cost."""
    return F.linear(h, tok_emb.weight[:vocab_size])


# ----------------------------------------------------------------------------------------------------
# bits: discrete diffusion on the 16 bits of the id by independent bit flips

class BitDiffusion(DiffusionLM):
    """Each bit flips independently: q(b_t != b_0) = (1 - abar_t) / 2, so at t = T the bits are uniform.

    Between any s < t a bit flips with probability (1 - abar_t/abar_s) / 2. The network sees the noisy bits
    as +-1 (projected to n_embd; no vocabulary-sized layer anywhere in training) and predicts the clean bits
    with binary cross-entropy. Sampling uses the exact posterior q(b_s | b_t, b_0) averaged over the predicted
    clean bits, for any s < t, so any number of steps works; the last step decodes through the valid ids.
    """
    sample_options = {'temperature': 1.0}

    def __init__(self, config):
        super().__init__(config)
        self.abar = abar_schedule(config.noise_schedule, config.T)
        self.default_steps = self.max_steps = config.T
        self.in_proj = nn.Linear(NUM_BITS, config.n_embd, bias=config.bias)
        self.backbone = Backbone(config, causal=False, time_cond=True)
        self.head = nn.Linear(config.n_embd, NUM_BITS, bias=config.bias)
        init_weights(self, config.n_layer)

    def stay_prob(self, t, s, like):
        """P(bit unchanged from time s to time t) = (1 + abar_t / abar_s) / 2, shaped to broadcast on `like`."""
        abar = on_device(self.abar, like.device)
        return ((1 + abar[t] / abar[s]) / 2).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, b0, t, generator=None):
        """Flip each bit of b0 (0/1) with probability (1 - abar_t) / 2."""
        flip = rand(b0.shape, generator, b0.device) >= self.stay_prob(t, torch.zeros_like(t), b0)
        return (b0.long() ^ flip.long()).to(b0.dtype)

    def posterior_one(self, b_t, p0, t, s):
        """P(b_s = 1 | b_t) when P(b_0 = 1) = p0 (0/1 for the exact posterior, sigmoid(logit) for the model):

        q(b_s = 1 | b_t, b_0) = q(b_t | b_s = 1) q(b_s = 1 | b_0) / sum over b_s, mixed over b_0 with p0.
        """
        a = self.stay_prob(t, s, b_t)                   # s -> t
        c = self.stay_prob(s, torch.zeros_like(s), b_t)  # 0 -> s
        like1 = torch.where(b_t > 0.5, a, 1 - a)         # q(b_t | b_s = 1)
        like0 = 1 - like1                                # q(b_t | b_s = 0)
        post_given = []
        for b0 in (1.0, 0.0):
            prior1 = c if b0 == 1.0 else 1 - c           # q(b_s = 1 | b_0)
            post_given.append(like1 * prior1 / (like1 * prior1 + like0 * (1 - prior1)))
        return p0 * post_given[0] + (1 - p0) * post_given[1]

    def predict(self, b_t, t):
        return self.head(self.backbone(self.in_proj(2 * b_t.to(self.head.weight.dtype) - 1),
                                       t.float() / self.config.T))

    def forward(self, idx):
        b0 = ids_to_bits(idx).float()
        t = stratified_times(idx.shape[0], self.config.T, None, idx.device)
        logits = self.predict(self.q_sample(b0, t), t)
        return F.binary_cross_entropy_with_logits(logits.float(), b0)

    @exact
    def nll(self, idx, generator=None):
        """Variational bound in bits per token with exact per-bit KL terms:

        -log p(w) <= E[-log p(w | b_1)] + sum_{t=2}^T E KL(q(b_{t-1}|b_t,b_0) || p(b_{t-1}|b_t)) + KL(q(b_T|b_0) || U),
        the sum estimated without bias by (T - 1) x the term at one uniform t in {2..T} per sequence; the
        decoder is the valid-id distribution, so the mass on invalid codes counts against the model.
        """
        B, L = idx.shape
        device = idx.device
        b0 = ids_to_bits(idx).double()
        T = self.config.T
        m = (1 + self.abar[T].item()) / 2
        prior = NUM_BITS * L * (m * math.log(2 * m) + (1 - m) * math.log(2 * (1 - m)) if m < 1 else 0.0)
        t = 2 + (rand((B,), generator, device) * (T - 1)).floor().long().clamp(max=T - 2)
        b_t = self.q_sample(b0, t, generator)
        q = self.posterior_one(b_t, b0, t, t - 1).clamp(1e-12, 1 - 1e-12)
        p = self.posterior_one(b_t, torch.sigmoid(self.predict(b_t, t).double()), t, t - 1).clamp(1e-12, 1 - 1e-12)
        kl = (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).sum((1, 2))
        one = torch.ones(B, dtype=torch.long, device=device)
        decoder = bit_token_nll(self.predict(self.q_sample(b0, one, generator), one), idx, self.config.vocab_size)
        return (prior + (T - 1) * kl + decoder.sum(1)) / (L * math.log(2))

    # -- sampler hooks
    def time_grid(self, steps, fixed):
        return self.discrete_grid(steps)

    def init_state(self, n, length, fixed, generator, opts):
        b = (rand((n, length, NUM_BITS), generator, fixed.device) < 0.5).float()
        return {'b': b, 'logits': None, 'known': ids_to_bits(fixed.clamp(min=0)).float()}

    def step(self, state, t, s, fixed, generator, opts):
        b = state['b']
        n = b.shape[0]
        tt = torch.full((n,), t, dtype=torch.long, device=b.device)
        ss = torch.full((n,), s, dtype=torch.long, device=b.device)
        logits = self.predict(b, tt).float()
        self.nfe += 1
        if s > 0:
            p1 = self.posterior_one(b, torch.sigmoid(logits.double() / max(opts['temperature'], 1e-8)), tt, ss)
            b = (rand(b.shape, generator, b.device) < p1).float()
            # infilling by imputation: known positions get a fresh draw of q(b_s | b_0 = known)
            b = torch.where((fixed >= 0).unsqueeze(-1), self.q_sample(state['known'], ss, generator), b)
        return {**state, 'b': b, 'logits': logits}

    def current_tokens(self, state):
        return bit_decode(state['logits'], self.config.vocab_size)

    def final_tokens(self, state, generator, opts):
        # at s = 0 the posterior is the model's p(b_0 | b_1): draw the id from the valid-id distribution, with the
        # temperature on the bit logits as in the earlier steps (0: the most likely valid id)
        tau = opts['temperature']
        logits = state['logits'] / tau if tau > 0 else state['logits']
        return bit_decode(logits, self.config.vocab_size, generator, 1.0 if tau > 0 else 0.0)


# ----------------------------------------------------------------------------------------------------
# mask: masked (absorbing-state) diffusion, MDLM

class MaskedDiffusion(DiffusionLM):
    """MDLM (Sahoo et al. 2024): each token is replaced by [MASK] with probability 1 - alpha_t, t in [0, 1].

    SUBS parameterisation: the network's distribution over clean tokens never puts mass on [MASK] (or the
    padding ids), and unmasked tokens are carried over unchanged (the sampler never touches them, and the loss
    only counts masked positions). Loss: the continuous-time ELBO
        E_t [ -alpha'_t / (1 - alpha_t) sum_{masked l} -log p(x_l | z_t) ],   in nats per token.
    """
    sample_options = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0, 'cached': True}
    train_eps = 1e-3  # MDLM's sampling_eps: training draws t in [eps, 1] to avoid the 1/t weights near 0

    def __init__(self, config):
        super().__init__(config)
        self.mask_id = config.vocab_size
        self.default_steps = config.block_size
        self.max_steps = 100_000
        self.tok_emb = nn.Embedding(self.padded_vocab, config.n_embd)  # also the output layer (tied)
        self.backbone = Backbone(config, causal=False, time_cond=config.time_cond)
        init_weights(self, config.n_layer)

    def alpha(self, t):
        """Probability that a token is still clean at time t: 1 - t (loglinear) or cos(pi t / 2)."""
        return 1 - t if self.config.mask_schedule == 'loglinear' else torch.cos(math.pi / 2 * t)

    def loss_weight(self, t):
        """-alpha'_t / (1 - alpha_t): 1/t (loglinear) or (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) (cosine)."""
        if self.config.mask_schedule == 'loglinear':
            return 1 / t
        return (math.pi / 2) * torch.sin(math.pi / 2 * t) / (1 - torch.cos(math.pi / 2 * t))

    def time_of_mask_rate(self, u):
        """Inverse of u = 1 - alpha_t."""
        return u if self.config.mask_schedule == 'loglinear' else (2 / math.pi) * torch.acos(1 - u)

    def log_probs(self, z, t):
        """log p(x_0 | z_t) over the real vocabulary with [MASK] and padding excluded (SUBS)."""
        h = self.backbone(self.tok_emb(z), t if self.config.time_cond else None)
        return vocab_logits(h, self.tok_emb, self.config.vocab_size).float().log_softmax(-1)

    def forward(self, idx):
        B, L = idx.shape
        u = (torch.rand(1, device=idx.device) + torch.arange(B, device=idx.device) / B) % 1  # antithetic
        t = self.train_eps + (1 - self.train_eps) * u
        masked = torch.rand(B, L, device=idx.device) < (1 - self.alpha(t))[:, None]
        z = torch.where(masked, self.mask_id, idx)
        nll = -self.log_probs(z, t).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        return (self.loss_weight(t)[:, None] * nll * masked).sum() / (B * L)

    @exact
    def nll(self, idx, generator=None):
        """The continuous-time ELBO in bits per token, one unbiased draw per sequence.

        Integrating t out analytically (the mask rate pi = 1 - alpha_t has dt weight dpi / pi, and
        int_0^1 pi^(m-1) (1-pi)^(L-m) C(L, m) dpi = 1/m) turns the ELBO into
            sum_{m=1}^L (1/m) E_{|M| = m} [ sum_{l in M} -log p(x_l | x with M masked) ]
          = E_{m ~ U{1..L}} [ (L/m) sum_{l in M} -log p(x_l | ...) ],
        one draw of m and of a uniform subset M of size m per sequence: the same bound for every schedule,
        with bounded variance (unlike the 1/t weight). A time-conditioned network is given the t whose mask
        rate is drawn from its posterior given |M| = m, Beta(m, L - m + 1).
        """
        B, L = idx.shape
        device = idx.device
        m = 1 + (rand((B,), generator, device) * L).floor().long().clamp(max=L - 1)
        keys = rand((B, L), generator, device)
        masked = keys.argsort(1).argsort(1) < m[:, None]  # a uniform subset of m positions
        t = None
        if self.config.time_cond:
            gdev = generator.device if generator is not None else device
            g1 = torch._standard_gamma(m.double().to(gdev), generator=generator)  # Beta(m, L-m+1) from gammas
            g2 = torch._standard_gamma((L - m + 1).double().to(gdev), generator=generator)
            t = self.time_of_mask_rate((g1 / (g1 + g2)).to(device)).float()
        z = torch.where(masked, self.mask_id, idx)
        nll = -self.log_probs(z, t).gather(-1, idx.unsqueeze(-1)).squeeze(-1).double()
        return (L / m.double()) * (nll * masked).sum(1) / (L * math.log(2))

    # -- sampler hooks
    def time_grid(self, steps, fixed):
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        return list(zip(ts[:-1], ts[1:]))

    def init_state(self, n, length, fixed, generator, opts):
        return {'z': torch.where(fixed >= 0, fixed, self.mask_id), 'logp': None, 'changed': True}

    def step(self, state, t, s, fixed, generator, opts):
        """Ancestral step t -> s: each masked token is revealed with probability (alpha_s - alpha_t)/(1 - alpha_t),
        drawn from p(x_0 | z_t); revealed tokens never change again. The network is skipped when nothing
        changed since its last call and it does not see t (its output would be identical)."""
        z, logp = state['z'].clone(), state['logp']
        n, device = z.shape[0], z.device
        if logp is None or state['changed'] or self.config.time_cond or not opts['cached']:
            tt = torch.full((n,), t, device=device)
            logp = self.log_probs(z, tt)
            self.nfe += 1
        a_t, a_s = self.alpha(torch.tensor(t, dtype=torch.float64)), self.alpha(torch.tensor(s, dtype=torch.float64))
        rate = 1.0 if s == 0 else float((a_s - a_t) / (1 - a_t))
        reveal = (z == self.mask_id) & (rand(z.shape, generator, device) < rate)
        if reveal.any():
            z[reveal] = draw_categorical(logp[reveal], generator, opts['temperature'], opts['top_k'], opts['top_p'])
        return {'z': z, 'logp': logp, 'changed': bool(reveal.any())}

    def current_tokens(self, state):
        z = state['z']
        return torch.where(z == self.mask_id, state['logp'].argmax(-1), z)

    def final_tokens(self, state, generator, opts):
        return state['z']


# ----------------------------------------------------------------------------------------------------
# ar: the autoregressive baseline (and the judge for generative perplexity)

class AutoregressiveLM(DiffusionLM):
    """GPT on the same backbone: causal attention, no time input (adaLN from a learned constant).

    Windows are block_size + 1 tokens: the network reads the first block_size and predicts the next token at
    each position. Generation is left to right with a KV cache, starting from <|endoftext|> (the last id).
    """
    extra_tokens = 1
    sample_options = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0}

    def __init__(self, config):
        super().__init__(config)
        self.bos_id = config.vocab_size - 1  # GPT-2's <|endoftext|> is 50256, the last id
        self.max_steps = config.block_size
        self.tok_emb = nn.Embedding(self.padded_vocab, config.n_embd)  # also the output layer (tied)
        self.backbone = Backbone(config, causal=True, time_cond=False)
        init_weights(self, config.n_layer)

    def logits(self, idx, kv_caches=None, pos_offset=0):
        h = self.backbone(self.tok_emb(idx), None, kv_caches, pos_offset)
        return vocab_logits(h, self.tok_emb, self.config.vocab_size)

    def forward(self, idx):
        logits = self.logits(idx[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())

    @exact
    def nll(self, idx, generator=None):
        """Exact NLL of idx[:, 1:] given its prefix, in bits per token."""
        logp = self.logits(idx[:, :-1]).float().log_softmax(-1)
        nll = -logp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1).double()
        return nll.mean(1) / math.log(2)

    def check_sample_args(self, length, steps, options):
        if steps is not None:
            raise ValueError("model_type='ar' draws one token per step, so the number of steps is set by the "
                             "length; leave steps unset")
        return super().check_sample_args(length, None, options)

    # -- sampler hooks: one "step" per generated position
    def time_grid(self, steps, fixed):
        prompt = fixed >= 0
        plen = int(prompt.long().cumprod(1).sum(1).min()) if prompt.numel() else 0
        if (prompt.sum(1) != plen).any():
            raise ValueError("model_type='ar' supports prefix prompts only (the same fixed prefix length in every "
                             "sample), not infilling")
        return [(j, j + 1) for j in range(plen, fixed.shape[1])]

    def init_state(self, n, length, fixed, generator, opts):
        caches = [[None, None] for _ in range(self.config.n_layer)]
        return {'out': fixed.clone(), 'caches': caches, 'fed': 0}

    def step(self, state, j, _, fixed, generator, opts):
        out = state['out']
        bos = torch.full((out.shape[0], 1), self.bos_id, dtype=torch.long, device=out.device)
        seq = torch.cat([bos, out[:, :j]], 1)         # input for predicting position j
        new = seq[:, state['fed']:]                    # tokens the cache has not seen (the prompt, at first)
        logits = self.logits(new, state['caches'], state['fed'])[:, -1]
        self.nfe += 1
        out[:, j] = draw_categorical(logits, generator, opts['temperature'], opts['top_k'], opts['top_p'])
        return {**state, 'fed': j + 1}

    def current_tokens(self, state):
        return state['out']

    def final_tokens(self, state, generator, opts):
        return state['out']


# ----------------------------------------------------------------------------------------------------
# Construction and checkpoints

FAMILIES = {'embed': EmbedDiffusion, 'bits': BitDiffusion, 'analog': AnalogBitDiffusion,
            'mask': MaskedDiffusion, 'ar': AutoregressiveLM}


def build_model(config):
    """A model of the family `config.model_type`, from a ModelConfig or a dict of its fields."""
    if isinstance(config, dict):
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown model argument(s) {unknown}; known: {sorted(known)}")
        config = ModelConfig(**config)
    return FAMILIES[config.model_type](config)


def write_atomic(path, write):
    """write(tmp_path) into a temp file beside `path`, then rename: readers never see a partial file, and a
    crash leaves the previous version intact. Used for checkpoints, samples, results and plots."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, ckpt):
    """torch.save, atomically (see write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path, device='cpu', use_ema=True):
    """Rebuild the model from `model_args` and load its weights (EMA ones when present and use_ema).

    `path` is a checkpoint file or an out_dir holding ckpt.pt. Returns (model in eval mode, checkpoint dict).
    """
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path} (train one with train.py, which writes out_dir/ckpt.pt)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    missing = [k for k in ('model_args', 'model') if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this project: missing key(s) {missing}")
    model = build_model(dict(ckpt['model_args']))
    state = ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model']
    model.load_state_dict(state)
    model.to(device).eval()
    return model, ckpt
