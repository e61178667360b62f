"""The training engine on the tiny model: what trains, that it optimises, prior preservation, outputs, resume."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_helpers import Concept, ConfigError, load_components, prior
from dreambooth_helpers import checkpoints as ckpt
from dreambooth_helpers.data import images_to_tensor, load_instance_images
from dreambooth_helpers.errors import TrainingError
from dreambooth_helpers.files import SUMMARY_FILE
from dreambooth_helpers.run_identity import find_finished_run
from dreambooth_helpers.training import _assemble, dreambooth_loss, resolve_runtime, train
from tests.conftest import draw_subject


def _weights(folder, sub):
    return load_file(next((folder / sub).glob("*.safetensors")))


def _base():
    return load_components("tiny")


def _max_change(before: dict, after: dict) -> float:
    return max((after[k].float() - before[k].float()).abs().max().item() for k in before)


def test_full_training_changes_unet_and_text_encoder_only_when_asked(make_config, tmp_path):
    base = _base()
    frozen_text = make_config(train_text_encoder=False, output_dir=str(tmp_path / "a"), learning_rate=1e-4)
    train(frozen_text, progress=False)
    out = tmp_path / "a"
    assert _max_change(base.unet.state_dict(), _weights(out, "unet")) > 0
    assert _max_change(base.text_encoder.state_dict(), _weights(out, "text_encoder")) == 0
    assert _max_change(base.vae.state_dict(), _weights(out, "vae")) == 0

    with_text = make_config(train_text_encoder=True, output_dir=str(tmp_path / "b"), learning_rate=1e-4)
    train(with_text, progress=False)
    assert _max_change(base.text_encoder.state_dict(), _weights(tmp_path / "b", "text_encoder")) > 0


def test_lora_changes_only_adapters_and_loads_with_load_lora_weights(make_config, tmp_path):
    from diffusers import StableDiffusionPipeline  # noqa: F401  (load_lora_weights lives on it)

    from dreambooth_helpers.models import make_pipeline

    config = make_config(lora=True, lora_rank=4, learning_rate=1e-2, train_text_encoder=True)
    result = train(config, progress=False)
    lora_file = result.output_dir / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()
    assert not (result.output_dir / "model_index.json").exists()
    saved = load_file(lora_file)
    assert saved and all("lora" in k for k in saved)
    assert any(k.startswith("unet.") for k in saved) and any(k.startswith("text_encoder.") for k in saved)

    base_pipe = make_pipeline(_base())
    prompt_kwargs = dict(prompt="a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np")
    before = base_pipe(**prompt_kwargs, generator=torch.Generator().manual_seed(0)).images
    tuned = make_pipeline(_base())
    # weight_name given: diffusers < 0.42 (Colab's 0.39) refuses to guess it under HF_HUB_OFFLINE, even for a folder.
    tuned.load_lora_weights(str(result.output_dir), weight_name="pytorch_lora_weights.safetensors")
    after = tuned(**prompt_kwargs, generator=torch.Generator().manual_seed(0)).images
    assert abs(after - before).max() > 1e-4  # the adapters change what the model draws
    # Base weights untouched: the LoRA run leaves the UNet's own parameters as they were.
    fresh = _base().unet.state_dict()
    tuned_unet = {k.replace(".base_layer", ""): v for k, v in tuned.unet.state_dict().items() if "lora" not in k}
    assert max((fresh[k] - tuned_unet[k]).abs().max().item() for k in fresh) == 0


def _held_out_loss(components, instance_dir, prompt="a photo of sks dog") -> float:
    """Denoising error on fixed noise and timesteps that training never drew."""
    images, _ = load_instance_images(instance_dir, 32)
    generator = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        latents = components.vae.encode(images_to_tensor(images)).latent_dist.mean
        latents = latents * components.vae.config.scaling_factor
        ids = components.tokenizer([prompt] * len(images), padding="max_length", max_length=77,
                                   return_tensors="pt").input_ids
        hidden = components.text_encoder(ids)[0]
        total = 0.0
        for _ in range(4):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
            noisy = components.noise_scheduler.add_noise(latents, noise, t)
            total += torch.nn.functional.mse_loss(components.unet(noisy, t, hidden).sample, noise).item()
    return total / 4


def test_training_optimises_the_held_out_instance_loss(make_config, instance_dir):
    config = make_config(max_train_steps=30, learning_rate=1e-3, with_prior_preservation=False)
    before = _held_out_loss(_base(), instance_dir)
    result = train(config, progress=False)
    after = _held_out_loss(load_components(str(result.output_dir)), instance_dir)
    assert after <= 0.7 * before, (before, after)


def test_prior_preservation_batches_hold_class_images_and_loss_uses_the_weight(make_config):
    config = make_config(prior_loss_weight=0.3, max_train_steps=3)
    as_given = copy.deepcopy(config)
    logs = []
    result = train(config, progress=False, on_step=lambda step, entry: logs.append(entry))
    assert config == as_given and config.concepts[0].class_dir is None  # train() never changes its caller's config
    assert len(logs) == 3
    for entry in logs:
        assert entry["prior_loss"] is not None
        assert entry["loss"] == pytest.approx(entry["instance_loss"] + 0.3 * entry["prior_loss"], rel=1e-5)
    summary = json.loads(result.summary_path.read_text())
    assert summary["num_class_images"] == 2
    class_dir = prior.class_dir_for(config, config.concepts[0])
    assert class_dir == prior.default_class_dir(config.output_dir, "a photo of dog")
    assert len(list(class_dir.glob("class-*.png"))) == 2

    # A batch: instance examples first (instance prompt), then as many class examples (class prompt).
    tokenizer = _base().tokenizer
    from dreambooth_helpers.training import Example

    ids = {p: tokenizer(p, padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
           for p in ("a photo of sks dog", "a photo of dog")}
    instances = [Example(None, torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), ids["a photo of sks dog"])] * 3
    classes = [Example(None, torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), ids["a photo of dog"])] * 5
    batch = _assemble(instances, classes, 7, config.replace(train_batch_size=2), torch.device("cpu"))
    assert batch["num_instance"] == 2
    assert torch.equal(batch["input_ids"][:2], ids["a photo of sks dog"].expand(2, -1))
    assert torch.equal(batch["input_ids"][2:], ids["a photo of dog"].expand(2, -1))


def test_loss_weighting_is_exact():
    prediction = torch.tensor([[1.0], [3.0]])
    target = torch.zeros(2, 1)
    total, instance, prior = dreambooth_loss(prediction, target, num_instance=1, prior_weight=0.5)
    assert instance.item() == 1.0 and prior.item() == 9.0 and total.item() == 5.5
    total, instance, prior = dreambooth_loss(prediction[:1], target[:1], num_instance=1, prior_weight=0.5)
    assert prior is None and total.item() == 1.0


def test_saved_folder_loads_in_plain_diffusers_and_generates(make_config):
    from diffusers import StableDiffusionPipeline

    drawn = {}
    result = train(make_config(max_train_steps=3, sample_every=2), progress=False,
                   on_step=lambda step, logs: drawn.update({step: logs["samples"]}))
    # Samples reach on_step with the step that drew them (every 2 steps, and always the last), as strings.
    assert [len(drawn[step]) for step in (1, 2, 3)] == [0, 1, 1]
    assert [Path(p) for p in drawn[2] + drawn[3]] == result.sample_images
    assert all(Path(p).is_file() and Path(p).name.startswith(f"step-{s:06d}") for s in (2, 3) for p in drawn[s])
    pipe = StableDiffusionPipeline.from_pretrained(str(result.output_dir))
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    summary = json.loads(result.summary_path.read_text())
    assert summary["steps"] == 3 and len(summary["history"]) == 3 and summary["versions"]["torch"]
    assert {"loss", "lr", "time", "samples"} <= set(summary["history"][0])
    assert [h["samples"] for h in summary["history"]] == [drawn[1], drawn[2], drawn[3]]
    assert "samples" not in summary  # kept once, with the step that drew them
    assert not (result.output_dir / ".saving-model").exists()


def test_resume_gives_the_same_weights_as_a_straight_run(make_config, tmp_path):
    straight = make_config(max_train_steps=6, checkpoint_every=3, output_dir=str(tmp_path / "straight"),
                           learning_rate=1e-3, lr_scheduler="linear")
    train(straight, progress=False)
    # A second run that only has the step-3 checkpoint, as after a disconnect, and resumes it.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/checkpoint-000003", resumed_dir / "checkpoints/checkpoint-000003")
    shutil.copytree(tmp_path / "straight/class_images", resumed_dir / "class_images")
    result = train(straight.replace(output_dir=str(resumed_dir), resume="latest"), progress=False)
    summary = json.loads(result.summary_path.read_text())
    assert summary["resumed_from_step"] == 3
    # No checkpoint at the last step: the finished model stands for it.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "straight")] == ["checkpoint-000003"]
    # The history covers every step, the first part's from the checkpoint, and matches the straight run's.
    straight_summary = json.loads((tmp_path / "straight" / SUMMARY_FILE).read_text())
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert result.losses == pytest.approx(straight_summary["losses"], rel=1e-4)
    for sub in ("unet", "text_encoder"):
        a, b = _weights(tmp_path / "straight", sub), _weights(resumed_dir, sub)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, sub


def test_text_encoder_stops_training_after_n_steps(make_config, tmp_path):
    config = make_config(max_train_steps=4, stop_text_encoder_training_at=2, checkpoint_every=2,
                         learning_rate=1e-3)
    logs = []
    result = train(config, progress=False, on_step=lambda s, e: logs.append(e["text_encoder_training"]))
    assert logs == [True, True, False, False]
    at_two = _weights(result.output_dir / "checkpoints/checkpoint-000002", "text_encoder")
    final = _weights(result.output_dir, "text_encoder")
    assert max((at_two[k] - final[k]).abs().max().item() for k in at_two) == 0


def test_several_concepts_train_together(make_config, tmp_path, instance_dir):
    second = tmp_path / "second"
    shutil.copytree(instance_dir, second)
    config = make_config(concepts=[Concept(str(instance_dir), "a photo of sks dog", "a photo of dog"),
                                   Concept(str(second), "a photo of zwx cat", "a photo of cat")], max_train_steps=2)
    result = train(config, progress=False)
    summary = json.loads(result.summary_path.read_text())
    assert summary["instance_prompts"] == ["a photo of sks dog", "a photo of zwx cat"]
    assert summary["num_class_images"] == 4  # two per concept


def test_v_prediction_models_train(make_config, tmp_path):
    from dreambooth_helpers.models import build_tiny_components, make_pipeline

    folder = tmp_path / "vpred"
    make_pipeline(build_tiny_components(prediction_type="v_prediction")).save_pretrained(folder)
    result = train(make_config(model=str(folder), max_train_steps=2, with_prior_preservation=False), progress=False)
    scheduler = json.loads((result.output_dir / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_runtime_falls_back_without_a_gpu_and_says_so(make_config):
    runtime = resolve_runtime(make_config(mixed_precision="fp16", use_8bit_adam=True), cuda_available=False)
    assert runtime.device == "cpu" and runtime.mixed_precision == "no" and not runtime.use_8bit_adam
    assert any("8-bit AdamW" in n for n in runtime.notices) and any("fp32" in n for n in runtime.notices)


def test_bad_resolution_is_refused_before_training(make_config):
    with pytest.raises(ConfigError, match="--resolution must be a multiple of 8"):
        train(make_config(resolution=36), progress=False)


def test_missing_instance_folder_fails_before_loading_the_model(make_config, tmp_path):
    config = make_config(concepts=[Concept(str(tmp_path / "nope"), "a sks dog", "a dog")])
    with pytest.raises(Exception, match="does not exist"):
        train(config, progress=False)


def test_one_process_can_train_twice_with_different_mixed_precision(make_config, tmp_path, monkeypatch):
    """A notebook session trains, changes its mind about precision, and trains again."""
    import dataclasses

    from dreambooth_helpers import training

    real_resolve = training.resolve_runtime
    for run, precision in enumerate(("no", "bf16", "no")):  # bf16 autocast also runs on a CPU
        monkeypatch.setattr(training, "resolve_runtime", lambda config, p=precision, **kw: dataclasses.replace(
            real_resolve(config, **kw), mixed_precision=p))
        result = training.train(make_config(output_dir=str(tmp_path / f"run{run}"), max_train_steps=1,
                                             with_prior_preservation=False), progress=False)
        assert (result.output_dir / "model_index.json").exists()


def test_rerunning_a_finished_run_reuses_it_and_find_finished_run_knows_it(make_config, tmp_path, instance_dir):
    config = make_config(max_train_steps=2, checkpoint_every=1, with_prior_preservation=False, learning_rate=1e-3)
    first = train(config, progress=False)
    assert find_finished_run(config).losses == first.losses
    summary_before = first.summary_path.read_bytes()
    model_file = first.output_dir / "unet/diffusion_pytorch_model.safetensors"
    written_at = model_file.stat().st_mtime_ns

    # What the notebook's cells do after a disconnect: run again with resume "latest". Nothing trains or changes,
    # and the run says so through on_notice (the notebook puts it in its own words).
    steps, notices = [], []
    again = train(config.replace(resume="latest"), progress=False, on_step=lambda step, logs: steps.append(step),
                  on_notice=notices.append)
    assert again.reused and steps == [] and again.losses == first.losses and again.global_step == 2
    assert first.summary_path.read_bytes() == summary_before and model_file.stat().st_mtime_ns == written_at
    assert [n for n in notices if "already holds this run, finished (2 steps)" in n], notices

    # Settings that do not change the weights (outputs, memory and speed) leave it the same run.
    assert find_finished_run(config.replace(sample_every=1, checkpoints_total_limit=5, checkpoint_every=None,
                                            gradient_checkpointing=False, memory_plan="smallest",
                                            cache_latents=False, mixed_precision="bf16")) is not None
    assert find_finished_run(config, max_steps=2) is not None  # the notebook knows the steps
    # Another config is another model: not finished.
    assert find_finished_run(config.replace(learning_rate=2e-3)) is None
    assert find_finished_run(config.replace(max_train_steps=3)) is None
    assert find_finished_run(config, max_steps=3) is None
    assert find_finished_run(config.replace(lora=True)) is None
    assert find_finished_run(config.replace(prior_loss_weight=0.5)) is None
    assert find_finished_run(config.replace(train_batch_size=2)) is None
    # The same photos in another folder are the same run; one photo replaced (the same count) is another run.
    same, other = tmp_path / "same-photos", tmp_path / "other-photos"
    shutil.copytree(instance_dir, same)
    shutil.copytree(instance_dir, other)
    draw_subject(other / "photo1.png", 9)
    for folder, finished in ((same, True), (other, False)):
        moved = config.replace(concepts=[Concept(str(folder), "a photo of sks dog", "a photo of dog")])
        assert (find_finished_run(moved) is not None) == finished, folder
        assert (find_finished_run(moved, max_steps=2) is not None) == finished, folder
    (first.output_dir / "model_index.json").unlink()  # the model's marker: a half-saved model is not finished
    assert find_finished_run(config) is None


def test_a_checkpoint_at_the_last_step_without_its_model_saves_the_model_and_keeps_the_history(make_config,
                                                                                               tmp_path):
    longer = make_config(max_train_steps=4, checkpoint_every=2, with_prior_preservation=False, learning_rate=1e-3,
                         output_dir=str(tmp_path / "longer"))
    train(longer, progress=False)
    # A 2-step run that crashed after a checkpoint at step 2 (older versions saved one at the last step) and before
    # saving its model. The 4-step run's step-2 checkpoint stands in for it, relabelled as a 2-step run's: with a
    # constant learning rate its weights are the same.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "longer/checkpoints/checkpoint-000002", crashed / "checkpoints/checkpoint-000002")
    state_file = crashed / "checkpoints/checkpoint-000002/state.json"
    state = json.loads(state_file.read_text())
    state["identity"]["max_train_steps"] = 2
    state_file.write_text(json.dumps(state))
    steps = []
    result = train(longer.replace(max_train_steps=2, output_dir=str(crashed), resume="latest"), progress=False,
                   on_step=lambda step, logs: steps.append(step))
    assert steps == [] and not result.reused
    checkpoint_unet = _weights(crashed / "checkpoints/checkpoint-000002", "unet")
    assert _max_change(checkpoint_unet, _weights(crashed, "unet")) == 0
    summary = json.loads(result.summary_path.read_text())
    longer_losses = json.loads((tmp_path / "longer" / SUMMARY_FILE).read_text())["losses"]
    assert summary["steps"] == 2 and summary["losses"] == longer_losses[:2]


def test_a_real_model_on_a_cpu_is_refused_up_front_unless_asked(make_config, tmp_path):
    real = make_config(model="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512)
    with pytest.raises(ConfigError, match="no GPU.*T4 GPU.*--model toy.*DREAMBOOTH_HELPERS_ALLOW_CPU=1"):
        resolve_runtime(real, cuda_available=False)
    assert resolve_runtime(real, cuda_available=False, allow_cpu=True).device == "cpu"
    # The built-in models, and a small local model, train on a CPU.
    from dreambooth_helpers.models import build_tiny_components, make_pipeline

    make_pipeline(build_tiny_components()).save_pretrained(tmp_path / "small")
    for model in ("tiny", "toy", "sd15-random", str(tmp_path / "small")):
        assert resolve_runtime(make_config(model=model), cuda_available=False).device == "cpu"


def _notices_and_steps():
    notices, steps = [], []
    return notices, steps, dict(progress=False, on_notice=notices.append, on_step=lambda step, logs: steps.append(step))


def test_a_run_never_resumes_from_nor_prunes_for_another_runs_checkpoints(make_config, tmp_path):
    out = tmp_path / "out"
    run_a = make_config(max_train_steps=8, checkpoint_every=2, checkpoints_total_limit=1, learning_rate=1e-3,
                        with_prior_preservation=False, output_dir=str(out))
    run_b = run_a.replace(learning_rate=2e-3, max_train_steps=4)
    train(run_a, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-000006"]

    # B in the same folder, started fresh (the notebook's TRAIN_AGAIN): its checkpoint at step 2 is kept, and A's,
    # which B can never resume from, is gone.
    _, steps, hooks = _notices_and_steps()
    train(run_b, **hooks)
    assert steps == [1, 2, 3, 4]
    saved = ckpt.list_checkpoints(out)
    assert [p.name for p in saved] == ["checkpoint-000002"]
    assert json.loads((saved[0] / "state.json").read_text())["config"]["learning_rate"] == 2e-3
    b_unet = _weights(out, "unet")

    # A again, then B with resume "latest" (the notebook sets it whenever checkpoints exist): A's checkpoint is
    # passed over with a notice saying why, B trains from step 0 and ends with its own weights.
    train(run_a, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-000006"]
    notices, steps, hooks = _notices_and_steps()
    result = train(run_b.replace(resume="latest"), **hooks)
    assert steps == [1, 2, 3, 4]
    assert [n for n in notices if n.startswith("checkpoint-000006 was saved by a run with other settings")
            and "--learning-rate" in n and "--max-train-steps" in n], notices
    assert [n for n in notices if "starting from step 0" in n], notices
    summary = json.loads(result.summary_path.read_text())
    assert summary["resumed_from_step"] == 0 and summary["config"]["learning_rate"] == 2e-3
    assert _max_change(b_unet, _weights(out, "unet")) < 1e-6
    # And B interrupted after step 2 resumes from its own checkpoint.
    (out / "model_index.json").unlink()
    notices, steps, hooks = _notices_and_steps()
    train(run_b.replace(resume="latest"), **hooks)
    assert steps == [3, 4] and [n for n in notices if "checkpoint-000002 (step 2 of 4)" in n], notices


def test_resuming_another_runs_checkpoint_by_its_path_is_refused_before_training(make_config, tmp_path):
    run_a = make_config(max_train_steps=4, checkpoint_every=2, learning_rate=1e-3, with_prior_preservation=False,
                        output_dir=str(tmp_path / "a"))
    train(run_a, progress=False)
    checkpoint = tmp_path / "a/checkpoints/checkpoint-000002"
    _, steps, hooks = _notices_and_steps()
    # The text encoder's rate follows the UNet's, so both differ.
    with pytest.raises(TrainingError, match=r"was saved by a run with other settings \(--learning-rate, "
                                            r"--text-encoder-learning-rate\).*Resume it with the settings it was "
                                            r"saved with.*or train without --resume"):
        train(run_a.replace(learning_rate=2e-3, output_dir=str(tmp_path / "b"), resume=str(checkpoint)), **hooks)
    assert steps == []
    # The same run (its output folder aside) resumes it.
    _, steps, hooks = _notices_and_steps()
    result = train(run_a.replace(output_dir=str(tmp_path / "b"), resume=str(checkpoint)), **hooks)
    assert steps == [3, 4] and json.loads(result.summary_path.read_text())["resumed_from_step"] == 2


def test_a_run_continues_to_more_steps_when_the_schedule_does_not_read_the_step_count(make_config, tmp_path):
    """After a disconnect, asking for more steps continues the run instead of starting over (and rotating its
    checkpoints away); a schedule that depends on the step count (linear) is another run."""
    short = make_config(max_train_steps=2, checkpoint_every=1, with_prior_preservation=False, learning_rate=1e-3,
                        output_dir=str(tmp_path / "run"))
    train(short, progress=False)
    notices, steps = [], []
    result = train(short.replace(max_train_steps=4, resume="latest"), progress=False, on_notice=notices.append,
                   on_step=lambda step, logs: steps.append(step))
    assert steps == [2, 3, 4] and not result.reused
    assert any("continuing it to 4 steps" in notice for notice in notices)
    straight = train(short.replace(max_train_steps=4, output_dir=str(tmp_path / "straight")), progress=False)
    assert _max_change(_weights(result.output_dir, "unet"), _weights(straight.output_dir, "unet")) == 0

    linear = short.replace(lr_scheduler="linear", output_dir=str(tmp_path / "linear"))
    train(linear, progress=False)
    steps.clear()
    train(linear.replace(max_train_steps=4, resume="latest"), progress=False, on_step=lambda s, logs: steps.append(s))
    assert steps == [1, 2, 3, 4]
