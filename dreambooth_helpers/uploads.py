"""The app's upload door: Gradio's upload route and file cache, made to serve each visitor alone.

Gradio keeps every upload in one cache shared by all visitors, serves any cached file to anyone who knows its URL,
accepts any cached path as a visitor's own upload (FileData), and takes any number and type of files. `UploadDoor`,
ASGI middleware in front of the app (app_launch.py), answers the upload route itself instead:

- only a signed-in visitor (Gradio's own session cookie), or anyone when the page has no --auth (one shared space);
- at most `AppLimits.max_photos` files, each at most `max_file_bytes`, all together at most `max_upload_bytes`, only
  photos and zips of photos; every photo's pixels are read from its header and checked against `max_photo_pixels`,
  and the upload's against `max_upload_pixels`, before anything is decoded;
- metadata stripped at the door: a JPEG or PNG loses its EXIF (GPS, camera), XMP, IPTC, text chunks and comments
  without being re-encoded (its orientation is kept), any other format is decoded once (at most 2048 px) and kept as
  a JPEG, and a zip is rewritten with its photos cleaned so (what cannot be read in it is left out);
- kept in WORKDIR/.gradio/uploads/USER/<random>/NAME and served back (GET .../file=PATH) to that user only;
- removed once the page has used them, or after UPLOAD_TTL_S; a user's unused uploads are capped at
  `max_upload_bytes`, the oldest going first.

`own_uploads` is the other half: the page's upload handler takes only files in the signed-in user's own folder, so
nobody can hand in another user's cached path as the FileData of his upload.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from . import data
from .data import ALLOWED_FORMATS, IMAGE_EXTENSIONS, ZIP_EXTENSION, DatasetReport
from .errors import ImageDataError
from .subject import photo_range

UPLOADS_FOLDER = "uploads"  # inside Gradio's cache folder (WORKDIR/.gradio)
ANONYMOUS = "_"  # the one shared space of a page without --auth
UPLOAD_TTL_S = 3600.0  # an upload the page never used is removed after this long
MULTIPART_SLACK = 64 * 1024 + 1024  # multipart headers around the files, on top of max_upload_bytes
PHOTO_TYPES = "photos (JPEG, PNG, WebP, HEIC, AVIF, GIF, BMP, TIFF) or a zip of them"
# PNG chunks kept: the pixels and how to show them. Dropped: eXIf, tEXt, zTXt, iTXt (XMP), tIME and anything else.
PNG_KEPT = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"bKGD",
            b"pHYs", b"cICP", b"acTL", b"fcTL", b"fdAT"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UploadRefused(Exception):
    """An upload the door turns away, with the HTTP status and the message the page shows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _mib(size: int) -> str:
    return f"{size / 2**20:.3g} MiB"


def takes_files(path: str) -> bool:
    """Whether a route takes uploaded files (Gradio's upload route, the REST API's photos)."""
    return path.rstrip("/").endswith("/upload") or path.rstrip("/") == "/api/photos"


def user_uploads(cache_dir: Path, user: str | None) -> Path:
    """The folder of `user`'s uploads (user names are checked by app_access.parse_users: no separators)."""
    return Path(cache_dir) / UPLOADS_FOLDER / (user or ANONYMOUS)


def check_upload_files(files: list[Path], limits: Any) -> None:
    """The app's limits on one upload, from the files' sizes alone: count, bytes per file, bytes in all."""
    if not files:
        raise ImageDataError("Choose some photos (JPEG, PNG, WebP, HEIC) or a zip of them first.")
    if len(files) > limits.max_photos:
        raise ImageDataError(f"{len(files)} files is more than this page takes ({limits.max_photos}); "
                             f"choose your best photos ({photo_range()} work well).")
    sizes = {f: f.stat().st_size for f in files}
    too_big = [f.name for f, size in sizes.items() if size > limits.max_file_bytes]
    if too_big:
        raise ImageDataError(f"{', '.join(too_big)}: larger than {_mib(limits.max_file_bytes)} per file. "
                             "Resize or re-save them as JPEG first.")
    if sum(sizes.values()) > limits.max_upload_bytes:
        raise ImageDataError(f"The upload is larger than {_mib(limits.max_upload_bytes)} in all: "
                             "choose fewer or smaller photos.")


def own_uploads(files: Iterable[str | Path], folder: Path) -> list[Path]:
    """`files` if every one lies in `folder` (the user's uploads); anything else was not uploaded by this user."""
    folder = folder.resolve()
    paths = [Path(f) for f in files]
    strangers = [p.name for p in paths if not p.resolve().is_relative_to(folder)]
    if strangers:
        raise ImageDataError(f"{', '.join(strangers)}: not a file you uploaded on this page. Choose the photos "
                             "again.")
    gone = [p.name for p in paths if not p.is_file()]
    if gone:
        raise ImageDataError(f"{', '.join(gone)}: already used, or removed after {UPLOAD_TTL_S / 3600:g} hour "
                             "unused. Choose the photos again.")
    return paths


def discard(files: Iterable[str | Path], folder: Path) -> None:
    """Remove used uploads: each file's own folder in `folder`."""
    folder = folder.resolve()
    for file in files:
        entry = Path(file).resolve().parent
        if entry.parent == folder:
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------------------- cleaning


def _exif_orientation(exif_bytes: bytes | None) -> int:
    if not exif_bytes:
        return 1
    exif = Image.Exif()
    try:
        exif.load(exif_bytes if exif_bytes.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif_bytes)
        return int(exif.get(0x0112, 1))
    except Exception:  # a damaged block: read as stored
        return 1


def _orientation_exif(orientation: int) -> bytes:
    """A minimal EXIF block ("Exif\\0\\0" + TIFF) holding the orientation alone."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def strip_jpeg(raw: bytes, orientation: int = 1) -> bytes:
    """The JPEG without APP1 (EXIF, XMP), APP13 (IPTC), other APPn and comments, and without whatever follows
    its end (an MPO's second image, a phone's trailer); JFIF, Adobe and ICC segments and the pixels are kept
    byte for byte. An `orientation` other than 1 is written back as the only EXIF tag."""
    if raw[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    out = bytearray(b"\xff\xd8")
    if orientation in data.UPRIGHT:
        body = _orientation_exif(orientation)
        out += b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body
    i, end = 2, len(raw)
    while i + 1 < end:
        if raw[i] != 0xFF:
            raise ValueError("damaged JPEG structure")
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # the end of the image: nothing after it is kept
            return bytes(out + b"\xff\xd9")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out += raw[i:i + 2]
            i += 2
            continue
        length = int.from_bytes(raw[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > end:
            raise ValueError("damaged JPEG segment")
        if marker == 0xDA:  # start of scan: its header, then the coded pixels up to the next real marker
            j = i + 2 + length
            while True:
                k = raw.find(b"\xff", j)
                if k < 0 or k + 1 >= end:  # truncated: keep the pixels there are (the reader says so later)
                    return bytes(out + raw[i:])
                if raw[k + 1] == 0x00 or 0xD0 <= raw[k + 1] <= 0xD7 or raw[k + 1] == 0xFF:
                    j = k + 1
                    continue
                break
            out += raw[i:k]
            i = k
            continue
        segment = raw[i:i + 2 + length]
        metadata = 0xE1 <= marker <= 0xEF or marker == 0xFE
        if not metadata or marker == 0xEE or (marker == 0xE2 and segment[4:16] == b"ICC_PROFILE\x00"):
            out += segment
        i += 2 + length
    return bytes(out)


def strip_png(raw: bytes) -> bytes:
    """The PNG with only the chunks that make its pixels (PNG_KEPT); an EXIF orientation is kept alone."""
    if not raw.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    chunks, orientation, i = [], 1, len(PNG_SIGNATURE)
    while i + 12 <= len(raw):
        length = int.from_bytes(raw[i:i + 4], "big")
        kind, end = raw[i + 4:i + 8], i + 12 + length
        if end > len(raw):
            raise ValueError("damaged PNG chunk")
        if kind == b"eXIf":
            orientation = _exif_orientation(raw[i + 8:i + 8 + length])
        elif kind in PNG_KEPT:
            chunks.append((kind, raw[i:end]))
        if kind == b"IEND":
            break
        i = end
    out = bytearray(PNG_SIGNATURE)
    for kind, chunk in chunks:
        if kind == b"IDAT" and orientation in data.UPRIGHT:
            body = _orientation_exif(orientation)[6:]
            out += len(body).to_bytes(4, "big") + b"eXIf" + body + zlib.crc32(b"eXIf" + body).to_bytes(4, "big")
            orientation = 1  # once, before the first IDAT
        out += chunk
    return bytes(out)


def clean_photo(name: str, raw: bytes, max_pixels: int, count: Callable[[str, tuple[int, int]], None],
                max_side: int) -> tuple[str, bytes]:
    """(name, bytes) of the photo without metadata; its pixels checked from the header before anything else.
    Raises UploadRefused over the pixel limits, ImageDataError when it is not a photo this app reads."""
    try:
        with Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS) as opened:
            width, height = opened.size
            kind, exif = opened.format, opened.info.get("exif")
    except Exception:  # Pillow raises many types on hostile bytes
        raise ImageDataError(f"{name}: not a photo format this page reads, or the file is damaged.") from None
    if width * height > max_pixels:
        raise UploadRefused(413, f"{name}: {width}x{height} ({width * height / 1e6:.0f} megapixels) is over this "
                                 f"page's limit of {max_pixels / 1e6:.0f} megapixels per photo; resize it to about "
                                 "2000 px on the long side.")
    count(name, (width, height))
    try:
        if kind in ("JPEG", "MPO"):  # MPO: a camera JPEG with a second image after it
            return name, strip_jpeg(raw, _exif_orientation(exif))
        if kind == "PNG":
            return name, strip_png(raw)
    except ValueError:
        raise ImageDataError(f"{name}: a damaged {kind} file.") from None
    record = data.read_image(name, raw, max_side=max_side, max_pixels=max_pixels)  # upright RGB, decoded once
    buffer = io.BytesIO()
    record.image.save(buffer, format="JPEG", quality=95)  # no larger than the HEIC or WebP it replaces
    return f"{Path(name).stem or 'photo'}.jpg", buffer.getvalue()


def clean_zip(name: str, raw: bytes, max_pixels: int, count: Callable[[str, tuple[int, int]], None],
              max_side: int) -> bytes:
    """The zip again, holding its photos cleaned (clean_photo); what cannot be read in it is left out, as
    data.read_images would skip it. Its members are read as read_images reads them (the zip-bomb limits)."""
    report = DatasetReport()
    members = data._zip_members(name, raw, report)
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_STORED) as cleaned:
        for member_name, content in members:
            inner = member_name[len(name) + 1:]
            try:
                cleaned_name, cleaned_bytes = clean_photo(inner, content, max_pixels, count, max_side)
            except ImageDataError:
                continue
            cleaned.writestr(str(Path(inner).with_name(Path(cleaned_name).name)), cleaned_bytes)
    if any(skip.name == name and "not a readable zip" in skip.reason for skip in report.skipped):
        raise ImageDataError(f"{name}: not a readable zip file.")
    return output.getvalue()


def _safe_name(filename: str | None) -> str:
    name = Path((filename or "").replace("\\", "/")).name
    name = re.sub(r"[^\w.()+,' -]", "_", name).strip()[:120]
    return name if name.strip(".") else "upload"


# ---------------------------------------------------------------------------- the door


class UploadDoor:
    """ASGI middleware in front of the app: the upload route, and per-user access to uploaded files (see above).
    `training` is the TrainingApp (its limits and cache folder)."""

    def __init__(self, app, training: Any):
        self.app, self.training = app, training

    @property
    def root(self) -> Path:
        return Path(self.training.cache_dir) / UPLOADS_FOLDER

    async def __call__(self, scope, receive, send):
        from starlette.responses import PlainTextResponse

        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "POST" and path.rstrip("/").endswith("/upload"):  # (takes_files: also /api/photos)
                response = await self._upload(scope, receive)
                await response(scope, receive, send)
                return
            if method in ("GET", "HEAD") and self._someone_elses(scope):
                await PlainTextResponse("Not found.", status_code=404)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _visitor(self, scope) -> tuple[bool, str | None]:
        """(signed in or no sign-in needed, the user name), as Gradio's own login check finds them."""
        from starlette.requests import Request

        server = scope.get("app")
        if getattr(server, "auth", None) is None and getattr(server, "auth_dependency", None) is None:
            return True, None
        cookies = Request(scope).cookies
        cookie_id = getattr(server, "cookie_id", "")
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        user = getattr(server, "tokens", {}).get(token) if token else None
        return user is not None, user

    def _someone_elses(self, scope) -> bool:
        """Whether a file request names an upload that is not the visitor's own."""
        path = scope["path"]
        marker = next((m for m in ("/file=", "/file/") if m in path), None)
        if marker is None:
            return False
        candidate = path.split(marker, 1)[1]
        root = self.root.resolve()
        try:
            forms = {Path(os.path.abspath(candidate)), Path(os.path.realpath(candidate))}
        except (OSError, ValueError):
            return True
        if not any(form.is_relative_to(root) for form in forms):
            return False
        signed_in, user = self._visitor(scope)
        own = user_uploads(self.root.parent, user).resolve()
        return not (signed_in and all(form.is_relative_to(own) for form in forms))

    async def _upload(self, scope, receive):
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import JSONResponse, PlainTextResponse

        signed_in, user = self._visitor(scope)
        if not signed_in:
            return JSONResponse({"detail": {"error": "Not authenticated"}}, status_code=401)
        try:
            form, files = await receive_files(Request(scope, receive), self.training.limits)
            try:
                paths = await run_in_threadpool(store_upload, self.training, user, files)
            finally:
                await form.close()
        except UploadRefused as refused:
            return PlainTextResponse(str(refused), status_code=refused.status)
        return JSONResponse([str(path) for path in paths])


def _make_room(root: Path, folder: Path, incoming: int, cap: int) -> None:
    """Remove every user's uploads older than UPLOAD_TTL_S, then this user's oldest until `incoming` fits."""
    now = time.time()
    for user_folder in root.iterdir() if root.is_dir() else []:
        for entry in user_folder.iterdir() if user_folder.is_dir() else []:
            if now - entry.stat().st_mtime > UPLOAD_TTL_S:
                shutil.rmtree(entry, ignore_errors=True)
    if not folder.is_dir():
        return
    pending = sorted(folder.iterdir(), key=lambda entry: entry.stat().st_mtime)
    sizes = {entry: sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) for entry in pending}
    held = sum(sizes.values())
    for entry in pending:
        if held + incoming <= cap:
            break
        shutil.rmtree(entry, ignore_errors=True)
        held -= sizes[entry]


# ---------------------------------------------------------------------------- receiving and keeping an upload

_STORING = threading.Lock()  # one upload stored at a time: the sweep and the cap see whole uploads
_CLEANING = threading.BoundedSemaphore(2)  # uploads cleaned at once: each may hold its bytes in memory


async def receive_files(request: Any, limits: Any, field: str | None = None) -> tuple[Any, list[tuple[str, Any]]]:
    """The multipart form of an upload and its files as (name, binary file) pairs, bounded before anything is read:
    Content-Length at most `limits.max_upload_bytes` (plus multipart headers), at most `limits.max_photos` files.
    `field`: the one form field that may carry files (others are refused, named). UploadRefused otherwise; the caller
    closes the form."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    headers = request.headers
    length = headers.get("content-length")
    if length is None:
        raise UploadRefused(411, "Send a Content-Length header.")
    if not length.isdigit() or int(length) > limits.max_upload_bytes + MULTIPART_SLACK:
        raise UploadRefused(413, f"The upload is larger than {_mib(limits.max_upload_bytes)} in all: choose fewer "
                                 "or smaller photos.")
    if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UploadRefused(400, "Send the files as multipart/form-data.")
    try:
        form = await request.form(max_files=limits.max_photos, max_fields=8)
    except (MultiPartException, HTTPException) as error:
        message = str(getattr(error, "detail", None) or getattr(error, "message", error))
        if "Too many files" in message:
            raise UploadRefused(413, f"More files than this page takes ({limits.max_photos}); choose your best "
                                     f"photos ({photo_range()} work well).") from None
        raise UploadRefused(400, f"The upload could not be read ({message}).") from None
    items = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    strangers = sorted({key for key, _ in items if field is not None and key != field})
    if strangers:
        await form.close()
        raise UploadRefused(422, f"Files in the form field {strangers[0]!r}: send them in the field {field!r}.")
    if not items:
        await form.close()
        raise UploadRefused(400, "The upload holds no file" + (f" (send them in the form field {field!r})."
                                                              if field else "."))
    return form, [(value.filename, value.file) for _, value in items]


def store_upload(training: Any, user: str | None, files: list[tuple[str | None, Any]]) -> list[Path]:
    """Check, clean and keep one upload's files (name, binary file) in `user`'s uploads folder of `training` (the
    TrainingApp: its limits and cache folder); their paths, in order. UploadRefused for what the limits refuse."""
    from .notebook.forms import UPLOAD_MAX_SIDE

    limits = training.limits
    names = [_safe_name(filename) for filename, _ in files]
    if len(files) > limits.max_photos:
        raise UploadRefused(413, f"{len(files)} files is more than this page takes ({limits.max_photos}).")
    wrong = [n for n in names if Path(n).suffix.lower() not in IMAGE_EXTENSIONS | {ZIP_EXTENSION}]
    if wrong:
        raise UploadRefused(415, f"{', '.join(wrong)}: this page takes only {PHOTO_TYPES}.")
    total_pixels = 0

    def count(name: str, size: tuple[int, int]) -> None:
        nonlocal total_pixels
        total_pixels += size[0] * size[1]
        if total_pixels > limits.max_upload_pixels:
            raise UploadRefused(413, f"The photos hold over {limits.max_upload_pixels / 1e6:.0f} megapixels in all, "
                                     f"this page's limit for one upload ({name} goes over it): use fewer or smaller "
                                     "photos (about 2000 px on the long side is plenty).")

    with _CLEANING:
        cleaned, total_bytes = [], 0
        for name, (_, handle) in zip(names, files, strict=True):
            raw = handle.read(limits.max_file_bytes + 1)
            total_bytes += len(raw)
            if len(raw) > limits.max_file_bytes:
                raise UploadRefused(413, f"{name}: larger than {_mib(limits.max_file_bytes)} per file. Resize or "
                                         "re-save it as JPEG first.")
            if total_bytes > limits.max_upload_bytes:
                raise UploadRefused(413, f"The upload is larger than {_mib(limits.max_upload_bytes)} in all: choose "
                                         "fewer or smaller photos.")
            try:
                if Path(name).suffix.lower() == ZIP_EXTENSION:
                    cleaned.append((name, clean_zip(name, raw, limits.max_photo_pixels, count, UPLOAD_MAX_SIDE)))
                else:
                    cleaned.append(clean_photo(name, raw, limits.max_photo_pixels, count, UPLOAD_MAX_SIDE))
            except ImageDataError as error:
                raise UploadRefused(400, f"{error} This page takes only {PHOTO_TYPES}.") from None
    root = Path(training.cache_dir) / UPLOADS_FOLDER
    with _STORING:
        folder = user_uploads(root.parent, user)
        _make_room(root, folder, sum(len(content) for _, content in cleaned), limits.max_upload_bytes)
        paths = []
        for name, content in cleaned:
            entry = folder / secrets.token_hex(16)
            entry.mkdir(parents=True)
            (entry / name).write_bytes(content)
            paths.append(entry / name)
    return paths
