"""Several processes for real: `accelerate launch` with 2 processes on the CPU (gloo), the tiny model.

The launched command is the README's (`accelerate launch --multi_gpu --num_processes 2 -m dreambooth_helpers
train ...`): on a machine without a GPU, accelerate's multi-GPU launcher starts the processes and training puts
them on the CPU. Traced runs launch tests/multiprocess_train.py instead of `-m dreambooth_helpers`: the same
training, with each process writing down what it drew, stepped and saved.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_helpers import checkpoints as ckpt
from dreambooth_helpers import memory, prior
from dreambooth_helpers.cli import main
from dreambooth_helpers.errors import ConfigError
from dreambooth_helpers.files import LORA_WEIGHTS_FILE, SUMMARY_FILE
from dreambooth_helpers.training import Example, _assemble, resolve_runtime

from .multiprocess_train import TRACE_DIR_VARIABLE, install_trace, read_trace

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# The README's command, as the tests run it; the port is only chosen so that runs at once do not collide.
LAUNCH = ["launch", "--multi_gpu", "--num_processes", "2"]
TRACED_SCRIPT = str(REPO / "tests" / "multiprocess_train.py")
LEARNING_RATE = 1e-3  # every run's: large, so that a few steps move the weights visibly


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args: list[str], cwd: Path, trace_dir: Path | None = None) -> subprocess.Popen:
    """Start `accelerate launch` of 2 training processes (traced into `trace_dir` when given)."""
    module = [TRACED_SCRIPT] if trace_dir else ["-m", "dreambooth_helpers"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if trace_dir:
        environment[TRACE_DIR_VARIABLE] = str(trace_dir)
    command = [ACCELERATE, *LAUNCH, "--main_process_port", str(free_port()), *module, *args]
    return subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_launched(args: list[str], cwd: Path, trace_dir: Path | None = None) -> None:
    process = launch(args, cwd, trace_dir)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors.decode()[-3000:]


def kill(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and both training processes at once: what a lost machine does.

    torch's launcher starts each training process in a session of its own, so they are found as its children.
    """
    launcher = psutil.Process(process.pid)
    everyone = [*launcher.children(recursive=True), launcher]
    for member in everyone:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()
    process.stderr.close()
    # Wait until they are gone, so that nothing they had under way (a rename) lands after the test looks.
    _, alive = psutil.wait_procs(everyone, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


def train_args(instance_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["train", "--instance-dir", str(instance_dir), "--instance-prompt", "a photo of sks dog",
            "--output-dir", str(output_dir), "--model", "tiny", "--resolution", "32", "--mixed-precision", "no",
            "--learning-rate", str(LEARNING_RATE), "--lr-scheduler", "linear", "--seed", "3", *extra]


def weights(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / sub).glob("*.safetensors")))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def model_weights(output_dir: Path, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        return load_file(output_dir / LORA_WEIGHTS_FILE)
    return {f"{sub}.{name}": value for sub in ("unet", "text_encoder")
            for name, value in weights(output_dir, sub).items()}


def newest_step(output_dir: Path) -> int:
    saved = ckpt.list_checkpoints(output_dir)  # by name: a checkpoint being rotated away has no state.json to read
    return int(saved[-1].name.removeprefix("checkpoint-")) if saved else 0


def events(trace: list[dict], kind: str) -> list[dict]:
    return [event for event in trace if event["event"] == kind]


@pytest.fixture
def one_thread():
    """The thread count of the launched processes (OMP_NUM_THREADS=1) here too: CPU kernels sum in another order
    with another count, and Adam turns those last-bit differences into visible ones within a few steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# 4 steps, a global batch of 2 photos and 2 class images: each of the 4 photos is drawn twice, each class image 4x.
EQUIVALENCE_FLAGS = ["--max-train-steps", "4", "--lr-warmup-steps", "2", "--checkpoint-every", "2", "--random-flip",
                     "--prior-preservation", "--class-prompt", "a photo of dog", "--num-class-images", "2",
                     "--class-images-steps", "2", "--sample-every", "2", "--sample-steps", "2"]
# Float tolerance between 2 processes with batch 1 and 1 process with batch 2. Both draw the same examples and
# noise and follow the same mean gradient, summed in another order (a batch of 2 in one kernel, or two batches of 1
# averaged by all-reduce): the losses agree to ~1e-7. Adam divides each gradient by its own running size, so a
# weight whose true gradient is 0 (a bias just before a GroupNorm, which removes it) moves by up to the learning
# rate in whichever direction the last-bit rounding points: those few differ by up to lr/2 (measured 1.5e-4 at lr
# 1e-3; 259 of 834k weights above 1e-5), all others agree to 1e-5 (mean difference measured 3.5e-8).


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "sdxl-lora"])
def test_two_processes_with_batch_1_train_as_one_process_with_batch_2(method, instance_dir, tmp_path, one_thread):
    lora = method != "full"
    flags = [*EQUIVALENCE_FLAGS, "--class-dir", str(tmp_path / "class_images")]  # one folder: the same images
    flags += ["--lora", "--lora-rank", "4"] if lora else ["--train-text-encoder"]
    if method == "sdxl-lora":  # SDXL through the same loop: both text encoders' adapters, its size conditioning
        flags += ["--model", "tiny-sdxl", "--train-text-encoder"]
    two_dir, two_trace = tmp_path / "two", tmp_path / "two-trace"
    run_launched(train_args(instance_dir, two_dir, *flags), tmp_path, two_trace)
    ranks = [read_trace(two_trace, 0), read_trace(two_trace, 1)]

    # The same weights on both processes after every optimizer step (bit for bit), and 4 steps each.
    steps = [events(trace, "step") for trace in ranks]
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]] == [1, 2, 3, 4]
    assert [s["weights"] for s in steps[0]] == [s["weights"] for s in steps[1]]
    assert len({s["weights"] for s in steps[0]}) == 4  # and every step changed them
    # Each process its own photo, class image and noise at every step; together every photo equally often.
    for first, second in zip(*steps):
        assert first["instances"] != second["instances"] and first["classes"] != second["classes"]
        assert first["noise"] != second["noise"] and first["latents"] != second["latents"]
    assert collections.Counter(i for trace in steps for s in trace for i in s["instances"]) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert collections.Counter(i for trace in steps for s in trace for i in s["classes"]) == {0: 4, 1: 4}

    # Everything written once, by the main process, and complete.
    assert [e["name"] for e in events(ranks[0], "class_image")] == ["class-00000.png", "class-00001.png"]
    assert [e["step"] for e in events(ranks[0], "checkpoint")] == [2]
    assert [e["step"] for e in events(ranks[0], "samples")] == [2, 4]
    assert len(events(ranks[0], "model")) == 1
    assert [e["name"] for e in events(ranks[0], "json")] == [SUMMARY_FILE]
    assert [e["event"] for e in ranks[1]] == ["step"] * 4
    summary = json.loads((two_dir / SUMMARY_FILE).read_text())
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4] and summary["identity"]["num_processes"] == 2
    assert summary["num_class_images"] == 2 and len(list((two_dir / "samples").glob("*.png"))) == 2
    assert (ckpt.list_checkpoints(two_dir)[0] / "state.json").is_file()
    # The summary's loss is the whole global batch's (the mean of the processes'), per global step.
    for logged, first, second in zip(summary["history"], *steps):
        assert logged["loss"] == first["loss"] == second["loss"]

    # One process with batch 2, the same seed: it draws exactly what the two processes drew together...
    one_dir, one_trace = tmp_path / "one", tmp_path / "one-trace"
    with pytest.MonkeyPatch.context() as patch:
        install_trace(one_trace, 0, patch.setattr)
        assert main(train_args(instance_dir, one_dir, *flags, "--train-batch-size", "2")) == 0
    for one, first, second in zip(events(read_trace(one_trace, 0), "step"), *steps):
        assert one["instances"] == first["instances"] + second["instances"]
        assert one["classes"] == first["classes"] + second["classes"]
        # rows: the batch's instance examples, then its class examples; each process has one of each
        for name in ("flips", "timesteps", "noise"):
            assert one[name] == [first[name][0], second[name][0], first[name][1], second[name][1]], name
        expected = torch.tensor([first["latents"][0], second["latents"][0], first["latents"][1], second["latents"][1]])
        assert torch.allclose(torch.tensor(one["latents"]), expected, atol=1e-6)
    # ...and trains the same model, loss and learning-rate schedule (per global step), within float tolerance.
    one_summary = json.loads((one_dir / SUMMARY_FILE).read_text())
    assert [h["lr"] for h in summary["history"]] == pytest.approx([h["lr"] for h in one_summary["history"]],
                                                                  rel=1e-9)
    assert summary["losses"] == pytest.approx(one_summary["losses"], rel=1e-5)
    two, one = model_weights(two_dir, lora), model_weights(one_dir, lora)
    differences = torch.cat([(two[name].float() - one[name].float()).abs().flatten() for name in one])
    assert differences.max() < LEARNING_RATE / 2 and differences.mean() < 1e-6
    assert (differences > 1e-5).float().mean() < 1e-3


KILL_TEST_STEPS = 8  # checkpoints at 2, 4 and 6


@pytest.mark.slow
def test_two_processes_killed_at_a_random_moment_resume_to_the_same_weights(instance_dir, tmp_path):
    seed = random.randrange(1_000_000)
    # After a random checkpoint (of 3) appeared, plus up to a step's time: mid-step, mid-save, anywhere.
    wait_for, delay = random.Random(seed).randint(1, 3), random.Random(seed + 1).uniform(0.0, 0.2)
    flags = ["--max-train-steps", str(KILL_TEST_STEPS), "--checkpoint-every", "2", "--no-prior-preservation",
             "--train-text-encoder", "--gradient-checkpointing"]  # DDP with recomputed activations, as on a T4
    killed_dir = tmp_path / "killed"
    process = launch(train_args(instance_dir, killed_dir, *flags), tmp_path)
    try:
        deadline = time.monotonic() + 240
        while newest_step(killed_dir) < 2 * wait_for:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint {2 * wait_for} within 4 minutes"
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        kill(process)
    killed_at = newest_step(killed_dir)
    assert not (killed_dir / "model_index.json").exists(), f"finished before the kill (seed {seed})"

    run_launched([*train_args(instance_dir, killed_dir, *flags), "--resume", "latest"], tmp_path)
    summary = json.loads((killed_dir / SUMMARY_FILE).read_text())
    assert summary["resumed_from_step"] == killed_at, f"seed {seed}"
    straight_dir = tmp_path / "straight"
    run_launched(train_args(instance_dir, straight_dir, *flags), tmp_path)
    for sub in ("unet", "text_encoder"):
        assert max_difference(weights(straight_dir, sub), weights(killed_dir, sub)) < 1e-5, (sub, seed)
    straight = json.loads((straight_dir / SUMMARY_FILE).read_text())
    assert [h["step"] for h in summary["history"]] == list(range(1, KILL_TEST_STEPS + 1)), f"seed {seed}"
    assert summary["losses"] == pytest.approx(straight["losses"], rel=1e-4), f"seed {seed}"


@pytest.mark.slow
def test_class_images_are_made_once_by_the_main_process_and_resume_after_a_kill(instance_dir, tmp_path):
    wanted = 16  # about a second of generation on a free core; the kill follows the first image within ms
    flags = ["--max-train-steps", "1", "--prior-preservation", "--class-prompt", "a photo of dog",
             "--num-class-images", str(wanted), "--class-images-steps", "2", "--class-images-batch-size", "1"]
    output_dir, killed_trace, resumed_trace = tmp_path / "out", tmp_path / "killed-trace", tmp_path / "resumed-trace"
    class_dir = prior.default_class_dir(output_dir, "a photo of dog")
    process = launch(train_args(instance_dir, output_dir, *flags), tmp_path, killed_trace)
    try:
        deadline = time.monotonic() + 120
        while not list(class_dir.glob("class-*.png")):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no class image within 2 minutes"
            time.sleep(0.005)
    finally:
        kill(process)
    kept = {path.name for path in prior.existing_class_images(class_dir)}
    assert 0 < len(kept) < wanted, len(kept)

    run_launched([*train_args(instance_dir, output_dir, *flags), "--resume", "latest"], tmp_path, resumed_trace)
    everything = {f"class-{i:05d}.png" for i in range(wanted)}
    assert {path.name for path in prior.existing_class_images(class_dir)} == everything
    made = [event["name"] for event in events(read_trace(resumed_trace, 0), "class_image")]
    assert sorted(made) == sorted(everything - kept)  # only the missing ones, each once
    # The other process made none, in the killed run or the resumed one.
    for trace_dir in (killed_trace, resumed_trace):
        other = trace_dir / "rank-1.jsonl"
        assert not other.exists() or not events(read_trace(trace_dir, 1), "class_image")
    assert json.loads((output_dir / SUMMARY_FILE).read_text())["num_class_images"] == wanted


def test_the_readme_shows_the_command_these_tests_launch():
    readme = (REPO / "README.md").read_text()
    assert f"accelerate {' '.join(LAUNCH)} -m dreambooth_helpers train" in readme


def test_several_processes_never_step_inside_backward_and_plan_memory_per_process(make_config, monkeypatch):
    config = make_config(step_in_backward=True, max_grad_norm=0.0, memory_plan="auto", model="sd15-random")
    single = memory.estimate_memory(config, memory.MemorySettings(False, False), precision="fp16")
    assert memory.MemorySettings(False, True) in memory.candidate_settings(config)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch sets in each process
    assert all(not s.step_in_backward for s in memory.candidate_settings(config))
    several = memory.estimate_memory(config, memory.MemorySettings(False, False), precision="fp16")
    # DDP's buckets hold the gradients from the start: they add to the activations' peak instead of following it.
    assert several.peak_allocated == single.peak_allocated - max(single.activations, single.gradients + single.tail) \
        + single.gradients + max(single.activations, single.tail)
    assert several.peak_allocated > single.peak_allocated
    advice = memory.oom_advice(config, total_bytes=16 * 2**30)
    assert "Each of the 2 processes needs all of it on its own GPU" in advice
    with pytest.raises(ConfigError, match="--step-in-backward does not work with several processes.*Drop "
                                          "--step-in-backward, or launch one process"):
        resolve_runtime(config.replace(model="tiny"), cuda_available=False)


def test_each_process_draws_its_slice_of_what_one_process_with_the_whole_batch_draws(make_config):
    """The fast check of what the launched runs above show: the draws of 2 processes with batch 1 at a step are
    those of 1 process with batch 2, example by example (images, flips, and the generators of the noise)."""
    config = make_config(random_flip=True, train_batch_size=1)
    instances = [Example(None, None, None, torch.full((77,), i)) for i in range(5)]
    classes = [Example(None, None, None, torch.full((77,), 100 + i)) for i in range(3)]
    cpu = torch.device("cpu")

    def drawn(batch):
        return ([id(e) for e in batch["examples"]], batch["flips"],
                [torch.randn(3, generator=g).tolist() for g in batch["generators"]])

    for step in range(6):
        whole = drawn(_assemble(instances, classes, step * 2, config.replace(train_batch_size=2), cpu))
        rank0, rank1 = (drawn(_assemble(instances, classes, step * 2 + rank, config, cpu)) for rank in (0, 1))
        for got, first, second in zip(whole, rank0, rank1):
            assert got == [first[0], second[0], first[1], second[1]]  # instance examples, then class examples
        assert rank0 != rank1
