"""DreamBooth fine-tuning: the whole training loop, readable top to bottom.

`train(config)` walks these phases, each a function in the order below:

    _run_config          a private, validated copy of the config; the photos read once (a wrong folder fails in
                         a second), and the run's identity (run_identity.py: what makes two runs the same model)
    _finished_run        with --resume latest, a run that already finished is returned as it is, not trained again
    ckpt.resolve_resume  the checkpoint to continue from: only one this run saved (other runs' are passed over)
    resolve_runtime      (runtime.py) device, precision, 8-bit Adam, GPU memory plan and system RAM; a real model
                         on a CPU is refused here
    _start               the accelerate Accelerator for this run's precision
    _load_model          the base model, with the weights that train set up (all of them, or LoRA adapters)
    _load_data           the photos at the model's resolution and the class images (prior.prepare_class_images),
                         encoded once
    _make_optimizer_and_schedule
    _resume              the checkpoint's weights, optimizer state and loss history
    the loop             _train_step (noise a latent, encode the prompt and predict the noise, MSE for the
                         subject plus weighted MSE for the class, optimizer step), then samples, on_step, checkpoint
    _finish              the final model (run_outputs.py) and training_summary.json (every step's logs)

Every random draw (which images, flips, noise, timesteps) belongs to one example of the run's stream of
examples (examples.py) and comes from a generator seeded by (seed, that example's place in the stream), so a resumed run
continues exactly as an uninterrupted one would. Under `accelerate launch` each process takes its own slice
of every global batch of that stream (_train_step), so N processes with batch B draw exactly what one process
with batch N x B draws.

SD 1.x and SDXL train through this one loop: what differs (tokenizing and encoding a prompt, SDXL's added
conditions from each photo's size and crop, the pipeline, the LoRA file layout) is asked of the model's family
(families/, `components.family`), never branched on here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import captions, prior, tracking
from . import checkpoints as ckpt
from .config import TrainConfig
from .data import DatasetReport, prepare_image_and_geometry, read_images
from .errors import ConfigError, TrainingError
from .examples import Example, _assemble, _latents, _make_examples, _noise_and_timesteps
from .failures import is_out_of_memory, training_out_of_memory
from .families import LORA_TARGETS_UNET, SD1, ModelFamily, family_of
from .files import SUMMARY_FILE
from .memory import (
    bf16_in_hardware,
)
from .models import (
    SDComponents,
    base_weights_variant,
    load_components,
    seeded_rng,
)
from .run_identity import TrainResult, _finished_run, _read_photos, _run_identity
from .run_outputs import _peak_memory_gib, _save_final_model, _save_samples, _versions
from .runtime import Runtime, _allow_another_mixed_precision, resolve_runtime
from .speedups import StepInBackward, TextEmbeddingCache, live_text_embeddings, use_channels_last

NONFINITE_PATIENCE = 3  # steps in a row with a NaN/inf loss (never applied) before training stops
OVERFLOW_PATIENCE = 25  # fp16 steps in a row the loss scaler skips (scale / 2**25) before it counts as divergence


# ---------------------------------------------------------------------------- the loss


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


def _load_model(run: _Run) -> _Model:
    """The base model, with what trains in fp32 (fp16 master weights break loss scaling) and the rest frozen."""
    config = run.config
    variant = base_weights_variant(config.lora, run.runtime.mixed_precision)  # fp16 files: half the download
    # LoRA keeps the whole base frozen in half precision: load it so, never holding an fp32 copy in RAM.
    load_dtype = run.weight_dtype if config.lora else torch.float32
    components = load_components(config.model, seed=config.seed, variant=variant, vae=config.vae, dtype=load_dtype)
    resolution = config.resolution or components.native_resolution
    if resolution % components.resolution_multiple:
        raise ConfigError(f"--resolution {resolution} does not fit this model: use a multiple of "
                          f"{components.resolution_multiple} ({components.family.label}: "
                          f"{components.family.native_resolution}).")
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    if run.weight_dtype != torch.float32 and not config.lora:  # the saved model gets the frozen parts' own weights
        components.keep_fp32_originals("vae", *(() if config.train_text_encoder else ("text_encoder",)))
    vae_dtype = torch.float32 if components.vae_needs_fp32 else run.weight_dtype
    set_up_trainable(unet, text_encoder, vae, config, run.runtime, run.accelerator.device, run.weight_dtype,
                     family=components.family, vae_dtype=vae_dtype)
    return _Model(components, unet, text_encoder, vae, resolution)


def _load_data(run: _Run, model: _Model, photos: list[DatasetReport]) -> _Data:
    """The subject's photos (read by _run_config) and the class images, as examples with cached latents (and
    prompt embeddings)."""
    config, accelerator, device = run.config, run.accelerator, run.accelerator.device
    instances, classes = [], []
    for concept, report in zip(config.concepts, photos, strict=True):
        if report.skipped:
            run.say("Skipped: " + "; ".join(f"{s.name} ({s.reason})" for s in report.skipped))
        images = [prepare_image_and_geometry(record.image, model.resolution, config.crop, config.remove_bars)
                  for record in report.images]
        for notice in [captions.caption_summary(report), *captions.check_caption_lengths(
                report, model.components.tokenizer, concept.instance_prompt, concept.class_prompt)]:
            if notice:
                run.say(notice)
        prompts = [record.caption or concept.instance_prompt for record in report.images]
        instances += _make_examples(images, prompts, model.components, config, run.runtime)
    if config.with_prior_preservation:
        if accelerator.is_main_process:  # one process draws them; the others wait, then read the same files
            prior.prepare_class_images(config, model.components, device=device, progress=run.progress)
        accelerator.wait_for_everyone()
        for concept in config.concepts:
            found = read_images(prior.class_dir_for(config, concept)).images[:config.effective_num_class_images]
            class_images = [prepare_image_and_geometry(record.image, model.resolution, "center") for record in found]
            classes += _make_examples(class_images, concept.class_prompt, model.components, config, run.runtime)
        if not classes:
            raise TrainingError("Prior preservation is on but no class image could be made or read; "
                                "check --class-dir, or pass --no-prior-preservation.")
    encode = model.components.family.encode
    frozen_text = TextEmbeddingCache(encode) if config.cache_text_embeddings else live_text_embeddings(encode)
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
                               accelerator.scaler, config.lora, run.runtime.use_8bit_adam, model.components.family)
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
    family = model.components.family
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
                latents = _latents(batch, model.vae, config, device)
                noise, timesteps = _noise_and_timesteps(batch, latents, noise_scheduler.config.num_train_timesteps,
                                                        device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                prompt = family.encode(text_encoder, batch["input_ids"].to(device)) if text_training \
                    else data.frozen_text(text_encoder, batch["input_ids"], device)
                prediction = unet(noisy, timesteps, prompt.hidden,
                                  added_cond_kwargs=family.added_conditions(prompt, batch["time_ids"])).sample
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
                   "versions": _versions(), **run.tracker.summary_fields()}
        ckpt.write_json_atomically(result.summary_path, summary)
    run.tracker.finish(wall_time_s=round(time.time() - run.started, 2), peak_gpu_memory_gib=result.peak_memory_gib,
                       step=run.max_steps, lora=config.lora)
    accelerator.wait_for_everyone()  # every process returns once the model is there, not only the one that wrote it
    return result


def _checkpoint_metadata(run: _Run) -> dict[str, Any]:
    config = run.config
    return {"base_model": config.model, "family": family_of(config.model).name,
            "train_text_encoder": config.train_text_encoder, "config": config.to_dict(), "identity": run.identity}


# ---------------------------------------------------------------------------- the loop's helpers


def set_up_trainable(unet, text_encoder, vae, config: TrainConfig, runtime: Runtime, device, weight_dtype, *,
                     family: ModelFamily = SD1, vae_dtype: torch.dtype | None = None) -> None:
    """Freeze, add LoRA adapters, cast and move the models as `config` trains them (in place).

    Trained weights are fp32 (fp16 master weights break loss scaling); frozen ones are in `weight_dtype`, the VAE
    in `vae_dtype` (default the same; SDXL's own VAE needs fp32). LoRA goes on the UNet and on each of the
    family's text encoders. Also switches on gradient checkpointing, channels-last and xformers as `runtime` chose.
    """
    train_text = config.train_text_encoder
    vae.requires_grad_(False).to(device, vae_dtype or weight_dtype)
    if config.lora:
        from peft import LoraConfig

        unet.requires_grad_(False).to(device, weight_dtype)
        text_encoder.requires_grad_(False).to(device, weight_dtype)
        alpha = config.lora_alpha or config.lora_rank
        with seeded_rng(config.seed):  # the adapters' random init: two runs with one seed train the same
            unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=list(LORA_TARGETS_UNET)))
            for part, encoder in family.text_modules(text_encoder).items() if train_text else ():
                encoder.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                               target_modules=family.text_lora_targets(part, encoder)))
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


