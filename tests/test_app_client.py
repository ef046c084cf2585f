"""End to end through gradio_client against the app launched in-process on 127.0.0.1.

Flow: demo set -> stats -> neighbours -> a few training steps (tiny config) -> export -> compare.
"""

from __future__ import annotations

import os
import zipfile

import pytest
from gradio_client import Client

import app
from pogdiff.ui import Studio
from tests.fakes import free_port

TRAIN_TIMEOUT = 420.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    studio = Studio(root / "runs", shipped_dir=root / "shipped", device="cpu")
    demo = app.build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(studio, 50))
    try:
        yield f"http://127.0.0.1:{port}/", studio
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[0], verbose=False)


def test_data_stats_and_neighbours(client):
    summary, report, table, long_tail, class_dd, gallery = client.predict(api_name="/load_demo")
    assert "images" in summary and "classes" in summary and "imbalance ratio" in summary
    assert "Validation passed" in report or "OK" in report
    headers = table["headers"]
    assert headers == ["subject", "count", "shot"]
    shots = {row[2] for row in table["data"]}
    assert shots == {"many", "medium", "few"}
    assert len(gallery) >= 2 and gallery[0]["caption"].startswith("a photo of")

    scatter, caption_dd, banner = client.predict("shot bucket", api_name="/neighbour_map")
    assert "built-in demo set" in banner
    row = 0
    head, nb_table, nb_gallery = client.predict(row, 5, 1.0, "same_class", api_name="/neighbours")
    assert "w_density" in head and "psi" in head
    assert {"s_txt", "s_img", "w_density", "psi", "informative"} <= set(nb_table["headers"])
    assert len(nb_table["data"]) == 5 and len(nb_gallery) == 6  # the query + its 5 neighbours
    # same-class neighbours are rewordings of the same person: never informative
    col = nb_table["headers"].index("informative")
    assert not any(r[col] for r in nb_table["data"]) and "No informative neighbour" in head
    head, nb_table, _ = client.predict(row, 5, 1.0, "other_class", api_name="/neighbours")
    query_subject = head.split("subject *", 1)[1].split("*", 1)[0]
    subj_col = nb_table["headers"].index("subject")
    assert len(nb_table["data"]) == 5 and all(r[subj_col] != query_subject for r in nb_table["data"])

    results, images = client.predict("a photo of someone smiling, wearing glasses", 4, api_name="/search")
    assert len(results["data"]) == 4 and "similarity" in results["headers"]

    with pytest.raises(Exception, match="Type a caption"):
        client.predict("   ", 4, api_name="/search")


def test_train_a_few_steps_export_and_compare(client, served):
    _, studio = served
    client.predict(api_name="/load_demo")
    options = dict(method="pogdiff", preset="tiny", pretrained="", steps=3, batch=4, lr=2e-4, psi_max=1.0,
                   k=5, use_density=True, use_image_sim=True, use_text_sim=True, pool="all",
                   sample_every=2, seed=0)
    out = client.predict(*options.values(), api_name="/start_training")
    assert "Training" in out[0] or "Finished" in out[0]

    # A second request while it runs is refused with a clear message.
    if studio.jobs.status().busy:
        with pytest.raises(Exception, match="already running"):
            client.predict(*options.values(), api_name="/start_training")

    # A fresh client (think: a page refresh or a second tab) re-attaches to the same job via /poll.
    md = Client(served[0], verbose=False).predict(api_name="/poll")[0]
    assert studio.jobs.status().run_name in md
    assert studio.jobs.wait(TRAIN_TIMEOUT).state == "finished", studio.jobs.status().error
    md, progress, loss, preview, runs = Client(served[0], verbose=False).predict(api_name="/poll")
    assert "Finished" in md, md
    assert "step 3 / 3" in progress
    assert {"loss", "mse"} <= {row[1] for row in loss["data"]}
    assert len(preview) == 4  # the four rarest classes' prompts
    run_name = studio.jobs.runs.list_runs()[0].name

    zip_path = client.predict(run_name, api_name="/export_run")
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    assert any(n.endswith("configs.json") for n in names) and any("unet" in n for n in names)

    key = f"run:{run_name}"
    pair, grid_a, grid_b, note = client.predict(
        key, key, ["a photo of Maya Sato"], "", 1, 3.0, 5, api_name="/compare"
    )
    assert len(pair) == 2 and all(os.path.exists(p) for p in pair)
    assert os.path.exists(grid_a) and os.path.exists(grid_b)
    assert "seed" in note
    # Same checkpoint, same prompt, same seed: the same picture.
    from PIL import Image
    import numpy as np

    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in pair)
    assert np.array_equal(a, b)


def test_errors_reach_the_client_and_the_server_keeps_serving(client):
    with pytest.raises(Exception, match="Learning rate must be positive"):
        client.predict("pogdiff", "tiny", "", 3, 4, 0.0, 1.0, 5, True, True, True, "all", 0, 0,
                       api_name="/start_training")
    with pytest.raises(Exception, match="not available|Pick two"):
        client.predict("run:nope", "run:nope", ["a photo of x"], "", 1, 3.0, 5, api_name="/compare")
    md = client.predict(api_name="/poll")[0]
    assert isinstance(md, str)


def test_readme_api_example_runs_against_a_live_app(tmp_path):
    """The README's gradio_client script, run as written (only the URL changes), with the
    shipped checkpoints, so the documented API cannot drift from the app."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    studio = Studio(tmp_path / "runs", device="cpu")  # the shipped checkpoints of the repository
    demo = app.build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(studio, 50))
    try:
        script = code.replace("http://127.0.0.1:7860/", f"http://127.0.0.1:{port}/")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    finally:
        demo.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Finished" in proc.stdout and "seed" in proc.stdout.lower()


def test_a_flat_kohya_tag_zip_through_the_api_and_another_class_source(served, tmp_path):
    from gradio_client import handle_file

    from tests.fakes import SHAPES, kohya_zip

    client = Client(served[0], verbose=False)  # a session of its own: the other tests keep theirs
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in endpoints["/load_upload"]["parameters"]] == ["files", "class_source"]
    assert [p["parameter_name"] for p in endpoints["/class_source"]["parameters"]] == ["class_source"]
    assert [p["parameter_name"] for p in endpoints["/start_training"]["parameters"]][-5:] == \
        ["run_name", "from_scratch", "base", "balance", "loss_weights"]
    summary, report, table, *_ = client.predict([handle_file(str(kohya_zip(tmp_path / "shapes.zip")))],
                                                api_name="/load_upload")
    assert {row[0]: row[1] for row in table["data"]} == SHAPES and "**Classes from:** first tag (auto:" in summary
    assert "classes_clustered" not in report
    with pytest.raises(Exception, match="does not read"):
        client.predict("template", api_name="/class_source")
    summary, _, table, *_ = client.predict("first_tag", api_name="/class_source")
    assert {row[0]: row[1] for row in table["data"]} == SHAPES and "(chosen: first tag)" in summary
