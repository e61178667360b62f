"""Every `--flag` the project names (messages, README, docs, the notebook) is one its program accepts.

A message that tells the user to pass a flag the command then rejects is worse than no advice. The
flags are read from the real parsers (`cli.build_parser()`, colab_install's own `--help`, a script's
`add_argument` calls), never from a hand list. Each mention belongs to the program invoked nearest
before it on its line (or on the line a trailing backslash continues): `python -m dreambooth_helpers
evaluate --kind live` must be an `evaluate` flag. A mention with no invocation before it (prose, an
error message) must be a flag of some dreambooth-helpers command; in colab_install.py, of colab_install.
Flags of other programs (pip, git, accelerate) pass on a line that names that program (OTHER_PROGRAMS).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from dreambooth_helpers import colab_install
from dreambooth_helpers.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dreambooth_helpers"
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*[A-Za-z0-9](?![\w-])")  # "--no-" in code is no flag
ANY_COMMAND = "any dreambooth-helpers command"
# Flags of other programs that the docs and the notebook invoke, allowed only on a line that names that program:
# multi-GPU launch (README), the notebook's shallow clone, the notebook smoke test (docs/notebook.md), downloading
# a published model (hub.py's model card), colab_install's pip calls.
OTHER_PROGRAMS = {
    r"accelerate launch": {"--multi_gpu", "--num_processes"},
    r"git clone": {"--quiet", "--depth"},
    r"jupyter nbconvert": {"--to", "--execute", "--output"},
    r"hf download": {"--local-dir"},
    r"\bpip\b": {"--quiet", "--progress-bar", "--constraint", "--only-binary"},
}


@dataclass(frozen=True)
class Mention:
    where: str  # file:line
    flag: str
    program: str
    line: str


def subcommand_flags() -> dict[str, set[str]]:
    """{"train": {"--output-dir", ...}, ...} from the parser the command line really uses."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for action in sub._actions for s in action.option_strings}
            for name, sub in subparsers.choices.items()}


def colab_install_flags() -> set[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        colab_install.main(["--help"])
    return set(FLAG.findall(out.getvalue()))


def script_flags(path: str) -> set[str]:
    """The flags a benchmark or script declares (its parser is built inside main(), so read its source)."""
    source = (REPO / path).read_text()
    return set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", source))


def program_markers(subcommands) -> re.Pattern:
    names = "|".join(re.escape(n) for n in sorted(subcommands, key=len, reverse=True))
    return re.compile(rf"dreambooth[-_]helpers\s+(?P<sub>{names})\b|(?P<colab>colab_install)"
                      rf"|(?P<script>(?:benchmarks|scripts)/\w+\.py)")


def mentions_in(lines: list[str], name: str, default_program: str, markers: re.Pattern) -> list[Mention]:
    found, carried = [], None
    for number, line in enumerate(lines, 1):
        invocations = [(m.start(), _program_of(m)) for m in markers.finditer(line)]
        for flag in FLAG.finditer(line):
            before = [program for start, program in invocations if start < flag.start()]
            program = before[-1] if before else carried or default_program
            found.append(Mention(f"{name}:{number}", flag.group(), program, line))
        # A trailing backslash continues a shell command on the next line.
        last = invocations[-1][1] if invocations else carried
        carried = last if line.rstrip().endswith("\\") else None
    return found


def _program_of(match: re.Match) -> str:
    if match["sub"]:
        return match["sub"]
    return "colab_install" if match["colab"] else match["script"]


def all_mentions(markers: re.Pattern) -> list[Mention]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        default = "colab_install" if path.name == "colab_install.py" else ANY_COMMAND
        found += mentions_in(path.read_text().splitlines(), str(path.relative_to(REPO)), default, markers)
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        found += mentions_in(path.read_text().splitlines(), str(path.relative_to(REPO)), ANY_COMMAND, markers)
    notebook = json.loads((REPO / "tutorial.ipynb").read_text())
    for index, cell in enumerate(notebook["cells"]):
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        found += mentions_in(source.splitlines(), f"tutorial.ipynb cell {index}", ANY_COMMAND, markers)
    return found


def unknown(mentions: list[Mention], subcommands: dict[str, set[str]]) -> list[str]:
    accepted = {**subcommands, ANY_COMMAND: set().union(*subcommands.values()),
                "colab_install": colab_install_flags()}
    problems = []
    for mention in mentions:
        if mention.program not in accepted:
            path = REPO / mention.program
            accepted[mention.program] = script_flags(mention.program) if path.is_file() else set()
        other_program = any(mention.flag in flags and re.search(name, mention.line)
                            for name, flags in OTHER_PROGRAMS.items())
        if mention.flag not in accepted[mention.program] and not other_program:
            problems.append(f"{mention.where}: {mention.flag} is not a flag of {mention.program}")
    return problems


def test_every_flag_named_anywhere_exists():
    subcommands = subcommand_flags()
    mentions = all_mentions(program_markers(subcommands))
    assert len(mentions) > 300, "the scan found too few mentions: is it still reading the files?"
    assert {m.program for m in mentions} >= {"train", "generate", "evaluate", "colab_install", ANY_COMMAND}
    problems = unknown(mentions, subcommands)
    assert not problems, "Flags named but not accepted:\n" + "\n".join(problems)


def test_the_check_finds_a_missing_flag_and_respects_the_program_invoked():
    subcommands = subcommand_flags()
    markers = program_markers(subcommands)
    lines = [
        "Lower the memory: pass --no-such-flag.",  # no program before it: must exist somewhere
        "python -m dreambooth_helpers generate --model out --kind person",  # --kind is not a generate flag
        "python -m dreambooth_helpers train \\",
        "    --instance-dir photos --guidance 7",  # continues train: --guidance is generate's
        "accelerate launch --multi_gpu -m dreambooth_helpers train --lora",
        "!git clone --quiet --depth 1 URL",
        "Clone with --depth 1.",  # no git before it: --depth would have to be ours, and we have none
        "PYTHONPATH=. python benchmarks/evaluation_timing.py --shapes tiny --no-shapes",
    ]
    problems = unknown(mentions_in(lines, "x", ANY_COMMAND, markers), subcommands)
    assert problems == [
        "x:1: --no-such-flag is not a flag of any dreambooth-helpers command",
        "x:2: --kind is not a flag of generate",
        "x:4: --guidance is not a flag of train",
        "x:7: --depth is not a flag of any dreambooth-helpers command",
        "x:8: --no-shapes is not a flag of benchmarks/evaluation_timing.py",
    ]
