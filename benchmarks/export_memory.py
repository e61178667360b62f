"""Peak memory (RSS) and time of `export-single-file`, on a model saved as a diffusers folder.

    PYTHONPATH=. python benchmarks/export_memory.py                      # sd15-random, fp32 and --half
    PYTHONPATH=. python benchmarks/export_memory.py --baseline           # also the old clone-everything export
    PYTHONPATH=. python benchmarks/export_memory.py --model tiny --keep /tmp/tiny-folder

The model (default `sd15-random`: SD 1.5's shapes, random weights, built in code; 4.3 GB in fp32) is saved once
as a diffusers folder with safetensors weights, the way a trained model lies on disk. Each measurement then runs
in a fresh Python process, so earlier runs leave nothing behind, and reports:

    load_peak     the peak RSS while loading the model
    export_extra  how far above the RSS after loading the export went (the peak is reset after loading, via
                  /proc/self/clear_refs). diffusers maps safetensors weights from the file lazily, so the
                  weights enter RSS only as the export reads them: this column then includes the model itself
    peak          the whole process's peak RSS: what the machine must have, the figure to compare
    seconds       load and export wall time

`--baseline` runs the export as it was before issue 14 (every tensor cloned, then safetensors' save_file) on the
same folder, for comparison. Linux only (it reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if abs(count) >= 2**30 else f"{count / 2**20:.1f} MiB"


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def _reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _clone_everything_export(components, out: Path, half_precision: bool) -> None:
    """The export before issue 14: a clone of every tensor in the target dtype, then save_file."""
    import torch
    from safetensors.torch import save_file

    from dreambooth_helpers.export import convert_to_original_layout

    checkpoint = convert_to_original_layout(components.unet, components.vae, components.text_encoder)
    dtype = torch.float16 if half_precision else torch.float32
    checkpoint = {k: v.detach().to(dtype).contiguous().clone() for k, v in checkpoint.items()}
    save_file(checkpoint, str(out), metadata={"format": "pt"})


def measure_in_this_process(folder: str, out: str, half_precision: bool, method: str) -> dict:
    """Load `folder`, export it to `out`; the figures of the module docstring."""
    import gc

    import torch

    from dreambooth_helpers.export import write_checkpoint
    from dreambooth_helpers.models import load_components

    start = time.perf_counter()
    components = load_components(folder)
    loaded = time.perf_counter()
    gc.collect()
    model_bytes = sum(t.numel() * t.element_size() for m in (components.unet, components.vae, components.text_encoder)
                      for t in m.state_dict().values())
    load_peak, rss_loaded = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    _reset_peak()
    with torch.no_grad():
        if method == "streaming":
            write_checkpoint(components, out, half_precision=half_precision, source=Path(folder).name)
        else:
            _clone_everything_export(components, Path(out), half_precision)
    export_peak = _status_bytes("VmHWM")
    return {"method": method, "half": half_precision, "model_bytes": model_bytes,
            "file_bytes": Path(out).stat().st_size, "load_peak": load_peak, "rss_loaded": rss_loaded,
            "export_extra": export_peak - rss_loaded,
            "peak": max(load_peak, export_peak), "load_s": round(loaded - start, 1),
            "export_s": round(time.perf_counter() - loaded, 1)}


def measure(folder: str, out: str, half_precision: bool, method: str = "streaming") -> dict:
    """`measure_in_this_process` in a fresh interpreter: nothing from earlier runs counts."""
    command = [sys.executable, __file__, "--measure", folder, "--out", out, "--method", method]
    command += ["--half"] if half_precision else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_model_folder(model: str, folder: Path) -> None:
    """Build (or load) `model` and save it as a diffusers folder, in a separate process."""
    code = ("import sys; from dreambooth_helpers.models import load_components, make_pipeline; "
            "make_pipeline(load_components(sys.argv[1])).save_pretrained(sys.argv[2], safe_serialization=True)")
    subprocess.run([sys.executable, "-c", code, model, str(folder)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-random", help="sd15-random (default), tiny, or a model folder.")
    parser.add_argument("--keep", help="Save the model folder here (reused when it exists) instead of a temp dir.")
    parser.add_argument("--baseline", action="store_true", help="Also measure the old clone-everything export.")
    parser.add_argument("--no-half", action="store_true", help="Skip the --half (fp16) export.")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: measure this folder
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="streaming", help=argparse.SUPPRESS)
    parser.add_argument("--half", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_in_this_process(args.measure, args.out, args.half, args.method)))
        return

    with tempfile.TemporaryDirectory(prefix="export-memory-") as scratch:
        folder = Path(args.keep or Path(scratch, "model"))
        if Path(args.model).is_dir():
            folder = Path(args.model)
        elif not (folder / "model_index.json").is_file():
            print(f"saving {args.model} to {folder} ...", flush=True)
            save_model_folder(args.model, folder)
        runs = [("streaming", False)] + ([] if args.no_half else [("streaming", True)])
        if args.baseline:
            runs += [("clone", False)] + ([] if args.no_half else [("clone", True)])
        print(f"{'method':<10} {'dtype':<5} {'model':>10} {'load peak':>10} {'export extra':>12} {'peak':>10} "
              f"{'load s':>7} {'export s':>9}")
        results = []
        for method, half in runs:
            out = Path(scratch, f"{method}-{'fp16' if half else 'fp32'}.safetensors")
            result = measure(str(folder), str(out), half, method)
            out.unlink()
            results.append(result)
            print(f"{method:<10} {'fp16' if half else 'fp32':<5} {_size(result['model_bytes']):>10} "
                  f"{_size(result['load_peak']):>10} {_size(result['export_extra']):>12} {_size(result['peak']):>10} "
                  f"{result['load_s']:>7} {result['export_s']:>9}", flush=True)
        print(json.dumps(results))


if __name__ == "__main__":
    main()
