"""Is PoGDiff doing anything? The PoG share of the loss, the warning, and template captions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pogdiff.config import DataConfig, PsiConfig, TrainConfig, model_preset
from pogdiff.constants import DEFAULT_BASE
from pogdiff.data import load_image_text_set
from pogdiff.data.demo import RenderedSet, write_image_folder
from pogdiff.data.identities import make_identities, sample_attributes
from pogdiff.data.render import render
from pogdiff.method.objectives import (
    INACTIVE_POG_SHARE,
    POG_COMPARISON,
    TEMPERED_COMPARISON,
    UNMEASURED_POG_EFFECT,
    measured_pog_effect,
    pog_share,
    pogdiff_inactive_warning,
)
from pogdiff.training.records import StepInfo
from pogdiff.training.run import train

TEMPLATES = ("a photo of a {}", "a product photo of a {}", "a close-up photo of a {}",
             "a picture of a {}", "an image of a {}")


def _info(share: float, psi: float = 0.2) -> StepInfo:
    return StepInfo(step=1, max_steps=10, terms={"loss": 1.0}, lr=1e-4, psi_mean=psi, psi_active=0.5,
                    seconds_per_step=0.1, eta_seconds=1.0, pog_share=share)


def test_pog_share_is_the_pog_term_over_the_loss():
    assert pog_share({"loss": 2.0, "mse": 1.5, "pog": 0.5}) == pytest.approx(0.25)
    assert pog_share({"loss": 2.0, "mse": 2.0}) == 0.0
    assert pog_share({"loss": 0.0, "pog": 0.0}) == 0.0


def test_warning_only_when_the_pog_share_stays_below_one_percent():
    assert pogdiff_inactive_warning([0.0] * 3, [0.2] * 3) is None  # too early to judge
    quiet = pogdiff_inactive_warning([0.002] * 20, [0.2] * 20)
    assert quiet is not None and "behaves like plain fine-tuning" in quiet and "0.20% of the loss" in quiet
    assert "other_class" in quiet  # says what to change
    already = pogdiff_inactive_warning([0.002] * 20, [0.2] * 20, pool="other_class")
    assert "psi pool 'other_class'" not in already and "a larger psi_max" in already
    assert pogdiff_inactive_warning([INACTIVE_POG_SHARE * 2] * 20, [0.2] * 20) is None


def test_the_warning_quotes_the_measured_figures_of_the_quality_summary(tmp_path):
    """The figures come from the summary file, never from the code; without it, words without figures."""
    def comparison(ratio, low, high):
        return {"few": {"ratio_of_means": ratio, "bootstrap_ci95": [low, high]}}

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({
        "setA": {"comparisons": {POG_COMPARISON: comparison(1.123, 1.01, 1.2),
                                 TEMPERED_COMPARISON: comparison(1.5, 1.2, 1.9)}},
        "setB": {"comparisons": {POG_COMPARISON: comparison(0.98, 0.9, 1.05),
                                 TEMPERED_COMPARISON: comparison(1.25, 1.1, 1.4)}},
    }))
    said = pogdiff_inactive_warning([0.002] * 20, [0.2] * 20, summary_path=summary)
    assert "setA: +12.3% accuracy from the PoG term, +50.0% accuracy from the tempered batches" in said
    assert "setB: nothing measurable (-2.0% accuracy, its interval holds no change) from the PoG term" in said
    assert measured_pog_effect(tmp_path / "missing.json") == UNMEASURED_POG_EFFECT
    summary.write_text(json.dumps({"setA": {"comparisons": {}}}))
    assert measured_pog_effect(summary) == UNMEASURED_POG_EFFECT
    assert not any(c.isdigit() for c in UNMEASURED_POG_EFFECT)


@pytest.fixture(scope="module")
def template_set(tmp_path_factory):
    """Three subjects, four images each, captions that are template wordings of the subject's name."""
    people = make_identities(3, seed=11)
    labels = ("red fox", "snowy owl", "tabby cat")
    rng = np.random.default_rng(0)
    images, captions, subjects, attrs = [], [], [], []
    for person, label in zip(people, labels):
        for j in range(4):
            a = sample_attributes(rng)
            images.append(np.asarray(render(person, a, 32)))
            captions.append(TEMPLATES[j % len(TEMPLATES)].format(label))
            subjects.append(label)
            attrs.append(a)
    folder = tmp_path_factory.mktemp("templates") / "set"
    write_image_folder(folder, RenderedSet(np.stack(images), captions, subjects, attrs))
    return load_image_text_set(folder, DataConfig())


def _twenty_steps(dataset, tmp_path, psi: PsiConfig):
    cfg = TrainConfig(method="pogdiff", batch_size=6, max_steps=20, checkpoint_every=0, log_every=0,
                      warmup_steps=1, psi=psi)
    # The shipped base model conditions on captions; a random one predicts the same for any caption.
    return train(dataset=dataset, model_cfg=model_preset("tiny"), train_cfg=cfg, run_dir=tmp_path,
                 base_checkpoint=DEFAULT_BASE)


def test_template_captions_with_the_same_class_pool_get_the_warning(template_set, tmp_path):
    result = _twenty_steps(template_set, tmp_path, PsiConfig(pool="same_class"))
    shares = [h.pog_share for h in result.history]
    assert np.mean(shares) < INACTIVE_POG_SHARE
    assert len(result.warnings) == 1 and "behaves like plain fine-tuning" in result.warnings[0]


def test_template_captions_with_the_other_class_pool_borrow_across_subjects(template_set, tmp_path):
    result = _twenty_steps(template_set, tmp_path, PsiConfig(pool="other_class"))
    shares = [h.pog_share for h in result.history]
    assert np.mean(shares) > INACTIVE_POG_SHARE
    assert result.warnings == []


def test_train_tab_shows_pogdiff_activity_and_the_warning():
    from pogdiff.ui.views import pogdiff_activity_html

    assert pogdiff_activity_html([{"step": 1, "loss": 0.5, "mse": 0.5}]) == ""  # not a PoGDiff run
    busy = [{"step": s, "loss": 1.0, "mse": 0.9, "pog": 0.1, "pog_share": 0.1, "psi_mean": 0.3,
             "psi_active": 0.4} for s in range(20)]
    html = pogdiff_activity_html(busy)
    assert "mean psi 0.300" in html and "40% of rows" in html and "10.00% of the loss" in html
    assert "plain fine-tuning" not in html
    quiet = [dict(h, pog=0.001, pog_share=0.001) for h in busy]
    assert "behaves like plain fine-tuning" in pogdiff_activity_html(quiet)


def test_the_train_tab_warning_does_not_advise_the_pool_the_run_already_uses():
    """Regression: the progress panel advised the other-class pool to a run that used it already."""
    from pogdiff.runs.jobs import JobStatus
    from pogdiff.ui.views import progress_html

    quiet = [{"step": s, "loss": 1.0, "mse": 1.0, "pog": 0.001, "pog_share": 0.001, "psi_mean": 0.3,
              "psi_active": 0.4} for s in range(20)]
    for pool, advised in (("other_class", False), ("same_class", True)):
        status = JobStatus(state="running", run_name="r", method="pogdiff", step=20, max_steps=40,
                           history=quiet, pool=pool)
        html = progress_html(status)
        assert "behaves like plain fine-tuning" in html
        assert ("psi pool &#x27;other_class&#x27;" in html or "psi pool 'other_class'" in html) is advised, pool
