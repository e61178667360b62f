"""The whole journey in one web page: photos, training, trying the model, publishing it (`dreambooth-helpers app`).

`TrainingApp` holds the logic, one method per button, each taking the signed-in user (None without --auth), so
tests and other front ends call it without a browser; `build_ui` wraps it in a Gradio Blocks page with four tabs.

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
from .config import DEFAULT_PRESET, PRESETS, TOY_MODEL, TrainConfig
from .errors import ConfigError, DreamBoothError, HubError, ImageDataError, RepoExistsError
from .jobs import FINISHED, RUNNING, Job, JobError, JobRunner
from .safe_text import log_exception, masked, plain_markdown
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
        unknown = JobError(f"No training run {str(job_id)!r}.")  # the runner's words too: one answer for both
        try:
            found = self.runner.job(str(job_id))
        except JobError:
            raise unknown from None
        if len(self.users) > 1 and found.owner != user:
            raise unknown
        return found

    # -- Photos

    def upload(self, user: str | None, files: list[str | Path], kind: str = DEFAULT_KIND) -> PhotosView:
        """Check an upload against the limits, read it as `check-images` does, and keep the usable photos
        (replacing the user's earlier ones)."""
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
        return self.photos_view(user, kind, report.format())

    def photos_view(self, user: str | None, kind: str = DEFAULT_KIND, read_report: str = "") -> PhotosView:
        """The user's photos as training crops them, and the dataset doctor's findings."""
        from .data import prepare_image, read_images
        from .doctor import diagnose

        folder = self.photos_dir(user)
        if not folder.is_dir():
            return PhotosView(0, [], "No photos yet: upload 5-20 photos of your subject (or a zip).")
        report = read_images(folder)
        crops = [prepare_image(record.image, PREVIEW_SIZE, "center") for record in report.images]
        doctor = diagnose(folder, kind=kind).format()
        text = "\n\n".join(part for part in (read_report, doctor) if part)
        return PhotosView(len(report.images), crops, public_text(text, self.workdir))

    # -- Train

    def make_config(self, user: str | None, *, kind: str = DEFAULT_KIND, token: str = "sks", class_noun: str = "dog",
                    model: str | None = None, preset: str = DEFAULT_PRESET, steps: int | None = None) -> TrainConfig:
        """The run's TrainConfig, made as the notebook makes it (forms.settings_to_config: the same recipe)."""
        from .choices import DEFAULT_CHOICE, choice_for_model
        from .data import read_images
        from .notebook.forms import NotebookSettings, settings_to_config
        from .notebook.runtime import NotebookRuntime

        if kind not in SUBJECT_KINDS:
            raise ConfigError(f"Subject kind {kind!r}: choose one of {', '.join(SUBJECT_KINDS)}.")
        if preset not in PRESETS:
            raise ConfigError(f"Preset {preset!r}: choose one of {', '.join(PRESETS)}.")
        steps = int(steps or 0)
        if not 0 <= steps <= self.limits.max_steps:
            raise ConfigError(f"Steps must be from 1 to {self.limits.max_steps} (0: the recipe's number).")
        model = check_base_model(model or self.model, self.models_dirs, self.model)  # no other folder of the server
        photos = self.photos_dir(user)
        count = len(read_images(photos).images) if photos.is_dir() else 0
        if not count:
            raise ImageDataError("Upload photos of your subject in the Photos tab first.")
        choice = choice_for_model(model, preset) or DEFAULT_CHOICE  # its VAE goes with its model (SDXL's fp16-safe)
        settings = NotebookSettings(token=token, class_noun=class_noun, kind=kind, base_model=choice, preset=preset,
                                    steps=steps or None)
        # The runner moves the output into the job's folder; this placeholder never exists, so nothing resumes.
        placeholder = self.workdir / "jobs" / ".not-yet"
        config = settings_to_config(settings, photos, count, placeholder, model,
                                    NotebookRuntime(colab=False, smoke=False))
        return config.replace(**self.config_overrides).validate() if self.config_overrides else config

    def outlook(self, user: str | None, **settings: Any) -> str:
        """What the run will be, and whether it fits in GPU memory, before anything starts."""
        from .data import read_images
        from .notebook.forms import config_summary, memory_outlook

        config = self.make_config(user, **settings)
        count = len(read_images(self.photos_dir(user)).images)
        summary = config_summary(config, count).replace(str(config.output_dir), "(a new folder for this run)")
        return public_text(f"{summary}\n\nMemory: {memory_outlook(config)}", self.workdir)  # photos: "photos"

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
        name = run_name(settings.get("token", "sks"), settings.get("class_noun", "dog"))
        job = self.runner.submit(config, name=name, total_steps=config.steps_for(count), owner=user)
        flow.save_form(job.folder, settings)  # a reload shows the form of the run that trains
        return job

    def cancel(self, user: str | None, job_id: str) -> Job:
        return self.runner.cancel(self.job(user, job_id).job_id)

    def resume(self, user: str | None, job_id: str) -> Job:
        return self.runner.resume(self.job(user, job_id).job_id)

    def job_view(self, user: str | None, job_id: str) -> JobView:
        """What the Train tab shows of a run: its state and progress, the newest samples, the loss history."""
        from .notebook.monitor import progress_line
        from .run_outputs import shown_sample

        job = self.job(user, job_id)
        total = job.total_steps or job.progress.get("total_steps") or 0
        if job.status == "queued":  # nothing starts while the disk is full (jobs.DISK_FULL says what to do)
            text = self.runner.disk_full or "Waiting: another run is training; this one starts when it ends."
        elif job.status == RUNNING and not job.progress:
            text = (f"Starting: loading the model and preparing the photos (and class images), "
                    f"{job.elapsed():.0f} s elapsed.")
        elif job.progress:  # the elapsed time counts on between steps (progress.json is written at each step)
            logs = {**job.progress, "time": job.elapsed()}
            text = progress_line(job.step, total, logs, job.progress.get("seconds_per_step"))
        else:
            text = ""
        ending = {"finished": "Finished: try it in the next tab.",
                  "failed": f"Training failed: {plain_markdown(public_text(str(job.error), self.workdir))}",
                  "cancelled": "Cancelled: the checkpoints saved so far are kept; Resume continues from the newest.",
                  "interrupted": "Interrupted (the app or the machine stopped while it trained): Resume continues "
                                 "from the newest checkpoint."}.get(job.status)
        text = "\n\n".join(part for part in (f"**{job.job_id}**: {job.status}", text, ending) if part)
        samples = []
        for path in job.samples[-SAMPLES_SHOWN:]:
            resolved = Path(path).resolve()
            if resolved.is_relative_to(job.folder) and resolved.is_file():  # only the run's own files
                samples.append(shown_sample(resolved))  # enlarged sharply, captioned "step N: prompt"
        return JobView(job.job_id, job.status, text, samples, list(job.progress.get("history") or []))

    # -- Try it

    def _service(self, user: str | None, job_id: str):
        from .demo_api import DemoService

        job = self.job(user, job_id)
        if job.status != FINISHED:
            raise JobError(f"Run {job.job_id} is {job.status}: only a finished run can make images.")
        with self._services_lock:
            if job.job_id not in self._services:
                for old in self._services.values():  # one model in memory at a time
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
        if not job_id:
            raise JobError("Choose a finished run first (the \"Finished run\" list above).")
        if not prompt or not prompt.strip():
            raise ConfigError("Write a prompt with your identifier first, e.g. \"a photo of sks dog on the beach\".")
        if len(prompt) > self.limits.max_prompt_chars:
            raise ConfigError(f"The prompt is longer than {self.limits.max_prompt_chars} characters.")
        if not 1 <= int(steps) <= self.limits.max_generation_steps:
            raise ConfigError(f"Steps must be from 1 to {self.limits.max_generation_steps}.")
        service = self._service(user, job_id)
        return [result.image for result in service.generate(prompt, steps=int(steps), seed=seed,
                                                             num_images=int(num_images))]

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


# ---------------------------------------------------------------------------- the page


def _user(request: Any) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def _message(error: Exception, markdown: bool = True) -> str:
    """What the page says of a failed action: the error without server paths (their last part only) or tokens,
    as plain text in Markdown (`markdown`) or a text box. An unexpected error is logged, its chain masked."""
    text = masked(public_text(str(error)))
    if not isinstance(error, DreamBoothError):
        log_exception(logger, "The app's action failed", error)
        text = f"{type(error).__name__}: {text}"
    return f"**Error:** {plain_markdown(text)}" if markdown else f"Error: {text}"


def build_ui(app: TrainingApp):
    """The Gradio Blocks page: Photos, Train, Try it, Publish."""
    import gradio as gr

    from .choices import base_model_choice, choice_for_model, choice_options
    from .notebook.monitor import plot_losses
    from .uploads import discard, own_uploads

    def loss_plot(history):
        if not history:
            return None
        return plot_losses({"history": history})

    with gr.Blocks(title="DreamBooth", analytics_enabled=False) as ui:
        gr.Markdown("# DreamBooth: teach Stable Diffusion your subject\nUpload photos, train, try the model, "
                    "publish it. Training runs in the background: reload the page any time.")
        kind = gr.Dropdown(list(SUBJECT_KINDS), value=DEFAULT_KIND, label="What the photos show", elem_id="kind")
        with gr.Tab("1. Photos"):
            files = gr.File(file_count="multiple", type="filepath", label="Photos or a zip", elem_id="upload")
            upload_button = gr.Button("Use these photos", variant="primary", elem_id="use-photos")
            crops = gr.Gallery(label="As training sees them", columns=6, elem_id="crops")
            photo_report = gr.Textbox(label="What was read, and the dataset doctor's advice", lines=10,
                                      elem_id="photo-report")
        with gr.Tab("2. Train"):
            with gr.Row():
                base_model = gr.Dropdown(choice_options(), value=choice_for_model(app.model, DEFAULT_PRESET),
                                         label="Base model", elem_id="base-model")
                model = gr.Textbox(app.model, label="Model (Hub id, folder or file; the choice sets it)",
                                   elem_id="model")
            with gr.Row():
                token = gr.Textbox("sks", label="Identifier (a rare word)", info=flow.TOKEN_INFO, elem_id="token")
                class_noun = gr.Textbox("dog", label="Class noun", info=flow.CLASS_NOUN_INFO, elem_id="class-noun")
            with gr.Row():
                preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset", elem_id="preset")
                steps = gr.Number(0, precision=0, minimum=0, maximum=app.limits.max_steps, label=flow.STEPS_LABEL,
                                  info=flow.STEPS_INFO, elem_id="steps")
            about_preset = gr.Markdown(flow.preset_description(DEFAULT_PRESET), elem_id="preset-description")
            model_outlook = gr.Textbox(label="What this base model means: the recipe, GPU memory on a T4, system "
                                       "RAM on free Colab", lines=6, interactive=False, elem_id="model-outlook")
            with gr.Row():
                check_button = gr.Button("Check settings and memory", elem_id="check")
                start_button = gr.Button("Start training", variant="primary", elem_id="start")
            outlook = gr.Markdown(elem_id="outlook")
            with gr.Row():
                run = gr.Dropdown([], label="Run", elem_id="run", allow_custom_value=True)
                cancel_button = gr.Button("Cancel", elem_id="cancel")
                resume_button = gr.Button("Resume", elem_id="resume")
            run_status = gr.Markdown(elem_id="run-status")
            samples = gr.Gallery(label="Samples as training draws them", columns=4, elem_id="samples")
            losses = gr.Plot(label="Loss", elem_id="losses")
        with gr.Tab("3. Try it"):
            try_run = gr.Dropdown([], label="Finished run", elem_id="try-run", allow_custom_value=True)
            prompt = gr.Textbox(label="Prompt", max_length=app.limits.max_prompt_chars, elem_id="prompt")
            with gr.Row():
                gen_steps = gr.Slider(1, app.limits.max_generation_steps, value=25, step=1, label="Steps")
                seed = gr.Textbox("random", label='Seed ("random" or a number)', elem_id="seed")
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            images = gr.Gallery(label="Images", columns=2, elem_id="images")
            try_status = gr.Markdown(elem_id="try-status")
        with gr.Tab("4. Publish"):
            publish_run = gr.Dropdown([], label="Finished run", elem_id="publish-run", allow_custom_value=True)
            repo_id = gr.Textbox(label="Hub repository (USER/NAME)", elem_id="repo-id")
            private = gr.Checkbox(True, label="Private")
            hub_token = gr.Textbox(label="Hugging Face token (write access; used once, never stored)",
                                   type="password", elem_id="hub-token")
            overwrite_box = gr.Checkbox(False, label="Overwrite existing repository (else only a new one is created)",
                                        elem_id="overwrite")
            publish_button = gr.Button("Publish to the Hub", variant="primary", elem_id="publish")
            export_button = gr.Button("Export one .safetensors file", elem_id="export")
            exported = gr.File(label="Download", elem_id="exported")
            publish_status = gr.Markdown(elem_id="publish-status")
        shown_runs = gr.State("")  # the run lists' labels as the page shows them (app_flow.refreshed_lists)

        settings_inputs = [kind, token, class_noun, model, preset, steps]

        def settings_of(kind_value, token_value, noun_value, model_value, preset_value, steps_value):
            return dict(kind=kind_value, token=token_value, class_noun=noun_value, model=model_value,
                        preset=preset_value, steps=int(steps_value or 0))

        def lists_update(lists):  # the three run lists, and the signature of what they now show (`shown_runs`)
            return (gr.Dropdown(choices=lists.runs, value=lists.run),
                    gr.Dropdown(choices=lists.finished, value=lists.try_run),
                    gr.Dropdown(choices=lists.finished, value=lists.publish_run), lists.signature)

        def runs_update(user, selected=None):
            return lists_update(flow.run_lists(app, user, selected))

        def on_upload(file_paths, kind_value, request: gr.Request):
            user = _user(request)
            try:  # only files this user put through the upload door, used once
                files = own_uploads(file_paths or [], app.uploads_dir(user))
                view = app.upload(user, files, kind_value)
            except Exception as error:
                return gr.skip(), _message(error, markdown=False)
            discard(files, app.uploads_dir(user))
            return view.crops, view.report

        def on_outlook(choice, kind_value, preset_value, steps_value, request: gr.Request):
            if not choice:
                return ""
            try:
                return app.model_outlook(_user(request), choice, kind=kind_value, preset=preset_value,
                                         steps=steps_value)
            except Exception as error:
                return _message(error, markdown=False)

        def on_base_model(choice, kind_value, steps_value, request: gr.Request):
            """A base-model choice sets the model and its preset, and shows what they mean for the run."""
            if not choice:
                return gr.skip(), gr.skip(), ""
            chosen = base_model_choice(choice)
            return chosen.model, chosen.preset, on_outlook(choice, kind_value, chosen.preset, steps_value, request)

        def on_check(kind_value, token_value, noun_value, model_value, preset_value, steps_value,
                     request: gr.Request):
            values = (kind_value, token_value, noun_value, model_value, preset_value, steps_value)
            try:
                return app.outlook(_user(request), **settings_of(*values))
            except Exception as error:
                return _message(error)

        def on_start(kind_value, token_value, noun_value, model_value, preset_value, steps_value,
                     request: gr.Request):
            values = (kind_value, token_value, noun_value, model_value, preset_value, steps_value)
            user = _user(request)
            try:
                job = app.start(user, **settings_of(*values))
            except Exception as error:
                return (_message(error), *runs_update(user))
            return f"Run {job.job_id} submitted: its state shows below.", *runs_update(user, job.job_id)

        def on_tick(job_id, try_value, publish_value, shown, request: gr.Request):
            """The poll: the chosen run's progress, and the run lists once a run's state has changed."""
            user = _user(request)
            try:
                lists = flow.refreshed_lists(app, user, shown, job_id, try_value, publish_value)
            except Exception:
                lists = None
            updates = lists_update(lists) if lists else (gr.skip(),) * 4
            return (*on_view(job_id, request), *updates)

        def on_view(job_id, request: gr.Request):
            if not job_id:
                return "", [], None
            try:
                view = app.job_view(_user(request), job_id)
            except Exception as error:
                return _message(error), [], None
            return view.text, view.samples, loss_plot(view.history)

        def job_action(action):
            """A Cancel/Resume handler: `action(user, job_id)`, then the run's status (or why it failed)."""
            def handler(job_id, request: gr.Request):
                try:
                    action(_user(request), job_id)
                except Exception as error:
                    return _message(error)
                return on_view(job_id, request)[0]
            return handler

        on_cancel, on_resume = job_action(app.cancel), job_action(app.resume)

        def on_generate(job_id, prompt_text, steps_value, seed_text, request: gr.Request):
            from .demo_api import parse_seed
            from .grids import enlarged

            try:
                made = app.generate(_user(request), job_id, prompt_text, steps=int(steps_value),
                                    seed=parse_seed(seed_text))
            except Exception as error:
                return gr.skip(), _message(error)
            return [enlarged(image, 512) for image in made], f"Done: {len(made)} image(s)."  # small ones: sharp

        def on_try_run(job_id, request: gr.Request):
            try:
                return app.example_prompt(_user(request), job_id) if job_id else gr.skip()
            except Exception:
                return gr.skip()

        def on_publish(job_id, repo, private_value, token_value, overwrite, request: gr.Request):
            # The token field is emptied whatever happens; the message never contains the token.
            try:
                url = app.publish(_user(request), job_id, repo, bool(private_value), token_value, bool(overwrite))
            except Exception as error:
                return _message(error), ""
            return f"Published: {url}", ""

        def on_export(job_id, request: gr.Request):
            try:
                path = app.export(_user(request), job_id)
            except Exception as error:
                return None, _message(error)
            return str(path), f"Exported {path.name}."

        def on_load(request: gr.Request):
            user = _user(request)
            view = app.photos_view(user)
            return (view.crops, view.report, *runs_update(user), *flow.form_values(app, user, gr.skip()))

        # The run lists accept any value: the choices change as runs start, and every action checks the id
        # itself (JobRunner: only folders of its jobs; the app: only the signed-in user's runs).
        list_outputs = [run, try_run, publish_run, shown_runs]
        upload_button.click(on_upload, [files, kind], [crops, photo_report], api_name="upload")
        base_model.change(on_base_model, [base_model, kind, steps], [model, preset, model_outlook],
                          api_visibility="private")
        for control in (kind, preset, steps):
            control.change(on_outlook, [base_model, kind, preset, steps], [model_outlook], api_visibility="private",
                           show_progress="hidden")
        ui.load(on_outlook, [base_model, kind, preset, steps], [model_outlook], api_visibility="private")
        preset.change(flow.preset_description, preset, about_preset, api_visibility="private", show_progress="hidden")
        check_button.click(on_check, settings_inputs, [outlook], api_name="check")
        start_button.click(on_start, settings_inputs, [outlook, *list_outputs], api_name="start")
        run.change(on_view, [run], [run_status, samples, losses], api_name="view", show_progress="hidden")
        cancel_button.click(on_cancel, [run], [run_status], api_name="cancel")
        resume_button.click(on_resume, [run], [run_status], api_name="resume")
        try_run.change(on_try_run, [try_run], [prompt], api_visibility="private")
        generate_button.click(on_generate, [try_run, prompt, gen_steps, seed], [images, try_status],
                              api_name="generate")
        publish_button.click(on_publish, [publish_run, repo_id, private, hub_token, overwrite_box],
                             [publish_status, hub_token], api_name="publish")
        export_button.click(on_export, [publish_run], [exported, publish_status], api_name="export")
        ui.load(on_load, outputs=[crops, photo_report, *list_outputs, *settings_inputs, base_model],
                api_visibility="private")
        # Live progress: the run's files on disk, read every two seconds while the page is open.
        timer = gr.Timer(2.0)
        timer.tick(on_tick, [run, try_run, publish_run, shown_runs], [run_status, samples, losses, *list_outputs],
                   show_progress="hidden", api_visibility="private")
    ui.queue(default_concurrency_limit=1, max_size=32)
    return ui
