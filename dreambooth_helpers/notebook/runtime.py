"""Where the notebook runs: Colab or not, smoke test or not, the GPU, Google Drive, the Hub login, and how
errors read in a notebook.

Smoke mode (DREAMBOOTH_HELPERS_SMOKE=1) makes the notebook run unattended in a few minutes on a CPU: the
offline toy model, the sample subject, a handful of steps, no Drive, no login, nothing pushed. The
environment is read once, by `detect_runtime()` in the notebook's first library cell; every other
function takes the resulting `NotebookRuntime`, so tests pass one in instead of setting variables.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DreamBoothError

SMOKE_VARIABLE = "DREAMBOOTH_HELPERS_SMOKE"
SMOKE_OUTPUT_VARIABLE = "DREAMBOOTH_HELPERS_SMOKE_OUTPUT"
SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COLAB_OUTPUT_ROOT = "/content/outputs"
DRIVE_MOUNT_POINT = "/content/drive"
DRIVE_OUTPUT_ROOT = "/content/drive/MyDrive/dreambooth-helpers"
HF_TOKEN_SECRET = "HF_TOKEN"
NO_GPU_ADVICE = ("In Colab: Runtime > Change runtime type > Hardware accelerator: T4 GPU > Save, then run the "
                 "notebook again from the top. Training Stable Diffusion on a CPU would take days.")


@dataclass(frozen=True)
class NotebookRuntime:
    """What the notebook runs in, decided once."""

    colab: bool  # Google Colab: its upload button, Drive, secrets and forms
    smoke: bool  # an unattended test run on a CPU (DREAMBOOTH_HELPERS_SMOKE=1)
    smoke_output: str = "outputs/notebook-smoke"


def detect_runtime() -> NotebookRuntime:
    """Read the environment once: Colab (its module is imported by the runtime itself) and smoke mode."""
    return NotebookRuntime(colab="google.colab" in sys.modules,
                           smoke=os.environ.get(SMOKE_VARIABLE, "") == "1",
                           smoke_output=os.environ.get(SMOKE_OUTPUT_VARIABLE, "outputs/notebook-smoke"))


def smoke_model(base_model: str | None = None) -> str:
    """The model smoke runs use: for an SDXL base-model choice (choices.py) "tiny-sdxl"; else the shipped offline
    "toy" model, or "tiny" in a checkout that lacks its weights."""
    from .. import choices, models

    if base_model is not None and choices.offline_model(base_model) != models.TOY_MODEL:
        return choices.offline_model(base_model)
    return models.TOY_MODEL if (models.TOY_MODEL_DIR / "unet").is_dir() else models.TINY_MODEL


def choose_base_model(requested: str, runtime: NotebookRuntime, base_model: str | None = None) -> str:
    """The base model to train: `requested`; when it is empty, the model of the form's `base_model` choice
    (choices.py); in smoke mode, the small offline model of that choice's family."""
    if runtime.smoke:
        return smoke_model(base_model)
    if requested and requested.strip():
        return requested.strip()
    if base_model is not None:
        from ..choices import base_model_choice

        return base_model_choice(base_model).model
    raise ConfigError(f"BASE_MODEL is empty: use {SD15_MODEL!r} (Stable Diffusion 1.5).")


# ---------------------------------------------------------------------------- the GPU


@dataclass
class GpuStatus:
    available: bool
    name: str | None
    memory_gib: float | None
    message: str


def gpu_status(runtime: NotebookRuntime, cuda_available: bool | None = None, name: str | None = None,
               memory_bytes: int | None = None) -> GpuStatus:
    """What GPU this runtime has, with a message for the notebook (arguments override detection, for tests)."""
    import torch

    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        message = f"No GPU found. {NO_GPU_ADVICE}"
        if runtime.smoke:
            message += " (Smoke test: the small offline model trains on the CPU.)"
        return GpuStatus(False, None, None, message)
    if name is None:
        name = torch.cuda.get_device_name(0)
    if memory_bytes is None:
        memory_bytes = torch.cuda.get_device_properties(0).total_memory
    memory = round(memory_bytes / 2**30, 1)
    message = f"GPU: {name}, {memory:g} GiB."
    if memory < 10:
        message += (" That is less than a T4's 15 GiB: pick the 'low-memory' preset or tick LoRA in the settings, "
                    "or switch to a T4 runtime.")
    else:
        message += " Enough for the 't4' preset (full fine-tune of UNet and text encoder)."
    return GpuStatus(True, name, memory, message)


# ---------------------------------------------------------------------------- Drive


def mount_drive(wanted: bool, runtime: NotebookRuntime) -> Path | None:
    """Mount Google Drive when asked (and in Colab); returns the output root on Drive, or None."""
    if not wanted or runtime.smoke:
        return None
    if not runtime.colab:
        print("Google Drive can only be mounted in Colab; outputs stay on this machine.")
        return None
    from google.colab import drive

    drive.mount(DRIVE_MOUNT_POINT)
    root = Path(DRIVE_OUTPUT_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    return root


def output_root(runtime: NotebookRuntime, drive_root: Path | None = None) -> Path:
    """Where runs are written: Drive when mounted, /content/outputs in Colab, ./outputs elsewhere."""
    if drive_root is not None:
        return Path(drive_root)
    if runtime.smoke:
        return Path(runtime.smoke_output)
    return Path(COLAB_OUTPUT_ROOT) if runtime.colab else Path("outputs")


def free_bytes(folder: str | Path) -> int:
    """Free space where `folder` lives (on a mounted Drive: what is left of the account's storage)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


# ---------------------------------------------------------------------------- the Hub login


def colab_secret(runtime: NotebookRuntime, name: str = HF_TOKEN_SECRET) -> str | None:
    """The value of a Colab secret, or None when not in Colab, not set, or access not granted."""
    if not runtime.colab:
        return None
    try:
        from google.colab import userdata

        value = userdata.get(name)
    except Exception:  # SecretNotFoundError, NotebookAccessError, TimeoutException: all mean "no token here"
        return None
    return value.strip() if isinstance(value, str) and value.strip() else None


NOT_LOGGED_IN = ("No Hugging Face token found. Publishing needs a token with write access "
                 "(https://huggingface.co/settings/tokens). Add it as the Colab secret HF_TOKEN (key icon in the "
                 "left bar; allow this notebook to read it), or tick SIGN_IN_HERE to sign in with a code in this "
                 "cell. Then run this cell again.")


def hub_login(runtime: NotebookRuntime, sign_in: bool = False, secret_name: str = HF_TOKEN_SECRET) -> str:
    """Make sure the Hub client has a token; returns what happened. The token is never shown or stored here.

    Order: an existing login (huggingface_hub also reads the HF_TOKEN environment variable and, in
    Colab, the HF_TOKEN secret by itself); the Colab secret, read explicitly for older clients; and only
    when `sign_in` is ticked, `notebook_login()`, which blocks the cell until the user signs in (up to 15
    minutes with the device-code flow): never part of "Run all" by default.
    """
    from huggingface_hub import get_token, login

    if get_token():
        return f"Using your Hugging Face login{_as_user()}."
    token = colab_secret(runtime, secret_name)
    if token:
        login(token=token, add_to_git_credential=False)
        del token
        return f"Logged in with the Colab secret {secret_name}{_as_user()}."
    if not sign_in:
        raise ConfigError(NOT_LOGGED_IN)
    from huggingface_hub import notebook_login

    notebook_login()
    if not get_token():
        raise ConfigError(NOT_LOGGED_IN)
    return f"Logged in{_as_user()}."


def hub_username() -> str | None:
    """The logged-in user's name, or None (not logged in, or no network)."""
    try:
        from huggingface_hub import whoami

        return whoami()["name"]
    except Exception:  # not logged in or no network: the caller asks the user for a name instead
        return None


def _as_user() -> str:
    name = hub_username()
    return f" as {name}" if name else ""


# ---------------------------------------------------------------------------- errors in the notebook's words

# The library's messages name command-line flags. In the notebook the same settings are form fields or cells.
NOTEBOOK_WORDS = {
    "--resume latest": "a rerun of the training cell (it continues from the newest checkpoint)",
    "--no-train-text-encoder": "untick 'Train the text encoder too' in the settings form",
    "--train-text-encoder": "'Train the text encoder too' in the settings form",
    "--lora": "the 't4-lora' preset (or tick LoRA) in the settings form",
    "--preset low-memory": "the 'low-memory' preset in the settings form",
    "--preset": "'Preset' in the settings form",
    "--learning-rate": "'Learning rate' in the settings form",
    "--max-train-steps": "'Steps' in the settings form",
    "--num-class-images": "'Class images' in the settings form",
    "--no-prior-preservation": "'Class images' set to 0 in the settings form",
    "--instance-dir": "the photos you chose in section 3",
    "--remove-bars": "`REMOVE_BARS` ticked in section 3",
    "--model": "BASE_MODEL",
    "--checkpoint-every N": "Google Drive (section 2), where checkpoints are kept for resuming",
    # Generation (out-of-memory advice): options of the cell that loads the trained model.
    "--attention-slicing": "`attention_slicing=True` in `widgets.load_trained_model(...)`",
    "--vae-tiling": "`vae_tiling=True` in `widgets.load_trained_model(...)`",
}
# A flag, and its value when it is a number or one of the words messages use as values.
_FLAG = re.compile(r"--[a-z][a-z0-9-]*(?: (?:latest|low-memory|bf16|fp16|pad|center|N|\d[\d.e-]*\b))?")


def in_notebook_words(message: str) -> str:
    """`message` with command-line flags replaced by the notebook's names for the same settings.

    A flag the notebook has no field for becomes the line to add to the configuration cell, e.g.
    `--max-grad-norm 0` -> `config = config.replace(max_grad_norm=0)`.
    """
    def replace(match: re.Match) -> str:
        flag, _, value = match.group(0).partition(" ")
        if match.group(0) in NOTEBOOK_WORDS:
            return NOTEBOOK_WORDS[match.group(0)]
        if flag in NOTEBOOK_WORDS:
            return NOTEBOOK_WORDS[flag] + (f" {value}" if value else "")
        field = flag[2:].removeprefix("no-").replace("-", "_")
        if flag.startswith("--no-"):
            value = "False"
        elif value and not value[0].isdigit():
            value = repr(value)
        return f"`config = config.replace({field}={value or '...'})` in the configuration cell"

    return _FLAG.sub(replace, message)


def quiet_library_output() -> None:
    """For this notebook's process: no loading bars from diffusers/transformers (they sit at 0% while a shard
    loads and look stuck; the cells say what they load instead), and no warnings that ask the user for nothing
    (bitsandbytes' note about an optional CPU kernel package). Errors still show."""
    import logging

    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def show_errors_plainly() -> None:
    """In IPython, show a DreamBoothError as its message alone, in the notebook's words: it says what to fix; a
    traceback only hides it. The cell still fails (so "Run all" stops there); other exceptions keep their
    full traceback."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def handler(shell, etype, value, tb, tb_offset=None):
        # IPython discards what a custom handler returns for errors raised by a cell: print it ourselves.
        print(f"{etype.__name__}: {in_notebook_words(str(value))}", file=sys.stderr)
        return []

    shell.set_custom_exc((DreamBoothError,), handler)


def check_can_train(config) -> None:
    """Refuse, before class images are drawn, a run this machine cannot do: a real model on a CPU (days), or one
    that does not fit the GPU's memory. The same check `train()` makes first, so the messages are the CLI's."""
    from ..training import resolve_runtime

    resolve_runtime(config)
