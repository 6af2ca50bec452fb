"""No rule is listed by hand outside its own file: code names a rule only in its rule file
(src/cpp/rules/<kernel>.inc) and in the list of rule files (src/cpp/rules/list.inc); everything
else (the classes, optkern.torch, optkern.functional, the examples' and benchmarks' sets) derives
from the registry, so a new rule needs no edit elsewhere.

What counts as naming a rule, in the package's sources (src/):
- a rule's class name (``Adam``, case-sensitive), its name (``adam``) or its functional name
  (``adam_``);
- as an identifier, or as a whole string literal (``"Adam"``, ``name == "adam"``), in Python
  and in C++; not in comments, docstrings or other text (an error message or a help line that
  says "as Adam's" gives an example; it lists nothing).
A rule name that is also a hyperparameter's name (``momentum``) counts only as its class name
(``Momentum``). A kernel's name is its first rule's, or that of code its rules share
(optkern.schedule_free: the Schedule-Free rules' train/eval switch): not counted by itself. The
generated stubs (``*.pyi``, written by optkern._stubs from the registry and checked by
test_stubs) are not read.

KNOWN holds the code that still names rules, file by file, with the reason: code whose subject
is that rule (a study of its step, a program that uses it, a hand-written NumPy version of it).
The test fails on any name found beyond it, and on any entry that no longer occurs, so the list
only shrinks.
"""

from __future__ import annotations

import functools
import io
import pathlib
import re
import tokenize
from typing import Dict, Set

import pytest

import optkern

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
RULES = optkern.registry.rules()
HYPER_NAMES = {h.name for r in RULES for h in r.hyper}

#: file (relative to src/) -> the rules (class names) its code still names, and why.
KNOWN: Dict[str, Set[str]] = {
    # Nesterov: a preset of SGD's class (SGD with nesterov=True), a class of its own
    "optkern/_classes.py": {"SGD"},
    # the one-rule studies' rule: the small-buffers study by default, and what
    # --distributed measures (its help); runner.py: the fused-clipping study
    "optkern/benchmark/__init__.py": {"Adam"},
    "optkern/benchmark/runner.py": {"Adam"},
    # the distributed study: Adam's step over MPI ranks, and its two moments' bytes
    "optkern/benchmark/distributed.py": {"Adam"},
    # the main table's hand-written NumPy version of each of these rules, beside optkern's step
    "optkern/benchmark/cases.py": {
        "SGD",
        "Momentum",
        "RMSprop",
        "Adagrad",
        "Adadelta",
        "Adam",
        "AdamW",
    },
    # the training-loop study's measured target for each of these rules
    "optkern/benchmark/loops.py": {"RMSprop", "Adadelta", "Adam", "AdamW"},
    # third-party training programs replayed as they are written, each with its own rule
    "optkern/benchmark/programs.py": {"SGD", "RMSprop", "Adagrad", "Adam"},
    # the step-cost study: SGD's and Adam's step against their NumPy lines
    "optkern/benchmark/step_cost.py": {"SGD", "Adam"},
    # studies of named rules: the per-element cost of each kernel family (SGD, Lion, Adam,
    # RMSprop, Adadelta, LAMB) and the threshold near it, the passes of Adafactor and LAMB
    # against the stream, torch's step phases and the precision studies (Adam)
    "optkern/benchmark/studies.py": {
        "SGD",
        "RMSprop",
        "Adadelta",
        "Adam",
        "Lion",
        "LAMB",
        "Adafactor",
    },
    # the recommender example: the row-sparse rules against dense Adam, each at its tuned lr
    "optkern/examples/recommender.py": {"SparseAdam", "Adagrad", "SGD", "Adam"},
    # the Muon example: Muon's hidden matrices beside AdamW for the rest, against Adam and AdamW
    "optkern/examples/muon_mlp.py": {"Adam", "AdamW"},
    # a fact of torch's: its SparseAdam class refuses dense gradients and keeps an int step
    "optkern/torch.py": {"SparseAdam"},
    # the thread study's default pair: a rule of weight 4 (Adam) and one of weight 1 (SGD)
    "optkern/benchmark/threads.py": {"SGD", "Adam"},
    # optkern.torch's per-parameter overhead: okt.Adam against F.adam_ and torch's fused Adam
    "optkern/benchmark/torch_bench.py": {"Adam"},
    # examples whose subject is these rules: SGD against Momentum and Nesterov in a narrow
    # valley; batch, mini-batch and stochastic gradient descent on linear regression
    "optkern/examples/ill_conditioned.py": {"SGD", "Momentum"},
    "optkern/examples/linear_regression.py": {"SGD"},
}


def _names() -> Dict[str, Set[str]]:
    """Each word that names a rule -> the class names of the rules it names."""
    out: Dict[str, Set[str]] = {}
    for r in RULES:
        for w in {r.cls} | {w for w in (r.name, r.name + "_") if w not in HYPER_NAMES}:
            out.setdefault(w, set()).add(r.cls)
    return out


NAMES = _names()


def _literal(token: str) -> str:
    """The text of a Python string literal: any prefix, any quotes."""
    body = token.lstrip("rRbBuUfF")
    quote = body[:3] if body[:3] in ('"""', "'''") else body[:1]
    return body[len(quote) : -len(quote)]


def _python_refs(text: str) -> Set[str]:
    found: Set[str] = set()
    for t in tokenize.generate_tokens(io.StringIO(text).readline):
        if t.type == tokenize.NAME:
            found |= NAMES.get(t.string, set())
        elif t.type == tokenize.STRING:
            found |= NAMES.get(_literal(t.string), set())
    return found


CPP_TOKEN = re.compile(
    r'//[^\n]*|/\*.*?\*/|R"\((?:.|\n)*?\)"|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|[A-Za-z_]\w*',
    re.S,
)


def _cpp_refs(text: str) -> Set[str]:
    found: Set[str] = set()
    for m in CPP_TOKEN.finditer(text):
        tok = m.group(0)
        if tok.startswith(("//", "/*", 'R"(', "'")):
            continue
        found |= NAMES.get(tok[1:-1] if tok.startswith('"') else tok, set())
    return found


def _own(path: str) -> Set[str]:
    """The rules whose own file this is: rules/<kernel>.inc; list.inc lists every rule."""
    if path == "cpp/rules/list.inc":
        return {r.cls for r in RULES}
    return {r.cls for r in RULES if path == f"cpp/rules/{r.kernel}.inc"}


@functools.lru_cache(maxsize=None)
def references() -> Dict[str, Set[str]]:
    """File (relative to src/) -> the class names of the rules its code names, its own aside."""
    out: Dict[str, Set[str]] = {}
    for path in sorted(SRC.rglob("*")):
        rel = path.relative_to(SRC).as_posix()
        if path.suffix == ".py":
            found = _python_refs(path.read_text(encoding="utf-8"))
        elif path.suffix in (".cpp", ".hpp", ".inc"):
            found = _cpp_refs(path.read_text(encoding="utf-8"))
        else:
            continue
        found -= _own(rel)
        if found:
            out[rel] = found
    return out


def test_the_scanner_sees_names_in_code_and_not_in_prose():
    assert _python_refs('"""As Adam does."""\nx = 1  # Adam\ny = "as Adam\'s"\n') == set()
    assert _python_refs("x = ok.Adam\n") == {"Adam"}
    assert _python_refs("x = [\"SGD\", 'Lion', r'''LAMB''', f\"Rprop\"]\n") == {
        "SGD",
        "Lion",
        "LAMB",
        "Rprop",
    }
    assert _python_refs("F.adam_(p)\nif name == 'schedule_free_sgd': pass\n") == {
        "Adam",
        "ScheduleFreeSGD",
    }
    assert _python_refs('x = {"momentum": 0.9}\n') == set()  # a hyperparameter
    assert _python_refs("from .schedule_free import ScheduleFreeSwitch\n") == set()
    cpp = '// Adam\n/* SGD */\nif (name == "adam") {}\nconst char* d = "as Lion";\n'
    assert _cpp_refs(cpp) == {"Adam"}
    assert _cpp_refs("AdamStep<R> s; adam_common(h);\n") == set()


@pytest.mark.parametrize("path", sorted(set(KNOWN) | set(references())))
def test_no_rule_is_named_outside_its_own_file(path):
    found, known = references().get(path, set()), KNOWN.get(path, set())
    assert found == known, (
        f"src/{path} names {sorted(found - known)} in its code: derive them from "
        f"optkern.registry (or, where the code is about that rule, add it to KNOWN); "
        f"it no longer names {sorted(known - found)}: drop them from KNOWN"
    )
