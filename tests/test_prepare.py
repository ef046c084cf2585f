"""One preparation path (pogdiff/method/prepare.py): the Neighbours tab shows the psi training uses,
captions are encoded once, and the neighbour table is cached by content."""

from __future__ import annotations

import numpy as np
import pytest

from pogdiff.config import ModelConfig, PsiConfig
from tests.fakes import TOKEN_DIM, HashEncoder


class CountingEncoder(HashEncoder):
    def encode(self, captions):
        self.seen = getattr(self, "seen", 0) + len(captions)
        return super().encode(captions)


@pytest.fixture
def studio_and_key(tmp_path):
    from pogdiff import ui
    from tests.fakes import tiny_set

    encoder = CountingEncoder()
    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu", view_encoder=encoder)
    folder = tiny_set(tmp_path / "set", {"Ann Lee": 6, "Bo Chan": 3, "Cy Dee": 2})
    key = studio.data.load_upload([str(p) for p in sorted(folder.iterdir())], progress=lambda *a, **k: None)[0]
    return studio, key, encoder


def _tables_equal(a, b) -> None:
    for name in ("indices", "s_txt", "s_img", "w_density", "psi", "probs", "delta2"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_the_neighbours_tab_shows_the_table_training_builds(studio_and_key):
    from pogdiff.model.models import build_tiny
    from pogdiff.method.prepare import prepare_data

    studio, key, encoder = studio_and_key
    psi = PsiConfig(k=4, psi_max=2.0, pool="other_class")
    head, frame, _ = studio.neighbours.neighbours_of(key, 0, psi.k, psi.psi_max, psi.pool)
    shown = studio.neighbours.psi_table(studio.datasets.bundle(key), psi)
    bundle = studio.datasets.bundle(key)
    model = build_tiny(ModelConfig(block_out_channels=(8, 16, 32), resolution=32, cross_attention_dim=TOKEN_DIM),
                       text_encoder=encoder)
    seen = encoder.seen
    data = prepare_data(bundle.ds, model, psi, cache_dir=studio.runs_dir / "cache")
    assert encoder.seen == seen  # training read the captions the Neighbours tab encoded: encoded once
    _tables_equal(data.table, shown)
    assert frame["psi"].tolist() == [float(f"{v:.3g}") for v in shown.psi[0] if v == v][:len(frame)]


def test_neighbour_table_cache_round_trip_and_bad_file(tmp_path, caplog):
    from pogdiff.method import prepare
    from pogdiff.method.neighbours import image_features

    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(12, 8)).astype(np.float32)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    images = rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    feats = image_features(images)
    subjects = ["a"] * 6 + ["b"] * 4 + ["c"] * 2
    psi = PsiConfig(k=3, schedule="constant")
    built = prepare.neighbour_table(pooled, feats, psi, subjects, cache_dir=tmp_path)
    files = list(tmp_path.glob("neighbours-*.npz"))
    assert len(files) == 1
    again = prepare.neighbour_table(pooled, feats, psi, subjects, cache_dir=tmp_path)
    _tables_equal(again, built)
    assert again.config == built.config
    other = prepare.neighbour_table(pooled, feats, PsiConfig(k=3, psi_max=3.0, schedule="constant"), subjects,
                                    cache_dir=tmp_path)
    assert len(list(tmp_path.glob("neighbours-*.npz"))) == 2 and not np.array_equal(other.psi, built.psi)
    files[0].write_bytes(b"not a zip")
    rebuilt = prepare.neighbour_table(pooled, feats, psi, subjects, cache_dir=tmp_path)
    _tables_equal(rebuilt, built)
    assert "unreadable neighbour table cache" in caplog.text


def test_k_is_capped_at_the_set_size(tmp_path):
    from pogdiff.method import prepare

    pooled = np.eye(3, dtype=np.float32)
    table = prepare.neighbour_table(pooled, None, PsiConfig(k=10, use_image_sim=False, schedule="constant"),
                                    ["a", "a", "b"])
    assert table.indices.shape == (3, 2) and table.config.k == 2


def test_sd15_view_falls_back_to_tiny_without_a_gpu(studio_and_key):
    studio, key, _ = studio_and_key
    assert studio.neighbours.view_preset("sd15") == "tiny" and studio.neighbours.view_preset(None) == "tiny"
    *_, banner = studio.neighbours.neighbour_map(key, "shot bucket", "sd15", progress=lambda *a, **k: None)
    assert "for the **tiny** preset" in banner
