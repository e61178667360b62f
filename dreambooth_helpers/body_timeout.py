"""A deadline on reading a request's body, for the demo and the app, and a bound on its size, for the app (ASGI
middleware).

Gradio runs uvicorn with its defaults and lets no server option through `launch()`: uvicorn's `timeout_keep_alive`
(5 s) closes idle connections between requests only, and neither uvicorn nor h11 bounds the time a client takes
to send a body. A client that declares a body and trickles it (or never sends it) would hold its connection, and
whatever the app awaits on it, for ever. `BodyTimeout` gives each body BODY_TIMEOUT_S plus the time to send its
declared length at MIN_BODY_RATE; past that the request is answered 408 with `Connection: close`, which makes
uvicorn close the connection. Once the body is in, nothing is timed: a request may then wait its turn as long as
it needs. (Slow *headers* happen before any ASGI code runs; h11 bounds their size, 16 KB, not their time.)

`BodyLimit` goes in front of both: Gradio's routes read a whole body into memory before they check a sign-in, so a
body sent in chunks (of unknown length) is refused, and one declared over the route's bound (MAX_BODY_BYTES, or the
uploads' own) is answered 413 before a byte of it is read. That bounds the deadline above too.
"""

from __future__ import annotations

import asyncio
import json

BODY_TIMEOUT_S = 30.0
MIN_BODY_RATE = 64 * 1024  # bytes per second a large body must at least average
MAX_BODY_BYTES = 1024 * 1024  # any request but an upload: the page sends events and form values, the API JSON


class BodyLimit:
    """Refuse (411) a body of undeclared length and (413) one declared longer than the route takes: `upload_bytes`
    for the routes `is_upload(path)` says take files, MAX_BODY_BYTES for every other."""

    def __init__(self, app, upload_bytes: int, is_upload):
        self.app, self.upload_bytes, self.is_upload = app, upload_bytes, is_upload

    async def __call__(self, scope, receive, send):
        refusal = None
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length, upload = headers.get(b"content-length"), self.is_upload(scope["path"])
            bound = self.upload_bytes if upload else MAX_BODY_BYTES
            if length is None and b"transfer-encoding" in headers:  # (neither header: an empty body, as curl -X POST)
                refusal = 411, "Send a Content-Length header; bodies of unknown size are not accepted."
            elif length is not None and (not length.isdigit() or int(length) > bound):
                refusal = 413, (f"The upload is larger than {bound / 2**20:.0f} MiB in all: choose fewer or smaller "
                                "photos." if upload else f"The request is over {bound // 1024} KB, more than this "
                                "route takes: it takes settings and prompts, not files.")
        if refusal is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": refusal[1]}).encode()
        await send({"type": "http.response.start", "status": refusal[0],
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class BodyTimeout:
    def __init__(self, app, seconds: float | None = None, min_rate: float = MIN_BODY_RATE):
        self.app, self.min_rate = app, min_rate
        self.seconds = BODY_TIMEOUT_S if seconds is None else seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        declared = int(length) if length.isdigit() else 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds + declared / self.min_rate
        state = {"body_done": False, "timed_out": False, "started": False}

        async def timed_receive():
            if state["body_done"] or state["timed_out"]:
                return await receive() if not state["timed_out"] else {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                state["timed_out"] = True
                if not state["started"]:
                    state["started"] = True
                    await _refuse(send, self.seconds)
                return {"type": "http.disconnect"}  # the app stops reading; its answer is not sent
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def guarded_send(message):
            if state["timed_out"]:
                return  # the 408 went out already
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not state["timed_out"]:
                raise  # the app's own error; one after a timeout is its reaction to the disconnect


async def _refuse(send, seconds: float) -> None:
    body = json.dumps({"detail": f"The request body did not arrive in time ({seconds:g} s and more for a large "
                                 "one); send it at once."}).encode()
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
