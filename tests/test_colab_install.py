"""The notebook's installer (dreambooth_helpers/colab_install.py): its plan, what it protects, how it shows progress.

The real install, into Colab's versions, is tested by test_colab_runtime.py inside the Colab environment.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dreambooth_helpers import colab_install

REPO = Path(__file__).resolve().parent.parent


def test_constraints_pin_the_installed_builds():
    def lookup(name):
        if name == "nothere":
            raise colab_install.metadata.PackageNotFoundError(name)
        return {"torch": "2.11.0+cu128", "ipywidgets": "7.7.1"}[name]

    versions = colab_install.installed_versions(("torch", "ipywidgets", "nothere"), lookup=lookup)
    assert versions == {"torch": "2.11.0+cu128", "ipywidgets": "7.7.1"}
    text = colab_install.constraints_text(versions)
    assert "torch==2.11.0+cu128\n" in text and "ipywidgets==7.7.1\n" in text


def test_install_plan_for_a_folder_and_a_url(tmp_path, monkeypatch):
    (tmp_path / "dreambooth-helpers").mkdir()
    monkeypatch.chdir(tmp_path)
    plan = colab_install.plan_install("dreambooth-helpers", "/tmp/c.txt", python="py")
    # An absolute path: a bare "dreambooth-helpers[...]" would make pip look on PyPI instead. No --quiet: the
    # installer condenses pip's progress lines itself.
    assert plan.commands == [["py", "-m", "pip", "install", "--progress-bar", "off", "--constraint", "/tmp/c.txt",
                              f"{tmp_path / 'dreambooth-helpers'}[demo,notebook,gpu]"]]
    assert not plan.optional
    url = colab_install.plan_install("git+https://github.com/OWNER/dreambooth-helpers", "c.txt", extras=["demo"],
                                     xformers=True, python="py")
    assert url.commands[0][-1] == "dreambooth-helpers[demo] @ git+https://github.com/OWNER/dreambooth-helpers"
    assert url.commands[1][-3:] == ["--only-binary", ":all:", "xformers"] and url.optional == {1}
    assert all("--constraint" in command for command in url.commands)
    assert not any(part == "torch" for command in url.commands for part in command)
    assert "(optional)" in url.describe() and "SDPA" in url.describe()
    for wrong in ("", "no-such-folder"):
        with pytest.raises(ValueError, match="neither a folder nor a git"):
            colab_install.plan_install(wrong, "c.txt")


def test_run_plan_outcomes(tmp_path):
    plan = colab_install.plan_install(str(tmp_path), "c.txt", xformers=True, python="py")

    def run_ok_then_fail(command):
        failed = command[-1] == "xformers"
        return subprocess.CompletedProcess(command, 1 if failed else 0, "", "ResolutionImpossible" if failed else "")

    assert colab_install.run_plan(plan, run_ok_then_fail) == [
        f"installed: {tmp_path}[demo,notebook,gpu]",
        "skipped: xformers (no build for this torch; PyTorch SDPA attention will be used)"]

    def run_fail(command):
        return subprocess.CompletedProcess(command, 1, "", "line\nERROR: Cannot install torch==9")

    with pytest.raises(RuntimeError, match="Cannot install torch==9"):
        colab_install.run_plan(plan, run_fail)


def test_installer_dry_run(capsys, monkeypatch):
    monkeypatch.delenv(colab_install.SMOKE_VARIABLE, raising=False)
    assert colab_install.main(["--source", str(REPO), "--dry-run", "--xformers"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Keeping the installed torch") and "Dry run" in out and "xformers" in out


def test_installer_runs_standalone_with_the_standard_library_only():
    """The notebook runs it before anything is installed: it must not import the package or third parties."""
    source = Path(colab_install.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imports <= set(sys.stdlib_module_names), imports
    result = subprocess.run([sys.executable, colab_install.__file__, "--source", str(REPO), "--dry-run"],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and "Dry run" in result.stdout


def test_protects_numpy_and_every_widget_and_frontend_package():
    protected = set(colab_install.PROTECTED_PACKAGES)
    assert {"torch", "torchvision", "torchaudio", "numpy"} <= protected
    assert {"ipywidgets", "widgetsnbextension", "jupyterlab-widgets"} <= protected
    assert {"ipython", "ipykernel", "notebook", "jupyter-server", "google-colab"} <= protected


def test_constraints_hold_the_installed_numpy_and_widgets(tmp_path):
    """Real metadata of this environment: pins numpy and ipywidgets at what is installed, local labels kept."""
    import importlib.metadata as metadata

    versions = colab_install.installed_versions()
    assert versions["numpy"] == metadata.version("numpy")
    assert versions["ipywidgets"] == metadata.version("ipywidgets")
    assert versions["torch"] == metadata.version("torch")  # e.g. "2.13.0+cpu": the build, not just the release
    text = colab_install.constraints_text(versions)
    assert f"ipywidgets=={metadata.version('ipywidgets')}\n" in text
    assert f"torch=={metadata.version('torch')}\n" in text


@pytest.mark.parametrize("line, shown", [
    ("Collecting diffusers>=0.39.0 (from dreambooth-helpers==0.1.0)\n", "Collecting diffusers>=0.39.0"),
    ("  Building wheel for dreambooth-helpers (pyproject.toml): started\n",
     "Building wheel for dreambooth-helpers (pyproject.toml): started"),
    ("Installing collected packages: pillow-heif, dreambooth-helpers\n",
     "Installing collected packages: pillow-heif, dreambooth-helpers"),
    ("Successfully installed dreambooth-helpers-0.1.0 pillow-heif-1.8.1\n",
     "Successfully installed dreambooth-helpers-0.1.0 pillow-heif-1.8.1"),
    ("ERROR: ResolutionImpossible: for help visit ...\n", "ERROR: ResolutionImpossible: for help visit ..."),
    ("Requirement already satisfied: numpy==2.1.3 in /usr/local/lib/python3.13\n", None),
    ("  Downloading pillow_heif-1.8.1-cp313.whl (4.6 MB)\n", None),
    ("     ━━━━━━━━━━━━━━━━━━━━ 4.6/4.6 MB 90 MB/s eta 0:00:00\n", None),
])
def test_condense_keeps_the_steps_and_drops_the_noise(line, shown):
    assert colab_install.condense(line) == shown


def test_stream_command_shows_each_step_while_the_command_still_runs(tmp_path):
    """The child waits until the parent has shown its first line: buffered output would make it time out."""
    shown_flag = tmp_path / "shown"
    child = textwrap.dedent(f"""
        import pathlib, sys, time
        print("Requirement already satisfied: numpy")
        print("Collecting pillow-heif (from dreambooth-helpers==0.1.0)")
        deadline = time.monotonic() + 20
        while not pathlib.Path({str(shown_flag)!r}).exists():
            if time.monotonic() > deadline:
                sys.exit(3)
            time.sleep(0.02)
        print("Successfully installed pillow-heif-1.8.1")
    """)
    shown = []

    def echo(line):
        shown.append(line)
        shown_flag.touch()

    started = time.monotonic()
    result = colab_install.stream_command([sys.executable, "-c", child], echo=echo)
    assert result.returncode == 0, "the first line arrived only when the command ended"
    assert time.monotonic() - started < 15
    assert [line.split("] ", 1)[1] for line in shown] == ["Collecting pillow-heif",
                                                         "Successfully installed pillow-heif-1.8.1"]
    assert all(line.startswith("[") and "s] " in line for line in shown)
    assert "Requirement already satisfied: numpy" in result.stdout  # kept for the error message


def test_a_failed_install_names_the_runtime_packages_it_kept(tmp_path):
    plan = colab_install.plan_install(str(tmp_path), "c.txt", python="py")

    def refuse(command):
        return subprocess.CompletedProcess(command, 1, "Collecting x\nERROR: Cannot install numpy==2.1.3 and x", "")

    with pytest.raises(RuntimeError) as error:
        colab_install.run_plan(plan, refuse)
    message = str(error.value)
    assert "Cannot install numpy==2.1.3" in message and "ipywidgets" in message and "Change runtime type" in message


def test_changed_versions_reports_moves_and_removals():
    before = {"numpy": "2.1.3", "ipywidgets": "7.7.1", "torch": "2.11.0+cu128"}
    after = {"numpy": "2.4.6", "torch": "2.11.0+cu128"}
    assert colab_install.changed_versions(before, after) == ["ipywidgets 7.7.1 -> removed", "numpy 2.1.3 -> 2.4.6"]
    assert colab_install.changed_versions(before, before) == []


def test_main_prints_the_plan_before_installing_and_reports_how_it_went(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(colab_install.SMOKE_VARIABLE, raising=False)
    order = []

    def fake_run_plan(plan):
        order.append(capsys.readouterr().out)  # what the user saw before pip started
        return [f"installed: {plan.commands[0][-1]}"]

    monkeypatch.setattr(colab_install, "run_plan", fake_run_plan)
    assert colab_install.main(["--source", str(tmp_path)]) == 0
    before_pip = order[0]
    assert "Keeping the installed " in before_pip and "numpy" in before_pip and "ipywidgets" in before_pip
    assert f"Installing {tmp_path}[demo,notebook,gpu]" in before_pip
    after = capsys.readouterr().out
    assert "installed: " in after and "Done in " in after and "Warning" not in after
