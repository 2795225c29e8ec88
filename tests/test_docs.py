"""Every number the documentation quotes comes from a committed results file: each table row of EXPERIMENTS.md and
of the README's results is regenerated from the file its section names (sweep.py's, evaluate.py's or bench.py's
tables, made from results.json / bench.json by the same functions that wrote them) and compared, and every decimal
in their prose must be a value of those files at the precision quoted.

One-line mutations each test was checked to catch: a table cell changed by one digit in EXPERIMENTS.md (rows);
a prose figure changed in the last digit (prose); sweep.summary_table's gain written without its seeds' spread,
`g['se_eval']` for `g['se']` (summary)."""
import json
import os
import re

import pytest

import bench
import evaluate
import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/
SOURCE = re.compile(r'`(results/[\w./-]+\.json)`')
DECIMAL = re.compile(r'(?<![\w.])[-+]?\d[\d,]*\.\d+(?![\w.])')


def read(name):
    with open(os.path.join(ROOT, name), encoding='utf-8') as f:
        return f.read()


def sections(text):
    """{heading: body} of a markdown document's ## sections (### stay inside their section)."""
    parts = re.split(r'^## ', text, flags=re.M)
    return {p.split('\n', 1)[0].strip(): p.split('\n', 1)[1] if '\n' in p else '' for p in parts[1:]}


def regenerated(path):
    """The tables and figures a results file holds, as text, made again by the code that writes them."""
    res = json.load(open(os.path.join(ROOT, path)))
    if 'sweep' in res:
        return sweep.markdown(res) + '\n' + '\n'.join(sweep.summary_table(res)), res
    if 'train' in res and 'peak_flops' in res:
        return bench.tables(res), res
    return evaluate.markdown_table(res), res


def values(obj):
    """Every number in a JSON document."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from values(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def quoted(number, text, res):
    """A decimal as the documentation writes it ('7.593', '1,525.5', '+1.154') is in the regenerated text, or is a
    value of the file rounded to as many decimals."""
    if number in text:
        return True
    plain = number.replace(',', '').lstrip('+')
    places = len(plain.split('.')[1])
    return any(format(v, f'.{places}f') == plain or format(-v, f'.{places}f') == plain for v in values(res))


def prose(body):
    """The section's text outside tables and code blocks."""
    body = re.sub(r'```.*?```', '', body, flags=re.S)
    return '\n'.join(line for line in body.splitlines() if not line.startswith('|'))


DOCS = [('EXPERIMENTS.md', heading, body) for heading, body in sections(read('EXPERIMENTS.md')).items()] + \
       [('README.md', heading, body) for heading, body in sections(read('README.md')).items() if heading == 'Results']


@pytest.mark.parametrize('doc, heading, body', DOCS, ids=[f"{d}:{h[:30]}" for d, h, _ in DOCS])
def test_tables_and_figures_come_from_the_results_files_their_section_names(doc, heading, body):
    sources = sorted(set(SOURCE.findall(body)))
    rows = [line for line in body.splitlines() if line.startswith('| ')]
    numbers = DECIMAL.findall(prose(body))
    if not sources:
        assert not rows and not numbers, f"{doc} '{heading}' quotes figures but names no results file"
        return
    made = [regenerated(s) for s in sources]
    for row in rows:
        assert any(row in text for text, _ in made), f"{doc} '{heading}': a row no results file gives: {row}"
    for n in numbers:
        assert any(quoted(n, text, res) for text, res in made), f"{doc} '{heading}': {n} is in none of {sources}"


def test_the_readme_results_table_is_the_families_sweeps_summary():
    body = sections(read('README.md'))['Results']
    res = json.load(open(os.path.join(ROOT, 'results', 'sweep-families', 'results.json')))
    table = '\n'.join(sweep.summary_table(res))
    assert table in body
    assert len(sweep.summary_table(res)) - 2 <= 8  # at most 8 rows


def test_the_readme_sample_excerpt_is_what_the_quick_start_printed():
    """The ```text block of the README's first screen is a run of consecutive lines of results/quickstart/samples.txt
    (what the main job's `python sample.py --out_dir=out-embed-cpu` printed), at least two whole samples."""
    readme = read('README.md')
    blocks = re.findall(r'^```text\n(.*?)^```', readme[:readme.index('\n## ')], flags=re.S | re.M)
    assert len(blocks) == 1, 'expected one ```text block (the samples) before the first ## section'
    excerpt = blocks[0].splitlines()
    printed = read(os.path.join('results', 'quickstart', 'samples.txt')).splitlines()
    assert any(printed[i:i + len(excerpt)] == excerpt for i in range(len(printed)))
    assert sum(line.startswith('================ sample ') for line in excerpt) >= 2
