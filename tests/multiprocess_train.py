"""`python -m dreambooth_helpers`, with a trace of what this process did: what tests/test_multiprocess.py launches.

    accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_train.py train ...same flags...

runs exactly the command-line training of `-m dreambooth_helpers`; each process also appends one JSON line per
event to $TRACE_DIR/rank-<rank>.jsonl: after every optimizer step a digest of its trained weights and the
examples, latents, noise and timesteps it drew; each class image, checkpoint, sample set, summary and final
model it wrote. The test reads the files to check what the processes did, not only what they left on disk.
`install_trace` also serves a run inside the test's own process (one process, through monkeypatch).
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

TRACE_DIR_VARIABLE = "TRACE_DIR"


def trace_file(trace_dir: str | Path, rank: int) -> Path:
    return Path(trace_dir) / f"rank-{rank}.jsonl"


def read_trace(trace_dir: str | Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in trace_file(trace_dir, rank).read_text().splitlines()]


def weights_digest(*models) -> str:
    """sha256 of every trained (requires_grad) weight, in name order: equal digests, bit-identical weights."""
    digest = hashlib.sha256()
    for model in models:
        for name, parameter in sorted(getattr(model, "module", model).named_parameters()):
            if parameter.requires_grad:
                digest.update(name.encode())
                digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def install_trace(trace_dir: str | Path, rank: int, patch=setattr) -> None:
    """Wrap the training functions that draw, step and write, so each records what it did (`patch` sets them)."""
    from dreambooth_helpers import checkpoints, prior, training

    path = trace_file(trace_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn: dict = {}

    def record(event: str, **details) -> None:
        with path.open("a") as file:
            file.write(json.dumps({"event": event, **details}) + "\n")

    def position(example, examples) -> int:
        return next(i for i, candidate in enumerate(examples) if candidate is example)

    real_assemble, real_step = training._assemble, training._train_step

    def assemble(instances, classes, first, config, device):
        batch = real_assemble(instances, classes, first, config, device)
        size = batch["num_instance"]
        drawn.update(first=first, flips=batch["flips"],
                     instances=[position(e, instances) for e in batch["examples"][:size]],
                     classes=[position(e, classes) for e in batch["examples"][size:]])
        return batch

    def train_step(run, model, data, optim, step):
        scheduler = model.components.noise_scheduler
        real_add_noise = scheduler.add_noise

        def add_noise(latents, noise, timesteps):
            drawn.update(latents=latents.tolist(), noise=noise.tolist(), timesteps=timesteps.tolist())
            return real_add_noise(latents, noise, timesteps)

        scheduler.add_noise = add_noise
        try:
            outcome = real_step(run, model, data, optim, step)
        finally:
            del scheduler.add_noise  # the class's own method again
        record("step", step=step + 1, weights=weights_digest(model.unet, model.text_encoder), loss=outcome.loss,
               **drawn)
        return outcome

    def recorder(event: str, real, describe):
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            record(event, **describe(*args, **kwargs))
            return result
        return wrapped

    patch(training, "_assemble", assemble)
    patch(training, "_train_step", train_step)
    patch(prior, "_save_atomically", recorder("class_image", prior._save_atomically,
                                              lambda image, file: {"name": Path(file).name}))
    patch(checkpoints, "save_checkpoint", recorder("checkpoint", checkpoints.save_checkpoint,
                                                   lambda output_dir, step, *a, **k: {"step": step}))
    patch(checkpoints, "write_json_atomically", recorder("json", checkpoints.write_json_atomically,
                                                         lambda file, data: {"name": Path(file).name}))
    patch(training, "_save_samples", recorder("samples", training._save_samples,
                                              lambda run, model, step: {"step": step}))
    patch(training, "_save_final_model", recorder("model", training._save_final_model, lambda *a, **k: {}))


if __name__ == "__main__":
    install_trace(os.environ[TRACE_DIR_VARIABLE], int(os.environ.get("RANK", "0")))
    sys.argv[0] = "dreambooth_helpers"
    runpy.run_module("dreambooth_helpers", run_name="__main__", alter_sys=True)
