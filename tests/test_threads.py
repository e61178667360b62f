"""One CPU thread for the built-in models (threads.py), wherever they run, unless OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from pathlib import Path

import pytest
import torch

from dreambooth_helpers import cli, threads
from dreambooth_helpers.cli import build_parser
from dreambooth_helpers.files import SUMMARY_FILE

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "toy_robot"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture
def cpu_threads(monkeypatch):
    """A CPU machine with no OMP_NUM_THREADS, and this process's thread settings put back afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # monkeypatch restores what it was
    before, profile = torch.get_num_threads(), threading.getprofile()
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits

            stack.callback(threadpool_limits(limits=None).restore_original_limits)
        yield
    torch.set_num_threads(before)
    threading.setprofile(profile)


def _train_args(tmp_path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--instance-dir", str(SAMPLE), "--instance-prompt", "a sks toy",
                                      "--output-dir", str(tmp_path / "out"), *extra])


def test_train_without_model_runs_the_toy_model_on_one_thread(cpu_threads, tmp_path):
    """The README's command gives no --model: it trains the default toy model, which must get one thread."""
    torch.set_num_threads(2)
    args = _train_args(tmp_path)
    assert args.model is None  # what the old check looked at
    assert cli._command_model(args) == "toy"
    assert cli._one_thread_for_built_in_models(args) is True
    assert torch.get_num_threads() == 1


def test_the_users_omp_num_threads_wins(cpu_threads, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert cli._one_thread_for_built_in_models(_train_args(tmp_path)) is False
    assert torch.get_num_threads() == 2


def test_real_models_and_gpus_keep_torchs_threads(cpu_threads, tmp_path, monkeypatch):
    torch.set_num_threads(2)
    assert cli._one_thread_for_built_in_models(_train_args(tmp_path, "--model", SD15)) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli._one_thread_for_built_in_models(_train_args(tmp_path)) is False
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command, model", [
    (["generate", "--model", "tiny", "--prompt", "a sks toy", "--out", "o"], "tiny"),
    (["demo", "--model", "tiny-sdxl"], "tiny-sdxl"),
    (["app"], "toy"),  # the app's base model without a GPU
    (["train", "--instance-dir", "d", "--output-dir", "o", "--model", SD15], SD15),
    (["check-images", "photos"], None),
])
def test_each_command_names_the_model_it_loads(command, model):
    assert cli._command_model(build_parser().parse_args(command)) == model


def test_a_trained_folder_counts_by_the_base_model_it_was_trained_from(tmp_path):
    assert set(threads.CPU_BUILT_IN_MODELS) == {"toy", "tiny", "tiny-sdxl"}
    toy_run, sd_run = tmp_path / "toy-run", tmp_path / "sd-run"
    for folder, base in ((toy_run, "toy"), (sd_run, SD15)):
        folder.mkdir()
        (folder / SUMMARY_FILE).write_text(json.dumps({"base_model": base}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / SUMMARY_FILE).write_text("{not json")
    assert threads.built_in_model(toy_run) == "toy" and threads.built_in_model(str(toy_run)) == "toy"
    assert threads.built_in_model(sd_run) is None
    assert threads.built_in_model(tmp_path / "broken") is None
    assert threads.built_in_model(tmp_path / "missing") is None
    assert threads.built_in_model(SD15) is None and threads.built_in_model(None) is None


def test_threads_started_later_take_the_setting_too(cpu_threads):
    """Gradio generates in worker threads, and torch's setting is per thread for MKL and OpenMP."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def openmp_threads_in_a_new_thread() -> list[int]:
        seen = []
        # torch's own OpenMP runtime: other libraries a test run has loaded (scikit-learn's) keep their own pools.
        worker = threading.Thread(target=lambda: seen.extend(
            i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "openmp" and "torch" in i["filepath"]))
        worker.start()
        worker.join()
        return seen

    assert threads.use_one_thread_for("toy") is True
    assert openmp_threads_in_a_new_thread() == [1]
    torch.set_num_threads(2)  # they follow torch's setting rather than pinning one thread
    assert openmp_threads_in_a_new_thread() == [2]


def test_the_tokenizers_pool_is_off_too(cpu_threads, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    threads.use_one_thread_for("tiny")
    assert threads.os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_app_training_jobs_set_it_in_their_own_process(cpu_threads, tmp_path, monkeypatch):
    """A job trains in a fresh Python, which the app's setting does not reach: run_job makes it itself."""
    from dreambooth_helpers import jobs, training
    from dreambooth_helpers.config import Concept, TrainConfig

    folder = tmp_path / "job"
    folder.mkdir()
    config = TrainConfig(concepts=[Concept(str(SAMPLE), "a sks toy")], output_dir=str(folder / "output"))
    (folder / jobs.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    (folder / jobs.STATE_FILE).write_text(json.dumps({"total_steps": 1}))
    seen = []

    def fake_train(config, **_):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(jobs.signal, "signal", lambda *a: None)  # leave pytest's own handlers alone
    torch.set_num_threads(2)
    assert jobs.run_job(folder) == 1
    assert seen == [1]
