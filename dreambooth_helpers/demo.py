"""A web demo for a trained model: a Gradio page plus a small REST API, from one process.

`launch_demo(model)` starts the server at once and loads the model in the background (the page
says so while it loads), exactly once per process. Requests from the page and the API share one
queue: a second user waits for the first instead of running two generations on one GPU.

REST API, beside the page on the same port (and through the share link):

    GET  /api/health    -> {"status": "loading" | "ready" | "failed", "model": ..., "message": ...}
    POST /api/generate  {"prompt": "...", "negative_prompt": "", "steps": 25, "guidance": 7.5,
                         "seed": 1234 or null, "num_images": 1, "width": null, "height": null}
                        -> {"images": [{"seed": 1234, "png_base64": "..."}], "seeds": [...], ...}

Files: the demo writes generated images into its own output folder and serves nothing else
(Gradio's cache is pointed there too).

No `from __future__ import annotations` here: FastAPI reads the request model from the route
function's annotations, which must be real classes, not strings.
"""

import base64
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, DreamBoothError
from .inference import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    GeneratedImage,
    Generator,
    example_prompts,
    load_generator,
    resolve_model,
    save_images,
)
from .models import OFFLINE_RESOLUTIONS, SD_RESOLUTION

logger = logging.getLogger(__name__)
RANDOM_SEED = "random"


@dataclass(frozen=True)
class DemoLimits:
    """Bounds on what one request may ask for, so a public link cannot exhaust the GPU."""

    max_prompt_chars: int = 500
    max_steps: int = 100
    max_images: int = 4
    max_guidance: float = 20.0
    max_resolution: int | None = None  # None: 1.5x the model's resolution (768 for SD 1.x)
    max_queue: int = 32  # requests waiting beyond this are turned away ("busy, try again")
    max_request_bytes: int = 64 * 1024  # a request carries a prompt, not a file


def parse_auth(text: str) -> tuple[str, str]:
    """"USER:PASS" -> (user, password), for --auth."""
    user, sep, password = (text or "").partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must look like USER:PASS (both non-empty), e.g. --auth friend:s3cret.")
    return user, password


def parse_seed(value: Any) -> int | None:
    """A seed from a form field: "random" or empty -> None (pick one), else a whole number."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", RANDOM_SEED)):
        return None
    try:
        seed = int(str(value).strip())
    except ValueError:
        raise ConfigError(f'Seed {value!r} is not a whole number; type a number or "random".') from None
    return seed


# ---------------------------------------------------------------------------- the model, held once


class DemoService:
    """Owns the one model of a demo process: loads it (in the background), checks requests, generates."""

    def __init__(self, model: str, lora: str | None = None, *, limits: DemoLimits | None = None,
                 output_dir: str | Path | None = None, generator_options: dict[str, Any] | None = None):
        self.model, self.lora = model, lora
        self.limits = limits or DemoLimits()
        # Reading the training summary is cheap; the example prompts are shown before the model loads.
        _, _, self.summary = resolve_model(model, lora)
        self.owns_output_dir = output_dir is None
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="dreambooth-demo-")).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._generator_options = generator_options or {}
        self._generator: Generator | None = None
        self._load_error: str | None = None
        self._loaded = threading.Event()
        self._load_started = threading.Lock()
        self._load_thread: threading.Thread | None = None
        self._waiting = 0
        self._waiting_lock = threading.Lock()

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
            self._load_error = str(error)
        except Exception as error:  # any failure must reach the page, not die in a thread
            logger.exception("Loading the demo model failed")
            self._load_error = f"{type(error).__name__}: {error}"
        finally:
            self._loaded.set()

    def wait_until_loaded(self, timeout: float | None = None) -> Generator:
        self.start_loading()
        if not self._loaded.wait(timeout):
            raise DreamBoothError("The model is still loading; try again in a moment.")
        if self._generator is None:
            raise DreamBoothError(f"The model could not be loaded: {self._load_error}")
        return self._generator

    @property
    def state(self) -> str:
        if not self._loaded.is_set():
            return "loading"
        return "ready" if self._generator is not None else "failed"

    @property
    def resolution(self) -> int:
        if self._generator is not None:
            return self._generator.default_resolution
        return int((self.summary or {}).get("resolution") or OFFLINE_RESOLUTIONS.get(self.model, SD_RESOLUTION))

    @property
    def max_resolution(self) -> int:
        if self.limits.max_resolution:
            return self.limits.max_resolution
        return (self.resolution * 3 // 2) // 8 * 8

    def health(self) -> dict[str, Any]:
        return {"status": self.state, "model": self.model, "lora": self.lora, "resolution": self.resolution,
                "message": self.status_text(), "limits": self.limits.__dict__ | {"max_resolution":
                                                                                   self.max_resolution}}

    def status_text(self) -> str:
        name = f"`{self.model}`" + (f" + LoRA `{self.lora}`" if self.lora else "")
        if self.state == "loading":
            return f"Loading {name}... The first load can take a few minutes while the weights download."
        if self.state == "failed":
            return f"The model could not be loaded: {self._load_error}"
        device = self._generator.device if self._generator else "?"
        return f"Ready: {name} on {device}, {self.resolution} px. Type a prompt and press Generate."

    def example_prompts(self) -> list[str]:
        return example_prompts(self.summary)

    # -- generating

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
        if not isinstance(steps, int) or not 1 <= steps <= limits.max_steps:
            raise ConfigError(f"steps must be from 1 to {limits.max_steps} in this demo (got {steps!r}).")
        if not isinstance(num_images, int) or not 1 <= num_images <= limits.max_images:
            raise ConfigError(f"num_images must be from 1 to {limits.max_images} in this demo (got {num_images!r}).")
        if not 0.0 <= float(guidance) <= limits.max_guidance:
            raise ConfigError(f"guidance must be from 0 to {limits.max_guidance:g} (got {guidance!r}).")
        for name, size in (("width", width), ("height", height)):
            if size is not None and (not isinstance(size, int) or not 8 <= size <= self.max_resolution):
                raise ConfigError(f"{name} must be from 8 to {self.max_resolution} px in this demo (got {size!r}).")

    def generate(self, prompt: str, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int | None = None, num_images: int = 1,
                 width: int | None = None, height: int | None = None) -> list[GeneratedImage]:
        """Check, wait for the model and our turn, generate. Raises DreamBoothError with a readable message."""
        self.check_request(prompt, negative_prompt, steps, guidance, num_images, width, height)
        with self._waiting_lock:
            if self._waiting >= self.limits.max_queue:
                raise DreamBoothError("The demo is busy (too many requests waiting); try again in a minute.")
            self._waiting += 1
        try:
            # Running out of GPU memory comes back as a GenerationError whose message says what to change.
            return self.wait_until_loaded().generate(prompt, negative_prompt=negative_prompt, num_images=num_images,
                                                     steps=steps, guidance_scale=guidance, seed=seed, width=width,
                                                     height=height)
        finally:
            with self._waiting_lock:
                self._waiting -= 1

    def save(self, results: list[GeneratedImage]) -> list[Path]:
        return save_images(results, self.output_dir / "images")

    def cleanup(self) -> None:
        if self.owns_output_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- the page


def build_ui(service: DemoService):
    """The Gradio Blocks page: inputs bounded by the service's limits, a gallery, a status line."""
    import gradio as gr

    limits = service.limits
    title = "DreamBooth demo"
    with gr.Blocks(title=title, analytics_enabled=False) as ui:
        gr.Markdown(f"# {title}\nModel `{service.model}`" + (f" with LoRA `{service.lora}`" if service.lora else ""))
        status = gr.Markdown(service.status_text(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=limits.max_prompt_chars, elem_id="prompt",
                                    placeholder=service.example_prompts()[0])
                negative = gr.Textbox(label="Negative prompt", lines=1, max_length=limits.max_prompt_chars,
                                      placeholder="blurry, low quality, deformed", elem_id="negative-prompt")
                with gr.Row():
                    steps = gr.Slider(1, limits.max_steps, value=min(DEFAULT_STEPS, limits.max_steps), step=1,
                                      label="Steps")
                    guidance = gr.Slider(0.0, limits.max_guidance, value=DEFAULT_GUIDANCE, step=0.5,
                                         label="Guidance")
                with gr.Row():
                    num_images = gr.Slider(1, limits.max_images, value=1, step=1, label="Images")
                    size = gr.Slider(8 * max(1, service.resolution // 16), service.max_resolution,
                                     value=service.resolution, step=8, label="Size (px)")
                    seed = gr.Textbox(value=RANDOM_SEED, label='Seed ("random" or a number)', elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery")
        gr.Examples(examples=[[p] for p in service.example_prompts()], inputs=[prompt], label="Try these")

        def on_generate(prompt_text, negative_text, steps_value, guidance_value, images_value, size_value,
                        seed_text):
            start = time.perf_counter()
            try:
                results = service.generate(
                    prompt_text, negative_text or "", int(steps_value), float(guidance_value),
                    parse_seed(seed_text), int(images_value), int(size_value), int(size_value))
            except DreamBoothError as error:
                return gr.skip(), f"Generation failed: {error}"
            except Exception as error:  # show every failure on the page, keep the traceback in the log
                logger.exception("Generation failed")
                return gr.skip(), f"Generation failed ({type(error).__name__}: {error})."
            paths = service.save(results)
            seeds = ", ".join(str(r.seed) for r in results)
            elapsed = time.perf_counter() - start
            gallery_items = [(str(path), f"seed {r.seed}") for path, r in zip(paths, results, strict=True)]
            return gallery_items, f"Done: {len(results)} image(s) in {elapsed:.1f} s, seeds {seeds}."

        inputs = [prompt, negative, steps, guidance, num_images, size, seed]
        gr.on([button.click, prompt.submit], on_generate, inputs=inputs, outputs=[gallery, status],
              concurrency_limit=1, api_name="generate")

        # While the model loads, refresh the status line every second; stop once it is ready or failed.
        timer = gr.Timer(1.0, active=service.state == "loading")

        def refresh_status():
            return service.status_text(), gr.Timer(active=service.state == "loading")

        timer.tick(refresh_status, outputs=[status, timer], queue=False, show_progress="hidden")
        ui.load(refresh_status, outputs=[status, timer], queue=False, show_progress="hidden")
    ui.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    return ui


# ---------------------------------------------------------------------------- the REST API


def add_rest_api(app, service: DemoService, auth: tuple[str, str] | None = None) -> None:
    """Add GET /api/health and POST /api/generate to a FastAPI app (Gradio's own, or any other)."""
    from fastapi import APIRouter, Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from pydantic import BaseModel, Field

    class GenerateRequest(BaseModel):
        prompt: str
        negative_prompt: str = ""
        steps: int = DEFAULT_STEPS
        guidance: float = DEFAULT_GUIDANCE
        seed: int | str | None = Field(default=None, description='a number, or null / "random"')
        num_images: int = 1
        width: int | None = None
        height: int | None = None

    basic = HTTPBasic(auto_error=False)

    def check_auth(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if auth is None:
            return
        valid = credentials is not None and secrets.compare_digest(credentials.username, auth[0]) \
            and secrets.compare_digest(credentials.password, auth[1])
        if not valid:
            raise HTTPException(401, "Give the demo's USER:PASS with HTTP basic auth (curl -u USER:PASS).",
                                headers={"WWW-Authenticate": "Basic"})

    router = APIRouter(prefix="/api", dependencies=[Depends(check_auth)])

    @router.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    # A plain `def`: FastAPI runs it in a worker thread, so a long generation never blocks the page.
    @router.post("/generate")
    def generate(request: GenerateRequest) -> dict[str, Any]:
        if service.state == "loading":
            raise HTTPException(503, service.status_text(), headers={"Retry-After": "10"})
        try:
            results = service.generate(request.prompt, request.negative_prompt, request.steps, request.guidance,
                                       parse_seed(request.seed), request.num_images, request.width, request.height)
        except ConfigError as error:
            raise HTTPException(422, str(error)) from None
        except DreamBoothError as error:
            raise HTTPException(503, str(error)) from None
        return {
            "images": [{"seed": r.seed, "png_base64": _png_base64(r)} for r in results],
            "seeds": [r.seed for r in results],
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
            "guidance": request.guidance, "width": results[0].width, "height": results[0].height,
            "scheduler": results[0].scheduler, "model": service.model, "lora": service.lora,
            "seconds_per_image": round(results[0].seconds, 3),
        }

    app.include_router(router)
    # Gradio's app was built before these routes: put them first so no catch-all route shadows them.
    ours = [route for route in app.router.routes if getattr(route, "path", "").startswith("/api/")]
    app.router.routes[:] = ours + [route for route in app.router.routes if route not in ours]


class RequestLimits:
    """ASGI middleware in front of the whole app (page, Gradio's API, the REST API).

    It refuses file uploads (the page has no upload field, but Gradio's upload route would store anything
    sent to it) and request bodies over `max_bytes`, so a public link cannot be used to fill the disk or
    the memory. Bodies without a declared length are refused too, as their size is unknown up front.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message = refusal
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, scope) -> tuple[int, str] | None:
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        if scope["path"].rstrip("/").endswith("/upload"):
            return 403, "This demo takes no file uploads."
        length = dict(scope["headers"]).get(b"content-length")
        if length is None:
            return 411, "Send a Content-Length header; bodies of unknown size are not accepted."
        if not length.isdigit() or int(length) > self.max_bytes:
            return 413, f"The request is over {self.max_bytes // 1024} KB; this demo takes a prompt, not files."
        return None


def _png_base64(result: GeneratedImage) -> str:
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=result.png_info())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------- launching


@contextlib.contextmanager
def _gradio_files_in(folder: Path):
    """Point Gradio's file cache at our output folder while the page is built and launched.

    Gradio serves only files it wrote into its cache (and allowed paths), so this keeps every
    served file inside the demo's own folder.
    """
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class RunningDemo:
    """A started demo: its addresses, and `close()` to stop it (the notebook keeps this object)."""

    url: str
    share_url: str | None
    service: DemoService
    ui: Any = field(repr=False)

    @property
    def api_url(self) -> str:
        return f"{(self.share_url or self.url).rstrip('/')}/api/generate"

    def wait(self) -> None:
        """Block until Ctrl+C (what the CLI does)."""
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(0.5)

    def close(self) -> None:
        self.ui.close(verbose=False)
        self.service.cleanup()

    def __enter__(self) -> "RunningDemo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def launch_demo(
    model: str,
    lora: str | None = None,
    share: bool | None = None,
    port: int | None = None,
    auth: tuple[str, str] | None = None,
    block: bool = False,
    *,
    host: str = "127.0.0.1",
    limits: DemoLimits | None = None,
    output_dir: str | Path | None = None,
    quiet: bool = False,
    **generator_options: Any,
) -> RunningDemo:
    """Start the demo for `model` (+ `lora`) and return at once (or, with `block`, when stopped).

    `share`: None lets Gradio decide (on in Colab, where localhost is not reachable), True asks for
    a public gradio.live link. `port`: None tries 7860 upwards, 0 picks any free port. `auth`:
    (user, password) for the page and the API. `generator_options` go to `load_generator`
    (scheduler, attention_slicing, vae_tiling, ...).
    """
    import gradio as gr  # noqa: F401  (fail here, clearly, when the demo extra is not installed)
    from starlette.middleware import Middleware

    if auth is not None and (len(auth) != 2 or not all(auth)):
        raise ConfigError("auth must be a (user, password) pair, both non-empty.")
    service = DemoService(model, lora, limits=limits, output_dir=output_dir, generator_options=generator_options)
    service.start_loading()
    if port == 0:
        port = free_port(host)
    with _gradio_files_in(service.output_dir):
        ui = build_ui(service)
        try:
            _, local_url, share_url = ui.launch(
                share=share, server_name=host, server_port=port, auth=auth, prevent_thread_lock=True,
                allowed_paths=[str(service.output_dir)], show_error=True, quiet=True, ssr_mode=False,
                inbrowser=False, max_file_size=service.limits.max_request_bytes,
                app_kwargs={"middleware": [Middleware(RequestLimits, max_bytes=service.limits.max_request_bytes)]},
            )
        except OSError as error:
            service.cleanup()
            raise ConfigError(f"Could not start the demo on {host}:{port} ({error}). Another program may use the "
                              "port: pick another with --port, or --port 0 for any free one.") from None
    add_rest_api(ui.server_app, service, auth)
    demo = RunningDemo(url=local_url, share_url=share_url, service=service, ui=ui)
    if not quiet:
        print(f"Demo running at {local_url}")
        if share_url:
            print(f"Public link (share it; it lasts up to a week): {share_url}")
        elif share:
            print("The public share link could not be created (see the message above); the demo runs locally.")
        print(f"REST API: POST {demo.api_url}  (health: GET {demo.api_url.rsplit('/', 1)[0]}/health)")
    if block:
        demo.wait()
    return demo
