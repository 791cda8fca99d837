"""Errors the user can fix, worded for whoever called: Python names in the library, flags on the command line;
and the small wording helpers every message uses (first and last lines of an exception, plurals); `require`, the
one-line refusal of an optional package that is not installed.

A message names a parameter between backticks, as Python spells it: `lr`, `force=True`,
`views='flip'`, `data_dir=PATH`. `str(error)` drops the backticks ("lr must be positive and finite, got -1");
the command-line layer (cli.py `as_flags`) turns each one into its flag, the only place that knows them.
"""

from __future__ import annotations

import re

PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")
# The optional requirements file that brings each optional package `require` is asked for.
REQUIREMENTS = dict.fromkeys(("ai_edge_litert", "tf2onnx", "onnxruntime"), "requirements-deploy.txt")


class UserError(Exception):
    """Bad input or environment; the message says what is wrong and what to do."""

    @property
    def template(self) -> str:
        """The message with its parameters still marked (for a caller that words them its own way)."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return in_python(self.template)


def in_python(text: str) -> str:
    """A message with its marked parameters as Python spells them (the backticks dropped)."""
    return PARAMETER.sub(lambda m: m.group(0)[1:-1], text)


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first line, for one-line errors (its type's name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def last_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's last non-empty line: OpenVINO's errors start with where they were raised, end with why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:limit] if lines else type(exc).__name__


def plural(count: int, word: str, many: str | None = None) -> str:
    """`3 runs`, `1 run`: a count and its noun (`many` for an irregular plural: plural(n, "class", "classes"))."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def require(module: str, what: str):
    """Import an optional package (a module of one of REQUIREMENTS), or say in one line which requirements file
    brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"{what} needs {package}, which is not installed: pip install -r "
                        f"{REQUIREMENTS[package]}") from None
