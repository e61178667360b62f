"""The paper's metrics on tiny random encoders, the checkpoint rule, and `evaluate` end to end (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth_helpers import evaluation
from dreambooth_helpers.cli import main
from dreambooth_helpers.errors import ConfigError, ModelLoadError
from dreambooth_helpers.eval_diversity import (
    PAPER_PRIOR_FIGURES,
    HistogramSsimDistance,
    class_comparison_grid,
    class_prior_scores,
    diversity,
    load_perceptual_distance,
)
from dreambooth_helpers.eval_encoders import (
    SubjectScores,
    build_tiny_encoders,
    load_encoders,
    mean_cosine,
    real_image_scores,
    score_images,
)
from dreambooth_helpers.evaluation import (
    LIVE_SUBJECT_PROMPTS,
    OBJECT_PROMPTS,
    PAPER_FIGURES,
    CheckpointScore,
    choose_checkpoint,
    evaluate_checkpoints,
    evaluate_model,
    generate_images,
    paper_prompts,
    prompt_set_for,
)

from .trained_fixtures import make_full_output


@pytest.fixture(scope="module")
def encoders():
    return build_tiny_encoders()


def disc(colour, size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), (235, 235, 235))
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=colour)
    return image


def stripes(size=64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    pattern = ((x // 4 + y // 4) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([pattern, 255 - pattern, pattern // 2], axis=-1))


def test_paper_prompt_lists_have_25_prompts_with_and_without_the_identifier():
    assert len(OBJECT_PROMPTS) == len(LIVE_SUBJECT_PROMPTS) == 25
    objects = paper_prompts("backpack", identifier="zwx")
    assert objects[0].prompt == "a zwx backpack in the jungle" and objects[0].clip_text == "a backpack in the jungle"
    live = paper_prompts("dog", prompt_set="live")
    assert "a sks dog wearing a santa hat" in [p.prompt for p in live]
    assert "a sks dog wearing a santa hat" not in [p.prompt for p in objects]
    assert all("sks" not in p.clip_text for p in live)
    assert len(paper_prompts("dog", count=5)) == 5
    with pytest.raises(ConfigError, match="Prompt set 'animal'"):
        paper_prompts("dog", prompt_set="animal")
    with pytest.raises(ConfigError, match="class"):
        paper_prompts(" ")
    with pytest.raises(ConfigError, match="1 to 25"):
        paper_prompts("dog", count=26)


def test_kind_picks_the_prompt_set_and_defaults_to_the_kind_the_run_trained():
    """evaluate --kind takes train's subject kinds (and "live", the paper's own name for the person list)."""
    assert [prompt_set_for(kind) for kind in ("object", "person", "live")] == ["object", "live", "live"]
    assert prompt_set_for(None) == "object"  # nothing recorded: the default kind
    assert prompt_set_for(None, {"config": {"kind": "person"}}) == "live"
    assert prompt_set_for("object", {"config": {"kind": "person"}}) == "object"  # given wins over recorded
    for kind, summary in (("style", None), (None, {"config": {"kind": "style"}})):
        with pytest.raises(ConfigError, match="measures likeness to one subject"):
            prompt_set_for(kind, summary)
    with pytest.raises(ConfigError, match="--kind 'animal'"):
        prompt_set_for("animal")


def test_embeddings_are_batched_and_unit_length(encoders):
    images = [disc((200, 20, 20)), stripes(), disc((20, 20, 200), size=80)]
    encoders.dino.batch_size = encoders.clip.batch_size = 2  # forces two batches
    for embed in (encoders.dino.embed_images, encoders.clip.embed_images):
        vectors = embed(images)
        assert vectors.shape[0] == 3 and vectors.dtype == torch.float32
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(embed(images[:1]), vectors[:1], atol=1e-5)  # batching does not change results
    texts = encoders.clip.embed_texts(["a red ball", "a blue cube", "a dog"])
    assert texts.shape == (3, encoders.clip.embed_images(images[:1]).shape[1])


def test_identical_images_score_one_and_unrelated_ones_lower(encoders):
    real = [disc((200, 20, 20))]
    prompts = paper_prompts("ball", count=2)
    same = score_images([[disc((200, 20, 20))], [disc((200, 20, 20))]], prompts, real, encoders)
    assert same.dino == pytest.approx(1.0, abs=1e-4) and same.clip_i == pytest.approx(1.0, abs=1e-4)
    other = score_images([[stripes()], [stripes()]], prompts, real, encoders)
    assert other.dino < same.dino - 1e-3 and other.clip_i < same.clip_i - 1e-3
    for scores in (same, other):
        assert -1.0 <= scores.clip_t <= 1.0 and -1.0 <= scores.dino <= 1.0
        assert scores.num_images == 2 and len(scores.per_prompt) == 2


def test_clip_t_compares_each_image_with_its_own_prompt(encoders):
    images = [[disc((200, 20, 20))], [stripes(), disc((20, 200, 20))]]
    prompts = paper_prompts("ball", count=2)
    scores = score_images(images, prompts, [disc((0, 0, 0))], encoders)
    texts = encoders.clip.embed_texts([p.clip_text for p in prompts])
    first = float(encoders.clip.embed_images(images[0]) @ texts[0])
    second = (encoders.clip.embed_images(images[1]) @ texts[1]).mean().item()
    assert scores.per_prompt[0].clip_t == pytest.approx(first, abs=1e-5)
    assert scores.per_prompt[1].clip_t == pytest.approx(second, abs=1e-5)
    assert scores.clip_t == pytest.approx((first + 2 * second) / 3, abs=1e-5)  # a mean over images


def test_real_image_ceiling_leaves_out_self_pairs(encoders):
    assert real_image_scores([disc((200, 20, 20))], encoders) == {"dino": None, "clip_i": None}
    twins = real_image_scores([disc((200, 20, 20)), disc((200, 20, 20))], encoders)
    assert twins["dino"] == pytest.approx(1.0, abs=1e-4)
    vectors = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    off_diagonal = [(vectors[i] @ vectors[j]).item() for i in range(4) for j in range(4) if i != j]
    assert mean_cosine(vectors, vectors, exclude_diagonal=True) == pytest.approx(np.mean(off_diagonal), abs=1e-6)


def test_generation_uses_fixed_distinct_seeds_per_image():
    calls = []

    def fake_generate(prompt, seed, count):
        calls.append((prompt, seed, count))
        return [Image.new("RGB", (8, 8))] * count

    images = generate_images(fake_generate, paper_prompts("dog", count=3), images_per_prompt=4, seed=10)
    assert [len(group) for group in images] == [4, 4, 4]
    assert [seed for _, seed, _ in calls] == [10, 14, 18]  # prompt i starts at seed + 4i: no image shares noise
    with pytest.raises(ConfigError, match="at least|>= 1"):
        generate_images(fake_generate, paper_prompts("dog", count=1), images_per_prompt=0)


def point(step, dino, clip_t):
    return CheckpointScore(step, f"checkpoint-{step}", SubjectScores(dino, dino, clip_t, 4, 2))


def test_checkpoint_rule_stops_where_clip_t_falls():
    points = [point(100, 0.50, 0.300), point(200, 0.60, 0.295), point(300, 0.70, 0.270)]
    chosen, reason = choose_checkpoint(points, clip_t_tolerance=0.01)
    assert chosen.step == 200  # step 300 is more alike but lost 0.03 CLIP-T: overfitting
    assert "within 0.01" in reason and "step 200" in reason
    assert choose_checkpoint(points, clip_t_tolerance=0.05)[0].step == 300
    tied = [point(100, 0.6, 0.3), point(200, 0.6, 0.3)]
    assert choose_checkpoint(tied)[0].step == 100  # equal numbers: the earlier, less trained one
    with pytest.raises(ConfigError, match="--checkpoint-every"):
        choose_checkpoint([])


def test_missing_real_encoders_give_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="--encoders tiny"):
        load_encoders("paper", dino_model=str(tmp_path / "no-such-dino"))
    with pytest.raises(ConfigError, match="--encoders"):
        load_encoders("huge")


def test_evaluate_model_writes_json_markdown_and_grid(tmp_path, instance_dir, encoders):
    model = make_full_output(tmp_path / "model")
    report = evaluate_model(str(model), "dog", instance_dir=instance_dir, num_prompts=2, images_per_prompt=2,
                            num_inference_steps=2, resolution=32, encoders=encoders, output_dir=tmp_path / "eval",
                            class_samples=4)
    assert report.settings["identifier"] == "sks" and report.settings["identifier_source"] == "training_summary.json"
    assert set(report.figures) == {"dino", "clip_i", "clip_t"}
    saved = json.loads(Path(report.json_path).read_text())
    assert saved["figures"]["dino"] == pytest.approx(report.scores.dino)
    assert saved["paper"] == PAPER_FIGURES and saved["scores"]["num_images"] == 4
    markdown = Path(report.markdown_path).read_text()
    assert "0.668" in markdown and "0.885" in markdown and "mean nothing" in markdown
    grid = Image.open(report.grid_path)
    assert grid.height == 3 * 128  # your photos + 2 prompts
    assert report.timings["generation_s"] > 0 and report.timings["metrics_s"] > 0
    # What prior preservation protects: the run's class prompt, on the model and on its base model ("tiny").
    prior = saved["class_prior"]
    assert prior["class_prompt"] == "a photo of dog" and prior["base_model"] == "tiny" and prior["num_samples"] == 4
    assert all(prior[k] is not None for k in ("div_before", "div_after", "pres_before", "pres_after", "div_ratio"))
    assert "stand-in" in prior["distance"]  # no LPIPS weights offline
    assert "What prior preservation protects" in markdown and "0.493" in markdown and "PRES" in markdown
    assert Image.open(report.class_grid_path).size == (4 * 128, 2 * (128 + 16))  # before row, after row


def test_identical_images_have_no_diversity_and_varied_ones_do():
    distance = HistogramSsimDistance()
    same = [disc((200, 20, 20))] * 4
    varied = [disc((200, 20, 20)), disc((20, 20, 200)), stripes(), disc((20, 180, 20), size=80)]
    assert diversity(same, distance) == pytest.approx(0.0, abs=1e-6)
    assert diversity(varied, distance) > 0.3
    pairwise = distance.pairwise(varied)
    assert np.allclose(pairwise, pairwise.T) and np.allclose(np.diag(pairwise), 0) and pairwise.max() <= 1.0
    assert pairwise[0, 1] == pytest.approx(distance.distance(varied[0], varied[1]))
    # Same colours, other layout: the structural half tells them apart.
    assert distance.distance(stripes(), stripes().transpose(Image.Transpose.ROTATE_90)) > 0.1
    with pytest.raises(ConfigError, match="at least 2"):
        diversity(same[:1], distance)


def test_lpips_is_used_when_it_loads_else_the_stand_in_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lpips", None)  # as on a machine without the package (or its weights)
    assert isinstance(load_perceptual_distance("auto"), HistogramSsimDistance)
    with pytest.raises(ModelLoadError, match="histogram-ssim"):
        load_perceptual_distance("lpips")
    with pytest.raises(ConfigError, match="--diversity-distance"):
        load_perceptual_distance("psnr")


def test_lpips_distances_fill_a_symmetric_matrix(monkeypatch):
    """The LPIPS path, with a stand-in network (LPIPS's AlexNet weights cannot be downloaded here): each pair
    is scored once, on [-1, 1] pixels, and the matrix is symmetric with a zero diagonal."""
    import sys
    from types import SimpleNamespace

    class MeanAbsolute(torch.nn.Module):
        def forward(self, a, b):
            assert a.shape == b.shape and a.min() >= -1 and a.max() <= 1
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", SimpleNamespace(LPIPS=lambda net, verbose: MeanAbsolute()))
    distance = load_perceptual_distance("auto", device="cpu")
    assert distance.name.startswith("LPIPS")
    images = [disc((200, 20, 20)), disc((20, 20, 200)), stripes()]
    pairwise = distance.pairwise(images)
    assert np.allclose(pairwise, pairwise.T) and np.allclose(np.diag(pairwise), 0)
    first, second = (torch.from_numpy(np.asarray(im.resize((256, 256)), np.float32)) / 127.5 - 1 for im in images[:2])
    assert pairwise[0, 1] == pytest.approx(float((first - second).abs().mean()), rel=1e-5)
    assert diversity(images, distance) == pytest.approx(pairwise[np.triu_indices(3, k=1)].mean())


def test_class_prior_scores_tell_a_collapsed_class_from_a_kept_one(encoders):
    subject = [disc((200, 20, 20))]
    varied = [disc((20, 20, 200)), stripes(), disc((20, 180, 20), size=80), disc((240, 200, 20))]
    collapsed = [disc((200, 20, 20))] * 4  # every class image became the subject
    distance = HistogramSsimDistance()
    scores = class_prior_scores(collapsed, "a ball", before=varied, real_images=subject, encoders=encoders,
                                distance=distance, base_model="base")
    assert scores.div_after == pytest.approx(0.0, abs=1e-6) and scores.div_ratio < 0.1
    assert scores.pres_after == pytest.approx(1.0, abs=1e-4) and scores.pres_before < scores.pres_after
    assert "collapsing" in scores.verdict()
    kept = class_prior_scores(varied[::-1], "a ball", before=varied, distance=distance)
    assert kept.div_ratio == pytest.approx(1.0) and kept.pres_after is None and "kept its variety" in kept.verdict()
    alone = class_prior_scores(varied, "a ball", distance=distance)
    assert alone.div_before is None and alone.div_ratio is None and "No base model" in alone.verdict()


def test_class_grid_shows_before_above_after_seed_by_seed():
    before = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 255, 0))]
    after = [Image.new("RGB", (32, 32), (0, 0, 255)), Image.new("RGB", (32, 32), (255, 255, 0))]
    grid = class_comparison_grid(before, after, "a toy", cell=32)
    label = 16  # each row's label above it
    assert grid.size == (2 * 32, 2 * (32 + label))
    assert grid.getpixel((16, label + 16)) == (255, 0, 0) and grid.getpixel((48, label + 16)) == (0, 255, 0)
    assert grid.getpixel((16, 2 * label + 48)) == (0, 0, 255) and grid.getpixel((48, 2 * label + 48)) == (255, 255, 0)


def test_evaluate_model_compares_the_class_with_the_base_model_on_the_same_seeds(tmp_path, instance_dir, encoders):
    calls = []

    def trained(prompt, seed, count):
        calls.append(("trained", prompt, seed, count))
        return [disc((200, 20, 20))] * count  # collapsed

    def base(prompt, seed, count):
        calls.append(("base", prompt, seed, count))
        return [disc(((seed + i) * 60 % 256, 90, 200 - (seed + i) * 40 % 200)) for i in range(count)]

    report = evaluate_model(str(make_full_output(tmp_path / "model")), "dog", instance_dir=instance_dir,
                            num_prompts=1, images_per_prompt=1, encoders=encoders, generate=trained,
                            base_generate=base, class_samples=6, seed=3, output_dir=tmp_path / "eval")
    class_calls = [call for call in calls if call[1] == "a photo of dog"]
    assert class_calls == [("trained", "a photo of dog", 3, 6), ("base", "a photo of dog", 3, 6)]
    assert report.class_prior.div_ratio < 0.2 and "collapsing" in Path(report.markdown_path).read_text()
    skipped = evaluate_model(str(tmp_path / "model"), "dog", instance_dir=instance_dir, num_prompts=1,
                             images_per_prompt=1, encoders=encoders, generate=trained, class_samples=0)
    assert skipped.class_prior is None and skipped.to_dict()["class_prior"] is None
    with pytest.raises(ConfigError, match="--class-samples 1"):
        evaluate_model(str(tmp_path / "model"), "dog", instance_dir=instance_dir, encoders=encoders,
                       generate=trained, class_samples=1)
    assert PAPER_PRIOR_FIGURES["DreamBooth (Imagen) with prior preservation, paper"] == {"pres": 0.493, "div": 0.391}


def _write_checkpoint(run: Path, step: int, nudge: float) -> None:
    """A checkpoint in the trainer's layout, with the UNet moved by `nudge` so checkpoints differ."""
    from dreambooth_helpers.checkpoints import TrainingState, save_checkpoint
    from dreambooth_helpers.models import build_tiny_components

    unet = build_tiny_components().unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(nudge)
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.1)
    state = TrainingState(unet, None, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0), None, False)
    save_checkpoint(run, step, state, {"base_model": "tiny"}, keep=10)


def test_evaluate_checkpoints_plots_and_recommends(tmp_path, instance_dir, encoders):
    run = make_full_output(tmp_path / "run")  # its summary says 10 steps
    for step, nudge in ((3, 0.0), (6, 0.02)):
        _write_checkpoint(run, step, nudge)
    comparison = evaluate_checkpoints(run, "dog", instance_dir=instance_dir, num_prompts=2, images_per_prompt=1,
                                      num_inference_steps=2, encoders=encoders)
    assert [p.step for p in comparison.points] == [3, 6, 10]  # the final model joins as step 10
    assert comparison.recommended in comparison.points
    assert Path(comparison.plot_path).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(Path(comparison.json_path).read_text())
    assert saved["recommended"]["step"] == comparison.recommended.step and len(saved["checkpoints"]) == 3
    assert (run / "evaluation" / "checkpoints.md").is_file()


def test_evaluate_checkpoints_needs_something_to_compare(tmp_path, instance_dir, encoders):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="checkpoints-total-limit"):
        evaluate_checkpoints(tmp_path / "empty", "dog", instance_dir=instance_dir, encoders=encoders)


def test_cli_evaluate_with_tiny_encoders(tmp_path, instance_dir, capsys):
    model = make_full_output(tmp_path / "model")
    code = main(["evaluate", "--model", str(model), "--instance-dir", str(instance_dir), "--class-noun", "dog",
                 "--kind", "live", "--num-prompts", "2", "--prompts-per-image", "1", "--steps", "2",
                 "--encoders", "tiny", "--class-samples", "2", "--diversity-distance", "histogram-ssim"])
    assert code == 0
    assert (model / "evaluation" / "evaluation.json").is_file()
    assert (model / "evaluation" / "evaluation_grid.png").is_file()
    out = capsys.readouterr().out
    assert "DreamBooth (Stable Diffusion), paper" in out and "What prior preservation protects" in out


def test_cli_evaluate_offline_paper_encoders_fail_clearly(tmp_path, instance_dir, capsys):
    model = make_full_output(tmp_path / "model")
    code = main(["evaluate", "--model", str(model), "--instance-dir", str(instance_dir), "--class-noun", "dog"])
    assert code == 2
    assert "--encoders tiny" in capsys.readouterr().err


def _with_kind(model: Path, kind: str) -> Path:
    summary_path = model / "training_summary.json"
    summary = json.loads(summary_path.read_text())
    summary["config"]["kind"] = kind
    summary_path.write_text(json.dumps(summary))
    return model


def test_cli_evaluate_defaults_to_the_runs_kind_and_passes_the_memory_savings(tmp_path, instance_dir, monkeypatch,
                                                                             capsys):
    model = _with_kind(make_full_output(tmp_path / "model"), "person")
    loaded_with = []

    def recording_load_generator(*args, **kwargs):
        loaded_with.append(kwargs)
        return load_generator(*args, **kwargs)

    load_generator = evaluation.load_generator
    monkeypatch.setattr(evaluation, "load_generator", recording_load_generator)
    code = main(["evaluate", "--model", str(model), "--instance-dir", str(instance_dir), "--class-noun", "man",
                 "--num-prompts", "1", "--prompts-per-image", "1", "--steps", "2", "--encoders", "tiny",
                 "--attention-slicing", "--vae-tiling", "--class-samples", "3"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((model / "evaluation" / "evaluation.json").read_text())
    assert report["settings"]["prompt_set"] == "live"  # the run was trained as a person
    # The model, then its base model for the class prompt's "before", both with the savings.
    assert loaded_with == [{"attention_slicing": True, "vae_tiling": True}] * 2
    assert report["class_prior"]["base_model"] == "tiny" and report["class_prior"]["num_samples"] == 3
    assert (model / "evaluation" / "class_prior_grid.png").is_file()


def test_cli_evaluate_refuses_a_style_with_the_reason(tmp_path, instance_dir, capsys):
    style_run = _with_kind(make_full_output(tmp_path / "model"), "style")
    for extra in ([], ["--kind", "style"]):
        code = main(["evaluate", "--model", str(style_run), "--instance-dir", str(instance_dir), "--class-noun",
                     "painting", "--encoders", "tiny", *extra])
        err = capsys.readouterr().err
        assert code == 2 and "measures likeness to one subject, which a style is not" in err
    assert not (style_run / "evaluation" / "evaluation.json").exists()
