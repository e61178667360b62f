"""The memory/speed benchmark's CPU path: it runs the project's training on the tiny model and reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_memory_speed.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("train_memory_speed", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_benchmark_reports_every_column_on_the_tiny_model(tmp_path):
    benchmark = _load_benchmark()
    result = benchmark.main(["--model", "tiny", "--steps", "3", "--warmup", "1", "--rows", "full-unet+text",
                             "--presets", "t4", "--class-image-steps", "1", "--generation-images", "4",
                             "--generation-resolution", "32", "--ours-steps", "2", "--pndm-steps", "2",
                             "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(result))
    (row,) = saved["rows"]
    assert row["row"] == "full-unet+text" and row["preset"] == "t4" and row["train_text_encoder"]
    assert row["flops_per_step"] > 0 and row["s_per_step"] > 0 and row["steps_timed"] == 1
    assert row["estimate_peak_allocated_gib"] > 0
    assert row["peak_allocated_gib"] is None and row["estimate_error_pct"] is None  # no GPU: nothing measured
    generation = saved["generation"]
    assert set(generation["class_images_per_s"]) == {"ours_dpmpp_2_steps", "pipeline_pndm_2_steps"}
    assert generation["class_images_speedup"] > 0 and generation["demo_s_per_image"] > 0

    table = (tmp_path / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| row |"))
    for column in ("peak alloc GiB", "peak reserved GiB", "planner GiB", "planner error", "s/step", "TFLOP/step"):
        assert column in header
    assert "| full-unet+text | t4 |" in table and "class-image speed-up" in table


def test_the_benchmark_rows_cover_the_issue_matrix():
    benchmark = _load_benchmark()
    assert set(benchmark.ROWS) == {"full-unet", "full-unet+text", "lora-r4", "lora-r4+text"}
    assert benchmark.PRESETS == ("t4", "low-memory")


def _load_step_flops():
    spec = importlib.util.spec_from_file_location("step_flops", BENCHMARK.with_name("step_flops.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_meta_flop_count_is_the_real_training_loops_count(tmp_path):
    """step_flops.py's step must be exactly the step train() runs (counted on the CPU, the same kernels)."""
    benchmark, step_flops = _load_benchmark(), _load_step_flops()
    from dreambooth_helpers import Concept, TrainConfig
    from dreambooth_helpers.training import resolve_runtime

    photos = benchmark.synthetic_photos(tmp_path / "photos", 2, 64)
    for row in ("full-unet+text", "lora-r4"):
        result = benchmark.main(["--model", "tiny", "--steps", "2", "--warmup", "0", "--rows", row, "--presets", "t4",
                                 "--class-image-steps", "1", "--generation-images", "0", "--out", str(tmp_path / row)])
        measured = result["rows"][0]["flops_per_step"]
        config = TrainConfig.from_preset("t4", model="tiny", mixed_precision="no", concepts=[
            Concept(str(photos), benchmark.PROMPT, benchmark.CLASS_PROMPT)], **benchmark.ROWS[row])
        checkpointing = resolve_runtime(config, cuda_available=False).gradient_checkpointing
        assert result["rows"][0]["gradient_checkpointing"] == checkpointing
        assert step_flops.count_step_flops(config, checkpointing, anchor=False, device="cpu") == measured
        # The anchor's step adds the VAE encoder (and here the text encoder's forward for the frozen one).
        assert step_flops.count_step_flops(config, checkpointing, anchor=True, device="cpu") > measured


@pytest.mark.slow
def test_our_step_needs_at_most_085x_the_anchors_flops_on_the_tiny_model(tmp_path):
    step_flops = _load_step_flops()
    results = step_flops.main(["--model", "tiny", "--out", str(tmp_path)])
    assert {r["row"] for r in results} == set(step_flops.ROWS)
    for r in results:
        assert r["ours_tflop"] < r["anchor_tflop"] and r["ours_ckpt_tflop"] > r["ours_tflop"]  # recompute counted
        assert 0 < r["ratio_no_ckpt"] <= 0.85
    assert "| full-unet+text |" in (tmp_path / "results.md").read_text()
