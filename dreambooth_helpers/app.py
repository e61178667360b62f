"""The whole journey in one web page: photos, training, trying the model, publishing it (`dreambooth-helpers app`).

`TrainingApp` holds the logic, one method per button, each taking the signed-in user (None without --auth), so
tests and other front ends call it without a browser; app_page.py's `build_ui` wraps it in a Gradio Blocks page with
four tabs, and app_rest.py in a REST API.

Everything lives in the work folder: uploaded photos (WORKDIR/photos, or WORKDIR/users/NAME/photos when --auth lists
several users), the training jobs (WORKDIR/jobs, see jobs.py: one run at a time, in its own process, found again
after a reload or a restart) and Gradio's file cache (WORKDIR/.gradio). The page serves images it made itself
(samples, crops, generated images) through that cache, and the exported file from WORKDIR/.gradio/exports: no other
path, inside or outside the work folder, is ever served. With several users each sees only their own photos and
runs. The Hub token typed into the Publish tab is used for that one upload and never stored, shown or logged.
What a visitor may train on, publish with and be shown (no server paths) is app_access.py's rules.
"""

import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import app_flow as flow
from .app_access import check_base_model, models_dirs, public_text, publish_token
from .config import PRESETS, TOY_MODEL, TrainConfig
from .data import DatasetReport
from .errors import ConfigError, DreamBoothError, HubError, ImageDataError, RepoExistsError
from .jobs import CANCELLED, FINISHED, INTERRUPTED, QUEUED, RUNNING, Job, JobError, JobRunner, TooManyRuns, UnknownJob
from .safe_text import plain_markdown
from .subject import DEFAULT_KIND, SUBJECT_KINDS

logger = logging.getLogger(__name__)
DEFAULT_WORKDIR = "dreambooth-app"
PREVIEW_SIZE = 256  # px: the crops shown in the Photos tab (training uses the model's resolution)
SAMPLES_SHOWN = 8
GRADIO_CACHE_VARIABLE = "GRADIO_TEMP_DIR"


@dataclass(frozen=True)
class AppLimits:
    """Bounds on what a visitor may upload and ask for: a shared link must not fill the disk or hold the GPU."""

    max_photos: int = 30
    max_file_bytes: int = 25 * 2**20  # one uploaded file (a zip of photos included)
    max_upload_bytes: int = 200 * 2**20  # one upload, all files together
    # Pixels, read from each photo's header before it is decoded: a 1 KB zip can hold gigapixels of flat PNG.
    max_photo_pixels: int = 70_000_000  # a 64 MP phone photo (9248x6936) passes
    max_upload_pixels: int = 1_000_000_000  # all photos of one upload together
    max_steps: int = 3000
    max_prompt_chars: int = 300
    max_generation_steps: int = 50
    max_class_images: int = 400  # generated before training, on this machine's GPU
    max_active_runs: int = 3  # one user's runs queued or training at once (the GPU trains one at a time)


class ModelBusy(DreamBoothError):
    """Another run's model is still making images: the one in memory is not swapped under its requests."""


@dataclass
class PhotosView:
    count: int
    crops: list[Any]  # PIL images, as training will see them (centre crops)
    report: str  # what was read and skipped, then the dataset doctor's findings


@dataclass
class JobView:
    job_id: str
    status: str
    text: str
    samples: list[tuple[Any, str]]  # (PIL image, caption)
    history: list[dict[str, Any]]


def default_model() -> str:
    """The base model the Train tab starts with: Stable Diffusion 1.5 on a GPU, the offline toy model without."""
    import torch

    from .notebook.runtime import SD15_MODEL

    return SD15_MODEL if torch.cuda.is_available() else TOY_MODEL


class TrainingApp:
    """The page's logic over a work folder: one method per action, each for the signed-in `user`."""

    def __init__(self, workdir: str | Path, *, users: list[str] | None = None, model: str | None = None,
                 limits: AppLimits | None = None, config_overrides: dict[str, Any] | None = None,
                 environment: dict[str, str] | None = None, generator_options: dict[str, Any] | None = None,
                 models_dir: list[str | Path] | None = None, publish_with_host_token: bool = False):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = list(users or [])
        self.model = model or default_model()
        self.models_dirs = models_dirs(models_dir, self.workdir)  # --models-dir: the folders visitors may train from
        self.publish_with_host_token = publish_with_host_token  # else the host's HF_TOKEN never publishes for them
        self.limits = limits or AppLimits()
        # Settings the page does not show, applied to every run (tests: a tiny resolution and few sample steps).
        self.config_overrides = dict(config_overrides or {})
        self.generator_options = dict(generator_options or {})  # the Try it tab's (attention slicing, VAE tiling)
        self.runner = JobRunner(self.workdir, environment=environment)
        self.cache_dir = self.workdir / ".gradio"
        self.exports_dir = self.cache_dir / "exports"
        self._services: dict[str, Any] = {}  # job id -> DemoService of its model (the newest one only)
        self._services_lock = threading.Lock()
        self._queueing = threading.Lock()  # starts and resumes, each counted against max_active_runs then queued

    # -- who sees what

    def _check_user(self, user: str | None) -> None:
        if self.users and user not in self.users:
            raise ConfigError("Sign in first: this page is for its listed users only.")

    def user_folder(self, user: str | None) -> Path:
        """The user's own part of the work folder: the folder itself unless --auth lists several users."""
        self._check_user(user)
        if len(self.users) > 1:
            return self.workdir / "users" / str(user)
        return self.workdir

    def photos_dir(self, user: str | None) -> Path:
        return self.user_folder(user) / "photos"

    def uploads_dir(self, user: str | None) -> Path:
        """Where the page's upload door (uploads.py) keeps the user's uploads until the page uses them."""
        from .uploads import user_uploads

        self._check_user(user)
        return user_uploads(self.cache_dir, user)

    def jobs(self, user: str | None) -> list[Job]:
        self._check_user(user)
        every = self.runner.jobs()
        return [job for job in every if job.owner == user] if len(self.users) > 1 else every

    def job(self, user: str | None, job_id: str | None) -> Job:
        """The user's run `job_id`; another user's run is "no such run", like one that does not exist."""
        if not job_id:
            raise JobError("Choose a run first.")
        self._check_user(user)
        unknown = UnknownJob(f"No training run {str(job_id)!r}.")  # the runner's words too: one answer for both
        try:
            found = self.runner.job(str(job_id))
        except UnknownJob:
            raise unknown from None
        if len(self.users) > 1 and found.owner != user:
            raise unknown
        return found

    # -- Photos

    def upload(self, user: str | None, files: list[str | Path], kind: str = DEFAULT_KIND) -> PhotosView:
        """Check an upload against the limits, read it as `check-images` does, and keep the usable photos
        (replacing the user's earlier ones); the Photos tab's view of them."""
        return self.photos_view(user, kind, upload=self.keep_photos(user, files))

    def keep_photos(self, user: str | None, files: list[str | Path]) -> DatasetReport:
        """`upload` without the view: what was read of the upload (kept photos, skipped files with reasons)."""
        from .data import read_images
        from .notebook.forms import UPLOAD_MAX_SIDE, save_uploads
        from .uploads import check_upload_files

        limits = self.limits
        files = [Path(f) for f in files or []]
        check_upload_files(files, limits)
        # Zips opened, hostile files skipped with a reason, as check-images does; every photo's pixels checked from
        # its header, then decoded once, at most the size kept (save_uploads writes these, reading nothing again).
        report = read_images(files, max_side=UPLOAD_MAX_SIDE, max_pixels=limits.max_photo_pixels,
                             max_total_pixels=limits.max_upload_pixels)
        report.source = "the upload"
        if len(report.images) > limits.max_photos:
            raise ImageDataError(f"The upload holds {len(report.images)} photos, more than this page takes "
                                 f"({limits.max_photos}); choose your best ones.")
        save_uploads(files, self.photos_dir(user), report=report)
        return report

    def photos_view(self, user: str | None, kind: str = DEFAULT_KIND, *,
                    upload: DatasetReport | None = None) -> PhotosView:
        """The user's photos as training crops them, and the report (app_flow.photo_report): warnings first (what
        the `upload` just read skipped, the dataset doctor's findings), then each photo once."""
        from .data import prepare_image, read_images
        from .doctor import diagnose

        folder = self.photos_dir(user)
        if not folder.is_dir():
            return PhotosView(0, [], flow.no_photos_text(kind))
        report = read_images(folder)
        crops = [prepare_image(record.image, PREVIEW_SIZE, "center") for record in report.images]
        text = flow.photo_report(report, diagnose(report, kind=kind), upload)
        return PhotosView(len(report.images), crops, public_text(text, self.workdir))

    # -- Train

    def make_config(self, user: str | None, *, kind: str = DEFAULT_KIND, token: str = "sks", class_noun: str = "",
                    model: str | None = None, preset: str | None = None, steps: int | None = None,
                    class_images: int | None = None) -> TrainConfig:
        """The run's TrainConfig, made as the notebook makes it (forms.settings_to_config: the same recipe)."""
        from .choices import DEFAULT_CHOICE, choice_for_model, preset_for_model
        from .data import read_images
        from .notebook.forms import NotebookSettings, settings_to_config
        from .notebook.runtime import NotebookRuntime

        if kind not in SUBJECT_KINDS:
            raise ConfigError(f"Subject kind {kind!r}: choose one of {', '.join(SUBJECT_KINDS)}.")
        if preset is not None and preset not in PRESETS:  # None: the one that goes with the model
            raise ConfigError(f"Preset {preset!r}: choose one of {', '.join(PRESETS)}.")
        steps = int(steps or 0)
        if not 0 <= steps <= self.limits.max_steps:
            raise ConfigError(f"Steps must be from 1 to {self.limits.max_steps} (0: the recipe's number).")
        if class_images is not None and not 0 <= int(class_images) <= self.limits.max_class_images:
            raise ConfigError(f"Class images must be from 0 (no prior preservation) to {self.limits.max_class_images}.")
        model = check_base_model(model or self.model, self.models_dirs, self.model)  # no other folder of the server
        photos = self.photos_dir(user)
        count = len(read_images(photos).images) if photos.is_dir() else 0
        if not count:
            raise ImageDataError("Upload photos of your subject in the Photos tab first.")
        if not (class_noun or "").strip():  # never a default: "dog" would train robot photos as a dog
            raise ConfigError(flow.CLASS_NOUN_MISSING)
        preset = preset or preset_for_model(model)
        choice = choice_for_model(model, preset) or DEFAULT_CHOICE  # its VAE goes with its model (SDXL's fp16-safe)
        settings = NotebookSettings(token=token, class_noun=class_noun, kind=kind, base_model=choice, preset=preset,
                                    steps=steps or None, num_class_images=class_images)
        # The runner moves the output into the job's folder; this placeholder never exists, so nothing resumes.
        placeholder = self.workdir / "jobs" / ".not-yet"
        config = settings_to_config(settings, photos, count, placeholder, model,
                                    NotebookRuntime(colab=False, smoke=False))
        return config.replace(**self.config_overrides).validate() if self.config_overrides else config

    def outlook(self, user: str | None, **settings: Any) -> str:
        """What the run will be, and whether it fits in GPU memory, before anything starts."""
        from .data import read_images
        from .notebook.forms import memory_outlook, summary_rows

        config = self.make_config(user, **settings)
        count = len(read_images(self.photos_dir(user)).images)
        rows = [(name, "(a new folder for this run)" if name == "output folder" else value)
                for name, value in summary_rows(config, count)]  # the expected time among them
        return flow.settings_markdown(rows, memory_outlook(config), lambda text: public_text(text, self.workdir))

    def model_outlook(self, user: str | None, base_model: str, *, kind: str = DEFAULT_KIND, preset: str | None = None,
                      steps: int | None = None) -> str:
        """What a base-model choice (choices.py) means for this user's run: model, resolution, steps, rates, class
        images, GPU memory on a T4 and system RAM on free Colab; counted for 5 photos until some are uploaded."""
        from .choices import TYPICAL_PHOTOS, outlook
        from .data import read_images

        photos = self.photos_dir(user)
        count = len(read_images(photos).images) if photos.is_dir() else 0
        settings = {**self.config_overrides, "kind": kind, "max_train_steps": int(steps or 0) or None}
        text = outlook(base_model, count or TYPICAL_PHOTOS, preset=preset, **settings).text()
        return text if count else f"{text}\n(No photos yet: counted for {TYPICAL_PHOTOS}.)"

    def start(self, user: str | None, **settings: Any) -> Job:
        from .data import read_images
        from .notebook.forms import run_name

        config = self.make_config(user, **settings)
        count = len(read_images(self.photos_dir(user)).images)
        name = run_name(settings.get("token", "sks"), settings.get("class_noun", ""))
        with self._queueing:  # counted and queued as one, or eight requests at once would all pass the count
            self._check_active_runs(user)
            job = self.runner.submit(config, name=name, total_steps=config.steps_for(count), owner=user,
                                     photos=self.photos_dir(user))  # kept with the run: a new upload is not it
        flow.save_form(job.folder, settings)  # a reload shows the form of the run that trains
        return job

    def _check_active_runs(self, user: str | None) -> None:
        active = [job.job_id for job in self.jobs(user) if job.status in (QUEUED, RUNNING)]
        if len(active) >= self.limits.max_active_runs:
            raise TooManyRuns(f"You have {len(active)} runs waiting or training, as many as this app takes at once: "
                              "wait for one to finish, or cancel one.")

    def cancel(self, user: str | None, job_id: str) -> Job:
        return self.runner.cancel(self.job(user, job_id).job_id)

    def resume(self, user: str | None, job_id: str) -> Job:
        job = self.job(user, job_id)
        with self._queueing:
            self._check_active_runs(user)
            return self.runner.resume(job.job_id)

    def job_view(self, user: str | None, job_id: str) -> JobView:
        """What the Train tab shows of a run: its state and progress, the newest samples, the loss history."""
        from .notebook.monitor import progress_line
        from .run_outputs import shown_sample

        job = self.job(user, job_id)
        total = job.total_steps or job.progress.get("total_steps") or 0
        if job.status == "queued":  # nothing starts while the disk is full (jobs.DISK_FULL says what to do)
            text = self.runner.disk_full or "Waiting: another run is training; this one starts when it ends."
        elif job.status == RUNNING and job.class_images:  # progress.json says so before the first step
            text = flow.class_images_line(*job.class_images, job.elapsed())
        elif job.status == RUNNING and not job.progress.get("history"):
            text = (f"Starting: loading the model and preparing the photos (and class images), "
                    f"{job.elapsed():.0f} s elapsed.")
        elif job.progress.get("history"):  # the elapsed time counts on between steps (progress.json: each step)
            logs = {**job.progress, "time": job.elapsed()}
            text = progress_line(job.step, total, logs, job.progress.get("seconds_per_step"))
        else:
            text = ""
        ending = {"finished": "Finished: try it in the next tab.",
                  "failed": f"Training failed: {plain_markdown(public_text(str(job.error), self.workdir))}",
                  "cancelled": "Cancelled.", "interrupted": "Interrupted (the app or the machine stopped while it "
                                                            "trained)."}.get(job.status)
        if job.status in (CANCELLED, INTERRUPTED):  # what was really kept, from the disk
            ending = f"{ending} {job.kept()}".rstrip()
        text = "\n\n".join(part for part in (f"**{job.job_id}**: {job.status}", text, ending) if part)
        samples = []
        for path in job.samples[-SAMPLES_SHOWN:]:
            resolved = Path(path).resolve()
            if resolved.is_relative_to(job.folder) and resolved.is_file():  # only the run's own files
                samples.append(shown_sample(resolved))  # enlarged sharply, captioned "step N: prompt"
        return JobView(job.job_id, job.status, text, samples, list(job.progress.get("history") or []))

    # -- Try it

    def _service(self, job: Job):
        """The run's DemoService, loaded if need be; called holding _services_lock, so no other request swaps it
        out before its caller has queued on it."""
        from .demo_api import DemoService

        if job.status != FINISHED:
            raise JobError(f"Run {job.job_id} is {job.status}: only a finished run can make images.")
        if job.job_id not in self._services:
            busy = sum(sum(old.queue_counts().values()) for old in self._services.values())
            if busy:  # one model in memory at a time: another run's requests finish first, none is dropped
                raise ModelBusy(f"Another run's model is making images ({busy} request(s)); this run's model "
                                "loads once they are done. Try again in a minute.")
            for old in self._services.values():
                old.cleanup()
            self._services.clear()
            service = DemoService(str(job.output_dir), output_dir=job.folder / "tried",
                                  generator_options=self.generator_options)
            service.start_loading()
            self._services[job.job_id] = service
        return self._services[job.job_id]

    def generate(self, user: str | None, job_id: str, prompt: str, *, steps: int = 25, seed: int | None = None,
                 num_images: int = 1) -> list[Any]:
        """Images from a finished run, through the demo's queue and checks (demo_api.DemoService)."""
        service, request = self.submit_generation(user, job_id, prompt, steps=steps, seed=seed, num_images=num_images)
        try:
            return [result.image for result in request.future.result()]
        finally:
            service.withdraw(request)

    def submit_generation(self, user: str | None, job_id: str, prompt: str, *, negative_prompt: str = "",
                          steps: int = 25, seed: int | None = None, guidance: float | None = None,
                          num_images: int = 1) -> tuple[Any, Any]:
        """Check a request and queue it with the run's model (one queue for the page and the REST API): the
        DemoService and the DemoJob whose future gets the images (withdraw it if its sender leaves)."""
        from .inference import DEFAULT_GUIDANCE

        if not job_id:
            raise JobError("Choose a finished run first (the \"Finished run\" list above).")
        if not prompt or not prompt.strip():
            raise ConfigError("Write a prompt with your identifier first, e.g. \"a photo of sks dog on the beach\".")
        if len(prompt) > self.limits.max_prompt_chars:
            raise ConfigError(f"The prompt is longer than {self.limits.max_prompt_chars} characters.")
        if not 1 <= int(steps) <= self.limits.max_generation_steps:
            raise ConfigError(f"Steps must be from 1 to {self.limits.max_generation_steps}.")
        if len(negative_prompt or "") > self.limits.max_prompt_chars:
            raise ConfigError(f"The negative prompt is longer than {self.limits.max_prompt_chars} characters.")
        job = self.job(user, job_id)
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
        with self._services_lock:  # found and queued on as one: a request for another run waits for this
            service = self._service(job)
            return service, service.submit(prompt, negative_prompt or "", int(steps), guidance, seed, int(num_images))

    def example_prompt(self, user: str | None, job_id: str) -> str:
        from .inference import example_prompts, resolve_model

        job = self.job(user, job_id)
        _, _, summary = resolve_model(str(job.output_dir), None)
        return (example_prompts(summary) or ["a photo of sks dog"])[0]

    # -- Publish

    def publish(self, user: str | None, job_id: str, repo_id: str, private: bool = True,
                token: str | None = None, overwrite: bool = False) -> str:
        """Push a finished run with its model card, with the token typed in (the host's HF_TOKEN or saved login
        only with --publish-with-host-token), into a new repository (an existing one only with `overwrite`)."""
        from .hub import check_repo_id, push_to_hub

        job = self.job(user, job_id)
        if job.status != FINISHED:
            raise JobError(f"Run {job.job_id} is {job.status}: only a finished run can be published.")
        repo_id = check_repo_id((repo_id or "").strip())
        token = publish_token(token, self.publish_with_host_token)
        try:
            return push_to_hub(job.output_dir, repo_id, private=bool(private), token=token, exist_ok=bool(overwrite))
        except RepoExistsError:
            raise HubError(f"{repo_id} already exists on the Hub; nothing was published and it was left as it is. "
                           "Choose a new name, or tick \"Overwrite existing repository\" to upload into it.") from None

    def export(self, user: str | None, job_id: str, half: bool = True) -> Path:
        """The run as one .safetensors file, in a folder of its own with an unguessable name (it is served)."""
        from .export import export_single_file

        job = self.job(user, job_id)
        if job.status != FINISHED:
            raise JobError(f"Run {job.job_id} is {job.status}: only a finished run can be exported.")
        folder = self.exports_dir / secrets.token_hex(16)
        folder.mkdir(parents=True)
        return Path(export_single_file(job.output_dir, folder / f"{job.job_id}.safetensors", half_precision=half))

    def close(self) -> None:
        self.runner.close()
        with self._services_lock:
            for service in self._services.values():
                service.cleanup()
            self._services.clear()
