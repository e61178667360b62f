"""Each step optimisation gives the same update as the plain step, on the tiny model, within fp tolerance."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_helpers import ConfigError
from dreambooth_helpers.models import build_tiny_components
from dreambooth_helpers.speedups import StepInBackward, TextEmbeddingCache, live_text_embeddings, use_channels_last
from dreambooth_helpers.training import Runtime, _make_optimizer, train


def _batch(components, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    ids = components.tokenizer(["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    return latents, torch.tensor([10, 500]), ids


def _loss(components, latents, timesteps, ids):
    hidden = components.text_encoder(ids)[0]
    return components.unet(latents, timesteps, hidden).sample.pow(2).mean()


def _trainable(components):
    return [p for m in (components.unet, components.text_encoder) for p in m.parameters()]


def test_step_in_backward_gives_the_plain_adamw_update_and_keeps_no_gradients():
    plain, fused = build_tiny_components(), build_tiny_components()
    groups = lambda c: [{"params": list(c.unet.parameters()), "lr": 1e-3},  # noqa: E731
                        {"params": list(c.text_encoder.parameters()), "lr": 5e-4}]
    reference = torch.optim.AdamW(groups(plain), weight_decay=1e-2)
    in_backward = StepInBackward(groups(fused), lambda g: torch.optim.AdamW(g, weight_decay=1e-2))
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (reference, in_backward)]
    for step in range(3):
        batch = _batch(plain, seed=step)
        _loss(plain, *batch).backward()
        reference.step()
        reference.zero_grad(set_to_none=True)
        _loss(fused, *batch).backward()
        assert all(p.grad is None for p in _trainable(fused))  # applied and freed during backward
        in_backward.step()
        for schedule in schedules:
            schedule.step()
    for a, b in zip(_trainable(plain), _trainable(fused), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(_trainable(plain), _trainable(build_tiny_components()))) > 1e-4

    # Its state round-trips, as a checkpoint needs.
    restored = StepInBackward(groups(build_tiny_components()), lambda g: torch.optim.AdamW(g, weight_decay=1e-2))
    restored.load_state_dict(in_backward.state_dict())
    assert restored.param_groups[0]["lr"] == in_backward.param_groups[0]["lr"]
    assert torch.equal(restored._inner[0][0].state_dict()["state"][0]["exp_avg"],
                       in_backward._inner[0][0].state_dict()["state"][0]["exp_avg"])


def test_step_in_backward_leaves_a_parameter_with_a_nonfinite_gradient_unchanged():
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    optimizer = StepInBackward([{"params": weights, "lr": 0.1}], lambda g: torch.optim.AdamW(g))
    (weights[0].sum() + weights[1].sum() * torch.tensor(float("inf"))).backward()
    optimizer.step()
    assert torch.equal(weights[1].detach(), torch.ones(3)) and (weights[0] < 1).all()
    assert optimizer.last_step_nonfinite == 1


def test_step_in_backward_is_refused_where_it_would_change_the_update(make_config):
    with pytest.raises(ConfigError, match="--step-in-backward cannot be used here: gradient clipping"):
        make_config(step_in_backward=True, mixed_precision="fp16", max_grad_norm=1.0).validate()
    with pytest.raises(ConfigError, match="accumulation"):
        make_config(step_in_backward=True, mixed_precision="no", max_grad_norm=0.0,
                    gradient_accumulation_steps=2).validate()
    make_config(step_in_backward=True, mixed_precision="fp16", max_grad_norm=0.0).validate()


def _scaled_step(weights, optimizer, overflow_at=None):
    """A backward pass of sum(w_i * i) through the optimizer's loss scale; `overflow_at` gets an inf gradient."""
    factors = [torch.tensor(float("inf") if i == overflow_at else i + 1.0) for i in range(len(weights))]
    loss = sum((w * f).sum() for w, f in zip(weights, factors))
    optimizer.scale_loss(loss).backward()
    optimizer.step()


def test_fp16_loss_scaling_in_backward_unscales_each_gradient_and_gives_the_plain_update():
    plain = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    scaled = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    # SGD, not Adam: Adam's update hardly changes when the gradient is 1024x too large; SGD's does.
    reference = torch.optim.SGD(plain, lr=0.1)
    optimizer = StepInBackward([{"params": scaled, "lr": 0.1}], lambda g: torch.optim.SGD(g), loss_scaling=True,
                               init_scale=1024.0)
    seen = []
    scaled[0].register_hook(lambda grad: seen.append(grad.clone()))  # the gradient before the hook unscales it
    for _ in range(2):
        reference.zero_grad()
        sum((w * (i + 1.0)).sum() for i, w in enumerate(plain)).backward()
        reference.step()
        _scaled_step(scaled, optimizer)
    assert torch.equal(seen[0], torch.full((3,), 1024.0))  # the loss really was scaled
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(a, b)
    assert optimizer.loss_scale == 1024.0 and all(p.grad is None for p in scaled)


def test_fp16_overflow_in_backward_leaves_the_weights_finite_and_halves_the_scale():
    weights = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    optimizer = StepInBackward([{"params": weights, "lr": 0.1}], lambda g: torch.optim.AdamW(g), loss_scaling=True,
                               init_scale=1024.0, growth_interval=2)
    _scaled_step(weights, optimizer, overflow_at=1)
    assert torch.equal(weights[1].detach(), torch.ones(3))  # the overflowed gradient touched nothing
    assert all(torch.isfinite(w).all() for w in weights) and (weights[0] < 1).all()
    assert optimizer.last_step_nonfinite == 1 and optimizer.loss_scale == 512.0
    _scaled_step(weights, optimizer)
    _scaled_step(weights, optimizer)  # two clean steps: the scale grows back
    assert optimizer.loss_scale == 1024.0 and optimizer.last_step_nonfinite == 0
    saved = optimizer.state_dict()
    again = StepInBackward([{"params": weights, "lr": 0.1}], lambda g: torch.optim.AdamW(g), loss_scaling=True)
    again.load_state_dict(saved)  # a resumed run continues with the scale it had
    assert again.loss_scale == 1024.0
    optimizer.remove_hooks()
    again.remove_hooks()


def test_cached_text_embeddings_equal_live_ones():
    components = build_tiny_components()
    components.text_encoder.eval()
    _, _, ids = _batch(components)
    cache = TextEmbeddingCache(components.family.encode)
    batch = torch.stack([ids[0], ids[1], ids[0]])
    live = live_text_embeddings(components.family.encode)(components.text_encoder, batch, "cpu").hidden
    torch.testing.assert_close(cache(components.text_encoder, batch, "cpu").hidden, live, rtol=1e-5, atol=1e-6)
    assert len(cache) == 2  # each distinct prompt once
    torch.testing.assert_close(cache(components.text_encoder, batch[1:], "cpu").hidden, live[1:], rtol=1e-5,
                               atol=1e-6)


def test_channels_last_unet_gives_the_same_output_and_gradients():
    plain, nhwc = build_tiny_components(), build_tiny_components()
    use_channels_last(nhwc.unet)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in nhwc.unet.parameters())
    batch = _batch(plain)
    _loss(plain, *batch).backward()
    _loss(nhwc, *batch).backward()
    for a, b in zip(plain.unet.parameters(), nhwc.unet.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device, fused", [("cuda", True), ("cpu", False)])
def test_adamw_is_fused_on_a_gpu_only_also_inside_backward(make_config, device, fused):
    """Fused AdamW is one kernel for all parameters on CUDA; on a CPU the plain one is used. (That fused and
    plain AdamW give the same update is torch's to test.)"""
    config = make_config(adam_weight_decay=0.03)
    runtime = Runtime(device=device, mixed_precision="no", use_8bit_adam=False, use_xformers=False, notices=[])
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = _make_optimizer([{"params": params, "lr": 1e-3}], config, runtime)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is fused
    assert optimizer.param_groups[0]["weight_decay"] == 0.03
    in_backward = _make_optimizer([{"params": params, "lr": 1e-3}], config,
                                  dataclasses.replace(runtime, step_in_backward=True))
    inner = [optimizer for optimizer, _ in in_backward._inner]
    assert isinstance(in_backward, StepInBackward) and len(inner) == len(params)
    assert all(type(o) is torch.optim.AdamW and o.defaults["fused"] is fused for o in inner)


def test_the_optimised_loop_trains_the_same_weights_as_the_plain_loop(make_config, tmp_path):
    """train() end to end: step in backward + cached text embeddings against neither."""
    common = dict(max_train_steps=3, with_prior_preservation=False, train_text_encoder=False, learning_rate=1e-3,
                  max_grad_norm=0.0, memory_plan="as-set", gradient_checkpointing=False, lr_scheduler="linear")
    train(make_config(output_dir=str(tmp_path / "plain"), step_in_backward=False, cache_text_embeddings=False,
                      **common), progress=False)
    train(make_config(output_dir=str(tmp_path / "fast"), step_in_backward=True, cache_text_embeddings=True,
                      **common), progress=False)
    plain = load_file(tmp_path / "plain/unet/diffusion_pytorch_model.safetensors")
    fast = load_file(tmp_path / "fast/unet/diffusion_pytorch_model.safetensors")
    base = build_tiny_components().unet.state_dict()
    assert max((plain[k] - base[k]).abs().max() for k in plain) > 1e-4  # it trained
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-5)


def test_the_loop_runs_the_forward_pass_in_autocast_and_the_backward_pass_outside(make_config, monkeypatch):
    """Autocast keeps a half-precision copy of each weight it casts until its block ends: a backward pass inside
    the block would hold a copy of every trained weight (1.8 GiB for SD's UNet + text encoder) to the end."""
    import dataclasses

    from dreambooth_helpers import training

    seen = {"forward": [], "backward": []}
    real_load, real_resolve = training.load_components, training.resolve_runtime

    def load_with_probes(*args, **kwargs):
        components = real_load(*args, **kwargs)
        components.unet.register_forward_hook(lambda *_: seen["forward"].append(torch.is_autocast_enabled("cpu")))
        first = next(components.unet.parameters())
        first.register_post_accumulate_grad_hook(lambda _: seen["backward"].append(torch.is_autocast_enabled("cpu")))
        return components

    monkeypatch.setattr(training, "load_components", load_with_probes)
    # CPU runs are fp32, where autocast is off; bf16 autocast works on a CPU and shows where the passes run.
    monkeypatch.setattr(training, "resolve_runtime",
                        lambda config, **kw: dataclasses.replace(real_resolve(config, **kw), mixed_precision="bf16"))
    train(make_config(max_train_steps=2, with_prior_preservation=False, sample_every=None), progress=False)
    assert seen["forward"] == [True, True]
    assert seen["backward"] == [False, False]


def test_the_loop_with_fp16_step_in_backward_scales_the_loss_and_unscales_the_gradients(make_config, tmp_path,
                                                                                       monkeypatch):
    """train() end to end on the fp16 path's own loss scaling: a loss scale of 2**16 against a scale of 1.
    (On a CPU accelerate runs no fp16 autocast, so scaling by a power of two and back is exact.)"""
    import dataclasses

    from dreambooth_helpers import training

    real_resolve, scales = training.resolve_runtime, []
    monkeypatch.setattr(training, "resolve_runtime",
                        lambda config, **kw: dataclasses.replace(real_resolve(config, **kw), mixed_precision="fp16"))
    real_scale_loss = StepInBackward.scale_loss
    monkeypatch.setattr(StepInBackward, "scale_loss",
                        lambda self, loss: scales.append(self.loss_scale) or real_scale_loss(self, loss))
    common = dict(max_train_steps=3, with_prior_preservation=False, train_text_encoder=True, learning_rate=1e-3,
                  max_grad_norm=0.0, memory_plan="as-set", gradient_checkpointing=False, step_in_backward=True,
                  mixed_precision="fp16")
    result = train(make_config(output_dir=str(tmp_path / "scaled"), **common), progress=False)
    assert scales == [2.0**16] * 3
    summary = json.loads(result.summary_path.read_text())
    assert not any(entry["skipped"] for entry in summary["history"])
    class UnitScale(StepInBackward):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "init_scale": 1.0})

    monkeypatch.setattr(training, "StepInBackward", UnitScale)
    train(make_config(output_dir=str(tmp_path / "unscaled"), **common), progress=False)
    assert scales[3:] == [1.0] * 3
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        scaled, unscaled = load_file(tmp_path / "scaled" / part), load_file(tmp_path / "unscaled" / part)
        for name in scaled:
            torch.testing.assert_close(scaled[name], unscaled[name], rtol=1e-4, atol=1e-5)  # as the test above
    base = build_tiny_components().unet.state_dict()
    trained = load_file(tmp_path / "scaled/unet/diffusion_pytorch_model.safetensors")
    assert max((trained[k] - base[k]).abs().max() for k in base) > 1e-4  # it trained
