"""PoGDiff Studio: the Gradio app (UI only).

Every callback is a method of :class:`pogdiff.ui.Studio`; this file lays out the components and
binds them. Nothing heavy happens at import time: the demo set, the text encoder and the models
are built on first use.

    python app.py                      # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 7860 --runs-dir runs --max-upload-mb 500 --max-job-minutes 60

Security model (README "Limits and safety"): every endpoint checks its inputs on the server, no
request value is used as a path, only files a response returns are served, and a training job
belongs to the session that started it unless the server is single-user (the default on localhost).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

# Offline-safe: no telemetry, no version check. Must be set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from pogdiff.config import LIMITS, METHODS, PRESETS, PsiConfig, TrainConfig  # noqa: E402
from pogdiff.constants import SHOT_COLOURS  # noqa: E402
from pogdiff.neighbours import POOLS  # noqa: E402
from pogdiff.ui import Studio  # noqa: E402
from pogdiff.ui.views import class_source_choices  # noqa: E402

TITLE = "PoGDiff Studio"
POLL_SECONDS = 1.0
DEFAULT_STEPS = 300
DEFAULT_PREVIEW_EVERY = 50
DEFAULT_MAX_UPLOAD_MB = 500
DEFAULT_CONCURRENCY = 2
QUEUE_SIZE = 64
# ZeroGPU: the events that run models share one queue and ask for the GPU this long (seconds).
GPU_QUEUE = "gpu"
COMPARE_GPU_SECONDS = 120
METRICS_GPU_SECONDS = 300
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

CSS = """
.pg-progress {margin: 4px 0 8px 0;}
.pg-progress-track {height: 12px; background: var(--neutral-200); border-radius: 6px; overflow: hidden;}
.pg-progress-fill {height: 100%; transition: width .4s ease;}
.pg-progress-label {font-size: var(--text-sm); margin-top: 4px; color: var(--body-text-color-subdued);}
.pixelated img, .pixelated canvas {image-rendering: pixelated;}
.explain {color: var(--body-text-color-subdued); font-size: var(--text-md);}
#pg-header h1 {margin-bottom: 0;}
#pg-report table {display: block; overflow-x: auto; table-layout: auto;}
#pg-report th:nth-child(-n+2), #pg-report td:nth-child(-n+2) {white-space: nowrap; min-width: 5.5em;}
#pg-report th:nth-child(3), #pg-report td:nth-child(3) {min-width: 8em; overflow-wrap: anywhere;}
#pg-report th:nth-child(n+4), #pg-report td:nth-child(n+4) {min-width: 14em;}
"""

INTRO = """# PoGDiff Studio
Fine-tune a text-to-image diffusion model on **imbalanced** image–text data with the
**PoGDiff** objective (product of Gaussians with a neighbouring caption's prediction), and see
whether prompts of *rare* subjects come out better than with plain fine-tuning.
Work left to right: **Data → Neighbours → Train → Compare**."""

DATA_HELP = """Load an image–text set: a **.zip** (or several loose files) with images and captions in
`metadata.jsonl` / `metadata.csv` (`file_name`, `text`, optional `subject`), `.txt` files beside the
images, or one sub-folder per class, or start with the **built-in demo set**: procedurally drawn
people with a long-tailed number of photos each. The report lists every problem with how to fix it;
the table and chart show how imbalanced the classes are (*many* > 20 images, *few* < 5)."""

CLASS_SOURCE_INFO = ("Where each image's class comes from. auto: the metadata's subject column, else class "
                     "folders, else captions that read 'a photo of X, ...', else the first tag of tag captions "
                     "('red circle, white background' -> red circle), else clustering of the captions. "
                     "Another choice reloads the loaded set.")

NEIGHBOURS_HELP = """Each dot is one training caption, placed by a 2-D PCA of its sentence embedding. PoGDiff lets a
caption borrow from one of its **k nearest captions**: its target becomes a precision-weighted mix
of the true noise and the model's prediction for the neighbour, with weight
**psi = psi_max × w_density × s_img × s_txt**. Rare captions (high *w_density*) whose neighbours
look alike (*s_img*) and read alike (*s_txt*) borrow the most; frequent ones borrow almost nothing.
Pick a caption by clicking its row in the **points table** beside the map (rarest classes first), or drag
across the map to list only the points of that band. Click a row of the neighbour table to hop to that caption."""

TRAIN_HELP = """Fine-tune from the shipped base model with one objective: **baseline** (plain ε-MSE),
**pogdiff**, **cbdm** (class-balancing regulariser) or **resample** (class-balanced batches). Training
runs on the server in the background: the curve and the previews of rare prompts update live, a page
refresh or another tab re-attaches to the same job, and **Stop** ends it after the current step and
keeps its checkpoint. One job runs per server at a time."""

COMPARE_HELP = """Two checkpoints, the **same prompts and the same seeds**: any difference comes from the
fine-tuning. Prompts of few-shot subjects are pre-selected because that is where PoGDiff should help.
Drag the slider to compare one pair; the grids show every prompt × seed, beside the real training images
of each prompted subject, and the heatmap below shows where A and B differ. **Compute metrics** scores
generations of each class of the loaded data: on the demo with its identity classifier; on your own data
with a classifier fitted on your images, whose reliability per class is shown beside the scores (a class
it cannot tell apart is marked weak). Accuracy per class and against class frequency, and B − A per class. The tab keeps your choices and results over a page reload."""

NEIGHBOUR_HEADERS = list(Studio.NEIGHBOUR_COLUMNS)  # key columns (psi, p(draw), informative) first
NEIGHBOUR_TYPES = [Studio.NEIGHBOUR_TYPES[c] for c in NEIGHBOUR_HEADERS]
SEARCH_HEADERS = ["rank", "similarity", "caption", "subject", "class size", "row"]

OPT_INFO = {
    "method": "baseline: plain fine-tuning · pogdiff: borrow from neighbouring captions · "
              "cbdm: class-balancing regulariser · resample: class-balanced batches",
    "preset": "tiny: small pixel-space UNet, runs on CPU · sd15: Stable Diffusion 1.x/2.x with LoRA (GPU)",
}


BASE_NOTE = ("The shipped base, checkpoints/base-tiny, is a face model pretrained on 40 procedural demo identities "
             "at 32 px: on your own data it starts from faces. From scratch (a random UNet) needs many more steps. "
             "One of your tiny runs: a new run fine-tunes its last checkpoint on the loaded data.")

def build_demo(studio: Studio | None = None) -> gr.Blocks:
    """Lay out the four tabs and bind them to ``studio`` (a fresh :class:`Studio` by default)."""
    studio = studio or Studio()
    defaults = TrainConfig()
    psi = PsiConfig()
    max_age_s = int(3600 * studio.limits.upload_max_age_hours)
    # Uploads and generated files in gradio's cache expire: swept hourly, deleted once older than max_age_s.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(min(3600, max_age_s), max_age_s)) as demo:
        ds_key = gr.State(None)  # which loaded dataset this browser session works on
        saved_key = gr.BrowserState(None, storage_key="pogdiff-dataset",  # ds_key, kept across page reloads
                                    secret=studio.browser_secret())
        seen = gr.State(-1)  # last job version this tab has drawn
        cmp_state = gr.BrowserState(None, storage_key="pogdiff-compare",  # Compare choices + results token
                                    secret=studio.browser_secret())
        timer = gr.Timer(POLL_SECONDS)  # polls the server-side job: refresh-proof, shared by all tabs
        gr.Markdown(INTRO, elem_id="pg-header")
        with gr.Tabs():
            # ----------------------------------------------------------------------- Data
            with gr.Tab("Data", id="data"):
                gr.Markdown(DATA_HELP, elem_classes="explain")
                with gr.Row():
                    with gr.Column(scale=2):
                        upload = gr.File(
                            label="Upload a .zip, or several images + metadata.jsonl / .csv / .txt captions",
                            file_count="multiple",
                            file_types=[".zip", "image", ".jsonl", ".csv", ".txt", ".json"],
                            height=140,
                        )
                        with gr.Row():
                            load_btn = gr.Button("Validate and load upload", variant="primary")
                            demo_btn = gr.Button("Use the built-in demo set", variant="secondary")
                        class_src = gr.Radio(class_source_choices(), value="auto", label="Class source",
                                             info=CLASS_SOURCE_INFO, elem_id="pg-class-source")
                    with gr.Column(scale=3):
                        summary_md = gr.Markdown("No dataset loaded yet. Upload one or use the demo set.")
                        with gr.Accordion("Validation report", open=True):
                            report_md = gr.Markdown("", elem_id="pg-report")
                with gr.Row():
                    class_table = gr.Dataframe(
                        label="Images per class", interactive=False, max_height=360, scale=2,
                        headers=["subject", "count", "shot"],
                    )
                    long_tail = gr.BarPlot(
                        x="subject", y="count", color="shot", color_map=SHOT_COLOURS,
                        sort="-y", title="Long tail: images per class", x_title="class (most to least frequent)",
                        y_title="training images", x_label_angle=-45, height=360, scale=3,
                        tooltip=["subject", "count", "shot"],
                    )
                class_dd = gr.Dropdown(
                    label="Samples of one class", choices=[], filterable=True,
                    info="Pick a class to see its images and captions (few-shot classes first in the demo).",
                )
                class_gallery = gr.Gallery(label="Class samples", columns=8, height=300, object_fit="contain",
                                           fit_columns=False,
                                           elem_classes="pixelated", allow_preview=True)

            # ----------------------------------------------------------------- Neighbours
            with gr.Tab("Neighbours", id="neighbours") as nb_tab:
                gr.Markdown(NEIGHBOURS_HELP, elem_classes="explain")
                nb_banner = gr.Markdown(studio.dataset_banner(None))
                with gr.Row():
                    scatter = gr.ScatterPlot(
                        x="x", y="y", color="shot", color_map=SHOT_COLOURS,
                        title="Caption embeddings (PCA)", x_title="PC 1", y_title="PC 2", height=420,
                        tooltip=["caption", "subject", "class size", "x", "y"], scale=3,
                    )
                    map_points = gr.Dataframe(
                        label="Points on the map, rarest class first: click a row to pick its caption",
                        interactive=False, max_height=420, wrap=True, scale=2, elem_id="pg-map-points",
                        headers=list(Studio.POINT_COLUMNS))
                    with gr.Column(scale=1, min_width=260):
                        colour_by = gr.Radio(["shot bucket", "class frequency"], value="shot bucket",
                                             label="Colour by",
                                             info="many / medium / few-shot bucket, or images in the class")
                        nb_k = gr.Slider(1, 20, value=psi.k, step=1, label="k (neighbours)",
                                         info="How many nearest captions each caption can borrow from.")
                        nb_psi_max = gr.Slider(0.0, 5.0, value=psi.psi_max, step=0.1, label="psi_max",
                                               info="Upper bound of psi (the neighbour's relative precision).")
                        nb_same = gr.Dropdown(choices=list(POOLS), value=psi.pool, label="Neighbour pool",
                                              info="same_class: the caption's own class; other_class: other subjects only; all: any caption.")
                        map_btn = gr.Button("Build / refresh the map", variant="secondary")
                caption_dd = gr.Dropdown(
                    label="Caption", choices=[], filterable=True,
                    info="Type to search the training captions; [n img] is the size of the caption's class.",
                )
                nb_head = gr.Markdown("")
                nb_table = gr.Dataframe(label="Nearest captions (click a row to hop to it)", interactive=False,
                                        max_height=420, wrap=True, headers=NEIGHBOUR_HEADERS,
                                        datatype=NEIGHBOUR_TYPES, elem_id="pg-nb-table")
                nb_gallery = gr.Gallery(label="The caption's image, then its neighbours", columns=6, height=240,
                                        object_fit="contain", fit_columns=False, elem_classes="pixelated")
                with gr.Accordion("Free-text search: which training captions are nearest to any text?", open=False):
                    with gr.Row():
                        query = gr.Textbox(label="Query", placeholder="a photo of someone smiling, wearing glasses",
                                           info="Any text; it is embedded with the same sentence encoder.", scale=4)
                        search_btn = gr.Button("Search", scale=1)
                    search_table = gr.Dataframe(label="Nearest training captions", interactive=False, max_height=260,
                                                wrap=True, headers=SEARCH_HEADERS)
                    search_gallery = gr.Gallery(label="Their images", columns=6, height=220, object_fit="contain",
                                                fit_columns=False,
                                                elem_classes="pixelated")

            # ---------------------------------------------------------------------- Train
            with gr.Tab("Train", id="train") as train_tab:
                gr.Markdown(TRAIN_HELP, elem_classes="explain")
                train_banner = gr.Markdown(studio.dataset_banner(None))
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        method = gr.Radio(list(METHODS), value="pogdiff", label="Method", info=OPT_INFO["method"])
                        preset = gr.Radio(list(PRESETS), value="tiny", label="Model preset", info=OPT_INFO["preset"])
                        model_id = gr.Textbox(label="Model id or local folder (sd15)", visible=False,
                                              info="A diffusers Stable Diffusion 1.x/2.x pipeline: hub id or path.")
                        with gr.Row():
                            steps = gr.Number(value=DEFAULT_STEPS, precision=0, minimum=1, label="Steps",
                                              maximum=studio.limits.max_steps,
                                              info="Optimisation steps; ~300 show a difference on the demo set.")
                            batch = gr.Number(value=defaults.batch_size, precision=0, minimum=1, label="Batch size",
                                              maximum=studio.limits.max_batch_size,
                                              info="Images per step.")
                        with gr.Row():
                            lr = gr.Number(value=defaults.learning_rate, label="Learning rate",
                                           info="AdamW learning rate after a short warm-up.")
                            seed = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed",
                                             info="Same seed, same run.")
                        sample_every = gr.Number(value=DEFAULT_PREVIEW_EVERY, precision=0, minimum=0,
                                                 label="Preview every (steps)",
                                                 info="Sample the rarest classes' prompts this often; 0 = never.")
                        run_name = gr.Textbox("", label="Run name (optional)", max_lines=1,
                                              info="Letters, digits, '.', '_' and '-'; empty: a dated name.")
                        base = gr.Dropdown(choices=studio.base_choices(), value=studio.base_choices()[0][1],
                                           label="Start from (tiny preset)", info=BASE_NOTE, elem_id="pg-base")
                        # /start_training's from_scratch, kept for API callers (the form uses Start from)
                        from_scratch = gr.Checkbox(False, visible=False, label="Train from scratch")
                        with gr.Accordion("psi options (pogdiff)", open=False):
                            psi_max = gr.Slider(0.0, 5.0, value=psi.psi_max, step=0.1, label="psi_max",
                                                info="Largest weight a sample gives to its neighbour's prediction.")
                            k = gr.Slider(1, 20, value=psi.k, step=1, label="k (neighbours)",
                                          info="Neighbours drawn from, by caption similarity.")
                            use_density = gr.Checkbox(value=psi.use_density, label="w_density",
                                                      info="Rare classes borrow more, frequent ones ~0.")
                            use_image_sim = gr.Checkbox(value=psi.use_image_sim, label="s_img",
                                                        info="Only borrow from neighbours whose image looks alike.")
                            use_text_sim = gr.Checkbox(value=psi.use_text_sim, label="s_txt",
                                                       info="Scale by caption similarity.")
                            same_class = gr.Dropdown(choices=list(POOLS), value=psi.pool, label="Neighbour pool",
                                                     info="Where neighbours come from (README 'The method').")
                        with gr.Row():
                            start_btn = gr.Button("Start training", variant="primary")
                            stop_btn = gr.Button("Stop", variant="stop", interactive=False)
                        with gr.Row():
                            estimate_btn = gr.Button("Estimate time (times 2 steps)", size="sm", scale=1)
                            estimate_md = gr.Markdown("", elem_classes="explain")
                        form_note = gr.Markdown("", elem_classes="explain")
                    with gr.Column(scale=3):
                        job_md = gr.Markdown("")
                        job_progress = gr.HTML("")
                        loss_plot = gr.LinePlot(x="step", y="value", color="term", title="Loss terms",
                                                x_title="step", y_title="value", height=300,
                                                tooltip=["step", "term", "value"])
                        preview = gr.Gallery(label="Previews: prompts of the rarest classes", columns=4, height=200,
                                             object_fit="contain", fit_columns=False, elem_classes="pixelated")
                        with gr.Accordion("Preview history (saved in the run folder)", open=False):
                            with gr.Row():
                                hist_run = gr.Dropdown(label="Previews of", choices=[("current or last job", "")],
                                                       value="", scale=3)
                                hist_btn = gr.Button("Refresh", size="sm", scale=1)
                            hist_slider = gr.Slider(0, 1, value=0, step=1, label="Preview step", interactive=False)
                            hist_gallery = gr.Gallery(label="Preview at that step", columns=4, height=200,
                                                      object_fit="contain", fit_columns=False,
                                                      elem_classes="pixelated")
                            hist_md = gr.Markdown("")
                gr.Markdown("### Runs (finished, stopped, interrupted)")
                with gr.Row():
                    runs_dd = gr.Dropdown(label="Run", choices=[], scale=3, allow_custom_value=True,
                                          info="Runs of this server that hold a checkpoint, newest first; "
                                               "an interrupted or stopped one can be resumed.")
                    resume_btn = gr.Button("Resume", scale=1)
                    export_btn = gr.Button("Zip weights + config", scale=1)
                    weights_btn = gr.Button("Weights only (.safetensors: fp16 UNet, or LoRA)", scale=1)
                    zip_file = gr.File(label="Download", scale=2, interactive=False, visible=False)
                runs_table = gr.Dataframe(label="Runs", interactive=False, max_height=240, value=studio.runs_table)

            # -------------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare") as cmp_tab:
                gr.Markdown(COMPARE_HELP, elem_classes="explain")
                cmp_note = gr.Markdown(studio.shipped_note())
                with gr.Row():
                    run_a = gr.Dropdown(label="A (left)", choices=[], allow_custom_value=True,
                                        info="Usually the baseline: a shipped checkpoint or one of your runs.")
                    run_b = gr.Dropdown(label="B (right)", choices=[], allow_custom_value=True,
                                        info="Usually PoGDiff, fine-tuned with the same budget.")
                    refresh_btn = gr.Button("Refresh list", scale=0, min_width=120)
                with gr.Row():
                    prompts = gr.Dropdown(label="Prompts (rarest classes first)", choices=[], scale=3,
                                          multiselect=True, allow_custom_value=True, filterable=True,
                                          info="Few-shot subjects are pre-selected; type to add any prompt.")
                    with gr.Column(scale=2, min_width=280):
                        custom = gr.Textbox(label="Or type prompts", lines=2,
                                            placeholder="a photo of Mira Okafor, about 60 years old, smiling",
                                            max_length=studio.limits.max_prompts * (studio.limits.max_text_chars + 1),
                                            info=f"One prompt per line (at most {studio.limits.max_text_chars} "
                                                 "characters each), added to the ticked ones.")
                        n_seeds = gr.Slider(1, 8, value=4, step=1, label="Seeds per prompt",
                                            info="Seeds 0..n-1, identical for A and B.")
                        guidance = gr.Slider(1.0, 8.0, value=3.0, step=0.5, label="Guidance scale",
                                             info="Classifier-free guidance; 1 turns it off.")
                        sample_steps = gr.Slider(5, 50, value=25, step=1, label="Sampling steps",
                                                 info="DDIM steps per image.")
                gen_btn = gr.Button("Generate A and B", variant="primary")
                pair_md = gr.Markdown("")
                slider = gr.ImageSlider(label="A ◀ drag ▶ B (first prompt, seed 0)", type="numpy", max_height=320,
                                        elem_classes="pixelated", interactive=False)
                with gr.Row():
                    with gr.Column(scale=2, min_width=240):
                        real_gallery = gr.Gallery(label="Real training images of the prompted subjects", columns=4,
                                                  height=260, object_fit="contain", fit_columns=False,
                                                  elem_classes="pixelated", elem_id="pg-real-images")
                        real_md = gr.Markdown("", elem_id="pg-real-md")
                    grid_a = gr.Image(label="A", type="pil", interactive=False, elem_classes="pixelated", scale=3)
                    grid_b = gr.Image(label="B", type="pil", interactive=False, elem_classes="pixelated", scale=3)
                with gr.Row():
                    diff_img = gr.Image(label="|A − B| per image, amplified (black: identical)", type="pil",
                                        interactive=False, elem_classes="pixelated", scale=3, elem_id="pg-diff")
                    diff_md = gr.Markdown("", elem_id="pg-diff-md")
                gr.Markdown("### Per-class metrics")
                with gr.Row():
                    metrics_btn = gr.Button("Compute metrics (A and B draw each class of the loaded data; judged per class)",
                                            scale=3)
                    metrics_full = gr.Checkbox(False, label="Full evaluation (8 captions per class, about twice as "
                                                            "long; default: the fast 4)", scale=2)
                metrics_md = gr.Markdown("")
                with gr.Row():
                    # no component label over the figure: it would cover the figure's own title
                    metrics_plot = gr.Plot(label="Accuracy vs class frequency: A, B and B − A", scale=3,
                                           show_label=False, elem_id="pg-metrics-plot")
                    with gr.Column(scale=4):
                        metrics_table = gr.Dataframe(
                            label="Per-class metrics: B − A, its 95% interval and the verdict first (rarest first)",
                            interactive=False, max_height=420, headers=["subject", "train_count", "shot", "accuracy"])
                        metrics_csv = gr.DownloadButton("Download the per-class metrics (CSV)", value=None,
                                                        interactive=False, size="sm")

        # ============================================================ events: Data
        data_outputs = [ds_key, summary_md, report_md, class_table, long_tail, class_dd, class_gallery]
        # Every chain that disables a button re-enables it on failure too (.then runs only after success
        # of the step before it in this gradio version; .failure runs only after an error).
        for btn, fn, inputs, name in ((demo_btn, studio.load_demo, [class_src], "load_demo"),
                                      (load_btn, studio.load_upload, [upload, class_src], "load_upload")):
            loading = (btn.click(_busy, None, [demo_btn, load_btn], queue=False, api_visibility="private")
                       .then(fn, inputs, data_outputs, api_name=name))
            loading.failure(_idle2, None, [demo_btn, load_btn], queue=False, api_visibility="private")
            (loading.then(_idle2, None, [demo_btn, load_btn], queue=False, api_visibility="private")
             .then(_same, ds_key, saved_key, queue=False, api_visibility="private")
             .then(studio.dataset_banner, ds_key, nb_banner, api_visibility="private")
             .then(studio.dataset_banner, ds_key, train_banner, api_visibility="private"))
        class_dd.change(studio.class_gallery, [ds_key, class_dd], class_gallery, api_name="class_gallery")
        # Another class source reloads the loaded set; a refused one puts the choice back.
        reloading = class_src.input(studio.reload_classes, [ds_key, class_src], data_outputs, api_name="class_source")
        reloading.failure(studio.class_source_of, ds_key, class_src, api_visibility="private")
        (reloading.then(_same, ds_key, saved_key, queue=False, api_visibility="private")
         .then(studio.dataset_banner, ds_key, nb_banner, api_visibility="private")
         .then(studio.dataset_banner, ds_key, train_banner, api_visibility="private"))

        # ====================================================== events: Neighbours
        map_outputs = [scatter, caption_dd, nb_banner]
        map_btn.click(studio.neighbour_map, [ds_key, colour_by, preset], map_outputs, api_name="neighbour_map").then(
            studio.map_points, ds_key, map_points, api_visibility="private")
        nb_tab.select(studio.neighbour_map, [ds_key, colour_by, preset], map_outputs, api_name="neighbour_map_on_tab",
                      api_visibility="private").then(studio.map_points, ds_key, map_points, api_visibility="private")
        # The scatter plot reports a brushed x band, not a clicked point: the band's points go to the table.
        scatter.select(studio.map_band, ds_key, [map_points, caption_dd], api_visibility="private")
        map_points.select(studio.hop, [ds_key, map_points], caption_dd, api_visibility="private")
        colour_by.change(studio.recolour, [ds_key, colour_by], scatter, api_visibility="private")
        nb_inputs = [ds_key, caption_dd, nb_k, nb_psi_max, nb_same, preset]
        nb_outputs = [nb_head, nb_table, nb_gallery]
        caption_dd.change(studio.neighbours_of, nb_inputs, nb_outputs, api_name="neighbours")
        for trigger in (nb_k.release, nb_psi_max.release, nb_same.change):
            trigger(studio.neighbours_of, nb_inputs, nb_outputs, api_visibility="private")
        nb_table.select(studio.hop, [ds_key, nb_table], caption_dd, api_visibility="private")
        search_btn.click(studio.search, [ds_key, query, nb_k, preset], [search_table, search_gallery], api_name="search")
        query.submit(studio.search, [ds_key, query, nb_k, preset], [search_table, search_gallery], api_name="search_submit",
                     api_visibility="private")

        # =========================================================== events: Train
        # .input, not .change: restoring a run's form must not reset its batch size and learning rate
        preset.input(studio.preset_defaults, preset, [batch, lr, model_id], api_visibility="private")
        options = [method, preset, model_id, steps, batch, lr, psi_max, k, use_density, use_image_sim,
                   use_text_sim, same_class, sample_every, seed, run_name, from_scratch, base]
        poll_outputs = [job_md, job_progress, loss_plot, preview, start_btn, stop_btn, runs_dd, seen]
        starting = start_btn.click(_busy1, None, start_btn, queue=False, api_visibility="private").then(
            studio.start_training, [ds_key, *options], poll_outputs, api_name="start_training")
        starting.then(studio.poll, None, poll_outputs, api_name="poll_after_start", api_visibility="private")
        starting.failure(studio.poll, None, poll_outputs, api_name="poll_after_refused_start",
                         api_visibility="private")  # the buttons follow the job again
        stop_btn.click(studio.stop_training, None, poll_outputs, api_name="stop_training",
                       concurrency_limit=None)
        resuming = resume_btn.click(studio.resume_training, [ds_key, runs_dd], poll_outputs, api_name="resume_training")
        resuming.failure(studio.poll, None, poll_outputs, api_name="poll_after_refused_resume",
                         api_visibility="private")
        timer.tick(studio.poll, seen, poll_outputs, show_progress="hidden", concurrency_limit=None,
                   api_name="poll", queue=False)
        train_tab.select(studio.dataset_banner, ds_key, train_banner, api_visibility="private")
        runs_dd.change(studio.runs_table, None, runs_table, api_visibility="private")
        runs_dd.change(studio.base_options, base, base, api_visibility="private")  # a run that ended can be a base
        # the job's headline changes when it starts, stops or ends: the form note then names the run's state
        job_md.change(studio.train_form_note, None, form_note, api_visibility="private")
        export_btn.click(studio.export_run, runs_dd, zip_file, api_name="export_run").success(
            _show, None, zip_file, queue=False, api_visibility="private")
        weights_btn.click(studio.export_weights, runs_dd, zip_file, api_name="export_weights").success(
            _show, None, zip_file, queue=False, api_visibility="private")
        form = [method, preset, model_id, steps, batch, lr, psi_max, k, use_density, use_image_sim, use_text_sim,
                same_class, sample_every, seed, base]  # Studio.TRAIN_FORM
        estimate_inputs = [method, preset, steps, batch]
        (demo.load(studio.restore_train_form, None, [*form, form_note], api_visibility="private")
         .then(studio.base_options, base, base, api_visibility="private")  # this visitor's runs
         .then(studio.recorded_estimate, estimate_inputs, estimate_md, api_visibility="private")
         .then(studio.preview_runs, None, hist_run, api_visibility="private"))
        for comp in estimate_inputs:
            comp.change(studio.recorded_estimate, estimate_inputs, estimate_md, api_visibility="private")
        estimate_btn.click(studio.estimate_time, [ds_key, *options], estimate_md, api_name="estimate_time")
        hist_outputs = [hist_slider, hist_gallery, hist_md]
        runs_dd.change(studio.preview_runs, None, hist_run, api_visibility="private").then(
            studio.preview_history, hist_run, hist_outputs, api_visibility="private")
        # a finished run has recorded its step time: the estimate before the next start uses it
        runs_dd.change(studio.recorded_estimate, estimate_inputs, estimate_md, api_visibility="private")
        hist_run.change(studio.preview_history, hist_run, hist_outputs, api_name="preview_history")
        hist_btn.click(studio.preview_history, hist_run, hist_outputs, api_visibility="private")
        hist_slider.release(studio.preview_at, [hist_run, hist_slider], [hist_gallery, hist_md], api_name="preview_at")

        # ========================================================= events: Compare
        choice_outputs = [run_a, run_b, cmp_note]
        metric_outputs = [metrics_table, metrics_plot, metrics_md]
        # A tab switch keeps A, B and the prompts; Refresh also reloads the shipped metrics.
        (cmp_tab.select(studio.compare_choices, [run_a, run_b], choice_outputs, api_visibility="private")
         .then(studio.prompt_choices, [ds_key, prompts], prompts, api_visibility="private"))
        (refresh_btn.click(studio.compare_choices, [run_a, run_b], choice_outputs, api_visibility="private")
         .then(studio.prompt_choices, [ds_key, prompts], prompts, api_visibility="private")
         .then(studio.precomputed_metrics, [run_a, run_b], metric_outputs, api_visibility="private")
         .then(studio.keep_metrics, [run_a, run_b, cmp_state], cmp_state, api_visibility="private"))
        for dd in (run_a, run_b):
            (dd.input(studio.metrics_on_choice, [run_a, run_b], metric_outputs, api_visibility="private")
             .then(studio.keep_metrics, [run_a, run_b, cmp_state], cmp_state, api_visibility="private"))
        kept_inputs = [run_a, run_b, prompts, custom, n_seeds, guidance, sample_steps]
        for comp in kept_inputs:
            comp.change(studio.remember_compare, [*kept_inputs, cmp_state], cmp_state, queue=False,
                        api_visibility="private")
        gen_inputs = [run_a, run_b, prompts, custom, n_seeds, guidance, sample_steps]
        for btn, fn, seconds, inputs, outputs, name in (
                (gen_btn, studio.generate_pair, COMPARE_GPU_SECONDS, gen_inputs, [slider, grid_a, grid_b, pair_md],
                 "compare"),
                (metrics_btn, studio.compute_metrics, METRICS_GPU_SECONDS, [run_a, run_b, metrics_full, ds_key], metric_outputs,
                 "metrics")):
            running = (btn.click(_busy1, None, btn, queue=False, api_visibility="private")
                       .then(zero_gpu(fn, seconds), inputs, outputs, api_name=name, concurrency_id=GPU_QUEUE))
            running.then(_idle1, None, btn, queue=False, api_visibility="private")
            running.failure(_idle1, None, btn, queue=False, api_visibility="private")
            if btn is gen_btn:
                running.then(studio.pair_views, [run_a, run_b, ds_key, cmp_state],
                             [real_gallery, real_md, diff_img, diff_md, cmp_state], api_visibility="private")
            else:
                running.then(studio.keep_metrics, [run_a, run_b, cmp_state], cmp_state, api_visibility="private")

        metrics_table.change(studio.metrics_csv, metrics_table, metrics_csv, api_visibility="private")

        demo.load(studio.poll, None, poll_outputs, api_name="poll_on_load", api_visibility="private")
        (demo.load(studio.restore_dataset, saved_key, data_outputs, api_visibility="private")
         .then(studio.class_source_of, ds_key, class_src, api_visibility="private")
         .then(studio.dataset_banner, ds_key, nb_banner, api_visibility="private")
         .then(studio.dataset_banner, ds_key, train_banner, api_visibility="private"))
        restore_outputs = dict(run_a=run_a, run_b=run_b, prompts=prompts, custom=custom, n_seeds=n_seeds,
                               guidance=guidance, sample_steps=sample_steps, slider=slider, grid_a=grid_a,
                               grid_b=grid_b, pair_md=pair_md, real_gallery=real_gallery, real_md=real_md,
                               diff=diff_img, diff_md=diff_md, metrics_table=metrics_table,
                               metrics_plot=metrics_plot, metrics_md=metrics_md)
        # Restore first: the choices it sets trigger remember_compare, which rewrites the kept state.
        (demo.load(studio.restore_compare, cmp_state, [restore_outputs[n] for n in Studio.RESTORE_OUTPUTS],
                   api_visibility="private")
         .then(studio.compare_choices, [run_a, run_b], choice_outputs, api_visibility="private")
         .then(studio.load_metrics, [run_a, run_b, cmp_state], metric_outputs, api_visibility="private"))
    return demo


def _same(value):
    return value


def _show():
    return gr.File(visible=True)


def _busy():
    return gr.Button(interactive=False), gr.Button(interactive=False)


def _idle2():
    return gr.Button(interactive=True), gr.Button(interactive=True)


def _busy1():
    return gr.Button(interactive=False)


def _idle1():
    return gr.Button(interactive=True)


def zero_gpu(fn, duration: int):
    """``fn`` wrapped in ``spaces.GPU(duration=duration)`` when the ``spaces`` package is present
    (Hugging Face ZeroGPU Spaces), else ``fn`` itself."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


def server_address(environ=os.environ) -> tuple[str, int]:
    """Default host and port: ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` when set, else
    0.0.0.0 on a Hugging Face Space (``SPACE_ID`` set) or 127.0.0.1, and port 7860."""
    host = environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if environ.get("SPACE_ID") else "127.0.0.1")
    raw = environ.get("GRADIO_SERVER_PORT") or "7860"
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"GRADIO_SERVER_PORT={raw!r} is not a port number; set it to e.g. 7860 or unset it") from None
    if not 0 < port < 65536:
        raise ValueError(f"GRADIO_SERVER_PORT={port} is out of range; use 1-65535")
    return host, port


def launch_options(studio: Studio, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> dict:
    """Keyword arguments of ``Blocks.launch`` shared by ``__main__`` and the tests."""
    # No allowed_paths: gradio serves only its own cache, i.e. uploads and what a response returned
    # (an exported zip is copied to a fresh temp folder first). The runs folder is never served.
    return dict(
        max_file_size=f"{int(max_upload_mb)}mb",
        css=CSS,
        theme=gr.themes.Soft(primary_hue="blue", secondary_hue="slate"),
        show_error=True,
        footer_links=["api", "settings"],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    host, port = server_address()
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description=TITLE)
    p.add_argument("--host", default=host,
                   help="interface to listen on (default: $GRADIO_SERVER_NAME, else 0.0.0.0 on a Hugging Face "
                        "Space, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--runs-dir", default=os.environ.get("POGDIFF_RUNS_DIR", "runs"),
                   help="where training runs and their checkpoints are written")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest accepted upload")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="events of one kind that run at the same time (generation, loading)")
    p.add_argument("--max-job-minutes", type=float, default=LIMITS.max_job_minutes,
                   help="wall time of one training job; it then stops and keeps its checkpoint (0: no limit)")
    p.add_argument("--single-user", action=argparse.BooleanOptionalAction, default=None,
                   help="any visitor may stop and download any job (default: on for a localhost server "
                        "without --share, off otherwise, where a job belongs to the session that started it)")
    args = p.parse_args(argv)
    if args.max_job_minutes < 0:
        p.error(f"--max-job-minutes must be >= 0 (0 = no limit), got {args.max_job_minutes:g}")
    if args.single_user is None:
        args.single_user = args.host in LOCAL_HOSTS and not args.share and not on_space
    return args


def main(argv: list[str] | None = None) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    limits = dataclasses.replace(LIMITS, max_job_minutes=args.max_job_minutes)
    studio = Studio(args.runs_dir, single_user=args.single_user, limits=limits)
    studio.clean_leftovers()
    logging.getLogger(__name__).info("single-user mode: %s; max job minutes: %g", args.single_user,
                                     args.max_job_minutes)
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=QUEUE_SIZE)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                **launch_options(studio, args.max_upload_mb))


if __name__ == "__main__":
    main()
