"""A stand-in for a loaded model, for demo tests about queues, files and HTTP rather than pictures."""

from __future__ import annotations

import threading

from PIL import Image

from dreambooth_helpers.inference import GeneratedImage


class FakeGenerator:
    """Answers at once (or when `gate` opens) with small solid images, and records the prompts in the
    order it ran them: the order the demo's queue served its requests."""

    device = "cpu"
    default_resolution = 64
    safety_note = None  # what a real Generator says when its images are not NSFW-filtered

    def __init__(self, model: str = "fake", lora: str | None = None, gate: threading.Event | None = None):
        self.model, self.lora, self.gate = model, lora, gate
        self.ran: list[str] = []

    def generate(self, prompt, negative_prompt="", num_images=1, steps=25, guidance_scale=7.5, seed=None,
                 width=None, height=None, scheduler=None):
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        self.ran.append(prompt)
        seed = 0 if seed is None else seed
        return [GeneratedImage(image=Image.new("RGB", (8, 8), (200, 40, 40)), prompt=prompt,
                               negative_prompt=negative_prompt, seed=seed + i, steps=steps,
                               guidance_scale=float(guidance_scale), width=width or 64, height=height or 64,
                               scheduler="fake", model=self.model, lora=self.lora)
                for i in range(num_images)]


def use_generator(service, generator) -> None:
    """Make `service` use `generator` as its loaded model, without loading anything."""
    service._load_started.acquire(blocking=False)
    service._generator = generator
    service._loaded.set()
