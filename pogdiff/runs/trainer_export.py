"""A run's balancing taken back to kohya_ss and OneTrainer (README "Your own data", kohya_ss and
OneTrainer sets): the share of batch rows the run gave each class, written as a kohya
``dataset_config.toml`` (whole ``num_repeats``, as kohya needs) and as a OneTrainer concepts file
(``REPEATS`` balancing, fractions allowed, and ``loss_weight``).

A run's share of class ``c`` is :func:`pogdiff.training.balance.run_class_shares`; kohya gives
class ``c`` the share ``n_c r_c / sum_k n_k r_k`` of an epoch, so ``r_c ∝ share_c / n_c``
(:func:`pogdiff.training.balance.kohya_repeats` rounds it). Kohya subsets have no loss weight: the
run's class loss weights go into the OneTrainer file and, as a comment, into the TOML.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import PurePosixPath

from pogdiff.config import TrainConfig
from pogdiff.training.balance import class_loss_table, kohya_repeats, run_class_shares


def class_folders(file_names: list[str], subjects: list[str]) -> dict[str, str | None]:
    """The folder of the upload holding all of a class's images and nothing else, per class
    (None when its images are spread over several folders or share one with another class)."""
    parents: dict[str, set[str]] = {}
    for name, subject in zip(file_names, subjects):
        parents.setdefault(subject, set()).add(str(PurePosixPath(name).parent))
    owners = Counter(p for ps in parents.values() for p in ps)
    return {c: (next(iter(ps)) if len(ps) == 1 and owners[next(iter(ps))] == 1 and next(iter(ps)) != "." else None)
            for c, ps in parents.items()}


def export_rows(dataset, cfg: TrainConfig) -> list[dict]:
    """Per class (most images first): ``class``, ``images``, ``folder`` (None: none of its own),
    ``share`` (the run's), ``repeats`` (kohya's whole number), ``kohya_share`` (what those repeats
    give), ``onetrainer_repeats`` (exact) and ``loss_weight``."""
    counts = Counter(dataset.subjects)
    names = sorted(counts)
    shares = run_class_shares(cfg, names, [counts[c] for c in names])
    repeats = kohya_repeats(shares, dict(counts))
    total = sum(counts[c] * repeats[c] for c in names)
    low = min(shares[c] / counts[c] for c in names)
    table = class_loss_table(cfg, names, [counts[c] for c in names])
    loss = dict(zip(names, [1.0] * len(names) if table is None else table.tolist()))
    folders = class_folders([s.file_name for s in dataset.samples], list(dataset.subjects))
    rows = [{"class": c, "images": counts[c], "folder": folders.get(c), "share": shares[c], "repeats": repeats[c],
             "kohya_share": counts[c] * repeats[c] / total, "onetrainer_repeats": shares[c] / counts[c] / low,
             "loss_weight": loss[c]} for c in names]
    return sorted(rows, key=lambda r: (-r["images"], r["class"]))


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


def _describe(cfg: TrainConfig) -> str:
    from pogdiff.config import uses_balanced_sampling

    if cfg.balance == "from-data":
        return "the set's own repeats (balance from-data)"
    if uses_balanced_sampling(cfg):
        return f"class-balanced batches tempered with alpha {cfg.balance_alpha:g} (class c drawn ~ n_c^alpha)"
    return "plain batches (every image alike)"


def kohya_dataset_config(dataset, cfg: TrainConfig, *, run: str = "") -> str:
    """The run's draws as a kohya ``dataset_config.toml``: one ``[[datasets.subsets]]`` per class,
    ``image_dir`` its folder of the upload (relative to the file; a class without a folder of its own
    gets ``img/<class>`` and a comment to put its images there), ``num_repeats`` rounded."""
    rows = export_rows(dataset, cfg)
    worst = max(abs(r["kohya_share"] - r["share"]) / r["share"] for r in rows)
    lines = [f"# kohya_ss dataset config written by PoGDiff Studio{f' from run {run}' if run else ''}:",
             f"# method {cfg.method}, {_describe(cfg)}, as whole num_repeats; each class's share of an epoch is",
             f"# n_c * num_repeats / sum_k n_k * num_repeats_k, within {100 * worst:.1f}% of the run's own share.",
             "# image_dir is relative to this file: put it in the folder that holds the class folders.", "",
             "[general]", 'caption_extension = ".txt"', "", "[[datasets]]", ""]
    weights = [r for r in rows if r["loss_weight"] != 1.0]
    for r in rows:
        folder = r["folder"] or f"img/{r['class']}"
        lines += [f"  # {r['class']}: {r['images']} images, run share {100 * r['share']:.1f}%, "
                  f"with these repeats {100 * r['kohya_share']:.1f}%"]
        if r["folder"] is None:
            lines.append(f"  # its images are not in a folder of their own: put them in {folder}/")
        lines += ["  [[datasets.subsets]]", f"  image_dir = {_toml_string(folder)}",
                  f"  class_tokens = {_toml_string(r['class'])}", f"  num_repeats = {r['repeats']}", ""]
    if weights:
        lines.append("# Class loss weights of the run (kohya subsets have none; the OneTrainer concepts carry them): "
                     + ", ".join(f"{r['class']} {r['loss_weight']:.3g}" for r in weights))
    return "\n".join(lines).rstrip() + "\n"


def onetrainer_concepts(dataset, cfg: TrainConfig) -> str:
    """The run's draws as a OneTrainer concepts file: one concept per class, ``REPEATS`` balancing
    (exact: fractions allowed) and the run's class loss weight."""
    concepts = [{"name": r["class"], "path": r["folder"] or f"img/{r['class']}", "enabled": True,
                 "balancing": round(r["onetrainer_repeats"], 4), "balancing_strategy": "REPEATS",
                 "loss_weight": round(r["loss_weight"], 4)} for r in export_rows(dataset, cfg)]
    return json.dumps(concepts, indent=2, ensure_ascii=False) + "\n"
