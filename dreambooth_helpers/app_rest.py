"""The app's REST API (`add_app_api`), beside the page on the same port: the whole journey for scripts and other
front ends, over app.py's TrainingApp, with the page's sign-in, limits and recipe.

    POST   /api/photos                     multipart: field `files` (photos or a zip), optional field `kind`
                                           -> the kept photos and the dataset doctor's findings (PHOTOS below)
    GET    /api/photos                     -> PHOTOS, of the photos kept
    DELETE /api/photos/{name}              -> PHOTOS, after removing that one
    POST   /api/jobs                       {"identifier", "class_noun", "kind", "base_model"?, "preset"?,
                                            "max_train_steps"?, "num_class_images"?} -> 201 {"id", "state"}
    GET    /api/jobs, GET /api/jobs/{id}   -> {"id", "state", "phase", "step", "max_steps", "loss", "seconds_left",
                                               "samples": [urls], "class_images"?, "error"?, ...} (JOB below)
    POST   /api/jobs/{id}/cancel, .../resume -> JOB
    POST   /api/jobs/{id}/generate         {"prompt", "negative_prompt"?, "seed"?, "steps"?, "guidance"?} -> PNG
    GET    /api/jobs/{id}/samples/{name}   -> a training sample (PNG)

Sign-in is HTTP basic with one of the app's --auth USER:PASS (anonymous: 401); without --auth the API is as open as
the page. Each user reaches only their own photos and runs: another user's run answers 404, as an unknown one does.
Bodies are bounded (bytes, JSON nesting) before they are decoded and strict: unknown fields and wrong types are 422
naming the field. Generation joins the run's one queue (the page's too) and leaves it if the client hangs up.
docs/app.md drives the whole journey with httpx.
"""

import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import app_flow as flow
from .app import TrainingApp
from .app_access import public_text
from .demo_rest import BodyRefused, _credentials_match, decode_body, done_unless_client_leaves, read_body
from .errors import ConfigError, DreamBoothError, ImageDataError
from .inference import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .jobs import RUNNING, STOPPED, Job, JobError, TooManyRuns, UnknownJob
from .safe_text import log_exception, masked
from .subject import DEFAULT_KIND, SUBJECT_KINDS

logger = logging.getLogger(__name__)
API_PREFIX = "/api"
MAX_JSON_BYTES = 16 * 1024  # a request is a handful of short fields
PHOTOS_FIELD = "files"
KIND_MUST = f"kind must be one of {', '.join(SUBJECT_KINDS)}."
# What each field of the JSON bodies takes, for the message when a value is wrong.
JOB_FIELDS = {
    "identifier": "a string (one rare made-up word, e.g. \"sks\")", "class_noun": "a string (e.g. \"dog\")",
    "kind": f"one of {', '.join(SUBJECT_KINDS)}", "base_model": "a string (a choice such as \"toy\", or a model)",
    "preset": "a string", "max_train_steps": "a whole number", "num_class_images": "a whole number",
}
GENERATE_FIELDS = {
    "prompt": "a string", "negative_prompt": "a string", "seed": "a whole number or null", "steps": "a whole number",
    "guidance": "a number",
}


def _bodies():
    """The JSON bodies: strict (true is no number, "5" no whole number) and closed (a typo is an error)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class JobRequest(BaseModel):
        """A training run, made with the recipe the page and the notebook use (subject.py)."""

        model_config = ConfigDict(strict=True, extra="forbid")
        identifier: str = Field(description="The rare word that will mean your subject, e.g. sks.")
        class_noun: str = Field(description="What the photos show, in a word or two: dog, robot, teddy bear.")
        kind: Literal[SUBJECT_KINDS] = Field(description="object, person or style: picks the recipe.")  # type: ignore
        base_model: str | None = Field(None, description="A base-model choice (toy, tiny-sdxl, sd15-full, "
                                       "sd15-lora, sdxl-lora) or a model the app allows; default: the app's.")
        preset: str | None = Field(None, description="A memory preset; default: the base model's.")
        max_train_steps: int | None = Field(None, description="Training steps; default: the recipe's.")
        num_class_images: int | None = Field(None, description="Class images for prior preservation (0: none); "
                                             "default: the recipe's.")

    class GenerateRequest(BaseModel):
        """One image from a finished run."""

        model_config = ConfigDict(strict=True, extra="forbid")
        prompt: str = Field(description="Use the run's identifier and class noun, e.g. a photo of sks dog.")
        negative_prompt: str = ""
        seed: int | None = Field(None, description="The same seed and settings give the same image; null: random.")
        steps: int = DEFAULT_STEPS
        guidance: float = Field(DEFAULT_GUIDANCE, description="Classifier-free guidance scale.")

    return JobRequest, GenerateRequest


def field_errors(error: Any, body: Any, fields: dict[str, str]) -> str:
    """One readable sentence per wrong field of a pydantic ValidationError, naming the field and what it takes."""
    problems: dict[str, str] = {}
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "body"
        if name == "body" or not isinstance(body, dict):
            problems["body"] = "the body must be one JSON object"
        elif item["type"] == "missing":
            problems[name] = f"{name} is missing"
        elif item["type"] == "extra_forbidden":
            problems[name] = f"unknown field {name!r} (the fields are: {', '.join(fields)})"
        else:
            problems[name] = f"{name} must be {fields.get(name, 'something else')}"
    return "; ".join(problems.values()) + "."


def _json_of(job: Job, workdir: Path) -> dict[str, Any]:
    """What the API says of a run (JOB)."""
    progress, left = job.progress, job.progress.get("seconds_left")
    phase = None
    if job.status == RUNNING:  # what a run is doing: loading, making its class images, or training
        phase = "class_images" if job.class_images else "training" if progress.get("history") else "starting"
    answer: dict[str, Any] = {
        "id": job.job_id, "state": job.status, "phase": phase, "step": job.step,
        "max_steps": job.total_steps or progress.get("total_steps"), "loss": progress.get("loss"),
        "seconds_left": None if job.status in STOPPED or left is None else round(float(left), 1),
        "seconds_elapsed": round(job.elapsed(), 1), "created": job.created,
        "samples": [f"{API_PREFIX}/jobs/{job.job_id}/samples/{Path(path).name}" for path in job.samples],
    }
    if phase == "class_images":
        answer["class_images"] = dict(zip(("made", "total"), job.class_images, strict=True))
    if job.error:
        answer["error"] = public_text(masked(str(job.error)), workdir)
    return answer


# Reading photos and running the doctor take seconds of CPU for 30 large photos: one request does it at a time, and
# its answer is kept (per user, kind and the photos' names, sizes and times) until the photos change.
PHOTO_WORK = threading.Lock()
_PHOTO_ANSWERS: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
KEPT_ANSWERS = 32


def _photos_signature(folder: Path) -> tuple:
    """The photos' names, sizes and times; a photo removed meanwhile (the page's upload replaces them) is left out."""
    found = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            stat = entry.stat()
            found.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


def _photos_json(training: TrainingApp, user: str | None, kind: str, upload: Any = None) -> dict[str, Any]:
    """PHOTOS: the user's kept photos, what an upload skipped (and why), and the dataset doctor's findings."""
    folder = training.photos_dir(user)
    with PHOTO_WORK:
        key = (str(folder), kind, _photos_signature(folder))
        if upload is not None:  # what this upload skipped is its own answer's
            return _photos_answer(training, folder, kind, upload)
        if key not in _PHOTO_ANSWERS:
            _PHOTO_ANSWERS[key] = _photos_answer(training, folder, kind, None)
            while len(_PHOTO_ANSWERS) > KEPT_ANSWERS:
                _PHOTO_ANSWERS.popitem(last=False)
        _PHOTO_ANSWERS.move_to_end(key)
        return _PHOTO_ANSWERS[key]


def _photos_answer(training: TrainingApp, folder: Path, kind: str, upload: Any) -> dict[str, Any]:
    from .data import read_images
    from .doctor import diagnose

    kept = read_images(folder) if folder.is_dir() else None
    doctor = diagnose(kept, kind=kind) if kept is not None and kept.images else None
    text = flow.photo_report(kept, doctor, upload) if doctor else flow.no_photos_text(kind)  # the page's words
    return {
        "count": len(kept.images) if kept else 0,
        "photos": [{"name": r.name, "width": r.original_size[0], "height": r.original_size[1]}
                   for r in (kept.images if kept else [])],
        "skipped": [{"name": s.name, "reason": public_text(s.reason, training.workdir)}
                    for s in (upload.skipped if upload is not None else [])],
        "usable": bool(doctor and doctor.usable),
        "findings": [{"severity": f.severity, "check": f.check, "file": f.file,
                      "message": public_text(f.message, training.workdir), "advice": f.advice}
                     for f in (doctor.findings if doctor else [])],
        "report": public_text(text, training.workdir),
    }


def _status_of(error: Exception) -> int:
    if isinstance(error, UnknownJob):
        return 404
    if isinstance(error, TooManyRuns):
        return 429
    if isinstance(error, JobError):
        return 409  # the run is not in a state that allows it
    if isinstance(error, ConfigError | ImageDataError):
        return 422
    return 503


def add_app_api(server: Any, training: TrainingApp, pairs: list[tuple[str, str]] | None = None) -> None:
    """Add the /api/ routes to `server`, a FastAPI app (Gradio's own: one port, one share link). `pairs`: the
    --auth USER:PASS pairs (None: no sign-in, as the page)."""
    from fastapi import APIRouter, Depends, HTTPException, Request, Response
    from fastapi.responses import FileResponse
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool

    from .uploads import UploadRefused, discard, receive_files, store_upload

    job_request, generate_request = _bodies()

    def signed_in(request: Request) -> str | None:
        """The user of an HTTP basic `Authorization` header (every pair compared: no early answer)."""
        if not pairs:
            return None
        header = request.headers.get("authorization")
        matches = [user for user, password in pairs if _credentials_match(header, (user, password))]
        if not matches:
            raise HTTPException(401, "Sign in with HTTP basic auth: one of the app's --auth USER:PASS "
                                "(httpx.BasicAuth(USER, PASS), curl -u USER:PASS).",
                                headers={"WWW-Authenticate": 'Basic realm="dreambooth", charset="UTF-8"'})
        return matches[0]

    def same_site(request: Request) -> None:
        """A browser's request from another site is refused: a page elsewhere must not act with credentials the
        visitor's browser keeps for this app (HTTP basic is sent along by the browser once typed in)."""
        origin = request.headers.get("origin")
        if request.headers.get("sec-fetch-site") == "cross-site" or (
                origin and urlsplit(origin).netloc != request.headers.get("host")):
            raise HTTPException(403, "Requests from another site's pages are refused; call the API from a script "
                                "or this app's own page.")

    def refused(error: Exception) -> HTTPException:
        """The HTTP answer to an action that failed: our errors as they are (no server paths, no tokens)."""
        if not isinstance(error, DreamBoothError):
            log_exception(logger, "The app's REST API failed", error)
            return HTTPException(500, "The server failed; its log says why.")
        status = _status_of(error)
        return HTTPException(status, public_text(masked(str(error)), training.workdir),
                             headers={"Retry-After": "30"} if status == 503 else None)

    async def call(function, *args, **kwargs):
        """`function` in a worker thread (reading photos, checking settings and moving runs touch the disk)."""
        try:
            return await run_in_threadpool(function, *args, **kwargs)
        except HTTPException:
            raise
        except Exception as error:
            raise refused(error) from None

    async def json_body(request: Request, model: Any, fields: dict[str, str]) -> Any:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise HTTPException(415, "Send the body as JSON, with the header Content-Type: application/json.")
        try:
            body = decode_body(await read_body(request, MAX_JSON_BYTES, "it takes a few settings, not files"))
        except BodyRefused as error:
            raise HTTPException(error.status, str(error)) from None
        try:
            return model.model_validate(body)
        except ValidationError as error:
            raise HTTPException(422, field_errors(error, body, fields)) from None

    def schema(model: Any) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}

    router = APIRouter(prefix=API_PREFIX, tags=["DreamBooth app"], dependencies=[Depends(same_site)])
    user_of = Depends(signed_in)

    # -- photos

    @router.post("/photos", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [PHOTOS_FIELD], "properties": {
            PHOTOS_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "Photos (JPEG, PNG, WebP, HEIC, ...) or a zip of them."},
            "kind": {"type": "string", "enum": list(SUBJECT_KINDS), "default": DEFAULT_KIND}}}}}}})
    async def upload_photos(request: Request, user: str | None = user_of) -> dict[str, Any]:
        """Upload the subject's photos (they replace the earlier ones); the kept photos and the doctor's findings."""
        try:
            form, files = await receive_files(request, training.limits, field=PHOTOS_FIELD)
        except UploadRefused as error:
            raise HTTPException(error.status, str(error)) from None
        try:
            kind = form.get("kind") or DEFAULT_KIND
            if not isinstance(kind, str) or kind not in SUBJECT_KINDS:
                raise HTTPException(422, KIND_MUST)
            try:
                paths = await run_in_threadpool(store_upload, training, user, files)
            except UploadRefused as error:
                raise HTTPException(error.status, str(error)) from None
        finally:
            await form.close()
        try:
            report = await call(_locked(PHOTO_WORK, training.keep_photos), user, paths)
        finally:
            discard(paths, training.uploads_dir(user))
        return await call(_photos_json, training, user, kind, report)

    @router.get("/photos")
    async def list_photos(kind: str = DEFAULT_KIND, user: str | None = user_of) -> dict[str, Any]:
        """The kept photos and the doctor's findings (`kind`: object, person or style)."""
        if kind not in SUBJECT_KINDS:
            raise HTTPException(422, KIND_MUST)
        return await call(_photos_json, training, user, kind)

    @router.delete("/photos/{name}")
    async def delete_photo(name: str, kind: str = DEFAULT_KIND, user: str | None = user_of) -> dict[str, Any]:
        """Remove one kept photo (its name as GET /api/photos lists it)."""
        def remove() -> None:
            folder = training.photos_dir(user)
            with PHOTO_WORK:
                names = {path.name: path for path in folder.iterdir() if path.is_file()} if folder.is_dir() else {}
                try:
                    names[name].unlink()
                except (KeyError, FileNotFoundError):
                    raise HTTPException(404, f"No photo {name!r}; GET {API_PREFIX}/photos lists them.") from None
        if kind not in SUBJECT_KINDS:
            raise HTTPException(422, KIND_MUST)
        await call(remove)
        return await call(_photos_json, training, user, kind)

    # -- runs

    @router.post("/jobs", status_code=201, openapi_extra=schema(job_request))
    async def start_job(request: Request, user: str | None = user_of) -> dict[str, Any]:
        """Start a training run on the kept photos (queued while another run trains)."""
        body = await json_body(request, job_request, JOB_FIELDS)
        settings = _job_settings(body, training)
        job = await call(training.start, user, **settings)
        return {"id": job.job_id, "state": job.status}

    @router.get("/jobs")
    async def list_jobs(user: str | None = user_of) -> list[dict[str, Any]]:
        """The user's runs, oldest first."""
        jobs = await call(training.jobs, user)
        return [_json_of(job, training.workdir) for job in jobs]

    @router.get("/jobs/{id}")
    async def get_job(id: str, user: str | None = user_of) -> dict[str, Any]:
        """A run's state and progress, and its samples' URLs."""
        return _json_of(await call(training.job, user, id), training.workdir)

    @router.post("/jobs/{id}/cancel")
    async def cancel_job(id: str, user: str | None = user_of) -> dict[str, Any]:
        """Stop a run (a queued one never starts; a running one stops at the next step)."""
        return _json_of(await call(training.cancel, user, id), training.workdir)

    @router.post("/jobs/{id}/resume")
    async def resume_job(id: str, user: str | None = user_of) -> dict[str, Any]:
        """Queue a stopped run again: it continues from its newest checkpoint."""
        return _json_of(await call(training.resume, user, id), training.workdir)

    @router.get("/jobs/{id}/samples/{name}", response_class=FileResponse,
                responses={200: {"content": {"image/png": {}}}})
    async def get_sample(id: str, name: str, user: str | None = user_of):
        """One of the run's training samples, at its true size."""
        job = await call(training.job, user, id)
        for path in job.samples:
            resolved = Path(path).resolve()
            if resolved.name == name and resolved.is_relative_to(job.folder) and resolved.is_file():
                return FileResponse(resolved, media_type="image/png")
        raise HTTPException(404, f"No sample {name!r} in this run; GET {API_PREFIX}/jobs/{{id}} lists them.")

    @router.post("/jobs/{id}/generate", openapi_extra=schema(generate_request), response_class=Response,
                 responses={200: {"content": {"image/png": {}}, "description": "The image, with its settings in "
                                  "the PNG's text and the seed in the X-Seed header."}})
    async def generate(id: str, request: Request, user: str | None = user_of) -> Response:
        """An image from a finished run, through its one queue (the page's too)."""
        import asyncio
        import concurrent.futures

        params = await json_body(request, generate_request, GENERATE_FIELDS)
        service, queued = await call(training.submit_generation, user, id, params.prompt,
                                     negative_prompt=params.negative_prompt, steps=params.steps, seed=params.seed,
                                     guidance=params.guidance)
        try:
            if not await done_unless_client_leaves(request, queued.future):
                service.withdraw(queued)  # the client hung up while it waited: give up its place
                return Response(status_code=499)  # (nobody reads it)
            result = queued.future.result()[0]
        except concurrent.futures.CancelledError:
            raise HTTPException(503, "The model was closed (another run's model was loaded); try again.") from None
        except asyncio.CancelledError:  # the server is stopping
            service.withdraw(queued)
            raise
        except Exception as error:
            raise refused(error) from None
        png = await run_in_threadpool(_png_bytes, result)
        return Response(png, media_type="image/png", headers={"X-Seed": str(result.seed)})

    server.include_router(router)
    # Gradio's app was built before these routes: put them first so no catch-all route shadows them.
    ours = [route for route in server.router.routes if getattr(route, "path", "").startswith(f"{API_PREFIX}/")]
    server.router.routes[:] = ours + [route for route in server.router.routes if route not in ours]
    server.openapi_schema = None  # made again, with these routes, on the next request


def _job_settings(body: Any, training: TrainingApp) -> dict[str, Any]:
    """TrainingApp.start's settings from a POST /api/jobs body: a base-model choice (choices.py) sets its model and
    its preset; a model named otherwise gets the preset that goes with it (TrainingApp.make_config)."""
    from fastapi import HTTPException

    from .choices import CHOICES, base_model_choice

    model, preset = body.base_model, body.preset
    if model in {choice.key for choice in CHOICES}:
        chosen = base_model_choice(model)
        model, preset = chosen.model, preset or chosen.preset
    steps = body.max_train_steps
    if steps is not None and not 1 <= steps <= training.limits.max_steps:
        raise HTTPException(422, f"max_train_steps must be from 1 to {training.limits.max_steps}.")
    return dict(kind=body.kind, token=body.identifier, class_noun=body.class_noun, model=model, preset=preset,
                steps=steps or 0, class_images=body.num_class_images)


def _locked(lock: Any, function: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return function(*args, **kwargs)
    return call


def _png_bytes(result: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=result.png_info())
    return buffer.getvalue()
