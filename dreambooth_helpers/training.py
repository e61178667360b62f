"""DreamBooth fine-tuning: the whole training loop, readable top to bottom.

`train(config)` does, in order: pick the device and precision; load the base model; read and
prepare the subject's photos; generate class images for prior preservation; encode images once
(cached VAE latents); set up which weights train (all of UNet/text encoder, or LoRA adapters); then
loop: noise a latent, predict the noise, mean-squared error for the subject plus weighted error for
the class, step the optimizer. Checkpoints, samples and a JSON summary are written along the way.

Every random draw of step k (which images, flips, noise, timesteps) comes from a generator seeded by
(seed, k), so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoints as ckpt
from .config import TrainConfig
from .data import images_to_tensor, load_instance_images, prepare_image, read_images
from .errors import ConfigError, TrainingError
from .failures import is_out_of_memory, training_out_of_memory
from .memory import plan_memory, planning_size
from .models import SDComponents, load_components, make_pipeline
from .prior import default_class_dir, ensure_class_images
from .speedups import StepInBackward, TextEmbeddingCache, live_text_embeddings, use_channels_last

LORA_TARGETS_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TARGETS_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]
NONFINITE_PATIENCE = 3  # steps in a row with a NaN/inf loss (never applied) before training stops
OVERFLOW_PATIENCE = 25  # fp16 steps in a row the loss scaler skips (scale / 2**25) before it counts as divergence


@dataclass
class TrainResult:
    output_dir: Path
    summary_path: Path
    sample_images: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    global_step: int = 0
    peak_memory_gib: float | None = None


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


def resolve_runtime(config: TrainConfig, cuda_available: bool | None = None) -> Runtime:
    """Fit the config to this machine; say in one line each what was changed and why."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    notices = []
    if not config.lora and config.effective_learning_rate > 2e-5 and config.model not in ("tiny", "toy"):
        notices.append(f"--learning-rate {config.effective_learning_rate:g} is high for a full fine-tune of SD 1.x: "
                       "expect the model to forget other subjects quickly. 1e-6..5e-6 is usual; LoRA uses ~1e-4.")
    precision, adam8, xformers = config.mixed_precision, config.use_8bit_adam, False
    if not cuda:
        if precision != "no":
            notices.append(f"No GPU: training in fp32 instead of {precision} (fine for the offline toy and tiny "
                           "models; far too slow for Stable Diffusion).")
            precision = "no"
        if adam8:
            notices.append("No GPU: bitsandbytes 8-bit AdamW needs CUDA, using plain AdamW.")
            adam8 = False
    else:
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--mixed-precision bf16 is not supported by {torch.cuda.get_device_name()} "
                              "(T4 and older): use --mixed-precision fp16.")
        if adam8:
            try:
                import bitsandbytes  # noqa: F401
            except Exception as error:  # missing, or its CUDA setup failed
                notices.append(f"bitsandbytes unavailable ({type(error).__name__}): plain AdamW, +~2.4 GiB memory. "
                               "Fix with `pip install -U bitsandbytes`.")
                adam8 = False
        if config.attention in ("auto", "xformers"):
            xformers = _xformers_works()
            if config.attention == "xformers" and not xformers:
                notices.append("xformers is not installed or not built for this torch: using PyTorch SDPA attention.")
    checkpointing, in_backward = config.gradient_checkpointing, config.step_in_backward
    if cuda:  # refuse here, before the model loads, when nothing fits
        plan = plan_memory(config, precision=precision, use_8bit_adam=adam8, size=planning_size(config.model))
        checkpointing, in_backward = plan.settings.gradient_checkpointing, plan.settings.step_in_backward
        notices.append(plan.reason)
    return Runtime("cuda" if cuda else "cpu", precision, adam8, xformers, notices, checkpointing, in_backward)


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


def _make_examples(images, prompt, components, config, runtime, vae_dtype) -> list[Example]:
    ids = _tokenize(components.tokenizer, prompt)
    examples = []
    for image in images:
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


def train(config: TrainConfig, *, progress: bool = True, on_step=None) -> TrainResult:
    """Fine-tune `config.model` on `config.concepts`. `on_step(step, logs)` is called after each step."""
    with quiet_library_logs():
        try:
            return _train(config, progress=progress, on_step=on_step)
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


def _train(config: TrainConfig, *, progress: bool, on_step) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradScalerKwargs
    from diffusers.optimization import get_scheduler

    config = config.validate()
    runtime = resolve_runtime(config)
    output_dir = Path(config.output_dir)
    # Read the photos before loading a multi-GB model, so a wrong folder fails in a second.
    for concept in config.concepts:
        load_instance_images(concept.instance_dir, 8)
    # accelerate remembers the first run's mixed precision for the whole process and refuses another; a notebook
    # may train twice (fp16, then bf16 or fp32). Forget it; the distributed state (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # The step inside backward scales the fp16 loss itself, per parameter (speedups.StepInBackward).
    own_loss_scaling = runtime.step_in_backward and runtime.mixed_precision == "fp16"
    accelerator = Accelerator(mixed_precision=runtime.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              cpu=runtime.device == "cpu",
                              kwargs_handlers=[GradScalerKwargs(enabled=False)] if own_loss_scaling else None)
    say = tqdm.write if accelerator.is_main_process else (lambda *_: None)
    for notice in runtime.notices:
        say(notice)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(runtime.mixed_precision, torch.float32)
    device = accelerator.device
    started = time.time()

    components = load_components(config.model, seed=config.seed)
    resolution = config.resolution or components.native_resolution
    if resolution % components.resolution_multiple:
        raise ConfigError(f"--resolution {resolution} does not fit this model: use a multiple of "
                          f"{components.resolution_multiple} (SD 1.x: 512).")
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    noise_scheduler = components.noise_scheduler
    train_text = config.train_text_encoder

    # --- which weights train: fp32 for everything trained (fp16 masters break loss scaling)
    set_up_trainable(unet, text_encoder, vae, config, runtime, device, weight_dtype)

    # --- data: the subject's photos, and class images for prior preservation
    instance_sets, class_sets = [], []
    for concept in config.concepts:
        images, report = load_instance_images(concept.instance_dir, resolution, config.crop)
        if report.skipped:
            say("Skipped: " + "; ".join(f"{s.name} ({s.reason})" for s in report.skipped))
        instance_sets.append(_make_examples(images, concept.instance_prompt, components, config, runtime, weight_dtype))
        if config.with_prior_preservation:
            class_dir = Path(concept.class_dir or default_class_dir(output_dir, concept.class_prompt))
            concept.class_dir = str(class_dir)
            if accelerator.is_main_process:
                pipe = make_pipeline(components).to(device)
                ensure_class_images(pipe, concept.class_prompt, class_dir, config.num_class_images,
                                    resolution=resolution, seed=config.seed, batch_size=config.class_images_batch_size,
                                    steps=config.class_images_steps, progress=progress)
                del pipe
            accelerator.wait_for_everyone()
            class_report = read_images(class_dir)
            class_images = [prepare_image(r.image, resolution, "center") for r in class_report.images]
            class_sets.append(_make_examples(class_images[:config.num_class_images], concept.class_prompt,
                                             components, config, runtime, weight_dtype))
    instances = [e for s in instance_sets for e in s]
    classes = [e for s in class_sets for e in s]
    if config.with_prior_preservation and not classes:
        raise TrainingError("Prior preservation is on but no class image could be made or read; "
                            "check --class-dir, or pass --no-prior-preservation.")
    frozen_text = TextEmbeddingCache() if config.cache_text_embeddings else live_text_embeddings
    if config.cache_text_embeddings and not train_text and runtime.device == "cuda":
        with accelerator.autocast():  # as in the loop, so cached and live embeddings are the same
            frozen_text.fill(text_encoder, [e.input_ids for e in instances + classes], device)
        text_encoder.to("cpu")  # only needed again for samples
    if config.cache_latents and runtime.device == "cuda":
        vae.to("cpu")  # the VAE is only needed again for samples; its memory goes to training
        torch.cuda.empty_cache()

    # --- optimizer and schedule
    max_steps = config.steps_for(len(instances))
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": config.effective_learning_rate}]
    if train_text:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                       "lr": config.effective_text_encoder_learning_rate})
    optimizer = _make_optimizer(groups, config, runtime)
    in_backward = optimizer if isinstance(optimizer, StepInBackward) else None  # steps inside backward
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    if train_text:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    state = ckpt.TrainingState(unet, text_encoder if train_text else None, optimizer, lr_scheduler,
                               accelerator.scaler, config.lora)
    # Now, not after an hour of training: the checkpoints and the final model must fit on the disk.
    kept = config.checkpoints_total_limit + 1 if config.checkpoint_every else 0
    ckpt.check_free_disk(output_dir, ckpt.run_bytes_needed(state, (vae, None if train_text else text_encoder), kept))
    start_step = 0
    resume_from = ckpt.resolve_resume(config.resume, output_dir)
    if resume_from is not None:
        start_step = ckpt.load_checkpoint(resume_from, state)
        say(f"Resuming from {resume_from} (step {start_step} of {max_steps}).")
    elif config.resume == "latest":
        say(f"No checkpoint in {output_dir / ckpt.CHECKPOINTS_DIR} yet: starting from step 0.")

    # --- the loop
    history: list[dict[str, Any]] = []
    samples: list[Path] = []
    metadata = {"base_model": config.model, "train_text_encoder": train_text, "config": config.to_dict()}
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="Training",
               disable=not (progress and accelerator.is_main_process))
    bad_steps = overflow_streak = 0
    for step in bar:
        text_training = train_text and (config.stop_text_encoder_training_at is None
                                        or step < config.stop_text_encoder_training_at)
        unet.train()
        text_encoder.train(text_training)
        skipped = None  # why this step's update was not applied, if it was not
        for micro in range(config.gradient_accumulation_steps):
            position = (step * config.gradient_accumulation_steps + micro) * accelerator.num_processes \
                + accelerator.process_index
            generator = torch.Generator(device.type).manual_seed(config.seed * 1_000_003 + position)
            batch = _assemble(instances, classes, position, config, generator)
            with accelerator.accumulate(unet):
                with accelerator.autocast():  # the forward pass only, see the backward below
                    latents = _latents(batch, vae, config, device, weight_dtype, generator)
                    noise = torch.randn(latents.shape, generator=generator, device=device)
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                              generator=generator, device=device)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    hidden = text_encoder(batch["input_ids"].to(device))[0] if text_training \
                        else frozen_text(text_encoder, batch["input_ids"], device)
                    prediction = unet(noisy, timesteps, hidden).sample
                    target = noise if noise_scheduler.config.prediction_type == "epsilon" \
                        else noise_scheduler.get_velocity(latents, noise, timesteps)
                    loss, instance_loss, prior_loss = dreambooth_loss(prediction, target, batch["num_instance"],
                                                                      config.prior_loss_weight)
                # A NaN/inf forward loss is never applied (no backward, no step), so the weights stay those
                # of the last good step. The fp16 loss scaler cannot catch this: it only inspects gradients.
                if not torch.isfinite(loss.detach()):
                    skipped = "the loss was NaN/inf"
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
        loss_value = float(loss.detach())
        bad_steps = bad_steps + 1 if skipped else 0
        if bad_steps >= NONFINITE_PATIENCE:
            raise TrainingError(_diverged_message(step + 1, skipped, config, output_dir))
        # fp16 gradients that overflow are normal: the scaler skips that update and halves its scale. Only a
        # long run of them (the scale collapsing) means training itself went wrong.
        overflowed = skipped is None and (bool(getattr(optimizer, "step_was_skipped", False)) or bool(
            in_backward and in_backward.loss_scale is not None and in_backward.last_step_nonfinite))
        overflow_streak = overflow_streak + 1 if overflowed else 0
        if overflow_streak >= OVERFLOW_PATIENCE:
            raise TrainingError(_diverged_message(step + 1, "fp16 gradients overflowed", config, output_dir,
                                                  OVERFLOW_PATIENCE))
        logs = {"step": step + 1, "loss": loss_value, "instance_loss": float(instance_loss.detach()),
                "prior_loss": None if prior_loss is None else float(prior_loss.detach()),
                "lr": lr_scheduler.get_last_lr()[0], "text_encoder_training": text_training,
                "time": round(time.time() - started, 3),
                "skipped": skipped or ("fp16 overflow: loss scale lowered" if overflowed else None)}
        history.append(logs)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{logs['lr']:.2e}")
        if on_step is not None:
            on_step(step + 1, logs)
        done = step + 1
        # Not while updates are being skipped: the checkpoint before the trouble is the one to keep.
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < max_steps and not bad_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                ckpt.save_checkpoint(output_dir, done, state, metadata, config.checkpoints_total_limit)
        if config.sample_every and done % config.sample_every == 0 and accelerator.is_main_process:
            samples += _save_samples(components, accelerator, unet, text_encoder, config, resolution, done, output_dir)
    bar.close()

    # --- outputs
    accelerator.wait_for_everyone()
    result = TrainResult(output_dir, output_dir / ckpt.SUMMARY_FILE, samples, [h["loss"] for h in history],
                         max_steps, _peak_memory_gib())
    if accelerator.is_main_process:
        if config.checkpoint_every:  # the last step too, so a later --resume latest has it
            ckpt.save_checkpoint(output_dir, max_steps, state, metadata, config.checkpoints_total_limit)
        if config.sample_every and max_steps % config.sample_every:
            samples += _save_samples(components, accelerator, unet, text_encoder, config, resolution, max_steps,
                                     output_dir)
        _save_final_model(components, accelerator, unet, text_encoder if train_text else None, config, output_dir)
        summary = {**metadata, "lora": config.lora, "resolution": resolution, "steps": max_steps,
                   "resumed_from_step": start_step, "instance_prompts": [c.instance_prompt for c in config.concepts],
                   "class_prompts": [c.class_prompt for c in config.concepts], "num_instance_images": len(instances),
                   "num_class_images": len(classes), "device": runtime.device,
                   "mixed_precision": runtime.mixed_precision, "optimizer": type(optimizer.optimizer).__name__,
                   "notices": runtime.notices, "wall_time_s": round(time.time() - started, 2),
                   "peak_gpu_memory_gib": result.peak_memory_gib, "history": history,
                   "losses": result.losses, "versions": _versions()}
        ckpt.write_json_atomically(result.summary_path, summary)
    result.sample_images = samples
    return result


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
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS_UNET))
        if train_text:
            text_encoder.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                target_modules=LORA_TARGETS_TEXT))
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
                      patience: int = NONFINITE_PATIENCE) -> str:
    """Why training stopped on NaN/inf, what to change, and which checkpoint is still good."""
    good = ckpt.list_checkpoints(output_dir)
    lr = config.effective_learning_rate
    kept = (f"The last good checkpoint, {good[-1]}, is kept: after the change, continue with --resume latest."
            if good else "No checkpoint was saved yet; --checkpoint-every N keeps progress for a resume.")
    precision = " or --mixed-precision bf16 (no fp16 overflow)" if config.mixed_precision == "fp16" else ""
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


def _assemble(instances, classes, position: int, config: TrainConfig, generator) -> dict[str, Any]:
    """The instance examples of this position, then as many class examples (prior preservation)."""
    size = config.train_batch_size
    chosen = [instances[_pick(len(instances), position * size + k, config.seed)] for k in range(size)]
    if classes:
        chosen += [classes[_pick(len(classes), position * size + k, config.seed + 1)] for k in range(size)]
    flips = [int(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(config.seed + position * 31 + k)))
             if config.random_flip else 0 for k in range(len(chosen))]
    return {"examples": chosen, "flips": flips, "num_instance": size,
            "input_ids": torch.stack([e.input_ids for e in chosen])}


def _latents(batch, vae, config: TrainConfig, device, vae_dtype, generator) -> torch.Tensor:
    """Latents for the batch: sampled from the cached distribution, or encoded now."""
    pairs = list(zip(batch["examples"], batch["flips"]))
    if config.cache_latents:
        mean = torch.stack([e.latent_mean[f] for e, f in pairs]).to(device)
        std = torch.stack([e.latent_std[f] for e, f in pairs]).to(device)
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=device)
    else:
        pixels = torch.stack([e.pixels[f] for e, f in pairs]).to(device, vae_dtype)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        sample = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, device=device,
                                                     dtype=dist.mean.dtype)).float()
    return sample * vae.config.scaling_factor


def _save_samples(components: SDComponents, accelerator, unet, text_encoder, config, resolution, step,
                  output_dir: Path) -> list[Path]:
    """Images from fixed prompts and seeds, to watch the subject appear (and overfitting start)."""
    from diffusers import DPMSolverMultistepScheduler

    prompts = config.sample_prompts or [c.instance_prompt for c in config.concepts]
    device = accelerator.device
    vae_device = next(components.vae.parameters()).device
    text_device = next(components.text_encoder.parameters()).device  # on the CPU when its embeddings are cached
    components.vae.to(device)
    components.text_encoder.to(device)
    pipe = make_pipeline(components, unet=accelerator.unwrap_model(unet),
                         text_encoder=accelerator.unwrap_model(text_encoder))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(components.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    folder = output_dir / "samples"
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
        ckpt.replace_atomically(staging, output_dir, ckpt.LORA_WEIGHTS)
        return
    pipe = make_pipeline(components, unet=unet, text_encoder=text_encoder or components.text_encoder)
    pipe.to(torch.float32)  # one dtype for every part, so a plain from_pretrained runs as is
    pipe.save_pretrained(staging, safe_serialization=True)
    ckpt.replace_atomically(staging, output_dir, "model_index.json")


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
