"""The Compare tab: its callbacks (:class:`CompareTab`: choices, images, kept state) and its layout and
events (:func:`build`). The per-class metrics below the images are the
:class:`~pogdiff.ui.metrics_panel.MetricsPanel`, laid out here with them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr

from pogdiff.server import safety
from pogdiff.config import DataConfig, Limits, SampleConfig
from pogdiff.data.stats import shot_bucket
from pogdiff.ui.compare_views import (
    MAX_REAL_IMAGES,
    CompareState,
    ResultCache,
    class_prompts,
    difference_view,
    parse_typed_prompts,
    real_examples,
    subject_for_prompt,
)
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.metrics_panel import MetricsPanel
from pogdiff.ui.sessions import Sessions
from pogdiff.ui.shared import Shared, disable, enable
from pogdiff.ui.sources import Sources
from pogdiff.ui.state import DatasetBundle, Source
from pogdiff.ui.views import (
    DEMO_KEY,
    SLIDER_PX,
    checked_input,
    gallery_items,
    short_prompt,
    upscale,
)


class CompareTab:
    """Two checkpoints, the same prompts and seeds; real images and differences beside them.

    Args:
        sources: the checkpoints to choose from, and their loaded models.
        datasets: the page's data sets (prompts per class, real training images).
        sessions: the visitors; each one's last generated pair is kept there.
        results: what a browser gets back after a page reload, by the token it keeps (shared with the
            metrics panel).
        limits: server-side bounds on every request value (README "Limits and safety").
        data_config: the caption template and the shot buckets.
    """

    def __init__(self, sources: Sources, datasets: Datasets, sessions: Sessions, results: ResultCache,
                 limits: Limits, data_config: DataConfig) -> None:
        self.sources = sources
        self.datasets = datasets
        self.sessions = sessions
        self.results = results
        self.limits = limits
        self.data_config = data_config

    def compare_choices(self, current_a: Any = None, current_b: Any = None) -> tuple:
        """Dropdown A, dropdown B (defaults: shipped baseline vs pogdiff) and the note.

        A current choice that is still in the list is kept (a tab switch or refresh keeps A and B).
        """
        sources = self.sources.all()
        choices = [(s.label, s.key) for s in sources]
        keys = [s.key for s in sources]
        newest = keys[0] if keys else None
        a = "shipped:demo-baseline" if "shipped:demo-baseline" in keys else (keys[1] if len(keys) > 1 else newest)
        b = "shipped:demo-pogdiff" if "shipped:demo-pogdiff" in keys else newest
        a = current_a if isinstance(current_a, str) and current_a in keys else a
        b = current_b if isinstance(current_b, str) and current_b in keys else b
        return (gr.Dropdown(choices=choices, value=a), gr.Dropdown(choices=choices, value=b),
                self.sources.shipped_note())

    def prompt_choices(self, key: str | None, current: Any = None) -> Any:
        """One prompt per class (rarest first) in the set's caption style (tags for a tag-captioned
        set, else the caption template: :func:`pogdiff.ui.compare_views.class_prompts`); few-shot ones
        pre-selected, or the current selection kept."""
        bundle = self.datasets.bundle(key)
        prompt_of = class_prompts(bundle.captions, bundle.subjects, self.data_config.caption_template)
        table = bundle.table.sort_values(["count", "subject"])
        choices = [prompt_of[s] for s in table["subject"]]
        selected = [prompt_of[s] for s in table.loc[table["shot"] == "few", "subject"]][:6]
        L = self.limits
        try:
            kept = safety.text_list("Prompts", current, L.max_prompts, L.max_text_chars)
        except ValueError:
            kept = []
        if not any(p in choices for p in kept):  # another dataset was loaded since: its defaults
            kept = []
        return gr.Dropdown(choices=choices, value=kept or selected or choices[:4], multiselect=True,
                           allow_custom_value=True)

    def generate_pair(
        self, key_a: str, key_b: str, prompts: Sequence[str] | None, custom: str, n_seeds: float,
        guidance: float, sample_steps: float, progress: gr.Progress = gr.Progress(), request: gr.Request = None,
    ) -> tuple:
        """Same prompts, same seeds, two checkpoints: a slider for the first pair and two grids.

        The images are also kept for :meth:`pair_views` (real images, difference) of the same session.
        """
        L = self.limits
        self.sessions.admit(request)  # its images are kept for this visitor (pogdiff.ui.sessions)
        prompts = checked_input(safety.text_list, "Prompts", prompts, L.max_prompts, L.max_text_chars)
        custom = checked_input(safety.text, "Typed prompts", custom, L.max_prompts * (L.max_text_chars + 1))
        typed = checked_input(parse_typed_prompts, custom, L.max_prompts, L.max_text_chars)
        captions = [p for p in prompts if p.strip()] + typed
        if not captions:
            raise gr.Error("Pick at least one prompt, or type one.")
        n_seeds = checked_input(safety.whole_number, "Seeds per prompt", n_seeds, 1, L.max_seeds)
        guidance = checked_input(safety.real_number, "Guidance scale", guidance, 0.0, L.max_guidance)
        sample_steps = checked_input(safety.whole_number, "Sampling steps", sample_steps, 1, L.max_sample_steps)
        if len(captions) > L.max_prompts or len(captions) * n_seeds > L.max_images:
            raise gr.Error(f"{len(captions)} prompt(s) × {n_seeds} seed(s) = {len(captions) * n_seeds} images per "
                           f"checkpoint; the limit is {L.max_prompts} prompts and {L.max_images} images.",
                           title="Too many images")
        a, b = self.sources.find(key_a), self.sources.find(key_b)
        seeds = list(range(n_seeds))
        # Grid: one column per prompt, one row per seed.
        all_caps = [c for _ in seeds for c in captions]
        all_seeds = [s for s in seeds for _ in captions]
        cfg = SampleConfig(steps=int(sample_steps), guidance_scale=float(guidance))
        from pogdiff.model.sampling import generate, image_grid

        outs = []
        for i, src in enumerate((a, b)):
            progress(0.0 + 0.5 * i, desc=f"Loading {src.label}…")
            model = self.sources.model(src)

            def cb(done: int, total: int, i: int = i, src: Source = src) -> None:
                progress(0.5 * i + 0.5 * done / max(1, total), desc=f"Sampling {src.label}")

            outs.append(generate(model, all_caps, all_seeds, cfg, callback=cb))
        labels = [f"{short_prompt(c)} · seed {s}" for c, s in zip(all_caps, all_seeds)]
        grid_scale = max(1, 96 // outs[0].shape[1])
        grids = [image_grid(o, ncols=len(captions), labels=labels, scale=grid_scale) for o in outs]
        pair = (upscale(outs[0][0], SLIDER_PX), upscale(outs[1][0], SLIDER_PX))
        note = (f"Left / first grid: **{a.label}**. Right / second grid: **{b.label}**. "
                f"{len(captions)} prompt(s) × seeds {seeds}; the slider shows *{captions[0]}*, seed 0.")
        self.sessions.keep_pair(request, dict(a=outs[0], b=outs[1], captions=captions, scale=grid_scale,
                                              outputs=(pair, grids[0], grids[1], note)))
        return pair, grids[0], grids[1], note

    # ------------------------------------------------------------ Compare: beside A and B, kept state
    RESTORE_OUTPUTS = ("run_a", "run_b", "prompts", "custom", "n_seeds", "guidance", "sample_steps",
                       "slider", "grid_a", "grid_b", "pair_md", "real_gallery", "real_md", "diff", "diff_md",
                       "metrics_table", "metrics_plot", "metrics_md")

    def training_bundles(self, key_a: str | None, key_b: str | None, ds_key: str | None) -> list[DatasetBundle]:
        """Where the real images of a prompted subject are looked up, in order: the dataset this
        browser session loaded, then the demo set when A or B is a shipped demo run (or when the
        session loaded nothing)."""
        shipped = any(isinstance(k, str) and k.startswith("shipped:") for k in (key_a, key_b))
        own = self.datasets.bundle(ds_key) if ds_key else None
        found = [own] if own is not None else []
        if (shipped or own is None) and (own is None or own.key != DEMO_KEY):
            found.append(self.datasets.load_demo())
        return found

    def real_panel(self, bundles: Sequence[DatasetBundle], captions: Sequence[str]) -> tuple[list, str]:
        """Training images of each prompt's subject (gallery items) and their counts (markdown).

        A prompt's subject is looked up in ``bundles`` in order; the first that has it is used.
        """
        items, lines, seen = [], [], set()
        template = self.data_config.caption_template
        for caption in captions:
            match = next(((b, s) for b in bundles for s in [subject_for_prompt(caption, b.subjects, template)]
                          if s is not None), None)
            if match is None:
                lines.append(f"- *{caption}*: no training class matches this prompt.")
                continue
            bundle, subject = match
            if (bundle.key, subject) in seen:
                continue
            seen.add((bundle.key, subject))
            images, n = real_examples(bundle.ds.images, bundle.subjects, subject, MAX_REAL_IMAGES)
            shot = shot_bucket(n, self.data_config)
            where = f" in *{bundle.name}*" if len(bundles) > 1 else ""
            lines.append(f"- **{subject}**: {n} training image{'s' if n != 1 else ''} ({shot}-shot){where}")
            items += gallery_items(images, [f"{subject} · {i + 1} of {n}" for i in range(len(images))])
        names = " / ".join(b.name for b in bundles)
        return items, f"**Real training images** ({names}), per prompted subject:\n\n" + "\n".join(lines)

    def pair_views(self, key_a: str | None, key_b: str | None, ds_key: str | None, state: Any,
                   request: gr.Request = None) -> tuple:
        """After Generate: real training images, the |A - B| heatmap and its numbers, the kept state."""
        from pogdiff.model.sampling import image_grid

        last = self.sessions.last_pair(request)
        if last is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        real, real_md = self.real_panel(self.training_bundles(key_a, key_b, ds_key), last["captions"])
        view = difference_view(last["a"], last["b"])
        labels = [f"|A-B| {m:.1f}" for m in view.mean_abs]  # the grid's label font has no U+2212
        diff = image_grid(view.heatmaps, ncols=len(last["captions"]), labels=labels, scale=last["scale"])
        kept = self._state(state)
        kept.token = kept.token or ResultCache.new_token()
        self.results.put(kept.token, pair=last["outputs"], real=(real, real_md), diff=(diff, view.summary()))
        return real, real_md, diff, view.summary(), kept.to_browser()

    def _state(self, raw: Any) -> CompareState:
        return CompareState.kept(raw, max_prompts=self.limits.max_prompts, max_chars=self.limits.max_text_chars)

    def remember_compare(self, key_a: Any, key_b: Any, prompts: Any, custom: Any, n_seeds: Any, guidance: Any,
                         sample_steps: Any, state: Any) -> Any:
        """The Compare choices as the browser keeps them (the results' token is carried over)."""
        L = self.limits
        raw = {**self._state(state).to_browser(), "run_a": key_a, "run_b": key_b,
               "prompts": list(prompts) if isinstance(prompts, (list, tuple)) else [],
               "custom": custom or "", "n_seeds": n_seeds, "guidance": guidance, "sample_steps": sample_steps}
        kept = CompareState.from_browser(raw, max_prompts=L.max_prompts, max_chars=L.max_text_chars)
        return kept.to_browser() if kept is not None else gr.skip()

    def restore_compare(self, state: Any) -> tuple:
        """Page load: the Compare tab as this browser left it (choices, images, metrics)."""
        L = self.limits
        kept = CompareState.from_browser(state, max_prompts=L.max_prompts, max_chars=L.max_text_chars)
        if kept is None:
            return (gr.skip(),) * len(self.RESTORE_OUTPUTS)
        found = self.results.get(kept.token)
        pair = found.get("pair", (gr.skip(),) * 4)
        real = found.get("real", (gr.skip(),) * 2)
        diff = found.get("diff", (gr.skip(),) * 2)
        metrics = found.get("metrics", (gr.skip(),) * 3)
        return (gr.Dropdown(value=kept.run_a, allow_custom_value=True), gr.Dropdown(value=kept.run_b, allow_custom_value=True),
                gr.Dropdown(value=kept.prompts, multiselect=True, allow_custom_value=True),
                kept.custom, kept.n_seeds, kept.guidance, kept.sample_steps, *pair, *real, *diff, *metrics)


# ================================================================================ layout
COMPARE_HELP = """Two checkpoints, the **same prompts and the same seeds**: any difference comes from the
fine-tuning. Prompts of few-shot subjects are pre-selected because that is where PoGDiff should help.
Drag the slider to compare one pair; the grids show every prompt × seed, beside the real training images
of each prompted subject, and the heatmap below shows where A and B differ. **Compute metrics** scores
generations of each class of the loaded data: on the demo with its identity classifier; on your own data
with a classifier fitted on your images, whose reliability per class is shown beside the scores (a class
it cannot tell apart is marked weak). Accuracy per class and against class frequency, and B − A per class. The tab keeps your choices and results over a page reload."""

METRICS_FIGURE_NOTE = """The figure: above, each class's accuracy for A and for B against its number of
training images (log scale, rare classes on the left); below, B − A per class with its 95% interval: green
where B is measurably better, red where A is, grey where the interval contains 0 (no measurable difference)."""

# ZeroGPU: the events that run models share one queue and ask for the GPU this long (seconds). Elsewhere
# generation and metrics have a queue each, so a Compare never waits behind a metrics computation.
GPU_QUEUE = "gpu"
COMPARE_GPU_SECONDS = 120
METRICS_GPU_SECONDS = 300


def _spaces():
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return None
    return spaces


def zero_gpu(fn, duration: int):
    """``fn`` wrapped in ``spaces.GPU(duration=duration)`` when the ``spaces`` package is present
    (Hugging Face ZeroGPU Spaces), else ``fn`` itself."""
    spaces = _spaces()
    return fn if spaces is None else spaces.GPU(duration=duration)(fn)


def queue_of(name: str) -> str:
    """The concurrency group of the ``compare`` or ``metrics`` event: one shared ``gpu`` group on
    ZeroGPU, else one group each (README "Limits and safety": queue settings)."""
    return GPU_QUEUE if _spaces() is not None else name


def build(compare: CompareTab, metrics: MetricsPanel, shared: Shared) -> gr.Tab:
    """The Compare tab: two runs on the same prompts and seeds, real images, |A − B|, and below them the
    per-class metrics of ``metrics``. Its choices and results are kept in the browser over page reloads."""
    ds_key, kept, L = shared.dataset, shared.kept_compare, compare.limits  # kept: choices + results token
    with gr.Tab("Compare", id="compare") as tab:
        gr.Markdown(COMPARE_HELP, elem_classes="explain")
        note = gr.Markdown(compare.sources.shipped_note())
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
                                    max_length=L.max_prompts * (L.max_text_chars + 1),
                                    info=f"One prompt per line (at most {L.max_text_chars} "
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
            diff = gr.Image(label="|A − B| per image, amplified (black: identical)", type="pil",
                            interactive=False, elem_classes="pixelated", scale=3, elem_id="pg-diff")
            diff_md = gr.Markdown("", elem_id="pg-diff-md")
        gr.Markdown("### Per-class metrics")
        with gr.Row():
            metrics_btn = gr.Button("Compute metrics (A and B draw each class of the loaded data; judged per class)",
                                    scale=3)
            metrics_full = gr.Checkbox(False, label="Full evaluation (8 captions per class, about twice as "
                                                    "long; default: the fast 4)", scale=2)
        metrics_md = gr.Markdown("")
        # The table takes the tab's full width: beside the figure its key columns (the verdict, the
        # judge's reliability) ran past its right edge, behind a sideways scroll.
        metrics_table = gr.Dataframe(
            label="Per-class metrics: B − A, its 95% interval and the verdict first (rarest first)",
            interactive=False, max_height=420, headers=["subject", "train_count", "shot", "accuracy"],
            elem_id="pg-metrics-table")
        with gr.Row():
            # no component label over the figure: it would cover the figure's own title
            metrics_plot = gr.Plot(label="Accuracy vs class frequency: A, B and B − A", scale=3,
                                   show_label=False, elem_id="pg-metrics-plot")
            with gr.Column(scale=4):
                metrics_csv = gr.DownloadButton("Download the per-class metrics (CSV)", value=None,
                                                interactive=False, size="sm")
                gr.Markdown(METRICS_FIGURE_NOTE, elem_classes="explain")

    runs, choice_outputs = [run_a, run_b], [run_a, run_b, note]
    metric_outputs = [metrics_table, metrics_plot, metrics_md]
    # A tab switch keeps A, B and the prompts; Refresh also reloads the shipped metrics.
    (tab.select(compare.compare_choices, runs, choice_outputs, api_visibility="private")
     .then(compare.prompt_choices, [ds_key, prompts], prompts, api_visibility="private"))
    (refresh_btn.click(compare.compare_choices, runs, choice_outputs, api_visibility="private")
     .then(compare.prompt_choices, [ds_key, prompts], prompts, api_visibility="private")
     .then(metrics.precomputed_metrics, runs, metric_outputs, api_visibility="private")
     .then(metrics.keep_metrics, [*runs, kept], kept, api_visibility="private"))
    for dd in runs:
        (dd.input(metrics.metrics_on_choice, runs, metric_outputs, api_visibility="private")
         .then(metrics.keep_metrics, [*runs, kept], kept, api_visibility="private"))
    choices = [run_a, run_b, prompts, custom, n_seeds, guidance, sample_steps]
    for comp in choices:
        comp.change(compare.remember_compare, [*choices, kept], kept, queue=False, api_visibility="private")
    for btn, fn, seconds, inputs, outputs, name in (
            (gen_btn, compare.generate_pair, COMPARE_GPU_SECONDS, choices, [slider, grid_a, grid_b, pair_md],
             "compare"),
            (metrics_btn, metrics.compute_metrics, METRICS_GPU_SECONDS, [*runs, metrics_full, ds_key], metric_outputs,
             "metrics")):
        running = (btn.click(disable, None, btn, queue=False, api_visibility="private")
                   .then(zero_gpu(fn, seconds), inputs, outputs, api_name=name, concurrency_id=queue_of(name),
                         concurrency_limit=compare.sessions.quotas.generation_concurrency))
        running.then(enable, None, btn, queue=False, api_visibility="private")
        running.failure(enable, None, btn, queue=False, api_visibility="private")
        if btn is gen_btn:
            running.then(compare.pair_views, [*runs, ds_key, kept], [real_gallery, real_md, diff, diff_md, kept],
                         api_visibility="private")
        else:
            running.then(metrics.keep_metrics, [*runs, kept], kept, api_visibility="private")
    metrics_table.change(metrics.metrics_csv, metrics_table, metrics_csv, api_visibility="private")

    restored = dict(run_a=run_a, run_b=run_b, prompts=prompts, custom=custom, n_seeds=n_seeds, guidance=guidance,
                    sample_steps=sample_steps, slider=slider, grid_a=grid_a, grid_b=grid_b, pair_md=pair_md,
                    real_gallery=real_gallery, real_md=real_md, diff=diff, diff_md=diff_md,
                    metrics_table=metrics_table, metrics_plot=metrics_plot, metrics_md=metrics_md)
    # Restore first: the choices it sets trigger remember_compare, which rewrites the kept state.
    (shared.page.load(compare.restore_compare, kept, [restored[n] for n in compare.RESTORE_OUTPUTS],
                      api_visibility="private")
     .then(compare.compare_choices, runs, choice_outputs, api_visibility="private")
     .then(metrics.load_metrics, [*runs, kept], metric_outputs, api_visibility="private"))
    return tab
