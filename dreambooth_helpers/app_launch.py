"""Serving the app (app.py's TrainingApp and page): `launch_app` starts it, `RunningApp` stops it, and a page anyone
can reach without a password is announced loudly (`share_warning`).

Gradio's file cache is pointed into the work folder while the app serves, so the page only ever serves files it made.
Uploads come in through uploads.py's door (the page's limits, metadata stripped, each user's files his own), and a
request body that does not arrive in time is refused (body_timeout.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .app import DEFAULT_WORKDIR, GRADIO_CACHE_VARIABLE, AppLimits, TrainingApp
from .app_access import parse_users
from .app_page import PAGE_CSS, build_ui
from .app_rest import API_PREFIX, add_app_api
from .errors import ConfigError


@dataclass
class RunningApp:
    url: str
    share_url: str | None
    app: TrainingApp
    ui: Any = dataclasses.field(repr=False)
    previous_cache_dir: str | None = dataclasses.field(default=None, repr=False)

    def close(self) -> None:
        """Stop serving. A run still training goes on in its own process; the next app finds it."""
        self.ui.close(verbose=False)
        self.app.close()
        if self.previous_cache_dir is None:
            os.environ.pop(GRADIO_CACHE_VARIABLE, None)
        else:
            os.environ[GRADIO_CACHE_VARIABLE] = self.previous_cache_dir


def share_warning(share: bool, host: str, users: Any) -> str | None:
    """The loud warning for a page anyone can reach and train on, or None."""
    from .demo import is_loopback

    if users:
        return None
    if share:
        where = "ANYONE WITH THE PUBLIC LINK"
    elif not is_loopback(host):
        where = f"every network this machine is on (--host {host})"
    else:
        return None
    line = "!" * 78
    return (f"{line}\nWARNING: this page is open to {where}, without a password: anyone who finds it can upload "
            f"photos, train on this GPU and publish. Add --auth USER:PASS to require a sign-in.\n{line}")


def launch_app(workdir: str | Path = DEFAULT_WORKDIR, *, share: bool = False, auth: list[str] | None = None,
               host: str = "127.0.0.1", port: int | None = 7860, model: str | None = None, block: bool = False,
               limits: AppLimits | None = None, config_overrides: dict[str, Any] | None = None,
               environment: dict[str, str] | None = None, generator_options: dict[str, Any] | None = None,
               quiet: bool = False, models_dir: list[str | Path] | None = None,
               publish_with_host_token: bool = False, auto_resume: bool = True) -> RunningApp:
    """Serve the app over `workdir` (the page, and app_rest.py's REST API under /api/) and return at once (or,
    with `block`, when stopped with Ctrl+C).

    `models_dir`: folders whose models visitors may train on (--models-dir); `publish_with_host_token`: publish
    with the host's HF_TOKEN or saved login when a visitor types no token (--publish-with-host-token);
    `auto_resume`: resume, once each, the runs an earlier app or machine stop interrupted (--no-auto-resume)."""
    import gradio as gr  # noqa: F401  (fail here, clearly, when the demo extra is not installed)
    from starlette.middleware import Middleware

    from .body_timeout import BodyLimit, BodyTimeout
    from .demo import check_address, free_port
    from .uploads import MULTIPART_SLACK, UploadDoor, takes_files

    pairs = parse_users(auth)
    check_address(host, port)
    app = TrainingApp(workdir, users=[user for user, _ in pairs or []], model=model, limits=limits,
                      config_overrides=config_overrides, environment=environment,
                      generator_options=generator_options, models_dir=models_dir,
                      publish_with_host_token=publish_with_host_token)
    app.exports_dir.mkdir(parents=True, exist_ok=True)
    # Interrupted runs are queued again before anything else can start (each once; a damaged one waits for a click).
    resumed = app.runner.resume_interrupted() if auto_resume else []
    app.runner.start()
    if port == 0:
        port = free_port(host)
    # Gradio's cache (uploads, and the images the page shows) inside the work folder, for as long as the app
    # serves: Gradio reads the variable when a file arrives, not only when the page is built.
    previous_cache_dir = os.environ.get(GRADIO_CACHE_VARIABLE)
    os.environ[GRADIO_CACHE_VARIABLE] = str(app.cache_dir)
    ui = build_ui(app)
    try:
        _, local_url, share_url = ui.launch(
            share=share, server_name=host, server_port=port, auth=pairs, prevent_thread_lock=True,
            allowed_paths=[str(app.exports_dir)], show_error=True, quiet=True, ssr_mode=False,
            inbrowser=False, max_file_size=app.limits.max_file_bytes, css=PAGE_CSS,
            # Every body bounded before it is read; uploads through uploads.py's door (limits, metadata stripped,
            # one user's files served to him only).
            app_kwargs={"middleware": [
                Middleware(BodyLimit, upload_bytes=app.limits.max_upload_bytes + MULTIPART_SLACK,
                           is_upload=takes_files),
                Middleware(BodyTimeout), Middleware(UploadDoor, training=app)]})
    except OSError as error:
        app.close()
        raise ConfigError(f"Could not start the app on {host}:{port} ({error}). Pick another --port, or "
                          "--port 0 for any free one.") from None
    add_app_api(ui.server_app, app, pairs)
    running = RunningApp(local_url, share_url, app, ui, previous_cache_dir)
    warning = share_warning(share, host, pairs)
    if warning:  # printed even when quiet: it is about who can use this GPU
        print(warning, file=sys.stderr, flush=True)
    if not quiet:
        print(f"App running at {local_url} (work folder {app.workdir})")
        if share_url:
            print(f"Public link: {share_url}")
        print(f"REST API: {local_url.rstrip('/')}{API_PREFIX}/ (schema at /openapi.json, docs/app.md)")
        for job in resumed:
            print(f"Resuming run {job.job_id}: it was interrupted when the app or the machine stopped.")
    if block:
        from .demo import _sigterm_as_ctrl_c

        with _sigterm_as_ctrl_c():
            try:
                while True:
                    threading.Event().wait(0.5)
            except KeyboardInterrupt:
                print("Stopping the page. A run still training goes on; `dreambooth-helpers app` finds it again.",
                      file=sys.stderr)
                running.close()
    return running
