"""Hostile and damaged input to the SDXL paths: LoRA files, model folders, checkpoints. Each is one clear error
naming the file and what to do, never a traceback, and nothing of the user's is overwritten."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dreambooth_helpers import load_components
from dreambooth_helpers.errors import ConfigError, ModelLoadError, TrainingError
from dreambooth_helpers.export import export_single_file
from dreambooth_helpers.export_lora import export_webui_lora
from dreambooth_helpers.families import SD1, SDXL, family_of
from dreambooth_helpers.files import LORA_WEIGHTS_FILE
from dreambooth_helpers.training import train

DOWN, UP = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight", \
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"


def _lora(folder, tensors=None, metadata: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else {DOWN: torch.ones(4, 64), UP: torch.ones(64, 4) * 0.01}
    extra = {"format": "pt"} | ({"lora_adapter_metadata": metadata} if metadata is not None else {})
    save_file(tensors, folder / LORA_WEIGHTS_FILE, metadata=extra)
    (folder / "training_summary.json").write_text(json.dumps({"family": "sdxl", "base_model": "tiny-sdxl"}))
    return folder


@pytest.mark.parametrize("metadata, said", [
    ("{not json", "cannot be read"),
    ("[" * 5000 + "]" * 5000, "nests deeper"),
    ('["a list"]', "not a table"),
    ('{"unet.lora_alpha": "abc"}', "positive number"),
    ('{"unet.lora_alpha": 1e999}', "positive number"),
    ('{"unet.lora_alpha": -4}', "positive number"),
    ('{"unet.lora_alpha": true}', "positive number"),
    ('{"unet.lora_alpha": 4, "unet.use_rslora": true}', "rsLoRA"),
])
def test_hostile_lora_metadata_is_one_clear_error(tmp_path, metadata, said):
    run = _lora(tmp_path / "run", metadata=metadata)
    with pytest.raises(ModelLoadError, match=said):
        export_webui_lora(run, tmp_path / "out.safetensors", SDXL)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("tensors, said", [
    ({}, "holds no weights"),
    ({DOWN: torch.ones(4, 64)}, "half of"),
    ({DOWN: torch.ones(4, 64), UP: torch.ones(64, 3)}, "do not fit together"),
    ({DOWN: torch.ones(0, 64), UP: torch.ones(64, 0)}, "do not fit together"),
    ({DOWN: torch.tensor(1.0), UP: torch.ones(64, 4)}, "do not fit together"),
    ({DOWN: torch.full((4, 64), float("nan")), UP: torch.ones(64, 4)}, "NaN/inf"),
    ({DOWN: torch.full((4, 64), 1e6), UP: torch.ones(64, 4)}, "too large for fp16"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2)}, "no LoRA file"),
])
def test_damaged_lora_weights_are_refused_not_exported(tmp_path, tensors, said):
    run = _lora(tmp_path / "run", tensors=tensors)
    with pytest.raises(ModelLoadError, match=said):
        export_webui_lora(run, tmp_path / "out.safetensors", SDXL)


def test_the_export_never_overwrites_the_run_it_reads_and_makes_a_missing_folder(tmp_path):
    run = _lora(tmp_path / "run", metadata='{"unet.lora_alpha": 8, "unet.r": 4}')
    before = (run / LORA_WEIGHTS_FILE).read_bytes()
    (run / "checkpoints" / "checkpoint-000002").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-000002" / "lora_unet.safetensors").write_bytes(b"kept")
    for target in (run / LORA_WEIGHTS_FILE, run / "checkpoints" / "checkpoint-000002" / "lora_unet.safetensors"):
        with pytest.raises(ConfigError, match="would overwrite a file of the training run"):
            export_single_file(None, target, lora=str(run))
    assert (run / LORA_WEIGHTS_FILE).read_bytes() == before
    out = export_single_file(None, tmp_path / "new" / "folder" / "x.safetensors", lora=str(run))
    from safetensors.torch import load_file

    assert float(load_file(out)["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 8.0


def test_a_lora_of_one_family_is_not_merged_into_the_other(tmp_path):
    sd1_run = tmp_path / "sd1"
    sd1_run.mkdir()
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.ones(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": torch.ones(32, 4)},
              sd1_run / LORA_WEIGHTS_FILE)
    (sd1_run / "training_summary.json").write_text(json.dumps({"family": "sd1", "base_model": "tiny"}))
    with pytest.raises(ConfigError, match="only fit the family"):
        export_single_file("tiny-sdxl", tmp_path / "x.safetensors", lora=str(sd1_run))


def test_a_file_saying_sdxl_by_its_weights_wins_over_a_hostile_summary(tmp_path):
    run = _lora(tmp_path / "run", tensors={
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.ones(4, 32),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": torch.ones(32, 4)})
    (run / "training_summary.json").write_text(json.dumps({"family": ["sdxl"], "base_model": 123}))
    from dreambooth_helpers.export_lora import lora_family

    assert lora_family(run) is SDXL


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl") / "model"
    components = load_components("tiny-sdxl")
    components.family.pipeline(components).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage, said", [
    (lambda f: (f / "model_index.json").write_text("[]"), "not a JSON object"),
    (lambda f: (f / "model_index.json").write_text("[" * 5000), "cannot be read"),
    (lambda f: (f / "unet" / "config.json").write_text("[1]"), "not a JSON object"),
    (lambda f: (f / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"})),
     "mixes two models"),
    (lambda f: (f / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                               "transformer": ["x", "y"]})), "only Stable Diffusion"),
])
def test_a_damaged_or_foreign_model_folder_is_one_clear_error(xl_folder, tmp_path, damage, said):
    folder = tmp_path / "model"
    shutil.copytree(xl_folder, folder)
    damage(folder)
    with pytest.raises(ModelLoadError, match=said):
        family_of(str(folder))


def test_an_sdxl_folder_without_its_second_text_encoder_names_it(xl_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(xl_folder, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="without text_encoder_2/"):
        load_components(str(folder))


@pytest.mark.parametrize("name", ["someone/RealVisXL_V4.0", "someone/dreamshaperXL", "segmind/SSD-1B",
                                  "someone/juggernaut-xl-v9"])
def test_sdxl_hub_names_are_known_offline(name):
    assert family_of(name) is SDXL
    assert family_of("someone/pixel-art-sd15") is SD1


def test_a_checkpoint_missing_an_encoders_adapters_is_refused_not_reset(make_config, tmp_path):
    config = make_config(model="tiny-sdxl", lora=True, lora_rank=4, train_text_encoder=True, max_train_steps=4,
                         checkpoint_every=2, with_prior_preservation=False, output_dir=str(tmp_path / "run"))
    train(config, progress=False)
    resumed = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "checkpoint-000002", resumed / "checkpoint-000002")
    (resumed / "checkpoint-000002" / "lora_text_encoder_2.safetensors").unlink()
    with pytest.raises(TrainingError, match="no lora_text_encoder_2.safetensors"):
        train(config.replace(output_dir=str(tmp_path / "resumed"), resume="latest"), progress=False)
