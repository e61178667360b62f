"""Memory and speed of this project's DreamBooth training, and of class-image and demo generation.

    PYTHONPATH=. python benchmarks/train_memory_speed.py --out results/            # CUDA: SD 1.5-shaped model
    PYTHONPATH=. python benchmarks/train_memory_speed.py --memory-cap-gib 15 ...   # an H100 held to a T4's budget
    PYTHONPATH=. python benchmarks/train_memory_speed.py --model tiny --steps 3    # CPU: the tiny model (CI)

Each row runs `training.train()` itself (no copy of the loop) on synthetic photos, for the matrix full UNet /
UNet + text encoder / LoRA / LoRA + text encoder, with prior preservation, batch 1, at the model's native size
(512 px for SD 1.5), once per preset (`t4`: the planner's fastest fitting setting; `low-memory`: the least
memory). Per row: peak allocated/reserved GPU memory over the steady-state steps, median s/step after warm-up
(CUDA-synchronised), FLOPs of one step (FlopCounterMode), and the planner's estimate against the measured peak.
See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from dreambooth_helpers import Concept, TrainConfig, memory
from dreambooth_helpers.memory import GIB, MemorySettings, estimate_memory, model_size
from dreambooth_helpers.models import load_components, make_pipeline
from dreambooth_helpers.training import resolve_runtime, train

# name -> what differs from the preset
ROWS = {
    "full-unet": {"lora": False, "train_text_encoder": False},
    "full-unet+text": {"lora": False, "train_text_encoder": True},
    "lora-r4": {"lora": True, "lora_rank": 4, "train_text_encoder": False},
    "lora-r4+text": {"lora": True, "lora_rank": 4, "train_text_encoder": True},
}
PRESETS = ("t4", "low-memory")
PROMPT, CLASS_PROMPT = "a photo of sks toy", "a photo of toy"


def synthetic_photos(folder: Path, count: int, size: int) -> Path:
    """A few distinct pictures of one 'subject' (a red disc and a bar), so no photo folder is needed."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (40 + 40 * i, 140, 200 - 30 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse((size * (0.2 + 0.03 * i), size * 0.2, size * (0.7 + 0.03 * i), size * 0.7), fill=(210, 30, 30))
        draw.rectangle((size * 0.05, size * 0.1, size * 0.15, size * 0.9), fill=(0, 0, 0))
        image.save(folder / f"photo{i}.png")
    return folder


def flop_counter():
    """FlopCounterMode that also counts PyTorch's CPU flash attention, with the formulas torch uses for CUDA's.

    torch registers FLOP formulas for the CUDA attention kernels only; on a CPU, attention would count as 0.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


class StepMeter:
    """`on_step` for train(): synchronised step times, peak memory from step `warmup` on, FLOPs of the last step."""

    def __init__(self, cuda: bool, warmup: int, total: int):
        self.cuda, self.warmup, self.total = cuda, warmup, total
        self.times: list[float] = []
        self.last = None
        self.flops = None

    def start(self) -> None:
        self._sync()
        self.last = time.perf_counter()

    def __call__(self, step: int, logs: dict) -> None:
        self._sync()
        now = time.perf_counter()
        if step < self.total:  # the last step runs under the FLOP counter: slower, not timed
            self.times.append(now - self.last)
        if step == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()  # steady state: optimizer states exist from here on
        if step == self.total - 1:
            self.flops = flop_counter()
            self.flops.__enter__()
        self.last = time.perf_counter()

    def stop(self) -> int:
        if self.flops is None:
            return 0
        self.flops.__exit__(None, None, None)
        return int(self.flops.get_total_flops())

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def run_row(name: str, preset: str, args, work: Path, instance_dir: Path, size) -> dict:
    cuda = torch.cuda.is_available()
    config = TrainConfig.from_preset(
        preset, concepts=[Concept(str(instance_dir), PROMPT, CLASS_PROMPT, str(work / "class_images"))],
        output_dir=str(work / f"{name}-{preset}"), model=args.model, max_train_steps=args.steps,
        num_class_images=args.class_images, class_images_steps=args.class_image_steps, seed=0,
        **({} if cuda else {"mixed_precision": "no"}), **ROWS[name]).validate()
    runtime = resolve_runtime(config)  # what train() will choose: the same call
    settings = MemorySettings(runtime.gradient_checkpointing, runtime.step_in_backward)
    estimate = estimate_memory(config, settings, precision=runtime.mixed_precision,
                               use_8bit_adam=runtime.use_8bit_adam, size=size)
    meter = StepMeter(cuda, args.warmup, args.steps)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    meter.start()
    try:
        train(config, progress=False, on_step=meter)
    finally:
        flops = meter.stop()
    measured = torch.cuda.max_memory_allocated() / GIB if cuda else None
    timed = meter.times[args.warmup:] or meter.times
    row = {
        "row": name, "preset": preset, "lora": config.lora, "train_text_encoder": config.train_text_encoder,
        "gradient_checkpointing": settings.gradient_checkpointing, "step_in_backward": settings.step_in_backward,
        "mixed_precision": runtime.mixed_precision, "use_8bit_adam": runtime.use_8bit_adam,
        "peak_allocated_gib": None if measured is None else round(measured, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
        "s_per_step": round(statistics.median(timed), 4), "steps_timed": len(timed), "flops_per_step": flops,
        "estimate_peak_allocated_gib": round(estimate.peak_allocated / GIB, 3),
        "estimate_peak_reserved_gib": round(estimate.peak_reserved / GIB, 3),
        "estimate_error_pct": None if not measured else round(100 * (estimate.peak_allocated / GIB / measured - 1), 1),
        "plan": next((n for n in runtime.notices if n.startswith("Memory plan")), None),
    }
    return row


def time_generation(args, work: Path, resolution: int) -> dict:
    """Class images: ours (prior.ensure_class_images, DPM-Solver++ 25 steps) against PNDM 50 steps; demo s/image."""
    from dreambooth_helpers.inference import DEFAULT_STEPS, load_generator
    from dreambooth_helpers.prior import ensure_class_images

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    components = load_components(args.model)
    pipe = make_pipeline(components).to(device, torch.float16 if cuda else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    batch, count = 4, max(4, args.generation_images // 4 * 4)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Pipeline defaults: its own PNDM scheduler, 50 steps, batch 4 (one warm-up batch first).
    pipe.scheduler = components.scheduler
    size = args.generation_resolution or resolution
    timings = {}
    for repeat in (1, count // batch):
        sync()
        start = time.perf_counter()
        for _ in range(repeat):
            pipe([CLASS_PROMPT] * batch, num_inference_steps=args.pndm_steps, height=size, width=size)
        sync()
    timings["pndm"] = count / (time.perf_counter() - start)
    # Ours: exactly what training calls (it switches the pipeline to DPM-Solver++).
    ensure_class_images(pipe, CLASS_PROMPT, work / "warm", batch, resolution=size, batch_size=batch,
                        steps=args.ours_steps, progress=False)
    sync()
    start = time.perf_counter()
    ensure_class_images(pipe, CLASS_PROMPT, work / "ours", count, resolution=size, batch_size=batch,
                        steps=args.ours_steps, progress=False)
    sync()
    timings["ours"] = count / (time.perf_counter() - start)
    pipe.to("cpu")

    # The demo's path: load_generator on a saved model, one image at its default steps.
    folder = work / "demo-model"
    make_pipeline(components).save_pretrained(folder)
    generator = load_generator(str(folder), device=device)
    demo = dict(num_images=1, width=size, height=size, steps=args.ours_steps)
    generator.generate(PROMPT, seed=0, **demo)  # warm-up
    seconds = [generator.generate(PROMPT, seed=seed, **demo)[0].seconds for seed in range(1, 4)]
    return {"resolution": size, "batch": batch, "images_timed": count,
            "class_images_per_s": {f"ours_dpmpp_{args.ours_steps}_steps": round(timings["ours"], 3),
                                   f"pipeline_pndm_{args.pndm_steps}_steps": round(timings["pndm"], 3)},
            "class_images_speedup": round(timings["ours"] / timings["pndm"], 2),
            "demo_s_per_image": round(statistics.median(seconds), 3), "demo_steps": args.ours_steps,
            "demo_default_steps": DEFAULT_STEPS}


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; model {result['model']}, {result['resolution']} px, batch 1 + prior "
             f"preservation; {result['steps']} steps, median after {result['warmup']} warm-up"
             + (f"; memory capped at {result['memory_cap_gib']} GiB" if result["memory_cap_gib"] else "") + ".", "",
             "| row | preset | ckpt | step in backward | peak alloc GiB | peak reserved GiB | planner GiB | "
             "planner error | s/step | TFLOP/step |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def show(value, suffix=""):
        return "n/a" if value is None else f"{value}{suffix}"

    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['preset']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
                     f"{'yes' if r['step_in_backward'] else 'no'} | {show(r['peak_allocated_gib'])} | "
                     f"{show(r['peak_reserved_gib'])} | {r['estimate_peak_allocated_gib']} | "
                     f"{show(r['estimate_error_pct'], '%')} | {r['s_per_step']} | {r['flops_per_step'] / 1e12:.4g} |")
    generation = result.get("generation")
    if generation:
        lines += ["", f"| generation ({generation['resolution']} px, batch {generation['batch']}) | value |",
                  "| --- | --- |"]
        lines += [f"| class images/s, {name.replace('_', ' ')} | {rate} |"
                  for name, rate in generation["class_images_per_s"].items()]
        lines += [f"| class-image speed-up | {generation['class_images_speedup']}x |",
                  f"| demo s/image ({generation['demo_steps']} steps) | {generation['demo_s_per_image']} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="sd15-random" if cuda else "tiny", help="sd15-random (CUDA) or tiny")
    parser.add_argument("--steps", type=int, default=25 if cuda else 3, help="training steps per row")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1, help="steps left out of timing and peaks")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets to run each row with")
    parser.add_argument("--class-images", type=int, default=4, help="class images generated for training rows")
    parser.add_argument("--class-image-steps", type=int, default=25 if cuda else 2)
    parser.add_argument("--generation-images", type=int, default=16 if cuda else 4,
                        help="images timed per class-image method (0: skip the generation timings)")
    parser.add_argument("--generation-resolution", type=int, help="default: the model's native size")
    parser.add_argument("--ours-steps", type=int, default=25, help="DPM-Solver++ steps (class images, demo)")
    parser.add_argument("--pndm-steps", type=int, default=50, help="the pipeline default's PNDM steps")
    parser.add_argument("--memory-cap-gib", type=float, help="hold the process to this much GPU memory (T4: 15)")
    parser.add_argument("--out", help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps - 1:
        parser.error("--steps must exceed --warmup by at least 2 (one timed step, one counted step)")
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")

    if args.memory_cap_gib and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / total))
        # The planner reads free memory from the driver, which knows nothing of the cap: give it the cap.
        cap = int(args.memory_cap_gib * GIB)
        memory.cuda_free_bytes = lambda: min(torch.cuda.mem_get_info()[0], cap - torch.cuda.memory_reserved())

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        components = load_components(args.model)
        size, resolution = model_size(components), components.native_resolution
        del components
        instance_dir = synthetic_photos(work / "photos", 4, resolution)
        results = [run_row(name, preset, args, work, instance_dir, size)
                   for name in rows for preset in args.presets.split(",") if preset]
        generation = time_generation(args, work, resolution) if args.generation_images > 0 else None

    result = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'unknown'})",
              "model": args.model, "resolution": resolution, "steps": args.steps, "warmup": args.warmup,
              "memory_cap_gib": args.memory_cap_gib, "torch": torch.__version__, "rows": results,
              "generation": generation}
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        (out / "results.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
