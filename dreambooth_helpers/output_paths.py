"""Checks on where a command will write, made before any model loads.

A wrong --out (an existing file where a folder is wanted, a folder where a file is wanted, a place that cannot
be written) must cost a second, not the minutes of loading a model and making images that are then lost.
The checks create nothing: they look at the path and probe the nearest existing folder with a temporary file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    """`path` itself when it exists, else its closest existing ancestor (where the first new folder would go)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _require_writable_folder(folder: Path, flag: str, given: str) -> None:
    """Refuse unless new files can be made under `folder`, whose nearest existing part must be a folder."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"{flag} {given!r} cannot be made: {str(existing)!r} is a file, not a folder. Choose "
                          "another place.")
    try:
        # The only test that holds everywhere (permissions, read-only mounts, Drive quirks, root): make a file.
        with tempfile.TemporaryFile(dir=existing, prefix=".dreambooth-write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"{flag} {given!r}: cannot write in {str(existing)!r} ({error.strerror or error}). "
                          "Choose a folder you can write to.") from None


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a folder that new files can go into (created later by the writer if missing)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file, not a folder. Give a folder (it is created if missing), "
                          f"e.g. {flag} {str(folder.with_suffix(''))}-images/.")
    _require_writable_folder(folder, flag, str(path))
    return folder


def check_output_file(path: str | Path, flag: str = "--out", suffix: str | None = None) -> Path:
    """`path` as a file that can be written (an existing file is replaced), with the file name ending `suffix`."""
    file = Path(path).expanduser()
    if file.is_dir():
        example = file / f"model{suffix or ''}"
        raise ConfigError(f"{flag} {str(path)!r} is a folder. Give the file to write, e.g. {flag} {example}.")
    if suffix and file.suffix != suffix:
        raise ConfigError(f"{flag} {str(path)!r}: the file name must end in {suffix}.")
    _require_writable_folder(file.parent, flag, str(path))
    return file
