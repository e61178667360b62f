"""A web demo for a trained model: a Gradio page plus the REST API (demo_rest.py), from one process.

`launch_demo(model)` checks what it can (model reference, LoRA, address, auth), starts the server and
loads the model in the background (the page says so while it loads), exactly once per process. The
command line waits for that load and stops with the reason when it fails.

The page puts its requests into the same first-come, first-served queue as the REST API
(`demo_api.DemoService`: one FIFO, one worker thread) and shows how many requests, from either side, are
ahead.

Files: the demo writes the page's images into its own output folder (the newest few are kept) and serves
nothing else (Gradio's cache is pointed there too); the folder goes away on close, Ctrl+C or SIGTERM.
"""

import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .demo_api import (
    RANDOM_SEED,
    DemoLimits,
    DemoService,
    check_auth_pair,
    check_model_reference,
    parse_seed,
)
from .demo_rest import RequestLimits, add_rest_api
from .errors import ConfigError, DreamBoothError, ModelLoadError
from .inference import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .safe_text import log_exception, masked

logger = logging.getLogger(__name__)
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


# ---------------------------------------------------------------------------- checks before serving


def check_address(host: str, port: int | None) -> None:
    """Refuse a --host or --port that cannot be listened on, before anything starts."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise ConfigError(f"--port must be from 1 to 65535, or 0 for any free port (got {port!r}).")
    try:
        socket.getaddrinfo(host, port or None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, TypeError):
        raise ConfigError(f"--host {host!r} is not an address of this machine. Use 127.0.0.1 (only this "
                          "machine) or 0.0.0.0 (every network it is on).") from None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_without_auth_warning(host: str, shared: bool, auth: Any) -> str | None:
    """The warning for a demo anyone who finds it can use (and spend this GPU on), or None."""
    if auth is not None:
        return None
    if shared:
        where = "anyone with its public share link"
    elif not is_loopback(host):
        where = f"every network this machine is on (--host {host})"
    else:
        return None
    return (f"warning: the demo is open to {where} without a password: anyone who finds it can generate "
            "images on this GPU. Add --auth USER:PASS (launch_demo(..., auth=(user, password))) to require one.")


@contextlib.contextmanager
def _signals_ignored():
    """Ctrl+C and SIGTERM do nothing inside this block (main thread only; elsewhere they never arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _wait_interruptibly(event: threading.Event) -> None:
    # Short waits keep Ctrl+C and SIGTERM (turned into KeyboardInterrupt) prompt in the main thread.
    while not event.wait(0.25):
        pass


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """Inside this block SIGTERM (kill, a container or service stopping) stops the demo as Ctrl+C does,
    so the cleanup that follows Ctrl+C runs too. Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- the page

PAGE_ADDRESS = "http://ADDRESS-OF-THIS-PAGE"


def api_help(service: DemoService, base_url: str = PAGE_ADDRESS, auth: bool = False) -> str:
    """The page's "REST API" section: a curl line that works as shown (the address is filled in on load)."""
    base_url = base_url.rstrip("/")
    prompt = service.example_prompts()[0]
    user = " -u USER:PASS" if auth else ""
    # The body goes between single quotes in the shell: a quote inside the prompt must close and reopen them.
    body = json.dumps({"prompt": prompt, "steps": DEFAULT_STEPS, "seed": 1234, "num_images": 1}).replace("'", "'\\''")
    return (
        "Scripts can use this model over HTTP; their requests wait in the same queue as this page's.\n\n"
        f"```bash\ncurl -s{user} -X POST {base_url}/api/generate -H 'Content-Type: application/json' \\\n"
        f"     -d '{body}'\n```\n\n"
        f"The answer is JSON: `images` (each a `seed` and a base64 `png_base64`), `seeds`, and the settings used. "
        f"Optional fields: `negative_prompt`, `guidance`, `width`, `height`, `seed` (`null` for a random one). "
        f"`GET {base_url}/api/health` says whether the model is ready and how many requests wait."
    )


def _page_address(request: Any) -> str:
    """The address the visitor opened the page at (behind a proxy, the one the proxy says it served)."""
    headers = getattr(request, "headers", None) or {}
    host = headers.get("x-forwarded-host") or headers.get("host")
    scheme = headers.get("x-forwarded-proto") or "http"
    return f"{scheme}://{host}" if host else PAGE_ADDRESS


def build_ui(service: DemoService, auth: bool = False):
    """The Gradio Blocks page: inputs bounded by the service's limits, a gallery, a status line, API help."""
    import gradio as gr

    limits = service.limits
    title = "DreamBooth demo"
    with gr.Blocks(title=title, analytics_enabled=False) as ui:
        gr.Markdown(f"# {title}\nModel `{service.model_name}`"
                    + (f" with LoRA `{service.lora_name}`" if service.lora else ""))
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
        with gr.Accordion("REST API", open=False):
            api_markdown = gr.Markdown(api_help(service, auth=auth), elem_id="rest-api")

        # The images this visitor sees, so a failed request can leave them in place. (A gr.skip() for the
        # gallery would make Gradio build a new gallery whose file cache is outside the demo's folder.)
        shown = gr.State([])

        def on_generate(prompt_text, negative_text, steps_value, guidance_value, images_value, size_value,
                        seed_text, shown_items, progress=gr.Progress()):
            """Queue the request with the REST API's, say how many are ahead while it waits, then show it."""
            start = time.perf_counter()
            kept = [item for item in shown_items or [] if Path(item[0]).is_file()]
            try:
                job = service.submit(prompt_text, negative_text or "", int(steps_value), float(guidance_value),
                                     parse_seed(seed_text), int(images_value), int(size_value), int(size_value))
                try:
                    while True:
                        progress(None, desc=_queue_text(service.ahead_of(job), int(images_value)))
                        try:
                            results = job.future.result(timeout=0.5)
                            break
                        except concurrent.futures.TimeoutError:
                            continue
                finally:
                    service.withdraw(job)  # no-op once it ran
            except DreamBoothError as error:
                return kept, f"Generation failed: {error}", kept
            except Exception as error:  # show every failure on the page, keep the traceback in the log
                log_exception(logger, "Generation failed", error)  # its whole chain, tokens masked
                return kept, masked(service.redact(f"Generation failed ({type(error).__name__}: {error}).")), kept
            paths = service.save(results)
            seeds = ", ".join(str(r.seed) for r in results)
            elapsed = time.perf_counter() - start
            items = [(str(path), f"seed {r.seed}") for path, r in zip(paths, results, strict=True)]
            return items, f"Done: {len(results)} image(s) in {elapsed:.1f} s, seeds {seeds}.", items

        inputs = [prompt, negative, steps, guidance, num_images, size, seed, shown]
        # No concurrency limit here: every request goes straight into the service's one FIFO, which serves
        # page and REST requests in arrival order (a limit would hold page requests back in a second queue).
        gr.on([button.click, prompt.submit], on_generate, inputs=inputs, outputs=[gallery, status, shown],
              concurrency_limit=None, api_name="generate")

        # While the model loads, refresh the status line every second; stop once it is ready or failed.
        # These are the page's own plumbing, hidden from "Use via API" and from API clients.
        timer = gr.Timer(1.0, active=service.state == "loading")

        def refresh_status():
            return service.status_text(), gr.Timer(active=service.state == "loading")

        def on_page_load(request: gr.Request):
            address = service.share_url or _page_address(request)
            return (*refresh_status(), api_help(service, address, auth=auth))

        timer.tick(refresh_status, outputs=[status, timer], queue=False, show_progress="hidden",
                   api_visibility="private")
        ui.load(on_page_load, outputs=[status, timer, api_markdown], queue=False, show_progress="hidden",
                api_visibility="private")
    ui.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    return ui


def _queue_text(ahead: int, images: int) -> str:
    if ahead == 0:
        return f"Generating {images} image(s)..."
    return (f"Waiting for your turn: {ahead} request(s) ahead of yours (this page and the REST API share one "
            "queue, first come, first served).")


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
    closed: bool = field(default=False, repr=False)

    @property
    def api_url(self) -> str:
        return f"{(self.share_url or self.url).rstrip('/')}/api/generate"

    def wait(self) -> None:
        """Block until Ctrl+C or SIGTERM (what the CLI does), then close the demo, removing its temporary files."""
        with _sigterm_as_ctrl_c():
            try:
                while True:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                self.close()  # while SIGTERM still means "stop cleanly", not "die now"

    def wait_for_model(self) -> bool:
        """Block until the model has loaded (True), or Ctrl+C / SIGTERM stopped the demo meanwhile (False).
        If the model cannot load, stop the demo and raise ModelLoadError saying why."""
        with _sigterm_as_ctrl_c():
            try:
                _wait_interruptibly(self.service._loaded)
            except KeyboardInterrupt:
                self.close()
                return False
        if self.service.state == "failed":
            message = self.service.status_text()
            self.close()
            raise ModelLoadError(f"{message} The demo was stopped.")
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # A second Ctrl+C or SIGTERM (`timeout` and process managers often send two) must not cut the
        # cleanup short and leave the temporary folder behind.
        with _signals_ignored():
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
    wait_for_model: bool | None = None,
    **generator_options: Any,
) -> RunningDemo:
    """Start the demo for `model` (+ `lora`) and return at once (or, with `block`, when stopped).

    `share`: None lets Gradio decide (on in Colab, where localhost is not reachable), True asks for
    a public gradio.live link. `port`: None tries 7860 upwards, 0 picks any free port. `auth`:
    (user, password) for the page and the API. `wait_for_model` (default: same as `block`): return or
    announce the addresses only once the model has loaded, and raise ModelLoadError if it cannot.
    `generator_options` go to `load_generator` (scheduler, attention_slicing, vae_tiling, ...).
    """
    import gradio as gr  # noqa: F401  (fail here, clearly, when the demo extra is not installed)
    from starlette.middleware import Middleware

    from .body_timeout import BodyTimeout

    # Everything that can be checked without loading is checked before anything starts.
    check_auth_pair(auth)
    auth = tuple(auth) if auth is not None else None
    check_address(host, port)
    check_model_reference(model)
    service = DemoService(model, lora, limits=limits, output_dir=output_dir, generator_options=generator_options)
    service.start_loading()
    if port == 0:
        port = free_port(host)
    with _gradio_files_in(service.output_dir):
        ui = build_ui(service, auth=auth is not None)
        try:
            _, local_url, share_url = ui.launch(
                share=share, server_name=host, server_port=port, auth=auth, prevent_thread_lock=True,
                allowed_paths=[str(service.output_dir)], show_error=True, quiet=True, ssr_mode=False,
                inbrowser=False, max_file_size=service.limits.max_request_bytes,
                app_kwargs={"middleware": [Middleware(RequestLimits, max_bytes=service.limits.max_request_bytes),
                                           Middleware(BodyTimeout)]},  # a trickled body does not hold a connection
            )
        except OSError as error:
            service.cleanup()
            raise ConfigError(f"Could not start the demo on {host}:{port} ({error}). Another program may use the "
                              "port: pick another with --port, or --port 0 for any free one.") from None
    add_rest_api(ui.server_app, service, auth)
    service.share_url = share_url
    demo = RunningDemo(url=local_url, share_url=share_url, service=service, ui=ui)
    # From here on SIGTERM stops a blocking demo as Ctrl+C does: closed, its temporary folder removed.
    with _sigterm_as_ctrl_c() if block else contextlib.nullcontext():
        try:
            if wait_for_model if wait_for_model is not None else block:
                if not quiet and service.state == "loading":
                    print(f"Loading {service.model_name}... (the first load can take a few minutes while the "
                          "weights download)", file=sys.stderr, flush=True)
                if not demo.wait_for_model():
                    return demo  # stopped while loading, and closed
            warning = public_without_auth_warning(host, bool(share or share_url), auth)
            if warning:  # shown even when quiet: it is about who can use this GPU
                print(warning, file=sys.stderr, flush=True)
            note = service._generator.safety_note if service._generator else None
            if note and (share or share_url):  # unfiltered images on a public page: say so, even when quiet
                print(f"{note} The public link serves them as they come.", file=sys.stderr, flush=True)
            if not quiet:
                _announce(demo, share)
            if block:
                demo.wait()
        except KeyboardInterrupt:
            if not block:
                raise
            demo.close()
    return demo


def _announce(demo: RunningDemo, share: bool | None) -> None:
    print(f"Demo running at {demo.url}")
    if demo.share_url:
        print(f"Public link (share it; it lasts up to a week): {demo.share_url}")
    elif share:
        print("The public share link could not be created (see the message above); the demo runs locally.")
    print(f"REST API: POST {demo.api_url}  (health: GET {demo.api_url.rsplit('/', 1)[0]}/health)", flush=True)
