"""Type stubs for the modules whose public names are built at import from the registry:
:mod:`optkern._classes` (the optimizer classes) and :mod:`optkern.functional` (one function per
rule). A type checker reads ``<module>.pyi`` instead of the module, so these stubs are how it
sees ``optkern.Lion`` or ``optkern.functional.adam_``.

    python -m optkern._stubs           # rewrite the stubs beside the modules (a source checkout)
    python -m optkern._stubs --check   # exit 1 if a stub is not what the registry gives now

The signatures are read from the built objects (their source text comes from
:func:`optkern.registry.class_signature` and :func:`~optkern.registry.functional_signature`), so
a stub says exactly what the module does; tests/test_stubs.py fails when one is stale.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List

HEADER = (
    '"""Type stub for {module}, written by `python -m optkern._stubs` from the rule\n'
    'declarations: do not edit (tests/test_stubs.py checks that it is current)."""\n'
)
TYPING = ("Any", "List", "Optional", "Sequence", "Tuple", "Union")
#: The formatter's line length (pyproject.toml): the stubs are laid out as ``ruff format`` lays
#: out a stub, so the format check passes on them unchanged.
LINE = 102

#: What each module's stub states besides its functions and classes (aliases and constants),
#: and the imports its annotations need.
PREAMBLE = {
    "optkern._classes": "\nfrom .optimizer import Optimizer\n",
    "optkern.functional": (
        "\nArrayList = Sequence[np.ndarray]\nSteps = Union[int, Sequence[int]]\n\n"
        "FLOAT32_MAX: float\n"
    ),
}


def _literal(value: Any) -> str:
    """A default as the formatter writes it (strings in double quotes)."""
    return '"' + value + '"' if isinstance(value, str) and '"' not in value else repr(value)


def _parameter(p: inspect.Parameter) -> str:
    text = p.name
    if p.annotation is not p.empty:
        text += f": {p.annotation}"
    if p.default is not p.empty:
        default = _literal(p.default)
        text += f" = {default}" if p.annotation is not p.empty else f"={default}"
    return text


def _def(name: str, fn: Callable, indent: str = "") -> str:
    """``def name(...) -> ...: ...`` on one line, or one parameter a line where that is longer
    than the formatter's line."""
    sig = inspect.signature(fn)
    parts: List[str] = []
    star = False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + _parameter(p))
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append("**" + _parameter(p))
        else:
            parts.append(_parameter(p))
    ret = sig.return_annotation
    returns = "" if ret is sig.empty else f" -> {ret}"
    line = f"{indent}def {name}({', '.join(parts)}){returns}: ...\n"
    if len(line) - 1 <= LINE:
        return line
    inner = "".join(f"{indent}    {p},\n" for p in parts)
    return f"{indent}def {name}(\n{inner}{indent}){returns}: ...\n"


def _list(name: str, items: List[str]) -> str:
    line = f"{name} = [{', '.join(f'{i!r}' for i in items)}]".replace("'", '"')
    if len(line) <= LINE:
        return line + "\n"
    return f"{name} = [\n" + "".join(f'    "{i}",\n' for i in items) + "]\n"


def _class(cls: type, base: type) -> str:
    """``cls`` as a subclass of ``base`` (or of the nearest class it derives from among the
    stub's own): its constructor and the public methods it adds to ``base``."""
    out = f"class {cls.__name__}({base.__name__}):\n"
    out += _def("__init__", cls.__init__, "    ")
    seen = set(dir(base))
    for name in sorted(n for n in dir(cls) if not n.startswith("_") and n not in seen):
        member = getattr(cls, name)
        if inspect.isfunction(member):
            out += _def(name, member, "    ")
    return out


def render(module: ModuleType) -> str:
    """The stub of ``module``: its ``__all__``, its public helper functions, then each name of
    ``__all__`` in that order."""
    names = list(module.__all__)
    text = PREAMBLE.get(module.__name__, "") + "\n" + _list("__all__", names) + "\n"
    helpers = sorted(
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and n not in names
        and inspect.isfunction(v)
        and v.__module__ == module.__name__
    )
    stubbed: Dict[Any, str] = {}
    for i, name in enumerate(helpers + names):
        obj = getattr(module, name)
        if inspect.isclass(obj):
            base = next(b for b in obj.__mro__[1:] if b in stubbed or b.__name__ == "Optimizer")
            text += ("\n" if i else "") + _class(obj, base)
            stubbed[obj] = name
        else:
            text += _def(name, obj)
    words = set(re.findall(r"[A-Za-z_]+", text))
    imports = []
    if words.intersection(TYPING):
        imports.append(f"from typing import {', '.join(n for n in TYPING if n in words)}\n")
    if "np" in words:
        imports.append("import numpy as np\n")
    return HEADER.format(module=module.__name__) + "\n" + "\n".join(imports) + text


def modules() -> List[ModuleType]:
    from . import _classes, functional

    return [_classes, functional]


def stub_path(module: ModuleType) -> Path:
    return Path(module.__file__).with_suffix(".pyi")  # type: ignore[arg-type]


def main(argv: List[str]) -> int:
    check = "--check" in argv
    stale = []
    for module in modules():
        path, text = stub_path(module), render(module)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(str(path))
        if not check:
            path.write_text(text)
    if stale:
        print(("stale: " if check else "wrote: ") + ", ".join(stale))
    return 1 if (check and stale) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
