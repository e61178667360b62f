"""Install dreambooth-helpers into a notebook runtime (Colab) without touching its torch.

Colab ships a CUDA build of torch that matches its drivers; replacing it (which a plain
`pip install xformers` or an unlucky dependency resolution can do) costs gigabytes of download and
often breaks the GPU. So every pip call here carries a constraints file that pins torch,
torchvision and torchaudio to the versions already installed: pip then either keeps them or stops
with an error, and never swaps them.

This module uses only the standard library, because it runs before anything else is installed:

    python dreambooth-helpers/dreambooth_helpers/colab_install.py --source dreambooth-helpers [--xformers]

xformers is optional: it is installed only if a binary wheel made for the installed torch exists;
otherwise training uses PyTorch's own SDPA attention, which needs nothing extra. With
DREAMBOOTH_HELPERS_SMOKE=1 the plan is printed and nothing is installed (the test suite runs the
notebook that way).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Packages whose installed build must survive: the CUDA torch stack that Colab provides.
PROTECTED_PACKAGES = ("torch", "torchvision", "torchaudio")
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

    "torch==2.8.0+cu126" is what an installed Colab torch reports; pinning that exact string lets
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
    pip = [python, "-m", "pip", "install", "--quiet", "--constraint", constraints_file]
    plan = InstallPlan(commands=[pip + [requirement]])
    if xformers:
        # Binary wheels only: an sdist would try to compile for an hour. The torch pin makes pip pick
        # an xformers built for this torch, or none at all.
        plan.commands.append(pip + ["--only-binary", ":all:", "xformers"])
        plan.optional.add(1)
        plan.notes.append("If no xformers wheel matches the installed torch, training uses PyTorch SDPA attention.")
    return plan


def run_plan(plan: InstallPlan, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """Run the plan's commands; returns one line per command saying how it went.

    A required command that fails raises RuntimeError with pip's last lines; an optional one that
    fails is reported and skipped.
    """
    report = []
    for index, command in enumerate(plan.commands):
        result = run(command, capture_output=True, text=True)
        name = command[-1]
        if result.returncode == 0:
            report.append(f"installed: {name}")
            continue
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-6:])
        if index in plan.optional:
            report.append(f"skipped: {name} (no build for this torch; PyTorch SDPA attention will be used)")
            continue
        raise RuntimeError(f"pip could not install {name}:\n{tail}\nIf pip says torch would have to change, "
                           "this runtime's torch is older than the library needs (torch>=2.1): pick a newer "
                           "Colab runtime (Runtime > Change runtime type).")
    return report


def smoke_mode() -> bool:
    return os.environ.get(SMOKE_VARIABLE, "") == "1"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="cloned repository folder, or git+https:// URL")
    parser.add_argument("--extras", default=",".join(NOTEBOOK_EXTRAS), help="comma-separated extras")
    parser.add_argument("--xformers", action="store_true", help="also install xformers if a matching wheel exists")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = parser.parse_args(argv)
    versions = installed_versions()
    if "torch" not in versions:
        print("torch is not installed in this runtime; pip will install a default build. On Colab this means "
              "the runtime is unusual: pick a standard GPU runtime.")
    constraints = Path(tempfile.gettempdir()) / "dreambooth-helpers-constraints.txt"
    constraints.write_text(constraints_text(versions))
    plan = plan_install(args.source, str(constraints), extras=[e for e in args.extras.split(",") if e],
                        xformers=args.xformers)
    kept = ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "nothing"
    print(f"Keeping the installed {kept}.")
    if args.dry_run or smoke_mode():
        print("Dry run: would run\n" + plan.describe())
        return 0
    for line in run_plan(plan):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
