"""Install dreambooth-helpers into a notebook runtime (Colab) without touching what the runtime depends on.

Colab ships a CUDA build of torch that matches its drivers, a numpy that its preinstalled libraries were
built against, and the widget and kernel packages its own frontend speaks to (ipywidgets 7.7.1: Colab
does not render ipywidgets 8, so upgrading it makes every widget disappear). A plain `pip install` of
anything that asks for a newer one would replace it. So every pip call here carries a constraints file
that pins each of PROTECTED_PACKAGES that is installed to its installed version: pip then either keeps
them or stops with an error, and never swaps them.

This module uses only the standard library, because it runs before anything else is installed:

    python dreambooth-helpers/dreambooth_helpers/colab_install.py --source dreambooth-helpers [--xformers]

It prints its plan at once, then one line per step pip takes (with the seconds elapsed), so the notebook
never sits silent for the minute or two an install takes. xformers is optional: it is installed only if
a binary wheel made for the installed torch exists; otherwise training uses PyTorch's own SDPA
attention, which needs nothing extra. With DREAMBOOTH_HELPERS_SMOKE=1 the plan is printed and nothing
is installed (the test suite runs the notebook that way).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Packages whose installed version must survive the install, each for a reason a changed version breaks:
# - the CUDA torch stack (torch, its kernels compiler triton, torchvision, torchaudio): built for the runtime's
#   drivers; another build is gigabytes of download and often no GPU at all;
# - numpy: the runtime's compiled libraries were built against it, and the kernel has it imported already;
# - the kernel and widget packages the notebook frontend talks to: Colab's frontend renders ipywidgets 7 only
#   (ipywidgets 8 makes every widget disappear), and a changed ipykernel/IPython/jupyter server needs a restart
#   the user does not know to do. google-colab is Colab's own package and ties these together.
PROTECTED_PACKAGES = (
    "torch", "torchvision", "torchaudio", "triton",
    "numpy",
    "ipywidgets", "widgetsnbextension", "jupyterlab-widgets",
    "ipython", "ipykernel", "jupyter-client", "jupyter-core", "traitlets", "tornado", "pyzmq",
    "notebook", "nbclassic", "notebook-shim", "jupyter-server", "google-colab",
)
NOTEBOOK_EXTRAS = ("demo", "notebook", "gpu")
SMOKE_VARIABLE = "DREAMBOOTH_HELPERS_SMOKE"


def installed_versions(packages: Sequence[str] = PROTECTED_PACKAGES,
                       lookup: Callable[[str], str] = metadata.version) -> dict[str, str]:
    """{package: version} for those of `packages` that are installed."""
    found = {}
    for package in packages:
        try:
            found[package] = lookup(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def constraints_text(versions: dict[str, str]) -> str:
    """A pip constraints file pinning each package to its installed version (local label included).

    "torch==2.11.0+cu128" is what an installed Colab torch reports; pinning that exact string lets
    pip accept the installed build and refuse any other.
    """
    lines = ["# Keep the runtime's own builds: written by dreambooth_helpers.colab_install"]
    lines += [f"{name}=={version}" for name, version in sorted(versions.items())]
    return "\n".join(lines) + "\n"


@dataclass
class InstallPlan:
    """The pip commands to run, in order; `optional` ones may fail without failing the install."""

    commands: list[list[str]] = field(default_factory=list)
    optional: set[int] = field(default_factory=set)  # indices into `commands`
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [("(optional) " if i in self.optional else "") + shlex.join(command)
                 for i, command in enumerate(self.commands)]
        return "\n".join(lines + self.notes)


def plan_install(source: str, constraints_file: str, *, extras: Sequence[str] = NOTEBOOK_EXTRAS,
                 xformers: bool = False, python: str = sys.executable) -> InstallPlan:
    """The commands that install `source` (an existing folder, or a "git+https://..." URL) with `extras`.

    Every command is constrained by `constraints_file`, so torch stays as installed.
    """
    wanted = f"[{','.join(extras)}]" if extras else ""
    if source.startswith("git+"):
        # pip's syntax for extras on a URL: "NAME[extras] @ URL"
        requirement = f"dreambooth-helpers{wanted} @ {source}" if extras else source
    elif source and Path(source).is_dir():
        # Absolute: pip reads a bare "dreambooth-helpers[...]" as a package name on PyPI, not a folder.
        requirement = f"{Path(source).resolve()}{wanted}"
    else:
        raise ValueError(f"--source {source!r} is neither a folder nor a git+https:// URL: give the cloned "
                         "repository folder (the setup cell clones it) or git+https://github.com/OWNER/REPO.")
    # No --quiet: run_plan condenses pip's own progress lines into what the notebook shows.
    pip = [python, "-m", "pip", "install", "--progress-bar", "off", "--constraint", constraints_file]
    plan = InstallPlan(commands=[pip + [requirement]])
    if xformers:
        # Binary wheels only: an sdist would try to compile for an hour. The torch pin makes pip pick
        # an xformers built for this torch, or none at all.
        plan.commands.append(pip + ["--only-binary", ":all:", "xformers"])
        plan.optional.add(1)
        plan.notes.append("If no xformers wheel matches the installed torch, training uses PyTorch SDPA attention.")
    return plan


# The lines of pip's output worth showing, by how they start: what it fetches, builds, replaces and installs.
# Everything else ("Requirement already satisfied", download sizes, build backend chatter) is noise in a notebook.
PROGRESS_PREFIXES = ("Cloning ", "Processing ", "Installing build dependencies: ", "Collecting ", "Building wheel for ",
                     "Attempting uninstall: ", "Installing collected packages: ", "Successfully installed ", "ERROR: ")


def condense(line: str) -> str | None:
    """What to show for one line of pip's output, or None to show nothing.

    "Collecting diffusers>=0.39 (from dreambooth-helpers==0.1.0)" -> "Collecting diffusers>=0.39": the
    reason is in pip's full output should an install fail.
    """
    line = line.strip()
    if not line.startswith(PROGRESS_PREFIXES):
        return None
    if line.startswith("Collecting "):
        line = line.split(" (from ", 1)[0]
    return line


def print_now(*parts: object) -> None:
    """print, flushed at once: in a notebook, output that waits in a buffer looks like a hang."""
    print(*parts, flush=True)


def stream_command(command: list[str], echo: Callable[[str], None] = print_now,
                   clock: Callable[[], float] = time.monotonic) -> subprocess.CompletedProcess:
    """Run `command`, echoing each condensed line of its output with the seconds elapsed; returns all output.

    stdout holds stdout and stderr together, in the order pip wrote them (its error lines come last).
    """
    started = clock()
    lines = []
    # pip writes into a pipe here, which Python would buffer in large blocks: unbuffered, each line comes when
    # pip prints it.
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=environment) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            shown = condense(line)
            if shown:
                echo(f"[{clock() - started:4.0f}s] {shown}")
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")


def run_plan(plan: InstallPlan,
             run: Callable[[list[str]], subprocess.CompletedProcess] = stream_command) -> list[str]:
    """Run the plan's commands; returns one line per command saying how it went.

    A required command that fails raises RuntimeError with pip's last lines; an optional one that
    fails is reported and skipped.
    """
    report = []
    for index, command in enumerate(plan.commands):
        result = run(command)
        name = command[-1]
        if result.returncode == 0:
            report.append(f"installed: {name}")
            continue
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-6:])
        if index in plan.optional:
            report.append(f"skipped: {name} (no build for this torch; PyTorch SDPA attention will be used)")
            continue
        raise RuntimeError(f"pip could not install {name}:\n{tail}\nIf pip says one of the runtime's own packages "
                           "would have to change (torch, numpy, ipywidgets, IPython...: this installer keeps them as "
                           "they are), the runtime is older than the library needs: pick a newer Colab runtime "
                           "(Runtime > Change runtime type), or install into a fresh virtual environment.")
    return report


def changed_versions(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """'name old -> new' for each package of `before` whose version differs in `after` (or is gone)."""
    return [f"{name} {version} -> {after.get(name, 'removed')}"
            for name, version in sorted(before.items()) if after.get(name) != version]


def smoke_mode() -> bool:
    return os.environ.get(SMOKE_VARIABLE, "") == "1"


def describe_kept(versions: dict[str, str]) -> str:
    """In PROTECTED_PACKAGES order, torch first: the one a Colab user knows to care about."""
    return ", ".join(f"{name} {version}" for name, version in versions.items()) or "nothing"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="cloned repository folder, or git+https:// URL")
    parser.add_argument("--extras", default=",".join(NOTEBOOK_EXTRAS), help="comma-separated extras")
    parser.add_argument("--xformers", action="store_true", help="also install xformers if a matching wheel exists")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = parser.parse_args(argv)
    versions = installed_versions()
    if "torch" not in versions:
        print_now("torch is not installed in this runtime; pip will install a default build. On Colab this means "
                  "the runtime is unusual: pick a standard GPU runtime.")
    constraints = Path(tempfile.gettempdir()) / "dreambooth-helpers-constraints.txt"
    constraints.write_text(constraints_text(versions))
    plan = plan_install(args.source, str(constraints), extras=[e for e in args.extras.split(",") if e],
                        xformers=args.xformers)
    print_now(f"Keeping the installed {describe_kept(versions)}.")
    if args.dry_run or smoke_mode():
        print_now("Dry run: would run\n" + plan.describe())
        return 0
    print_now(f"Installing {plan.commands[0][-1]} and what it needs (about 1-2 minutes on Colab):")
    started = time.monotonic()
    for line in run_plan(plan):
        print_now(line)
    changed = changed_versions(versions, installed_versions())
    if changed:  # pip honours constraints, so this means something outside pip's resolver changed them
        print_now("Warning: these packages changed although they were pinned; restart the runtime "
                  "(Runtime > Restart session) before going on: " + "; ".join(changed))
    print_now(f"Done in {time.monotonic() - started:.0f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
