"""The app's web page (`build_ui`): a Gradio Blocks page with four tabs, Photos, Train, Try it, Publish, over
app.py's TrainingApp (one handler per control, each passing the signed-in user on). What the page says of an error
is `message`: no server paths, no tokens.
"""

import logging
from typing import Any

from . import app_flow as flow
from .app import TrainingApp
from .app_access import public_text
from .config import PRESETS
from .errors import DreamBoothError
from .safe_text import log_exception, masked, plain_markdown
from .subject import DEFAULT_KIND, SUBJECT_KINDS

logger = logging.getLogger(__name__)
# Galleries show each image whole (scaled down to fit, never cropped) in a box of this height; a grid gives a lone
# image (Try it's usual one) the page's whole width, so its images are kept within that height too (PAGE_CSS, which
# app_launch passes to Gradio's launch()).
GALLERY_HEIGHT = 540  # px
WHOLE_IMAGES = {"object_fit": "contain", "height": GALLERY_HEIGHT}
PAGE_CSS = f"#images img {{ max-height: {GALLERY_HEIGHT - 40}px; }}"  # room for the gallery's label and buttons


def user_of(request: Any) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def message(error: Exception, markdown: bool = True) -> str:
    """What the page says of a failed action: the error without server paths (their last part only) or tokens,
    as plain text in Markdown (`markdown`) or a text box. An unexpected error is logged, its chain masked."""
    text = masked(public_text(str(error)))
    if not isinstance(error, DreamBoothError):
        log_exception(logger, "The app's action failed", error)
        text = f"{type(error).__name__}: {text}"
    return f"**Error:** {plain_markdown(text)}" if markdown else f"Error: {text}"


def build_ui(app: TrainingApp):
    """The Gradio Blocks page: Photos, Train, Try it, Publish."""
    import gradio as gr

    from .choices import base_model_choice, choice_for_model, choice_options, preset_for_model
    from .notebook.monitor import plot_losses
    from .uploads import discard, own_uploads

    def loss_plot(history):
        if not history:
            return None
        return plot_losses({"history": history})

    with gr.Blocks(title="DreamBooth", analytics_enabled=False) as ui:
        gr.Markdown("# DreamBooth: teach Stable Diffusion your subject\nUpload photos, train, try the model, "
                    "publish it. Training runs in the background: reload the page any time. Scripts: the "
                    "[REST API](/openapi.json) (HTTP basic auth as your sign-in; docs/app.md).",
                    elem_id="intro")
        kind = gr.Dropdown(list(SUBJECT_KINDS), value=DEFAULT_KIND, label="What the photos show", elem_id="kind")
        with gr.Tab("1. Photos"):
            files = gr.File(file_count="multiple", type="filepath", label="Photos or a zip", elem_id="upload")
            upload_button = gr.Button("Use these photos", variant="primary", elem_id="use-photos")
            crops = gr.Gallery(label="As training sees them", columns=6, elem_id="crops", **WHOLE_IMAGES)
            photo_report = gr.Textbox(label="What was read, and the dataset doctor's advice", lines=10,
                                      elem_id="photo-report")
        with gr.Tab("2. Train"):
            with gr.Row():
                base_model = gr.Dropdown(choice_options(), value=choice_for_model(app.model),
                                         label="Base model", elem_id="base-model")
                model = gr.Textbox(app.model, label="Model (Hub id, folder or file; the choice sets it)",
                                   elem_id="model")
            with gr.Row():
                token = gr.Textbox("sks", label="Identifier (a rare word)", info=flow.TOKEN_INFO, elem_id="token")
                class_noun = gr.Textbox("", label="Class noun", info=flow.CLASS_NOUN_INFO,
                                        placeholder=flow.CLASS_NOUN_EXAMPLE, elem_id="class-noun")
            with gr.Row():
                # The model's own preset (choices.py): on a CPU the toy model's, with what it becomes there.
                preset = gr.Dropdown(list(PRESETS), value=preset_for_model(app.model), label="Preset",
                                     elem_id="preset")
                steps = gr.Number(0, precision=0, minimum=0, maximum=app.limits.max_steps, label=flow.STEPS_LABEL,
                                  info=flow.STEPS_INFO, elem_id="steps")
            about_preset = gr.Markdown(flow.preset_description(preset_for_model(app.model), app.model),
                                       elem_id="preset-description")
            model_outlook = gr.Textbox(label="What this base model means: the recipe, GPU memory on a T4, system "
                                       "RAM on free Colab", lines=6, interactive=False, elem_id="model-outlook")
            with gr.Row():
                check_button = gr.Button("Check settings and memory", elem_id="check")
                start_button = gr.Button("Start training", variant="primary", elem_id="start")
            outlook = gr.Markdown(elem_id="outlook")
            with gr.Row():
                run = gr.Dropdown([], label="Run", elem_id="run", allow_custom_value=True)
                cancel_button = gr.Button("Cancel", elem_id="cancel")
                resume_button = gr.Button("Resume", elem_id="resume")
            run_status = gr.Markdown(elem_id="run-status")
            samples = gr.Gallery(label="Samples as training draws them", columns=4, elem_id="samples",
                                 **WHOLE_IMAGES)
            losses = gr.Plot(label="Loss", elem_id="losses")
        with gr.Tab("3. Try it"):
            try_run = gr.Dropdown([], label="Finished run", elem_id="try-run", allow_custom_value=True)
            prompt = gr.Textbox(label="Prompt", max_length=app.limits.max_prompt_chars, elem_id="prompt")
            with gr.Row():
                gen_steps = gr.Slider(1, app.limits.max_generation_steps, value=25, step=1, label="Steps")
                seed = gr.Textbox("random", label='Seed ("random" or a number)', elem_id="seed")
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            images = gr.Gallery(label="Images", columns=2, elem_id="images", **WHOLE_IMAGES)
            try_status = gr.Markdown(elem_id="try-status")
        with gr.Tab("4. Publish"):
            publish_run = gr.Dropdown([], label="Finished run", elem_id="publish-run", allow_custom_value=True)
            repo_id = gr.Textbox(label="Hub repository (USER/NAME)", elem_id="repo-id")
            private = gr.Checkbox(True, label="Private")
            hub_token = gr.Textbox(label="Hugging Face token (write access; used once, never stored)",
                                   type="password", elem_id="hub-token")
            overwrite_box = gr.Checkbox(False, label="Overwrite existing repository (else only a new one is created)",
                                        elem_id="overwrite")
            publish_button = gr.Button("Publish to the Hub", variant="primary", elem_id="publish")
            export_button = gr.Button("Export one .safetensors file", elem_id="export")
            exported = gr.File(label="Download", elem_id="exported")
            publish_status = gr.Markdown(elem_id="publish-status")
        shown_runs = gr.State("")  # the run lists' labels as the page shows them (app_flow.refreshed_lists)

        settings_inputs = [kind, token, class_noun, model, preset, steps]

        def settings_of(kind_value, token_value, noun_value, model_value, preset_value, steps_value):
            return dict(kind=kind_value, token=token_value, class_noun=noun_value, model=model_value,
                        preset=preset_value, steps=int(steps_value or 0))

        def lists_update(lists):  # the three run lists, and the signature of what they now show (`shown_runs`)
            return (gr.Dropdown(choices=lists.runs, value=lists.run),
                    gr.Dropdown(choices=lists.finished, value=lists.try_run),
                    gr.Dropdown(choices=lists.finished, value=lists.publish_run), lists.signature)

        def runs_update(user, selected=None):
            return lists_update(flow.run_lists(app, user, selected))

        def on_upload(file_paths, kind_value, request: gr.Request):
            user = user_of(request)
            try:  # only files this user put through the upload door, used once
                files = own_uploads(file_paths or [], app.uploads_dir(user))
                view = app.upload(user, files, kind_value)
            except Exception as error:
                return gr.skip(), message(error, markdown=False)
            discard(files, app.uploads_dir(user))
            return view.crops, view.report

        def on_outlook(choice, kind_value, preset_value, steps_value, request: gr.Request):
            if not choice:
                return ""
            try:
                return app.model_outlook(user_of(request), choice, kind=kind_value, preset=preset_value,
                                         steps=steps_value)
            except Exception as error:
                return message(error, markdown=False)

        def on_base_model(choice, kind_value, steps_value, request: gr.Request):
            """A base-model choice sets the model and its preset, and shows what they mean for the run."""
            if not choice:
                return gr.skip(), gr.skip(), ""
            chosen = base_model_choice(choice)
            return chosen.model, chosen.preset, on_outlook(choice, kind_value, chosen.preset, steps_value, request)

        def on_check(kind_value, token_value, noun_value, model_value, preset_value, steps_value,
                     request: gr.Request):
            values = (kind_value, token_value, noun_value, model_value, preset_value, steps_value)
            try:
                return app.outlook(user_of(request), **settings_of(*values))
            except Exception as error:
                return message(error)

        def on_start(kind_value, token_value, noun_value, model_value, preset_value, steps_value,
                     request: gr.Request):
            values = (kind_value, token_value, noun_value, model_value, preset_value, steps_value)
            user = user_of(request)
            try:
                job = app.start(user, **settings_of(*values))
            except Exception as error:
                return (message(error), *runs_update(user))
            return f"Run {job.job_id} submitted: its state shows below.", *runs_update(user, job.job_id)

        def on_tick(job_id, try_value, publish_value, shown, request: gr.Request):
            """The poll: the chosen run's progress, and the run lists once a run's state has changed."""
            user = user_of(request)
            try:
                lists = flow.refreshed_lists(app, user, shown, job_id, try_value, publish_value)
            except Exception:
                lists = None
            updates = lists_update(lists) if lists else (gr.skip(),) * 4
            return (*on_view(job_id, request), *updates)

        def on_view(job_id, request: gr.Request):
            if not job_id:
                return "", [], None
            try:
                view = app.job_view(user_of(request), job_id)
            except Exception as error:
                return message(error), [], None
            return view.text, view.samples, loss_plot(view.history)

        def job_action(action):
            """A Cancel/Resume handler: `action(user, job_id)`, then the run's status (or why it failed)."""
            def handler(job_id, request: gr.Request):
                try:
                    action(user_of(request), job_id)
                except Exception as error:
                    return message(error)
                return on_view(job_id, request)[0]
            return handler

        on_cancel, on_resume = job_action(app.cancel), job_action(app.resume)

        def on_generate(job_id, prompt_text, steps_value, seed_text, request: gr.Request):
            from .demo_api import parse_seed
            from .grids import enlarged

            try:
                made = app.generate(user_of(request), job_id, prompt_text, steps=int(steps_value),
                                    seed=parse_seed(seed_text))
            except Exception as error:
                return gr.skip(), message(error)
            return [enlarged(image, 512) for image in made], f"Done: {len(made)} image(s)."  # small ones: sharp

        def on_try_run(job_id, request: gr.Request):
            try:
                return app.example_prompt(user_of(request), job_id) if job_id else gr.skip()
            except Exception:
                return gr.skip()

        def on_publish(job_id, repo, private_value, token_value, overwrite, request: gr.Request):
            # The token field is emptied whatever happens; the message never contains the token.
            try:
                url = app.publish(user_of(request), job_id, repo, bool(private_value), token_value, bool(overwrite))
            except Exception as error:
                return message(error), ""
            return f"Published: {url}", ""

        def on_export(job_id, request: gr.Request):
            try:
                path = app.export(user_of(request), job_id)
            except Exception as error:
                return None, message(error)
            return str(path), f"Exported {path.name}."

        def on_load(request: gr.Request):
            user = user_of(request)
            view = app.photos_view(user)
            return (view.crops, view.report, *runs_update(user), *flow.form_values(app, user, gr.skip()))

        # The run lists accept any value: the choices change as runs start, and every action checks the id
        # itself (JobRunner: only folders of its jobs; the app: only the signed-in user's runs).
        list_outputs = [run, try_run, publish_run, shown_runs]
        upload_button.click(on_upload, [files, kind], [crops, photo_report], api_name="upload")
        base_model.change(on_base_model, [base_model, kind, steps], [model, preset, model_outlook],
                          api_visibility="private").then(flow.preset_description, [preset, model], about_preset,
                                                         api_visibility="private", show_progress="hidden")
        for control in (kind, preset, steps):
            control.change(on_outlook, [base_model, kind, preset, steps], [model_outlook], api_visibility="private",
                           show_progress="hidden")
        ui.load(on_outlook, [base_model, kind, preset, steps], [model_outlook], api_visibility="private")
        preset.change(flow.preset_description, [preset, model], about_preset, api_visibility="private",
                      show_progress="hidden")
        check_button.click(on_check, settings_inputs, [outlook], api_name="check")
        start_button.click(on_start, settings_inputs, [outlook, *list_outputs], api_name="start")
        run.change(on_view, [run], [run_status, samples, losses], api_name="view", show_progress="hidden")
        cancel_button.click(on_cancel, [run], [run_status], api_name="cancel")
        resume_button.click(on_resume, [run], [run_status], api_name="resume")
        try_run.change(on_try_run, [try_run], [prompt], api_visibility="private")
        generate_button.click(on_generate, [try_run, prompt, gen_steps, seed], [images, try_status],
                              api_name="generate")
        publish_button.click(on_publish, [publish_run, repo_id, private, hub_token, overwrite_box],
                             [publish_status, hub_token], api_name="publish")
        export_button.click(on_export, [publish_run], [exported, publish_status], api_name="export")
        ui.load(on_load, outputs=[crops, photo_report, *list_outputs, *settings_inputs, base_model],
                api_visibility="private")
        # Live progress: the run's files on disk, read every two seconds while the page is open.
        timer = gr.Timer(2.0)
        timer.tick(on_tick, [run, try_run, publish_run, shown_runs], [run_status, samples, losses, *list_outputs],
                   show_progress="hidden", api_visibility="private")
    ui.queue(default_concurrency_limit=1, max_size=32)
    return ui
