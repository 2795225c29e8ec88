"""
The transformer backbone and every model family of the project, in two parts as in DiT: the network (blocks
modulated by a time embedding through adaLN-zero), then one section per family, whose class holds its input, head,
training loss (forward), sampler (init_state, step) and likelihood bound (position_nll): EmbedDiffusion (`embed`),
AnalogBitDiffusion (`analog`: embed's Gaussian process over the id's bits, so a subclass of it), BitDiffusion
(`bits`), MaskedDiffusion (`mask`) and AutoregressiveLM (`ar`). All five share the sampling loop
(LanguageModel.sample); the parameter-free maths (schedules, the processes and their step KLs in discrete and
continuous time, the bounds' time proposal, time and categorical draws, the bit code) is in diffusion.py.

Time. embed, analog, bits: t = 0..T, the steps of the discrete chain, abar_0 = 1 (clean data); training draws t in
1..T, sampling runs from T to 0. The bound is the decoder's term at t = 1, one KL per step t = 2..T (drawn by
BoundTimeProposal, indexed by t - 2) and the prior at T. continuous_time=True: t real in [0, T], the same marginals,
the sum over steps an integral over (1, T]. mask: t real in [0, 1], alpha_t the probability a token is still clean.
ar: no time. The network sees t in [0, 1]: t / T (mask: t itself, with time_cond=True only).
Token ids are GPT-2's (50,257; 50256 = <|endoftext|>) or a compact vocabulary's; likelihoods are in bits per token.
"""

import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import (NUM_BITS, BitFlipDiffusion, BoundTimeProposal, ContinuousBitFlipDiffusion,
                       ContinuousGaussianDiffusion, GaussianDiffusion, MaskSchedule, abar_schedule, bits_to_ids,
                       categorical_mean, code_bits, draw_categorical, ids_to_bits, rand, randn, rounding_logits,
                       stratified_times, valid_codes)
from system import eval_in_full_precision, in_eval_mode

MODEL_TYPES = ('embed', 'bits', 'analog', 'mask', 'ar')


@dataclass
class ModelConfig:
    model_type: str = 'embed'        # embed | bits | analog | mask | ar (the family classes below, FAMILIES)
    vocab_size: int = 50257          # real vocabulary (GPT-2); embedding tables are padded to a multiple of 64
    block_size: int = 256            # sequence length the network sees
    n_layer: int = 6                 # transformer blocks
    n_head: int = 6                  # attention heads
    n_embd: int = 384                # model width
    dropout: float = 0.0             # dropout in attention and MLP (0 for pretraining)
    bias: bool = True                # biases in Linear layers
    rotary: bool = False             # rotary position embedding instead of a learned absolute one
    T: int = 1000                    # diffusion steps of the discrete-time process (embed, bits, analog)
    continuous_time: bool = False    # embed/analog/bits: real t in [0, T], the bound an integral (diffusion.py);
                                     # T then sets the decoder's time t = 1, the bound's cells and the default steps
    noise_schedule: str = 'sqrt'     # linear | cosine | sqrt (Diffusion-LM's; bits configs use cosine)
    predict: str = 'x0'              # embed/analog: the network predicts eps or x0
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
        for key, allowed in (('model_type', MODEL_TYPES), ('noise_schedule', ('linear', 'cosine', 'sqrt')),
                             ('predict', ('eps', 'x0')), ('mask_schedule', ('loglinear', 'cosine'))):
            need(getattr(self, key) in allowed, f"{key}={getattr(self, key)!r}, expected one of {allowed}")
        for key, low in (('vocab_size', 2), ('block_size', 1), ('T', 2), ('embed_dim', 1)):
            need(getattr(self, key) >= low, f"{key}={getattr(self, key)}, expected >= {low}")
        need(self.n_layer >= 1 and self.n_head >= 1 and self.n_embd >= 1, "n_layer, n_head and n_embd must be >= 1")
        need(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        need(not self.rotary or (self.n_embd // self.n_head) % 2 == 0, "rotary needs an even head size")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout}, expected in [0, 1)")
        need(not self.continuous_time or self.model_type in ('embed', 'analog', 'bits'),
             "continuous_time is for embed, analog and bits; mask is continuous-time already, ar has no time")
        need(self.predict == 'x0' or self.model_type in ('embed', 'analog'), "predict='eps' is for embed and analog")
        need(0.0 <= self.cfg_drop < 1.0, f"cfg_drop={self.cfg_drop}, expected in [0, 1)")
        need(self.cfg_drop == 0.0 or self.model_type == 'embed', "cfg_drop (guidance) is only for model_type='embed'")
        need(self.analog_scale > 0, f"analog_scale={self.analog_scale}, expected > 0")
        need(not self.time_cond or self.model_type == 'mask', "time_cond is a mask-family switch")
        need(self.model_type not in ('bits', 'analog') or self.vocab_size <= 2 ** NUM_BITS,
             f"vocab_size={self.vocab_size} does not fit in {NUM_BITS} bits")


# -------- The network: DiT blocks (adaLN-zero) over a token sequence
def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with (shift, scale) per sequence (B, 1, C) or constant (1, 1, C)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> [cos(1000 t omega_k), sin(1000 t omega_k)], omega_k = 10000^(-k / (d/2)), k < d/2 -> MLP. One
    embedder for discrete (t/T) and continuous time; the factor 1000 spans the frequencies DiT sees with t = 0..999."""

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
    """Pre-LN attention and MLP, each modulated (shift, scale) and gated: with a time input by a zero-initialised
    linear map of c (adaLN-zero: the block starts as the identity, DiT); without one (ar, mask by default) by learned
    constants with gates at 1, a pre-LN GPT block (gates at 0 or 1 made no measurable difference to mask at 500 CPU
    iterations: 0.070 vs 0.063 nats above the unigram line, standard error 0.03)."""

    def __init__(self, config, causal, time_cond=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(config, causal)
        self.ln_2 = nn.LayerNorm(config.n_embd, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(config)
        if time_cond:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.n_embd, 6 * config.n_embd))
        else:
            self.modulation = nn.Parameter(torch.zeros(6, config.n_embd))  # init_weights sets the gates to 1

    def forward(self, x, t_emb, kv_cache=None, pos_offset=0):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation_vectors(self, t_emb, 6)
        x = x + gate_a * self.attn(modulate(self.ln_1(x), shift_a, scale_a), kv_cache, pos_offset)
        x = x + gate_m * self.mlp(modulate(self.ln_2(x), shift_m, scale_m))
        return x


def modulation_vectors(module, t_emb, n):
    """The n modulation vectors of a block, shaped to broadcast over (B, L, C): from the time embedding (B, C)
    through the module's adaLN layer, or its learned constant (n, C) when there is no time input (t_emb None)."""
    if t_emb is None:
        return module.modulation.view(n, 1, 1, -1).unbind(0)
    return module.adaLN_modulation(t_emb).unsqueeze(1).chunk(n, dim=2)


class Backbone(nn.Module):
    """Positions + time conditioning + DiT blocks + final modulated LayerNorm. Families own input and head."""

    def __init__(self, config, causal=False, time_cond=True):
        super().__init__()
        self.config = config
        self.wpe = None if config.rotary else nn.Embedding(config.block_size, config.n_embd)
        self.t_embedder = TimestepEmbedder(config.n_embd) if time_cond else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([DiTBlock(config, causal, time_cond) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, elementwise_affine=False, eps=1e-6)
        if time_cond:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.n_embd, 2 * config.n_embd))
        else:
            self.modulation = nn.Parameter(torch.zeros(2, config.n_embd))

    def forward(self, h, t=None, kv_caches=None, pos_offset=0):
        B, L, _ = h.shape
        if pos_offset + L > self.config.block_size:
            raise ValueError(f"sequence of {pos_offset + L} positions exceeds block_size={self.config.block_size}")
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(pos_offset, pos_offset + L, device=h.device))
        t_emb = self.t_embedder(t) if self.t_embedder is not None else None
        h = self.drop(h)
        for i, block in enumerate(self.blocks):
            h = block(h, t_emb, None if kv_caches is None else kv_caches[i], pos_offset)
        shift, scale = modulation_vectors(self, t_emb, 2)
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
            if hasattr(m, 'adaLN_modulation'):  # adaLN-zero
                for p in m.adaLN_modulation[-1].parameters():
                    nn.init.zeros_(p)
            else:  # constant modulation: shift 0, scale 0, and for blocks gates 1 (rows 2 and 5)
                with torch.no_grad():
                    m.modulation.zero_()
                    if isinstance(m, DiTBlock):
                        m.modulation[2::3] = 1.0


class BitCodeInput(nn.Module):
    """The network's input from a noisy k-bit code (bits: the flipped bits, analog: the signs of x_t): a linear map of
    its +-1 bits, plus an embedding of the whole code as an integer (2**k rows), a token embedding where the code is
    intact: from the linear part alone a small network cannot rebuild the ids, and learns per-bit frequencies only."""

    def __init__(self, in_dim, n_embd, bias, num_bits):
        super().__init__()
        self.proj = nn.Linear(in_dim, n_embd, bias=bias)
        self.code_emb = nn.Embedding(2 ** num_bits, n_embd)

    def forward(self, signed_bits, extra=None):
        """signed_bits (..., k) real, > 0 read as bit 1; extra (..., k) more features for the linear part."""
        x = signed_bits if extra is None else torch.cat([signed_bits, extra], -1)
        return self.proj(x.to(self.proj.weight.dtype)) + self.code_emb(bits_to_ids(signed_bits > 0))


def vocab_logits(h, tok_emb, vocab_size):
    """Output layer tied to the input embedding; slicing its rows keeps [MASK] and padding out of every softmax."""
    return F.linear(h, tok_emb.weight[:vocab_size])


# -------- The shared skeleton of every family
class LanguageModel(nn.Module):
    """Base of the families: the process, parameter counts and the sampling loop. A family implements `forward(idx) ->
    loss`, `position_nll(idx) -> (B, L) bits` (its bound, or exact NLL, per position it scores) and the sampler hooks
    `init_state`, `step`, `current_tokens` (`time_grid`, `final_tokens` have defaults)."""
    processes = None        # (discrete, continuous) process classes of diffusion.py: embed, analog and bits
    extra_tokens = 0        # windows are block_size + extra_tokens long (ar needs one more for its targets)
    sample_options = {}     # option -> default, the sampler knobs of the family
    lookup_only = ('backbone.wpe.weight',)  # tables only indexed, never multiplied (no FLOPs, not "model size")
    no_decay = ()           # matrices that must not be weight-decayed (train.configure_optimizer)
    extra_ids = 0           # ids past the vocabulary the family's tables need (mask: one for [MASK])
    fixed_steps = False     # True where the length sets the number of sampling steps (ar: one token per step)
    exact_likelihood = False  # True where position_nll() is the exact NLL rather than a bound (ar)
    default_steps = max_steps = None  # sampling steps when none are asked for, and the most a call may ask for

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.padded_vocab = ((config.vocab_size + self.extra_ids + 63) // 64) * 64
        self.nfe = 0  # network evaluations of the last sample(): it resets them, each family's step adds its own
        if self.processes:
            # the process, the bound's time proposal, T sampling steps, and the schedule as the buffer `abar` (not
            # saved), which .to() moves and _apply hands to the process (abar_dev): no copy or sync
            discrete, continuous = self.processes
            self.process = continuous(config.noise_schedule, config.T) if config.continuous_time else \
                discrete(abar_schedule(config.noise_schedule, config.T))
            self.register_buffer('abar', self.process.abar.clone(), persistent=False)
            self.time_proposal = BoundTimeProposal(self.process.abar, continuous=config.continuous_time)
            self.default_steps = self.max_steps = config.T

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double() ... end here: see __init__
        super()._apply(fn, *args, **kwargs)
        if 'abar' in self._buffers:
            self.process.abar_dev = self.abar
        return self

    def time_batch(self, t, like):  # a sampling step's time t as a (B,) tensor for the B states of `like`
        return torch.full(like.shape[:1], t, dtype=self.process.time_dtype, device=like.device)

    def nll(self, idx, generator=None):
        """Bits per token of each sequence (B,): one unbiased estimate of the bound (exact for ar)."""
        return self.position_nll(idx, generator).mean(1)

    def get_num_params(self, non_embedding=True):
        skip = set(self.lookup_only) if non_embedding else set()
        return sum(p.numel() for n, p in self.named_parameters() if n not in skip)

    # -- the sampling loop
    def check_sample_args(self, length, steps, options):
        if self.fixed_steps and steps is not None:
            raise ValueError(f"model_type={self.config.model_type!r} draws one token per step, so the number of steps "
                             f"is set by the length; leave steps unset")
        unknown = sorted(set(options) - set(self.sample_options))
        if unknown:
            raise ValueError(f"model_type={self.config.model_type!r} has no sampling option(s) {unknown}; "
                             f"its options are {sorted(self.sample_options)}")
        if not 1 <= length <= self.config.block_size:
            raise ValueError(f"length={length} must be in [1, block_size={self.config.block_size}]")
        if steps is not None and not (isinstance(steps, int) and 1 <= steps <= self.max_steps):
            raise ValueError(f"steps={steps} out of range for model_type={self.config.model_type!r}: "
                             f"expected an integer in [1, {self.max_steps}]")
        opts = {**self.sample_options, **options}
        for key, lo, hi in (('eta', 0, 1), ('temperature', 0, math.inf), ('top_p', 0, 1), ('top_k', 0, math.inf)):
            # (eta above 1 asks DDIM for more noise than the step has: the square root of a negative variance)
            if key in opts and not lo <= opts[key] <= hi:
                raise ValueError(f"{key}={opts[key]!r}, expected a number in [{lo}, {hi}]")
        return opts

    @torch.no_grad()
    @in_eval_mode
    def sample(self, num_samples, length, steps=None, fixed=None, generator=None, callback=None, **options):
        """Generate `num_samples` sequences of `length` tokens. fixed: (num_samples or 1, length), -1 where free, else
        the token the output must hold (prompts, infilling). callback(i, n, tokens) after each of the n steps with
        the current best guess (-1 where none yet). Afterwards self.nfe is the number of network evaluations."""
        opts = self.check_sample_args(length, steps, options)
        steps = self.default_steps if steps is None else steps
        device = next(self.parameters()).device
        fixed = torch.full((num_samples, length), -1) if fixed is None else fixed
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

    def time_grid(self, steps, fixed):
        """`steps` pairs (t, s) of times from T down to 0, evenly spaced: integers (DDIM's striding), or `steps`
        equal real intervals in continuous time."""
        if self.config.continuous_time:
            ts = torch.linspace(self.config.T, 0, steps + 1, dtype=torch.float64).tolist()
        else:
            ts = torch.linspace(self.config.T, 0, steps + 1).round().long().tolist()
        return list(zip(ts[:-1], ts[1:]))

    def final_tokens(self, state, generator, opts):
        return self.current_tokens(state)


# -------- embed: Gaussian diffusion over learned token embeddings (Diffusion-LM)
class EmbedDiffusion(LanguageModel):
    """Diffusion-LM: Gaussian diffusion over learned token embeddings (width embed_dim). Token w's clean state is row w
    of table(); the network reads features(x_t, x0_sc, cond) and returns logits over the vocabulary, and x0_hat =
    softmax(logits) @ table (CDCD, Plaid): near t = 0, where the bound multiplies every error in x0_hat by the SNR
    (~1e4), a confident categorical lands exactly on a row, where a regression's error would not shrink. Loss
    (forward): ||x0_hat - x0||^2 + CE(logits, w) (predict='eps': ||eps_hat - eps||^2) + the rounding CE -log p(w | x0)
    with distance logits (it keeps the embeddings apart) + the prior term. Bound: position_nll. Sampler (step): DDPM or
    DDIM from x_T ~ N(0, I), clamping to the nearest embedding, classifier-free guidance on a prompt (cfg_drop > 0)."""
    processes = (GaussianDiffusion, ContinuousGaussianDiffusion)
    # the measured default (config/eval_quickstart.py): DDIM at eta = 1 (DDPM's ancestral step) with x0 clamped to an
    # embedding beat plain DDIM at every step count; 200 steps sit where gen-PPL no longer falls with steps (past 100)
    sample_options = {'sampler': 'ddim', 'eta': 1.0, 'clamp': True, 'guidance_scale': 1.0}
    lookup_only = ('backbone.wpe.weight', 'cond_emb.weight')
    no_decay = ('tok_emb.weight',)  # decaying the diffused embeddings would shrink the signal to the noise

    def __init__(self, config):
        super().__init__(config)
        self.default_steps, D = min(config.T, 200), config.embed_dim  # 200 steps: see sample_options
        self.tok_emb = nn.Embedding(self.padded_vocab, D)
        self.in_proj = nn.Linear(2 * D if config.self_cond else D, config.n_embd, bias=config.bias)
        # the prompt condition: a clean token embedding per conditioned position, a learned null elsewhere
        self.cond_emb = nn.Embedding(self.padded_vocab + 1, config.n_embd) if config.cfg_drop > 0 else None
        self.backbone = Backbone(config, causal=False, time_cond=True)
        self.add_head(D)
        init_weights(self, config.n_layer)
        nn.init.normal_(self.tok_emb.weight, std=1.0)  # unit-scale embeddings match the unit-variance noise

    def add_head(self, width):  # the output layer: eps_hat (the state's width) if predict='eps', else vocab logits
        cfg = self.config
        self.eps_head = nn.Linear(cfg.n_embd, width, bias=cfg.bias) if cfg.predict == 'eps' else None
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False) if cfg.predict == 'x0' else None

    def table(self):  # the clean states of the vocabulary, one row per token
        return self.tok_emb.weight[:self.config.vocab_size]

    def clean(self, idx):  # x_0 of the tokens idx: their rows of the table
        return F.embedding(idx, self.table())

    def features(self, x_t, x0_sc, cond):
        h = self.in_proj(torch.cat([x_t, x0_sc], -1) if self.config.self_cond else x_t)
        if self.cond_emb is not None:
            cond_ids = torch.full(x_t.shape[:2], self.padded_vocab, dtype=torch.long, device=x_t.device) \
                if cond is None else torch.where(cond >= 0, cond, self.padded_vocab)
            h = h + self.cond_emb(cond_ids)
        return h

    # -- the network
    def x0_estimate(self, x_t, t, x0_sc, cond=None):
        """(x0_hat, scores over the vocabulary, eps_hat or None) at (x_t, t): one network evaluation. The scores are
        log-probabilities (predict='x0') or rounding logits ('eps'): either one's softmax is the estimate's p(w)."""
        h = self.backbone(self.features(x_t, x0_sc, cond), t.float() / self.config.T)
        if self.config.predict == 'eps':
            eps_hat = self.eps_head(h)
            # an eps-model's x0 explodes where abar_t -> 0; clip it to the range the table occupies
            lim = self.table().abs().max().detach()
            x0_hat = self.process.x0_from_eps(x_t, t, eps_hat).clamp(-lim, lim)
            return x0_hat, rounding_logits(x0_hat, self.table()), eps_hat
        # the network supplies what x_t alone cannot say (the context); the likelihood of x_t under each token is
        # known exactly and added at every t, so at high SNR the posterior is right by construction
        logits = self.process.token_loglik(x_t, self.process.at(t, x_t), self.table(), add_to=self.lm_head(h).float())
        # normalised once: the categorical mean and the cross-entropy of denoising_loss both read these log-probs
        logp = logits.log_softmax(-1)
        return categorical_mean(logp, self.table()).to(x_t.dtype), logp, None

    def denoise(self, x_t, t, cond=None, x0_sc=None):
        """x0 estimate at (x_t, t); with self-conditioning and no previous estimate, a first pass supplies it."""
        zero = torch.zeros_like(x_t)
        if x0_sc is None:
            x0_sc = self.x0_estimate(x_t, t, zero, cond)[0] if self.config.self_cond else zero
        return self.x0_estimate(x_t, t, x0_sc, cond)

    # -- the loss
    def training_condition(self, idx):
        """With cfg_drop > 0: condition on a random-length prefix (up to half the sequence), dropped with
        probability cfg_drop so the same network also learns the unconditional model guidance needs."""
        if self.cond_emb is None:
            return None
        (B, L), dev = idx.shape, idx.device
        plen = (torch.rand(B, device=dev) * (L // 2 + 1)).long()
        plen = torch.where(torch.rand(B, device=dev) < self.config.cfg_drop, 0, plen)
        return torch.where(torch.arange(L, device=dev)[None] < plen[:, None], idx, -1)

    def forward(self, idx):
        x0 = self.clean(idx)
        t, noise, x_t = self.noisy_draw(x0)
        loss = self.denoising_loss(idx, x0, t, noise, x_t, self.training_condition(idx))
        return loss + (self.rounding_loss(idx) + self.process.prior_kl(x0).mean().float())

    def rounding_loss(self, idx):
        """Mean over positions of -log p(w | c_w) under the distance logits of rounding_logits: a function of the id w
        alone, so each distinct id of the batch is scored once and weighted by its count (the same loss, a fraction
        of the vocabulary-wide work). Compiled, every position is scored: unique() has a shape known only at run time."""
        ids = idx.flatten()
        if torch.compiler.is_compiling():
            return F.cross_entropy(rounding_logits(self.clean(ids), self.table()), ids)
        ids, counts = ids.unique(return_counts=True)
        ce = F.cross_entropy(rounding_logits(self.clean(ids), self.table()), ids, reduction='none')
        return (ce * counts).sum() / idx.numel()

    def noisy_draw(self, x0):
        """A training draw: t per sequence (stratified over 1..T, or real in (0, T]), the noise eps and x_t."""
        t = stratified_times(x0.shape[0], self.config.T, None, x0.device, continuous=self.config.continuous_time)
        noise = torch.randn_like(x0)
        return t, noise, self.process.q_sample(x0, t, noise)

    @staticmethod
    def self_cond_rows(B, device):
        """Which sequences of a batch of B train with self-conditioning: half of them (Chen et al.'s rate 1/2). Returns
        the (B + 1) // 2 rows the first pass runs on, at random, and a 0/1 weight per row: 1, except that for an odd B
        the last row's is a coin, so every row is self-conditioned with probability exactly 1/2. Fixed shapes and no
        host sync: one graph under torch.compile."""
        coin = torch.randint(2, (), device=device)  # drawn whatever B: one draw per step, so the stream is the same
        rows = torch.randperm(B, device=device)[:(B + 1) // 2]
        keep = torch.ones(len(rows), device=device)
        if B % 2:
            keep[-1] = coin
        return rows, keep

    def denoising_loss(self, idx, x0, t, noise, x_t, cond=None):
        """predict='x0': ||x0_hat - x0||^2 + CE(logits, w); predict='eps': ||eps_hat - eps||^2. Records this t's term
        of the bound for the time proposal of position_nll."""
        x0_sc = torch.zeros_like(x_t)
        if self.config.self_cond:
            rows, keep = self.self_cond_rows(x0.shape[0], idx.device)
            # those sequences see the stop-gradient estimate they would get at sampling time; the gradient-free first
            # pass runs on them alone, so it costs half a forward pass, not a whole one
            with torch.no_grad():
                first = self.x0_estimate(x_t[rows], t[rows], x0_sc[rows], None if cond is None else cond[rows])[0]
            x0_sc = x0_sc.index_copy(0, rows, first * keep.to(first.dtype).view(-1, 1, 1))
        x0_hat, logits, eps_hat = self.x0_estimate(x_t, t, x0_sc, cond)
        # the bound's steps are t = 2..T (t = 1 is the decoder's term, which update() skips); step_kl at t = 1 would
        # divide by the zero variance of q(x_0 | x_1, x_0) (abar_0 = 1), so such draws are scored at t = 2 instead
        t_kl = t if self.config.continuous_time else t.clamp(min=2)
        kl = self.process.step_kl(x0.detach(), x0_hat.detach(), t_kl).sum((1, 2)) / idx.shape[1]
        self.time_proposal.update(t, kl)
        if self.config.predict == 'eps':
            return F.mse_loss(eps_hat.float(), noise.float())
        return F.mse_loss(x0_hat.float(), x0.float()) + F.nll_loss(logits.float().flatten(0, 1), idx.flatten())

    # -- the bound
    def decoder_logprobs(self, x_1, logits):
        """log p(w | x_1), float64. predict='x0': the logits already hold the likelihood of x_1 under each token
        (x0_estimate adds it at every t). predict='eps': the rounding logits of x0_hat plus that likelihood at t = 1."""
        logp = logits.double().log_softmax(-1)
        if self.config.predict == 'eps':
            lik = self.process.token_loglik(x_1, self.process.abar_1, self.table(), torch.float64)
            logp = (logp + lik).log_softmax(-1)
        return logp

    @eval_in_full_precision
    def position_nll(self, idx, generator=None):
        """Variational bound in bits per token, one unbiased estimate per position (every term is a sum over positions):

        -log p(w) <= E_q[-log p(w | x_1)] + sum_{t=2}^T E_q KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
                     + KL(q(x_T|x_0) || N(0, I)),   x_0 = clean(w).
        The prior KL is exact, the sum one t per sequence from BoundTimeProposal weighted KL_t / q(t) (in continuous
        time the integral over (1, T] of step_kl's integrand at a real t, still / q(t)), the decoder term one draw of
        x_1. With self-conditioning p(x_{t-1} | x_t) uses the two-pass estimate x0(x_t, x0(x_t, 0)), a function of
        x_t alone: a bound of a Markov model, not of the sampler (which feeds the previous step's estimate)."""
        B, device = idx.shape[0], idx.device
        x0 = self.clean(idx)
        prior = self.process.prior_kl(x0.double()).sum(-1)
        t, q_t = self.time_proposal.draw(B, generator, device)
        x_t = self.process.q_sample(x0, t, randn(x0.shape, generator, device).to(x0.dtype))
        kl_sum = self.process.step_kl(x0, self.denoise(x_t, t)[0], t).sum(-1) / q_t[:, None]
        one = torch.ones(B, dtype=self.process.time_dtype, device=device)
        x_1 = self.process.q_sample(x0, one, randn(x0.shape, generator, device).to(x0.dtype))
        logp = self.decoder_logprobs(x_1, self.denoise(x_1, one)[1])
        return (prior + kl_sum - logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1)) / math.log(2)

    # -- the sampler: x_T ~ N(0, I), then one DDPM or DDIM step per grid interval (t, s), down to s = 0
    def init_state(self, n, length, fixed, generator, opts):
        if opts.get('guidance_scale', 1.0) != 1.0 and self.config.cfg_drop == 0.0:
            raise ValueError("guidance_scale != 1 needs a model trained with cfg_drop > 0")
        if opts['sampler'] not in ('ddpm', 'ddim'):
            raise ValueError(f"sampler={opts['sampler']!r}, expected 'ddpm' or 'ddim'")
        x = randn((n, length, self.table().shape[1]), generator, fixed.device).to(next(self.parameters()).dtype)
        known = self.clean(fixed.clamp(min=0))
        return {'x': x, 'x0_sc': None, 'x0_hat': None, 'out': None, 'known': known}

    def step(self, state, t, s, fixed, generator, opts):
        """x_t -> x_s, DDPM's posterior draw or DDIM, at the x0 estimate: self-conditioned on the previous step's (two
        network evaluations at the first step with self-conditioning, else one), with classifier-free guidance x0_u +
        w (x0_c - x0_u) when the model has a prompt condition and guidance_scale w != 1 (x0_u: with no prompt), and
        snapped to its most likely token with clamp=True. Fixed positions get a fresh draw of q(x_s | x_0 = the token)."""
        x = state['x']
        t, s = self.time_batch(t, x), self.time_batch(s, x)

        def estimate(cond):  # (x0_hat, logits) at x_t
            self.nfe += 2 if self.config.self_cond and state['x0_sc'] is None else 1
            return self.denoise(x, t, cond, state['x0_sc'])[:2]
        x0_hat, out = estimate(fixed if self.config.cfg_drop > 0 else None)
        w = opts.get('guidance_scale', 1.0)  # (analog has no prompt condition)
        if w != 1.0:
            x0_u, out_u = estimate(torch.full_like(fixed, -1))
            x0_hat, out = x0_u + w * (x0_hat - x0_u), out_u + w * (out - out_u)
        if opts['clamp']:
            x0_hat = self.clean(out.argmax(-1))  # the clamping trick: snap to the most likely token
        noise, known_noise = (randn(x.shape, generator, x.device).to(x.dtype) for _ in range(2))
        if opts['sampler'] == 'ddpm':
            x_s = self.process.ddpm_step(x0_hat, x, t, s, noise)
        else:
            x_s = self.process.ddim_step(x0_hat, x, t, s, opts['eta'], noise)
        known_s = self.process.q_sample(state['known'], s, known_noise)  # infilling by imputation
        x_s = torch.where((fixed >= 0).unsqueeze(-1), known_s, x_s)
        return {**state, 'x': x_s, 'x0_sc': x0_hat if self.config.self_cond else None, 'x0_hat': x0_hat, 'out': out}

    def current_tokens(self, state):  # also the output: the last step lands on s = 0, where x_0 = x0_hat
        return state['out'].argmax(-1)


# -------- analog: embed's Gaussian diffusion over the id's bits as reals (Chen et al.'s Bit Diffusion, "Analog Bits")
class AnalogBitDiffusion(EmbedDiffusion):
    """Analog Bits (Chen, Zhang & Hinton 2023): embed's process, network estimate, bound and sampler, the clean states
    the id's k = code_bits(V) bits as +-scale reals, read through BitCodeInput; x0_hat, the posterior mean of the valid
    ids' codes, is never an invalid code's. Loss (forward): embed's without the rounding and prior terms (the codes are
    fixed). Sampler (step): embed's, with asymmetric time intervals (td)."""
    sample_options = {'sampler': 'ddim', 'eta': 0.0, 'clamp': False, 'td': 0.0}
    lookup_only = ('backbone.wpe.weight', 'bit_input.code_emb.weight')
    no_decay = ()

    def __init__(self, config):
        LanguageModel.__init__(self, config)  # the process; embed's input and head are not analog's
        self.num_bits = nb = code_bits(config.vocab_size)  # 16 for GPT-2's ids, 13 for a compact 8k
        self.bit_input = BitCodeInput(2 * nb if config.self_cond else nb, config.n_embd, config.bias, nb)
        self.backbone = Backbone(config, causal=False, time_cond=True)
        self.add_head(nb)
        self.register_buffer('codes', valid_codes(config.vocab_size), persistent=False)
        init_weights(self, config.n_layer)

    def table(self):
        return (2 * self.codes - 1) * self.config.analog_scale

    def features(self, x_t, x0_sc, cond):
        return self.bit_input(x_t, x0_sc if self.config.self_cond else None)

    def forward(self, idx):
        x0 = self.clean(idx)
        return self.denoising_loss(idx, x0, *self.noisy_draw(x0))

    def step(self, state, t, s, fixed, generator, opts):
        """embed's step from grid time t, landing at s - td (t - s) (not below 0) while the network is told t: Analog
        Bits' asymmetric time intervals, which help when few steps are used (Chen et al. 2023, sec. 3)."""
        further = opts['td'] * (t - s)
        return super().step(state, t, max(0, s - (further if self.config.continuous_time else round(further))), fixed,
                            generator, opts)


# -------- bits: bit-flip diffusion, D3PM-style, on the k = code_bits(V) bits of the id (16 for GPT-2)
class BitDiffusion(LanguageModel):
    """Bit flips of the id's k bits (BitFlipDiffusion) with a head over the ids, p(w | b_t), whose clean-bit marginals
    sum_w p(w | b_t) bit_k(w) a factorised k-bit head could give only with a memorised code of every id. Loss
    (forward): CE(logits, w) + the binary CE of the marginals. Transition: p(b_s | b_t) = sum_w p(w | b_t) q(b_s | b_t,
    b_0 = code(w)), any s < t (D3PM's x0-parameterisation): the sampler (step) draws w, then b_s from the exact
    posterior, at the end the id from the decoder p(w | b_1); the bound (position_nll) scores the same mixture."""
    processes = (BitFlipDiffusion, ContinuousBitFlipDiffusion)
    sample_options = {'temperature': 1.0}
    lookup_only = ('backbone.wpe.weight', 'bit_input.code_emb.weight')

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer('codes', valid_codes(config.vocab_size), persistent=False)
        self.num_bits = code_bits(config.vocab_size)  # 16 for GPT-2's ids, 13 for a compact 8k
        self.bit_input = BitCodeInput(self.num_bits, config.n_embd, config.bias, self.num_bits)
        self.backbone = Backbone(config, causal=False, time_cond=True)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        init_weights(self, config.n_layer)

    def id_logits(self, b_t, t):
        """Logits over the valid ids given b_t (0/1): the network's plus the exact log q(b_t | w) (code_loglik), so
        at low noise, where the flips say almost everything, the posterior is right by construction."""
        h = self.backbone(self.bit_input(2 * b_t - 1), t.float() / self.config.T)
        return self.lm_head(h).float() + self.process.code_loglik(b_t, t, self.codes)

    def marginals(self, logits, dtype=torch.float32):
        """P(b_0,k = 1) = sum_w softmax(logits)_w bit_k(w): (..., V) -> (..., 16)."""
        return logits.to(dtype).softmax(-1) @ self.codes.to(dtype)

    def forward(self, idx):
        B, L = idx.shape
        b0 = ids_to_bits(idx, self.num_bits).float()
        t = stratified_times(B, self.config.T, None, idx.device, continuous=self.config.continuous_time)
        b_t = self.process.q_sample(b0, t)
        logits = self.id_logits(b_t, t).float()
        p1 = self.marginals(logits).clamp(1e-6, 1 - 1e-6)
        # the bound's term at this t, recorded for the adaptive time proposal of position_nll
        with torch.no_grad():
            kl = self.bound_term(b0, b_t, logits.detach(), t, None, near=False)
        self.time_proposal.update(t, kl.float().sum(1) / L)
        ce = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
        return ce + F.binary_cross_entropy(p1, b0)

    # -- the bound
    @eval_in_full_precision
    def position_nll(self, idx, generator=None):
        """Variational bound in bits per token, one unbiased estimate per position:

        -log p(w) <= E[-log p(w | b_1)] + sum_{t=2}^T E KL(q(b_{t-1}|b_t,b_0) || p(b_{t-1}|b_t)) + KL(q(b_T|b_0) || U),
        the sum one t per sequence from BoundTimeProposal weighted KL_t / q(t), KL_t against the model's transition,
        the mixture over clean ids (BitFlipDiffusion.step_kl); in continuous time the integral of rate_kl."""
        B, device = idx.shape[0], idx.device
        b0 = ids_to_bits(idx, self.num_bits).double()
        t, q_t = self.time_proposal.draw(B, generator, device)
        b_t = self.process.q_sample(b0, t, generator)
        kl = self.bound_term(b0, b_t, self.id_logits(b_t, t), t, generator) / q_t[:, None]
        one = torch.ones(B, dtype=self.process.time_dtype, device=device)
        b_1 = self.process.q_sample(b0, one, generator)
        logp = self.id_logits(b_1, one).double().log_softmax(-1)  # the decoder p(w | b_1), flip likelihood included
        prior = self.process.prior_kl(self.num_bits)
        return (prior + kl - logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1)) / math.log(2)

    def bound_term(self, b0, b_t, logits, t, generator, near=True):
        """The bound's term at t per position, nats: the step's KL or, in continuous time, the jump processes' rate
        integrand at real t (no draw needed). The steps are t = 2..T (t = 1 is the decoder's); training also draws
        t = 1, whose step 1 -> 0 has no KL: those draws are scored at t = 2, and the time proposal skips them."""
        if self.config.continuous_time:
            return self.process.rate_kl(b0, b_t, self.marginals(logits, torch.float64), t)
        return self.process.step_kl(b0, b_t, logits, self.codes, t.clamp(min=2), generator,
                                    dtype=torch.float64 if near else torch.float32, near=near)

    # -- the sampler: b_T uniform, then ancestral steps through the mixture p(b_s | b_t), the decoder at the end
    def init_state(self, n, length, fixed, generator, opts):
        b = (rand((n, length, self.num_bits), generator, fixed.device) < 0.5).float()
        return {'b': b, 'logits': None, 'known': ids_to_bits(fixed.clamp(min=0), self.num_bits).float()}

    def step(self, state, t, s, fixed, generator, opts):
        b = state['b']
        t_batch, s_batch = self.time_batch(t, b), self.time_batch(s, b)
        logits = self.id_logits(b, t_batch).float() / max(opts['temperature'], 1e-8)
        self.nfe += 1
        if s == 0:  # the last step read b_1: final_tokens draws from the decoder p(w | b_1)
            return {**state, 'b_in': b, 'logits': logits}
        # ancestral step from the mixture p(b_s | b_t): draw a clean id from p(w | b_t), then every bit of b_s
        # from the exact posterior q(b_s | b_t, b_0 = its code), so a token's bits move together
        w = draw_categorical(logits.flatten(0, 1), generator, 1.0 if opts['temperature'] > 0 else 0.0)
        p1 = self.process.posterior_prob_one(b, self.codes[w].view(b.shape).double(), t_batch, s_batch)
        b_next = (rand(b.shape, generator, b.device) < p1).float()
        # infilling by imputation: known positions get a fresh draw of q(b_s | b_0 = known)
        known_s = self.process.q_sample(state['known'], s_batch, generator)
        return {**state, 'b': torch.where((fixed >= 0).unsqueeze(-1), known_s, b_next), 'b_in': b, 'logits': logits}

    def current_tokens(self, state):
        return state['logits'].argmax(-1)

    def final_tokens(self, state, generator, opts):
        # the id from the decoder p(w | b_1) of the last step, its logits divided by the temperature (0: the argmax)
        logp = state['logits'].double().log_softmax(-1)
        return draw_categorical(logp.flatten(0, 1), generator, float(opts['temperature'] > 0)).view(logp.shape[:-1])


# -------- mask: masked (absorbing-state) diffusion, MDLM
class MaskedDiffusion(LanguageModel):
    """MDLM (Sahoo et al. 2024): each token is [MASK] with probability 1 - alpha_t, t in [0, 1]. SUBS: p(x_0 | z_t)
    puts no mass on [MASK] or padding, unmasked tokens are carried over (the loss counts masked ones only). Loss:
        E_t [ -alpha'_t / (1 - alpha_t) sum_{masked l} -log p(x_l | z_t) ] / L  nats per token,
    the continuous-time ELBO with t integrated out (nll): the same number for every schedule alpha_t."""
    sample_options = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0, 'cached': True, 'order': 'random'}
    extra_ids = 1  # the [MASK] id, vocab_size

    def __init__(self, config):
        super().__init__(config)
        self.mask_id = config.vocab_size
        self.schedule = MaskSchedule(config.mask_schedule)
        self.default_steps, self.max_steps = config.block_size, 100_000
        self.tok_emb = nn.Embedding(self.padded_vocab, config.n_embd)  # also the output layer (tied)
        self.backbone = Backbone(config, causal=False, time_cond=config.time_cond)
        init_weights(self, config.n_layer)

    def log_probs(self, z, t):
        """log p(x_0 | z_t) over the real vocabulary with [MASK] and padding excluded (SUBS)."""
        h = self.backbone(self.tok_emb(z), t if self.config.time_cond else None)
        return vocab_logits(h, self.tok_emb, self.config.vocab_size).float().log_softmax(-1)

    def masked_subset(self, idx, generator, stratified):
        """(z, masked, m, t) for the ELBO with t integrated out: m ~ U{1..L} positions masked, t given m (time_cond)."""
        B, L = idx.shape
        masked, m = self.schedule.random_subset(B, L, generator, idx.device, stratified)
        t = self.schedule.time_given_count(m, L, generator, idx.device) if self.config.time_cond else None
        return torch.where(masked, self.mask_id, idx), masked, m, t

    def forward(self, idx):
        """The ELBO per token in nats by nll()'s estimator: the mean NLL over the m masked positions. Its expectation
        is MDLM's 1/t-weighted loss, but where that puts a weight ~1000 on a handful of tokens, here every sequence
        carries the same total weight."""
        z, masked, m, t = self.masked_subset(idx, None, stratified=True)
        nll = -self.log_probs(z, t).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        return ((nll * masked).sum(1) / m).mean()

    @eval_in_full_precision
    def position_nll(self, idx, generator=None):
        """The continuous-time ELBO in bits per token, one unbiased draw per position. Integrating t out (the mask rate
        pi = 1 - alpha_t has dt weight dpi / pi, and int_0^1 pi^(m-1) (1-pi)^(L-m) C(L, m) dpi = 1/m) turns it into
            sum_{m=1}^L (1/m) E_{|M| = m} [ sum_{l in M} -log p(x_l | x with M masked) ]
          = E_{m ~ U{1..L}} [ (L/m) sum_{l in M} -log p(x_l | ...) ],
        one draw of m and of a subset M per sequence: the same bound for every schedule, with bounded variance
        (unlike the 1/t weight). A time-conditioned network gets a t drawn given |M| = m (time_given_count)."""
        z, masked, m, t = self.masked_subset(idx, generator, stratified=False)
        nll = -self.log_probs(z, t).gather(-1, idx.unsqueeze(-1)).squeeze(-1).double()
        return nll * masked * (idx.shape[1] / m.double()[:, None]) / math.log(2)

    # -- sampler hooks
    def time_grid(self, steps, fixed):
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        return list(zip(ts[:-1], ts[1:]))

    def init_state(self, n, length, fixed, generator, opts):
        if opts['order'] not in ('random', 'confidence'):  # (see step)
            raise ValueError(f"order={opts['order']!r}, expected one of ('random', 'confidence')")
        z = torch.where(fixed >= 0, fixed, self.mask_id)
        return {'z': z, 'logp': None, 'changed': True, 'expected': (z == self.mask_id).sum(1, keepdim=True).double()}

    def step(self, state, t, s, fixed, generator, opts):
        """Step t -> s. order='random' is the ancestral step: each masked token is revealed with probability r =
        (alpha_s - alpha_t)/(1 - alpha_t), drawn from p(x_0 | z_t). order='confidence' (MaskGIT; LLaDA's low-confidence
        remasking) draws at every masked position and keeps the k most probable draws of each row: k = masked -
        round(e_s), e_s = e_t (1 - r) the row's expected count still masked under order='random' (e at the start: the
        masked count), so the count follows that expectation within 1/2 at any number of steps, the easy tokens first;
        not the model's distribution (lower entropy, better judged text), and the bound does not cover it. Revealed
        tokens never change. The network is skipped when nothing changed and it does not see t (the same output)."""
        z, logp = state['z'].clone(), state['logp']
        n, device = z.shape[0], z.device
        if logp is None or state['changed'] or self.config.time_cond or not opts['cached']:
            t_batch = torch.full((n,), t, device=device)
            logp = self.log_probs(z, t_batch)
            self.nfe += 1
        rate = self.schedule.reveal_prob(t, s)
        masked, expected = z == self.mask_id, state['expected'] * (1 - rate)
        draw = functools.partial(draw_categorical, generator=generator, temperature=opts['temperature'],
                                 top_k=opts['top_k'], top_p=opts['top_p'])
        if opts['order'] == 'random':
            reveal = masked & (rand(z.shape, generator, device) < rate)
            if reveal.any():
                z[reveal] = draw(logp[reveal])
        else:
            count = masked.sum(1, keepdim=True) - expected.round().long()
            draws = torch.full_like(z, -1)
            if count.any():
                draws[masked] = draw(logp[masked])
            conf = torch.where(masked, logp.gather(-1, draws.clamp(min=0).unsqueeze(-1)).squeeze(-1), -math.inf)
            rank = conf.argsort(dim=1, descending=True, stable=True).argsort(1)  # 0: the row's most probable draw
            reveal = masked & (rank < count)
            z[reveal] = draws[reveal]
        return {'z': z, 'logp': logp, 'changed': bool(reveal.any()), 'expected': expected}

    def current_tokens(self, state):
        z = state['z']
        return torch.where(z == self.mask_id, state['logp'].argmax(-1), z)

    def final_tokens(self, state, generator, opts):
        return state['z']


# -------- ar: the autoregressive baseline (and the judge for generative perplexity)
class AutoregressiveLM(LanguageModel):
    """GPT on the same backbone: causal attention, no time input (adaLN from a learned constant). Windows are
    block_size + 1 tokens: it reads the first block_size and predicts the next token at each position. Generation is
    left to right with a KV cache, starting from <|endoftext|> (the last id)."""
    extra_tokens = 1
    sample_options = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0}
    fixed_steps = True
    exact_likelihood = True

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

    @eval_in_full_precision
    def position_nll(self, idx, generator=None):
        """Exact NLL of each token of idx[:, 1:] given its prefix, in bits."""
        logp = self.logits(idx[:, :-1]).float().log_softmax(-1)
        nll = -logp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1).double()
        return nll / math.log(2)

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


# -------- Construction (checkpoints: checkpoint.py)
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

