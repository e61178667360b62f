"""Small outputs shown so they can be seen (issue 30): the toy model's 32 px images enlarged by a whole factor with
nearest neighbour in grids, galleries and sample sheets, the files themselves left at their true size; samples
labelled with their prompt and step; captions wrapped or shortened between words, never inside one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth_helpers.grids import DISPLAY_MIN, _fit_lines, display_scale, enlarged, labelled_grid
from dreambooth_helpers.inference import image_grid

torch.set_num_threads(1)


def noise(size: int = 32, seed: int = 0) -> Image.Image:
    """A picture whose every pixel differs from its neighbours: any smoothing shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def blocks_of(image: Image.Image, factor: int) -> Image.Image:
    """What nearest-neighbour enlargement by `factor` must give: each pixel a factor x factor block."""
    return Image.fromarray(np.asarray(image).repeat(factor, axis=0).repeat(factor, axis=1))


def dark_pixels(image: Image.Image, box) -> int:
    return int((np.asarray(image.crop(box).convert("L")) < 100).sum())


def test_enlarged_repeats_each_pixel_by_a_whole_factor_and_leaves_big_images_alone():
    small = noise(32)
    assert display_scale((32, 32)) == 8 and display_scale((64, 48)) == 4 and display_scale((512, 512)) == 1
    big = enlarged(small)
    assert big.size == (DISPLAY_MIN, DISPLAY_MIN) and big.tobytes() == blocks_of(small, 8).tobytes()
    assert small.size == (32, 32)  # the original is not touched
    assert enlarged(small, 512).size == (512, 512)
    photo = noise(300)
    assert enlarged(photo) is photo


def test_the_generate_grid_of_eight_32px_images_has_256px_cells_with_exact_pixels():
    images = [noise(32, seed) for seed in range(8)]
    before = [image.tobytes() for image in images]
    grid = image_grid(images, min_cell=DISPLAY_MIN)  # what `generate --grid` writes
    assert grid.size == (3 * 256, 3 * 256)  # was 96x96: eight 32 px cells
    for index, image in enumerate(images):
        left, top = 256 * (index % 3), 256 * (index // 3)
        assert grid.crop((left, top, left + 256, top + 256)).tobytes() == blocks_of(image, 8).tobytes()
    assert grid.getpixel((700, 700)) == (255, 255, 255)  # the empty ninth cell
    assert [image.tobytes() for image in images] == before and all(i.size == (32, 32) for i in images)
    assert image_grid(images).size == (96, 96)  # without min_cell: true size, as the Hub's sample grid


def test_the_generate_cli_writes_an_enlarged_grid_and_true_size_pngs(tmp_path, capsys):
    from dreambooth_helpers.cli import main

    out = tmp_path / "images"
    assert main(["generate", "--model", "toy", "--prompt", "a photo of a red ball", "--num-images", "2",
                 "--steps", "2", "--seed", "3", "--grid", "--out", str(out)]) == 0
    pngs = sorted(out.glob("image-*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (32, 32) for p in pngs)
    grid = Image.open(out / "grid.png").convert("RGB")
    assert grid.size == (512, 256)
    assert grid.crop((0, 0, 256, 256)).tobytes() == blocks_of(Image.open(pngs[0]).convert("RGB"), 8).tobytes()
    assert "requires torchvision" not in capsys.readouterr().err


def test_labelled_grid_enlarges_small_images_exactly_and_still_shrinks_big_ones():
    small, big = noise(32, 1), noise(300, 2)
    grid = labelled_grid([("", [small, big])], cell=128)
    assert grid.size == (256, 128)
    assert grid.crop((0, 0, 128, 128)).tobytes() == blocks_of(small, 4).tobytes()
    odd = labelled_grid([("", [noise(48, 3)])], cell=128)  # 2x is the largest whole factor: centred, 16 px border
    assert odd.crop((16, 16, 112, 112)).tobytes() == blocks_of(noise(48, 3), 2).tobytes()
    assert odd.getpixel((5, 5)) == (255, 255, 255)


def test_captions_wrap_and_shorten_between_words_never_inside_one():
    text = "a photo of sks toy robot standing on a wooden table in a sunny garden, highly detailed"
    words = set(text.split())
    for width in (60, 90, 150):
        for max_lines in (1, 2, 3):
            lines = _fit_lines(text, width, max_lines)
            assert 1 <= len(lines) <= max_lines
            assert all(len(line) * 6 <= width for line in lines)
            shown = " ".join(lines)
            for word in shown.removesuffix("...").split():  # every word shown whole
                assert word in words, (width, max_lines, lines)
            assert shown.endswith("...") == (shown.replace("...", "").split() != text.split())
    assert _fit_lines("a sks toy", 200, 1) == ["a sks toy"]
    assert _fit_lines("supercalifragilistic toy", 60, 2) == ["superca...", "toy"]  # one word wider than a line


def test_row_labels_are_shortened_at_a_word_and_captions_sit_under_their_images():
    label = "seed 1234+: a photo of sks toy on a red background with a long tail of extra words"
    grid = labelled_grid([(label, [noise(32, 4)])], cell=128, captions=[["a sks toy on a red background"]])
    assert grid.width == 128 and grid.height > 16 + 128  # a caption band under the cell
    assert dark_pixels(grid, (0, 0, 128, 16)) > 20  # the label
    assert dark_pixels(grid, (0, 16 + 128, 128, grid.height)) > 20  # the caption
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength  # the label as written: whole words, then "..."
    [line] = _fit_lines(label, 128 - 8, 1, measure)
    assert line.endswith("...") and label.startswith(line.removesuffix("...") + " ") and measure(line) <= 120


@pytest.mark.slow  # trains the tiny model for 2 steps (~20 s on a busy CPU)
def test_training_writes_labelled_sample_sheets_beside_true_size_samples(make_config):
    from dreambooth_helpers.notebook.monitor import sample_grid
    from dreambooth_helpers.run_outputs import SAMPLE_SHEET, sample_caption, shown_sample
    from dreambooth_helpers.training import train

    config = make_config(max_train_steps=2, sample_every=2, sample_prompts=["a photo of sks dog",
                                                                            "a sks dog on the beach"])
    result = train(config, progress=False)
    samples = sorted(result.sample_images)
    assert [p.name for p in samples] == ["step-000002-0.png", "step-000002-1.png"]  # only the true-size files
    for path, prompt in zip(samples, config.sample_prompts, strict=True):
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.text["prompt"] == prompt and image.text["step"] == "2"
        assert sample_caption(path) == f"step 2: {prompt}"
    sheet = Image.open(samples[0].parent / SAMPLE_SHEET.format(step=2)).convert("RGB")
    assert sheet.width == 2 * 256 and sheet.height > 16 + 256  # "step 2" above, the prompts below
    for index, path in enumerate(samples):
        cell = sheet.crop((256 * index, 16, 256 * (index + 1), 16 + 256))
        assert cell.tobytes() == blocks_of(Image.open(path).convert("RGB"), 8).tobytes()
    assert dark_pixels(sheet, (0, 0, 100, 16)) > 10 and dark_pixels(sheet, (0, 272, 512, sheet.height)) > 40
    # The app's samples gallery and the notebook's grid show them the same way.
    image, caption = shown_sample(samples[1])
    assert image.size == (256, 256) and caption == "step 2: a sks dog on the beach"
    grid = sample_grid(samples)
    assert grid.width == 2 * 192 and grid.height > 16 + 192
