"""Every `--flag` the project names (messages, README, docs, the notebook) is one its program accepts.

A message that tells the user to pass a flag the command then rejects is worse than no advice. The
flags are read from the real parsers (`cli.build_parser()`, colab_install's own `--help`, a script's
`add_argument` calls), never from a hand list. Each mention belongs to the program invoked nearest
before it on its line (or on the line a trailing backslash continues): `python -m dreambooth_helpers
evaluate --kind live` must be an `evaluate` flag. A mention with no invocation before it (prose, an
error message) must be a flag of some dreambooth-helpers command; in colab_install.py, of colab_install.
Flags of other programs (pip, git, accelerate) pass on a line that names that program (OTHER_PROGRAMS).

Advice after a failure (ADVICE_MODULES) is stricter: it tells the user what to change in the command that just
failed, so each flag it names must be a flag of every command that can show it. Which commands can show a
message is read from the code: the commands whose `_run_<command>` reaches, call by call, the function holding it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import re
from collections import defaultdict
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
    r"\btensorboard\b": {"--logdir"},  # docs/captions_tracking.md: opening --report-to's logs
    r"mlflow ui": {"--backend-store-uri"},
    r"mlflow server": {"--backend-store-uri"},  # docs/registry.md, tracking.py's advice
    r"mlflow models serve": {"--env-manager"},  # serving a registered model (docs/registry.md, registry.py's card)
}
# Modules whose messages advise the command that failed (not another command: "train with --checkpoint-every").
ADVICE_MODULES = ("dreambooth_helpers/failures.py",)


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


# ---------------------------------------------------------------------------- which commands can show a message


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _called_name(call: ast.Call) -> str | None:
    function = call.func
    return function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)


def callers_by_name() -> dict[str, set[str]]:
    """{"generation_out_of_memory": {"generate", ...}}: which package functions call a function of that name.

    By name only, so a method shares its callers with any function of the same name: that can add commands
    (a stricter check), never lose one.
    """
    callers = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        for function in _functions(ast.parse(path.read_text())):
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and _called_name(node):
                    callers[_called_name(node)].add(function.name)
                    # threading.Thread(target=self._serve) runs _serve for this function: count it as a call.
                    for keyword in node.keywords:
                        if keyword.arg == "target" and isinstance(keyword.value, (ast.Name, ast.Attribute)):
                            target = keyword.value
                            callers[target.id if isinstance(target, ast.Name) else target.attr].add(function.name)
    return callers


def commands_that_reach(function_name: str, callers: dict[str, set[str]]) -> set[str]:
    """The subcommands whose `run` function (set_defaults(run=...)) calls `function_name`, directly or not."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command_of_run = {sub.get_default("run").__name__: name for name, sub in subparsers.choices.items()}
    found, seen, todo = set(), set(), [function_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in command_of_run:
            found.add(command_of_run[name])
        todo.extend(callers.get(name, ()))
    return found


def advice_mentions(relative_path: str) -> list[tuple[int, str, str]]:
    """(line, flag, innermost enclosing function) for each flag named inside a function of the module."""
    source = (REPO / relative_path).read_text()
    spans = [(f.lineno, f.end_lineno, f.name) for f in _functions(ast.parse(source))]
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        enclosing = [span for span in spans if span[0] <= number <= span[1]]
        for flag in FLAG.finditer(line):
            if enclosing:
                found.append((number, flag.group(), min(enclosing, key=lambda span: span[1] - span[0])[2]))
    return found


def test_advice_after_a_failure_names_only_flags_of_every_command_that_can_show_it():
    subcommands, callers = subcommand_flags(), callers_by_name()
    # The walk must find the commands that generate images, or the check below would pass by finding nothing.
    assert commands_that_reach("generation_out_of_memory", callers) >= {"generate", "demo", "evaluate"}
    assert commands_that_reach("training_out_of_memory", callers) == {"train"}
    problems, checked = [], 0
    for module in ADVICE_MODULES:
        for number, flag, function in advice_mentions(module):
            for command in sorted(commands_that_reach(function, callers)):
                checked += 1
                if flag not in subcommands[command]:
                    problems.append(f"{module}:{number}: {function} names {flag}, which {command} does not accept")
    assert checked > 10
    assert not problems, "Advice names flags the failing command lacks:\n" + "\n".join(problems)
