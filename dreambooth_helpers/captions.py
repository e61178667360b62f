"""Per-photo captions: `photo.txt` beside `photo.jpg`, or a `metadata.jsonl` in the photos' folder.

A caption describes one photo in its own words ("sks dog asleep on a red sofa"), so the model learns what is the
subject and what is only that photo's context. The rule that ties a caption to the concept:

- The identifier is the words of the instance prompt that its class prompt lacks ("sks" for "a photo of sks dog"
  and "a photo of dog"). Without a class prompt (no prior preservation) the identifier is the whole instance prompt.
- A caption must contain the identifier (each of its words, as whole words, any case; the whole instance prompt,
  when that is the identifier). With `--captions auto` a caption without it is prefixed: "<instance prompt>, <caption>".
  With `--captions strict` it is an error naming the file. With `--captions off` the captions are not read.
- A photo without a caption trains on the instance prompt, as without captions.

Everything a user can get wrong is refused before any model loads, naming the file: a caption file without its
photo, an empty caption, two captions for one photo, a malformed metadata.jsonl (with its line number). What is read
is bounded before reading: a caption file over MAX_CAPTION_BYTES (the text encoder reads 77 tokens, a few hundred
characters), a metadata.jsonl over MAX_METADATA_BYTES or MAX_METADATA_LINES, a line of it nested deeper than
MAX_METADATA_DEPTH (Python's JSON decoder would recurse into it). A caption
longer than the text encoder reads is counted with the model's tokenizer once it is loaded (check_caption_lengths):
the part past the limit is cut, which is said; a cut that removes the identifier is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .config import CAPTION_MODES  # noqa: F401  (the modes, for callers)
from .data import IMAGE_EXTENSIONS, DatasetReport
from .errors import ImageDataError
from .safe_json import json_depth

CAPTION_EXTENSION = ".txt"
METADATA_FILE = "metadata.jsonl"  # Hugging Face imagefolder's layout: {"file_name": "photo.jpg", "text": "..."}
METADATA_CAPTION_FIELD = "text"  # imagefolder's and diffusers' default caption column
INSERTED_NOTE = "caption without the identifier: the instance prompt was put in front"
MAX_CAPTION_BYTES = 16 * 1024  # the text encoder reads 77 tokens (a few hundred characters): this is far past them
MAX_METADATA_BYTES = 8 * 2**20  # 10,000 photos with a long caption each
MAX_METADATA_LINES = 10_000
MAX_METADATA_DEPTH = 8  # a line is one object; imagefolder's extra columns may hold a list or an object or two
_WORD = re.compile(r"[\w<>'-]+")  # a prompt's words; <sks>-style tokens count as one word


def _words(text: str) -> list[str]:
    return [word.lower() for word in _WORD.findall(text)]


def identifier_of(instance_prompt: str, class_prompt: str | None) -> list[str]:
    """The identifier's words: the instance prompt's words that the class prompt lacks, in order.

    Empty when they cannot be told apart (no class prompt, or no word of difference): then the whole instance
    prompt is what a caption must contain.
    """
    if not class_prompt:
        return []
    class_words = set(_words(class_prompt))
    return [word for word in _words(instance_prompt) if word not in class_words]


def has_identifier(caption: str, instance_prompt: str, identifier: list[str]) -> bool:
    """Whether `caption` names the concept: every identifier word as a whole word, or the whole instance prompt."""
    if identifier:
        return set(identifier) <= set(_words(caption))
    return " ".join(_words(instance_prompt)) in " ".join(_words(caption))


def _clean(text: str) -> str:
    """One line, single spaces: how the text encoder sees it anyway."""
    return " ".join(text.split())


def _is_caption_file(path: Path) -> bool:
    return path.suffix.lower() == CAPTION_EXTENSION and not path.name.startswith(".")


def read_caption_files(folder: str | Path) -> dict[str, tuple[str, str]]:
    """The captions in `folder`: {photo file name: (caption, where it came from)}.

    Raises ImageDataError naming the file for a caption file without a photo, an empty caption, a photo with two
    captions, and a metadata.jsonl that is not one JSON object per line with "file_name" and "text".
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    photos_by_stem: dict[str, list[str]] = {}
    for path in files:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            photos_by_stem.setdefault(path.stem, []).append(path.name)
    photo_names = {name for names in photos_by_stem.values() for name in names}
    captions: dict[str, tuple[str, str]] = {}
    for path in files:
        if not _is_caption_file(path):
            continue
        photos = photos_by_stem.get(path.stem, [])
        if not photos:
            raise ImageDataError(f"{path}: a caption file without a photo (no {path.stem}.jpg, .png or other photo "
                                 "beside it). Name it after its photo (photo.jpg -> photo.txt), remove it, or pass "
                                 "--captions off.")
        if len(photos) > 1:
            raise ImageDataError(f"{path}: {' and '.join(photos)} share this caption file; give each photo its own "
                                 "name so each caption belongs to one photo.")
        captions[photos[0]] = (_caption_text(path, _read_text(path, MAX_CAPTION_BYTES, "a caption file")), path.name)
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        for name, caption, line in _read_metadata(metadata, photo_names):
            if name in captions:
                raise ImageDataError(f"{metadata} line {line}: {name} already has a caption in {captions[name][1]}. "
                                     "Keep one of the two.")
            captions[name] = (caption, f"{METADATA_FILE} line {line}")
    return captions


def _read_text(path: Path, max_bytes: int, what: str) -> str:
    """The text of `path`, refused without reading it all when it is over `max_bytes`."""
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)  # (the size on disk may change, or lie: count what is read)
    except OSError as error:
        raise ImageDataError(f"{path}: cannot be read ({error.strerror or error}).") from None
    if len(data) > max_bytes:
        raise ImageDataError(f"{path}: {_size_of(path, len(data))} is over the {_limit_text(max_bytes)} limit for "
                             f"{what}; the text encoder reads only the first 77 tokens of a caption (a few hundred "
                             "characters). Shorten it, or pass --captions off to train without captions.")
    try:
        return data.decode("utf-8-sig")  # -sig: Notepad's byte-order mark is not part of the caption
    except UnicodeDecodeError:
        raise ImageDataError(f"{path}: not UTF-8 text. Save the caption as UTF-8 (any editor's default).") from None


def _limit_text(size: int) -> str:
    return f"{size // 2**20} MB" if size >= 2**20 else f"{size // 1024} KB"


def _size_of(path: Path, at_least: int) -> str:
    try:
        size = max(path.stat().st_size, at_least)
    except OSError:
        size = at_least
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size:,} bytes"


def _caption_text(where: str | Path, text: str) -> str:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # JSON's "\ud800": half of a UTF-16 pair, no character
        raise ImageDataError(f"{where}: the caption holds a lone surrogate (such as \\ud800), which is no "
                             "character. Write the caption as plain UTF-8 text.") from None
    if size > MAX_CAPTION_BYTES:
        raise ImageDataError(f"{where}: the caption is {len(text):,} characters, over the "
                             f"{_limit_text(MAX_CAPTION_BYTES)} limit for a caption; the text encoder reads only its "
                             "first 77 tokens (a few hundred characters). Shorten it.")
    caption = _clean(text)
    if not caption:
        raise ImageDataError(f"{where}: the caption is empty. Write what the photo shows (with the identifier), or "
                             "remove it so the photo trains on the instance prompt.")
    return caption


def _read_metadata(path: Path, photo_names: set[str]) -> list[tuple[str, str, int]]:
    """(photo name, caption, line number) for each line of a metadata.jsonl."""
    entries, seen = [], {}
    lines = _read_text(path, MAX_METADATA_BYTES, f"a {METADATA_FILE}").splitlines()
    if sum(1 for line in lines if line.strip()) > MAX_METADATA_LINES:
        raise ImageDataError(f"{path}: over {MAX_METADATA_LINES} lines; it holds one line per photo, and a photos "
                             "folder for DreamBooth holds a few dozen. Keep the lines of the photos in this folder.")
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        if json_depth(line) > MAX_METADATA_DEPTH:  # before decoding: Python's decoder recurses into each level
            raise ImageDataError(f"{where}: nested deeper than {MAX_METADATA_DEPTH} levels of lists and objects. "
                                 'Each line must be one object like {"file_name": "photo.jpg", "text": "sks dog"}.')
        try:
            entry: Any = json.loads(line)
        except ValueError as error:
            raise ImageDataError(f"{where}: not valid JSON ({error.msg}). Each line must be one object like "
                                 '{"file_name": "photo.jpg", "text": "sks dog on a beach"}.') from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise ImageDataError(f'{where}: needs a "file_name" with the photo\'s name, as in '
                                 '{"file_name": "photo.jpg", "text": "sks dog on a beach"}.')
        name = entry["file_name"]
        if name not in photo_names:
            raise ImageDataError(f"{where}: {name!r} is not a photo in {path.parent} (names are case-sensitive; "
                                 "photos in subfolders are not read).")
        if not isinstance(entry.get(METADATA_CAPTION_FIELD), str):
            raise ImageDataError(f'{where}: needs the caption as text in "{METADATA_CAPTION_FIELD}" (the caption '
                                 "column of Hugging Face's imagefolder layout).")
        if name in seen:
            raise ImageDataError(f"{where}: {name} already has a caption on line {seen[name]}. Keep one of the two.")
        seen[name] = line_number
        entries.append((name, _caption_text(where, entry[METADATA_CAPTION_FIELD]), line_number))
    return entries


def attach_captions(report: DatasetReport, folder: str | Path, instance_prompt: str, class_prompt: str | None,
                    mode: str = "auto") -> DatasetReport:
    """Give each photo of `report` (read from `folder`) its training caption, in place; returns `report`.

    A photo with a caption file gets it (the instance prompt put in front when the identifier is missing, with a
    note on the photo; an error with `mode` "strict"); the others keep `caption` None, which trains on the instance
    prompt. The caption files themselves are taken off the report's skipped list: they are not photos that failed.
    """
    if mode == "off" or not Path(folder).expanduser().is_dir():
        return report
    captions = read_caption_files(folder)
    identifier = identifier_of(instance_prompt, class_prompt)
    for record in report.images:
        if record.name not in captions:
            continue
        caption, source = captions[record.name]
        if not has_identifier(caption, instance_prompt, identifier):
            if mode == "strict":
                needed = " ".join(identifier) if identifier else instance_prompt
                raise ImageDataError(f"{Path(folder) / source}: the caption of {record.name} does not contain the "
                                     f"identifier {needed!r} (from the instance prompt {instance_prompt!r}). Add "
                                     "it, or pass --captions auto to put the instance prompt in front.")
            caption = f"{instance_prompt}, {caption}"
            record.notes.append(INSERTED_NOTE)
        record.caption = caption
    report.skipped = [s for s in report.skipped if not _is_caption_name(s.name)]
    return report


def check_folder(report: DatasetReport, folder: str | Path) -> DatasetReport:
    """Read `folder`'s captions before the prompts are known (the notebook's photo cell), in place.

    Caption mistakes raise now, naming the file; the caption files leave the skipped list, and a warning says how
    many photos are captioned. The identifier is checked when training attaches them (attach_captions).
    """
    if not Path(folder).expanduser().is_dir():
        return report
    captioned = [name for name in read_caption_files(folder) if name in {r.name for r in report.images}]
    report.skipped = [s for s in report.skipped if not _is_caption_name(s.name)]
    if captioned:
        report.warnings.append(f"{len(captioned)} of {len(report.images)} photo(s) have their own caption; the "
                               "others train on the instance prompt.")
    return report


def _is_caption_name(name: str) -> bool:
    return name == METADATA_FILE or (Path(name).suffix.lower() == CAPTION_EXTENSION and "/" not in name)


def caption_summary(report: DatasetReport) -> str | None:
    """One line on the photos' captions for the run's notices, or None when no photo has one."""
    captioned = [r for r in report.images if r.caption is not None]
    if not captioned:
        return None
    inserted = [r.name for r in captioned if INSERTED_NOTE in r.notes]
    line = (f"Captions: {len(captioned)} of {len(report.images)} photo(s) in {report.source} train on their own "
            "caption, the others on the instance prompt.")
    if inserted:
        line += f" The identifier was missing, so the instance prompt was put in front, in: {', '.join(inserted)}."
    return line


def check_caption_lengths(report: DatasetReport, tokenizer, instance_prompt: str,
                          class_prompt: str | None) -> list[str]:
    """Notices for captions longer than the text encoder reads (`tokenizer.model_max_length`, 77 for CLIP).

    The rest of such a caption is cut, which each notice says, with the token count. A cut that removes the
    identifier is an ImageDataError: the photo would not teach the concept at all.
    """
    limit = tokenizer.model_max_length
    identifier = identifier_of(instance_prompt, class_prompt)
    notices = []
    for record in report.images:
        if record.caption is None:
            continue
        ids = tokenizer(record.caption, truncation=False).input_ids  # with the start and end tokens
        if len(ids) <= limit:
            continue
        kept = tokenizer.decode(ids[1:limit - 1], skip_special_tokens=True)
        if not has_identifier(kept, instance_prompt, identifier):
            raise ImageDataError(f"The caption of {record.name} is {len(ids)} tokens; the text encoder reads the "
                                 f"first {limit} (start and end tokens included), and the identifier lies past them."
                                 " Shorten the caption, or put the identifier near its start.")
        notices.append(f"The caption of {record.name} is {len(ids)} tokens; the text encoder reads the first "
                       f"{limit} (start and end tokens included), so the rest is cut: "
                       f"\"...{tokenizer.decode(ids[limit - 1:-1], skip_special_tokens=True)}\".")
    return notices
