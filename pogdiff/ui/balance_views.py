"""What a set's own balancing means, before training (README "Your own data", kohya_ss and
OneTrainer sets): per class its share of the draws under the set's repeats, under plain batches and
under the tempered default, and a note on what to expect, from the quality benchmark's measured
numbers in ``results/quality/summary.json`` (never figures written here). Pure: plain data in, tables
and markdown out."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pandas as pd

from pogdiff.config import DEFAULT_BALANCE_ALPHA, TrainConfig
from pogdiff.data.trainer_configs import SOURCE_NAMES

# Columns of the per-class balance table (the Data tab and the API's /class_balance).
BALANCE_COLUMNS = ["class", "images", "repeats", "loss weight", "draws per epoch", "your repeats %", "plain %",
                   "tempered default %"]
# The recipes a set's repeats are placed among, by the exponent alpha of their class draw n_c ** alpha,
# with the summary.json comparison that measured the tempered default against each.
RECIPE_ALPHAS = ((0.0, "class-uniform resampling", "pogdiff_no_pog_vs_resample"),
                 (DEFAULT_BALANCE_ALPHA, "our tempered default", None),
                 (1.0, "plain fine-tuning", "pogdiff_no_pog_vs_baseline"))


def class_shares(ds: Any) -> dict[str, dict[str, float]]:
    """Per class: ``yours`` (the set's repeats; absent without a kohya / OneTrainer config),
    ``plain`` and ``tempered`` (the default recipe's draw), each a share of a run's batch rows."""
    from pogdiff.training.balance import run_class_shares, with_data_weights

    counts = Counter(ds.subjects)
    names = sorted(counts)
    n = [counts[c] for c in names]
    views = {"plain": TrainConfig(method="baseline"), "tempered": TrainConfig()}
    if getattr(ds, "class_weights", None):
        views["yours"] = with_data_weights(TrainConfig(method="baseline", balance="from-data"), ds)
    shares = {key: run_class_shares(cfg, names, n) for key, cfg in views.items()}
    return {c: {key: s[c] for key, s in shares.items()} for c in names}


def repeats_text(entry: dict | None) -> str:
    """A class's repeats as its config gives them (``"13"``, OneTrainer ``"20 samples"``); "" without."""
    if not entry:
        return ""
    return f"{entry['samples']:g} samples" if entry.get("samples") is not None else f"{entry['repeats']:g}"


def balance_frame(ds: Any, loss_weights: dict[str, float] | None = None) -> pd.DataFrame:
    """:data:`BALANCE_COLUMNS` per class, most images first: repeats and draws per epoch as the set's
    config says (empty without one), the loss weight (``loss_weights``, else the set's, else 1) and
    the three shares in percent."""
    counts = Counter(ds.subjects)
    weights = getattr(ds, "class_weights", None) or {}
    loss = loss_weights or {}
    shares = class_shares(ds)
    rows = []
    for c in sorted(counts, key=lambda c: (-counts[c], c)):
        entry = weights.get(c, {})
        rows.append([c, counts[c], repeats_text(entry),
                     float(loss.get(c, entry.get("loss_weight", 1.0))),
                     "" if not entry else round(float(entry["draw_weight"]), 2),
                     round(100 * shares[c]["yours"], 1) if "yours" in shares[c] else None,
                     round(100 * shares[c]["plain"], 1), round(100 * shares[c]["tempered"], 1)])
    return pd.DataFrame(rows, columns=BALANCE_COLUMNS)


def effective_alpha(counts: list[int], shares: list[float]) -> float | None:
    """The exponent alpha of the draw ``share_c ∝ n_c ** alpha`` closest to ``shares`` (least squares
    on logarithms); None when every class has the same number of images (nothing to tell apart)."""
    xs = [math.log(n) for n in counts]
    ys = [math.log(s) for s in shares]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx < 1e-12:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def measured(summary: Any, key: str) -> list[str]:
    """``"few 0.96x [0.91, 1.01], many 1.02x [1.00, 1.07] on demo"`` per embedded set of ``summary``
    holding comparison ``key`` (the tempered default's accuracy over the other recipe's, ratio of
    class means with its 95% interval)."""
    out = []
    for data, block in (summary or {}).items() if isinstance(summary, dict) else ():
        comp = ((block or {}).get("comparisons") or {}).get(key) if isinstance(block, dict) else None
        cells = []
        for bucket in ("few", "many"):
            try:
                ratio, (low, high) = float(comp[bucket]["ratio_of_means"]), comp[bucket].get("hierarchical_ci95") or comp[bucket]["bootstrap_ci95"]
                cells.append(f"{bucket}-shot {ratio:.2f}x [{float(low):.2f}, {float(high):.2f}]")
            except (TypeError, KeyError, ValueError):
                continue
        if cells:
            out.append(f"{', '.join(cells)} on {data}")
    return out


def verdict_markdown(ds: Any, summary: Any) -> str:
    """The Data tab's note on a set's own balancing: where it comes from, what its repeats mean in
    draws, which measured recipe they are closest to and what the quality benchmark measured between
    that recipe and the tempered default (``summary``: the parsed ``summary.json``, or None)."""
    weights = getattr(ds, "class_weights", None) or {}
    counts = Counter(ds.subjects)
    if not weights:
        return ("This set says nothing about how often each class is drawn (no kohya `<repeats>_<name>` folders, "
                "`dataset_config.toml` or OneTrainer `concepts.json`): training draws the method's batches. The "
                "table shows what plain and tempered batches give each class; loss weights below work for any set.")
    names = sorted(counts)
    shares = class_shares(ds)
    yours = [shares[c]["yours"] for c in names]
    rare = min(names, key=lambda c: (counts[c], c))
    common = max(names, key=lambda c: (counts[c], c))
    source = SOURCE_NAMES.get(getattr(ds, "trainer_config", ""), "the set's config")
    lines = [f"**Your balancing** (`{source}`): an epoch draws each class `images x repeats` times; the rarest class, "
             f"*{rare}* ({counts[rare]} images), gets {100 * shares[rare]['yours']:.1f}% of the draws "
             f"(plain {100 * shares[rare]['plain']:.1f}%, tempered default {100 * shares[rare]['tempered']:.1f}%), "
             f"the most frequent, *{common}* ({counts[common]} images), {100 * shares[common]['yours']:.1f}% "
             f"(plain {100 * shares[common]['plain']:.1f}%, tempered {100 * shares[common]['tempered']:.1f}%)."]
    alpha = effective_alpha([counts[c] for c in names], yours)
    if alpha is None:
        lines.append("Every class has as many images, so the draws cannot be compared with the measured recipes.")
        return "\n\n".join(lines)
    nearest = min(RECIPE_ALPHAS, key=lambda r: abs(r[0] - alpha))
    place = (f"rarer classes *more* often than frequent ones (alpha {alpha:.2f} < 0), beyond the recipes measured; "
             f"the closest measured is **{nearest[1]}** (alpha {nearest[0]:g})"
             if alpha < -0.15 else f"classes about `n_c ^ {alpha:.2f}`, closest to **{nearest[1]}** (alpha {nearest[0]:g})")
    lines.append(f"Your repeats draw {place}.")
    if nearest[2]:
        figures = measured(summary, nearest[2])
        if figures:
            lines.append(f"Measured by the quality benchmark on its embedded sets, the tempered default's identity "
                         f"accuracy over {nearest[1]} (ratio of class means, 95% interval): " + "; ".join(figures)
                         + " (an interval holding 1: no difference measured). That is what these recipes did there, not a promise for your images: after training, "
                         "**Compare** sets a run with your repeats against one with the tempered default, per class.")
        else:
            lines.append("No quality benchmark results are at hand to say what to expect (results/quality/summary.json).")
    else:
        lines.append("That is about what the tempered default draws, so expect what it gives (README \"Results\").")
    return "\n\n".join(lines)


def parse_loss_weights(frame: Any, classes: list[str]) -> dict[str, float]:
    """The ``class`` / ``loss weight`` columns of an edited table as ``{class: weight}`` (weights of
    1 left out); a class the set lacks or a weight that is not a number above 0 is refused in words."""
    records = frame.to_dict("records") if isinstance(frame, pd.DataFrame) else list(frame or [])
    known = set(classes)
    out = {}
    for i, row in enumerate(records, start=1):
        name, raw = str(row.get("class", "")).strip(), row.get("loss weight", 1.0)
        if not name:
            continue
        if name not in known:
            raise ValueError(f"row {i}: the set has no class {name!r}; keep the class column as it is")
        try:
            weight = float(raw)
        except (TypeError, ValueError):
            weight = float("nan")
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"row {i} ({name}): loss weight {raw!r} must be a number above 0 (1 leaves it alone)")
        if weight != 1.0:
            out[name] = weight
    return out


def weights_text(weights: dict[str, float]) -> str:
    """``{"gold moon": 2.0}`` -> ``"gold moon=2"``: the Train form's class loss weights, one
    ``class=weight`` per entry, separated by ``;``."""
    return "; ".join(f"{c}={w:g}" for c, w in sorted(weights.items()))


def parse_weights_text(text: Any, classes: list[str] | None = None) -> dict[str, float]:
    """The Train form's ``class=weight; class=weight`` (``;`` or new lines between entries) as a
    dict; an entry without ``=``, a weight that is not a number above 0 or (with ``classes``) a class
    the set lacks is refused in words."""
    out = {}
    for part in str(text or "").replace("\n", ";").split(";"):
        if not part.strip():
            continue
        name, sep, raw = part.rpartition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"class loss weight {part.strip()!r}: write class=weight with a weight above 0, "
                             "e.g. 'gold moon=2', entries separated by ';'")
        out[name.strip()] = weight
    unknown = sorted(set(out) - set(classes)) if classes is not None else []
    if unknown:
        raise ValueError(f"class loss weights name class(es) {', '.join(map(repr, unknown))} that the loaded set "
                         "does not have (the Data tab lists its classes)")
    return out


def class_table_view(table: pd.DataFrame, ds: Any) -> pd.DataFrame:
    """The Data tab's images-per-class table with, for a set whose config gives them, each class's
    ``repeats`` and ``share of draws %`` under them."""
    weights = getattr(ds, "class_weights", None) or {}
    if not weights:
        return table
    view = table.copy()
    view["repeats"] = [repeats_text(weights.get(s)) for s in view["subject"]]
    view["share of draws %"] = [round(100 * weights[s]["share"], 1) if s in weights else None for s in view["subject"]]
    return view


def balance_label(train_cfg: Any) -> str:
    """What a run's record says of its class balance, for its label in Compare (``", your repeats"``,
    ``", your loss weights"``, ``", loss beta 0.5"``; "" for the method's own batches)."""
    cfg = train_cfg if isinstance(train_cfg, dict) else {}
    parts = ["your repeats"] if cfg.get("balance") == "from-data" else []
    if cfg.get("class_loss_weights"):
        parts.append("your loss weights")
    if cfg.get("class_loss_beta"):
        parts.append(f"loss beta {cfg['class_loss_beta']:g}")
    return "".join(f", {p}" for p in parts)
