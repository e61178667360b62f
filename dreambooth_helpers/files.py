"""The names of the files a training run writes, and that generation, publishing and evaluation look for.

One home for each name, so the writer and its readers cannot drift apart. A finished run's folder holds
either MODEL_INDEX_FILE (a full fine-tune: a diffusers pipeline) or LORA_WEIGHTS_FILE (a LoRA run), and
always SUMMARY_FILE.
"""

SUMMARY_FILE = "training_summary.json"  # the run's config, base model, prompts and losses
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
MODEL_INDEX_FILE = "model_index.json"  # what makes a folder a diffusers pipeline
GRID_FILE = "grid.png"  # generate's contact sheet, and the sample grid on a published model's page
CARD_FILE = "README.md"  # a published model's card
SAMPLES_DIR = "samples"  # the images drawn during training, in a run's folder
