"""Per-photo captions: reading photo.txt and metadata.jsonl, the identifier rule, the checks, and training on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth_helpers import captions, run_identity, training
from dreambooth_helpers.cli import _config_from_args, build_parser
from dreambooth_helpers.data import read_images
from dreambooth_helpers.errors import ConfigError, ImageDataError
from dreambooth_helpers.models import TOY_MODEL_DIR

INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"


def _captioned(folder: Path, mode: str = "auto"):
    return captions.attach_captions(read_images(folder), folder, INSTANCE, CLASS, mode)


def _by_name(report):
    return {record.name: record for record in report.images}


def test_txt_beside_a_photo_and_metadata_jsonl_give_each_photo_its_caption(instance_dir):
    (instance_dir / "photo0.txt").write_text("sks dog   asleep\non a red sofa\n")
    (instance_dir / "metadata.jsonl").write_text(
        json.dumps({"file_name": "photo1.png", "text": "SKS dog on a beach", "extra": 1}) + "\n\n")
    report = _captioned(instance_dir)
    records = _by_name(report)
    assert records["photo0.png"].caption == "sks dog asleep on a red sofa"  # one line, single spaces
    assert records["photo1.png"].caption == "SKS dog on a beach"  # the identifier matches in any case
    assert records["photo2.png"].caption is None and records["photo3.png"].caption is None  # the instance prompt
    assert report.skipped == []  # the caption files are not listed as photos that failed
    assert "2 of 4 photo(s)" in captions.caption_summary(report)


def test_a_caption_without_the_identifier_gets_the_instance_prompt_in_front_or_is_refused_when_strict(instance_dir):
    (instance_dir / "photo0.txt").write_text("a dog on a beach")
    (instance_dir / "photo1.txt").write_text("sksdog is not the word sks")  # "sks" as a whole word: contained
    records = _by_name(_captioned(instance_dir))
    assert records["photo0.png"].caption == f"{INSTANCE}, a dog on a beach"
    assert captions.INSERTED_NOTE in records["photo0.png"].notes
    assert records["photo1.png"].caption == "sksdog is not the word sks"
    with pytest.raises(ImageDataError, match=r"photo0\.txt.*identifier 'sks'.*--captions auto"):
        _captioned(instance_dir, "strict")
    assert all(record.caption is None for record in _captioned(instance_dir, "off").images)


def test_the_identifier_is_what_the_instance_prompt_adds_to_the_class_prompt():
    assert captions.identifier_of("a photo of sks dog", "a photo of dog") == ["sks"]
    assert captions.identifier_of("photo of <zwx> chair", "photo of chair") == ["<zwx>"]
    assert captions.identifier_of("a photo of sks dog", None) == []
    # Without a class prompt the whole instance prompt is what a caption must contain.
    assert captions.has_identifier("A photo of sks dog, running", "a photo of sks dog", [])
    assert not captions.has_identifier("sks dog running", "a photo of sks dog", [])


@pytest.mark.parametrize("files, message", [
    ({"lonely.txt": "sks dog"}, r"lonely\.txt: a caption file without a photo"),
    ({"photo0.txt": "  \n"}, r"photo0\.txt: the caption is empty"),
    ({"metadata.jsonl": '{"file_name": "photo0.png", "text": "sks"}\n{"file_name": "photo1.png", "text": }\n'},
     r"metadata\.jsonl line 2: not valid JSON"),
    ({"metadata.jsonl": '{"file_name": "gone.png", "text": "sks dog"}'}, r"line 1: 'gone\.png' is not a photo"),
    ({"metadata.jsonl": '{"file_name": "photo0.png", "caption": "sks dog"}'}, r'line 1: needs the caption.*"text"'),
    ({"metadata.jsonl": '["photo0.png", "sks dog"]'}, r'line 1: needs a "file_name"'),
    ({"metadata.jsonl": '{"file_name": "photo0.png", "text": ""}'}, r"line 1: the caption is empty"),
    ({"photo0.txt": "sks dog", "metadata.jsonl": '{"file_name": "photo0.png", "text": "sks dog"}'},
     r"line 1: photo0\.png already has a caption in photo0\.txt"),
])
def test_caption_mistakes_are_refused_naming_the_file(instance_dir, files, message):
    for name, text in files.items():
        (instance_dir / name).write_text(text)
    with pytest.raises(ImageDataError, match=message):
        _captioned(instance_dir)
    _captioned(instance_dir, "off")  # --captions off reads none of them


def test_a_caption_longer_than_the_text_encoder_reads_is_counted_with_the_tokenizer(instance_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOY_MODEL_DIR / "tokenizer")
    long_tail = " ".join(["red"] * 90)
    (instance_dir / "photo0.txt").write_text(f"sks dog on a sofa {long_tail}")
    report = _captioned(instance_dir)
    [notice] = captions.check_caption_lengths(report, tokenizer, INSTANCE, CLASS)
    assert "photo0.png is 100 tokens" in notice and "reads the first 77" in notice and "rest is cut" in notice
    # The identifier past the cut: the photo would teach nothing about the subject.
    (instance_dir / "photo0.txt").write_text(f"{long_tail} sks dog")
    with pytest.raises(ImageDataError, match=r"photo0\.png is 94 tokens.*identifier lies past them"):
        captions.check_caption_lengths(_captioned(instance_dir), tokenizer, INSTANCE, CLASS)
    (instance_dir / "photo0.txt").write_text("sks dog on a sofa")
    assert captions.check_caption_lengths(_captioned(instance_dir), tokenizer, INSTANCE, CLASS) == []


def test_captions_flag_reaches_the_config_and_a_bad_value_is_refused(tmp_path, make_config):
    args = build_parser().parse_args(["train", "--instance-dir", str(tmp_path), "--instance-prompt", INSTANCE,
                                      "--class-prompt", CLASS, "--output-dir", str(tmp_path / "out"),
                                      "--captions", "strict"])
    assert _config_from_args(args).captions == "strict"
    with pytest.raises(ConfigError, match="--captions 'sometimes'"):
        make_config(captions="sometimes").validate()


@pytest.mark.slow
def test_training_uses_each_caption_and_a_changed_caption_is_another_run(instance_dir, make_config, monkeypatch):
    (instance_dir / "photo0.txt").write_text("sks dog wearing a hat")
    (instance_dir / "photo1.txt").write_text("a dog in the snow")
    tokenized = []
    from dreambooth_helpers.families import SD1

    original = type(SD1).tokenize
    monkeypatch.setattr(type(SD1), "tokenize",
                        lambda self, components, prompt: tokenized.append(prompt) or original(self, components, prompt))
    notices = []
    config = make_config(max_train_steps=2, report_to="none")
    training.train(config, progress=False, on_notice=notices.append)
    assert tokenized[:4] == ["sks dog wearing a hat", f"{INSTANCE}, a dog in the snow", INSTANCE, INSTANCE]
    assert any("2 of 4 photo(s)" in notice and "photo1.png" in notice for notice in notices)
    assert run_identity.find_finished_run(config) is not None  # the same photos and captions: the same run
    (instance_dir / "photo0.txt").write_text("sks dog wearing a scarf")
    assert run_identity.find_finished_run(config) is None
    (instance_dir / "photo0.txt").write_text("sks dog wearing a hat")
    assert run_identity.find_finished_run(config) is not None
    assert run_identity.find_finished_run(config.replace(captions="off")) is None  # no captions: another run too


def test_the_notebooks_photo_cell_reads_captions_with_the_same_reader(instance_dir, tmp_path):
    from dreambooth_helpers.notebook.forms import collect_images

    (instance_dir / "photo0.txt").write_text("sks dog on a sofa")
    selection = collect_images("folder", str(instance_dir), tmp_path / "work")
    assert selection.num_images == 4 and selection.report.skipped == []  # photo0.txt is a caption, not a failure
    assert "1 of 4 photo(s) have their own caption" in selection.report.warnings[0]
    (instance_dir / "lonely.txt").write_text("sks dog")
    with pytest.raises(ImageDataError, match=r"lonely\.txt: a caption file without a photo"):
        collect_images("folder", str(instance_dir), tmp_path / "work")


def _train_cli(instance_dir: Path, tmp_path: Path, capsys) -> tuple[int, str, float]:
    import time

    from dreambooth_helpers.cli import main

    started = time.monotonic()
    code = main(["train", "--instance-dir", str(instance_dir), "--instance-prompt", INSTANCE, "--class-prompt", CLASS,
                 "--output-dir", str(tmp_path / "out"), "--model", "tiny"])
    return code, capsys.readouterr().err, time.monotonic() - started


def test_a_huge_caption_file_fails_fast_with_one_error_naming_it_and_the_limit(instance_dir, tmp_path, capsys):
    words = b"sks dog on a red sofa "
    (instance_dir / "photo0.txt").write_bytes(words * (50 * 2**20 // len(words)))  # 50 MB
    code, err, seconds = _train_cli(instance_dir, tmp_path, capsys)
    assert code == 2 and seconds < 20, (code, seconds)
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err
    assert "photo0.txt" in err and f"{captions.MAX_CAPTION_BYTES // 1024} KB" in err and "77 tokens" in err
    assert not (tmp_path / "out").exists()
    # Just over the limit is refused too; at the limit is read (and later cut to what the text encoder reads).
    (instance_dir / "photo0.txt").write_text("sks dog " + "x" * (captions.MAX_CAPTION_BYTES - 7))
    with pytest.raises(ImageDataError, match=r"photo0\.txt: .* over the 16 KB limit"):
        _captioned(instance_dir)
    (instance_dir / "photo0.txt").write_text("sks dog " + "x" * (captions.MAX_CAPTION_BYTES - 8))
    assert len(_by_name(_captioned(instance_dir))["photo0.png"].caption) == captions.MAX_CAPTION_BYTES
    # The same bound for a caption in metadata.jsonl.
    (instance_dir / "photo0.txt").unlink()
    (instance_dir / "metadata.jsonl").write_text(json.dumps({"file_name": "photo1.png", "text": "sks " * 5000}))
    with pytest.raises(ImageDataError, match=r"metadata\.jsonl line 1: the caption is .* over the 16 KB limit"):
        _captioned(instance_dir)


def test_a_deeply_nested_metadata_line_is_refused_without_a_traceback(instance_dir, tmp_path, capsys):
    nested = '{"file_name": "photo0.png", "text": "sks dog", "extra": ' + "[" * 5000 + "]" * 5000 + "}"
    (instance_dir / "metadata.jsonl").write_text('{"file_name": "photo1.png", "text": "sks dog"}\n' + nested + "\n")
    code, err, _ = _train_cli(instance_dir, tmp_path, capsys)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err and "Recursion" not in err, err
    assert "metadata.jsonl line 2" in err and "nested deeper than" in err
    # What imagefolder's extra columns hold (a list, an object) is fine.
    (instance_dir / "metadata.jsonl").write_text(json.dumps(
        {"file_name": "photo0.png", "text": "sks dog", "tags": ["a", "b"], "box": {"xy": [1, 2]}}))
    assert _by_name(_captioned(instance_dir))["photo0.png"].caption == "sks dog"


def test_the_metadata_file_is_bounded_in_bytes_and_lines(instance_dir, monkeypatch):
    line = json.dumps({"file_name": "photo0.png", "text": "sks dog"}) + "\n"
    (instance_dir / "metadata.jsonl").write_text(line * (captions.MAX_METADATA_LINES + 1))
    with pytest.raises(ImageDataError, match=rf"metadata\.jsonl: over {captions.MAX_METADATA_LINES} lines"):
        _captioned(instance_dir)  # refused as too long before the duplicate lines are looked at
    (instance_dir / "metadata.jsonl").write_bytes(b"\n" * (captions.MAX_METADATA_BYTES + 1))
    with pytest.raises(ImageDataError, match=rf"metadata\.jsonl: .* over the {captions.MAX_METADATA_BYTES // 2**20} "
                                             "MB limit"):
        _captioned(instance_dir)
    (instance_dir / "metadata.jsonl").write_text('{"file_name": "photo0.png", "text": "sks dog \\ud800"}')
    with pytest.raises(ImageDataError, match=r"metadata\.jsonl line 1: the caption holds a lone surrogate"):
        _captioned(instance_dir)
