"""
What the families' likelihood bounds share beyond the maths of diffusion.py: the mode position_nll() runs in
(`eval_in_full_precision`), and the adaptive proposal over time steps with which the discrete-time bounds (embed,
analog, bits) importance-sample their sum over steps. BoundTimeProposal is a module for its buffers alone: its
statistics travel in checkpoints as the family's `time_proposal.*` entries.
"""

import functools

import torch
import torch.nn as nn

from diffusion import log_snr_drop_proposal, rand
from util import in_eval_mode


def eval_in_full_precision(method):
    """For position_nll(): no gradients, eval mode, no autocast: the Gaussian bounds multiply every error in the x0
    estimate by SNR/2 (~1e4 near t = 1), so bf16 rounding alone would add bits per token."""
    @functools.wraps(method)
    @in_eval_mode
    def wrapper(self, idx, *args, **kwargs):
        with torch.no_grad(), torch.autocast(idx.device.type, enabled=False):
            return method(self, idx, *args, **kwargs)
    return wrapper


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
