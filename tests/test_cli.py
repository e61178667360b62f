"""The command line: the README's main command end to end, and what users see when they get it wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth_helpers.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "toy_robot"


def _run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dreambooth_helpers", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_readme_main_command_trains_the_sample_subject_end_to_end(tmp_path):
    """The same command as README.md, with fewer steps: a model folder, samples and a summary come out."""
    result = _run_module(
        "train", "--instance-dir", str(SAMPLE), "--instance-prompt", "a photo of sks toy",
        "--class-prompt", "a photo of toy", "--output-dir", str(tmp_path / "model"),
        "--max-train-steps", "4", "--num-class-images", "2", "--sample-every", "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained model:" in result.stdout and "Sample images:" in result.stdout
    out = tmp_path / "model"
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000002-0.png", "step-000004-0.png"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["preset"] == "t4"
    assert summary["config"]["model"] == "toy" and summary["resolution"] == 32  # the offline default
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"--instance-dir": "no/such/folder"}, "does not exist"),
        ({"--resolution": "30"}, "--resolution must be a multiple of 8"),
        ({"--learning-rate": "-1"}, "--learning-rate must be a number"),
        ({"--max-train-steps": "0"}, "--max-train-steps must be a whole number"),
        ({"--resume": "nowhere"}, "--resume 'nowhere'"),
        ({"--stop-text-encoder-training-at": "5", "--no-train-text-encoder": None}, "--stop-text-encoder-training-at"),
        ({"--instance-prompt": " "}, "--instance-prompt is empty"),
        ({"--class-prompt": ""}, "--class-prompt is missing"),
    ],
)
def test_user_mistakes_exit_2_with_one_message_and_no_traceback(changes, expected, tmp_path, capsys):
    flags = {"--instance-dir": str(SAMPLE), "--instance-prompt": "a photo of sks toy",
             "--class-prompt": "a photo of toy", "--output-dir": str(tmp_path / "o"), "--model": "tiny", **changes}
    argv = ["train"] + [part for flag, value in flags.items() for part in ([flag] if value is None else [flag, value])]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "o" / "model_index.json").exists()


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a photo")
    code = main(["train", "--instance-dir", str(empty), "--instance-prompt", "a sks dog", "--class-prompt", "a dog",
                 "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "No usable image" in err and "notes.txt" in err


def test_unknown_flag_and_bad_choice_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", "x", "--preset", "gpu9000"])
    assert exit_info.value.code == 2
    assert "gpu9000" in capsys.readouterr().err


def test_concepts_list_file(tmp_path, capsys):
    concepts = tmp_path / "concepts.json"
    concepts.write_text("{not json")
    code = main(["train", "--concepts-list", str(concepts), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "--concepts-list" in capsys.readouterr().err


def test_check_images_reports_and_exits_by_usability(tmp_path, capsys):
    assert main(["check-images", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "5 usable image(s), 0 skipped" in out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert main(["check-images", str(broken)]) == 2
    captured = capsys.readouterr()
    assert "a.jpg" in captured.out and "No usable image" in captured.err
    assert main(["check-images", str(tmp_path / "missing")]) == 2


def test_console_entry_point_help_lists_commands(tmp_path):
    result = _run_module("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("train", "check-images"):
        assert command in result.stdout
