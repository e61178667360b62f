"""What the tutorial notebook's cells call, under one short name: `from dreambooth_helpers import widgets`.

The code lives in the `notebook` package, one module per concern (see its docstring); this module only
gathers its public names so that cells read `widgets.ImagePicker(...)`, `widgets.run_training(...)`.
"""
# ruff: noqa: F401  (every import here is a re-export for the notebook's cells)

from .failures import free_gpu_memory
from .notebook.after import (
    DEMO_USER,
    GenerationSettings,
    class_before_after,
    class_image_grid,
    default_repo_id,
    evaluate,
    evaluation_options,
    generate_examples,
    generation_settings,
    load_trained_model,
    make_class_images,
    publish,
    show_evaluation,
    split_prompts,
    start_app,
    start_demo,
    stop_demo,
)
from .notebook.forms import (
    SAMPLE_SUBJECT,
    UPLOAD_MAX_SIDE,
    ImagePicker,
    ImageSelection,
    NotebookSettings,
    SettingsForm,
    check_dataset,
    collect_images,
    config_summary,
    describe_settings,
    doctor_report,
    keep_checkpoints_on_drive,
    memory_outlook,
    prepared_images,
    preview_grid,
    run_name,
    sample_subject_dir,
    save_uploads,
    settings_to_config,
    smoke_overrides,
)
from .notebook.monitor import (
    TrainingMonitor,
    median_step_seconds,
    moving_average,
    plot_losses,
    progress_line,
    read_summary,
    run_training,
    sample_grid,
    training_facts,
)
from .notebook.runtime import (
    SD15_MODEL,
    SMOKE_VARIABLE,
    NotebookRuntime,
    check_can_train,
    choose_base_model,
    colab_secret,
    detect_runtime,
    gpu_status,
    hub_login,
    in_notebook_words,
    mount_drive,
    output_root,
    quiet_library_output,
    show_errors_plainly,
    smoke_model,
)
