"""The docs say only what is true today: their Python snippets run, and every measured figure
names the dated results file (and so the machine) it comes from.

**Figure blocks.** README.md, bench/README.md and docs/*.md are cut into units: a paragraph; a
list item; a table row; a fenced code block. A unit that holds a measured figure, a number
directly followed by a unit of time, rate or ratio (``ms``, ``us``, ``µs``, ``ns``, ``s``,
``GB/s``, ``MB/s``, ``Gb/s``, or ``x`` as in ``1.25x``), is a figure block. It must carry a
**label**, or the paragraph introducing its list or table must (the paragraph just before it):
a Markdown link to a results file, ``[DATE, CPU, ISA, N cores...](.../bench/results/DATE-....md)``,
whose text starts with the file's date and names an ISA and the cores, and whose file exists.
A figure that is not a measurement says so, visibly, in its unit or in the paragraph
introducing its list or table: ``(computed, not measured)``, ``(assumed, not measured)`` or
``(settings, not measured)``.

**Results files** (``bench/results/*.md``) are where the figures live. Each starts with a list
naming ``Date:`` (the date of its file name), ``Machine:`` (the CPU), ``ISA:``, ``Cores:`` and
``Load:``.

**Snippets.** Every ```` ```python ```` block of those pages runs as written, the blocks of one
page in order in one namespace (as a reader types them), in a scratch directory. A block that
is not meant to run alone starts with the visible line ``# fragment: <why>`` and is skipped. A page whose blocks import torch skips when torch is missing (and runs in CI's oracle
lane, which installs it).
"""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
    [os.path.join(REPO, "README.md"), os.path.join(REPO, "bench", "README.md")]
    + glob.glob(os.path.join(REPO, "docs", "*.md"))
)
RESULTS = sorted(glob.glob(os.path.join(REPO, "bench", "results", "*.md")))

if not os.path.exists(os.path.join(REPO, "README.md")):
    # CI's wheel and sanitizer lanes run a copy of tests/ outside the source tree, without the
    # pages; lane A runs this file from the source tree.
    pytest.skip("README.md and docs/ are not beside tests/", allow_module_level=True)

FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:\s?(?:ms|us|µs|ns|s|GB/s|MB/s|Gb/s)(?![\w/])|x\b)")
LABEL = re.compile(
    r"\[(\d{4}-\d{2}-\d{2}), ([^\]]+)\]\(((?:\.\./)*bench/results/|results/)"
    r"((\d{4}-\d{2}-\d{2})-[A-Za-z0-9._-]+\.md)(?:#[^)]*)?\)"
)
ISA = re.compile(r"\b(AVX-512|AVX2|scalar|NEON|SVE)\b")
NOT_MEASURED = re.compile(r"\((?:computed|assumed|settings?), not measured\)")
FRAGMENT = "# fragment:"


def _rel(path):
    return os.path.relpath(path, REPO)


def units(text):
    """(kind, unit text, introducing paragraph or None) for a page's paragraphs, list items,
    table rows and fenced code blocks."""
    out = []
    lines = text.split("\n")
    i = 0
    chunks = []  # (kind, [lines]) separated by blank lines; fences are their own chunk
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            chunks.append(("code", lines[i : j + 1]))
            i = j + 1
            continue
        if not line.strip():
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].strip() and not lines[j].startswith("```"):
            j += 1
        chunks.append(("text", lines[i:j]))
        i = j
    previous = None
    for kind, chunk in chunks:
        first = chunk[0].lstrip()
        if kind == "code":
            out.append(("code", "\n".join(chunk), None))
            previous = None
            continue
        if first.startswith("|"):
            intro = previous
            out += [("table row", row, intro) for row in chunk]
            continue
        if re.match(r"([-*]|\d+\.) ", first):
            intro = previous
            items, current = [], []
            for row in chunk:
                if re.match(r"([-*]|\d+\.) ", row) and current:
                    items.append(current)
                    current = []
                current.append(row)
            items.append(current)
            out += [("list item", "\n".join(item), intro) for item in items]
            continue
        paragraph = "\n".join(chunk)
        out.append(("paragraph", paragraph, None))
        previous = paragraph
    return out


def labels(text):
    return list(LABEL.finditer(text))


def _label_problems(match):
    date, what, _, name, file_date = match.groups()
    problems = []
    if date != file_date:
        problems.append(f"label date {date} is not its file's ({name})")
    if not ISA.search(what):
        problems.append(f"label {match.group(0)!r} names no ISA")
    if not re.search(r"\b\d+ cores?\b", what):
        problems.append(f"label {match.group(0)!r} names no core count")
    if not os.path.exists(os.path.join(REPO, "bench", "results", name)):
        problems.append(f"label points at a missing file: bench/results/{name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_figure_carries_a_label(page):
    with open(page, encoding="utf-8") as f:
        text = f.read()
    bad = []
    for kind, unit, intro in units(text):
        for m in labels(unit) + labels(intro or ""):
            bad += _label_problems(m)
        found = FIGURE.findall(unit)
        if not found or NOT_MEASURED.search(unit) or NOT_MEASURED.search(intro or ""):
            continue
        if not labels(unit) and not labels(intro or ""):
            bad.append(f"{kind} with figures {found[:4]} and no label:\n    {unit[:200]!r}")
    assert not bad, f"{_rel(page)}:\n  " + "\n  ".join(bad)


def test_the_detector_sees_figures_and_labels():
    """The rules above, on examples: what counts as a figure, a label, a unit."""
    assert FIGURE.findall("took 1.5 ms, 20 us, 36 GB/s, 5.8x faster and 4.6 s") == [
        "1.5 ms",
        "20 us",
        "36 GB/s",
        "5.8x",
        "4.6 s",
    ]
    assert not FIGURE.findall("lr 1e-3, 2 cores, 50M elements, 98.2%, float32, Python 3.11, 5 steps")
    label = (
        "[2026-12-01, Intel Xeon, AVX-512, 2 cores](bench/results/2026-12-01-xeon-avx512-2core.md)"
    )
    assert not _label_problems(labels(label)[0])
    wrong = "[2026-12-02, Intel Xeon, 2 cores](bench/results/2026-12-01-xeon-avx512-2core.md)"
    assert len(_label_problems(labels(wrong)[0])) == 2  # date and ISA
    page = (
        "Intro with a label " + label + ":\n\n| a | b |\n|---|---|\n| x | 1.5 ms |\n\nAlone 3 ms.\n"
    )
    kinds = [(k, FIGURE.findall(u), bool(labels(u) or labels(i or ""))) for k, u, i in units(page)]
    assert ("table row", ["1.5 ms"], True) in kinds
    assert ("paragraph", ["3 ms"], False) in kinds


@pytest.mark.parametrize("path", RESULTS, ids=_rel)
def test_results_files_name_their_machine(path):
    with open(path, encoding="utf-8") as f:
        head = f.read(4000)
    name = os.path.basename(path)
    date = re.match(r"(\d{4}-\d{2}-\d{2})-", name)
    assert date, f"{name}: a results file's name starts with its date"
    fields = dict(re.findall(r"^- (Date|Machine|ISA|Cores|Load): (.+)$", head, re.M))
    missing = {"Date", "Machine", "ISA", "Cores", "Load"} - set(fields)
    assert not missing, f"{name}: no {sorted(missing)} line in its header"
    assert fields["Date"].startswith(date.group(1)), f"{name}: Date is not the file's date"
    assert ISA.search(fields["ISA"]), f"{name}: ISA line names no ISA"
    assert re.match(r"\d+\b", fields["Cores"]), f"{name}: Cores is not a number"


def test_results_exist():
    assert RESULTS, "no results file: the docs' figures have nowhere to point"


def python_blocks(text):
    """The ```python blocks of a page: (first line number, source)."""
    blocks, lines = [], text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            blocks.append((i + 2, "\n".join(lines[i + 1 : j]) + "\n"))
            i = j
        i += 1
    return blocks


PAGES_WITH_PYTHON = []
for _page in PAGES:
    with open(_page, encoding="utf-8") as _f:
        if python_blocks(_f.read()):
            PAGES_WITH_PYTHON.append(_page)


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=_rel)
def test_python_snippets_run(page, tmp_path, monkeypatch):
    with open(page, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    runnable = [(n, src) for n, src in blocks if not src.lstrip().startswith(FRAGMENT)]
    if not runnable:
        pytest.skip("every block is marked '# fragment:'")
    if any(re.search(r"^\s*import torch\b|optkern\.torch", src, re.M) for _, src in runnable):
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for n, src in runnable:
        exec(compile(src, f"{_rel(page)}:{n}", "exec"), namespace)  # noqa: S102


def test_fragment_marker_is_recognised():
    page = "```python\n# fragment: needs params\nok.SGD(params)\n```\n\n```python\nx = 1\n```\n"
    blocks = python_blocks(page)
    assert [src.lstrip().startswith(FRAGMENT) for _, src in blocks] == [True, False]
