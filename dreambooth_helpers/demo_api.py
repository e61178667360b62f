"""What the demo and the training app share: one model behind one generation queue.

`DemoService` owns the one model of a process: it loads it in the background, checks each request against
`DemoLimits` and serves requests first come, first served from one FIFO with one worker thread, whoever sent
them, so a second user waits for the first instead of running two generations on one GPU. A request whose
sender hung up leaves the queue (`withdraw`). The demo's page (demo.py), the app's finished-run tab (app.py)
and the REST API (demo_rest.py: POST /api/generate, GET /api/health) all put their requests into it. What a
share link shows of the model is its name (`display_name`: a Hub id, or a local folder's name), never a
local path.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TINY_MODEL, TOY_MODEL, check_int_range
from .errors import ConfigError, DreamBoothError, ModelLoadError
from .families import SD1, family_of
from .inference import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MAX_SEED,
    GeneratedImage,
    Generator,
    example_prompts,
    load_generator,
    resolve_model,
    save_images,
)
from .models import OFFLINE_RESOLUTIONS, SD15_RANDOM
from .safe_text import log_exception, masked

logger = logging.getLogger(__name__)
RANDOM_SEED = "random"
BUILT_IN_MODELS = (TINY_MODEL, TOY_MODEL, SD15_RANDOM)


@dataclass(frozen=True)
class DemoLimits:
    """Bounds on what one request may ask for, so a public link cannot exhaust the GPU or the disk."""

    max_prompt_chars: int = 500
    max_steps: int = 100
    max_images: int = 4
    max_guidance: float = 20.0
    max_resolution: int | None = None  # None: 1.5x the model's resolution (768 for SD 1.x)
    max_queue: int = 32  # requests waiting beyond this are turned away ("busy, try again")
    max_request_bytes: int = 64 * 1024  # a request carries a prompt, not a file
    max_saved_images: int = 200  # the page's images kept on disk; older ones are deleted


def parse_seed(value: Any) -> int | None:
    """A seed from a form field: "random" or empty -> None (pick one), else a whole number."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", RANDOM_SEED)):
        return None
    if isinstance(value, bool):  # True is an int to Python, not a seed to a user
        raise ConfigError(f'Seed {value!r} is not a whole number; give a number or "random".')
    try:
        seed = int(str(value).strip())
    except ValueError:
        raise ConfigError(f'Seed {value!r} is not a whole number; type a number or "random".') from None
    return seed


def parse_auth(text: str) -> tuple[str, str]:
    """"USER:PASS" -> (user, password), for --auth."""
    user, sep, password = (text or "").partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must look like USER:PASS (both non-empty), e.g. --auth friend:s3cret.")
    return user, password


def check_auth_pair(auth: Any) -> None:
    if auth is None:
        return
    if (not isinstance(auth, (tuple, list)) or len(auth) != 2 or not all(isinstance(a, str) and a for a in auth)
            or ":" in auth[0]):
        raise ConfigError("auth must be a (user, password) pair of non-empty strings, the user without ':' "
                          "(--auth USER:PASS).")


# ---------------------------------------------------------------------------- model names


def _looks_like_local_path(reference: str) -> bool:
    # A Hub id is exactly OWNER/NAME; anything else that is not a folder here was meant as a path.
    return reference.startswith((".", "/", "~")) or "\\" in reference or reference.count("/") != 1


def display_name(reference: str | None) -> str | None:
    """What the page, the API and PNG metadata show for a model or LoRA: a Hub id or built-in name as given,
    a local file or folder by its name only, so a share link never reveals where things live on this machine."""
    if reference is None or reference in BUILT_IN_MODELS:
        return reference
    path = Path(reference).expanduser()
    if path.exists():
        return path.resolve().name or reference
    if _looks_like_local_path(reference):
        return path.name or "model"
    return reference


def check_model_reference(model: str) -> None:
    """Refuse a --model that cannot load, as far as that is known without loading it (no network)."""
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("--model is empty: give a trained output folder, a Hub id or \"toy\".")
    if model in BUILT_IN_MODELS or Path(model).expanduser().exists():
        return
    if _looks_like_local_path(model):
        raise ModelLoadError(f"--model {model!r}: no such file or folder. Check the path (the output folder of "
                             "`train`), or give a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ModelLoadError(f"--model {model!r} is neither a file or folder here nor a valid Hub id "
                             "(OWNER/NAME with letters, digits, '-', '_' and '.').") from None


def _resolution_before_loading(base_model: str) -> int:
    """What a model draws, known before it loads (the page is built while it loads): a built-in's size, else its
    family's (from the folder, the file's header or a cached model_index.json: no network; SD 1.x if unknown)."""
    if base_model in OFFLINE_RESOLUTIONS:
        return OFFLINE_RESOLUTIONS[base_model]
    try:
        return family_of(base_model, hub_options={"local_files_only": True}).native_resolution
    except DreamBoothError:  # an unreadable file: loading says what is wrong with it
        return SD1.native_resolution


# ---------------------------------------------------------------------------- the model, held once


@dataclass(eq=False)
class DemoJob:
    """One request in the demo's queue: its settings, and the future its images (or its error) arrive in."""

    settings: dict[str, Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class DemoService:
    """Owns the one model of a demo process: loads it (in the background), checks requests, and serves them
    first come, first served from one queue with one worker thread, whoever sent them (page or REST)."""

    def __init__(self, model: str, lora: str | None = None, *, limits: DemoLimits | None = None,
                 output_dir: str | Path | None = None, generator_options: dict[str, Any] | None = None):
        self.model, self.lora = model, lora
        self.limits = limits or DemoLimits()
        # Reading the training summary is cheap; the example prompts are shown before the model loads.
        self.base_model, self.lora_path, self.summary = resolve_model(model, lora)
        self._expected_resolution = int((self.summary or {}).get("resolution") or
                                        _resolution_before_loading(self.base_model))
        self.model_name = display_name(model)
        self.lora_name = display_name(lora)
        self.owns_output_dir = output_dir is None
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="dreambooth-demo-")).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.share_url: str | None = None  # set once the server runs; the page's API help links to it
        self._generator_options = generator_options or {}
        self._generator: Generator | None = None
        self._load_error: str | None = None
        self._loaded = threading.Event()
        self._load_started = threading.Lock()
        self._load_thread: threading.Thread | None = None
        # The queue: waiting jobs in arrival order, the one running, and the condition guarding both.
        self._jobs: collections.deque[DemoJob] = collections.deque()
        self._running: DemoJob | None = None
        self._jobs_changed = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._saved: collections.deque[Path] = collections.deque()
        self._saved_lock = threading.Lock()
        self._saves = 0

    # -- loading

    def start_loading(self) -> None:
        """Load the model in a background thread (once; later calls do nothing)."""
        if self._load_started.acquire(blocking=False):
            self._load_thread = threading.Thread(target=self._load, name="demo-model-load", daemon=True)
            self._load_thread.start()

    def _load(self) -> None:
        try:
            self._generator = load_generator(self.model, self.lora, **self._generator_options)
        except DreamBoothError as error:
            self._load_error = self.redact(str(error))
        except Exception as error:  # any failure must reach the page, not die in a thread
            log_exception(logger, "Loading the demo model failed", error)  # its whole chain, tokens masked
            self._load_error = masked(self.redact(f"{type(error).__name__}: {error}"))
        finally:
            self._loaded.set()

    def wait_until_loaded(self, timeout: float | None = None) -> Generator:
        self.start_loading()
        if not self._loaded.wait(timeout):
            raise DreamBoothError("The model is still loading; try again in a moment.")
        if self._generator is None:
            raise ModelLoadError(f"The model could not be loaded: {self._load_error}")
        return self._generator

    def redact(self, text: str) -> str:
        """`text` with the local paths of the model and LoRA replaced by their names (messages reach the page)."""
        replacements: dict[str, str] = {}
        for reference in (self.model, self.lora, self.base_model, self.lora_path):
            if not reference or reference in BUILT_IN_MODELS:
                continue
            name = display_name(reference) or ""
            path = Path(reference).expanduser()
            for form in {reference, str(path), str(path.resolve()) if path.exists() else str(path.absolute())}:
                if form != name:
                    replacements[form] = name
        for form in sorted(replacements, key=len, reverse=True):  # longest first: a path before its prefix
            text = text.replace(form, replacements[form])
        home = str(Path.home())
        return text.replace(home, "~") if len(home) > 1 else text

    @property
    def state(self) -> str:
        if not self._loaded.is_set():
            return "loading"
        return "ready" if self._generator is not None else "failed"

    @property
    def resolution(self) -> int:
        if self._generator is not None:
            return self._generator.default_resolution
        return self._expected_resolution

    @property
    def max_resolution(self) -> int:
        if self.limits.max_resolution:
            return self.limits.max_resolution
        return (self.resolution * 3 // 2) // 8 * 8

    def health(self) -> dict[str, Any]:
        return {"status": self.state, "model": self.model_name, "lora": self.lora_name, "resolution": self.resolution,
                "queue": self.queue_counts(), "message": self.status_text(),
                "limits": self.limits.__dict__ | {"max_resolution": self.max_resolution}}

    def status_text(self) -> str:
        name = f"`{self.model_name}`" + (f" + LoRA `{self.lora_name}`" if self.lora else "")
        if self.state == "loading":
            return f"Loading {name}... The first load can take a few minutes while the weights download."
        if self.state == "failed":
            return f"The model could not be loaded: {self._load_error}"
        device = self._generator.device if self._generator else "?"
        unfiltered = f" **{self._generator.safety_note}**" if self._generator and self._generator.safety_note else ""
        return f"Ready: {name} on {device}, {self.resolution} px. Type a prompt and press Generate.{unfiltered}"

    def example_prompts(self) -> list[str]:
        return example_prompts(self.summary)

    # -- the queue

    def check_request(self, prompt: str, negative_prompt: str, steps: int, guidance: float, num_images: int,
                      width: int | None, height: int | None) -> None:
        """Refuse requests beyond the demo's limits, naming the limit."""
        limits = self.limits
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("The prompt is empty: describe the image, e.g. \"a photo of sks dog on the beach\".")
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt or "")):
            if len(text) > limits.max_prompt_chars:
                raise ConfigError(f"The {name} is {len(text)} characters; this demo takes at most "
                                  f"{limits.max_prompt_chars}.")
            if isinstance(text, str) and not _encodable(text):
                raise ConfigError(f"The {name} holds a lone surrogate (half of a UTF-16 pair, such as \\ud800), "
                                  "which is no character; send the text as UTF-8.")
        if not _is_whole(steps) or not 1 <= steps <= limits.max_steps:
            raise ConfigError(f"steps must be from 1 to {limits.max_steps} in this demo (got {steps!r}).")
        if not _is_whole(num_images) or not 1 <= num_images <= limits.max_images:
            raise ConfigError(f"num_images must be from 1 to {limits.max_images} in this demo (got {num_images!r}).")
        if isinstance(guidance, bool) or not 0.0 <= float(guidance) <= limits.max_guidance:
            raise ConfigError(f"guidance must be from 0 to {limits.max_guidance:g} (got {guidance!r}).")
        for name, size in (("width", width), ("height", height)):
            if size is not None and (not _is_whole(size) or not 8 <= size <= self.max_resolution):
                raise ConfigError(f"{name} must be from 8 to {self.max_resolution} px in this demo (got {size!r}).")

    def submit(self, prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
               guidance: float = DEFAULT_GUIDANCE, seed: int | None = None, num_images: int = 1,
               width: int | None = None, height: int | None = None) -> DemoJob:
        """Check a request and put it at the end of the queue; its images arrive in `job.future`."""
        self.check_request(prompt, negative_prompt, steps, guidance, num_images, width, height)
        if seed is not None:  # refused now, not once its turn comes
            check_int_range("seed", seed, 0, MAX_SEED - num_images + 1)
        job = DemoJob(dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance,
                           seed=seed, num_images=num_images, width=width, height=height))
        with self._jobs_changed:
            if self._closed:
                raise DreamBoothError("The demo is shutting down.")
            if len(self._jobs) + (self._running is not None) >= self.limits.max_queue:
                raise DreamBoothError("The demo is busy (too many requests waiting); try again in a minute.")
            self._jobs.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="demo-queue", daemon=True)
                self._worker.start()
            self._jobs_changed.notify_all()
        return job

    def generate(self, prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int | None = None, num_images: int = 1,
                 width: int | None = None, height: int | None = None) -> list[GeneratedImage]:
        """Check, wait for the model and our turn, generate. Raises DreamBoothError with a readable message."""
        job = self.submit(prompt, negative_prompt, steps, guidance, seed, num_images, width, height)
        try:
            return job.future.result()
        finally:
            self.withdraw(job)

    def ahead_of(self, job: DemoJob) -> int:
        """How many requests are served before `job`: the running one and those that arrived earlier."""
        with self._jobs_changed:
            if job is self._running or job not in self._jobs:
                return 0
            return self._jobs.index(job) + (self._running is not None)

    def queue_counts(self) -> dict[str, int]:
        with self._jobs_changed:
            return {"running": int(self._running is not None), "waiting": len(self._jobs)}

    def withdraw(self, job: DemoJob) -> None:
        """Take a job out of the queue if it has not started (its sender left); no-op otherwise."""
        with self._jobs_changed:
            if job in self._jobs:
                self._jobs.remove(job)
                job.future.cancel()

    def _serve(self) -> None:
        """The worker: one job at a time, in arrival order, until the service closes."""
        while True:
            with self._jobs_changed:
                while not self._jobs and not self._closed:
                    self._jobs_changed.wait()
                if self._closed:
                    return
                job = self._running = self._jobs.popleft()
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(self._run(job.settings))
                    except Exception as error:  # the sender shows it; the worker goes on with the next job
                        job.future.set_exception(error)
            finally:
                with self._jobs_changed:
                    self._running = None

    def _run(self, settings: dict[str, Any]) -> list[GeneratedImage]:
        # Running out of GPU memory comes back as a GenerationError whose message says what to change.
        results = self.wait_until_loaded().generate(**settings)
        # The images carry the model's name, not where it lives here (their metadata travels with them).
        return [dataclasses.replace(r, model=display_name(r.model), lora=display_name(r.lora)) for r in results]

    # -- files

    def save(self, results: list[GeneratedImage]) -> list[Path]:
        """Save the page's images into the output folder, keeping only the newest `limits.max_saved_images`."""
        with self._saved_lock:
            self._saves += 1
            paths = save_images(results, self.output_dir / "images", prefix=f"page{self._saves:06d}")
            self._saved.extend(paths)
            while len(self._saved) > self.limits.max_saved_images:
                self._saved.popleft().unlink(missing_ok=True)
        return paths

    def cleanup(self) -> None:
        with self._jobs_changed:
            self._closed = True
            for job in self._jobs:
                job.future.cancel()
            self._jobs.clear()
            self._jobs_changed.notify_all()
        if self.owns_output_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encodable(text: str) -> bool:
    """Whether `text` is real characters: a lone surrogate (JSON's "\\ud800" decodes to one) is not, and
    fails later in the tokenizer, the PNG metadata or the JSON answer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
