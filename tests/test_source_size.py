"""No C++ source file is longer than 700 lines: a file that grows past it is split where its
parts do different things (as bindings/step_plan.cpp and bindings/plan_facts.hpp were)."""

import pathlib

import pytest

CPP = pathlib.Path(__file__).resolve().parent.parent / "src" / "cpp"
SOURCES = sorted(p for p in CPP.rglob("*") if p.suffix in (".cpp", ".hpp", ".inc"))


def test_there_are_sources_to_check():
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(CPP).as_posix())
def test_at_most_700_lines(path):
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= 700, f"src/cpp/{path.relative_to(CPP).as_posix()}: {lines} lines"
