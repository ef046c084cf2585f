"""The Compare tab's per-class metrics (:class:`MetricsPanel`): the demo's evaluator, or a judge of the
user's own classes, scoring what checkpoints A and B generate (README "What you see", "Metrics on your own
data")."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from pogdiff.config import DataConfig, Limits
from pogdiff.runs.store import RunStore
from pogdiff.server import safety
from pogdiff.ui.compare_views import (
    INTERVAL,
    CompareState,
    ResultCache,
    bucket_markdown,
    metrics_csv_frame,
    verdict_table,
)
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.downloads import download_path
from pogdiff.ui.sources import Sources
from pogdiff.ui.state import DatasetBundle, Source
from pogdiff.ui.views import (
    DEMO_KEY,
    MAX_CACHED_MODELS,
    MAX_KEY_CHARS,
    WEAK_MARK,
    checked_input,
    source_name,
    own_data_note,
)


class MetricsPanel:
    """Per-class metrics of A and B: the demo's evaluator, or a judge of the user's own classes.

    Args:
        sources: the checkpoints A and B are chosen from, and their loaded models.
        datasets: the page's data sets (the demo's evaluation split, a user's set).
        runs: the runs folder's records (what a run was trained on).
        results: what a browser gets back after a page reload (shared with the Compare tab).
        shipped_dir: folder of the shipped checkpoints (the demo's ``evaluator``).
        cache_dir: where scored tables are cached (``metrics/``).
        limits: server-side bounds on every request value (README "Limits and safety").
        data_config: the shot buckets.
    """

    OWN_PER_CLASS = {"fast": 4, "full": 8}  # captions per class of a user's set that A and B draw

    def __init__(self, sources: Sources, datasets: Datasets, runs: RunStore, results: ResultCache,
                 shipped_dir: str | Path, cache_dir: str | Path, limits: Limits, data_config: DataConfig) -> None:
        self.sources = sources
        self.datasets = datasets
        self.runs = runs
        self.results = results
        self.shipped_dir = Path(shipped_dir)
        self.cache_dir = Path(cache_dir)
        self.limits = limits
        self.data_config = data_config
        self._lock = threading.Lock()
        self._evaluator = None
        self._metric_stash: OrderedDict[tuple, tuple] = OrderedDict()  # last metric outputs per run pair

    def _evaluator_or_error(self):
        with self._lock:
            if self._evaluator is not None:
                return self._evaluator
        folder = self.shipped_dir / "evaluator"
        from pogdiff.evaluation.demo_classifier import load_evaluator

        if not folder.exists():
            raise gr.Error("The identity evaluator (checkpoints/evaluator) is not there yet; make it with "
                           "`python -m pogdiff build evaluator`.", title="No evaluator")
        evaluator = load_evaluator(folder)
        with self._lock:
            self._evaluator = evaluator
        return evaluator

    def precomputed_metrics(self, key_a: str | None, key_b: str | None) -> tuple:
        """Per-class tables shipped beside the demo checkpoints (``per_class.csv``), if any."""
        tables = {}
        shipped = {s.key: s for s in self.sources.all() if s.metrics_csv is not None}  # looked up by id, never a path
        for key in (key_a, key_b):
            source = shipped.get(key) if isinstance(key, str) else None
            if source is not None:
                tables[source_name(source)] = pd.read_csv(source.metrics_csv)
        if len(tables) < 2:
            return gr.skip(), gr.skip(), gr.skip()
        return self._metric_outputs(tables, note="Precomputed at build time on the demo evaluation split "
                                                 "(press **Compute metrics** to recompute).")

    def metrics_on_choice(self, key_a: str | None, key_b: str | None) -> tuple:
        """A or B changed: the shipped metrics of the pair if both have them, else an empty panel
        (metrics of another pair must not stay on screen under the new choice)."""
        out = self.precomputed_metrics(key_a, key_b)
        if all(isinstance(x, dict) and x.get("__type__") == "update" for x in out):
            return (pd.DataFrame(columns=["subject", "train_count", "shot", "accuracy"]), None,
                    "No metrics for these two checkpoints yet: press **Compute metrics**.")
        return out

    def compute_metrics(self, key_a: str, key_b: str, full: bool = False, key: str | None = None,
                        progress: gr.Progress = gr.Progress()) -> tuple:
        """Generate images with each checkpoint and score them per class of the loaded data set.

        On the demo set (``key`` empty or the demo): the demo's held-out captions, judged by the
        shipped evaluator. ``full=False`` (fast, the default): the quality benchmark's protocol, 4
        captions per class, so the shipped demo numbers come out again; ``full=True``: all 8.
        On a user's set: up to 4 (fast) or 8 (full) of each class's own captions, judged by a
        classifier fitted on the set's images, whose held-out reliability is shown per class
        (:mod:`pogdiff.evaluation.user_judge`). Results are cached per checkpoint weights, data and mode
        (README "What you see", "Metrics on your own data").
        """
        from pogdiff.evaluation import protocol as evaluation

        a, b = self.sources.find(key_a), self.sources.find(key_b)
        mode = "full" if checked_input(safety.flag, "Full evaluation", False if full is None else full) else "fast"
        key = checked_input(safety.text, "dataset key", key, MAX_KEY_CHARS) if key is not None else None
        if key and key != DEMO_KEY:
            return self._own_data_metrics(a, b, mode, self.datasets.bundle(key), progress)
        evaluator = self._evaluator_or_error()
        progress(0.02, desc="Loading the demo evaluation split…")
        eval_set = evaluation.metric_eval_set(self.datasets.eval_set(), mode)
        counts = self.datasets.load_demo().count_of()
        tables, cached = self._scored_pair(
            (a, b), lambda src: self._metrics_cache_path(src, mode, eval_set),
            lambda src: evaluation.evaluate_model(self.sources.model(src), eval_set, evaluator, counts)[0],
            f"Generating and scoring {{}} ({len(eval_set.captions)} images)…", progress)
        per_class = evaluation.METRIC_MODES[mode]
        what = f"{per_class} held-out captions per class" if per_class else "every held-out caption"
        note = (f"Computed on the demo evaluation split ({mode} mode: {what}, {len(eval_set.captions)} images "
                f"per model, fixed seeds)" + (f"; {cached} of 2 read from the cache." if cached else "."))
        return self._metric_outputs(tables, note=note)

    def judge_for(self, bundle: DatasetBundle, progress: Callable | None = None):
        """The classifier of ``bundle``'s own classes (fitted once per loaded set, kept with it)."""
        from pogdiff.evaluation.user_judge import UserJudge

        with bundle.lock:
            if bundle.judge is None:
                if progress is not None:
                    progress(0.03, desc=f"Fitting a judge of the {len(bundle.ds.classes)} classes on "
                                        f"{len(bundle.ds)} real images…")
                try:
                    bundle.judge = UserJudge().fit(bundle.ds.images, bundle.subjects)
                except ValueError as exc:
                    raise gr.Error(str(exc), title="Cannot judge this data set") from exc
            return bundle.judge

    def _own_data_metrics(self, a: Source, b: Source, mode: str, bundle: DatasetBundle, progress) -> tuple:
        from pogdiff.evaluation import protocol as evaluation
        from pogdiff.evaluation import user_judge as judging

        judge = self.judge_for(bundle, progress)
        per_class = self.OWN_PER_CLASS[mode]
        counts = bundle.count_of()
        digest = judging.dataset_digest(bundle.ds.images, bundle.captions, bundle.subjects)
        n_images = len(judging.prompt_rows(bundle.subjects, per_class))
        tables, cached = self._scored_pair(
            (a, b), lambda src: self._metrics_cache_path(src, mode, None, data=digest),
            lambda src: judging.score_on_own_data(self.sources.model(src), bundle.ds, judge, counts,
                                                  per_class=per_class, sample_cfg=evaluation.EVAL_SAMPLE,
                                                  config=self.data_config),
            f"Generating and judging {{}} ({n_images} images)…", progress)
        note = own_data_note(bundle.name, judge, mode=mode, per_class=per_class, n_images=n_images,
                             cached=cached, other_data=[s.label for s in (a, b) if not self._trained_on(s, bundle)])
        return self._metric_outputs(tables, note=note, reliability=judge.reliability)

    @staticmethod
    def _scored_pair(sources, cache_path: Callable[[Source], Path], score: Callable[[Source], pd.DataFrame],
                     desc: str, progress) -> tuple[dict[str, pd.DataFrame], int]:
        """Each source's per-class table, read from its cache file or scored and written there
        (atomically); also how many came from the cache. ``desc`` has a ``{}`` for the source's label."""
        tables, cached = {}, 0
        for i, src in enumerate(sources):
            path = cache_path(src)
            if path.is_file():
                tables[source_name(src)] = pd.read_csv(path)
                cached += 1
                continue
            progress(0.05 + 0.45 * i, desc=desc.format(src.label))
            table = score(src)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            table.to_csv(tmp, index=False)
            os.replace(tmp, path)
            tables[source_name(src)] = table
        progress(1.0, desc="Done")
        return tables, cached

    def _trained_on(self, src: Source, bundle: DatasetBundle) -> bool:
        """Was ``src`` trained on a set of ``bundle``'s size and class count (the runs record no more)?"""
        if src.key.startswith("shipped:"):
            return bundle.key == DEMO_KEY
        name = src.key.split(":", 1)[1]
        meta = self.runs.run_meta(name) or {}
        desc = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
        return (desc.get("num_samples"), desc.get("num_classes")) == (len(bundle.ds), len(bundle.ds.classes))

    def _metrics_cache_path(self, src: Source, mode: str, eval_set, *, data: str = "demo") -> Path:
        from pogdiff.evaluation import protocol as evaluation
        from pogdiff.config import to_dict
        from pogdiff.evaluation.user_judge import JUDGE_VERSION

        what = {"captions": list(eval_set.captions)} if eval_set is not None else \
            {"data": data, "judge": JUDGE_VERSION, "per_class": self.OWN_PER_CLASS[mode]}
        key = hashlib.sha256(json.dumps({"weights": evaluation.checkpoint_digest(src.checkpoint), "mode": mode,
                                         **what, "sample": to_dict(evaluation.EVAL_SAMPLE)}, sort_keys=True).encode())
        return self.cache_dir / "metrics" / f"{key.hexdigest()[:32]}.csv"

    def _metric_outputs(self, tables: dict[str, pd.DataFrame], *, note: str,
                        reliability: pd.DataFrame | None = None) -> tuple:
        """Per-class table (B − A with its interval and verdict first; rarest first), the two-run
        figure and the bucket summary, each difference called a win only when its interval
        excludes 0 (README "Reading B − A").

        With a judge's ``reliability`` (user data) the table gets its per-class held-out accuracy and
        a weak mark, and the bucket summary a row over the classes the judge can score.
        """
        from pogdiff.evaluation import comparison

        names = list(tables)
        name_a, name_b = (names * 2)[:2]  # A and B may be the same checkpoint
        table_a, table_b = tables[name_a], tables[name_b]
        counted = all("n_gen" in t.columns for t in (table_a, table_b))
        if not counted:  # a table written without its image counts: no interval, so no verdict
            table_a, table_b = (t if "n_gen" in t.columns else t.assign(n_gen=float("nan")) for t in (table_a, table_b))
        verdicts = comparison.per_class_verdicts(table_a, table_b)
        fig = comparison.verdict_frequency_figure(verdicts, (name_a, name_b), config=self.data_config)
        groups = None
        if reliability is not None:
            groups = {"judge ok": list(reliability.loc[~reliability["weak"], "subject"])}
        buckets = comparison.bucket_verdicts(table_a, table_b, groups=groups)
        merged = verdict_table(table_a, table_b, name_a, name_b, verdicts, reliability, weak_mark=WEAK_MARK).round(3)
        lines = [note, "", bucket_markdown(buckets, (name_a, name_b)), "",
                 f"A difference counts as a win only when its {INTERVAL} (bootstrap over each class's "
                 "generated images) excludes 0; otherwise: *no measurable difference*."
                 + ("" if counted else " These tables do not say how many images each class had (no `n_gen` "
                                       "column), so no interval and no verdict (—) can be given.")]
        outputs = (merged, fig, "\n".join(lines))
        with self._lock:
            self._metric_stash[(name_a, name_b)] = outputs
            while len(self._metric_stash) > MAX_CACHED_MODELS * 4:
                self._metric_stash.popitem(last=False)
        return outputs

    def metrics_csv(self, table: Any) -> Any:
        """The per-class metrics on screen as a CSV file to download (README "What you see");
        the download stays off while there are no metrics."""
        frame = pd.DataFrame(table) if table is not None else pd.DataFrame()
        if frame.empty or "subject" not in frame.columns:
            return gr.DownloadButton(value=None, interactive=False)
        path = download_path("per_class_metrics.csv")
        metrics_csv_frame(frame).to_csv(path, index=False)
        return gr.DownloadButton(value=str(path), interactive=True)

    def keep_metrics(self, key_a: str | None, key_b: str | None, state: Any) -> Any:
        """After the metrics are shown: keep them with this browser's Compare state."""
        names = tuple(source_name(self.sources.find(k)) for k in (key_a, key_b))
        with self._lock:
            outputs = self._metric_stash.get(names)
        if outputs is None:
            return gr.skip()
        kept = self._state(state)
        kept.token = kept.token or ResultCache.new_token()
        self.results.put(kept.token, metrics=outputs)
        return kept.to_browser()

    def _state(self, raw: Any) -> CompareState:
        return CompareState.kept(raw, max_prompts=self.limits.max_prompts, max_chars=self.limits.max_text_chars)

    def load_metrics(self, key_a: str | None, key_b: str | None, state: Any) -> tuple:
        """Page load: the shipped metrics of A and B, unless this browser's kept results have metrics."""
        if "metrics" in self.results.get(self._state(state).token):
            return gr.skip(), gr.skip(), gr.skip()
        return self.precomputed_metrics(key_a, key_b)
