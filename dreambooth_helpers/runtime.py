"""The machine's side of a run, settled before anything heavy loads: device, precision, 8-bit Adam, attention,
the memory plan (GPU and system RAM), and the refusal to train a real model on a CPU. training.py calls
`resolve_runtime` once per run; the notebook, the app and the benchmarks call it to show or check the plan."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TINY_MODEL, TOY_MODEL, TrainConfig
from .errors import ConfigError
from .families import TINY_SDXL_MODEL, family_of
from .memory import (
    bf16_in_hardware,
    bitsandbytes_failure,
    bitsandbytes_notice,
    check_ram,
    plan_memory,
    planning_size,
    process_count,
)
from .models import SD15_RANDOM

ALLOW_CPU_VARIABLE = "DREAMBOOTH_HELPERS_ALLOW_CPU"  # set to 1 to train a real model on a CPU anyway


# Built-in models that train (or at least run) on a CPU.
CPU_MODELS = (TINY_MODEL, TOY_MODEL, SD15_RANDOM, TINY_SDXL_MODEL)


CPU_WEIGHTS_LIMIT = 200 * 2**20  # a local model with more weight bytes than this is a real one (SD 1.x: ~2-4 GB)


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
    _refuse_cpu_training(config.model, cuda, allow_cpu=allow_cpu)  # first: it needs no network
    family_of(config.model).check_training(config)
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
    ram_note = check_ram(config, planning_size(config.model), precision, gpu=cuda)  # system RAM: free Colab has 12.7 GB
    if cuda and ram_note:
        notices.append(ram_note)
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
        f"without a GPU, use --model {TOY_MODEL} (a small offline SD 1.x model) or --model {TINY_SDXL_MODEL} --lora "
        "(SDXL's structure with random weights: it trains but draws noise). To train on the CPU anyway, set "
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
