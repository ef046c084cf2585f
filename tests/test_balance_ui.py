"""A kohya tree through the Studio: the Data tab's table with repeats, the Balancing panel, the Train
form's Class balance and Class loss weights, and the runs' labels in Compare."""

from __future__ import annotations

import zipfile

import gradio as gr
import pandas as pd
import pytest

from pogdiff import ui
from pogdiff.runs.jobs import JobManager
from tests.fakes import FakeTrain, noop_progress, train_form
from tests.test_trainer_configs import SHAPES, kohya_tree


def kohya_zip_of(tmp_path):
    root = kohya_tree(tmp_path / "tree")
    out = tmp_path / "kohya.zip"
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(root).as_posix())
    return out


@pytest.fixture()
def studio_with_kohya(tmp_path):
    fake = FakeTrain()
    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped",
                       jobs=JobManager(tmp_path / "runs", train_fn=fake), device="cpu")
    out = studio.data.load_upload([str(kohya_zip_of(tmp_path))], progress=noop_progress)
    return studio, out, fake


def test_the_upload_answers_with_classes_without_the_prefix_their_images_and_repeats(studio_with_kohya):
    _, (key, headline, report, table, *_), _ = studio_with_kohya
    rows = {r["subject"]: r for r in table.to_dict("records")}
    assert {c: (r["count"], r["repeats"]) for c, r in rows.items()} == {c: (n, str(r)) for c, (n, r) in SHAPES.items()}
    assert rows["gold moon"]["share of draws %"] == pytest.approx(round(100 * 26 / 57, 1))
    assert "kohya folders" in headline


def test_the_balancing_panel_and_loss_weights_for_the_train_form(studio_with_kohya):
    studio, (key, *_), _ = studio_with_kohya
    note, frame, editor = studio.data.balance.class_balance(key)
    assert "Your balancing" in note and "gold moon" in note
    assert set(frame["class"]) == set(SHAPES) and list(editor.columns) == ["class", "loss weight"]
    edited = editor.copy()
    edited.loc[edited["class"] == "gold moon", "loss weight"] = 2.0
    text, frame, said = studio.data.balance.use_loss_weights(key, edited)
    assert text == "gold moon=2" and "gold moon=2" in said
    assert frame.set_index("class").loc["gold moon", "loss weight"] == 2.0
    with pytest.raises(gr.Error, match="must be a number above 0"):
        studio.data.balance.use_loss_weights(key, pd.DataFrame({"class": ["gold moon"], "loss weight": [-1]}))
    _, frame, editor = studio.data.balance.class_balance(key, "gold moon=3")  # the Train form's text fills it
    assert editor.set_index("class").loc["gold moon", "loss weight"] == 3.0


def test_your_repeats_from_the_train_form_reach_the_run_and_come_back(studio_with_kohya):
    studio, (key, *_), fake = studio_with_kohya
    studio.train.start_run(key, train_form(method="baseline", balance="from-data", loss_weights="gold moon=2",
                                           run_name="repeats", sample_every=0))
    studio.jobs.wait(10)
    cfg = fake.kwargs["train_cfg"]
    assert cfg.balance == "from-data" and cfg.class_loss_weights == {"gold moon": 2.0}
    assert cfg.class_draw_weights == {c: float(n * r) for c, (n, r) in SHAPES.items()}
    restored = dict(zip(ui.TrainForm.RESTORED, studio.train_runs.restore_train_form()))
    assert (restored["balance"], restored["loss_weights"]) == ("from-data", "gold moon=2")
    label = next(s.label for s in studio.sources.all() if s.key == "run:repeats")
    assert "baseline, your repeats, your loss weights" in label


def test_the_train_form_refuses_repeats_a_set_lacks_and_unknown_classes(studio_with_kohya, small_demo):
    studio, (key, *_), _ = studio_with_kohya
    with pytest.raises(gr.Error, match="no class|does not have"):
        studio.train.checked_setup(key, train_form(loss_weights="purple hexagon=2"), None)
    with pytest.raises(gr.Error, match="write class=weight"):
        studio.train.checked_setup(key, train_form(loss_weights="gold moon"), None)
    with pytest.raises(gr.Error, match="Class balance must be one of"):
        studio.train.checked_setup(key, train_form(balance="kohya"), None)
    demo_key = studio.data.load_demo(progress=noop_progress)[0]
    with pytest.raises(gr.Error, match="this set has none: load kohya"):
        studio.train.checked_setup(demo_key, train_form(balance="from-data"), None)


def test_a_kohya_zip_through_the_api(tmp_path):
    """The API: /load_upload answers with the classes without the prefix, their images and repeats;
    /class_balance with the shares and the note; /use_loss_weights with the Train form's text."""
    from gradio_client import Client, handle_file

    import app
    from tests.fakes import free_port

    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    demo = app.build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(studio, 50))
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        summary, report, table, *_ = client.predict([handle_file(str(kohya_zip_of(tmp_path)))], api_name="/load_upload")
        col = {h: i for i, h in enumerate(table["headers"])}
        got = {r[col["subject"]]: (r[col["count"]], r[col["repeats"]]) for r in table["data"]}
        assert got == {c: (n, str(r)) for c, (n, r) in SHAPES.items()}
        note, shares, editor = client.predict("", api_name="/class_balance")
        assert "Your balancing" in note
        col = {h: i for i, h in enumerate(shares["headers"])}
        yours = {r[col["class"]]: r[col["your repeats %"]] for r in shares["data"]}
        assert yours["gold moon"] == pytest.approx(round(100 * 26 / 57, 1))
        rows = [[c, 2.0 if c == "gold moon" else 1.0] for c, _ in editor["data"]]
        text, *_ = client.predict({"headers": editor["headers"], "data": rows}, api_name="/use_loss_weights")
        assert text == "gold moon=2"
        client.close()
    finally:
        demo.close()
