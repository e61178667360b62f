"""The memory planner: estimates, the choice of the fastest setting that fits, refusals, OOM advice."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dreambooth_helpers import Concept, ConfigError, TrainConfig, memory
from dreambooth_helpers.config import step_in_backward_allowed
from dreambooth_helpers.memory import (
    GIB,
    SD1_SIZE,
    MemorySettings,
    candidate_settings,
    estimate_memory,
    oom_advice,
    plan_memory,
)

NO_CKPT, CKPT = MemorySettings(False, False), MemorySettings(True, False)


def t4(**changes) -> TrainConfig:
    return TrainConfig.from_preset("t4", concepts=[Concept("photos", "a photo of sks dog", "a photo of dog")],
                                   **changes)


def diffusers_like(**changes) -> TrainConfig:
    """The anchor runs' setup: VAE and text encoder stay on the GPU (nothing cached), prior preservation."""
    return t4(cache_latents=False, cache_text_embeddings=False, **changes)


def peak_gib(config: TrainConfig, settings: MemorySettings, **kwargs) -> float:
    return estimate_memory(config, settings, **kwargs).peak_allocated / GIB


def test_sd1_sizes_match_the_model_built_in_code():
    from accelerate import init_empty_weights

    from dreambooth_helpers.models import build_sd15_shaped_components

    with init_empty_weights():
        components = build_sd15_shaped_components()
    size = memory.model_size(components)
    assert size == SD1_SIZE
    assert size.activation_scale == 1.0


@pytest.mark.parametrize("changes, settings, measured_gib", [
    ({"train_text_encoder": False}, CKPT, 8.90),
    ({"train_text_encoder": True}, CKPT, 9.50),
    ({"train_text_encoder": False, "lora": True}, CKPT, 3.73),
    ({"train_text_encoder": True, "lora": True}, CKPT, 3.74),
    ({"train_text_encoder": False}, NO_CKPT, 9.33),
    ({"train_text_encoder": True}, NO_CKPT, 10.08),
    ({"train_text_encoder": False, "lora": True}, NO_CKPT, 4.28),
])
def test_estimates_reproduce_the_anchor_peaks_within_15_percent(changes, settings, measured_gib):
    config = diffusers_like(lora_rank=4, **changes)
    assert peak_gib(config, settings) == pytest.approx(measured_gib, rel=0.15)


def test_estimates_grow_with_resolution_trainables_batch_and_shrink_with_each_saving():
    base = t4()
    for settings in (NO_CKPT, CKPT):
        peaks = [peak_gib(base.replace(resolution=r), settings) for r in (256, 384, 512, 768)]
        assert peaks == sorted(peaks) and len(set(peaks)) == 4
        assert peak_gib(base.replace(train_text_encoder=False), settings) < peak_gib(base, settings)
        assert peak_gib(base.replace(lora=True), settings) < peak_gib(base, settings)
        ranks = [peak_gib(base.replace(lora=True, lora_rank=r), settings) for r in (4, 16, 64)]
        assert ranks == sorted(ranks)
        assert peak_gib(base.replace(with_prior_preservation=False), settings) < peak_gib(base, settings)
        assert peak_gib(base.replace(train_batch_size=2), settings) > peak_gib(base, settings)
        assert peak_gib(base.replace(cache_latents=False), settings) > peak_gib(base, settings)
        assert peak_gib(base, settings, use_8bit_adam=False) > peak_gib(base, settings)
    assert peak_gib(base, CKPT) < peak_gib(base, NO_CKPT)
    bf16 = base.replace(mixed_precision="bf16", max_grad_norm=0.0)
    in_backward = MemorySettings(False, True)
    # No full gradient copy: 3.7 GiB less for UNet + text encoder.
    assert peak_gib(bf16, NO_CKPT) - peak_gib(bf16, in_backward) > 1.0
    frozen_text = base.replace(train_text_encoder=False)
    assert peak_gib(frozen_text.replace(cache_text_embeddings=False), CKPT) > peak_gib(frozen_text, CKPT)


def test_candidates_are_ordered_fastest_first_and_step_in_backward_only_where_it_is_exact():
    assert candidate_settings(t4()) == [NO_CKPT, CKPT]  # clipping needs every gradient
    assert candidate_settings(t4(gradient_accumulation_steps=2, max_grad_norm=0.0)) == [NO_CKPT, CKPT]
    for precision in ("fp16", "bf16"):  # fp16: the step in backward scales the loss itself
        exact = t4(max_grad_norm=0.0, mixed_precision=precision)
        assert candidate_settings(exact) == [NO_CKPT, MemorySettings(False, True), CKPT, MemorySettings(True, True)]
        assert candidate_settings(exact.replace(memory_plan="smallest")) == [MemorySettings(True, True)]
    as_set = t4(memory_plan="as-set", gradient_checkpointing=False)
    assert candidate_settings(as_set) == [NO_CKPT]


def test_the_planner_picks_the_fastest_setting_that_fits_each_free_memory_level():
    config = t4(max_grad_norm=0.0, mixed_precision="bf16")
    ordered = candidate_settings(config)
    needs = [estimate_memory(config, s).peak_reserved for s in ordered]
    assert needs[0] > needs[1] and needs[0] > needs[2] > needs[3]  # each later one is smaller than the fastest
    for free in (40 * GIB, needs[0], needs[1], needs[2] + 1, needs[3]):
        plan = plan_memory(config, free_bytes=free)
        fitting = [s for s, need in zip(ordered, needs) if need <= free]
        assert plan.settings == fitting[0]
        assert plan.estimate.peak_reserved <= free
        assert plan.reason.startswith("Memory plan: ") and "\n" not in plan.reason
    assert "the fastest setting" in plan_memory(config, free_bytes=40 * GIB).reason
    assert "the faster no gradient checkpointing needs" in plan_memory(config, free_bytes=needs[3]).reason


def test_a_t4_gets_no_checkpointing_for_full_unet_and_text_encoder():
    plan = plan_memory(t4(), free_bytes=15 * GIB)
    assert plan.settings == NO_CKPT


def test_nothing_fits_is_refused_with_the_setting_to_change():
    config = t4()
    smallest = estimate_memory(config, CKPT).peak_reserved
    with pytest.raises(ConfigError) as refused:
        plan_memory(config, free_bytes=smallest - GIB)
    message = str(refused.value)
    assert "Change this setting: --" in message and f"{(smallest - GIB) / GIB:.1f} GiB is free" in message
    option = message.split("Change this setting: ")[1].split(";")[0]
    changes = {"--no-train-text-encoder": {"train_text_encoder": False}, "--lora": {"lora": True}}[option]
    assert estimate_memory(config.replace(**changes), CKPT).peak_reserved <= smallest - GIB  # the advice works

    with pytest.raises(ConfigError, match="Change this setting: --lora"):
        plan_memory(config, free_bytes=6 * GIB)
    with pytest.raises(ConfigError, match="use a GPU with more memory"):
        plan_memory(config.replace(lora=True), free_bytes=1 * GIB)


def test_the_runtime_refuses_on_a_gpu_before_the_model_loads(monkeypatch):
    from dreambooth_helpers.training import resolve_runtime

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: 3 * GIB)
    config = t4(model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(ConfigError, match="Change th(is setting|ese settings): --"):
        resolve_runtime(config, cuda_available=True)
    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: 24 * GIB)
    runtime = resolve_runtime(config, cuda_available=True)  # no bitsandbytes here: plain AdamW
    assert runtime.gradient_checkpointing is False and runtime.step_in_backward is False
    assert any(n.startswith("Memory plan: no gradient checkpointing") for n in runtime.notices)
    assert resolve_runtime(config.replace(memory_plan="smallest"), cuda_available=True).gradient_checkpointing


def test_oom_advice_names_the_next_setting():
    fast = t4(memory_plan="as-set", gradient_checkpointing=False)
    advice = oom_advice(fast, total_bytes=14 * GIB)
    assert advice.startswith("The GPU ran out of memory") and "Change this setting: --gradient-checkpointing" in advice
    assert "Change this setting: --memory-plan smallest." in oom_advice(t4(), settings=NO_CKPT, total_bytes=14 * GIB)
    assert "Change this setting: --lora" in oom_advice(t4(), settings=CKPT, total_bytes=8 * GIB)
    assert "--memory-plan" not in oom_advice(t4(), settings=CKPT, total_bytes=8 * GIB)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """The modules a file imports at its top level, and those it imports inside functions."""
    tree = ast.parse(path.read_text())
    def names(nodes):
        return {("." * n.level + (n.module or "")) if isinstance(n, ast.ImportFrom) else a.name
                for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    top = names(tree.body)
    inside = names(n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f))
    return top, inside


def test_config_and_memory_form_no_import_circle():
    """config -> memory -> models -> config was closed by an import inside a function; now it is open."""
    package = Path(memory.__file__).parent
    config_top, config_inside = _imports(package / "config.py")
    memory_top, memory_inside = _imports(package / "memory.py")
    assert not {".memory", ".models", ".training"} & (config_top | config_inside)
    assert not config_inside and not memory_inside, "an import inside a function hides a circle"
    assert ".config" in memory_top and ".models" in memory_top
    # The rule moved with the settings it reads; the planner still uses it.
    assert memory.step_in_backward_allowed is step_in_backward_allowed
    no_clipping = t4(max_grad_norm=0.0)
    assert MemorySettings(False, True) in candidate_settings(no_clipping)
    assert MemorySettings(False, True) not in candidate_settings(t4())
