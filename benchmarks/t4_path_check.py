"""Check, in one run on a real CUDA card, the decisions tests/test_t4_path.py proves against a mocked T4.

    PYTHONPATH=. python benchmarks/t4_path_check.py --out results/t4-path        # ~5 min on an H100/H200
    PYTHONPATH=. python benchmarks/t4_path_check.py --quick --out results/t4-path  # no SD-sized training

Each check prints one line, PASS or FAIL, and all of them land in OUT/t4_path_check.json; the exit status is 1 when
any check fails. On a card newer than a T4 the T4 itself is emulated where it can be: its memory by a cap (the
process is held to 15 GiB, or 8 GiB for the 8 GB card, and the planner sees the capped free memory), its lack of
bf16 by the decision rule (compute capability under 8.0), which is checked against this card's own answer.

Checks:
- precision: bf16 is refused exactly when the card has no bf16 in hardware, whatever is_bf16_supported() says;
- bitsandbytes: it loads, or its failure is the first thing the refusal says; an 8-bit AdamW state is ~2 bytes a
  parameter on disk (what the disk pre-check counts);
- presets (not with --quick): `low-memory` under an 8 GiB cap, `t4` and `t4-lora` under 15 GiB, each a few steps of
  the SD 1.5-shaped model, and `t4-sdxl` under 15 GiB with SDXL's real shapes at 1024 px (sdxl-random, built in
  code in fp16): the plan, the planner's estimate against the measured peak, the peak within the cap (and
  `low-memory` within 6.5 GiB), seconds per step, and the out-of-memory advice as the user would read it
  (`--preset t4-sdxl` runs that one alone);
- fp16 replay on the GPU (tiny model): the saved VAE is the base's fp32 VAE, not fp16-rounded; two LoRA runs with
  one seed save the same adapter file.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_memory_speed import synthetic_photos  # noqa: E402

from dreambooth_helpers import Concept, ConfigError, TrainConfig, failures, memory  # noqa: E402
from dreambooth_helpers.checkpoints import ADAM8_CHECKPOINT_BYTES  # noqa: E402
from dreambooth_helpers.memory import GIB, MemorySettings, estimate_memory  # noqa: E402
from dreambooth_helpers.models import build_tiny_components  # noqa: E402
from dreambooth_helpers.training import resolve_runtime, train  # noqa: E402

PROMPT, CLASS_PROMPT = "a photo of sks thing", "a photo of thing"
# (preset, the model built in code at its real shapes, memory cap in GiB, the most the run may reserve in GiB)
PRESET_RUNS = (("low-memory", "sd15-random", 8.0, 6.5), ("t4", "sd15-random", 15.0, 15.0),
               ("t4-lora", "sd15-random", 15.0, 15.0), ("t4-sdxl", "sdxl-random", 15.0, 15.0))


class Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []

    def check(self, name: str, passed: bool, **facts) -> None:
        self.checks.append({"check": name, "passed": bool(passed), **facts})
        shown = ", ".join(f"{k}={v}" for k, v in facts.items() if not isinstance(v, (dict, list)))
        print(f"{'PASS' if passed else 'FAIL'}  {name}  {shown}", flush=True)

    def failed(self, name: str, error: BaseException) -> None:
        self.check(name, False, error=f"{type(error).__name__}: {error}", trace=traceback.format_exc(limit=6))


def cap_memory(cap_gib: float) -> None:
    """Hold this process to `cap_gib` and let the planner see the capped free memory, as on a smaller card."""
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    cap = int(cap_gib * GIB)
    memory.cuda_free_bytes = lambda: min(torch.cuda.mem_get_info()[0], cap - torch.cuda.memory_reserved())


def check_precision(report: Report, concepts) -> None:
    capability = torch.cuda.get_device_capability()
    config = TrainConfig.from_preset("large-gpu", model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                     concepts=concepts, output_dir=tempfile.mkdtemp())
    try:
        resolve_runtime(config, cuda_available=True)
        refused = False
    except ConfigError as error:
        refused = "bf16 is not supported" in str(error)
    report.check("bf16 refused exactly below compute capability 8.0", refused == (capability < (8, 0)),
                 device=torch.cuda.get_device_name(), capability=f"{capability[0]}.{capability[1]}",
                 is_bf16_supported=torch.cuda.is_bf16_supported(), bf16_in_hardware=memory.bf16_in_hardware(),
                 refused=refused)


def check_bitsandbytes(report: Report) -> None:
    failure = memory.bitsandbytes_failure()
    if failure:
        report.check("bitsandbytes loads", False, failure=failure)
        return
    import bitsandbytes as bnb

    weight = torch.nn.Parameter(torch.randn(4096, 1024, device="cuda"))
    optimizer = bnb.optim.AdamW8bit([weight])
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    per_parameter = buffer.tell() / weight.numel()
    report.check("8-bit AdamW state on disk ~ the disk pre-check's bytes a parameter",
                 abs(per_parameter / ADAM8_CHECKPOINT_BYTES - 1) < 0.1, bytes_per_parameter=round(per_parameter, 3),
                 counted=round(ADAM8_CHECKPOINT_BYTES, 3), bitsandbytes=bnb.__version__)


def check_preset(report: Report, preset: str, model: str, cap_gib: float, limit_gib: float, work: Path,
                 photos: Path, steps: int) -> None:
    torch.cuda.empty_cache()
    cap_memory(cap_gib)
    # vae=None: the t4-sdxl preset's fp16-fix VAE cannot be downloaded there; SDXL's own VAE then runs in fp32.
    config = TrainConfig.from_preset(
        preset, model=model, vae=None,
        concepts=[Concept(str(photos), PROMPT, CLASS_PROMPT, str(work / f"class-{model}"))],
        output_dir=str(work / preset), max_train_steps=steps, num_class_images=2, class_images_steps=2, seed=0,
        sample_every=None).validate()
    runtime = resolve_runtime(config)
    settings = MemorySettings(runtime.gradient_checkpointing, runtime.step_in_backward)
    estimate = estimate_memory(config, settings, precision=runtime.mixed_precision,
                               use_8bit_adam=runtime.use_8bit_adam, size=memory.planning_size(model))
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(config, progress=False)
    seconds_per_step = (time.perf_counter() - started) / steps  # loading and class images included: an upper bound
    reserved = torch.cuda.max_memory_reserved() / GIB
    allocated = torch.cuda.max_memory_allocated() / GIB
    advice = failures.training_advice(config)  # what an out-of-memory error would have said, from the plan used
    report.check(f"{preset} within {limit_gib} GiB under a {cap_gib} GiB cap", reserved <= limit_gib,
                 plan=settings.describe(), measured_reserved_gib=round(reserved, 2),
                 measured_allocated_gib=round(allocated, 2),
                 estimated_reserved_gib=round(estimate.peak_reserved / GIB, 2),
                 estimated_allocated_gib=round(estimate.peak_allocated / GIB, 2),
                 estimate_error_pct=round(100 * (estimate.peak_allocated / GIB / allocated - 1), 1),
                 seconds_per_step_upper_bound=round(seconds_per_step, 2), final_loss=result.losses[-1],
                 oom_advice=advice)
    torch.cuda.set_per_process_memory_fraction(1.0)


def check_fp16_replay(report: Report, work: Path, photos: Path) -> None:
    from safetensors.torch import load_file

    base = {k: v.clone() for k, v in build_tiny_components().vae.state_dict().items()}
    config = TrainConfig.from_preset("t4", model="tiny", concepts=[Concept(str(photos), PROMPT, CLASS_PROMPT)],
                                     output_dir=str(work / "tiny-full"), resolution=64, max_train_steps=2,
                                     with_prior_preservation=False, mixed_precision="fp16")
    train(config, progress=False)
    saved = load_file(work / "tiny-full" / "vae" / "diffusion_pytorch_model.safetensors")
    report.check("fp16 run saves the frozen VAE's own fp32 weights", all(torch.equal(saved[k], base[k]) for k in base))

    adapters = []
    for attempt in range(2):
        lora = config.replace(preset="t4-lora", lora=True, lora_rank=8, output_dir=str(work / f"tiny-lora-{attempt}"))
        train(lora, progress=False)
        adapters.append(load_file(work / f"tiny-lora-{attempt}" / "pytorch_lora_weights.safetensors"))
    same = adapters[0].keys() == adapters[1].keys() and all(torch.equal(adapters[0][k], adapters[1][k])
                                                           for k in adapters[0])
    report.check("two LoRA runs with one seed save the same adapter", same)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/t4-path")
    parser.add_argument("--quick", action="store_true", help="Skip the SD 1.5-shaped training runs.")
    parser.add_argument("--steps", type=int, default=4, help="Training steps per preset run.")
    parser.add_argument("--preset", choices=[run[0] for run in PRESET_RUNS], help="Run only this preset's check.")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: this script checks a real card; tests/test_t4_path.py covers the CPU side.")
        return 2
    report = Report()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        photos = synthetic_photos(work / "photos", 4, 512)
        concepts = [Concept(str(photos), PROMPT, CLASS_PROMPT)]
        steps = [("precision", lambda: check_precision(report, concepts)),
                 ("bitsandbytes", lambda: check_bitsandbytes(report)),
                 ("fp16 replay", lambda: check_fp16_replay(report, work, photos))]
        if not args.quick:
            steps += [(f"preset {p}", lambda p=p, m=m, c=c, lim=lim: check_preset(report, p, m, c, lim, work,
                                                                                   photos, args.steps))
                      for p, m, c, lim in PRESET_RUNS if args.preset in (None, p)]
        for name, step in steps:
            try:
                step()
            except Exception as error:  # one failed check must not hide the others
                report.failed(name, error)
    result = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "checks": report.checks}
    (out / "t4_path_check.json").write_text(json.dumps(result, indent=2))
    failed = [c["check"] for c in report.checks if not c["passed"]]
    print(f"{len(report.checks) - len(failed)} of {len(report.checks)} checks passed; {out / 't4_path_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
