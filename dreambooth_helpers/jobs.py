"""Training jobs that outlive the page that started them: one at a time, queued, with their state on disk.

A JobRunner owns a work folder. Each run is a folder under WORKDIR/jobs/ that holds everything about it:

    config.json     the TrainConfig (its output_dir is the job's own output/ folder)
    state.json      status (queued, running, finished, failed, cancelled, interrupted), pid, times, error
    progress.json   written by the training process (job_progress.py): the class images made so far while
                    it makes them, then after each step: step, loss, samples, the loss history
    result.json     written by the training process when it stops: finished, failed (with the error) or cancelled
    log.txt         the training process's output
    output/         the run's model, samples, checkpoints and training_summary.json
    photos/         the photos it trains on, when they were given to submit() as a folder that may change

Training runs in a separate process (`train()` in a fresh Python), so a crash or an out-of-memory in training
never takes the app down, and the process keeps training when the app stops. A new JobRunner over the same
folder (a page reload, a second tab, an app restart) reads the jobs back: a run whose process still lives is
followed again; one whose process died without saying why (the machine or the app was killed with it) is
"interrupted", and `resume()` continues it from its newest checkpoint with the exact-resume machinery
(`resume="latest"`). Cancel sends SIGINT, which training takes as Ctrl+C: the checkpoints already saved stay.

Only one run trains at a time, across every runner of the folder: starting one happens under a file lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import write_json_atomically
from .config import TrainConfig
from .errors import DreamBoothError

JOBS_DIR = "jobs"
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # what submit() makes, and earlier versions made
CONFIG_FILE, STATE_FILE, PROGRESS_FILE, RESULT_FILE, LOG_FILE, OUTPUT_DIR, PHOTOS_DIR = (
    "config.json", "state.json", "progress.json", "result.json", "log.txt", "output", "photos")
QUEUED, RUNNING, FINISHED, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "finished", "failed", "cancelled", "interrupted")
STOPPED = (FINISHED, FAILED, CANCELLED, INTERRUPTED)
RESUMABLE = (FAILED, CANCELLED, INTERRUPTED)
CANCEL_GRACE_S = 60.0  # after SIGINT, how long training may take to stop (a checkpoint being written) before SIGKILL
ERROR_CHARS = 2000  # at most this much of a log's last paragraph becomes the job's error
LOW_DISK_BYTES = 16 * 2**20  # less free space than this where a run died: the full disk is why
FREE_SPACE = "Free some space (old runs, checkpoints, exported files)"
DISK_FULL = ("The disk of the work folder is full (no space left on device), so the run could not go on or be "
             f"recorded. {FREE_SPACE}; Resume then continues from the newest checkpoint.")
DISK_FULL_NOW = f"The disk of the work folder is full (no space left on device): no run can be queued. {FREE_SPACE}."
logger = logging.getLogger(__name__)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _low_on_disk(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < LOW_DISK_BYTES
    except OSError:
        return False


class JobError(DreamBoothError):
    """A job request that cannot be done now (no such job, or not in a state that allows it)."""


class UnknownJob(JobError):
    """No such run (or, in the app, another user's: the same answer)."""


class TooManyRuns(JobError):
    """A user already has as many runs waiting or training as the app allows."""


@dataclass
class Job:
    """What the page shows of a run: its state.json, plus progress.json when training has started."""

    job_id: str
    folder: Path
    status: str
    created: float
    total_steps: int | None = None
    pid: int | None = None
    error: str | None = None
    owner: str | None = None  # the signed-in user who started it, when the app has several
    progress: dict[str, Any] = field(default_factory=dict)
    started: float | None = None  # when its process was launched (the last time, for a resumed run)
    finished: float | None = None  # when it stopped (finished, failed, cancelled)

    def elapsed(self, now: float | None = None) -> float:
        """Seconds it has run: from its launch to now while it runs, to its end once stopped; for a resumed run
        at least the time its loss history counts (the parts before the resume included)."""
        history = self.progress.get("history") or []
        counted = float(history[-1].get("time") or 0.0) if history else 0.0
        if self.started is None:
            return counted
        end = self.finished if self.status != RUNNING and self.finished else (now or time.time())
        return max(counted, max(end - self.started, 0.0))

    @property
    def output_dir(self) -> Path:
        return self.folder / OUTPUT_DIR

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_FILE

    @property
    def step(self) -> int:
        return int(self.progress.get("step") or 0)

    @property
    def samples(self) -> list[str]:
        return list(self.progress.get("samples") or [])

    @property
    def class_images(self) -> tuple[int, int] | None:
        """(made, wanted) while training makes the class images, before its first step; None otherwise."""
        from .job_progress import CLASS_IMAGES_PHASE

        if self.progress.get("phase") != CLASS_IMAGES_PHASE:
            return None
        counts = self.progress.get("class_images") or {}
        return int(counts.get("made") or 0), int(counts.get("total") or 0)

    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(json.loads((self.folder / CONFIG_FILE).read_text()))

    def kept(self) -> str:
        """What the stopped run keeps (job_progress.kept_when_stopped); "" when its config.json cannot be read."""
        from .job_progress import kept_when_stopped

        try:
            return kept_when_stopped(self.config())
        except (OSError, ValueError, TypeError):
            return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return {}
    return data if isinstance(data, dict) else {}


def last_error_paragraph(log_text: str) -> str:
    """The last paragraph of a log that says something (a traceback's end, or our one-paragraph error)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", log_text) if p.strip()]
    if not paragraphs:
        return "The training process ended without a message."
    text = paragraphs[-1]
    lines = text.splitlines()
    traceback_start = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), None)
    if traceback_start is not None:  # the error itself is the traceback's last lines, after its frames
        text = "\n".join(line for line in lines[traceback_start:] if not line.startswith(" ")).strip()
        text = text.removeprefix("Traceback (most recent call last):").strip()
    return text[-ERROR_CHARS:]


def process_alive(pid: int | None, marker: str | None = None) -> bool:
    """Whether process `pid` runs (not a zombie) and, when /proc says, was started with `marker` in its command.

    Another user's process under that pid (kill answers EPERM: a reused pid) is ours only when /proc shows `marker`
    in its command line; where /proc cannot tell, it is not, so a stale run never stays "running"."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        ours = True
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process under that pid: ours only if its command line says so
        ours = False
    proc = Path(f"/proc/{pid}")
    unknown = ours or marker is None  # what to answer when /proc cannot tell
    if not proc.exists():
        return unknown
    try:
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if marker is not None:  # a reused pid is another program: the job's process is gone
            return marker in proc.joinpath("cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return unknown
    return True


class JobRunner:
    """Queue, start, follow, cancel and resume training runs in `workdir`; state on disk, one run at a time.

    A background thread (`start()`) starts the next queued run when none is training; `poll()` does one round
    of that by hand (tests, and callers without the thread). `environment` is added to the training processes'
    environment.
    """

    def __init__(self, workdir: str | Path, *, environment: dict[str, str] | None = None, poll_every: float = 0.5):
        self.workdir = Path(workdir).resolve()
        self.jobs_dir = self.workdir / JOBS_DIR
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.environment = dict(environment or {})
        self.poll_every = poll_every
        self._children: dict[str, subprocess.Popen] = {}  # the processes this runner started, to reap them
        self._unsaved: dict[str, dict[str, Any]] = {}  # state changes a full disk kept from state.json
        self.disk_full: str | None = None  # DISK_FULL while the disk keeps a run's state from being written
        self._thread_lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the jobs on disk

    def jobs(self) -> list[Job]:
        """Every job in the folder, oldest first, with its current state."""
        self.poll()
        return self._read_all()

    def job(self, job_id: str) -> Job:
        self.poll()
        return self._read(job_id)

    def _read_all(self) -> list[Job]:
        # (A folder copied in by hand under a name no run has, "backup copy", is no run: it must not stop the rest.)
        found = [self._read(folder.name) for folder in self.jobs_dir.iterdir()
                 if RUN_ID.fullmatch(folder.name) and folder.is_dir() and (folder / STATE_FILE).is_file()]
        return sorted(found, key=lambda job: (job.created, job.job_id))

    def _folder(self, job_id: str) -> Path:
        if not RUN_ID.fullmatch(str(job_id)):  # (a NUL, a separator or a name too long for the disk: no run)
            raise UnknownJob(f"No training run {str(job_id)[:80]!r}.")
        folder = (self.jobs_dir / job_id).resolve()
        if folder.parent != self.jobs_dir or not (folder / STATE_FILE).is_file():
            raise UnknownJob(f"No training run {job_id!r}.")  # no server path in it
        return folder

    def _read(self, job_id: str) -> Job:
        folder = self._folder(job_id)
        state = {**_read_json(folder / STATE_FILE), **self._unsaved.get(job_id, {})}  # what a full disk kept back
        return Job(job_id, folder, state.get("status", QUEUED), float(state.get("created", 0.0)),
                   state.get("total_steps"), state.get("pid"), state.get("error"), state.get("owner"),
                   _read_json(folder / PROGRESS_FILE), state.get("started"), state.get("finished"))

    def _update(self, job_id: str, **changes: Any) -> None:
        """Write `changes` into the run's state.json. On a full disk they are kept in memory (what `_read` shows),
        written by a later poll once there is room, and the disk is said to be full once (`disk_full`)."""
        path = self._folder(job_id) / STATE_FILE
        changes = {**self._unsaved.pop(job_id, {}), **changes}
        try:
            write_json_atomically(path, {**_read_json(path), **changes})
        except OSError as error:
            if not is_disk_full(error):
                raise
            self._unsaved[job_id] = changes
            if self.disk_full is None:
                logger.warning("%s (%s)", DISK_FULL, self.workdir)
                self.disk_full = DISK_FULL
            return
        if not self._unsaved:
            self.disk_full = None

    @contextlib.contextmanager
    def _locked(self):
        """This process's threads and every other runner of the folder, one at a time."""
        with self._thread_lock, open(self.jobs_dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- requests

    def submit(self, config: TrainConfig, *, name: str = "run", total_steps: int | None = None,
               owner: str | None = None, photos: Path | None = None) -> Job:
        """Queue a run of `config`; its outputs go to the job's own folder (config.output_dir is replaced).

        `photos`: a folder the run's concepts read that may change before the run ends (the app's upload folder):
        its photos are kept in the run's own folder (hard links, so no copy of their bytes where the disk allows)
        and the run reads those, whatever is uploaded, deleted or resumed later."""
        safe_name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
        # 96 random bits: the id is all it takes to reach a run (earlier runs' shorter ids still load).
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{safe_name}-{secrets.token_urlsafe(12)}"
        folder = self.jobs_dir / job_id
        config = config.replace(output_dir=str(folder / OUTPUT_DIR)).validate()
        try:
            folder.mkdir()
            if photos is not None:
                config = _keep_photos(config, Path(photos), folder / PHOTOS_DIR)
            write_json_atomically(folder / CONFIG_FILE, config.to_dict())
            write_json_atomically(folder / STATE_FILE, {"status": QUEUED, "created": time.time(),
                                                        "total_steps": total_steps, "owner": owner})
        except OSError as error:
            if not is_disk_full(error):
                raise
            shutil.rmtree(folder, ignore_errors=True)
            raise JobError(DISK_FULL_NOW) from None
        self.poll()
        return self._read(job_id)

    def cancel(self, job_id: str) -> Job:
        """Stop a run: a queued one never starts; a running one gets SIGINT (Ctrl+C) and keeps its checkpoints."""
        with self._locked():
            job = self._read(job_id)
            if job.status == QUEUED:
                self._update(job_id, status=CANCELLED, finished=time.time())
            elif job.status == RUNNING:
                self._update(job_id, cancel_requested=time.time())
                self._signal(job, signal.SIGINT)
            else:
                raise JobError(f"Run {job_id} is {job.status}: there is nothing to cancel.")
        return self._read(job_id)

    def resume(self, job_id: str) -> Job:
        """Queue a stopped run again; it continues from its newest checkpoint (resume="latest")."""
        with self._locked():
            job = self._read(job_id)
            if job.status not in RESUMABLE:
                raise JobError(f"Run {job_id} is {job.status}; only a {', '.join(RESUMABLE)} run can be resumed.")
            config = job.config().replace(resume="latest")
            try:
                write_json_atomically(job.folder / CONFIG_FILE, config.to_dict())
            except OSError as error:
                if not is_disk_full(error):
                    raise
                raise JobError(DISK_FULL_NOW) from None
            (job.folder / RESULT_FILE).unlink(missing_ok=True)
            self._update(job_id, status=QUEUED, error=None, pid=None, cancel_requested=None, resumed=time.time())
        self.poll()
        return self._read(job_id)

    def resume_interrupted(self) -> list[Job]:
        """Resume, by themselves, the runs found interrupted (the app or the machine stopped while they trained),
        each once: a run interrupted again after its automatic resume waits for a click (it may be what brings
        the machine down). Returns the runs queued again."""
        self.poll()  # settles the runs whose process died with the app: "interrupted"
        resumed = []
        for job in self._read_all():
            with self._locked():
                state = _read_json(job.folder / STATE_FILE)
                if state.get("status") != INTERRUPTED or state.get("auto_resumed"):
                    continue  # (another runner of the folder may have resumed it meanwhile)
                self._update(job.job_id, auto_resumed=time.time())
            try:
                resumed.append(self.resume(job.job_id))
            except Exception as error:  # its config damaged, the disk full: it waits for a click, the app starts
                logger.warning("Run %s was not resumed: %s", job.job_id, error)
        return resumed

    def wait(self, job_id: str, timeout: float = 600.0) -> Job:
        """Block until the run stopped (finished, failed, cancelled or interrupted); JobError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.status in STOPPED:
                return job
            if time.monotonic() > deadline:
                raise JobError(f"Run {job_id} is still {job.status} after {timeout:.0f} s.")
            time.sleep(self.poll_every)

    # -- the round that moves jobs along

    def poll(self) -> None:
        """Settle runs whose process ended, then start the oldest queued run if none is training."""
        with self._locked():
            for job_id in list(self._unsaved):  # what a full disk kept back, written once there is room
                try:
                    self._update(job_id)
                except JobError:  # its folder is gone
                    self._unsaved.pop(job_id, None)
            running = False
            for job in self._read_all():
                if job.status == RUNNING:
                    running = self._follow(job) or running
            if not running and self.disk_full is None:  # nothing starts on a full disk
                queued = [job for job in self._read_all() if job.status == QUEUED]
                if queued:
                    self._launch(queued[0])

    def _follow(self, job: Job) -> bool:
        """True while `job`'s process trains; once it has stopped, its state says how it ended."""
        child = self._children.get(job.job_id)
        if child is not None and child.poll() is None:
            self._enforce_cancel(job)
            return True
        if child is None and process_alive(job.pid, str(job.folder)):
            self._enforce_cancel(job)
            return True  # started by another runner (or before an app restart), still training
        self._children.pop(job.job_id, None)
        result = _read_json(job.folder / RESULT_FILE)
        outcome = result.get("outcome")
        state = _read_json(job.folder / STATE_FILE)
        if outcome in (FINISHED, FAILED, CANCELLED):
            error = result.get("error") if outcome == FAILED else None
        elif state.get("cancel_requested"):
            outcome, error = CANCELLED, None
        elif child is not None:  # our own child died without a word: a crash (killed, out of memory, a segfault)
            error = last_error_paragraph(self._log_text(job))
            full = "No space left on device" in error or "[Errno 28]" in error or _low_on_disk(job.folder)
            outcome, error = FAILED, DISK_FULL if full else error
        else:  # found dead after a restart: the app, or the machine, went down with it
            outcome, error = INTERRUPTED, None
        self._update(job.job_id, status=outcome, error=error, finished=time.time())
        return False

    def _enforce_cancel(self, job: Job) -> None:
        requested = _read_json(job.folder / STATE_FILE).get("cancel_requested")
        if requested and time.time() - float(requested) > CANCEL_GRACE_S:
            self._signal(job, signal.SIGKILL)

    def _log_text(self, job: Job) -> str:
        with contextlib.suppress(OSError):
            return job.log_path.read_text(errors="replace")[-50_000:]
        return ""

    def _signal(self, job: Job, signum: int) -> None:
        if process_alive(job.pid, str(job.folder)):
            try:
                os.killpg(job.pid, signum)  # its own process group: whatever training started stops too
            except ProcessLookupError:
                pass
            except PermissionError:
                raise JobError(f"Run {job.job_id}'s training process belongs to another user of this machine: "
                               "stop it as that user.") from None

    def _launch(self, job: Job) -> None:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **self.environment}
        package_root = str(Path(__file__).resolve().parents[1])
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
        # SIGINT (Cancel) works from the first line, even when the app itself was started with it ignored (`app &`
        # in a script): an ignored signal stays ignored across exec.
        command = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)"
                   "; from dreambooth_helpers.jobs import run_job; sys.exit(run_job(sys.argv[1]))", str(job.folder)]
        with open(job.log_path, "ab") as log:
            # A session of its own: Ctrl+C in the app's terminal does not stop training, and cancel signals
            # the whole group.
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=environment, cwd=job.folder, start_new_session=True)
        self._children[job.job_id] = child
        self._update(job.job_id, status=RUNNING, pid=child.pid, started=time.time())

    # -- the background thread

    def start(self) -> JobRunner:
        """Poll in a background thread until `close()`, so queued runs start and ended ones are settled."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dreambooth-jobs", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_every):
            with contextlib.suppress(Exception):  # a bad job folder must not stop the queue for the others
                self.poll()

    def close(self, *, cancel_running: bool = False) -> None:
        """Stop the background thread. Training goes on (a new runner finds it) unless `cancel_running`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if cancel_running:
            for job in self._read_all():
                if job.status == RUNNING:
                    self.cancel(job.job_id)


# ---------------------------------------------------------------------------- the training process


def count_steps(config: TrainConfig) -> int:
    """The run's step count, as train() will work it out from the photos (read the same way)."""
    from .data import read_images

    return config.steps_for(sum(len(read_images(c.instance_dir).images) for c in config.concepts))


def _keep_photos(config: TrainConfig, source: Path, kept: Path) -> TrainConfig:
    """`config` reading `kept`, a still copy of the photos in `source`, wherever a concept read `source`."""
    kept.mkdir()
    for photo in sorted(source.iterdir()) if source.is_dir() else []:
        if photo.is_file():
            try:
                os.link(photo, kept / photo.name)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(photo, kept / photo.name)
    source = source.resolve()
    concepts = [dataclasses.replace(c, instance_dir=str(kept)) if Path(c.instance_dir).resolve() == source else c
                for c in config.concepts]
    return config.replace(concepts=concepts)


def run_job(folder: str | Path) -> int:
    """The training process's main: train the job's config, report the outcome in result.json.

    SIGINT and SIGTERM stop training as Ctrl+C does (checkpoints already saved are kept). Exit 0 when finished.
    """
    import traceback

    from .job_progress import ClassImagesWatch, ProgressWriter
    from .safe_text import masked
    from .threads import use_one_thread_for
    from .training import train

    folder = Path(folder)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    outcome: dict[str, Any]
    try:
        if _read_json(folder / STATE_FILE).get("cancel_requested"):  # cancelled while this process started
            raise KeyboardInterrupt
        config = TrainConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        check_job_paths(config, folder)
        use_one_thread_for(config.model)  # a fresh process: the app's own thread setting does not reach it
        total = _read_json(folder / STATE_FILE).get("total_steps") or count_steps(config)
        writer = ProgressWriter(folder, total)
        with ClassImagesWatch(config, writer):
            result = train(config, progress=False, on_step=writer, on_notice=lambda text: print(text, flush=True))
        outcome = {"outcome": FINISHED, "output_dir": str(result.output_dir), "steps": result.global_step}
    except KeyboardInterrupt:
        print(f"Stopped on request. {Job(folder.name, folder, CANCELLED, 0.0).kept()}".rstrip(), flush=True)
        outcome = {"outcome": CANCELLED}
    except DreamBoothError as error:
        _say(f"error: {masked(str(error))}")
        outcome = {"outcome": FAILED, "error": masked(str(error))}
    except Exception as error:  # a bug, or the machine: the traceback goes to the log, its last line to the page
        _say(masked(traceback.format_exc()).rstrip())  # the whole chain, tokens masked
        text = DISK_FULL if is_disk_full(error) else masked(f"{type(error).__name__}: {error}")[-ERROR_CHARS:]
        outcome = {"outcome": FAILED, "error": text}
    with contextlib.suppress(OSError):  # on a full disk the runner finds out from the disk itself
        write_json_atomically(folder / RESULT_FILE, outcome)
    return 0 if outcome["outcome"] == FINISHED else 1


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # the log is on the same disk, which may be full
        print(text, flush=True)


def check_job_paths(config: TrainConfig, folder: Path) -> None:
    """Refuse a config.json (edited by hand, or by anyone with access to the work folder) that would write outside
    its run's folder: the output folder must be the run's own, class images and resumed checkpoints inside it."""
    folder = Path(folder).resolve()
    outside = [] if Path(config.output_dir).resolve() == folder / OUTPUT_DIR else [f"output_dir {config.output_dir}"]
    outside += [f"class_dir {concept.class_dir}" for concept in config.concepts
                if concept.class_dir and not Path(concept.class_dir).resolve().is_relative_to(folder)]
    if config.resume not in (None, "latest") and not Path(config.resume).resolve().is_relative_to(folder):
        outside.append(f"resume {config.resume}")
    if outside:
        raise JobError(f"This run's config.json points outside the run's own folder ({'; '.join(outside)}): runs "
                       "write only inside it. Start a new run from the page instead of editing config.json.")
