"""The Neighbours tab: its callbacks (:class:`NeighboursTab`: the caption map, each caption's neighbours
with psi, free-text search) and its layout and events (:func:`build`)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from pogdiff.server import safety
from pogdiff.config import PRESETS, DataConfig, Limits, PsiConfig, model_preset
from pogdiff.constants import SHOT_COLOURS
from pogdiff.data.stats import shot_bucket
from pogdiff.config import POOLS
from pogdiff.ui.neighbours_views import (
    pca_2d,
    points_in_band,
    round_sig,
    size_bin,
    size_colour_map,
    thumbnail_markdown,
)
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.shared import Shared
from pogdiff.ui.state import DatasetBundle, Device
from pogdiff.ui.views import (
    COLOUR_BY,
    checked_input,
    gallery_items,
)


logger = logging.getLogger(__name__)


class NeighboursTab:
    """The caption map, each caption's neighbours with psi, and free-text search.

    Args:
        datasets: the page's data sets; each set keeps its prepared view (:class:`DatasetBundle`).
        device: where the caption encoder runs; without a GPU the sd15 preset shows tiny's preparation.
        limits: server-side bounds on every request value (README "Limits and safety").
        data_config: the shot buckets.
        cache_dir: the preparation's cache, the one training reads (README "Preparation").
        view_encoder: a caption encoder to use instead of the preset's (tests inject a cheap one).
    """

    def __init__(self, datasets: Datasets, device: Device, limits: Limits, data_config: DataConfig,
                 cache_dir: str | Path, view_encoder: Any = None) -> None:
        self.datasets = datasets
        self.device = device
        self.limits = limits
        self.data_config = data_config
        self.cache_dir = Path(cache_dir)
        self._view_encoder = view_encoder
        self._lock = threading.Lock()
        self.parts: dict[tuple, Any] = {}  # caption encoder (and VAE) of the preset shown

    def view_preset(self, preset: str | None) -> str:
        """The preset whose preparation the Neighbours tab shows: the Train tab's choice, except
        sd15 on a server without a GPU (it cannot train there), which shows the tiny preset."""
        preset = checked_input(safety.choice, "Model preset", preset or "tiny", PRESETS)
        return "tiny" if preset == "sd15" and not self.device.on_gpu else preset

    def _embed(self, bundle: DatasetBundle, preset: str = "tiny") -> None:
        """Prepare ``bundle`` for the Neighbours tab exactly as training prepares it for ``preset``
        (:func:`pogdiff.method.prepare.prepare_data`: same caption encoder, same image features, same cache)."""
        with bundle.lock:
            if bundle.pooled is not None and bundle.view_preset == preset:
                return
            from pogdiff.method import prepare

            model_cfg = model_preset(preset)  # sd15: the preset's default model id (its CLIP and VAE)
            parts = self._encoder_parts(model_cfg)
            data = prepare.prepare_data(self.datasets.dataset_at(bundle, model_cfg.resolution), parts, PsiConfig(),
                                        cache_dir=self.cache_dir, need_table=False)
            bundle.pooled = data.text.pooled.numpy().astype(np.float32)
            bundle.coords = np.asarray(pca_2d(bundle.pooled), dtype=np.float32)
            bundle.image_feats = data.image_feats
            bundle.x0 = data.x0
            bundle.view_preset, bundle.view_encoder = preset, parts.text_encoder
            bundle.tables = {}

    def _encoder_parts(self, model_cfg):
        from pogdiff.method import prepare

        if self._view_encoder is not None:  # an injected encoder (tests), for pixel presets
            return prepare.EncoderParts(text_encoder=self._view_encoder)

        with self._lock:
            key = (model_cfg.preset, model_cfg.pretrained, model_cfg.text_encoder, model_cfg.max_caption_tokens)
            parts = self.parts.get(key)
        if parts is None:
            parts = prepare.encoder_parts(model_cfg, device=self.device.name)
            with self._lock:
                self.parts = {key: parts}  # keep one preset's encoders
        return parts

    def psi_table(self, bundle: DatasetBundle, psi: PsiConfig, preset: str = "tiny"):
        self._embed(bundle, preset)
        cache_key = tuple(sorted(dataclasses.asdict(psi).items()))
        with bundle.lock:
            table = bundle.tables.get(cache_key)
            if table is None:
                from pogdiff.method.prepare import neighbour_table

                table = neighbour_table(bundle.pooled, bundle.image_feats, psi, bundle.subjects, clean=bundle.x0,
                                        cache_dir=self.cache_dir)
                bundle.tables = {cache_key: table}  # keep the latest only
        return table

    def neighbour_map(self, key: str | None, colour_by: str, preset: str | None = "tiny",
                      progress: gr.Progress = gr.Progress()) -> tuple:
        """2-D PCA map of caption embeddings + the caption chooser, prepared as training prepares
        the data for ``preset`` (the Train tab's choice)."""
        colour_by = checked_input(safety.choice, "Colour by", colour_by, COLOUR_BY)
        preset = self.view_preset(preset)
        bundle = self.datasets.bundle(key)
        if len(bundle.captions) < 2:
            raise gr.Error("The neighbour map needs at least two captions.")
        progress(0.2, desc=f"Encoding captions with the {preset} preset's encoder (first time only)…")
        self._embed(bundle, preset)
        frame = self.map_frame(bundle)
        choices = self.caption_choices(bundle)
        few = [i for i, s in enumerate(bundle.subjects) if s in set(bundle.few_shot_subjects())]
        chosen = few[0] if few else 0
        encoder = "MiniLM caption vectors and pixel features" if preset == "tiny" else \
            "CLIP caption vectors and VAE-latent features"
        return (
            self._scatter(frame, colour_by),
            gr.Dropdown(choices=choices, value=chosen, interactive=True),
            self.datasets.dataset_banner(bundle.key) + " Neighbours and psi as training computes them for the "
            f"**{preset}** preset ({encoder}; the Train tab's preset chooses).",
        )

    def recolour(self, key: str | None, colour_by: str):
        colour_by = checked_input(safety.choice, "Colour by", colour_by, COLOUR_BY)
        bundle = self.datasets.bundle(key)
        if bundle.coords is None:
            return gr.skip()
        return self._scatter(self.map_frame(bundle), colour_by)

    @staticmethod
    def _scatter(frame: pd.DataFrame, colour_by: str):
        if colour_by == "class frequency":
            # binned class sizes with dark colours: a one-image class is never near-white
            return gr.ScatterPlot(value=frame, color="class size bin", color_map=size_colour_map())
        return gr.ScatterPlot(value=frame, color="shot", color_map=SHOT_COLOURS)

    @staticmethod
    def map_frame(bundle: DatasetBundle) -> pd.DataFrame:
        """One row per caption: rounded coordinates (3 significant digits, as the tooltips show them),
        shot bucket, class size and its bin; the largest classes first so the rarest are drawn on top."""
        counts = bundle.count_of()
        shots = dict(zip(bundle.table["subject"], bundle.table["shot"]))
        frame = pd.DataFrame({
            "x": [round_sig(v) for v in bundle.coords[:, 0]], "y": [round_sig(v) for v in bundle.coords[:, 1]],
            "shot": [shots[s] for s in bundle.subjects],
            "class size": [counts[s] for s in bundle.subjects],
            "class size bin": [size_bin(counts[s]) for s in bundle.subjects],
            "subject": bundle.subjects, "caption": bundle.captions, "row": np.arange(len(bundle.subjects)),
        })
        return frame.sort_values(["class size", "row"], ascending=[False, True], kind="stable").reset_index(drop=True)

    POINT_COLUMNS = ["subject", "class size", "caption", "x", "y", "row"]
    # The neighbour table, key columns first (how much is borrowed, how likely, whether it informs),
    # the long caption after them so it never pushes them off-screen; with each column's datatype.
    NEIGHBOUR_TYPES = {"image": "markdown", "rank": "number", "subject": "str", "psi": "number",
                       "p(draw)": "number", "informative": "bool", "caption": "str", "class size": "number",
                       "s_txt": "number", "s_img": "number", "w_density": "number", "row": "number"}
    NEIGHBOUR_COLUMNS = list(NEIGHBOUR_TYPES)

    def map_points(self, key: str | None) -> pd.DataFrame:
        """Every point of the map as a table row, rarest class first (a click on a row picks it)."""
        bundle = self.datasets.bundle(key)
        if bundle.coords is None:
            return pd.DataFrame(columns=self.POINT_COLUMNS)
        frame = self.map_frame(bundle)
        return frame.sort_values(["class size", "row"], kind="stable")[self.POINT_COLUMNS].reset_index(drop=True)

    def map_band(self, key: str | None, evt: gr.SelectData) -> tuple:
        """A band brushed on the map (the plot reports its x interval, not a point): its points,
        rarest first, and the rarest one picked."""
        bundle = self.datasets.bundle(key)
        if bundle.coords is None:
            return gr.skip(), gr.skip()
        try:
            band = points_in_band(self.map_frame(bundle), evt.index)
        except ValueError as exc:
            logger.info("ignored a map selection: %s", exc)
            return gr.skip(), gr.skip()
        if band.empty:
            return band[self.POINT_COLUMNS], gr.skip()
        return band[self.POINT_COLUMNS], int(band.iloc[0]["row"])

    @staticmethod
    def caption_choices(bundle: DatasetBundle) -> list[tuple[str, int]]:
        counts = bundle.count_of()
        return [(f"{c}  [{counts[s]} img]", i) for i, (c, s) in enumerate(zip(bundle.captions, bundle.subjects))]

    def neighbours_of(
        self, key: str | None, row: int | None, k: int, psi_max: float, pool: str, preset: str | None = "tiny",
    ) -> tuple[str, pd.DataFrame, list]:
        """The k nearest captions of one caption, with similarity, psi and its factors, from the
        neighbour table training builds for ``preset`` with these settings."""
        preset = self.view_preset(preset)
        if row is None or row == "":
            return "Pick a caption above.", pd.DataFrame(), []
        bundle = self.datasets.bundle(key)
        row = checked_input(safety.whole_number, "caption index", row, 0, len(bundle.captions) - 1)
        L = self.limits
        psi_cfg = PsiConfig(k=checked_input(safety.whole_number, "k (neighbours)", k, 1, L.max_k),
                            psi_max=checked_input(safety.real_number, "psi_max", psi_max, 0.0, L.max_psi_max),
                            pool=checked_input(safety.choice, "Neighbour pool", pool, POOLS))
        table = self.psi_table(bundle, psi_cfg, preset)
        counts = bundle.count_of()
        subj = bundle.subjects[row]
        w = float(np.asarray(table.w_density).reshape(len(bundle.captions), -1)[row].mean())
        rows = []
        for j in range(table.indices.shape[1]):
            nb = int(table.indices[row, j])
            if nb < 0:
                continue
            rows.append({
                "image": thumbnail_markdown(bundle.ds.images[nb]),
                "rank": j + 1, "caption": bundle.captions[nb], "subject": bundle.subjects[nb],
                "class size": counts[bundle.subjects[nb]],
                "s_txt": float(table.s_txt[row, j]), "s_img": float(table.s_img[row, j]),
                "w_density": w, "psi": float(table.psi[row, j]),
                "p(draw)": float(table.probs[row, j]),
                "informative": bool(table.psi[row, j] > psi_cfg.psi_threshold and bundle.subjects[nb] != subj),
                "row": nb,
            })
        for r in rows:  # 3 significant digits, as the tooltips
            for col in ("s_txt", "s_img", "w_density", "psi", "p(draw)"):
                r[col] = round_sig(r[col])
        frame = pd.DataFrame(rows, columns=self.NEIGHBOUR_COLUMNS)
        images = [bundle.ds.images[row]] + [bundle.ds.images[r] for r in frame["row"]]
        labels = [f"query · {bundle.captions[row]}"] + [
            f"#{r.rank} psi={r.psi:.2f} · {r.caption}" for r in frame.itertuples()
        ]
        mean_psi = float(frame["psi"].mean()) if len(frame) else 0.0
        head = (f"**{bundle.captions[row]}** — subject *{subj}* with {counts[subj]} training images "
                f"({shot_bucket(counts[subj], self.data_config)}-shot). w_density = **{w:.3f}**, "
                f"mean psi over its {len(frame)} neighbours = **{mean_psi:.3f}**. "
                "psi = psi_max × w_density × s_img × s_txt: how much this sample borrows from each neighbour. "
                + ("**Its neighbours are informative**: at least one shows another subject with psi above "
                   f"{psi_cfg.psi_threshold:g}." if frame["informative"].any() else
                   "**No informative neighbour**: every neighbour either shows the same subject or has psi below "
                   f"{psi_cfg.psi_threshold:g}. A caption of the same subject pulls the prediction only as far as "
                   "its words differ (a rewording predicts what this caption predicts); on the embedded sets the "
                   "same-class default changed rare-subject accuracy by 0-4%, and the other-class pool cost it "
                   "(README \"Results\")."))
        return head, frame, gallery_items(np.stack(images), labels)

    def hop(self, key: str | None, frame: pd.DataFrame, evt: gr.SelectData):
        """Clicking a neighbour row makes it the query."""
        try:
            row_idx = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            return int(pd.DataFrame(frame).iloc[row_idx]["row"])
        except (KeyError, IndexError, ValueError, TypeError):
            return gr.skip()

    def search(self, key: str | None, query: str, k: int, preset: str | None = "tiny") -> tuple[pd.DataFrame, list]:
        """Nearest training captions of a free-text query (cosine of the preset's caption vectors)."""
        preset = self.view_preset(preset)
        query = checked_input(safety.text, "Query", query, self.limits.max_text_chars).strip()
        k = checked_input(safety.whole_number, "k (neighbours)", k, 1, self.limits.max_k)
        if not query:
            raise gr.Error("Type a caption to search for, e.g. 'a photo of someone smiling, wearing glasses'.")
        bundle = self.datasets.bundle(key)
        self._embed(bundle, preset)
        from pogdiff.method.neighbours import knn

        q = bundle.view_encoder.encode([query]).pooled
        q = q.detach().cpu().numpy() if hasattr(q, "detach") else np.asarray(q)
        k = max(1, min(int(k), len(bundle.captions)))
        sims, idx = knn(bundle.pooled, k, exclude_self=False, queries=q.astype(np.float32))
        counts = bundle.count_of()
        rows = [{"rank": j + 1, "similarity": round(float(sims[0, j]), 3), "caption": bundle.captions[int(i)],
                 "subject": bundle.subjects[int(i)], "class size": counts[bundle.subjects[int(i)]], "row": int(i)}
                for j, i in enumerate(idx[0]) if int(i) >= 0]
        frame = pd.DataFrame(rows, columns=["rank", "similarity", "caption", "subject", "class size", "row"])
        items = gallery_items(bundle.ds.images[list(frame["row"])],
                              [f"{r.similarity:.2f} · {r.caption}" for r in frame.itertuples()])
        return frame, items


# ================================================================================ layout
NEIGHBOURS_HELP = """Each dot is one training caption, placed by a 2-D PCA of its sentence embedding. PoGDiff lets a
caption borrow from one of its **k nearest captions**: its target becomes a precision-weighted mix
of the true noise and the model's prediction for the neighbour, with weight
**psi = psi_max × w_density × s_img × s_txt**. Rare captions (high *w_density*) whose neighbours
look alike (*s_img*) and read alike (*s_txt*) borrow the most; frequent ones borrow almost nothing.
Pick a caption by clicking its row in the **points table** beside the map (rarest classes first), or drag
across the map to list only the points of that band. Click a row of the neighbour table to hop to that caption."""

SEARCH_HEADERS = ["rank", "similarity", "caption", "subject", "class size", "row"]


def build(neighbours: NeighboursTab, shared: Shared) -> gr.Tab:
    """The Neighbours tab: the caption map, a caption's neighbours with psi, free-text search. Its
    preparation is that of the Train tab's preset (``shared.preset``)."""
    ds_key, preset = shared.dataset, shared.preset
    psi = PsiConfig()
    with gr.Tab("Neighbours", id="neighbours") as tab:
        gr.Markdown(NEIGHBOURS_HELP, elem_classes="explain")
        banner = gr.Markdown(neighbours.datasets.dataset_banner(None))
        with gr.Row():
            scatter = gr.ScatterPlot(
                x="x", y="y", color="shot", color_map=SHOT_COLOURS,
                title="Caption embeddings (PCA)", x_title="PC 1", y_title="PC 2", height=420,
                tooltip=["caption", "subject", "class size", "x", "y"], scale=3,
            )
            map_points = gr.Dataframe(
                label="Points on the map, rarest class first: click a row to pick its caption",
                interactive=False, max_height=420, wrap=True, scale=2, elem_id="pg-map-points",
                headers=list(neighbours.POINT_COLUMNS))
            with gr.Column(scale=1, min_width=260):
                colour_by = gr.Radio(list(COLOUR_BY), value="shot bucket", label="Colour by",
                                     info="many / medium / few-shot bucket, or images in the class")
                k = gr.Slider(1, 20, value=psi.k, step=1, label="k (neighbours)",
                              info="How many nearest captions each caption can borrow from.")
                psi_max = gr.Slider(0.0, 5.0, value=psi.psi_max, step=0.1, label="psi_max",
                                    info="Upper bound of psi (the neighbour's relative precision).")
                pool = gr.Dropdown(choices=list(POOLS), value=psi.pool, label="Neighbour pool",
                                   info="same_class: the caption's own class; other_class: other subjects only; "
                                        "all: any caption.")
                map_btn = gr.Button("Build / refresh the map", variant="secondary")
        caption_dd = gr.Dropdown(
            label="Caption", choices=[], filterable=True,
            info="Type to search the training captions; [n img] is the size of the caption's class.",
        )
        nb_head = gr.Markdown("")
        nb_table = gr.Dataframe(label="Nearest captions (click a row to hop to it)", interactive=False,
                                max_height=420, wrap=True, headers=list(neighbours.NEIGHBOUR_COLUMNS),
                                datatype=[neighbours.NEIGHBOUR_TYPES[c] for c in neighbours.NEIGHBOUR_COLUMNS],
                                elem_id="pg-nb-table")
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
                                        fit_columns=False, elem_classes="pixelated")

    ds_key.change(neighbours.datasets.dataset_banner, ds_key, banner, api_visibility="private", queue=False,
                  concurrency_limit=None)
    map_outputs = [scatter, caption_dd, banner]
    map_btn.click(neighbours.neighbour_map, [ds_key, colour_by, preset], map_outputs, api_name="neighbour_map").then(
        neighbours.map_points, ds_key, map_points, api_visibility="private")
    tab.select(neighbours.neighbour_map, [ds_key, colour_by, preset], map_outputs, api_name="neighbour_map_on_tab",
               api_visibility="private").then(neighbours.map_points, ds_key, map_points, api_visibility="private")
    # The scatter plot reports a brushed x band, not a clicked point: the band's points go to the table.
    scatter.select(neighbours.map_band, ds_key, [map_points, caption_dd], api_visibility="private")
    map_points.select(neighbours.hop, [ds_key, map_points], caption_dd, api_visibility="private")
    colour_by.change(neighbours.recolour, [ds_key, colour_by], scatter, api_visibility="private")
    nb_inputs = [ds_key, caption_dd, k, psi_max, pool, preset]
    nb_outputs = [nb_head, nb_table, nb_gallery]
    caption_dd.change(neighbours.neighbours_of, nb_inputs, nb_outputs, api_name="neighbours")
    for trigger in (k.release, psi_max.release, pool.change):
        trigger(neighbours.neighbours_of, nb_inputs, nb_outputs, api_visibility="private")
    nb_table.select(neighbours.hop, [ds_key, nb_table], caption_dd, api_visibility="private")
    search_btn.click(neighbours.search, [ds_key, query, k, preset], [search_table, search_gallery], api_name="search")
    query.submit(neighbours.search, [ds_key, query, k, preset], [search_table, search_gallery],
                 api_name="search_submit", api_visibility="private")
    return tab
