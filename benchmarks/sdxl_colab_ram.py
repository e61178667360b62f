"""System RAM of the `t4-sdxl` path at SDXL's real shapes, as free Colab (12.7 GB of RAM) would run it, minus the GPU.

    PYTHONPATH=. python benchmarks/sdxl_colab_ram.py --json results/sdxl_ram.json [--keep /tmp/sdxl-random]

1. In a separate process: SDXL base 1.0's architecture with random weights, built in fp16 (never fp32) and saved as
   a diffusers folder (~6.9 GB; `--keep DIR` keeps it for the next run).
2. In a fresh process, phase by phase, each phase's peak resident memory (VmHWM, reset between phases through
   /proc/self/clear_refs): `baseline` (the libraries imported), `load` (load_components in fp16, as a LoRA run
   under fp16 loads), `lora` (adapters on the UNet, set_up_trainable), `cache` (5 photos' latents at 1024 px and
   the prompt embeddings, pooled ones included), `checkpoint` (a resumable checkpoint with the optimizer),
   `save_lora` (pytorch_lora_weights.safetensors), `export_webui` (the AUTOMATIC1111/ComfyUI file), `stage_push`
   (the card and the files push would upload, hub.stage_for_upload).

Without a GPU everything that Colab puts in GPU memory stays in RAM here (the fp16 UNet, the VAE's activations at
1024 px), so this over-counts Colab's RAM: a Colab run that moves the UNet to the GPU holds less. The goal is
<= 11 GiB here. The JSON holds `peak_rss_gib`, each phase's peak and the file sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
PHOTOS = 5


def build_model(folder: Path) -> None:
    """Child process: build SDXL-shaped fp16 random weights and save them as a diffusers folder."""
    import torch

    from dreambooth_helpers.models import build_sdxl_shaped_components, make_pipeline

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    components = build_sdxl_shaped_components(torch.float16)
    make_pipeline(components).save_pretrained(str(folder), safe_serialization=True)


def _status(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Phases:
    """Each phase's peak RSS: VmHWM after the phase, the high-water mark reset before it."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.after: dict[str, dict[str, float]] = {}  # RSS after each phase: anonymous memory, mapped files

    def run(self, name: str, work):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        start = time.perf_counter()
        result = work()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.peaks[name] = round(_status("VmHWM") / GIB, 3)
        self.after[name] = {"anonymous_gib": round(_status("RssAnon") / GIB, 3),
                            "file_mapped_gib": round(_status("RssFile") / GIB, 3)}
        print(f"{name:>13}: peak {self.peaks[name]:.2f} GiB, now {_status('VmRSS') / GIB:.2f} GiB "
              f"({self.after[name]['file_mapped_gib']:.2f} of it mapped weight files), {self.seconds[name]} s",
              flush=True)
        return result


def photos(folder: Path) -> Path:
    """Five real photographs (scikit-image's, when installed) or drawn ones, larger than 1024 px like a phone's."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    try:
        from skimage import data

        arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
        images = [Image.fromarray(a).convert("RGB") for a in arrays]
    except ImportError:
        images = []
        for i in range(PHOTOS):
            image = Image.new("RGB", (400, 300), (40 * i, 120, 200))
            ImageDraw.Draw(image).ellipse((80, 60, 300, 260), fill=(200, 30, 30))
            images.append(image)
    for i, image in enumerate(images[:PHOTOS]):
        image.resize((1536, 1152) if i % 2 else (1152, 1536)).save(folder / f"photo{i}.jpg", quality=92)
    return folder


def measure(model_dir: Path, work: Path) -> dict:
    phases = Phases()

    def imports():
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import dreambooth_helpers.training  # noqa: F401

    phases.run("baseline", imports)
    import torch

    from dreambooth_helpers import Concept, TrainConfig, hub
    from dreambooth_helpers import checkpoints as ckpt
    from dreambooth_helpers.data import prepare_image_and_geometry, read_images
    from dreambooth_helpers.export_lora import export_webui_lora
    from dreambooth_helpers.memory import SDXL_SIZE, estimate_ram
    from dreambooth_helpers.models import load_components
    from dreambooth_helpers.speedups import TextEmbeddingCache
    from dreambooth_helpers.training import Runtime, _make_examples, set_up_trainable

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    photo_dir = photos(work / "photos")
    output = work / "run"
    output.mkdir(parents=True, exist_ok=True)
    # The preset as it is, but with the model's own VAE (kept in fp32): the fp16-fix VAE cannot be downloaded here.
    config = TrainConfig.from_preset("t4-sdxl", model=str(model_dir), vae=None, output_dir=str(output),
                                     concepts=[Concept(str(photo_dir), "a photo of sks toy", "a photo of toy")])
    runtime = Runtime("cpu", "fp16", False, False, [], gradient_checkpointing=True)

    def load():
        loaded = load_components(str(model_dir), dtype=torch.float16)
        # safetensors maps the files and diffusers reads a page only when a weight is used; moving the model to the
        # GPU reads every one of them. Read them all here too, so the figure holds what that step holds.
        with torch.no_grad():
            for module in (loaded.unet, loaded.text_encoder, loaded.vae):
                for tensor in module.state_dict().values():
                    tensor.float().sum() if tensor.numel() < 2**20 else tensor.view(-1)[:: 2048].float().sum()
        return loaded

    components = phases.run("load", load)
    family = components.family
    vae_dtype = torch.float32 if components.vae_needs_fp32 else torch.float16
    phases.run("lora", lambda: set_up_trainable(components.unet, components.text_encoder, components.vae, config,
                                                runtime, "cpu", torch.float16, family=family, vae_dtype=vae_dtype))

    def cache():
        report = read_images(photo_dir)
        prepared = [prepare_image_and_geometry(record.image, 1024) for record in report.images]
        with torch.no_grad():
            examples = _make_examples(prepared, config.concepts[0].instance_prompt, components, config, runtime)
            embeddings = TextEmbeddingCache(family.encode)
            embeddings.fill(components.text_encoder, [e.input_ids for e in examples], "cpu")
        return examples, embeddings

    examples, embeddings = phases.run("cache", cache)

    trainable = [p for p in components.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    for p in trainable:  # one step's worth of optimizer state, as a checkpoint after training holds
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = ckpt.TrainingState(components.unet, None, optimizer, scheduler, None, True, False, family)
    metadata = {"base_model": str(model_dir), "family": family.name, "identity": {"benchmark": True}}
    phases.run("checkpoint", lambda: ckpt.save_checkpoint(output, 1, state, metadata, keep=2))

    def save_lora():
        ckpt.save_trainable_weights(output, components.unet, None, True, family)
        for part in ckpt.lora_parts(components.unet, None, family):
            (output / ckpt.raw_lora_file(part)).unlink(missing_ok=True)
        summary = {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "family": family.name, "lora": True,
                   "resolution": 1024, "steps": 1, "instance_prompts": [config.concepts[0].instance_prompt],
                   "class_prompts": [config.concepts[0].class_prompt]}
        (output / "training_summary.json").write_text(json.dumps(summary))

    phases.run("save_lora", save_lora)
    webui = work / "subject_webui.safetensors"
    phases.run("export_webui", lambda: export_webui_lora(output, webui, family))
    staged = phases.run("stage_push", lambda: hub.stage_for_upload(output, work / "staged", "someone/sdxl-subject"))
    files = {path.name: path.stat().st_size for path in [output / "pytorch_lora_weights.safetensors", webui]}
    # Resetting VmHWM between phases resets ru_maxrss too: the run's peak is the highest phase's.
    return {"peak_rss_gib": max(phases.peaks.values()),
            "phase_peak_rss_gib": phases.peaks, "phase_seconds": phases.seconds, "rss_after_phase": phases.after,
            "planner_estimate_ram_gib": round(estimate_ram(config, SDXL_SIZE, "fp16") / GIB, 3),
            "cached_examples": len(examples), "cached_prompts": len(embeddings), "staged_files": staged,
            "file_bytes": files, "model_folder_gib": round(sum(p.stat().st_size for p in model_dir.rglob("*")
                                                              if p.is_file()) / GIB, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="Where to write the figures.")
    parser.add_argument("--keep", help="Build the model into this folder once and reuse it (~6.9 GB).")
    parser.add_argument("--measure-only", help=argparse.SUPPRESS)  # the child process: the model folder
    args = parser.parse_args(argv)
    if args.measure_only:
        with tempfile.TemporaryDirectory() as work:
            result = measure(Path(args.measure_only), Path(work))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.keep) if args.keep else Path(scratch) / "sdxl-random"
        built_in = None
        if not (model_dir / "model_index.json").is_file():
            started = time.perf_counter()
            code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import sdxl_colab_ram as b; " \
                   f"from pathlib import Path; b.build_model(Path({str(model_dir)!r}))"
            subprocess.run([sys.executable, "-c", code], check=True)
            built_in = round(time.perf_counter() - started, 1)
        subprocess.run([sys.executable, __file__, "--json", args.json, "--measure-only", str(model_dir)], check=True)
        result = json.loads(Path(args.json).read_text())
        result["build_seconds"] = built_in
        result["goal_gib"] = 11.0
        result["within_goal"] = result["peak_rss_gib"] <= 11.0
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("peak_rss_gib", "phase_peak_rss_gib", "within_goal")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
