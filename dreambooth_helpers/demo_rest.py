"""The demo's REST API, beside the page on the same port (and through the share link):

    GET  /api/health    -> {"status": "loading" | "ready" | "failed", "model": ..., "queue": ..., "message": ...}
    POST /api/generate  {"prompt": "...", "negative_prompt": "", "steps": 25, "guidance": 7.5,
                         "seed": 1234 or null, "num_images": 1, "width": null, "height": null}
                        -> {"images": [{"seed": 1234, "png_base64": "..."}], "seeds": [...], ...}

`add_rest_api` adds these routes to a FastAPI app, behind HTTP basic auth when a USER:PASS is set
(`demo_api.parse_auth`); its requests join the one queue of `demo_api.DemoService`. `RequestLimits`, ASGI
middleware in front of the whole app, refuses uploads, multipart bodies and oversized requests.
"""

import asyncio
import base64
import concurrent.futures
import io
import json
import secrets
from typing import Any

from .demo_api import DemoService, parse_seed
from .errors import ConfigError, DreamBoothError
from .inference import DEFAULT_GUIDANCE, DEFAULT_STEPS, GeneratedImage
from .safe_json import json_depth

# ---------------------------------------------------------------------------- the REST API

# What each field of POST /api/generate takes, for the message when a value has the wrong type.
REQUEST_FIELDS = {
    "prompt": "a string", "negative_prompt": "a string", "steps": "a whole number", "guidance": "a number",
    "seed": 'a whole number, "random" or null', "num_images": "a whole number",
    "width": "a whole number or null", "height": "a whole number or null",
}


def _request_model():
    """The body of POST /api/generate. Strict: true is not a number and "5" is not a whole number, as
    JSON means them; unknown fields are refused rather than ignored (a typo would silently do nothing)."""
    from pydantic import BaseModel, ConfigDict

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")

        prompt: str
        negative_prompt: str = ""
        steps: int = DEFAULT_STEPS
        guidance: float = DEFAULT_GUIDANCE
        seed: int | str | None = None  # a number, or null / "random"
        num_images: int = 1
        width: int | None = None
        height: int | None = None

    return GenerateRequest


def request_errors_text(error, body: Any) -> str:
    """One readable sentence per wrong field of a pydantic ValidationError, naming what the field takes."""
    problems: dict[str, str] = {}
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "body"
        if item["type"] == "missing":
            problems[name] = f"{name} is missing"
        elif item["type"] == "extra_forbidden":
            problems[name] = f"unknown field {name!r} (the fields are: {', '.join(REQUEST_FIELDS)})"
        elif name in REQUEST_FIELDS:
            got = json.dumps(body.get(name)) if isinstance(body, dict) else "?"
            problems[name] = f"{name} must be {REQUEST_FIELDS[name]} (got {got})"
        else:
            problems[name] = f"{name}: {item['msg']}"
    return "; ".join(problems.values()) + "."


def _credentials_match(header: str | None, auth: tuple[str, str]) -> bool:
    """Whether an `Authorization: Basic ...` header carries `auth`, compared as UTF-8 bytes in constant time
    (non-ASCII users and passwords work; nothing here can raise on what a client sends)."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        sent = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:
        return False
    user, sep, password = sent.partition(b":")
    user_ok = secrets.compare_digest(user, auth[0].encode("utf-8"))
    password_ok = secrets.compare_digest(password, auth[1].encode("utf-8"))
    return bool(sep) and user_ok and password_ok


MAX_JSON_DEPTH = 8  # a request is one flat object; nothing in it nests


class BodyRefused(ValueError):
    """A request body refused before or while decoding it; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request, max_bytes: int, takes: str = "this demo takes a prompt, not files") -> bytes:
    """The request's body, refused (413) as soon as it passes `max_bytes`, whatever its Content-Length said;
    `takes`: what the route takes instead, for the message."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyRefused(413, f"The request is over {max_bytes // 1024} KB; {takes}.")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(raw: bytes) -> Any:
    """The JSON of a request body: its nesting bounded before decoding (3000 `[` would make Python's decoder
    raise RecursionError), and no lone surrogate in it (JSON's "\\ud800" decodes to a string that cannot be
    encoded again: it would fail in the answer)."""
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise BodyRefused(400, f"The body is JSON nested deeper than {MAX_JSON_DEPTH} levels; send one object, "
                               'e.g. {"prompt": "a photo of sks dog"}.')
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # (RecursionError: only if the count above missed a way to nest)
        raise BodyRefused(400, 'The body must be JSON, e.g. {"prompt": "a photo of sks dog"}.') from None
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BodyRefused(400, "The body holds a lone surrogate (half of a UTF-16 pair, such as \\ud800), "
                               "which is no character; send the text as UTF-8.") from None
    return body


async def done_unless_client_leaves(request, future: concurrent.futures.Future) -> bool:
    """Wait for `future`; False, at once, if the client hangs up first (its connection closes). The server
    does not stop a handler whose client left: without this, abandoned requests would keep their places."""
    waiting = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiting.done():
        return True
    waiting.cancel()
    return False


async def _client_gone(request) -> None:
    # The body has been read: the next message the server has for this request is its disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)


def add_rest_api(app, service: DemoService, auth: tuple[str, str] | None = None) -> None:
    """Add GET /api/health and POST /api/generate to a FastAPI app (Gradio's own, or any other)."""
    from fastapi import APIRouter, Depends, HTTPException, Request, Response
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool

    generate_request = _request_model()

    def check_auth(request: Request) -> None:
        if auth is not None and not _credentials_match(request.headers.get("authorization"), auth):
            raise HTTPException(401, "Give the demo's USER:PASS with HTTP basic auth (curl -u USER:PASS).",
                                headers={"WWW-Authenticate": 'Basic realm="demo", charset="UTF-8"'})

    router = APIRouter(prefix="/api", dependencies=[Depends(check_auth)])

    @router.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    # Async: the request joins the queue on the event loop, in the order requests arrive, and waits for its
    # turn without holding a thread.
    @router.post("/generate")
    async def generate(request: Request) -> dict[str, Any]:
        try:
            body = decode_body(await read_body(request, service.limits.max_request_bytes))
        except BodyRefused as error:
            raise HTTPException(error.status, str(error)) from None
        try:
            params = generate_request.model_validate(body)
        except ValidationError as error:
            raise HTTPException(422, request_errors_text(error, body)) from None
        if service.state == "loading":
            raise HTTPException(503, service.status_text(), headers={"Retry-After": "10"})
        try:
            job = service.submit(params.prompt, params.negative_prompt, params.steps, params.guidance,
                                 parse_seed(params.seed), params.num_images, params.width, params.height)
        except ConfigError as error:
            raise HTTPException(422, str(error)) from None
        except DreamBoothError as error:
            raise HTTPException(503, str(error)) from None
        try:
            if not await done_unless_client_leaves(request, job.future):
                service.withdraw(job)  # the client hung up while it waited: give up its place
                return Response(status_code=499)  # (nobody reads it)
            results = job.future.result()
        except ConfigError as error:
            raise HTTPException(422, str(error)) from None
        except DreamBoothError as error:
            raise HTTPException(503, str(error)) from None
        except concurrent.futures.CancelledError:  # taken out of the queue as the demo closes
            raise HTTPException(503, "The demo is shutting down.") from None
        except asyncio.CancelledError:  # the server is stopping: give up its place
            service.withdraw(job)
            raise
        images = await run_in_threadpool(lambda: [_png_base64(r) for r in results])
        return {
            "images": [{"seed": r.seed, "png_base64": image} for r, image in zip(results, images, strict=True)],
            "seeds": [r.seed for r in results],
            "prompt": params.prompt, "negative_prompt": params.negative_prompt, "steps": params.steps,
            "guidance": params.guidance, "width": results[0].width, "height": results[0].height,
            "scheduler": results[0].scheduler, "model": service.model_name, "lora": service.lora_name,
            "seconds_per_image": round(results[0].seconds, 3),
        }

    app.include_router(router)
    # Gradio's app was built before these routes: put them first so no catch-all route shadows them.
    ours = [route for route in app.router.routes if getattr(route, "path", "").startswith("/api/")]
    app.router.routes[:] = ours + [route for route in app.router.routes if route not in ours]


# Gradio's login page posts its form as multipart/form-data (the browser's FormData); nothing else on this
# demo takes a multipart body: the page sends JSON, and it has no file, audio or image input.
MULTIPART_ROUTES = ("/login", "/login/")


class RequestLimits:
    """ASGI middleware in front of the whole app (page, Gradio's API, the REST API).

    It refuses file uploads (Gradio's upload and recording routes would store anything sent to them),
    multipart bodies everywhere but the login form, and request bodies over `max_bytes`, so a public
    link cannot be used to fill the disk or the memory. Bodies without a declared length are refused
    too, as their size is unknown up front.
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
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").lower()
        if scope["path"].rstrip("/").endswith("/upload") or (
                content_type.startswith(b"multipart/") and scope["path"] not in MULTIPART_ROUTES):
            return 403, "This demo takes no file uploads."
        length = headers.get(b"content-length")
        if length is None:
            return 411, "Send a Content-Length header; bodies of unknown size are not accepted."
        if not length.isdigit() or int(length) > self.max_bytes:
            return 413, f"The request is over {self.max_bytes // 1024} KB; this demo takes a prompt, not files."
        return None


def _png_base64(result: GeneratedImage) -> str:
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=result.png_info())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


