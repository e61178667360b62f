"""The memory planner: pick the fastest settings that fit the GPU, or refuse before the model loads.

A DreamBooth step's peak GPU memory is, to a good approximation, a sum of terms we can count:

    static      = trainable weights (fp32) + frozen weights on the GPU (fp16/bf16) + optimizer states
    peak        = static + max(activations,  gradients + tail)

`activations` is what the forward pass keeps for the backward pass; it is largest when the backward
pass starts. Gradients appear as the backward pass frees activations, so the two mostly do not
coexist, except for a `tail`: the full-resolution input blocks of the UNet run last in the backward
pass and still hold their activations when nearly all gradients exist. Applying the optimizer step
inside the backward pass (`step_in_backward`) replaces `gradients` by the largest single gradient.

Weights, gradients and optimizer states are exact byte counts from parameter counts. Activations and
the tail are per-image constants at 512 px, fitted to the anchor runs in ../shared/README.md (the
diffusers scripts on an SD 1.5-shaped model); they must be re-fitted on `benchmarks/train_memory_speed.py`
measurements of this project's own loop, which aim to be within 15% of measured peaks. docs/memory.md
explains each constant.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from .config import TINY_MODEL, TOY_MODEL, TrainConfig, step_in_backward_allowed
from .errors import ConfigError
from .families import LORA_TARGETS_TEXT, LORA_TARGETS_UNET, SDXL, TINY_SDXL_MODEL, family_of
from .models import load_components

GIB = 2**30

# Activation memory per training image at 512 px (64x64 latents), fp16 autocast, SDPA attention, SD 1.x
# UNet, keyed by (UNet weights trainable, gradient checkpointing). Frozen UNet (LoRA): the anchors' LoRA
# peaks minus 2.0 GiB of fp16 weights, over 2 images (4.28 -> 1.14, 3.73 -> 0.865). A trainable UNet also
# keeps every conv/linear input for its weight gradient; the anchors cannot separate that term (their
# peak is at the end of the backward pass), so it is set 1.3x the frozen figure until measured.
ACTIVATION_GIB_PER_IMAGE = {
    (False, False): 1.14,
    (False, True): 0.865,
    (True, False): 1.50,
    (True, True): 1.12,
}
# Activations still held when the last UNet gradient is written, per image at 512 px: the full
# fine-tune anchors' peak minus weights, 8-bit Adam states and gradients (9.33 -> 0.94 and 8.90 -> 0.51
# GiB over 2 images), keyed by gradient checkpointing.
TAIL_GIB_PER_IMAGE = {False: 0.47, True: 0.255}
# Text encoder activations per image when it trains (77 tokens, 12 layers): small next to the UNet's.
TEXT_ACTIVATION_GIB_PER_IMAGE = 0.02
# The caching allocator reserves more than it hands out (fragmentation): the anchors' reserved/allocated
# ratio is 1.02-1.24, highest without checkpointing.
RESERVED_PER_ALLOCATED = 1.15
# Kept free on top of the reserved estimate: cuBLAS/cuDNN workspaces and autotuning, kernels loaded late.
WORKSPACE_GIB = 0.3
# Optimizer state bytes per trainable parameter. bitsandbytes keeps two 8-bit moments for tensors of
# 4096+ elements, 32-bit moments for smaller ones (most LoRA matrices); AdamW keeps two fp32 moments.
ADAM8_STATE_BYTES, ADAM8_SMALL_TENSOR = 2, 4096
ADAM_STATE_BYTES = 8
SD_RESOLUTION = 512
SD15_BLOCK_CHANNELS = (320, 640, 1280, 1280)


@dataclass(frozen=True)
class ModelSize:
    """What the estimator needs to know about a model: parameter counts and the UNet's width."""

    unet: int
    text_encoder: int
    vae: int
    unet_lora_per_rank: int  # LoRA parameters per unit of rank: sum of in+out features of the target layers
    text_lora_per_rank: int
    largest_tensor: int  # elements of the largest trainable tensor (the gradient step_in_backward keeps)
    activation_scale: float = 1.0  # activations relative to SD 1.x's UNet at the same latent size
    native_resolution: int = SD_RESOLUTION
    checkpointed_activation_scale: float | None = None  # the same with gradient checkpointing (None: as above)


# Stable Diffusion 1.x (1.4, 1.5 and their fine-tunes share these shapes). Counted from
# models.build_sd15_shaped_components; tests/test_memory.py checks them against the model on the meta device.
SD1_SIZE = ModelSize(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863, unet_lora_per_rank=199_296,
                     text_lora_per_rank=73_728, largest_tensor=37_945_344)


# SDXL base 1.0, counted from families.sdxl.build_real_shaped_parts on the meta device (tests/test_memory.py checks
# them). Activations: saved-tensor bytes of a forward pass counted on the meta device (benchmarks/sdxl_activations.py)
# are 4.41x SD 1.5's at 512 px without gradient checkpointing and 2.31x with it, for SDXL at 1024 px (4x the latent
# pixels); the scales below are those ratios over the 4x. Not yet checked against a GPU run.
SDXL_SIZE = ModelSize(unet=2_567_463_684, text_encoder=123_060_480 + 694_659_840, vae=83_653_863,
                      unet_lora_per_rank=1_451_520, text_lora_per_rank=73_728 + 327_680, largest_tensor=63_242_240,
                      activation_scale=4.41 / 4, native_resolution=1024, checkpointed_activation_scale=2.31 / 4)


def model_size(components) -> ModelSize:
    """Count a loaded (or meta-device) model's parameters, so any SD 1.x-like model can be planned."""
    def count(module):
        return sum(p.numel() for p in module.parameters())

    def lora_per_rank(module, targets):
        return sum(m.in_features + m.out_features for name, m in module.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.endswith(targets))

    channels = tuple(components.unet.config.block_out_channels)
    layers = components.unet.config.layers_per_block
    # Activations grow with the channels at each level and the layers per level (SD 1.x: 2).
    scale = sum(channels) / sum(SD15_BLOCK_CHANNELS) * layers / 2
    largest = max(p.numel() for m in (components.unet, components.text_encoder) for p in m.parameters())
    return ModelSize(count(components.unet), count(components.text_encoder), count(components.vae),
                     lora_per_rank(components.unet, LORA_TARGETS_UNET),
                     lora_per_rank(components.text_encoder, LORA_TARGETS_TEXT), largest, scale,
                     getattr(components, "native_resolution", SD_RESOLUTION))


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of one training step, in bytes, by where it goes."""

    weights: int
    optimizer_states: int
    gradients: int
    activations: int
    tail: int
    peak_allocated: int
    peak_reserved: int  # what the caching allocator will hold: what must fit in the free memory

    def gib(self) -> dict[str, float]:
        return {name: round(value / GIB, 3) for name, value in self.__dict__.items()}


@dataclass(frozen=True)
class MemorySettings:
    """The levers the planner turns, fastest first in `candidate_settings`."""

    gradient_checkpointing: bool
    step_in_backward: bool

    def describe(self) -> str:
        checkpointing = "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing"
        return checkpointing + (", optimizer step inside backward" if self.step_in_backward else "")


@dataclass(frozen=True)
class MemoryPlan:
    settings: MemorySettings
    estimate: MemoryEstimate
    free_bytes: int
    reason: str  # one line for the user: what was chosen and why
    precision: str = "fp16"
    use_8bit_adam: bool = True  # False also when bitsandbytes failed to load (the run uses plain AdamW)


# ---------------------------------------------------------------------------- what the GPU and its libraries can do

# bf16 runs in hardware from compute capability 8.0 (A100, L4, RTX 30xx and newer).
BF16_MIN_CAPABILITY = (8, 0)


def bf16_in_hardware() -> bool:
    """Whether the current CUDA GPU computes in bf16 natively.

    torch.cuda.is_bf16_supported() also counts emulation, so it answers True on a T4 (sm_75), where bf16
    matmuls are emulated and several times slower than fp16: the compute capability is the honest test.
    """
    return tuple(torch.cuda.get_device_capability()) >= BF16_MIN_CAPABILITY


def bitsandbytes_failure() -> str | None:
    """None when bitsandbytes imports; else why not ("ModuleNotFoundError: No module named 'bitsandbytes'").

    Its import also sets up its CUDA library, so a wheel built for another CUDA fails here, not mid-run.
    """
    try:
        importlib.import_module("bitsandbytes")
    except Exception as error:  # missing, or its CUDA setup failed: both mean no 8-bit AdamW
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return None


def plain_adam_extra_bytes(config: TrainConfig, size: ModelSize = SD1_SIZE) -> int:
    """GPU memory plain AdamW's fp32 moments take beyond 8-bit AdamW's, for this run's trainable weights."""
    settings = MemorySettings(config.gradient_checkpointing, config.step_in_backward)
    with_8bit = estimate_memory(config, settings, use_8bit_adam=True, size=size).optimizer_states
    plain = estimate_memory(config, settings, use_8bit_adam=False, size=size).optimizer_states
    return plain - with_8bit


def bitsandbytes_notice(config: TrainConfig, failure: str, size: ModelSize = SD1_SIZE) -> str:
    """One line: bitsandbytes failed and why, what the run uses instead, what that costs, how to fix it."""
    extra = plain_adam_extra_bytes(config, size)
    cost = (f"+~{extra / GIB:.1f} GiB of GPU memory for the optimizer states" if extra >= GIB // 10
            else "about the same memory for these small LoRA weights")
    return (f"bitsandbytes failed to load ({failure}), so 8-bit AdamW is off: plain AdamW, {cost}. Fix: "
            "`pip install -U bitsandbytes`, then restart the runtime (Colab: Runtime > Restart session).")


def estimate_memory(config: TrainConfig, settings: MemorySettings, *, precision: str | None = None,
                    use_8bit_adam: bool | None = None, size: ModelSize = SD1_SIZE,
                    resolution: int | None = None) -> MemoryEstimate:
    """Peak GPU memory of a training step of `config` with `settings` (see the module docstring)."""
    precision = precision or config.mixed_precision
    adam8 = config.use_8bit_adam if use_8bit_adam is None else use_8bit_adam
    resolution = resolution or config.resolution or size.native_resolution
    half = precision in ("fp16", "bf16")
    frozen_bytes = 2 if half else 4
    text_trains = config.train_text_encoder

    if config.lora:
        unet_trainable = config.lora_rank * size.unet_lora_per_rank
        text_trainable = config.lora_rank * size.text_lora_per_rank if text_trains else 0
        largest = config.lora_rank * max(SD15_BLOCK_CHANNELS)
    else:
        unet_trainable = size.unet
        text_trainable = size.text_encoder if text_trains else 0
        largest = size.largest_tensor
    trainable = unet_trainable + text_trainable
    # Frozen weights on the GPU, in half precision: the base UNet under LoRA; the text encoder under text
    # LoRA, or frozen unless its prompts' embeddings are cached (then it leaves the GPU); the VAE unless the
    # latents are cached.
    frozen = size.unet if config.lora else 0
    if (config.lora and text_trains) or (not text_trains and not config.cache_text_embeddings):
        frozen += size.text_encoder
    if not config.cache_latents:
        frozen += size.vae
    weights = 4 * trainable + frozen_bytes * frozen
    # LoRA matrices (rank x 320..1280) are mostly under bitsandbytes' 8-bit size threshold: count 32-bit.
    eight_bit = adam8 and (not config.lora or config.lora_rank * min(SD15_BLOCK_CHANNELS) >= ADAM8_SMALL_TENSOR)
    states = (ADAM8_STATE_BYTES if eight_bit else ADAM_STATE_BYTES) * trainable
    gradients = 4 * (largest if settings.step_in_backward else trainable)

    images = config.train_batch_size * (2 if config.with_prior_preservation else 1)
    scale = size.activation_scale
    if settings.gradient_checkpointing and size.checkpointed_activation_scale is not None:
        scale = size.checkpointed_activation_scale
    per_image = images * (resolution / SD_RESOLUTION) ** 2 * scale * (1 if half else 2) * GIB
    activations = ACTIVATION_GIB_PER_IMAGE[(not config.lora, settings.gradient_checkpointing)] * per_image
    if text_trains:
        activations += TEXT_ACTIVATION_GIB_PER_IMAGE * images * GIB
    tail = TAIL_GIB_PER_IMAGE[settings.gradient_checkpointing] * per_image
    if process_count() > 1:  # each process holds all of this; DDP's buckets hold the gradients from the start
        peak = weights + states + gradients + max(activations, tail)
    else:
        peak = weights + states + max(activations, gradients + tail)
    reserved = peak * RESERVED_PER_ALLOCATED + WORKSPACE_GIB * GIB
    return MemoryEstimate(int(weights), int(states), int(gradients), int(activations), int(tail), int(peak),
                          int(reserved))


def candidate_settings(config: TrainConfig) -> list[MemorySettings]:
    """The settings `config.memory_plan` allows, fastest first.

    Checkpointing recomputes the forward pass (~1.8x step time on the anchors), so it comes last;
    the step inside backward costs about nothing in time, so it is tried before checkpointing.
    """
    if config.memory_plan == "as-set":
        return [MemorySettings(config.gradient_checkpointing, config.step_in_backward)]
    allowed = step_in_backward_allowed(config) is None and process_count() == 1  # DDP averages after backward
    in_backward = [False, True] if allowed else [False]
    ordered = [MemorySettings(ckpt, sib) for ckpt in (False, True) for sib in in_backward]
    return ordered[-1:] if config.memory_plan == "smallest" else ordered


def planning_size(model: str) -> ModelSize:
    """Sizes to plan with before the model loads: the offline models' own (they load in a second), else those of
    the model's family (SD 1.x or SDXL, families.family_of)."""
    if model in (TINY_MODEL, TOY_MODEL, TINY_SDXL_MODEL):
        return model_size(load_components(model))
    reference = SDXL_SIZE if family_of(model) is SDXL else SD1_SIZE
    counted = _counted_parts(Path(model)) if Path(model).is_dir() else None
    return replace(reference, **counted) if counted else reference


def _counted_parts(folder: Path) -> dict[str, int] | None:
    """A local diffusers folder's parameter counts per part, from its safetensors headers (no weight is read), so
    a smaller model of a family (SSD-1B, a tiny test model) is not planned as the family's full size."""
    counts = {"unet": 0, "text_encoder": 0, "vae": 0}
    for part, folders in (("unet", ["unet"]), ("vae", ["vae"]), ("text_encoder", ["text_encoder", "text_encoder_2"])):
        for name in folders:
            for file in sorted((folder / name).glob("*.safetensors")) if (folder / name).is_dir() else []:
                if ".fp16." in file.name and any(f.name != file.name and ".fp16." not in f.name
                                                 for f in (folder / name).glob("*.safetensors")):
                    continue  # the same weights again in fp16: count one variant
                try:
                    with safe_open(str(file), framework="pt") as handle:
                        counts[part] += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
                except Exception:  # a damaged header: plan with the family's own size, the loader will say why
                    return None
    return counts if counts["unet"] else None


def process_count() -> int:
    """How many processes train together (accelerate launch and torchrun set WORLD_SIZE): each holds the whole
    run on its own GPU, with its gradients in DDP's all-reduce buckets, and none can step inside backward."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def cuda_free_bytes() -> int:
    free, _total = torch.cuda.mem_get_info()
    return int(free)


# The plan of the run in progress (one per process), so out-of-memory advice starts from what the planner chose.
_current_plan: tuple[tuple, MemoryPlan] | None = None


def _plan_key(config: TrainConfig) -> tuple:
    """The settings a plan depends on: two configs with the same key get the same plan."""
    return tuple(getattr(config, name) for name in (
        "model", "lora", "lora_rank", "train_text_encoder", "cache_latents", "cache_text_embeddings",
        "train_batch_size", "with_prior_preservation", "resolution", "mixed_precision", "use_8bit_adam",
        "memory_plan", "gradient_checkpointing", "step_in_backward", "max_grad_norm", "gradient_accumulation_steps"))


def current_plan(config: TrainConfig) -> MemoryPlan | None:
    """The plan plan_memory last made for a run with `config`'s memory settings, if any."""
    if _current_plan is not None and _current_plan[0] == _plan_key(config):
        return _current_plan[1]
    return None


def plan_memory(config: TrainConfig, *, precision: str | None = None, use_8bit_adam: bool | None = None,
                free_bytes: int | None = None, size: ModelSize = SD1_SIZE,
                bitsandbytes_error: str | None = None, record: bool = True) -> MemoryPlan:
    """The fastest candidate settings whose estimated reserved peak fits in `free_bytes` (default: the GPU's).

    Raises ConfigError naming the setting to change when none fits. `bitsandbytes_error` (bitsandbytes_failure's
    answer, when it failed) leads that message: then the first thing to fix is bitsandbytes, not the settings.
    """
    global _current_plan
    precision = precision or config.mixed_precision
    adam8 = config.use_8bit_adam if use_8bit_adam is None else use_8bit_adam
    free = cuda_free_bytes() if free_bytes is None else free_bytes
    candidates = candidate_settings(config)
    estimates = [estimate_memory(config, s, precision=precision, use_8bit_adam=use_8bit_adam, size=size)
                 for s in candidates]
    for settings, estimate in zip(candidates, estimates):
        if estimate.peak_reserved <= free:
            faster = candidates.index(settings) > 0
            why = (f"the faster {candidates[0].describe()} needs ~{estimates[0].peak_reserved / GIB:.1f} GiB"
                   if faster else "the fastest setting")
            reason = (f"Memory plan: {settings.describe()} (~{estimate.peak_allocated / GIB:.1f} GiB peak, "
                      f"{free / GIB:.1f} GiB free; {why}).")
            plan = MemoryPlan(settings, estimate, free, reason, precision, adam8)
            if record:  # the run's plan, for its out-of-memory advice; a preview (choices.outlook) passes False
                _current_plan = (_plan_key(config), plan)
            return plan
    smallest = estimates[-1]
    refusal = (f"This run needs ~{smallest.peak_reserved / GIB:.1f} GiB of GPU memory even with "
               f"{candidates[-1].describe()}, and {free / GIB:.1f} GiB is free. "
               + _what_to_change(config, precision, use_8bit_adam, free, size))
    if bitsandbytes_error and config.use_8bit_adam and not adam8:
        with_8bit = estimate_memory(config, candidates[-1], precision=precision, use_8bit_adam=True, size=size)
        fixed = ("with it this run fits" if with_8bit.peak_reserved <= free
                 else f"with it this run still needs ~{with_8bit.peak_reserved / GIB:.1f} GiB")
        refusal = (bitsandbytes_notice(config, bitsandbytes_error, size) + f" 8-bit AdamW was planned: {fixed}. "
                   "Without it: " + refusal)
    raise ConfigError(refusal)


# Changes that shrink a run, least costly to the result first: (option to name, config changes).
_MEMORY_SAVINGS = (
    ("--cache-latents", {"cache_latents": True}),
    ("--use-8bit-adam", {"use_8bit_adam": True}),
    ("--no-train-text-encoder", {"train_text_encoder": False, "stop_text_encoder_training_at": None}),
    ("--lora", {"lora": True}),
    ("--train-batch-size 1", {"train_batch_size": 1}),
    ("--resolution 384", {"resolution": 384}),
    ("--no-prior-preservation", {"with_prior_preservation": False}),
)


def _what_to_change(config: TrainConfig, precision: str, use_8bit_adam: bool | None, budget: int,
                    size: ModelSize) -> str:
    """Advice: the first single change (from _MEMORY_SAVINGS) that makes the run fit, else the fewest in order."""
    def fits(candidate: TrainConfig) -> bool:
        adam8 = True if candidate.use_8bit_adam and not config.use_8bit_adam else use_8bit_adam
        smallest = candidate_settings(candidate)[-1]
        return estimate_memory(candidate, smallest, precision=precision, use_8bit_adam=adam8,
                               size=size).peak_reserved <= budget

    resolution = config.resolution or size.native_resolution
    smaller = size.native_resolution * 3 // 4  # SD 1.x 384, SDXL 768: lower still and the model draws poorly
    savings = [(f"--resolution {smaller}", {"resolution": smaller}) if option.startswith("--resolution")
               else (option, changes) for option, changes in _MEMORY_SAVINGS]
    useful = [(option, changes) for option, changes in savings
              if any(getattr(config, k) != v for k, v in changes.items())
              and not (option.startswith("--resolution") and resolution <= changes["resolution"])]
    for option, changes in useful:
        if fits(replace(config, **changes)):
            return f"Change this setting: {option}; or use a GPU with more memory."
    def with_all(chosen):
        return replace(config, **{k: v for option, changes in chosen for k, v in changes.items()})

    for count in range(2, len(useful) + 1):
        if fits(with_all(useful[:count])):
            # Keep only the changes still needed: drop each one the others can do without.
            needed = useful[:count]
            for item in useful[:count]:
                if fits(with_all([n for n in needed if n != item])):
                    needed = [n for n in needed if n != item]
            return f"Change these settings: {' '.join(o for o, _ in needed)}; or use a GPU with more memory."
    return "Even every memory saving together does not fit: use a GPU with more memory."


def oom_advice(config: TrainConfig, *, settings: MemorySettings | None = None, precision: str | None = None,
               use_8bit_adam: bool | None = None, total_bytes: int | None = None, size: ModelSize = SD1_SIZE) -> str:
    """What to tell the user after a CUDA out-of-memory error: the estimate, and the setting to change.

    `settings`, `precision` and `use_8bit_adam` are what the run used (default: what the planner chose for this
    config, current_plan; without a plan, the config's); `total_bytes` is the GPU's memory (default: the
    device's), since at the moment of the error almost nothing is free.
    """
    plan = current_plan(config)
    if plan is not None:
        settings = settings or plan.settings
        precision = precision or plan.precision
        use_8bit_adam = plan.use_8bit_adam if use_8bit_adam is None else use_8bit_adam
    precision = precision or config.mixed_precision
    settings = settings or MemorySettings(config.gradient_checkpointing, config.step_in_backward)
    if total_bytes is None:
        total_bytes = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else 0
    used = estimate_memory(config, settings, precision=precision, use_8bit_adam=use_8bit_adam, size=size)
    head = (f"The GPU ran out of memory: this run needs ~{used.peak_allocated / GIB:.1f} GiB by our estimate, "
            f"the GPU has {total_bytes / GIB:.1f} GiB, and other programs on it (another notebook) use some. ")
    if process_count() > 1:
        head += (f"Each of the {process_count()} processes needs all of it on its own GPU (more GPUs do not share it); "
                 "two processes on one GPU need twice. ")
    if config.use_8bit_adam and use_8bit_adam is False:
        head += ("8-bit AdamW was off (bitsandbytes did not load): fixing bitsandbytes saves "
                 f"~{plain_adam_extra_bytes(config, size) / GIB:.1f} GiB. ")
    # A run that used the smallest setting it may (memory plan "smallest", or the planner's last resort) has no
    # smaller one to turn on: advise from the settings that change the run instead.
    smaller_allowed = [] if config.memory_plan == "smallest" else candidate_settings(config.replace(memory_plan="auto"))
    for smaller in smaller_allowed:
        estimate = estimate_memory(config, smaller, precision=precision, use_8bit_adam=use_8bit_adam, size=size)
        if estimate.peak_allocated < used.peak_allocated and estimate.peak_reserved <= total_bytes:
            if config.memory_plan == "auto":
                return head + "Change this setting: --memory-plan smallest."
            flags = ["--gradient-checkpointing"] * smaller.gradient_checkpointing \
                + ["--step-in-backward"] * smaller.step_in_backward
            return head + f"Change this setting: {' '.join(flags)} --memory-plan as-set."
    return head + _what_to_change(config.replace(memory_plan="smallest"), precision, use_8bit_adam,
                                  int(total_bytes), size)


# ---------------------------------------------------------------------------- system RAM

# Free Colab gives 12.7 GB of system RAM, and a process killed for it dies without a Python error ("Your session
# crashed"): loading SDXL in fp32 (13.9 GB of weights) does exactly that. Resident memory of a process that has
# imported torch, diffusers, transformers and accelerate and built nothing yet, measured by
# benchmarks/sdxl_colab_ram.py (its "baseline" phase) on the CPU build: the rest is the weights.
BASE_RSS_GIB = 0.9


def ram_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or None where there is none."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_ram(config: TrainConfig, size: ModelSize, precision: str) -> int:
    """Peak system RAM of loading and running `config`: the interpreter plus every weight as loaded.

    A LoRA run in half precision loads the frozen base straight in fp16 (models.load_components' dtype), so
    nothing is ever held in fp32; a full fine-tune loads fp32. SDXL's own VAE is cast to fp32 (a second copy of
    it, briefly). Latents and prompt embeddings cached, LoRA checkpoints and the upload are megabytes next to this.
    """
    half_base = config.lora and precision in ("fp16", "bf16")
    unit = 2 if half_base else 4
    weights = unit * (size.unet + size.text_encoder + size.vae)
    if size.native_resolution > SD_RESOLUTION and not config.vae and half_base:  # SDXL's VAE upcast
        weights += 4 * size.vae
    return int(BASE_RSS_GIB * GIB + weights)


def check_ram(config: TrainConfig, size: ModelSize, precision: str, available: int | None = None, *,
              gpu: bool = True) -> str | None:
    """Refuse (ConfigError) a run whose loading would not fit the free system RAM, before it loads; else a note
    of the estimate (None when the machine does not say how much is free). Without a `gpu` everything is fp32, so
    half precision is no advice to give."""
    available = ram_available_bytes() if available is None else available
    if available is None:
        return None
    needed = estimate_ram(config, size, precision)
    if needed <= available:
        return f"System RAM: ~{needed / GIB:.1f} GiB needed to load, {available / GIB:.1f} GiB free."
    advice = "Close other programs or notebooks using RAM, or use a machine with more memory."
    if not gpu:
        advice = "Without a GPU every weight loads in fp32. " + advice
    elif not (config.lora and precision in ("fp16", "bf16")):
        lighter = estimate_ram(config.replace(lora=True), size, "fp16")
        advice = (f"Change these settings: --lora --mixed-precision fp16 (the base then loads in half precision: "
                  f"~{lighter / GIB:.1f} GiB); or " + advice[0].lower() + advice[1:])
    raise ConfigError(f"This run needs ~{needed / GIB:.1f} GiB of system RAM to load the model and "
                      f"{available / GIB:.1f} GiB is free: the process would be killed while loading. " + advice)
