"""Interruptions: a training process killed at a random moment resumes to the same weights; class images
resume; a save that dies midway leaves the previous checkpoint valid; rotation; the free-disk check."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_helpers import checkpoints as ckpt
from dreambooth_helpers import prior
from dreambooth_helpers.cli import main
from dreambooth_helpers.errors import TrainingError
from dreambooth_helpers.files import SUMMARY_FILE
from dreambooth_helpers.models import load_components, make_pipeline
from dreambooth_helpers.training import train

REPO = Path(__file__).resolve().parents[1]


def weights(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / sub).glob("*.safetensors")))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def newest_step(output_dir: Path) -> int:
    saved = ckpt.list_checkpoints(output_dir)
    return int(saved[-1].name.removeprefix("checkpoint-")) if saved else 0


def cli_args(instance_dir: Path, output_dir: Path) -> list[str]:
    return ["train", "--instance-dir", str(instance_dir), "--instance-prompt", "a photo of sks dog",
            "--no-prior-preservation", "--output-dir", str(output_dir), "--model", "tiny",
            "--resolution", "32", "--max-train-steps", "20", "--checkpoint-every", "2",
            "--mixed-precision", "no", "--learning-rate", "1e-3", "--lr-scheduler", "linear", "--seed", "3"]


@pytest.mark.slow
def test_training_killed_at_a_random_moment_resumes_to_the_same_weights(instance_dir, make_config, tmp_path):
    seed = random.randrange(1_000_000)
    # A random moment in the first half of the run, whatever the machine's speed: after a random checkpoint
    # (of 10) appeared, plus up to a step's time: mid-step, mid-save, anywhere.
    wait_for, delay = random.Random(seed).randint(1, 5), random.Random(seed + 1).uniform(0.0, 0.2)
    killed_dir = tmp_path / "killed"
    # The same thread count in the killed process and in this one: CPU kernels sum in a different order with a
    # different count, and Adam turns those last-bit differences into visible ones within a few steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dreambooth_helpers", *cli_args(instance_dir, killed_dir)],
                               cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while newest_step(killed_dir) < 2 * wait_for:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, f"no checkpoint {2 * wait_for} within 4 minutes"
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    saved = ckpt.list_checkpoints(killed_dir)
    assert saved, f"seed {seed}"
    assert not (killed_dir / "model_index.json").exists(), f"finished before the kill (seed {seed})"

    assert main([*cli_args(instance_dir, killed_dir), "--resume", "latest"]) == 0
    summary = json.loads((killed_dir / SUMMARY_FILE).read_text())
    assert summary["resumed_from_step"] == int(saved[-1].name.removeprefix("checkpoint-")), f"seed {seed}"

    straight_dir = tmp_path / "straight"
    assert main(cli_args(instance_dir, straight_dir)) == 0
    torch.set_num_threads(threads)
    for sub in ("unet", "text_encoder"):
        assert max_difference(weights(straight_dir, sub), weights(killed_dir, sub)) < 1e-5, (sub, seed)
    # The loss history survives the kill: every step from 1, the killed part's from the checkpoint.
    straight = json.loads((straight_dir / SUMMARY_FILE).read_text())
    assert [h["step"] for h in summary["history"]] == list(range(1, 21)), f"seed {seed}"
    assert summary["losses"] == pytest.approx(straight["losses"], rel=1e-4), f"seed {seed}"
    # No checkpoint at the last step (18 is the newest), and none half-written left behind.
    assert newest_step(straight_dir) == 18
    assert not list((killed_dir / "checkpoints").glob(".*.partial"))


def tiny_pipeline():
    pipeline = make_pipeline(load_components("tiny"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_class_image_generation_resumes_making_only_the_missing_images(tmp_path, monkeypatch):
    options = dict(resolution=32, seed=7, batch_size=1, steps=2, progress=False)
    pipeline = tiny_pipeline()
    straight = prior.ensure_class_images(pipeline, "a photo of dog", tmp_path / "straight", 4, **options)
    assert [p.name for p in straight] == [f"class-{i:05d}.png" for i in range(4)]

    # A run interrupted while making image 2: images 0 and 1 are on disk.
    real_call = type(pipeline).__call__
    calls = {"n": 0}

    def interrupted_at_the_third_image(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a Colab "interrupt" raises
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipeline), "__call__", interrupted_at_the_third_image)
    with pytest.raises(KeyboardInterrupt):
        prior.ensure_class_images(pipeline, "a photo of dog", tmp_path / "resumed", 4, **options)
    resumed_dir = tmp_path / "resumed"
    assert sorted(p.name for p in resumed_dir.iterdir()) == ["class-00000.png", "class-00001.png"]
    # What a hard kill mid-write would leave: the half-written temporary file, and (had the file been copied
    # by hand) a truncated PNG under a final name.
    (resumed_dir / ".class-00002.png.partial").write_bytes(b"\x89PNG")
    (resumed_dir / "class-00001.png").write_bytes((tmp_path / "straight/class-00001.png").read_bytes()[:200])

    generated = []

    def counting(self, prompts, *args, **kwargs):
        generated.extend(g.initial_seed() for g in kwargs["generator"])
        return real_call(self, prompts, *args, **kwargs)

    monkeypatch.setattr(type(pipeline), "__call__", counting)
    resumed = prior.ensure_class_images(pipeline, "a photo of dog", resumed_dir, 4, **options)
    assert sorted(generated) == [8, 9, 10]  # image 0 is kept; the truncated 1 and the missing 2, 3 are made
    assert [p.name for p in resumed] == [p.name for p in straight]
    for a, b in zip(straight, resumed, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name  # the same images as an uninterrupted generation


State = namedtuple("State", "state components")


@pytest.fixture
def training_state():
    components = load_components("tiny")
    unet, text_encoder = components.unet, components.text_encoder
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return State(ckpt.TrainingState(unet, text_encoder, optimizer, scheduler, None, lora=False), components)


def nudge(state: ckpt.TrainingState, amount: float) -> None:
    with torch.no_grad():
        for parameter in state.unet.parameters():
            parameter.add_(amount)


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_valid(training_state, tmp_path, monkeypatch):
    state = training_state.state
    first = ckpt.save_checkpoint(tmp_path, 2, state, {"base_model": "tiny"}, keep=2)
    saved_unet = weights(first, "unet")
    nudge(state, 0.5)

    def dies_after_the_weights(obj, path, *args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped right after the weights of step 4 are written

    monkeypatch.setattr(ckpt.torch, "save", dies_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, state, {"base_model": "tiny"}, keep=1)
    partial = tmp_path / "checkpoints" / ".checkpoint-000004.partial"
    assert (partial / "unet").is_dir() and not (partial / "state.json").exists()
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert ckpt.resolve_resume("latest", tmp_path, None, 10) == first
    monkeypatch.undo()

    fresh = load_components("tiny")
    optimizer = torch.optim.AdamW([*fresh.unet.parameters(), *fresh.text_encoder.parameters()], lr=1e-3)
    restored = ckpt.TrainingState(fresh.unet, fresh.text_encoder, optimizer,
                                  torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), None, lora=False)
    assert ckpt.load_checkpoint(first, restored) == 2
    assert max_difference(saved_unet, fresh.unet.state_dict()) == 0

    # The next save clears the half-written folder, so it does not eat Colab's disk.
    ckpt.save_checkpoint(tmp_path, 6, state, {"base_model": "tiny"}, keep=2)
    assert not partial.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000002", "checkpoint-000006"]


def test_rotation_keeps_the_newest_k_checkpoints(training_state, tmp_path):
    state = training_state.state
    for step in (1, 2, 3, 4, 5):
        nudge(state, 0.01)
        ckpt.save_checkpoint(tmp_path, step, state, {"base_model": "tiny"}, keep=2)
        assert len(ckpt.list_checkpoints(tmp_path)) == min(step, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000004", "checkpoint-000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-000004", "checkpoint-000005"]
    latest = weights(tmp_path / "checkpoints/checkpoint-000005", "unet")
    assert max_difference(latest, {k: v for k, v in state.unet.state_dict().items()}) == 0


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_a_full_disk_is_refused_with_a_clear_message_before_anything_is_written(training_state, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(100 * 2**30, 100 * 2**30 - 2**20, 2**20))
    with pytest.raises(TrainingError) as caught:
        ckpt.save_checkpoint(tmp_path, 2, training_state.state, {}, keep=2)
    message = str(caught.value)
    assert message.startswith(f"Not enough disk space in {tmp_path / 'checkpoints'} to save")
    assert re.search(r"[1-9][\d.]* (KiB|MiB|GiB) needed, 1\.0 MiB free\.", message), message
    assert "--checkpoints-total-limit" in message
    assert ckpt.list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").iterdir())


def test_a_full_disk_says_so_with_sizes_that_are_not_rounded_to_nothing(tmp_path, monkeypatch):
    """Issue 27 item 10: a small model's checkpoint on a full disk read "0.0 GiB needed, 0.0 GiB free"."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(100 * 2**30, 100 * 2**30, 0))
    with pytest.raises(TrainingError) as caught:
        ckpt.check_free_disk(tmp_path / "checkpoints", 5 * 2**20 + 123)
    message = str(caught.value)
    assert message.startswith("The disk is full. Not enough disk space") and "0.0 GiB" not in message
    assert "5.0 MiB needed, 0 bytes free." in message


def test_training_checks_the_disk_before_the_first_step(make_config, monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(100 * 2**30, 100 * 2**30 - 2**20, 2**20))
    steps = []
    with pytest.raises(TrainingError, match="Not enough disk space"):
        train(make_config(with_prior_preservation=False, checkpoint_every=2), progress=False,
              on_step=lambda step, logs: steps.append(step))
    assert steps == []  # refused before training, not after it


class PlantedPayload:
    """Unpickling this creates `marker`: what a malicious pickle in a shared checkpoint could do (or worse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("planted", ["optimizer.pt", "lr_scheduler.pt", "scaler.pt"])
def test_a_checkpoint_with_a_planted_pickle_is_refused_without_running_it(training_state, tmp_path, planted):
    state = training_state.state
    state.scaler = torch.amp.GradScaler("cpu")
    saved = ckpt.save_checkpoint(tmp_path / "run", 2, state, {"base_model": "tiny"}, keep=1)
    marker = tmp_path / "payload-ran"
    (saved / planted).write_bytes(pickle.dumps({"state": PlantedPayload(marker)}, protocol=2))
    with pytest.raises(TrainingError, match=f"{planted} could not be loaded.*corrupt.*or holds more than tensors and "
                                            f"plain data.*Delete {saved}.*--resume latest"):
        ckpt.load_checkpoint(saved, state)
    assert not marker.exists()


@pytest.mark.parametrize("damaged", ["optimizer.pt", "unet/diffusion_pytorch_model.safetensors"])
def test_a_checkpoint_file_cut_short_is_refused_with_what_to_do(training_state, tmp_path, damaged):
    state = training_state.state
    saved = ckpt.save_checkpoint(tmp_path / "run", 2, state, {"base_model": "tiny"}, keep=1)
    file = saved / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # what an interrupted Drive sync leaves
    with pytest.raises(TrainingError, match=f"{file.name} could not be loaded.*it is corrupt \\(cut short.*Delete "
                                            f"{saved} and run again with --resume latest"):
        ckpt.load_checkpoint(saved, state)


def test_pruning_keeps_this_runs_checkpoints_and_removes_other_runs(training_state, tmp_path):
    state = training_state.state
    ckpt.save_checkpoint(tmp_path, 6, state, {"identity": "run a"}, keep=2)
    ckpt.save_checkpoint(tmp_path, 8, state, {"identity": "run b"}, keep=2)  # another run: a's 6 goes
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000008"]
    # Run b started over (a fresh run with the same identity): its step 2 outranks the earlier attempt's 8.
    ckpt.save_checkpoint(tmp_path, 2, state, {"identity": "run b"}, keep=2)
    ckpt.save_checkpoint(tmp_path, 4, state, {"identity": "run b"}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000002", "checkpoint-000004"]
    notices = []
    assert ckpt.resolve_resume("latest", tmp_path, "run a", 10, notices.append) is None
    assert notices == ["checkpoint-000002, checkpoint-000004 were saved by a run with other settings (the run): not "
                       "resuming from them. This run's own checkpoints will replace them."]
    assert ckpt.resolve_resume("latest", tmp_path, "run b", 3, notices.append).name == "checkpoint-000002"


def test_checkpoints_skip_the_last_half_interval_and_the_last_step():
    assert ckpt.checkpoint_steps(750, 187) == [187, 374, 561]  # not 748 and 750, two steps apart at the end
    assert ckpt.checkpoint_steps(20, 2) == list(range(2, 20, 2))
    assert ckpt.checkpoint_steps(10, None) == [] and ckpt.checkpoint_steps(4, 4) == []


def test_the_checkpoint_size_estimate_matches_a_saved_checkpoint(training_state, tmp_path):
    state = training_state.state  # fp32 AdamW: weights 4 bytes + two moments 8 bytes per parameter
    state.optimizer.zero_grad()
    for parameter in [*state.unet.parameters(), *state.text_encoder.parameters()]:
        parameter.grad = torch.zeros_like(parameter)
    state.optimizer.step()  # the moments exist after the first step
    saved = ckpt.save_checkpoint(tmp_path, 1, state, {"base_model": "tiny"}, keep=1)
    actual = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    parameters = sum(p.numel() for m in (state.unet, state.text_encoder) for p in m.parameters())
    estimate = ckpt.checkpoint_bytes(parameters, lora=False, eight_bit_adam=False)
    assert actual <= estimate <= actual + ckpt.SMALL_FILES_BYTES + actual // 10
    # 8-bit AdamW: ~2 bytes of moments per parameter instead of 8.
    assert ckpt.checkpoint_bytes(10**9, lora=False, eight_bit_adam=True) == pytest.approx(6.03e9, rel=0.01)


def test_plan_checkpoints_fits_the_default_run_in_12_gb_of_drive_counting_every_checkpoint_written():
    from dreambooth_helpers import Concept, TrainConfig
    from dreambooth_helpers.memory import SD1_SIZE, planning_size

    size = planning_size("sd15-random")  # SD 1.5's parameter counts, no weights loaded
    assert size == SD1_SIZE
    config = TrainConfig.from_preset("t4", model="sd15-random", concepts=[Concept("photos", "a sks dog", "a dog")],
                                     max_train_steps=750, num_class_images=50)
    plan = ckpt.plan_checkpoints(config, 12 * 10**9, size, steps=750)
    # Full UNet + text encoder with 8-bit AdamW: ~5.9 GB a checkpoint; the fp32 diffusers folder ~4.3 GB, plus
    # the base model's safety checker (1.2 GB) it keeps by default.
    assert plan.checkpoint_bytes == pytest.approx(5.93e9, rel=0.02)
    assert plan.model_bytes == pytest.approx(4.26e9 + 1.22e9, rel=0.02)
    assert plan.checkpoints_written >= 1 and plan.fits and plan.total_bytes <= 12 * 10**9
    assert plan.total_bytes == plan.checkpoints_written * plan.checkpoint_bytes + plan.model_bytes + plan.other_bytes
    assert plan.checkpoint_steps == ckpt.checkpoint_steps(750, plan.checkpoint_every)
    assert "This run writes about 11.4 GB" in plan.message and "trash" in plan.message

    roomy = ckpt.plan_checkpoints(config, 40 * 10**9, size, steps=750)
    assert roomy.checkpoint_steps == [150, 300, 450, 600]  # at most four, evenly spaced, none near the end
    cramped = ckpt.plan_checkpoints(config, 8 * 10**9, size, steps=750)
    assert cramped.checkpoint_every is None and cramped.fits and "no checkpoint" in cramped.message
    assert not ckpt.plan_checkpoints(config, 2 * 10**9, size, steps=750).fits
    lora = ckpt.plan_checkpoints(config.replace(lora=True, lora_rank=8), 1 * 10**9, size, steps=750)
    assert lora.checkpoints_written == 4 and lora.model_bytes < 20 * 2**20
