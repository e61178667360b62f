"""The job runner: training in its own process, one at a time, state on disk; a run survives cancel, a crash,
and the death of the process that started it, and resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_helpers import checkpoints as ckpt
from dreambooth_helpers.config import Concept, TrainConfig
from dreambooth_helpers.job_progress import ClassImagesWatch, ProgressWriter, class_images_on_disk, kept_when_stopped
from dreambooth_helpers.jobs import (
    CANCELLED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    Job,
    JobError,
    JobRunner,
    last_error_paragraph,
)

REPO = Path(__file__).resolve().parents[1]
# One thread in every training process: the same kernels' summation order, so resumed and straight runs match.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DREAMBOOTH_HELPERS_ALLOW_CPU": "1"}


def tiny_config(instance_dir: Path, **changes) -> TrainConfig:
    settings = dict(concepts=[Concept(str(instance_dir), "a photo of sks dog")], output_dir="unused", model="tiny",
                    resolution=32, with_prior_preservation=False, max_train_steps=8, checkpoint_every=2,
                    sample_every=4, sample_steps=2, mixed_precision="no", learning_rate=1e-3,
                    lr_scheduler="linear", seed=3)
    settings.update(changes)
    return TrainConfig.from_preset("t4", **settings)


def unet_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((output_dir / "unet").glob("*.safetensors")))


def same_weights(a: Path, b: Path) -> bool:
    first, second = unet_weights(a), unet_weights(b)
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first) < 1e-5


def wait_for_checkpoint(output_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(ckpt.checkpoint_step(p) >= step for p in ckpt.list_checkpoints(output_dir)):
        assert time.monotonic() < deadline, f"no checkpoint {step} within {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The output folder of an uninterrupted 8-step run, what every interrupted one must end at."""
    from tests.conftest import draw_subject

    root = tmp_path_factory.mktemp("straight")
    photos = root / "instance"
    photos.mkdir()
    for i in range(4):
        draw_subject(photos / f"photo{i}.png", i)
    runner = JobRunner(root / "work", environment=ONE_THREAD, poll_every=0.1)
    job = runner.wait(runner.submit(tiny_config(photos)).job_id, timeout=400)
    assert job.status == FINISHED, job.log_path.read_text()[-3000:]
    return job.output_dir


@pytest.mark.slow
def test_a_crashing_run_records_its_error_and_the_next_run_in_the_queue_trains(instance_dir, tmp_path):
    missing = tmp_path / "gone"
    missing.mkdir()
    runner = JobRunner(tmp_path / "work", environment=ONE_THREAD, poll_every=0.1)
    crashing = runner.submit(tiny_config(missing), total_steps=8)  # no photos: training refuses in the process
    good = runner.submit(tiny_config(instance_dir, max_train_steps=4, checkpoint_every=None, sample_every=2))
    # One at a time: the second waits while the first runs.
    assert runner.job(good.job_id).status == QUEUED
    assert runner.job(crashing.job_id).status in (RUNNING, FAILED)

    crashed = runner.wait(crashing.job_id, timeout=120)
    assert crashed.status == FAILED
    assert "No images found" in crashed.error and "gone" in crashed.error
    finished = runner.wait(good.job_id, timeout=300)
    assert finished.status == FINISHED, finished.log_path.read_text()[-3000:]
    # Progress came from the training process, step by step, with the samples it drew and the loss history.
    assert finished.step == 4 and finished.progress["total_steps"] == 4
    assert [h["step"] for h in finished.progress["history"]] == [1, 2, 3, 4]
    assert [Path(s).name for s in finished.samples] == ["step-000002-0.png", "step-000004-0.png"]
    assert all(Path(s).is_file() for s in finished.samples)
    assert (finished.output_dir / "model_index.json").is_file()
    assert (finished.output_dir / "training_summary.json").is_file()
    # The runner's own config copy trains into the job folder, whatever output_dir was asked for.
    assert Path(finished.config().output_dir) == finished.output_dir
    # A new runner over the same folder sees the same jobs and outcomes (a page reload, an app restart).
    again = {job.job_id: job.status for job in JobRunner(tmp_path / "work").jobs()}
    assert again == {crashing.job_id: FAILED, good.job_id: FINISHED}
    with pytest.raises(JobError, match="nothing to cancel"):
        runner.cancel(good.job_id)


def test_a_crash_without_a_message_takes_the_logs_last_paragraph():
    log = ("Training: 3/8\n\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
           "    boom()\nRuntimeError: CUDA error: an illegal memory access was encountered\n")
    assert last_error_paragraph(log) == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert last_error_paragraph("step 1\n\nerror: No images found in x.\n") == "error: No images found in x."
    assert "without a message" in last_error_paragraph("")


def test_a_job_id_outside_the_jobs_folder_is_refused(tmp_path):
    runner = JobRunner(tmp_path / "work")
    (tmp_path / "work" / "secret").mkdir()
    (tmp_path / "work" / "secret" / "state.json").write_text("{}")
    for bad in ("../secret", "/etc", "..", "nope"):
        with pytest.raises(JobError, match="No training run"):
            runner.job(bad)


@pytest.mark.slow
def test_cancel_keeps_the_checkpoints_and_resume_ends_at_the_uninterrupted_weights(instance_dir, tmp_path,
                                                                                  straight_run):
    runner = JobRunner(tmp_path / "work", environment=ONE_THREAD, poll_every=0.1)
    job = runner.submit(tiny_config(instance_dir))
    wait_for_checkpoint(job.output_dir, 4)
    runner.cancel(job.job_id)
    cancelled = runner.wait(job.job_id, timeout=120)
    assert cancelled.status == CANCELLED and cancelled.error is None
    assert ckpt.list_checkpoints(cancelled.output_dir), "the checkpoints already saved are kept"
    assert not (cancelled.output_dir / "model_index.json").exists(), "cancelled before the end"
    newest = ckpt.checkpoint_step(ckpt.list_checkpoints(cancelled.output_dir)[-1])
    said = f"Stopped on request. The checkpoint of step {newest} is kept: Resume continues from it."
    assert said in cancelled.log_path.read_text() and cancelled.kept() == said.removeprefix("Stopped on request. ")

    resumed = runner.wait(runner.resume(job.job_id).job_id, timeout=300)
    assert resumed.status == FINISHED, resumed.log_path.read_text()[-3000:]
    assert "Resuming from" in resumed.log_path.read_text()
    assert same_weights(resumed.output_dir, straight_run)
    # The loss history shown on the page covers every step once, across the cancel.
    assert [h["step"] for h in resumed.progress["history"]] == list(range(1, 9))


PARENT_SCRIPT = textwrap.dedent("""
    import sys, time
    from dreambooth_helpers.config import Concept, TrainConfig
    from dreambooth_helpers.jobs import JobRunner
    sys.path.insert(0, {tests!r})
    from test_jobs import ONE_THREAD, tiny_config
    runner = JobRunner({work!r}, environment=ONE_THREAD, poll_every=0.1).start()
    job = runner.submit(tiny_config(__import__("pathlib").Path({photos!r})))
    print(job.job_id, flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_a_run_outlives_the_app_that_started_it_and_resumes_after_a_crash(instance_dir, tmp_path, straight_run):
    work = tmp_path / "work"
    script = PARENT_SCRIPT.format(tests=str(REPO / "tests"), work=str(work), photos=str(instance_dir))
    app = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        job_id = app.stdout.readline().strip()
        assert job_id, "the app process did not start a job"
        output_dir = work / "jobs" / job_id / "output"
        wait_for_checkpoint(output_dir, 2)
    finally:
        app.kill()  # the app dies; its training process, in a session of its own, does not
        app.wait()
        app.stdout.close()

    # A new app over the same folder finds the run still training and follows it.
    runner = JobRunner(work, environment=ONE_THREAD, poll_every=0.1)
    found = runner.job(job_id)
    assert found.status == RUNNING and found.pid
    wait_for_checkpoint(output_dir, 4)
    # Now the machine goes down with it: the training process is killed without a word.
    os.killpg(found.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while runner.job(job_id).status == RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    after_restart = JobRunner(work, environment=ONE_THREAD, poll_every=0.1)
    assert after_restart.job(job_id).status == INTERRUPTED

    assert [job.job_id for job in after_restart.resume_interrupted()] == [job_id]  # as the app does at its start
    assert after_restart.resume_interrupted() == []  # once
    resumed = after_restart.wait(job_id, timeout=300)
    assert resumed.status == FINISHED, resumed.log_path.read_text()[-3000:]
    assert same_weights(resumed.output_dir, straight_run)
    state = json.loads((resumed.folder / "state.json").read_text())
    assert state["status"] == FINISHED and state["error"] is None


def _write_run(runner: JobRunner, job_id: str, **state) -> Path:
    """A run on disk as a runner (this one or an earlier version) leaves it."""
    folder = runner.jobs_dir / job_id
    (folder / "output").mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"created": time.time(), **state}))
    return folder


def test_run_ids_are_unguessable_old_ones_still_load_and_a_missing_run_names_no_path(instance_dir, tmp_path,
                                                                                      monkeypatch):
    runner = JobRunner(tmp_path / "work")
    monkeypatch.setattr(runner, "_launch", lambda job: None)  # queued, never trained
    ids = [runner.submit(tiny_config(instance_dir), name="sks dog").job_id for _ in range(2)]
    for job_id in ids:  # the date and name for people, then 96 random bits (16 URL-safe characters)
        assert re.fullmatch(r"\d{8}-\d{6}-sks-dog-[A-Za-z0-9_-]{16}", job_id), job_id
    assert ids[0] != ids[1]
    old = "20240101-120000-sks-dog-ab12"  # an id of the earlier, 16-bit kind
    _write_run(runner, old, status=FINISHED, owner="alice")
    assert runner.job(old).status == FINISHED and old in [job.job_id for job in runner.jobs()]
    with pytest.raises(JobError) as caught:
        runner.job("20240101-120000-sks-dog-ab13")
    assert str(caught.value) == "No training run '20240101-120000-sks-dog-ab13'."  # no server path


def test_a_pid_reused_by_another_users_process_is_not_our_run(tmp_path, monkeypatch):
    """kill(pid, 0) answers EPERM for another user's process: its command line decides, so a run whose pid was
    reused stops being "running" (the queue moves on, Cancel works) while our own run is still followed."""
    from dreambooth_helpers import jobs

    runner = JobRunner(tmp_path / "work")
    launched = []
    monkeypatch.setattr(runner, "_launch", lambda job: launched.append(job.job_id))
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    ours_folder = _write_run(runner, "ours", status=FINISHED)
    stranger = subprocess.Popen(sleeper)  # the other user's program that got the pid
    ours = subprocess.Popen([*sleeper, str(ours_folder)])  # our training, as seen from a different account
    signals = []

    def no_permission(pid, signum):
        signals.append((pid, signum))
        raise PermissionError(1, "Operation not permitted")

    try:
        with monkeypatch.context() as faked:
            faked.setattr(jobs.os, "kill", no_permission)
            faked.setattr(jobs.os, "killpg", no_permission)
            _write_run(runner, "cancelled-one", status=RUNNING, pid=stranger.pid)
            assert not jobs.process_alive(stranger.pid, str(runner.jobs_dir / "cancelled-one"))
            assert jobs.process_alive(ours.pid, str(ours_folder))
            assert jobs.process_alive(stranger.pid)  # no marker: something lives under that pid

            runner.cancel("cancelled-one")  # nothing of ours to signal: no PermissionError
            assert all(signum == 0 for _, signum in signals), signals
            assert runner.job("cancelled-one").status == CANCELLED
            _write_run(runner, "stale", status=RUNNING, pid=stranger.pid)
            _write_run(runner, "next", status=QUEUED)
            assert runner.job("stale").status == INTERRUPTED  # not "running" forever
            assert launched and set(launched) == {"next"}  # the queue moves on
            assert all(signum == 0 for _, signum in signals), signals

            launched.clear()
            (ours_folder / "state.json").write_text(json.dumps({"status": RUNNING, "created": 0, "pid": ours.pid}))
            assert runner.job("ours").status == RUNNING and not launched  # still ours: followed, the queue waits
            with pytest.raises(JobError, match="belongs to another user"):
                runner.cancel("ours")
    finally:
        for process in (stranger, ours):
            process.kill()
            process.wait()


def _run_in_this_process(folder: Path, monkeypatch, train) -> dict:
    """jobs.run_job(folder) here, with `train` standing in for training: the outcome it wrote (result.json)."""
    from dreambooth_helpers import jobs, threads, training

    monkeypatch.setattr(training, "train", train)
    monkeypatch.setattr(threads, "use_one_thread_for", lambda model: None)  # not this test process's threads
    monkeypatch.setattr(jobs.signal, "signal", lambda *args: None)  # nor its signal handlers
    jobs.run_job(folder)
    return json.loads((folder / "result.json").read_text())


def test_a_hand_edited_config_cannot_send_a_runs_outputs_outside_its_folder(instance_dir, tmp_path, monkeypatch):
    import types

    trained = []

    def train(config, **kwargs):
        trained.append(config)
        return types.SimpleNamespace(output_dir=config.output_dir, global_step=0)

    folder = tmp_path / "work" / "jobs" / "20240101-000000-run-edited12345"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"status": RUNNING, "created": 1.0, "total_steps": 8}))
    outside = tmp_path / "elsewhere"
    edits = {"output_dir": {"output_dir": str(outside)},
             "class_dir": {"concepts": [Concept(str(instance_dir), "a photo of sks dog", "a photo of a dog",
                                                str(outside / "classes"))], "output_dir": str(folder / "output")},
             "resume": {"resume": str(outside / "checkpoint-000002"), "output_dir": str(folder / "output")}}
    for what, changes in edits.items():
        config = tiny_config(instance_dir).replace(**changes)
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        result = _run_in_this_process(folder, monkeypatch, train)
        assert result["outcome"] == FAILED and "points outside the run's own folder" in result["error"], what
        assert what in result["error"] and not trained and not outside.exists()
    (folder / "config.json").write_text(json.dumps(tiny_config(instance_dir,
                                                               output_dir=str(folder / "output")).to_dict()))
    assert _run_in_this_process(folder, monkeypatch, train)["outcome"] == FINISHED and len(trained) == 1


def test_a_full_disk_mid_run_is_said_once_and_the_page_keeps_working(tmp_path, monkeypatch, caplog):
    import errno

    from dreambooth_helpers import jobs

    runner = JobRunner(tmp_path / "work")
    folder = runner.jobs_dir / "20240101-000000-run-diskfull123"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"status": RUNNING, "created": 1.0, "pid": None}))
    (folder / "log.txt").write_text("step 3/8\n\nTraceback (most recent call last):\n  File \"x.py\"\n"
                                    "OSError: [Errno 28] No space left on device: 'progress.json.tmp'\n")
    runner._children[folder.name] = types_namespace(poll=lambda: 1)  # its process died
    launched = []
    monkeypatch.setattr(runner, "_launch", lambda job: launched.append(job.job_id))
    (runner.jobs_dir / "next").mkdir()
    (runner.jobs_dir / "next" / "state.json").write_text(json.dumps({"status": QUEUED, "created": 2.0}))
    real_write = jobs.write_json_atomically

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(jobs, "write_json_atomically", full)
    for _ in range(5):  # the page polls: every answer is the run's state, none an OSError
        job = runner.job(folder.name)
        assert job.status == FAILED and job.error == jobs.DISK_FULL
    assert "0.0 GiB" not in job.error and "Resume" in job.error
    assert [r.getMessage() for r in caplog.records].count(f"{jobs.DISK_FULL} ({runner.workdir})") == 1  # once
    assert runner.disk_full == jobs.DISK_FULL and launched == []  # nothing starts on a full disk
    with pytest.raises(JobError, match="disk of the work folder is full"):
        runner.submit(tiny_config(tmp_path))
    monkeypatch.setattr(jobs, "write_json_atomically", real_write)  # space again
    assert runner.job(folder.name).status == FAILED and runner.disk_full is None
    assert json.loads((folder / "state.json").read_text())["status"] == FAILED  # written once there was room
    assert launched == ["next"]


def test_a_run_that_meets_a_full_disk_reports_it_plainly(instance_dir, tmp_path, monkeypatch):
    import errno

    from dreambooth_helpers import jobs

    folder = tmp_path / "work" / "jobs" / "20240101-000000-run-nospace1234"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"status": RUNNING, "created": 1.0, "total_steps": 8}))
    (folder / "config.json").write_text(json.dumps(tiny_config(instance_dir,
                                                               output_dir=str(folder / "output")).to_dict()))

    def train(config, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "progress.json"))

    assert _run_in_this_process(folder, monkeypatch, train) == {"outcome": FAILED, "error": jobs.DISK_FULL}


def types_namespace(**attributes):
    import types

    return types.SimpleNamespace(**attributes)


def test_the_class_images_being_made_are_counted_into_progress_json_until_the_first_step(tmp_path):
    """Issue 30: prior.py draws the class images before the first step, for minutes on a CPU; the training process
    counts them on disk into progress.json, which the page reads ("Making class images: 40 of 50")."""
    from dreambooth_helpers.jobs import PROGRESS_FILE

    folder = tmp_path / "job"
    folder.mkdir()
    config = tiny_config(tmp_path / "photos", output_dir=str(folder / "output"), with_prior_preservation=True,
                         concepts=[Concept(str(tmp_path / "photos"), "a photo of sks dog", "a photo of dog")],
                         num_class_images=5)
    class_dir = folder / "output" / "class_images" / "a-photo-of-dog"
    writer = ProgressWriter(folder, 8)

    def progress() -> Job:
        return Job("job", folder, RUNNING, 0.0, progress=json.loads((folder / PROGRESS_FILE).read_text()))

    def wait_for(made: int) -> Job:
        deadline = time.monotonic() + 30
        while not ((folder / PROGRESS_FILE).is_file() and progress().class_images == (made, 5)):
            assert time.monotonic() < deadline, f"progress.json never said {made} of 5"
            time.sleep(0.02)
        return progress()

    with ClassImagesWatch(config, writer, every=0.02):
        time.sleep(0.1)
        assert not (folder / PROGRESS_FILE).exists()  # nothing made yet: the page still says "Starting"
        class_dir.mkdir(parents=True)
        (class_dir / ".class-00000.png.partial").write_bytes(b"half")  # being written: not counted
        for index in range(2):
            (class_dir / f"class-{index:05d}.png").write_bytes(b"png")
        job = wait_for(2)
        assert job.progress["phase"] == "class_images" and job.progress["total_steps"] == 8 and job.step == 0
        for index in range(2, 5):
            (class_dir / f"class-{index:05d}.png").write_bytes(b"png")
        wait_for(5)
    assert class_images_on_disk(config) == (5, 5)

    writer(1, {"loss": 0.5, "time": 1.0, "samples": []})  # the first step: the phase is over
    writer.class_images(5, 5)  # a late count never overwrites a step
    job = progress()
    assert job.class_images is None and job.step == 1 and "phase" not in job.progress
    assert [h["step"] for h in job.progress["history"]] == [1]


def test_a_stopped_run_says_what_it_really_kept(tmp_path):
    """Cancel and Ctrl+C in a job: the newest checkpoint when there is one (checkpoints.list_checkpoints, the CLI's
    source too), else that none was saved and Resume starts from step 0; the class images made are reused."""
    output = tmp_path / "output"
    config = tiny_config(tmp_path / "photos", output_dir=str(output), checkpoint_every=None)
    assert kept_when_stopped(config) == ("No checkpoint was saved yet (this run saves none): Resume starts again "
                                         "from step 0.")
    prior = config.replace(with_prior_preservation=True, num_class_images=50,
                           concepts=[Concept(str(tmp_path / "photos"), "a photo of sks dog", "a photo of dog")])
    (output / "class_images" / "a-photo-of-dog").mkdir(parents=True)
    for index in range(40):
        (output / "class_images" / "a-photo-of-dog" / f"class-{index:05d}.png").write_bytes(b"png")
    assert kept_when_stopped(prior.replace(checkpoint_every=400)) == (
        "No checkpoint was saved yet (this run saves one every 400 steps): Resume starts again from step 0; the 40 "
        "class image(s) made so far are kept and reused.")
    for step in (200, 400):
        ckpt.checkpoint_dir(output, step).mkdir(parents=True)
        (ckpt.checkpoint_dir(output, step) / "state.json").write_text(json.dumps({"step": step}))
    ckpt.checkpoint_dir(output, 600).mkdir()  # half-written: not one to resume from
    assert kept_when_stopped(config).startswith("The checkpoint of step 400 is kept: Resume continues from it.")
