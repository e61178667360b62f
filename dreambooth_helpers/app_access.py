"""What a visitor of the app may reach: base models, the Hub token to publish with, and the text shown back.

- **Base model**: a Hub id (OWNER/NAME, naming no folder next to the app), a built-in model (toy, tiny, tiny-sdxl),
  the operator's own `--model`, or a model folder or file inside a folder the operator allows (`--models-dir`,
  compared as real paths: a symlink that leads out is refused). Never anything else on the server: not another
  user's run, not the work folder, not /etc.
- **Hub token**: the one the visitor typed; the host's (HF_TOKEN or the saved login) only when the operator passed
  `--publish-with-host-token`.
- **Text**: messages and reports name folders relative to the user's space (photos, jobs/...), and any other
  absolute path by its last part only (`public_text`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from .config import TINY_MODEL, TOY_MODEL
from .errors import ConfigError, HubError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
MODELS_LISTED = 10  # model names listed in a refusal
# An absolute path in a message (not a URL's, not a fraction's): its last part is kept, the rest hidden.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~\\-])/(?:[^\s/'\"`<>|;,()\[\]{}]+/)+([^\s/'\"`<>|;,()\[\]{}]*)")


def parse_users(auth: list[str] | None) -> list[tuple[str, str]] | None:
    """["alice:pw", "bob:pw2"] -> [(user, password), ...]; a user named twice is a mistake."""
    from .demo_api import parse_auth

    if not auth:
        return None
    pairs = [parse_auth(text) for text in auth]
    names = [user for user, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError("--auth names the same user twice: give each user one USER:PASS.")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name) or name.strip(".") == "":
            raise ConfigError(f"--auth user {name!r}: use letters, digits, '.', '_' or '-' (it names a folder).")
    return pairs


def built_in_models() -> tuple[str, ...]:
    from .families import TINY_SDXL_MODEL  # imports torch: only when a model is checked

    return TOY_MODEL, TINY_MODEL, TINY_SDXL_MODEL


def models_dirs(folders: Iterable[str | Path] | None, workdir: Path) -> tuple[Path, ...]:
    """The operator's --models-dir folders as real paths. One that is missing, or that holds (or lies in) the
    users' photos or runs, is a mistake said at start."""
    found = []
    for folder in folders or ():
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"--models-dir {folder}: no such folder.")
        for private in (workdir / "jobs", workdir / "users", workdir / "photos", workdir / ".gradio"):
            if path.is_relative_to(private) or private.is_relative_to(path):
                raise ConfigError(f"--models-dir {folder}: it overlaps the work folder's photos and runs "
                                  f"({private}); give a folder that holds only models.")
        found.append(path)
    return tuple(found)


def _inside(model: str, allowed: tuple[Path, ...]) -> Path | None:
    """The real path of `model` (absolute, or a name inside an allowed folder) when it exists inside one."""
    candidates = [Path(model)] if Path(model).is_absolute() else [folder / model for folder in allowed]
    for candidate in candidates:
        try:
            real = candidate.resolve()
            if any(real.is_relative_to(folder) for folder in allowed) and (real.is_dir() or real.is_file()):
                return real
        except (OSError, ValueError, RuntimeError):  # a name too long, a NUL byte, a symlink loop
            continue
    return None


def _names_a_local_path(model: str) -> bool:
    try:
        return os.path.lexists(model)
    except (OSError, ValueError):
        return True


def check_base_model(model: str | None, allowed: tuple[Path, ...], operator_model: str | None = None) -> str:
    """The base model to train for what a visitor typed: the text itself (a built-in model, the operator's, a
    Hub id), or the real path of a model inside an allowed folder. Anything else: ConfigError saying what is."""
    model = (model or "").strip()
    if model in built_in_models() or (operator_model and model == operator_model):
        return model
    local = _inside(model, allowed) if model else None
    if local is not None:
        return str(local)
    if HUB_ID.fullmatch(model) and ".." not in model and not _names_a_local_path(model):
        return model
    raise ConfigError(allowed_models_text(model, allowed))


def allowed_models_text(model: str, allowed: tuple[Path, ...]) -> str:
    shown = model if len(model) <= 100 else model[:100] + "..."
    text = (f"Base model {shown!r}: this app trains only on a Hub id (OWNER/NAME, e.g. "
            f"stable-diffusion-v1-5/stable-diffusion-v1-5), a built-in model ({', '.join(built_in_models())})")
    if not allowed:
        return (f"{text}. Folders and files on the server are not offered (the operator can allow model folders "
                "with --models-dir).")
    names: set[str] = set()
    for folder in allowed:
        try:
            names |= {entry.name for entry in folder.iterdir()
                      if not entry.name.startswith(".") and _inside(entry.name, allowed) is not None}
        except OSError:
            continue
    ordered = sorted(names)
    listed = ", ".join(ordered[:MODELS_LISTED]) + (", ..." if len(ordered) > MODELS_LISTED else "")
    return (f"{text}, or a model from this app's model folders ({listed or 'none there yet'}). No other folder "
            "or file on the server.")


def publish_token(typed: str | None, allow_host_token: bool) -> str:
    """The token to publish with: the typed one; the host's (HF_TOKEN, else the saved login) only when allowed."""
    typed = (typed or "").strip()
    if typed:
        return typed
    if allow_host_token:
        from . import hub  # its get_token: HF_TOKEN, else the saved login

        host = os.environ.get("HF_TOKEN", "").strip() or (hub.get_token() or "").strip()
        if host:
            return host
    where = "" if allow_host_token else (" This app does not publish with its host's own token (its operator can "
                                         "allow that with --publish-with-host-token).")
    raise HubError("No Hugging Face token: paste a token with write access (https://huggingface.co/settings/tokens) "
                   f"into the token field. It is used for this upload only and never stored.{where}")


def public_text(text: str, workdir: Path | None = None) -> str:
    """`text` without server paths: the work folder's own paths relative to the user's space (photos,
    jobs/ID/...), any other absolute path as its last part ("…/name")."""
    if workdir is not None:
        root, end = re.escape(str(workdir)), r"(?=[\s'\"),.;:]|$)"
        text = re.sub(rf"{root}/users/[^/\s'\"]+/", "", text)
        text = re.sub(rf"{root}/users/[^/\s'\"]+{end}", "your folder", text)
        text = re.sub(rf"{root}/", "", text)
        text = re.sub(rf"{root}{end}", "the work folder", text)
    return ABSOLUTE_PATH.sub(lambda found: f"…/{found.group(1)}", text)
