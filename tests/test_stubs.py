"""The type stubs of the modules built from the registry (optkern/_classes.pyi,
optkern/functional.pyi) are current: rendering them again gives the files in the package, byte for
byte. A stale stub fails here; ``python -m optkern._stubs`` rewrites it."""

import ast
import inspect

import pytest

import optkern as ok
from optkern import _stubs

MODULES = _stubs.modules()


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_stub_is_current(module):
    path = _stubs.stub_path(module)
    assert path.exists(), f"{path} is missing: run python -m optkern._stubs"
    assert path.read_text() == _stubs.render(module), f"{path} is stale: run python -m optkern._stubs"


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_stub_names_every_public_name_with_its_signature(module):
    tree = ast.parse(_stubs.stub_path(module).read_text())
    defined = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert set(module.__all__) <= set(defined)
    for name in module.__all__:
        obj = getattr(module, name)
        node = defined[name]
        if inspect.isclass(obj):
            node = next(n for n in node.body if getattr(n, "name", None) == "__init__")
            obj = obj.__init__
        args = node.args
        stub = [a.arg for a in args.posonlyargs + args.args] + [a.arg for a in args.kwonlyargs]
        assert stub == list(inspect.signature(obj).parameters), name


def test_every_rule_has_a_class_and_a_function_in_the_stubs():
    classes = _stubs.stub_path(MODULES[0]).read_text()
    functions = _stubs.stub_path(MODULES[1]).read_text()
    for r in ok.registry.rules():
        assert f"\nclass {r.cls}(" in classes
        assert f"\ndef {r.name}_(" in functions


def test_check_mode_reports_a_stale_stub(tmp_path, monkeypatch, capsys):
    module = MODULES[1]
    stale = tmp_path / "functional.pyi"
    stale.write_text("# an old stub\n")
    monkeypatch.setattr(_stubs, "modules", lambda: [module])
    monkeypatch.setattr(_stubs, "stub_path", lambda m: stale)
    assert _stubs.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().out
    assert stale.read_text() == "# an old stub\n"  # --check writes nothing
    assert _stubs.main([]) == 0
    assert stale.read_text() == _stubs.render(module)
    assert _stubs.main(["--check"]) == 0
