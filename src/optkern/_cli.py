"""argparse types shared by ``python -m optkern demo`` and ``bench``: a value the command cannot
use is refused at the command line, with argparse's usage line and the option's name, before any
work starts (not as a traceback, or a "nan%", at the end of a run)."""

from __future__ import annotations

import argparse
import os
from typing import Callable, List


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # argparse says "invalid <name> value: 'x'"
    return fn


def at_least(low: int, what: str = "integer") -> Callable[[str], int]:
    """An int >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return _named(parse, what)


positive_int = at_least(1)
nonnegative_int = at_least(0)


def positive_seconds(text: str) -> float:
    """A duration in seconds, > 0 and finite."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


_named(positive_seconds, "seconds")


def thread_count(text: str) -> int:
    """A thread count ``optkern.set_num_threads`` takes: 1 to its maximum."""
    import optkern

    value = int(text)
    top = int(optkern.build_info()["max_threads"])
    if not 1 <= value <= top:
        raise argparse.ArgumentTypeError(f"must be from 1 to {top} threads, got {value}")
    return value


_named(thread_count, "integer")


def size(text: str) -> str:
    """An element count such as 100k, 1m or 5000 (at least 1), kept as written."""
    from .benchmark.runner import parse_size

    try:
        value = parse_size(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a size like 100k, 1m or 5000: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 element, got {text!r}")
    return text


_named(size, "size")


def dims(text: str) -> str:
    """Layer sizes such as 784-256-10 (each >= 1, no empty part), kept as written."""
    try:
        parse_dims(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


_named(dims, "layer sizes")


def parse_dims(text: str) -> List[int]:
    """``784-256-128-10`` (or with x) as a list of at least two sizes >= 1."""
    parts = text.replace("x", "-").split("-")
    try:
        values = [int(x) for x in parts]
    except ValueError:
        values = []
    if len(values) < 2 or min(values) < 1 or any(not x.strip().isdigit() for x in parts):
        raise ValueError(f"layer sizes like 784-256-128-10 (each >= 1), not {text!r}")
    return values


def writable_file(text: str) -> str:
    """A path a file can be written to at the end of a run: not a directory, in an existing
    directory this process may write to, and, if it exists, a file it may replace."""
    directory = os.path.dirname(os.path.abspath(text)) or "."
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file name")
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"{text!r}: the directory {directory!r} does not exist")
    if os.path.exists(text):
        if not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r} exists and cannot be written")
    elif not os.access(directory, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot create files in {directory!r}")
    return text


_named(writable_file, "file name")
