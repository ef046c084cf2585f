"""What ``bench report`` prints and the figures of ``bench quality`` (BENCHMARKS.md "Quality"):
markdown tables of ``summary.json`` and ``budget.json``, the default recipe's targets, the budget
curve and the few-shot grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TARGET_FEW_RATIO = 1.5  # the fidelity target: PoGDiff few-shot accuracy >= 1.5x plain fine-tuning


def _mean_std(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


METHOD_COLUMNS = (("few-shot acc", "few_acc"), ("medium acc", "medium_acc"), ("many-shot acc", "many_acc"),
                  ("few copy", "few_copy"), ("few proximity", "few_proximity"), ("few coverage", "few_coverage"),
                  ("few gRecall", "few_grecall"), ("FD all", "all_fd"))


def _methods_table(methods: dict) -> list[str]:
    lines = ["| recipe | " + " | ".join(h for h, _ in METHOD_COLUMNS) + " |",
             "|---|" + "---:|" * len(METHOD_COLUMNS)]
    for method, m in methods.items():
        lines.append(f"| {method} | " + " | ".join(_mean_std(m.get(k, [])) for _, k in METHOD_COLUMNS) + " |")
    return lines


def _comparisons_table(comps: dict) -> list[str]:
    lines = ["| comparison | bucket | paired ratio per seed | ratio of class means [95% bootstrap CI over classes] | "
             "± | 95% CI over seeds and classes | every seed > 1 | copy difference | generation shift |",
             "|---|---|---|---|---:|---|---|---:|---:|"]
    for name, comp in comps.items():
        for bucket, c in comp.items():
            ratios = ", ".join("—" if r is None else f"{r:.2f}" for r in c["paired_ratio"])
            ci = c.get("bootstrap_ci95", [None, None])
            rom = c.get("ratio_of_means")
            interval = ("—" if rom is None else
                        f"{rom:.2f} [{'—' if ci[0] is None else f'{ci[0]:.2f}'}, "
                        f"{'—' if ci[1] is None else f'{ci[1]:.2f}'}]")
            half = c.get("ci_half_width_relative")
            copy, shift = c.get("copy_difference"), c.get("generation_shift")
            hier = c.get("hierarchical_ci95")
            hier = "—" if not hier or None in hier else f"[{hier[0]:.2f}, {hier[1]:.2f}]"
            lines.append(f"| {name.replace('_vs_', ' vs ')} | {bucket} | {ratios} | {interval} | "
                         f"{'—' if half is None else f'{100 * half:.0f}%'} | {hier} | "
                         f"{'yes' if c['every_seed_above_1'] else 'no'} | {'—' if copy is None else f'{copy:+.3f}'} | "
                         f"{'—' if shift is None else f'{shift:.3f}'} |")
    return lines


TARGET_MANY_POINTS = 0.02  # many-shot accuracy within 2 points of plain fine-tuning
TARGET_POG_RATIO = 1.05  # the PoG term's own few-shot effect over its ablation (paired seeds)


def target_checks(block: dict, recipe: str = "pogdiff") -> list[dict]:
    """The default recipe's targets (README "Results") judged on one set's ``summary.json`` block:
    few-shot accuracy >= 1.5x plain and above resampling and CBDM (ratio of class means and its
    interval), copy rate below resampling's, many-shot accuracy within 2 points of plain, the PoG
    term's own contribution (>= 1.05x its paired ablation, the interval over seeds and classes above
    1) and few-shot accuracy at least T2H's."""
    methods, comps = block["methods"], block.get("comparisons", {})

    def mean(name: str, key: str) -> float | None:
        values = [v for v in methods.get(name, {}).get(key, []) if v is not None]
        return float(np.mean(values)) if values else None

    def ratio(other: str, bucket: str = "few") -> dict:
        return comps.get(f"{recipe}_vs_{other}", {}).get(bucket, {})

    checks = []
    r = ratio("baseline")
    checks.append({"target": "few-shot acc >= 1.5x plain", "value": r.get("ratio_of_means"),
                   "interval": r.get("bootstrap_ci95"),
                   "met": None if r.get("ratio_of_means") is None else r["ratio_of_means"] >= TARGET_FEW_RATIO})
    for other in ("resample", "cbdm"):
        r = ratio(other)
        ci = r.get("bootstrap_ci95") or [None, None]
        checks.append({"target": f"few-shot acc above {other}", "value": r.get("ratio_of_means"), "interval": ci,
                       "met": None if ci[0] is None else ci[0] > 1.0})
    a, b = mean(recipe, "few_copy"), mean("resample", "few_copy")
    checks.append({"target": "few-shot copy rate below resample's", "value": a, "interval": None, "reference": b,
                   "met": None if a is None or b is None else a < b})
    a, b = mean(recipe, "many_acc"), mean("baseline", "many_acc")
    checks.append({"target": "many-shot acc within 2 points of plain", "value": a, "interval": None, "reference": b,
                   "met": None if a is None or b is None else a >= b - TARGET_MANY_POINTS})
    r = comps.get(f"{recipe}_vs_{recipe}_no_pog", {}).get("few", {})
    ci = r.get("hierarchical_ci95") or r.get("bootstrap_ci95") or [None, None]
    checks.append({"target": f"PoG term's own effect: few-shot >= {TARGET_POG_RATIO:g}x the same recipe without it, "
                             "interval (seeds and classes) above 1",
                   "value": r.get("ratio_of_means"), "interval": ci,
                   "met": None if ci[0] is None or r.get("ratio_of_means") is None
                   else (r["ratio_of_means"] >= TARGET_POG_RATIO and ci[0] > 1.0)})
    r = ratio("t2h")
    checks.append({"target": "few-shot acc at least T2H's", "value": r.get("ratio_of_means"),
                   "interval": r.get("hierarchical_ci95") or r.get("bootstrap_ci95"),
                   "met": None if r.get("ratio_of_means") is None else r["ratio_of_means"] >= 1.0})
    return checks


def _checks_table(checks: list[dict]) -> list[str]:
    lines = ["| target | value | interval or reference | met? |", "|---|---:|---|---|"]
    for c in checks:
        value = "—" if c["value"] is None else f"{c['value']:.3f}"
        if c.get("interval") and None not in c["interval"]:
            extra = f"[{c['interval'][0]:.2f}, {c['interval'][1]:.2f}]"
        elif c.get("reference") is not None:
            extra = f"reference {c['reference']:.3f}"
        else:
            extra = "—"
        met = "not measured" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['target']} | {value} | {extra} | {met} |")
    return lines


def summary_markdown(summary: dict) -> str:
    """Markdown tables of ``summary.json``: per set, each recipe's bucket metrics (mean ± sample
    std over seeds) and the paired comparisons (README "Results")."""
    lines = []
    for data, block in summary.items():
        lines += [f"### {data} ({block['steps']} steps, batch {block.get('batch_size', '?')}, seeds {block['seeds']}, "
                  f"{block.get('n_eval_captions', '?')} captions x {block.get('sample_seeds', 1)} sampling seeds)", ""]
        lines += _methods_table(block["methods"])
        if block.get("comparisons"):
            lines += [""] + _comparisons_table(block["comparisons"])
        if "pogdiff" in block["methods"]:
            lines += ["", "Targets of the default recipe (`pogdiff`):", ""] + _checks_table(target_checks(block))
        lines.append("")
    return "\n".join(lines)


def budget_markdown(curves: dict) -> str:
    """Markdown of ``budget.json``: per set, few / medium / many-shot accuracy and few-shot copy rate
    of every recipe at every budget (mean ± std over seeds)."""
    lines = []
    for data, curve in curves.items():
        budgets = curve["budgets"]
        lines += [f"### {data}: accuracy along the budget (seeds {curve['seeds']})", "",
                  "| recipe | bucket | " + " | ".join(f"{b} steps" for b in budgets) + " |",
                  "|---|---|" + "---:|" * len(budgets)]
        methods = list(curve["by_budget"][str(budgets[0])]["methods"])
        for method in methods:
            for key in ("few_acc", "medium_acc", "many_acc", "few_copy"):
                cells = [_mean_std(curve["by_budget"][str(b)]["methods"].get(method, {}).get(key, [])) for b in budgets]
                lines.append(f"| {method} | {key} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def budget_figure(long: pd.DataFrame, *, path: Path, title: str = "") -> Path:
    """Accuracy per bucket (few, medium, many) against fine-tuning steps, one line per recipe,
    mean over seeds with the seeds' min-max as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, bucket in zip(axes, ("few", "medium", "many")):
        part = long[(long["bucket"] == bucket) & long["accuracy"].notna()]
        ax.set_title(f"{title} {bucket}-shot".strip())
        ax.set_xlabel("fine-tuning steps")
        if part.empty:
            ax.text(0.5, 0.5, "no classes", ha="center", va="center", transform=ax.transAxes)
            continue
        for method, rows in part.groupby("method", sort=False):
            g = rows.groupby("steps")["accuracy"]
            x = g.mean().index.values
            ax.plot(x, g.mean().values, marker="o", label=method)
            ax.fill_between(x, g.min().values, g.max().values, alpha=0.15)
        ax.set_xscale("log")
        budgets = sorted(part["steps"].unique())
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("identity accuracy")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def few_shot_grids(out: Path, eval_set, grids: dict[str, np.ndarray], counts: dict[str, int]) -> None:
    from pogdiff.data.stats import shot_bucket
    from pogdiff.model.sampling import image_grid

    rows = [i for i, s in enumerate(eval_set.subjects) if shot_bucket(counts.get(s, 0)) == "few"]
    if not rows:
        return
    for method, images in grids.items():
        labels = [f"{eval_set.subjects[i]}" for i in rows]
        image_grid(images[rows], ncols=8, labels=labels, scale=2).save(out / f"few_shot_{method}.png")
