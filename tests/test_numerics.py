"""NaN/inf losses and gradients, fp16 loss-scaler overflow, and CUDA out-of-memory, simulated on a CPU."""

from __future__ import annotations

import json
import re

import accelerate
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_helpers import checkpoints as ckpt
from dreambooth_helpers import failures, training
from dreambooth_helpers.errors import DreamBoothError, TrainingError
from dreambooth_helpers.files import SUMMARY_FILE
from dreambooth_helpers.training import train


def weights(folder, sub="unet"):
    return load_file(next((folder / sub).glob("*.safetensors")))


def all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


def loss_that_turns_bad(bad_calls: dict[int, str]):
    """A dreambooth_loss whose call number k (1-based) in `bad_calls` gives a NaN loss ("loss") or a finite
    loss with NaN gradients ("gradient")."""
    real = training.dreambooth_loss
    calls = {"n": 0}

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return torch.full_like(grad, float("nan"))

    def loss(prediction, target, num_instance, prior_weight):
        calls["n"] += 1
        if calls["n"] in bad_calls:
            if bad_calls[calls["n"]] == "loss":
                prediction = prediction * float("nan")
            else:
                prediction = NanGradient.apply(prediction)
        return real(prediction, target, num_instance, prior_weight)

    return loss


def test_a_nan_loss_stops_training_with_an_explanation_and_keeps_the_last_good_checkpoint(make_config, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(training, "dreambooth_loss", loss_that_turns_bad(dict.fromkeys(range(3, 100), "loss")))
    config = make_config(max_train_steps=10, checkpoint_every=2, checkpoints_total_limit=1, learning_rate=1e-3,
                         with_prior_preservation=False)
    with pytest.raises(TrainingError) as caught:
        train(config, progress=False)
    message = str(caught.value)
    assert "step 5" in message and "the loss was NaN/inf on 3 steps in a row" in message
    assert "Lower --learning-rate (now 0.001" in message and "--resume latest" in message
    out = tmp_path / "out"
    assert "checkpoint-000002" in message
    # Step 4 came during the NaN run: no checkpoint there, so rotation kept step 2.
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-000002"]
    assert all_finite(weights(out / "checkpoints/checkpoint-000002"))
    assert not (out / "model_index.json").exists() and not (out / SUMMARY_FILE).exists()


def test_single_nan_losses_and_nan_gradients_are_skipped_not_applied_and_training_goes_on(make_config, monkeypatch):
    monkeypatch.setattr(training, "dreambooth_loss", loss_that_turns_bad({3: "loss", 5: "gradient"}))
    snapshots, logs = {}, []

    def watch(step, entry):
        logs.append(entry)
    real_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        snapshots[len(snapshots)] = [p.detach().clone() for g in self.param_groups for p in g["params"]][:3]
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    result = train(make_config(max_train_steps=6, learning_rate=1e-3, with_prior_preservation=False),
                   progress=False, on_step=watch)
    assert [entry["skipped"] for entry in logs] == [None, None, "the loss was NaN/inf", None,
                                                     "the gradients were NaN/inf", None]
    assert len(snapshots) == 4  # the optimizer stepped on the four good steps only
    assert all(torch.isfinite(torch.tensor(result.losses[:2] + result.losses[3:])))
    assert all_finite(weights(result.output_dir)) and all_finite(weights(result.output_dir, "text_encoder"))
    summary = json.loads(result.summary_path.read_text())
    assert summary["history"][2]["skipped"] == "the loss was NaN/inf"


def test_nan_gradients_with_the_step_inside_backward_leave_the_weights_and_are_marked_skipped(make_config,
                                                                                              monkeypatch):
    """The per-weight step has no clipping norm to look at: its own check keeps NaN out and marks the step."""
    monkeypatch.setattr(training, "dreambooth_loss", loss_that_turns_bad({2: "gradient"}))
    logs = []
    config = make_config(max_train_steps=3, learning_rate=1e-3, with_prior_preservation=False, max_grad_norm=0.0,
                         step_in_backward=True, memory_plan="as-set")
    result = train(config, progress=False, on_step=lambda step, entry: logs.append(entry))
    assert logs[0]["skipped"] is None and logs[2]["skipped"] is None
    assert re.fullmatch(r"the gradients of \d+ weights were NaN/inf", logs[1]["skipped"])
    assert all_finite(weights(result.output_dir)) and all_finite(weights(result.output_dir, "text_encoder"))

    monkeypatch.setattr(training, "dreambooth_loss", loss_that_turns_bad({1: "gradient", 2: "gradient",
                                                                          3: "gradient"}))
    with pytest.raises(TrainingError, match="NaN/inf"):  # three in a row: diverged
        train(config.replace(output_dir=config.output_dir + "-2"), progress=False)


def test_nan_weights_are_never_saved_as_a_checkpoint_or_model(make_config, tmp_path, monkeypatch):
    # No gradient clipping, so nothing inspects the gradients: the NaN reaches the weights at step 2.
    monkeypatch.setattr(training, "dreambooth_loss", loss_that_turns_bad({2: "gradient"}))
    config = make_config(max_train_steps=4, checkpoint_every=1, checkpoints_total_limit=1, max_grad_norm=0.0,
                         learning_rate=1e-3, with_prior_preservation=False)
    with pytest.raises(TrainingError, match=r"Not saving checkpoint 2: its weights contain NaN/inf") as caught:
        train(config, progress=False)
    out = tmp_path / "out"
    assert "checkpoint-000001, is kept" in str(caught.value)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-000001"]
    assert all_finite(weights(out / "checkpoints/checkpoint-000001"))
    assert not (out / "model_index.json").exists()


def test_the_final_model_is_not_written_with_nan_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match=r"Not saving the final model: .*\(weight\).*No checkpoint was saved"):
        ckpt.require_finite_weights((model, None), "the final model", tmp_path)
    model.weight.requires_grad_(False)  # frozen weights are the base model's: not checked
    ckpt.require_finite_weights((model, None), "the final model", tmp_path)


class OverflowingScaler(torch.amp.GradScaler):
    """A real GradScaler whose first `overflows` scaled losses come out as inf, so their gradients are inf
    exactly as overflowing fp16 gradients are on a GPU; skipping the step and lowering the scale is the
    scaler's own logic."""

    def __init__(self, overflows: int):
        super().__init__("cpu", init_scale=2.0**16)
        self.overflows = overflows

    def scale(self, outputs):
        scaled = super().scale(outputs)
        if self.overflows > 0:
            self.overflows -= 1
            return scaled * float("inf")
        return scaled


class OverflowingScalerAccelerator(accelerate.Accelerator):
    """An Accelerator with a loss scaler on the CPU. Accelerate unscales before clipping only for fp16 on a
    GPU; here it is asked to always, as it would there."""

    overflows = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = OverflowingScaler(self.overflows)

    def unscale_gradients(self, optimizer=None):
        for wrapped in self._optimizers if optimizer is None else [optimizer]:
            self.scaler.unscale_(getattr(wrapped, "optimizer", wrapped))


def test_fp16_overflow_handled_by_the_loss_scaler_is_not_an_error(make_config, monkeypatch):
    monkeypatch.setattr(accelerate, "Accelerator", OverflowingScalerAccelerator)
    logs = []
    config = make_config(max_train_steps=4, learning_rate=1e-3, with_prior_preservation=False)
    result = train(config, progress=False, on_step=lambda step, entry: logs.append(entry))
    overflow = "fp16 overflow: loss scale lowered"
    assert [entry["skipped"] for entry in logs] == [overflow, overflow, None, None]  # skipped, then applied
    assert all(torch.isfinite(torch.tensor([entry["loss"] for entry in logs])))
    assert all_finite(weights(result.output_dir))
    base = training.load_components("tiny").unet.state_dict()
    trained = weights(result.output_dir)
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 0


def test_a_scaler_that_never_recovers_stops_with_advice(make_config, monkeypatch):
    monkeypatch.setattr(OverflowingScalerAccelerator, "overflows", 1000)
    monkeypatch.setattr(accelerate, "Accelerator", OverflowingScalerAccelerator)
    monkeypatch.setattr(training, "OVERFLOW_PATIENCE", 3)
    config = make_config(max_train_steps=5, with_prior_preservation=False)
    with pytest.raises(TrainingError, match="fp16 gradients overflowed on 3 steps in a row"):
        train(config, progress=False)


# ---------------------------------------------------------------------------- out of memory


def raise_out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 14.75 GiB total)")


def test_out_of_memory_during_training_becomes_advice_naming_a_setting(make_config, monkeypatch):
    monkeypatch.setattr(training, "_train", raise_out_of_memory)  # what a step raises; the loop itself is not needed
    # A T4 as the memory planner sees it: 15 GiB in all.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (2**28, 15 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    config = make_config(model="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512, mixed_precision="fp16",
                         gradient_checkpointing=False, use_8bit_adam=False, train_batch_size=4, checkpoint_every=2)
    with pytest.raises(TrainingError) as caught:
        train(config, progress=False)
    message = str(caught.value)
    assert message.startswith("The GPU ran out of memory")
    assert re.search(r"Change th(is|ese) settings?: --", message) and "--resume latest" in message
    assert caught.value.__context__.__traceback__ is None  # the failed step's frames (and tensors) are released


def test_the_advice_falls_back_when_the_memory_planner_cannot_judge(make_config, monkeypatch):
    import dreambooth_helpers.memory as memory

    def planner_fails(*args, **kwargs):
        raise KeyError("unknown model size")

    monkeypatch.setattr(memory, "oom_advice", planner_fails)
    config = make_config(gradient_checkpointing=False, use_8bit_adam=False, train_batch_size=2)
    advice = failures.training_advice(config)
    assert advice.startswith("Change this setting: --gradient-checkpointing")
    assert "--use-8bit-adam" in advice and "--train-batch-size 1 (now 2)" in advice
    everything_on = config.replace(gradient_checkpointing=True, use_8bit_adam=True, train_batch_size=1, lora=True,
                                   resolution=256)
    assert "use a GPU with more memory" in failures.training_advice(everything_on)


def test_out_of_memory_making_class_images_keeps_what_was_made_and_says_which_setting(make_config, monkeypatch):
    from diffusers import StableDiffusionPipeline

    real_call = StableDiffusionPipeline.__call__
    calls = {"n": 0}

    def second_batch_runs_out(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise_out_of_memory()
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", second_batch_runs_out)
    config = make_config(num_class_images=4, class_images_batch_size=2, max_train_steps=1)
    with pytest.raises(TrainingError) as caught:
        train(config, progress=False)
    message = str(caught.value)
    assert "while generating class images (2 of 4 are made and kept)" in message
    assert "Lower --class-images-batch-size (now 2) to 1" in message


def test_out_of_memory_while_generating_images_becomes_advice(monkeypatch):
    from dreambooth_helpers.inference import load_generator

    generator = load_generator("tiny")
    monkeypatch.setattr(generator, "pipeline", raise_out_of_memory)
    with pytest.raises(DreamBoothError, match=r"ran out of memory generating 4 image\(s\) of 64x64. Try fewer "
                                              r"images at once \(now 4\)"):
        generator.generate("a photo of sks dog", num_images=4, steps=2, seed=1)


def test_only_out_of_memory_is_translated_other_errors_keep_their_traceback(make_config, monkeypatch):
    assert failures.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert failures.is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not failures.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(training, "_train", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(make_config(with_prior_preservation=False), progress=False)
