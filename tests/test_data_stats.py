import numpy as np
import pytest
from PIL import Image

from pogdiff.config import DataConfig
from pogdiff.data.loader import ImageTextSet, Sample
from pogdiff.data.stats import SHOT_COLOURS, class_table, long_tail_figure, shot_bucket, summary
from pogdiff.data.validation import ValidationReport

SUBJECTS = ["a"] * 30 + ["b"] * 21 + ["c"] * 20 + ["d"] * 5 + ["e"] * 4 + ["f"] * 1 + ["g"]


@pytest.mark.parametrize("count,bucket", [(1, "few"), (4, "few"), (5, "medium"), (20, "medium"), (21, "many")])
def test_shot_bucket_default_edges(count, bucket):
    assert shot_bucket(count) == bucket


def test_shot_bucket_is_configurable():
    cfg = DataConfig(many_shot_above=10, few_shot_below=3)
    assert [shot_bucket(n, cfg) for n in (2, 3, 10, 11)] == ["few", "medium", "medium", "many"]


def test_class_table_sorted_by_count_then_name():
    table = class_table(SUBJECTS)
    assert list(table.columns) == ["subject", "count", "shot"]
    assert table["subject"].tolist() == ["a", "b", "c", "d", "e", "f", "g"]
    assert table["count"].tolist() == [30, 21, 20, 5, 4, 1, 1]
    assert table["shot"].tolist() == ["many", "many", "medium", "medium", "few", "few", "few"]


def test_summary_numbers():
    assert summary(SUBJECTS) == {
        "n_images": 82, "n_classes": 7, "imbalance_ratio": 30.0,
        "n_many": 2, "n_medium": 2, "n_few": 3, "single_image_classes": ["f", "g"],
    }


def test_summary_accepts_an_image_text_set():
    samples = [Sample(f"{i}.png", "a photo of x", s) for i, s in enumerate(["x", "x", "y"])]
    ds = ImageTextSet("set", samples, np.zeros((3, 4, 4, 3), np.uint8), ValidationReport(), "column")
    out = summary(ds)
    assert (out["n_images"], out["n_classes"], out["imbalance_ratio"]) == (3, 2, 2.0)
    assert out["single_image_classes"] == ["y"]


def test_empty_and_bad_inputs():
    assert summary([])["n_classes"] == 0 and summary([])["imbalance_ratio"] == 0.0
    with pytest.raises(TypeError, match="single string"):
        class_table("abc")


def test_long_tail_figure_colours_and_png(tmp_path):
    table = class_table(SUBJECTS)
    fig = long_tail_figure(table, tmp_path / "tail.png", log_y=True)
    ax = fig.axes[0]
    colours = [tuple(np.round(p.get_facecolor()[:3], 3)) for p in ax.patches]
    expected = [SHOT_COLOURS[s] for s in table["shot"]]
    from matplotlib.colors import to_rgb
    assert colours == [tuple(np.round(to_rgb(c), 3)) for c in expected]
    assert [p.get_height() for p in ax.patches] == table["count"].tolist()
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["many-shot (2)", "medium-shot (2)", "few-shot (3)"]
    with Image.open(tmp_path / "tail.png") as im:
        assert im.format == "PNG" and im.width >= 600


def test_long_tail_figure_many_classes_hides_labels():
    fig = long_tail_figure(class_table([str(i) for i in range(60) for _ in range(i % 7 + 1)]))
    assert fig.axes[0].get_xticks().size == 0
    assert fig.axes[0].get_xlabel() == "60 classes, sorted by count"
