"""Training-step optimisations that keep the update the same: each has an equivalence test in tests/test_speedups.py.

- `StepInBackward`: the optimizer steps each parameter as soon as its gradient is complete, inside the
  backward pass, and frees that gradient; the full set of gradients (3.7 GiB for SD 1.x's UNet and text
  encoder in fp32) never exists. Gradient clipping and accumulation need every gradient before any parameter
  may change, so they rule it out (config.step_in_backward_allowed). With fp16 it does its own loss scaling,
  per parameter (see the class).
- `TextEmbeddingCache`: a frozen text encoder gives the same output for the same prompt every step, and
  a run has only a few prompts (instance and class prompt per subject), so each is encoded once.
- `use_channels_last`: the UNet's convolution weights in NHWC layout, which tensor cores prefer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .families import Conditioning


class StepInBackward(torch.optim.Optimizer):
    """An optimizer made of one inner optimizer per parameter, each stepped by that parameter's gradient hook.

    To the training loop, the learning-rate scheduler and checkpoints it looks like one optimizer: the
    scheduler sets `lr` on `param_groups` here and each inner step reads it; `step()` and `zero_grad()`
    have nothing left to do, since every gradient was applied and freed during backward.

    fp16 (`loss_scaling=True`): the loop backpropagates `scale_loss(loss)`, and each hook divides its gradient
    by the scale before stepping. A gradient that overflowed (inf/NaN) leaves its parameter unchanged, and the
    scale is halved at the end of the step; after `growth_interval` clean steps it doubles (the rules of
    torch's GradScaler). No weight ever sees an overflowed gradient. What differs from GradScaler: on an
    overflow step, the parameters whose gradients were already complete and finite are updated (backward
    reaches them before the overflow, so their gradients are exact), where GradScaler skips every update.
    On every other step the update is the plain one.
    """

    def __init__(self, param_groups: list[dict], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                 loss_scaling: bool = False, init_scale: float = 2.0**16, growth_interval: int = 2000):
        super().__init__(param_groups, defaults={})
        self._inner: list[tuple[torch.optim.Optimizer, dict]] = []
        self.loss_scale = init_scale if loss_scaling else None  # None: gradients are used as they come
        self.growth_interval, self._clean_steps = growth_interval, 0
        self.nonfinite_in_backward = 0  # parameters left unchanged in the current step: NaN/inf gradient
        self.last_step_nonfinite = 0  # the same, for the step that step() closed
        self._hooks = []
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                self._inner.append((make_optimizer([{**settings, "params": [param]}]), group))
                self._hooks.append(param.register_post_accumulate_grad_hook(self._hook(len(self._inner) - 1)))

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What to backpropagate: the loss times the fp16 loss scale (the loss itself without scaling)."""
        return loss if self.loss_scale is None else loss * self.loss_scale

    def _hook(self, index: int):
        inner, group = self._inner[index]

        def step_this_parameter(param: torch.Tensor) -> None:
            if self.loss_scale is not None:
                param.grad.mul_(1.0 / self.loss_scale)
            # Nothing else keeps a NaN/inf gradient out of the weights. The check waits for the GPU once per
            # parameter; the benchmark measures what that costs.
            if bool(torch.isfinite(param.grad).all()):
                inner.param_groups[0]["lr"] = group["lr"]  # follow the scheduler
                inner.step()
            else:
                self.nonfinite_in_backward += 1
            param.grad = None  # the memory this whole class exists to save

        return step_this_parameter

    @torch.no_grad()
    def step(self, closure=None):
        """Every update happened in backward; close the step's count of skipped parameters, adjust the scale."""
        self.last_step_nonfinite, self.nonfinite_in_backward = self.nonfinite_in_backward, 0
        if self.loss_scale is not None:
            if self.last_step_nonfinite:
                self.loss_scale, self._clean_steps = self.loss_scale * 0.5, 0
            else:
                self._clean_steps += 1
                if self._clean_steps >= self.growth_interval:
                    self.loss_scale, self._clean_steps = self.loss_scale * 2.0, 0
        return None if closure is None else closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:  # gradients left by a backward pass that bypassed the hooks
            for param in group["params"]:
                param.grad = None

    def state_dict(self) -> dict:
        return {"inner": [inner.state_dict() for inner, _ in self._inner],
                "lr": [group["lr"] for group in self.param_groups],
                "loss_scale": self.loss_scale, "clean_steps": self._clean_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        for (inner, _), saved in zip(self._inner, state_dict["inner"], strict=True):
            inner.load_state_dict(saved)
        for group, lr in zip(self.param_groups, state_dict["lr"], strict=True):
            group["lr"] = lr
        if self.loss_scale is not None and state_dict.get("loss_scale") is not None:
            self.loss_scale, self._clean_steps = state_dict["loss_scale"], state_dict["clean_steps"]

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def optimizer_state_for(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """`saved` (an optimizer state_dict from a checkpoint) in the layout `optimizer` loads.

    The memory planner may choose the plain optimizer step in one session and the step inside backward in
    the next (less free memory after a reconnect), and their state_dicts differ: a plain optimizer's has
    "state" and "param_groups" over all parameters, StepInBackward's one inner state_dict per parameter. Both
    number the parameters in the same order (groups, then parameters), and each inner optimizer is the plain
    one's kind over one parameter, so the moments carry over unchanged either way.
    """
    wants_inner = isinstance(optimizer, StepInBackward)
    if wants_inner == ("inner" in saved):
        return saved  # already in the right layout
    groups = optimizer.param_groups
    if wants_inner:  # plain -> one inner state per parameter
        settings_of, inner = [], []
        for saved_group in saved["param_groups"]:
            settings = {k: v for k, v in saved_group.items() if k != "params"}
            settings_of.append(settings)
            for position in saved_group["params"]:
                state = saved["state"].get(position, saved["state"].get(str(position)))
                inner.append({"state": {0: state} if state is not None else {},
                              "param_groups": [{**settings, "params": [0]}]})
        return {"inner": inner, "lr": [settings["lr"] for settings in settings_of], "loss_scale": None,
                "clean_steps": 0}
    # one inner state per parameter -> plain: renumber the parameters in order, groups as the optimizer has them
    state, param_groups, position = {}, [], 0
    inner_states = iter(saved["inner"])
    for group, lr in zip(groups, saved["lr"], strict=True):
        indices = []
        for _param in group["params"]:
            one = next(inner_states)
            if one["state"]:
                state[position] = next(iter(one["state"].values()))
            indices.append(position)
            position += 1
        settings = {k: v for k, v in group.items() if k != "params"}
        param_groups.append({**settings, "lr": lr, "params": indices})
    return {"state": state, "param_groups": param_groups}


class TextEmbeddingCache:
    """The conditioning of each distinct prompt from a frozen text encoder, computed on first use.

    `encode(text_encoder, input_ids)` is the model family's (families/): SD 1.x's hidden states, SDXL's hidden
    states and pooled embedding, both kept. Valid only while the text encoder does not change: the loop uses it
    when the text encoder is not training (never trained, or after --stop-text-encoder-training-at, after which
    it never trains again).
    """

    def __init__(self, encode: Callable[[Any, torch.Tensor], Any]) -> None:
        self._encode = encode
        self._by_ids: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, text_encoder, input_ids: torch.Tensor, device):
        distinct = {tuple(ids.flatten().tolist()): ids for ids in input_ids}
        missing = [(key, ids) for key, ids in distinct.items() if key not in self._by_ids]
        if missing:
            with torch.no_grad():
                encoded = self._encode(text_encoder, torch.stack([ids for _, ids in missing]).to(device))
            pooled = encoded.pooled if encoded.pooled is not None else [None] * len(missing)
            self._by_ids.update({key: (hidden, row) for (key, _), hidden, row in zip(missing, encoded.hidden, pooled)})
        rows = [self._by_ids[tuple(ids.flatten().tolist())] for ids in input_ids]
        pooled = [row for _, row in rows]
        return Conditioning(torch.stack([hidden for hidden, _ in rows]).to(device),
                            None if pooled[0] is None else torch.stack(pooled).to(device))

    def fill(self, text_encoder, all_input_ids: Iterable[torch.Tensor], device) -> None:
        """Encode every prompt now, so the text encoder can leave the GPU."""
        self(text_encoder, torch.stack(list(all_input_ids)), device)

    def __len__(self) -> int:
        return len(self._by_ids)


def live_text_embeddings(encode: Callable[[Any, torch.Tensor], Any]):
    """The uncached path: encode the batch's prompts now, without gradients (same call as a TextEmbeddingCache)."""
    def encode_now(text_encoder, input_ids: torch.Tensor, device):
        with torch.no_grad():
            return encode(text_encoder, input_ids.to(device))

    return encode_now


def use_channels_last(unet: torch.nn.Module) -> torch.nn.Module:
    """Store 4-D weights in NHWC; convolutions then return NHWC activations and pick NHWC kernels."""
    return unet.to(memory_format=torch.channels_last)
