"""The tutorial notebook's glue, one module per concern; the notebook's cells call it as `widgets.X`.

- runtime.py: where we run (Colab, smoke test), the GPU, Google Drive, the Hub login, errors in the notebook's words;
- forms.py: the photos (Colab's upload, ipywidgets, a folder, the sample), the settings form, and the TrainConfig;
- monitor.py: training with progress and samples, or reusing a finished run; the loss plot;
- after.py: class images, generation, the demo, publishing and evaluation.
"""
