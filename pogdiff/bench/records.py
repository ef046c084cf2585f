"""Quality records of several ``bench quality`` runs put together (BENCHMARKS.md "Quality").

A 1000-step run of one recipe and one training seed takes minutes of CPU, and a comparison at
several seeds needs many of them, often made at different times or on different machines. Every
run of ``bench quality`` keeps its records as rows, one per (recipe, seed, budget) and bucket
(``<out>/<set>/summary_all_seeds.csv``) or class (``per_class_all_seeds.csv``).
``python -m pogdiff bench combine`` reads the records of several output folders, renames recipes
where a folder ran a variant under the plain name (``DIR:pogdiff=pogdiff_rare``), refuses
records of another protocol (batch, captions, sampling seeds, sampler) and two different
records of one (recipe, seed, budget), and writes the union and the ``summary.json`` block of a
set from it, as ``bench quality`` does from its own runs. Generation shifts need the generated
images: they are computed where the runs' evaluation folders are present, and left out otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pogdiff.bench.summary import add_generation_shifts, aggregate, merge_summary, summary_entry, to_markdown

logger = logging.getLogger(__name__)

PROTOCOL_KEYS = ("batch_size", "n_eval_captions", "sample_seeds", "sampler", "split")  # must agree across sources
RECORD_KEY = ["method", "seed", "steps"]


def parse_source(spec: str) -> tuple[Path, dict[str, str]]:
    """``"DIR"`` or ``"DIR:old=new[,old=new]"`` -> (folder, renames)."""
    folder, sep, tail = spec.partition(":")
    renames = {}
    for item in tail.split(",") if sep else []:
        old, eq, new = item.partition("=")
        if not eq or not old or not new:
            raise ValueError(f"source {spec!r}: write DIR or DIR:RECIPE=NEW_NAME[,RECIPE=NEW_NAME], e.g. "
                             "out/rare:pogdiff=pogdiff_rare")
        renames[old] = new
    return Path(folder), renames


def load_source(folder: Path, data: str, renames: dict[str, str]) -> dict:
    """One folder's records of set ``data``: bucket rows, class rows, its protocol and recipes."""
    summary_path, part = folder / "summary.json", folder / data
    if not summary_path.is_file() or not (part / "summary_all_seeds.csv").is_file():
        raise ValueError(f"{folder} holds no records of set {data!r}: expected {summary_path} and "
                         f"{part / 'summary_all_seeds.csv'} (the output folder of bench quality --out)")
    block = json.loads(summary_path.read_text())[data]
    long = pd.read_csv(part / "summary_all_seeds.csv")
    classes = pd.read_csv(part / "per_class_all_seeds.csv")
    unknown = sorted(set(renames) - set(long["method"]))
    if unknown:
        raise ValueError(f"{folder}: no records of recipe(s) {unknown} to rename; it has {sorted(set(long['method']))}")
    for frame in (long, classes):
        frame["method"] = frame["method"].replace(renames)
    overrides = list(block.get("overrides", []))
    recipes = {renames.get(m, m): list(r) + overrides for m, r in block.get("recipes", {}).items()
               if m in set(long["method"]) or m in renames}
    return {"folder": folder, "long": long, "classes": classes, "recipes": recipes,
            "protocol": {"split": "eval", **{k: block[k] for k in PROTOCOL_KEYS if k in block}}, "renames": renames}


def union_records(frames: list[pd.DataFrame], what: str) -> pd.DataFrame:
    """Rows of several sources; a (recipe, seed, budget) found twice must hold the same numbers."""
    allrows = pd.concat(frames, ignore_index=True)
    by = RECORD_KEY + [c for c in ("bucket", "subject") if c in allrows]
    numeric = [c for c in allrows.columns if c not in by and pd.api.types.is_numeric_dtype(allrows[c])]
    dup = allrows[allrows.duplicated(by, keep=False)]
    for key, group in dup.groupby(by):
        values = group[numeric].to_numpy(dtype=np.float64)
        if not np.allclose(values, values[0], equal_nan=True, rtol=1e-9, atol=1e-12):
            raise ValueError(f"two different {what} records of {dict(zip(by, key))}: rename one recipe "
                             "(DIR:RECIPE=NEW_NAME) or drop one source")
    return allrows.drop_duplicates(by, keep="first").reset_index(drop=True)


def _generated(sources: list[dict], data: str, steps: int) -> dict:
    """Generated images of every run whose evaluation folder is still beside its records."""
    out = {}
    for src in sources:
        back = {new: old for old, new in src["renames"].items()}
        for method, seed in src["long"][["method", "seed"]].drop_duplicates().itertuples(index=False):
            path = (src["folder"] / data / "runs" / f"{back.get(method, method)}-seed{seed}" /
                    f"eval-{steps:06d}" / "generated.npy")
            if path.is_file():
                out[(method, int(seed), steps)] = np.load(path, allow_pickle=False)
    return out


def combine(*, sources: list[str], data: str, out: Path, steps: int, compared: tuple[str, ...]) -> dict:
    """Write the union of the sources' records to ``out/<data>/`` and its block to ``out/summary.json``.

    :return: the ``summary.json`` block of the set.
    """
    loaded = []
    for spec in sources:
        folder, renames = parse_source(spec)
        loaded.append(load_source(folder, data, renames))
    first = loaded[0]["protocol"]
    for src in loaded[1:]:
        diff = {k: (first[k], src["protocol"][k]) for k in PROTOCOL_KEYS if src["protocol"][k] != first[k]}
        if diff:
            raise ValueError(f"{src['folder']} was measured with another protocol than {loaded[0]['folder']}: {diff}")
    long = union_records([s["long"] for s in loaded], "bucket")
    classes = union_records([s["classes"] for s in loaded], "class")
    recipes = {}
    for src in loaded:
        for name, recipe in src["recipes"].items():
            if recipes.setdefault(name, recipe) != recipe:
                raise ValueError(f"recipe {name!r} means {recipes[name]} in one source and {recipe} in another")
    folder = Path(out) / data
    folder.mkdir(parents=True, exist_ok=True)
    long.to_csv(folder / "summary_all_seeds.csv", index=False)
    classes.to_csv(folder / "per_class_all_seeds.csv", index=False)
    at = long[long["steps"] == steps].drop(columns="steps")
    if at.empty:
        raise ValueError(f"no records at {steps} steps; the sources have budgets {sorted(set(long['steps']))}")
    seeds = sorted(int(s) for s in set(at["seed"]))
    report = aggregate(at)
    report.to_csv(folder / "results.csv", index=False)
    (folder / "results.json").write_text(report.to_json(orient="records", indent=2))
    (folder / "results.md").write_text(to_markdown(report, steps=steps, seeds=seeds))
    seeds_for = {m: sorted(int(s) for s in set(at.loc[at["method"] == m, "seed"])) for m in dict.fromkeys(at["method"])}
    entry = summary_entry(at, classes[classes["steps"] == steps], steps=steps, seeds=seeds, overrides=[],
                          recipes={m: recipes.get(m, []) for m in seeds_for}, seeds_for=seeds_for,
                          sources=[str(s) for s in sources], compared=compared, **first)
    entry["budgets"] = sorted(int(b) for b in set(long["steps"]))
    counts = classes.drop_duplicates("subject").set_index("subject")["train_count"].to_dict()
    generated = _generated(loaded, data, steps)
    subjects = _eval_subjects(data, first) if generated else None
    if subjects is not None:
        add_generation_shifts(entry, generated, subjects, counts, seeds=seeds, steps=steps)
    merge_summary(Path(out) / "summary.json", data, entry)
    return entry


def _eval_subjects(data: str, protocol: dict) -> list[str] | None:
    """The subject of each generated image (evaluation captions x sampling seeds), in generation order."""
    from pogdiff.bench.quality import eval_subjects

    subjects = eval_subjects(data)
    if len(subjects) != protocol["n_eval_captions"]:
        logger.warning("generation shifts left out: %d evaluation captions here, %s in the records",
                       len(subjects), protocol["n_eval_captions"])
        return None
    return subjects * int(protocol["sample_seeds"])


def add_parsers(bench) -> None:
    """Register ``combine`` under ``python -m pogdiff bench`` (README "Options of the other commands")."""
    from pogdiff.config import COMPARED

    p = bench.add_parser("combine", help="put the quality records of several bench quality runs together")
    p.add_argument("--data", required=True, help="benchmark set (demo or families)")
    p.add_argument("--from", dest="sources", nargs="+", required=True, metavar="DIR[:RECIPE=NAME,...]",
                   help="output folders of bench quality; rename a folder's recipe, e.g. out/rare:pogdiff=pogdiff_rare")
    p.add_argument("--out", default="results/quality", help="where the union and summary.json go")
    p.add_argument("--steps", type=int, default=1000, help="the budget summary.json reports")
    p.add_argument("--compare", nargs="+", default=list(COMPARED),
                   help="recipes compared against every other recipe (paired ratios and intervals)")
    p.set_defaults(fn=main)


def main(args) -> int:
    entry = combine(sources=args.sources, data=args.data, out=Path(args.out), steps=args.steps,
                    compared=tuple(args.compare))
    from pogdiff.bench.report import summary_markdown

    print(summary_markdown({args.data: entry}))
    return 0
