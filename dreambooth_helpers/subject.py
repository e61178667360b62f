"""The one place for the DreamBooth recipe of each subject kind: prompts, steps, learning rates, class images.

`TrainConfig` (and so the CLI's `train --kind` and the notebook's settings form) reads these values
whenever a setting is left at None, so a subject trained from the command line and from the
notebook gets the same run. Sources: the DreamBooth paper (Ruiz et al. 2022) for the prompts and
prior preservation; community practice and Hugging Face's DreamBooth blog (2x A100 runs) for steps
per photo and learning rates; the classic T4 Colab notebooks for the number of class images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

MIN_STEPS, MAX_STEPS = 400, 2000  # the step count a kind's steps-per-photo gives is kept within these
LORA_LEARNING_RATE = 1e-4  # LoRA adapters start at zero and need a ~50x larger rate than full weights
# The text encoder's rate as a share of the UNet's under LoRA: its adapters sit on a 123M-parameter encoder that
# reads every prompt, and drift fastest. A full fine-tune trains both at the same rate.
LORA_TEXT_ENCODER_SHARE = 0.5
# The offline toy model is ~200x smaller than SD and was itself trained at 6e-4: SD's rates would not move it
# in a few hundred steps (measured with scripts/measure_toy_model.py).
TOY_LEARNING_RATES = {"full": 1e-4, "lora": 1e-3}
# The toy model's text encoder (0.2 M parameters, width 64) trained at the UNet's full rate drifts and takes the
# class prompt with it: after the README's run "a toy" drew nearly one picture for every seed (DIV 0.49x the base
# model's), while the same UNet given back the base text encoder still drew varied toys. At 0.3x the UNet's rate
# the class keeps 0.82x its DIV and "a sks toy" still shows the robot in half the seeds, as at the full rate; at
# 0.1x the class stays varied but the subject is not learnt (scripts/ablate_class_diversity.py, docs/toy_model.md).
# LoRA keeps LORA_TEXT_ENCODER_SHARE; SD's own rates are unchanged (its text encoder is 600x larger and trains at
# 2e-6, not measured here).
TOY_TEXT_ENCODER_SHARE = 0.3
# Words a tokenizer knows well make bad identifiers: the model already means something by them.
COMMON_WORDS = frozenset(
    "a an the photo picture image of in on at with and dog cat man woman person boy girl toy car style painting "
    "red blue green black white my your sky sun".split()
)


@dataclass(frozen=True)
class Recipe:
    """What a subject kind changes in a run."""

    label: str  # how forms name the kind
    class_noun: str  # the usual class noun, offered as the form's default
    steps_per_image: int
    learning_rate: float  # full fine-tune of the UNet (and the text encoder); LoRA uses LORA_LEARNING_RATE
    num_class_images: int  # prior-preservation images to generate
    recommended_photos: tuple[int, int]  # (fewest, most) photos that work well; the doctor warns outside them
    prompt_set: str | None  # the DreamBooth paper's evaluation prompts ("object" or "live"); None: not measurable


RECIPES = {
    # 50 class images as in the classic T4 notebooks (~5 s each on a T4); the paper used ~200.
    "object": Recipe("an object or a pet", "dog", 150, 2e-6, 50, (3, 20), "object"),
    # Faces need more steps and a lower rate to keep the likeness without burning in, and more photos: angles,
    # expressions, light. The paper's "live" prompts add outfits.
    "person": Recipe("a person (a face)", "person", 200, 1e-6, 50, (8, 25), "live"),
    # A style has 10-40 varied pictures, so that no single one defines it; fewer passes over each are enough.
    # The paper's protocol measures likeness to one subject, which a style is not.
    "style": Recipe("an art style", "painting", 100, 2e-6, 50, (10, 40), None),
}
SUBJECT_KINDS = tuple(RECIPES)
DEFAULT_KIND = "object"


def recipe(kind: str) -> Recipe:
    if kind not in RECIPES:
        raise ConfigError(f"Subject kind {kind!r} is not one of {', '.join(SUBJECT_KINDS)}.")
    return RECIPES[kind]


def photo_range(kind: str = DEFAULT_KIND) -> str:
    """The photo count the kind's recipe recommends, as people read it: "3-20" for an object."""
    return "{}-{}".format(*recipe(kind).recommended_photos)


def default_steps(num_images: int, kind: str = DEFAULT_KIND) -> int:
    """Training steps for `num_images` photos: the kind's steps per photo, kept within MIN_STEPS..MAX_STEPS."""
    return min(MAX_STEPS, max(MIN_STEPS, recipe(kind).steps_per_image * max(1, num_images)))


def default_learning_rate(kind: str = DEFAULT_KIND, lora: bool = False, toy_model: bool = False) -> float:
    if toy_model:
        return TOY_LEARNING_RATES["lora" if lora else "full"]
    return LORA_LEARNING_RATE if lora else recipe(kind).learning_rate


def default_text_encoder_learning_rate(kind: str = DEFAULT_KIND, lora: bool = False, toy_model: bool = False) -> float:
    """The text encoder's rate: the UNet's for full fine-tuning (TOY_TEXT_ENCODER_SHARE of it on the toy model);
    LORA_TEXT_ENCODER_SHARE of it for LoRA."""
    return default_learning_rate(kind, lora, toy_model) * text_encoder_share(lora, toy_model)


def text_encoder_share(lora: bool, toy_model: bool = False) -> float:
    """The text encoder's learning rate as a share of the UNet's."""
    if lora:
        return LORA_TEXT_ENCODER_SHARE
    return TOY_TEXT_ENCODER_SHARE if toy_model else 1.0


# ---------------------------------------------------------------------------- prompts


def check_token(token: str) -> str:
    """The identifier, stripped; refuses what cannot work as one rare word."""
    token = (token or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9]{2,20}", token):
        raise ConfigError(f"Identifier token {token!r}: use one short made-up word of letters/digits, e.g. \"sks\" "
                          "or \"zwx\" (no spaces).")
    return token


# A class noun is a plain word or two: letters, digits, spaces and - ' _ . , ("dog", "teddy bear", "t-shirt").
CLASS_NOUN = re.compile(r"\w[\w '.,-]*")
# Characters that mean something to a shell, Markdown or a template and nothing to the text encoder; a prompt lands
# in the model card's commands and code (quoted there too), so a prompt with them is refused when it is given.
NOT_IN_PROMPTS = set('`$"\\;|{}')


def check_class_noun(class_noun: str) -> str:
    class_noun = " ".join((class_noun or "").split())
    if not class_noun or len(class_noun) > 40:
        raise ConfigError("Class noun is empty or too long: use the plain word for what the subject is, e.g. \"dog\", "
                          "\"backpack\", \"man\", \"woman\", \"painting\".")
    if not CLASS_NOUN.fullmatch(class_noun):
        raise ConfigError(f"Class noun {class_noun!r}: use letters, digits, spaces and - ' _ . , only, the plain word "
                          "for what the subject is, e.g. \"dog\", \"teddy bear\", \"t-shirt\".")
    return class_noun


def check_prompt_characters(option: str, prompt: str, where: str = "") -> None:
    """Refuse a prompt with a control character (a newline, an escape) or one of NOT_IN_PROMPTS, naming them."""
    bad = sorted({c for c in prompt if c in NOT_IN_PROMPTS or (ord(c) < 32 or 127 <= ord(c) < 160)})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise ConfigError(f"{option} {prompt!r}{where} has characters a prompt does not use ({shown}): write it on "
                          "one line with letters, digits, spaces and ordinary punctuation (- ' _ . , : ! ? ( ) < >), "
                          "e.g. \"a photo of sks dog\".")


def token_advice(token: str, class_noun: str) -> str | None:
    """A warning when the identifier is a word the model already knows (it would mix the two meanings)."""
    lowered = token.lower()
    if lowered == class_noun.lower() or lowered in COMMON_WORDS:
        return (f"{token!r} is an ordinary word, so the model already means something by it. A rare made-up word "
                "such as \"sks\" or \"zwx\" works better as the identifier.")
    return None


@dataclass(frozen=True)
class SubjectPrompts:
    instance: str  # names the subject: identifier + class noun
    class_: str  # the same without the identifier: what prior preservation generates
    samples: tuple[str, ...]  # drawn during training, to watch the subject appear
    generation: tuple[str, ...]  # to try after training: the subject in new contexts


def prompts_for(token: str, class_noun: str, kind: str = DEFAULT_KIND) -> SubjectPrompts:
    """The instance, class, sample and generation prompts for a subject of this kind."""
    token, noun = check_token(token), check_class_noun(class_noun)
    recipe(kind)
    if kind == "style":
        instance, class_ = f"a {noun} in {token} style", f"a {noun}"
        generation = (f"a {noun} of a lighthouse in {token} style",
                      f"a {noun} of a city street at night in {token} style",
                      f"a {noun} of a cat in {token} style",
                      f"a {noun} of mountains at sunrise in {token} style")
        samples = (instance, generation[0])
    elif kind == "person":
        instance, class_ = f"a photo of {token} {noun}", f"a photo of {noun}"
        generation = (f"a portrait photo of {token} {noun}, studio lighting", f"{token} {noun} as an astronaut",
                      f"an oil painting of {token} {noun}", f"a photo of {token} {noun} on the beach, smiling")
        samples = (instance, generation[1])
    else:
        instance, class_ = f"a photo of {token} {noun}", f"a photo of {noun}"
        generation = (f"a {token} {noun} in the jungle", f"a {token} {noun} in the snow", f"a red {token} {noun}",
                      f"a {token} {noun} on the beach")
        samples = (instance, generation[1])
    return SubjectPrompts(instance, class_, samples, generation)


def evaluation_kind(kind: str) -> str | None:
    """The DreamBooth paper's prompt set for this kind ("object" or "live"), None for a style."""
    return recipe(kind).prompt_set
