"""Publishing a trained model to the Hugging Face Hub, with a model card.

`push_to_hub(model_dir, repo_id)` writes the model card (`README.md`) and a grid of the last step's samples
(`grid.png`) into the model folder, creates the repository and uploads from the model folder itself, in one
commit, selecting with allow/ignore patterns what belongs in the repository (the diffusers model or the LoRA
weights, the card, the grid): nothing is copied. Checkpoints, class images, optimizer state, samples and the
training summary (which holds local paths) stay behind. The card (model_card.py) states what the run used, as
its training summary records it, not what its config asked for.

The token comes from the saved login (`hf auth login`, `huggingface_hub.login()`), from the
`token` argument, or from HF_TOKEN via `token_from_env()`; it is only ever handed to
`huggingface_hub`, never printed or written.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from .errors import HubError, ModelLoadError, RepoExistsError
from .files import CARD_FILE, GRID_FILE, LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SAMPLES_DIR, SUMMARY_FILE
from .inference import image_grid, read_training_summary
from .model_card import _is_lora_run, build_model_card, check_repo_id, describe_training  # noqa: F401 (as hub.*)

# Inside a diffusers folder, only configs, tokenizer files and safetensors weights are published.
PUBLISHED_SUFFIXES = {".json", ".txt", ".safetensors", ".model"}
UNSAFE_WEIGHT_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth"}
# Never uploaded, whatever else matches: pickles, training leftovers (checkpoints, samples, class images, reports),
# the training summary (it holds local paths), and hidden files (partial writes, caches).
IGNORED_PATTERNS = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.pickle", "checkpoint-*", "*/checkpoint-*",
                    "checkpoints/*", f"{SAMPLES_DIR}/*", "class_images/*", "evaluation/*", SUMMARY_FILE, ".*", "*/.*",
                    "*.tmp"]
COMPONENT_NAME = re.compile(r"^\w+$")  # a diffusers component folder (unet, text_encoder): no glob characters
SAMPLE_NAME = re.compile(r"step-(?P<step>\d+)-(?P<index>\d+)\.png")  # training._save_samples' names
MAX_GRID_IMAGES = 4


def token_from_env(variable: str = "HF_TOKEN") -> str:
    """The token in the environment variable HF_TOKEN (the CLI's --token-from-env)."""
    token = os.environ.get(variable, "").strip()
    if not token:
        raise HubError(f"--token-from-env: the environment variable {variable} is not set. Set it to a Hugging Face "
                       "token with write access (https://huggingface.co/settings/tokens), or log in with "
                       "`hf auth login` and drop --token-from-env.")
    return token


def _require_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise HubError("Not logged in to the Hugging Face Hub. Run `hf auth login` (or in a notebook "
                       "`huggingface_hub.login(token=...)`, e.g. with a token from Colab's secrets), or set HF_TOKEN "
                       "and pass --token-from-env. The token needs write access.")
    return token


# ---------------------------------------------------------------------------- what the repository gets


def upload_patterns(model_dir: str | Path) -> tuple[list[str], list[str]]:
    """(allow_patterns, ignore_patterns) that pick, from the model folder itself, exactly what the repository gets:
    the diffusers model or the LoRA weights, plus the card and grid push writes next to them.

    Patterns, not copies: a 2-4 GB model on Google Drive is uploaded from where it lies. Checks the folder first
    (a component listed in model_index.json but missing, weights only as pickles) so nothing is created on the
    Hub for a folder that cannot be published.
    """
    model_dir = Path(model_dir)
    if _is_lora_run(model_dir):
        return [LORA_WEIGHTS_FILE, CARD_FILE, GRID_FILE], IGNORED_PATTERNS
    index = json.loads((model_dir / MODEL_INDEX_FILE).read_text())
    # Components are the entries that name a (library, class) pair; the others are pipeline settings.
    components = [name for name, value in index.items()
                  if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None]
    allow = [MODEL_INDEX_FILE, CARD_FILE, GRID_FILE]
    for component in components:
        folder = model_dir / component
        if not COMPONENT_NAME.match(component) or not folder.is_dir():
            raise ModelLoadError(f"{str(folder)!r} is missing but {MODEL_INDEX_FILE} lists it: the model folder is "
                                 "incomplete. Save the model again (training writes it at the end).")
        suffixes = {f.suffix for f in folder.rglob("*") if f.is_file()}
        if ".safetensors" not in suffixes and suffixes & UNSAFE_WEIGHT_SUFFIXES:
            raise ModelLoadError(f"{str(folder)!r} holds weights only as pickle files (.bin). Re-save the model with "
                                 "safetensors (`pipe.save_pretrained(folder, safe_serialization=True)`), then push.")
        allow += [f"{component}/*{suffix}" for suffix in sorted(PUBLISHED_SUFFIXES)]
    return allow, IGNORED_PATTERNS


def published_files(model_dir: str | Path) -> list[str]:
    """The paths (relative, sorted) that `upload_patterns` selects in `model_dir`, with huggingface_hub's own
    matching, so this is the list upload_folder sends. README.md and grid.png are listed once push wrote them."""
    model_dir = Path(model_dir)
    allow, ignore = upload_patterns(model_dir)
    paths = [p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(paths, allow_patterns=allow, ignore_patterns=ignore))


def final_samples(model_dir: str | Path) -> list[Path]:
    """The sample images of the run's last sampled step (at most MAX_GRID_IMAGES, in prompt order).

    The step comes from the training summary's history (the files each step drew) or, for summaries without
    one, from the file names (samples/step-000400-0.png): never from file dates, which a copy to Drive or a
    resumed run reorders, and never mixing steps.
    """
    model_dir = Path(model_dir)
    folder = model_dir / SAMPLES_DIR
    summary = read_training_summary(model_dir) or {}
    history = summary.get("history")
    if isinstance(history, list) and history:
        drawn = [h.get("samples") for h in history if isinstance(h, dict) and h.get("samples")]
        # Logged paths are where the run wrote them; the folder may have moved since, so look them up by name.
        found = [folder / Path(path).name for path in drawn[-1]] if drawn else []
        return [path for path in found if path.is_file()][:MAX_GRID_IMAGES]
    by_step: dict[int, list[tuple[int, Path]]] = {}
    for path in folder.glob("*.png"):
        match = SAMPLE_NAME.fullmatch(path.name)
        if match:
            by_step.setdefault(int(match["step"]), []).append((int(match["index"]), path))
    if not by_step:
        return []
    step = summary.get("steps") if summary.get("steps") in by_step else max(by_step)
    return [path for _, path in sorted(by_step[step])][:MAX_GRID_IMAGES]


def _card_and_grid(model_dir: Path, repo_id: str, license: str | None) -> dict[str, bytes]:
    """README.md (and grid.png, when the run drew samples) as bytes: what push adds next to the model."""
    files = {}
    samples = final_samples(model_dir)
    if samples:
        images = []
        for path in samples:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        buffer = io.BytesIO()
        image_grid(images, cols=len(images)).save(buffer, format="PNG")
        files[GRID_FILE] = buffer.getvalue()
    card = build_model_card(model_dir, repo_id, has_grid=bool(samples), license=license)
    files[CARD_FILE] = str(card).encode("utf-8")
    return files


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a push cut short never leaves half a README.md in the model folder."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as file:
        file.write(data)
    try:
        os.replace(file.name, path)
    except BaseException:
        Path(file.name).unlink(missing_ok=True)
        raise


def stage_for_upload(model_dir: str | Path, staging_dir: str | Path, repo_id: str,
                     license: str | None = None) -> list[str]:
    """A look at what push would publish, without publishing (the notebook's smoke mode): fills `staging_dir` with
    the selected files (hard links where possible), the card and the grid; returns the relative paths, sorted.
    `push_to_hub` itself uploads from the model folder and copies nothing."""
    model_dir, staging = Path(model_dir), Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    added = _card_and_grid(model_dir, repo_id, license)
    for relative in published_files(model_dir):
        if relative not in added:
            _place(model_dir / relative, staging / relative)
    for name, data in added.items():
        (staging / name).write_bytes(data)
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ---------------------------------------------------------------------------- the upload


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, *,
                license: str | None = None, commit_message: str | None = None, exist_ok: bool = True) -> str:
    """Create `repo_id` (if needed) and upload the trained model in `model_dir` with its card; returns the URL.
    With `exist_ok=False` a repository that exists already is left alone: RepoExistsError, nothing uploaded.

    Uploads from `model_dir` itself, selected by `upload_patterns` (no staging copy), in one commit. The card
    (README.md) and sample grid (grid.png) are first written into the model folder, atomically; when the folder is
    read-only they follow in a second commit. Without `token`, the saved login is used; with neither, this refuses
    before touching the network. A Hub that cannot be reached or refuses is a HubError that says what to do.
    """
    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    allow, ignore = upload_patterns(model_dir)  # a wrong folder is reported before anything is created on the Hub
    token = _require_token(token)
    added = _card_and_grid(model_dir, repo_id, license)
    count = len(set(published_files(model_dir)) | set(added))
    api = HfApi(token=token)
    step = "create the repository"
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=exist_ok)
        step = "upload the model"
        unwritten = _write_next_to_model(model_dir, added)
        api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), repo_type="model", allow_patterns=allow,
                          ignore_patterns=ignore,
                          commit_message=commit_message or f"Upload DreamBooth model ({count} files)")
        if unwritten:
            step = "upload the model card"
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
                          for name, data in unwritten.items()]
            api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                              commit_message="Add the model card")
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 409 and not exist_ok and step == "create the repository":
            raise RepoExistsError(f"{repo_id!r} already exists on the Hub: nothing was uploaded to it.") from None
        raise HubError(_hub_refused(repo_id, error, step, token)) from None
    except _network_errors() as error:
        raise HubError(_hub_unreachable(api, repo_id, error, step, token)) from None
    return str(url)


def _write_next_to_model(model_dir: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write the card and grid into the model folder; returns those it could not write (a read-only folder)."""
    unwritten = {}
    for name, data in files.items():
        try:
            _write_atomically(model_dir / name, data)
        except OSError:
            unwritten[name] = data
    return unwritten


# ---------------------------------------------------------------------------- when the Hub cannot be reached


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which huggingface_hub says the Hub could not be reached.

    OSError covers OfflineModeIsEnabled, requests' errors (huggingface_hub < 1.0), sockets and TimeoutError. The
    httpx family (huggingface_hub 1.x uses httpx, later versions httpx2) raises its own HTTPError, no OSError.
    """
    found: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _hidden(text: str, token: str) -> str:
    """`text` without the token: error texts come from servers and libraries, and must not carry it."""
    return text.replace(token, "hf_***") if token else text


def _hub_unreachable(api: HfApi, repo_id: str, error: BaseException, step: str, token: str) -> str:
    if isinstance(error, OfflineModeIsEnabled):
        return ("Cannot publish: huggingface_hub is in offline mode (the environment variable HF_HUB_OFFLINE is "
                "set). Unset it (`unset HF_HUB_OFFLINE` in a shell; in a notebook, remove what sets it and restart the "
                "runtime: huggingface_hub reads it once, when imported) and run push again.")
    if isinstance(error, OSError) and error.filename is not None:  # the local side: a file of the model folder
        return (f"Reading {error.filename!r} for the upload to {repo_id!r} failed ({error.strerror or error}). Check "
                "that the model folder is still there (on Colab: is Google Drive still mounted?), then run push again.")
    what = "timed out" if "timeout" in type(error).__name__.lower() or isinstance(error, TimeoutError) else "failed"
    reason = _hidden(str(error).strip().splitlines()[0] if str(error).strip() else "", token)
    done = ("Nothing was published." if step == "create the repository" else
            f"The repository {repo_id!r} may exist but is incomplete; push again to finish it.")
    return (f"Could not reach the Hugging Face Hub at {api.endpoint}: the attempt to {step} {what} "
            f"({type(error).__name__}{': ' + reason if reason else ''}). {done} Check the internet connection (and "
            "HF_ENDPOINT or proxy settings, if you set any), then run push again.")


def _hub_refused(repo_id: str, error: HfHubHTTPError, step: str, token: str) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return ("The Hugging Face Hub refused the token (401): it is invalid or expired. Log in again with "
                "`hf auth login` or set a new HF_TOKEN.")
    if status == 403:
        return (f"The token may not write to {repo_id!r} (403). Use a token with write access, and a USER/NAME "
                "where USER is you or an organisation you can write to.")
    if status == 429:
        return "The Hugging Face Hub is rate-limiting this account (429). Wait a few minutes, then run push again."
    said = getattr(error, "server_message", None)
    said = f" The Hub said: {_hidden(said.strip(), token)}" if isinstance(said, str) and said.strip() else ""
    if isinstance(status, int) and status >= 500:
        return (f"The Hugging Face Hub failed to {step} for {repo_id!r} (HTTP {status}): a problem on its side."
                f"{said} Try again in a few minutes (https://status.huggingface.co).")
    return (f"The Hugging Face Hub refused to {step} for {repo_id!r}: {type(error).__name__} (HTTP {status})."
            f"{said} Check the repository name and the token, then run push again.")
