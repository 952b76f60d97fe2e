"""Every command's every argument says what it does, as ``--help`` shows it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sota_serve.cli import build_parser


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> list[tuple[str, str]]:
    """(invocation, help) of each argument listed in an argparse help text; help is empty
    when the argument has none."""
    lines = text.splitlines()
    entries, listing = [], False
    for i, line in enumerate(lines):
        if line and not line.startswith(" "):
            listing = line in ("positional arguments:", "options:")
        elif listing and line.startswith("  ") and not line.startswith("   "):
            invocation, _, said = line.strip().partition("  ")
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if not said.strip() and following.startswith("   ") and not following.strip().startswith("-"):
                said = following
            entries.append((invocation, said.strip()))
    return entries


def _bench_help() -> str:
    """``sota-serve bench`` hands its arguments to the clone's benchmark program, whose
    options its own ``--help`` lists."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=root, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout


def _commands(capsys) -> list[str]:
    """The commands the top-level help lists (core ones and those from entry points)."""
    text = _help([], capsys)
    return re.findall(r"^    (\w+)  ", text, re.M)


def test_every_argument_of_every_command_has_help(capsys):
    commands = _commands(capsys)
    assert {"inspect", "predict", "quantize", "train", "demo", "export", "import", "bench"} <= set(commands)
    for command in commands:
        text = _help([command], capsys) if command != "bench" else _bench_help()
        entries = _entries(text)
        assert len(entries) > 1, f"{command}: no arguments parsed from\n{text}"
        missing = [invocation for invocation, said in entries if not said]
        assert not missing, f"`sota-serve {command}`: no help for {missing}"
        flat = " ".join(text.split())
        doubled = re.search(r"\(default: ([^)]*)\) \(default: \1\)", flat)
        assert doubled is None, f"`sota-serve {command}`: {doubled.group(0)}"
        assert "(default: None)" not in flat, f"`sota-serve {command}`: a default of None that says nothing"


def test_the_checks_see_a_missing_help_and_a_doubled_default():
    import argparse

    p = argparse.ArgumentParser(prog="x", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quiet-one")
    p.add_argument("--twice", default="auto", help="pick one (default: auto)")
    text = p.format_help()
    assert ("--quiet-one QUIET_ONE", "") in _entries(text)
    assert re.search(r"\(default: ([^)]*)\) \(default: \1\)", " ".join(text.split()))
