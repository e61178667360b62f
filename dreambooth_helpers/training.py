"""DreamBooth fine-tuning: the whole training loop, readable top to bottom.

`train(config)` walks these phases, each a function in the order below:

    _run_config          a private, validated copy of the config; the photos read once (a wrong folder fails in
                         a second), and the run's identity (_run_identity: what makes two runs the same model)
    _finished_run        with --resume latest, a run that already finished is returned as it is, not trained again
    ckpt.resolve_resume  the checkpoint to continue from: only one this run saved (other runs' are passed over)
    resolve_runtime      device, precision, 8-bit Adam, memory plan; a real model on a CPU is refused here
    _start               the accelerate Accelerator for this run's precision
    _load_model          the base model, with the weights that train set up (all of them, or LoRA adapters)
    _load_data           the photos at the model's resolution and the class images (prior.prepare_class_images),
                         encoded once
    _make_optimizer_and_schedule
    _resume              the checkpoint's weights, optimizer state and loss history
    the loop             _train_step (noise a latent, predict the noise, MSE for the subject plus weighted MSE
                         for the class, optimizer step), then samples, on_step, checkpoint
    _finish              the final model and training_summary.json (with every step's logs, resumed or not)

Every random draw (which images, flips, noise, timesteps) belongs to one example of the run's stream of
examples and comes from a generator seeded by (seed, that example's place in the stream), so a resumed run
continues exactly as an uninterrupted one would. Under `accelerate launch` each process takes its own slice
of every global batch of that stream (_train_step), so N processes with batch B draw exactly what one process
with batch N x B draws.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import captions, prior, tracking
from . import checkpoints as ckpt
from .config import MEMORY, OUTPUTS, TINY_MODEL, TOY_MODEL, TrainConfig
from .data import DatasetReport, images_to_tensor, prepare_image, read_images, require_usable
from .errors import ConfigError, DreamBoothError, TrainingError
from .failures import is_out_of_memory, training_out_of_memory
from .files import LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SAMPLES_DIR, SUMMARY_FILE
from .memory import (
    bf16_in_hardware,
    bitsandbytes_failure,
    bitsandbytes_notice,
    plan_memory,
    planning_size,
    process_count,
)
from .models import (
    SD15_RANDOM,
    SDComponents,
    base_weights_variant,
    load_components,
    load_safety_checker,
    make_pipeline,
    seeded_rng,
    write_slow_tokenizer_files,
)
from .speedups import StepInBackward, TextEmbeddingCache, live_text_embeddings, use_channels_last

LORA_TARGETS_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TARGETS_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]
NONFINITE_PATIENCE = 3  # steps in a row with a NaN/inf loss (never applied) before training stops
OVERFLOW_PATIENCE = 25  # fp16 steps in a row the loss scaler skips (scale / 2**25) before it counts as divergence
ALLOW_CPU_VARIABLE = "DREAMBOOTH_HELPERS_ALLOW_CPU"  # set to 1 to train a real model on a CPU anyway
CPU_MODELS = (TINY_MODEL, TOY_MODEL, SD15_RANDOM)  # built-in models that train (or at least run) on a CPU
CPU_WEIGHTS_LIMIT = 200 * 2**20  # a local model with more weight bytes than this is a real one (SD 1.x: ~2-4 GB)
# Settings left out of a run's identity because they do not change the trained weights: where outputs go, samples,
# checkpoints and resuming (the OUTPUTS group), and how memory and speed are traded for the same weights (the
# MEMORY group: memory plan, precision, attention, caches, channels-last, the step inside backward). `preset` and
# `kind` only choose defaults for other settings, which count through their effective values; the photos count by
# their bytes, not their folder; the class images' batch size is how many are drawn at once, each from its own seed.
# `captions` (the mode) counts through the captions themselves, which are part of the photos' digest.
IDENTITY_EXCLUDED_GROUPS = (MEMORY, OUTPUTS)
IDENTITY_EXCLUDED_SETTINGS = ("output_dir", "preset", "kind", "concepts", "class_images_batch_size", "captions")


@dataclass
class TrainResult:
    output_dir: Path
    summary_path: Path
    sample_images: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    global_step: int = 0
    peak_memory_gib: float | None = None
    reused: bool = False  # True when the output folder already held this finished run and nothing was trained


# ---------------------------------------------------------------------------- runtime choices


@dataclass
class Runtime:
    """Settings that depend on the machine, resolved once before anything heavy happens."""

    device: str
    mixed_precision: str
    use_8bit_adam: bool
    use_xformers: bool
    notices: list[str]
    gradient_checkpointing: bool = True  # chosen by the memory planner on a GPU (memory.plan_memory)
    step_in_backward: bool = False


def resolve_runtime(config: TrainConfig, cuda_available: bool | None = None, *,
                    allow_cpu: bool | None = None) -> Runtime:
    """Fit the config to this machine; say in one line each what was changed and why.

    Refuses (ConfigError) to train a real model without a GPU unless `allow_cpu` (see _refuse_cpu_training).
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    _refuse_cpu_training(config.model, cuda, allow_cpu=allow_cpu)
    notices = []
    if not config.lora and config.effective_learning_rate > 2e-5 and config.model not in (TINY_MODEL, TOY_MODEL):
        notices.append(f"--learning-rate {config.effective_learning_rate:g} is high for a full fine-tune of SD 1.x: "
                       "expect the model to forget other subjects quickly. 1e-6..5e-6 is usual; LoRA uses ~1e-4.")
    precision, adam8, xformers = config.mixed_precision, config.use_8bit_adam, False
    if not config.safety_checker and not config.lora and config.model not in (TINY_MODEL, TOY_MODEL):
        notices.append("Safety checker off (--no-safety-checker): the saved model will not filter NSFW images, and "
                       "diffusers warns whoever loads it. Do not serve it publicly without a filter of your own.")
    if not cuda:
        if precision != "no":
            notices.append(f"No GPU: training in fp32 instead of {precision} (fine for the offline toy and tiny "
                           "models; far too slow for Stable Diffusion).")
            precision = "no"
        if adam8:
            notices.append("No GPU: bitsandbytes 8-bit AdamW needs CUDA, using plain AdamW.")
            adam8 = False
    else:
        if precision == "bf16" and not bf16_in_hardware():  # is_bf16_supported() is True on a T4: emulated
            raise ConfigError(f"--mixed-precision bf16 is not supported by {torch.cuda.get_device_name()} "
                              "(T4 and older; bf16 needs compute capability 8.0+): use --mixed-precision fp16.")
        bitsandbytes_error = bitsandbytes_failure() if adam8 else None
        if bitsandbytes_error:
            notices.append(bitsandbytes_notice(config, bitsandbytes_error, planning_size(config.model)))
            adam8 = False
        if config.attention in ("auto", "xformers"):
            xformers = _xformers_works()
            if config.attention == "xformers" and not xformers:
                notices.append("xformers is not installed or not built for this torch: using PyTorch SDPA attention.")
    checkpointing, in_backward = config.gradient_checkpointing, config.step_in_backward
    if cuda:  # refuse here, before the model loads, when nothing fits
        plan = plan_memory(config, precision=precision, use_8bit_adam=adam8, size=planning_size(config.model),
                           bitsandbytes_error=bitsandbytes_error)
        checkpointing, in_backward = plan.settings.gradient_checkpointing, plan.settings.step_in_backward
        notices.append(plan.reason)
    if in_backward and process_count() > 1:  # the planner never picks it then: only --step-in-backward gets here
        raise ConfigError(f"--step-in-backward does not work with several processes (this run has {process_count()}):"
                          " their gradients are averaged after the backward pass, so no weight may change during it."
                          " Drop --step-in-backward, or launch one process.")
    return Runtime("cuda" if cuda else "cpu", precision, adam8, xformers, notices, checkpointing, in_backward)


def _refuse_cpu_training(model: str, cuda_available: bool | None = None, *, allow_cpu: bool | None = None) -> None:
    """Refuse, before anything loads, to train a real model on a CPU, where it would run for days.

    The built-in models (toy, tiny, sd15-random) and small local models train on a CPU. `allow_cpu`
    (default: the DREAMBOOTH_HELPERS_ALLOW_CPU environment variable set to 1) trains anyway.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if allow_cpu is None:
        allow_cpu = os.environ.get(ALLOW_CPU_VARIABLE, "") not in ("", "0")
    if cuda or allow_cpu or model in CPU_MODELS:
        return
    local = Path(model)
    if local.exists():
        files = [local] if local.is_file() else [f for f in local.rglob("*") if f.is_file()]
        if sum(f.stat().st_size for f in files if f.suffix in (".safetensors", ".bin", ".ckpt", ".pt")) \
                <= CPU_WEIGHTS_LIMIT:
            return
    raise ConfigError(
        f"This machine has no GPU, and training {model!r} on a CPU would take days. In Colab: Runtime > Change "
        "runtime type > T4 GPU > Save, then run the notebook again from the top. To try the whole pipeline "
        f"without a GPU, use --model {TOY_MODEL} (a small offline model). To train on the CPU anyway, set "
        f"{ALLOW_CPU_VARIABLE}=1."
    )


def _xformers_works() -> bool:
    try:
        import xformers.ops

        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # not installed, or built for another torch/CUDA
        return False


# ---------------------------------------------------------------------------- data


@dataclass
class Example:
    """One training image: its cached latent distribution (or pixels) and its prompt's token ids."""

    pixels: torch.Tensor | None  # (2 if flips else 1, 3, H, W), used when latents are not cached
    latent_mean: torch.Tensor | None  # (2 or 1, 4, h, w)
    latent_std: torch.Tensor | None
    input_ids: torch.Tensor  # (77,)


def _tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids[0]


def _make_examples(images, prompts: str | list[str], components, config, runtime, vae_dtype) -> list[Example]:
    """One example per image; `prompts` is one prompt for all of them, or each image's own (its caption)."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else prompts
    examples = []
    for image, prompt in zip(images, prompts, strict=True):
        ids = _tokenize(components.tokenizer, prompt)
        pixels = images_to_tensor([image])
        if config.random_flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        if config.cache_latents:
            with torch.no_grad():
                dist = components.vae.encode(pixels.to(runtime.device, vae_dtype)).latent_dist
            examples.append(Example(None, dist.mean.float(), dist.std.float(), ids))
        else:
            examples.append(Example(pixels, None, None, ids))
    return examples


def _pick(n: int, position: int, seed: int) -> int:
    """Index of the example at `position` in an endless stream of seeded epoch shuffles of `n` items."""
    epoch, offset = divmod(position, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return int(order[offset])


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float):
    """MSE on the subject's images, plus `prior_weight` x MSE on the class images after them.

    Returns (total, instance loss, prior loss or None).
    """
    prediction, target = prediction.float(), target.float()
    instance = F.mse_loss(prediction[:num_instance], target[:num_instance])
    if prediction.shape[0] == num_instance:
        return instance, instance, None
    prior = F.mse_loss(prediction[num_instance:], target[num_instance:])
    return instance + prior_weight * prior, instance, prior


# ---------------------------------------------------------------------------- the run


def train(config: TrainConfig, *, progress: bool = True, on_step=None, on_notice=None) -> TrainResult:
    """Fine-tune `config.model` on `config.concepts`; `config` itself is left as it was.

    `on_step(step, logs)` is called after each step; `logs["samples"]` lists the sample images drawn at that step
    (paths as strings, so the history stays JSON; empty at most steps), the last step's included.
    `on_notice(text)` shows the run's notices (default: printed above the progress bar); the notebook passes one
    that names its own settings instead of command-line flags.
    """
    with quiet_library_logs():
        try:
            return _train(config, progress=progress, on_step=on_step, on_notice=on_notice or tqdm.write)
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError, as are some kernels' OOMs
            if not is_out_of_memory(error):
                raise
            raise training_out_of_memory(error, config) from None


@contextlib.contextmanager
def quiet_library_logs():
    """Hide diffusers/transformers chatter (dtype notes, shard bars) so our progress and notices stand out."""
    import diffusers
    import transformers

    levels = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def _train(config: TrainConfig, *, progress: bool, on_step, on_notice) -> TrainResult:
    say = on_notice if _is_main_process() else _silent
    config, photos = _run_config(config)
    max_steps = config.steps_for(sum(len(report.images) for report in photos))
    identity = _run_identity(config, max_steps, photos)
    finished = _finished_run(config, identity, say)
    if finished is not None:
        return finished
    resume_from = ckpt.resolve_resume(config.resume, config.output_dir, identity, max_steps, say)
    run = _start(config, resolve_runtime(config), max_steps, identity, progress, say)
    model = _load_model(run)
    data = _load_data(run, model, photos)
    del photos  # the full-size photos: only their training-size copies are needed from here on
    optim = _make_optimizer_and_schedule(run, model)
    # Now, not after an hour of training: the checkpoints and the final model must fit on the disk.
    kept = min(config.checkpoints_total_limit + 1, len(ckpt.checkpoint_steps(max_steps, config.checkpoint_every)))
    frozen = (model.vae, None if config.train_text_encoder else model.text_encoder)
    ckpt.check_free_disk(run.output_dir, ckpt.run_bytes_needed(optim.state, frozen, kept))
    start_step, history = _resume(run, optim, resume_from)

    # --- the loop
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="Training",
               disable=not (progress and run.accelerator.is_main_process))
    bad_steps = overflow_streak = 0
    for step in bar:
        outcome = _train_step(run, model, data, optim, step)
        done = step + 1
        bad_steps = bad_steps + 1 if outcome.skipped else 0
        if bad_steps >= NONFINITE_PATIENCE:
            raise TrainingError(_diverged_message(done, outcome.skipped, config, run.output_dir,
                                                  identity=run.identity))
        # fp16 gradients that overflow are normal: the scaler skips that update and halves its scale. Only a
        # long run of them (the scale collapsing) means training itself went wrong.
        overflow_streak = overflow_streak + 1 if outcome.overflowed else 0
        if overflow_streak >= OVERFLOW_PATIENCE:
            raise TrainingError(_diverged_message(done, "fp16 gradients overflowed", config, run.output_dir,
                                                  OVERFLOW_PATIENCE, identity=run.identity))
        logs = {"step": done, "loss": outcome.loss, "instance_loss": outcome.instance_loss,
                "prior_loss": outcome.prior_loss, "lr": optim.lr_scheduler.get_last_lr()[0],
                "text_encoder_training": outcome.text_training, "time": round(time.time() - run.started, 3),
                "skipped": outcome.skipped or ("fp16 overflow: loss scale lowered" if outcome.overflowed else None)}
        # Samples before on_step, so the caller sees them with the step that drew them; the last step always draws.
        sampling = config.sample_every and (done % config.sample_every == 0 or done == max_steps)
        drawn = _save_samples(run, model, done) if sampling and run.accelerator.is_main_process else []
        logs["samples"] = [str(path) for path in drawn]
        history.append(logs)
        run.tracker.log_step(done, logs)
        bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{logs['lr']:.2e}")
        if on_step is not None:
            on_step(done, logs)
        # Not while updates are being skipped: the checkpoint before the trouble is the one to keep.
        if ckpt.is_checkpoint_step(done, max_steps, config.checkpoint_every) and not bad_steps:
            run.accelerator.wait_for_everyone()
            if run.accelerator.is_main_process:
                ckpt.save_checkpoint(run.output_dir, done, optim.state, _checkpoint_metadata(run),
                                     config.checkpoints_total_limit, history)
    bar.close()
    return _finish(run, model, data, optim, history, start_step)


# ---------------------------------------------------------------------------- the phases, in order


@dataclass
class _Run:
    """What every phase needs: the run's own config, the machine's settings, where the outputs go."""

    config: TrainConfig
    runtime: Runtime
    accelerator: Any
    max_steps: int
    identity: dict[str, Any]  # what makes two runs the same model (_run_identity), saved with every checkpoint
    output_dir: Path
    progress: bool
    say: Callable[[str], None]
    started: float  # time.time() at step 0: a resumed run counts on from the checkpoint's time
    weight_dtype: torch.dtype  # of the frozen weights: fp16/bf16 under mixed precision, else fp32
    tracker: tracking.RunTracker  # --report-to: parameters, losses, samples, the end (does nothing when off)


@dataclass
class _Model:
    components: SDComponents
    unet: Any  # wrapped by accelerate once the optimizer is made
    text_encoder: Any
    vae: Any
    resolution: int


@dataclass
class _Data:
    instances: list[Example]
    classes: list[Example]  # empty without prior preservation
    frozen_text: Any  # prompt -> embeddings for a frozen text encoder (cached, or computed live)


@dataclass
class _Optim:
    optimizer: Any
    lr_scheduler: Any
    in_backward: StepInBackward | None  # the optimizer when it steps inside backward (speedups.StepInBackward)
    state: ckpt.TrainingState  # what a checkpoint saves and a resume restores


def _run_config(config: TrainConfig) -> tuple[TrainConfig, list[DatasetReport]]:
    """A validated private copy of `config` (the caller's object is never changed) and each concept's photos.

    The photos are read now, before a multi-GB model loads, so a wrong folder fails in a second.
    """
    config = copy.deepcopy(config).validate()
    return config, _read_photos(config)


def _read_photos(config: TrainConfig) -> list[DatasetReport]:
    """Each concept's usable photos, decoded once at full size (ImageDataError when a folder has none), each with
    its caption from the folder (captions.attach_captions; None: the instance prompt)."""
    return [captions.attach_captions(require_usable(read_images(concept.instance_dir)), concept.instance_dir,
                                     concept.instance_prompt, concept.class_prompt, config.captions)
            for concept in config.concepts]


def _finished_run(config: TrainConfig, identity: dict[str, Any], say) -> TrainResult | None:
    """With --resume latest, this run already finished in the output folder: returned as it is, nothing rewritten.

    A checkpoint of this run at its last step without the model (a crash between the two) is no finished run:
    the run resumes from it, trains no step, and saves the model and the summary.
    """
    if config.resume != "latest":
        return None
    summary = _finished_summary(Path(config.output_dir), config.lora)
    if summary is None or summary.get("identity") != identity:
        return None
    say(f"{config.output_dir} already holds this run, finished ({summary.get('steps')} steps): reusing it. To train "
        "it again, run without --resume, or into a new --output-dir.")
    return _reused_result(Path(config.output_dir), summary)


def _is_main_process() -> bool:
    """Whether this is the first (or only) process; accelerate's launchers set RANK for each one."""
    return os.environ.get("RANK", "0") == "0"


def _silent(text: str) -> None:
    """The notices of every process but the first: each is printed once."""


def _start(config: TrainConfig, runtime: Runtime, max_steps: int, identity: dict[str, Any], progress: bool,
           say: Callable[[str], None]) -> _Run:
    """The Accelerator for this run's precision; `say` prints the runtime's notices once (on the main process)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradScalerKwargs, InitProcessGroupKwargs

    _allow_another_mixed_precision(runtime.mixed_precision)
    # Under accelerate launch: the gradients are views into DDP's all-reduce buckets instead of a second copy of
    # them (a full fine-tune's 3.4 GiB), and the other processes wait up to 2 hours (not torch's 30 minutes) at a
    # barrier while the main process makes the class images. Both do nothing in a single process.
    handlers = [DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))]
    # The step inside backward scales the fp16 loss itself, per parameter (speedups.StepInBackward).
    if runtime.step_in_backward and runtime.mixed_precision == "fp16":
        handlers.append(GradScalerKwargs(enabled=False))
    report_to = tracking.resolve_report_to(config.report_to)
    accelerator = Accelerator(mixed_precision=runtime.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              cpu=runtime.device == "cpu", kwargs_handlers=handlers,
                              **tracking.accelerator_arguments(report_to, Path(config.output_dir)))
    for notice in runtime.notices:
        say(notice)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(runtime.mixed_precision, torch.float32)
    # The settings as given, and what the recipe and this machine made of them.
    parameters = {**config.to_dict(), "effective": {
        "max_train_steps": max_steps, "learning_rate": config.effective_learning_rate,
        "text_encoder_learning_rate": config.effective_text_encoder_learning_rate,
        "num_class_images": config.effective_num_class_images, "device": runtime.device,
        "mixed_precision": runtime.mixed_precision, "use_8bit_adam": runtime.use_8bit_adam,
        "gradient_checkpointing": runtime.gradient_checkpointing, "num_processes": accelerator.num_processes}}
    tracker = tracking.RunTracker.begin(accelerator, report_to, Path(config.output_dir), parameters)
    return _Run(config, runtime, accelerator, max_steps, identity, Path(config.output_dir), progress, say,
                time.time(), weight_dtype, tracker)


def _allow_another_mixed_precision(precision: str) -> None:
    """Let this process make an Accelerator with another mixed precision than its last one.

    accelerate keeps one AcceleratorState per process and refuses a second precision, yet a notebook may
    train twice (fp16, then bf16 or fp32). accelerate has no public way to change it (checked in 1.15: only
    the private `AcceleratorState._reset_state`, which transformers' Trainer calls for the same reason), so
    that call lives here alone, made only when the precision really changes. The distributed state
    (PartialState: processes, devices) is kept.
    """
    from accelerate.state import AcceleratorState, is_initialized

    if is_initialized() and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _load_model(run: _Run) -> _Model:
    """The base model, with what trains in fp32 (fp16 master weights break loss scaling) and the rest frozen."""
    config = run.config
    variant = base_weights_variant(config.lora, run.runtime.mixed_precision)  # fp16 files: half the download
    components = load_components(config.model, seed=config.seed, variant=variant)
    resolution = config.resolution or components.native_resolution
    if resolution % components.resolution_multiple:
        raise ConfigError(f"--resolution {resolution} does not fit this model: use a multiple of "
                          f"{components.resolution_multiple} (SD 1.x: 512).")
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    if run.weight_dtype != torch.float32 and not config.lora:  # the saved model gets the frozen parts' own weights
        components.keep_fp32_originals("vae", *(() if config.train_text_encoder else ("text_encoder",)))
    set_up_trainable(unet, text_encoder, vae, config, run.runtime, run.accelerator.device, run.weight_dtype)
    return _Model(components, unet, text_encoder, vae, resolution)


def _load_data(run: _Run, model: _Model, photos: list[DatasetReport]) -> _Data:
    """The subject's photos (read by _run_config) and the class images, as examples with cached latents (and
    prompt embeddings)."""
    config, accelerator, device = run.config, run.accelerator, run.accelerator.device
    instances, classes = [], []
    for concept, report in zip(config.concepts, photos, strict=True):
        if report.skipped:
            run.say("Skipped: " + "; ".join(f"{s.name} ({s.reason})" for s in report.skipped))
        images = [prepare_image(record.image, model.resolution, config.crop, config.remove_bars)
                  for record in report.images]
        for notice in [captions.caption_summary(report), *captions.check_caption_lengths(
                report, model.components.tokenizer, concept.instance_prompt, concept.class_prompt)]:
            if notice:
                run.say(notice)
        prompts = [record.caption or concept.instance_prompt for record in report.images]
        instances += _make_examples(images, prompts, model.components, config, run.runtime, run.weight_dtype)
    if config.with_prior_preservation:
        if accelerator.is_main_process:  # one process draws them; the others wait, then read the same files
            prior.prepare_class_images(config, model.components, device=device, progress=run.progress)
        accelerator.wait_for_everyone()
        for concept in config.concepts:
            found = read_images(prior.class_dir_for(config, concept)).images[:config.effective_num_class_images]
            class_images = [prepare_image(record.image, model.resolution, "center") for record in found]
            classes += _make_examples(class_images, concept.class_prompt, model.components, config, run.runtime,
                                      run.weight_dtype)
        if not classes:
            raise TrainingError("Prior preservation is on but no class image could be made or read; "
                                "check --class-dir, or pass --no-prior-preservation.")
    frozen_text = TextEmbeddingCache() if config.cache_text_embeddings else live_text_embeddings
    on_gpu = run.runtime.device == "cuda"
    if config.cache_text_embeddings and not config.train_text_encoder and on_gpu:
        with accelerator.autocast():  # as in the loop, so cached and live embeddings are the same
            frozen_text.fill(model.text_encoder, [e.input_ids for e in instances + classes], device)
        model.text_encoder.to("cpu")  # only needed again for samples
    if config.cache_latents and on_gpu:
        model.vae.to("cpu")  # the VAE is only needed again for samples; its memory goes to training
        torch.cuda.empty_cache()
    return _Data(instances, classes, frozen_text)


def _make_optimizer_and_schedule(run: _Run, model: _Model) -> _Optim:
    """AdamW (8-bit, fused, or one per parameter inside backward) over what trains, and the learning-rate schedule."""
    from diffusers.optimization import get_scheduler

    config, accelerator, train_text = run.config, run.accelerator, run.config.train_text_encoder
    groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad], "lr": config.effective_learning_rate}]
    if train_text:
        groups.append({"params": [p for p in model.text_encoder.parameters() if p.requires_grad],
                       "lr": config.effective_text_encoder_learning_rate})
    optimizer = _make_optimizer(groups, config, run.runtime)
    in_backward = optimizer if isinstance(optimizer, StepInBackward) else None  # steps inside backward
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=run.max_steps * accelerator.num_processes)
    if train_text:
        model.unet, model.text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            model.unet, model.text_encoder, optimizer, lr_scheduler)
    else:
        model.unet, optimizer, lr_scheduler = accelerator.prepare(model.unet, optimizer, lr_scheduler)
    state = ckpt.TrainingState(model.unet, model.text_encoder if train_text else None, optimizer, lr_scheduler,
                               accelerator.scaler, config.lora, run.runtime.use_8bit_adam)
    return _Optim(optimizer, lr_scheduler, in_backward, state)


def _resume(run: _Run, optim: _Optim, resume_from: Path | None) -> tuple[int, list[dict[str, Any]]]:
    """The step to start from and the history so far: from `resume_from` (ckpt.resolve_resume), else 0 and none."""
    if resume_from is None:
        if run.config.resume == "latest":
            run.say(f"No checkpoint of this run in {run.output_dir / ckpt.CHECKPOINTS_DIR} yet: starting from "
                    "step 0.")
        return 0, []
    start_step = ckpt.load_checkpoint(resume_from, optim.state)
    history = [h for h in ckpt.read_history(resume_from) if h.get("step", 0) <= start_step]
    if history and history[-1].get("time") is not None:
        run.started -= float(history[-1]["time"])  # times count on from the first part's, for speed estimates
    run.say(f"Resuming from {resume_from} (step {start_step} of {run.max_steps}).")
    return start_step, history


@dataclass
class StepOutcome:
    loss: float
    instance_loss: float
    prior_loss: float | None
    skipped: str | None  # why this step's update was not applied, if it was not
    overflowed: bool  # the fp16 loss scaler skipped the update: normal, unless it goes on
    text_training: bool


def _train_step(run: _Run, model: _Model, data: _Data, optim: _Optim, step: int) -> StepOutcome:
    """Step `step` (0-based): its micro-batches' forward and backward passes, and the optimizer step."""
    config, accelerator, device = run.config, run.accelerator, run.accelerator.device
    unet, text_encoder, noise_scheduler = model.unet, model.text_encoder, model.components.noise_scheduler
    optimizer, lr_scheduler, in_backward = optim.optimizer, optim.lr_scheduler, optim.in_backward
    text_training = config.train_text_encoder and (config.stop_text_encoder_training_at is None
                                                   or step < config.stop_text_encoder_training_at)
    unet.train()
    text_encoder.train(text_training)
    skipped = None
    # Each micro-batch is a global batch of size x processes examples of the run's stream; this process takes
    # the slice at its rank, so together the processes draw what one process with the whole batch would.
    # DDP averages the processes' gradients, which is the gradient of the whole batch's mean loss.
    size, processes = config.train_batch_size, accelerator.num_processes
    trained = [unet, text_encoder] if config.train_text_encoder else [unet]
    for micro in range(config.gradient_accumulation_steps):
        first = ((step * config.gradient_accumulation_steps + micro) * processes + accelerator.process_index) * size
        batch = _assemble(data.instances, data.classes, first, config, device)
        with accelerator.accumulate(*trained):
            with accelerator.autocast():  # the forward pass only, see the backward below
                latents = _latents(batch, model.vae, config, device, run.weight_dtype)
                noise, timesteps = _noise_and_timesteps(batch, latents, noise_scheduler.config.num_train_timesteps,
                                                        device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"].to(device))[0] if text_training \
                    else data.frozen_text(text_encoder, batch["input_ids"], device)
                prediction = unet(noisy, timesteps, hidden).sample
                target = noise if noise_scheduler.config.prediction_type == "epsilon" \
                    else noise_scheduler.get_velocity(latents, noise, timesteps)
                loss, instance_loss, prior_loss = dreambooth_loss(prediction, target, batch["num_instance"],
                                                                  config.prior_loss_weight)
            # The whole global batch's losses, the same on every process: what is logged, and what decides
            # below whether this step is applied (all processes decide alike, or their all-reduces would hang).
            reported = torch.stack([loss.detach(), instance_loss.detach(),
                                    loss.detach() * 0 if prior_loss is None else prior_loss.detach()])
            if processes > 1:
                reported = accelerator.reduce(reported, "mean")
            # A NaN/inf forward loss is never applied (no step), so the weights stay those of the last good step.
            # The fp16 loss scaler cannot catch this: it only inspects gradients.
            if not torch.isfinite(reported[0]):
                skipped = "the loss was NaN/inf"
                if processes > 1:  # DDP expects a backward after each forward; its gradients are dropped below
                    accelerator.backward(loss * 0)
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                continue
            # Outside autocast, as PyTorch advises: its cache of half-precision weight copies lives as long
            # as the autocast block, so a backward pass inside it holds a copy of every trained weight until
            # the end (UNet + text encoder: 1.8 GiB); out here each copy is freed once its layer is done.
            accelerator.backward(in_backward.scale_loss(loss) if in_backward else loss)
            grad_norm = None
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                        config.max_grad_norm)
            if accelerator.scaler is None and grad_norm is not None and not torch.isfinite(
                    torch.as_tensor(grad_norm)):
                # Without a loss scaler (fp32, bf16) nothing else keeps inf gradients out of the weights.
                skipped = "the gradients were NaN/inf"
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                continue
            optimizer.step()
            if in_backward and in_backward.last_step_nonfinite and in_backward.loss_scale is None:
                skipped = f"the gradients of {in_backward.last_step_nonfinite} weights were NaN/inf"
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    overflowed = skipped is None and (bool(getattr(optimizer, "step_was_skipped", False)) or bool(
        in_backward and in_backward.loss_scale is not None and in_backward.last_step_nonfinite))
    total, instance, prior_part = (float(value) for value in reported)
    return StepOutcome(total, instance, None if prior_loss is None else prior_part, skipped, overflowed, text_training)


def _finish(run: _Run, model: _Model, data: _Data, optim: _Optim, history: list[dict[str, Any]],
            start_step: int) -> TrainResult:
    """The final model (atomically) and training_summary.json, whose history covers every step from 1."""
    config, accelerator = run.config, run.accelerator
    accelerator.wait_for_everyone()
    samples = [Path(path) for h in history for path in h.get("samples") or []]
    result = TrainResult(run.output_dir, run.output_dir / SUMMARY_FILE, samples, [h["loss"] for h in history],
                         run.max_steps, _peak_memory_gib())
    if accelerator.is_main_process:
        trained_text = model.text_encoder if config.train_text_encoder else None
        _save_final_model(model.components, accelerator, model.unet, trained_text, config, run.output_dir)
        summary = {**_checkpoint_metadata(run), "lora": config.lora, "resolution": model.resolution,
                   "steps": run.max_steps, "resumed_from_step": start_step,
                   # the rates this run trained at, as the model card states them (the recipe may change later)
                   "learning_rate": config.effective_learning_rate,
                   "text_encoder_learning_rate": config.effective_text_encoder_learning_rate,
                   "instance_prompts": [c.instance_prompt for c in config.concepts],
                   "class_prompts": [c.class_prompt for c in config.concepts],
                   "num_instance_images": len(data.instances), "num_class_images": len(data.classes),
                   "device": run.runtime.device, "mixed_precision": run.runtime.mixed_precision,
                   "optimizer": type(getattr(optim.optimizer, "optimizer", optim.optimizer)).__name__,
                   "use_8bit_adam": run.runtime.use_8bit_adam,  # after the fallback to AdamW (the model card)
                   "notices": run.runtime.notices, "wall_time_s": round(time.time() - run.started, 2),
                   "peak_gpu_memory_gib": result.peak_memory_gib, "history": history, "losses": result.losses,
                   "versions": _versions()}
        ckpt.write_json_atomically(result.summary_path, summary)
    run.tracker.finish(wall_time_s=round(time.time() - run.started, 2), peak_gpu_memory_gib=result.peak_memory_gib,
                       step=run.max_steps, lora=config.lora)
    accelerator.wait_for_everyone()  # every process returns once the model is there, not only the one that wrote it
    return result


def _checkpoint_metadata(run: _Run) -> dict[str, Any]:
    config = run.config
    return {"base_model": config.model, "train_text_encoder": config.train_text_encoder, "config": config.to_dict(),
            "identity": run.identity}


# ---------------------------------------------------------------------------- which run is this


def _run_identity(config: TrainConfig, max_steps: int, photos: list[DatasetReport]) -> dict[str, Any]:
    """What makes two runs the same model, as JSON data: the settings (_settings_identity) and a "photos" digest.

    Saved in every checkpoint and in the summary: a run resumes only its own checkpoints, and reuses only its own
    finished model. The photos count by their bytes in reading order, so other or replaced photos make another
    run, whatever their folder is called. Under accelerate launch the process count counts too: with it the
    global batch, the stream of examples and the learning-rate schedule's step count change.
    """
    processes = {"num_processes": process_count()} if process_count() > 1 else {}  # one process: as before
    return {**_settings_identity(config, max_steps), **processes, "photos": _photos_digest(photos)}


def _settings_identity(config: TrainConfig, max_steps: int) -> dict[str, Any]:
    """Every setting of `config` but those that do not change the trained weights (IDENTITY_EXCLUDED_GROUPS and
    _SETTINGS), with the effective step count, learning rates and class-image count (so a changed recipe counts
    as a change; hub.py's model card reads the rates from here), and each concept's prompts and class folder."""
    groups = {option.name: option.metadata.get("group") for option in dataclasses.fields(TrainConfig)}
    settings = {name: value for name, value in config.to_dict().items()
                if groups[name] not in IDENTITY_EXCLUDED_GROUPS and name not in IDENTITY_EXCLUDED_SETTINGS}
    settings.update(max_train_steps=max_steps, learning_rate=config.effective_learning_rate,
                    text_encoder_learning_rate=config.effective_text_encoder_learning_rate,
                    num_class_images=config.effective_num_class_images,
                    prompts=[{"instance_prompt": c.instance_prompt, "class_prompt": c.class_prompt,
                              "class_dir": c.class_dir} for c in config.concepts])
    return json.loads(json.dumps(settings, default=str))  # as it reads back from a summary (tuples become lists)


def _photos_digest(photos: list[DatasetReport]) -> str:
    """The photos' bytes, in reading order, and the captions they train on: another caption is another run.
    A photo without a caption counts by its bytes alone, as before captions existed."""
    digests = [[record.digest if record.caption is None else [record.digest, record.caption]
                for record in report.images] for report in photos]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


def find_finished_run(config: TrainConfig, *, max_steps: int | None = None) -> TrainResult | None:
    """The finished run of `config` in `config.output_dir`, or None: then training it is needed.

    Finished: the model (model_index.json, or the LoRA weights) and training_summary.json are there, and the
    summary's run identity is this config's (_run_identity: every setting that changes the weights, and the
    photos). The notebook calls it to skip training unless asked to train again. `max_steps`, the step count for
    the photos (config.steps_for), spares reading the photos unless every setting matches.
    """
    output_dir = Path(config.output_dir)
    summary = _finished_summary(output_dir, config.lora)
    recorded = summary.get("identity") if summary is not None else None
    if not isinstance(recorded, dict):
        return None
    try:
        photos = None
        if max_steps is None:
            photos = _read_photos(config)
            max_steps = config.steps_for(sum(len(report.images) for report in photos))
        # The settings first: the photos are decoded only when nothing else tells the runs apart.
        if {key: value for key, value in recorded.items() if key != "photos"} != _settings_identity(config, max_steps):
            return None
        photos = photos or _read_photos(config)
    except DreamBoothError:  # the photos cannot be read: training will say why
        return None
    return _reused_result(output_dir, summary) if recorded.get("photos") == _photos_digest(photos) else None


def _finished_summary(output_dir: Path, lora: bool) -> dict[str, Any] | None:
    """The summary of the finished run in `output_dir`: None unless it and the model's marker file are there."""
    summary_path = output_dir / SUMMARY_FILE
    marker = LORA_WEIGHTS_FILE if lora else MODEL_INDEX_FILE
    if not (summary_path.is_file() and (output_dir / marker).is_file()):
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except ValueError:  # a summary cut short by hand or by a foreign tool: not a finished run
        return None
    return summary if isinstance(summary, dict) else None


def _reused_result(output_dir: Path, summary: dict[str, Any]) -> TrainResult:
    history = summary.get("history") or []
    samples = [Path(path) for h in history for path in h.get("samples") or []]
    return TrainResult(output_dir, output_dir / SUMMARY_FILE, samples, [h["loss"] for h in history],
                       summary.get("steps", len(history)), summary.get("peak_gpu_memory_gib"), reused=True)


# ---------------------------------------------------------------------------- the loop's helpers


def set_up_trainable(unet, text_encoder, vae, config: TrainConfig, runtime: Runtime, device, weight_dtype) -> None:
    """Freeze, add LoRA adapters, cast and move the models as `config` trains them (in place).

    Trained weights are fp32 (fp16 master weights break loss scaling); frozen ones are in `weight_dtype`.
    Also switches on gradient checkpointing, channels-last and xformers as `runtime` chose.
    """
    train_text = config.train_text_encoder
    vae.requires_grad_(False).to(device, weight_dtype)
    if config.lora:
        from peft import LoraConfig

        unet.requires_grad_(False).to(device, weight_dtype)
        text_encoder.requires_grad_(False).to(device, weight_dtype)
        alpha = config.lora_alpha or config.lora_rank
        with seeded_rng(config.seed):  # the adapters' random init: two runs with one seed train the same
            unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS_UNET))
            if train_text:
                text_encoder.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha,
                                                    init_lora_weights="gaussian", target_modules=LORA_TARGETS_TEXT))
        for model in (unet, text_encoder):
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    else:
        unet.requires_grad_(True).to(device, torch.float32)
        text_encoder.requires_grad_(train_text).to(device, torch.float32 if train_text else weight_dtype)
    if config.channels_last:
        use_channels_last(unet)
    if runtime.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text:
            # transformers 5 renamed the method; keep working with 4.x too.
            getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()
    if runtime.use_xformers:
        unet.enable_xformers_memory_efficient_attention()


def _diverged_message(step: int, reason: str, config: TrainConfig, output_dir: Path,
                      patience: int = NONFINITE_PATIENCE, *, identity: dict[str, Any] | None = None) -> str:
    """Why training stopped on NaN/inf, what to change, and which checkpoint (of the run `identity`) is still good."""
    good = ckpt.checkpoints_of(output_dir, identity, step) if identity else ckpt.list_checkpoints(output_dir)
    lr = config.effective_learning_rate
    kept = (f"The last good checkpoint, {good[-1]}, is kept: after the change, continue with --resume latest."
            if good else "No checkpoint was saved yet; --checkpoint-every N keeps progress for a resume.")
    bf16_helps = config.mixed_precision == "fp16" and torch.cuda.is_available() and bf16_in_hardware()
    precision = " or --mixed-precision bf16 (no fp16 overflow)" if bf16_helps else ""
    return (f"Training stopped at step {step}: {reason} on {patience} steps in a row, so training diverged. "
            f"Those updates were not applied and no NaN weights were saved. Lower --learning-rate (now {lr:g}, "
            f"try {lr / 4:g}){precision}. {kept}")


def _make_optimizer(groups, config: TrainConfig, runtime: Runtime):
    if runtime.step_in_backward:  # one optimizer per parameter, stepped by its gradient's hook
        per_parameter = dataclasses.replace(runtime, step_in_backward=False)
        return StepInBackward(groups, lambda group: _make_optimizer(group, config, per_parameter),
                              loss_scaling=runtime.mixed_precision == "fp16")
    if runtime.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=config.adam_weight_decay)
    # Fused: one kernel for all parameters, no temporary copies; GradScaler hands it the scale to unscale.
    return torch.optim.AdamW(groups, weight_decay=config.adam_weight_decay, fused=runtime.device == "cuda")


def _example_seed(seed: int, index: int, is_class: bool, purpose: int) -> int:
    """The seed of one random draw of the example at `index` in the run's stream: purpose 0 its flip, 1 the rest.

    Keyed by the example, not by the step or the process, so the same example draws the same whatever batch or
    process it lands in (1 process with batch 2 draws what 2 processes with batch 1 draw together).
    """
    return ((seed * 1_000_003 + index) * 2 + int(is_class)) * 2 + purpose


def _assemble(instances, classes, first: int, config: TrainConfig, device) -> dict[str, Any]:
    """The instance examples at stream places first..first+batch-1, then as many class examples (prior
    preservation), each with its flip and its own generator for the latent, noise and timestep draws."""
    size = config.train_batch_size
    places = [(first + k, False) for k in range(size)] + ([(first + k, True) for k in range(size)] if classes else [])
    chosen = [classes[_pick(len(classes), index, config.seed + 1)] if is_class
              else instances[_pick(len(instances), index, config.seed)] for index, is_class in places]
    flips = [int(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(
        _example_seed(config.seed, index, is_class, 0)))) if config.random_flip else 0 for index, is_class in places]
    generators = [torch.Generator(device.type).manual_seed(_example_seed(config.seed, index, is_class, 1))
                  for index, is_class in places]
    return {"examples": chosen, "flips": flips, "num_instance": size, "generators": generators,
            "input_ids": torch.stack([e.input_ids for e in chosen])}


def _per_example_randn(batch, shape, device, dtype=torch.float32) -> torch.Tensor:
    """One standard normal tensor of `shape` per example, each from the example's own generator."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in batch["generators"]])


def _latents(batch, vae, config: TrainConfig, device, vae_dtype) -> torch.Tensor:
    """Latents for the batch: sampled from the cached distribution, or encoded now."""
    pairs = list(zip(batch["examples"], batch["flips"]))
    if config.cache_latents:
        mean = torch.stack([e.latent_mean[f] for e, f in pairs]).to(device)
        std = torch.stack([e.latent_std[f] for e, f in pairs]).to(device)
        sample = mean + std * _per_example_randn(batch, mean.shape[1:], device)
    else:
        pixels = torch.stack([e.pixels[f] for e, f in pairs]).to(device, vae_dtype)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        sample = (dist.mean + dist.std * _per_example_randn(batch, dist.mean.shape[1:], device,
                                                            dist.mean.dtype)).float()
    return sample * vae.config.scaling_factor


def _noise_and_timesteps(batch, latents: torch.Tensor, num_train_timesteps: int, device):
    """The noise added to each latent and its timestep, drawn after the latent from the example's generator."""
    noise = _per_example_randn(batch, latents.shape[1:], device)
    timesteps = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g, device=device)
                           for g in batch["generators"]])
    return noise, timesteps


def _save_samples(run: _Run, model: _Model, step: int) -> list[Path]:
    """Images from fixed prompts and seeds, to watch the subject appear (and overfitting start)."""
    from diffusers import DPMSolverMultistepScheduler

    config, accelerator, components = run.config, run.accelerator, model.components
    resolution, output_dir = model.resolution, run.output_dir
    prompts = config.sample_prompts or [c.instance_prompt for c in config.concepts]
    device = accelerator.device
    vae_device = next(components.vae.parameters()).device
    text_device = next(components.text_encoder.parameters()).device  # on the CPU when its embeddings are cached
    components.vae.to(device)
    components.text_encoder.to(device)
    pipe = make_pipeline(components, unet=accelerator.unwrap_model(model.unet),
                         text_encoder=accelerator.unwrap_model(model.text_encoder))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(components.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    folder = output_dir / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with torch.no_grad(), accelerator.autocast():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device.type).manual_seed(config.sample_seed + i)
            image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=config.sample_steps,
                         generator=generator, output_type="pil").images[0]
            path = folder / f"step-{step:06d}-{i}.png"
            image.save(path)
            paths.append(path)
    components.vae.to(vae_device)
    components.text_encoder.to(text_device)
    return paths


def _save_final_model(components: SDComponents, accelerator, unet, text_encoder, config, output_dir: Path) -> None:
    """The trained model, written atomically: a diffusers folder, or LoRA weights."""
    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
    ckpt.require_finite_weights((unet, text_encoder), "the final model", output_dir)
    staging = output_dir / ".saving-model"
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if config.lora:
        ckpt.save_trainable_weights(staging, unet, text_encoder, lora=True)
        for raw in ("lora_unet.safetensors", "lora_text_encoder.safetensors"):
            (staging / raw).unlink(missing_ok=True)  # resume-only copies; the diffusers file is the model
        ckpt.replace_atomically(staging, output_dir, LORA_WEIGHTS_FILE)
        return
    with_checker = config.safety_checker and load_safety_checker(components)  # the base's NSFW filter, if any
    pipe = make_pipeline(components, unet=unet, text_encoder=text_encoder or components.text_encoder,
                         safety_checker=with_checker)
    pipe.to(torch.float32)  # one dtype for every part, so a plain from_pretrained runs as is
    components.restore_fp32_originals(pipe)  # not the fp16-rounded copies training used
    pipe.save_pretrained(staging, safe_serialization=True)
    write_slow_tokenizer_files(components.tokenizer, staging / "tokenizer")  # for transformers 4.x
    ckpt.replace_atomically(staging, output_dir, MODEL_INDEX_FILE)


def _peak_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "xformers",
                    "dreambooth-helpers"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[package] = md.version(package)
    return versions
