"""The README's option tables and the CLIs agree: every documented flag exists, every flag is documented."""

import re

import pytest

from conftest import ROOT, _script_module

SCRIPTS = ("extract.py", "train_head.py", "predict.py", "export.py")


def documented_flags(script: str) -> set[str]:
    """The flags in the first column of the table under '### <script> options'."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^### {re.escape(script)} options\n(.*?)(?=^#)", text, re.S | re.M)
    assert match, f"README has no '### {script} options' section"
    rows = [line for line in match.group(1).splitlines() if line.startswith("| `")]
    return {flag for row in rows for flag in re.findall(r"`(--[a-z][a-z0-9-]*)`", row.split("|")[1])}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_documented_and_every_documented_flag_exists(script):
    command = _script_module(script).main
    flags = {opt for param in command.params for opt in param.opts + param.secondary_opts if opt.startswith("--")}
    flags.discard("--help")
    assert documented_flags(script) == flags

