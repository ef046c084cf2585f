"""PoGDiff Studio: the Gradio app.

This file assembles the page: the Blocks with its theme and CSS, the state the tabs share, and the
four tabs, each laid out and bound to its controller by its own module (``pogdiff.ui.data_tab``,
``neighbours_tab``, ``train_tab``, ``compare_tab``). The controllers and the services they share are made
by :class:`pogdiff.ui.Studio`. Nothing heavy happens at import time: the demo set, the text encoder and
the models are built on first use.

    python app.py                      # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 7860 --runs-dir runs --max-upload-mb 500 --max-job-minutes 60
    python app.py --max-visitors 24 --generation-concurrency 1 --upload-store-mb 2000   # a shared server's quotas

Security model (README "Limits and safety"): every endpoint checks its inputs on the server, no
request value is used as a path, only files a response returns are served, and a training job
belongs to the session that started it unless the server is single-user (the default on localhost).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

# Offline-safe: no telemetry, no version check. Must be set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from pogdiff.server import quotas  # noqa: E402
from pogdiff.config import LIMITS  # noqa: E402
from pogdiff.ui import Studio, compare_tab, data_tab, neighbours_tab, sessions, train_tab  # noqa: E402
from pogdiff.ui.shared import Shared  # noqa: E402

TITLE = "PoGDiff Studio"
DEFAULT_MAX_UPLOAD_MB = 500
DEFAULT_CONCURRENCY = 2
QUEUE_SIZE = quotas.QUOTAS.queue_size
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

CSS = """
.pg-progress {margin: 4px 0 8px 0;}
.pg-progress-track {height: 12px; background: var(--neutral-200); border-radius: 6px; overflow: hidden;}
.pg-progress-fill {height: 100%; transition: width .4s ease;}
.pg-progress-label {font-size: var(--text-sm); margin-top: 4px; color: var(--body-text-color-subdued);}
.pixelated img, .pixelated canvas {image-rendering: pixelated;}
.explain {color: var(--body-text-color-subdued); font-size: var(--text-md);}
#pg-header h1 {margin-bottom: 0;}
#pg-report table {display: block; overflow-x: auto; table-layout: auto;}
#pg-report th:nth-child(-n+2), #pg-report td:nth-child(-n+2) {white-space: nowrap; min-width: 5.5em;}
#pg-report th:nth-child(3), #pg-report td:nth-child(3) {min-width: 8em; overflow-wrap: anywhere;}
#pg-report th:nth-child(n+4), #pg-report td:nth-child(n+4) {min-width: 12em;}
#pg-map-points th, #pg-map-points th * {white-space: nowrap; word-break: keep-all; overflow-wrap: normal;}
"""

INTRO = """# PoGDiff Studio
Fine-tune a text-to-image diffusion model on **imbalanced** image–text data with the
**PoGDiff** objective (product of Gaussians with a neighbouring caption's prediction), and see
whether prompts of *rare* subjects come out better than with plain fine-tuning.
Work left to right: **Data → Neighbours → Train → Compare**."""


def build_demo(studio: Studio | None = None) -> gr.Blocks:
    """The four tabs, laid out and bound to the controllers of ``studio`` (a fresh :class:`Studio` by default)."""
    studio = studio or Studio()
    max_age_s = int(3600 * studio.limits.upload_max_age_hours)
    # Uploads and generated files in gradio's cache expire: swept hourly, deleted once older than max_age_s.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(min(3600, max_age_s), max_age_s)) as demo:
        shared = Shared.create(demo, studio.browser_secret())
        gr.Markdown(INTRO, elem_id="pg-header")
        with gr.Tabs():  # left to right: Data -> Neighbours -> Train -> Compare
            data_tab.build(studio.data, shared)
            neighbours_tab.build(studio.neighbours, shared)
            train_tab.build(studio.train, studio.train_runs, shared)
            compare_tab.build(studio.compare, studio.metrics, shared)
        sessions.build(studio.sessions, shared)  # the usage panel; a closed tab frees its visitor's data
    return demo


def server_address(environ=os.environ) -> tuple[str, int]:
    """Default host and port: ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` when set, else
    0.0.0.0 on a Hugging Face Space (``SPACE_ID`` set) or 127.0.0.1, and port 7860."""
    host = environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if environ.get("SPACE_ID") else "127.0.0.1")
    raw = environ.get("GRADIO_SERVER_PORT") or "7860"
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"GRADIO_SERVER_PORT={raw!r} is not a port number; set it to e.g. 7860 or unset it") from None
    if not 0 < port < 65536:
        raise ValueError(f"GRADIO_SERVER_PORT={port} is out of range; use 1-65535")
    return host, port


def launch_options(studio: Studio, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> dict:
    """Keyword arguments of ``Blocks.launch`` shared by ``__main__`` and the tests."""
    # No allowed_paths: gradio serves only its own cache, i.e. uploads and what a response returned
    # (an exported zip is copied to a fresh temp folder first). The runs folder is never served.
    return dict(
        max_file_size=f"{int(max_upload_mb)}mb",
        css=CSS,
        theme=gr.themes.Soft(primary_hue="blue", secondary_hue="slate"),
        show_error=True,
        footer_links=["api", "settings"],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    host, port = server_address()
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description=TITLE)
    p.add_argument("--host", default=host,
                   help="interface to listen on (default: $GRADIO_SERVER_NAME, else 0.0.0.0 on a Hugging Face "
                        "Space, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--runs-dir", default=os.environ.get("POGDIFF_RUNS_DIR", "runs"),
                   help="where training runs and their checkpoints are written")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest accepted upload")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="events of one kind that run at the same time (loading, neighbour maps); generation: "
                        "--generation-concurrency")
    p.add_argument("--max-job-minutes", type=float, default=LIMITS.max_job_minutes,
                   help="wall time of one training job; it then stops and keeps its checkpoint (0: no limit)")
    p.add_argument("--single-user", action=argparse.BooleanOptionalAction, default=None,
                   help="any visitor may stop and download any job (default: on for a localhost server "
                        "without --share, off otherwise, where a job belongs to the session that started it)")
    quotas.add_arguments(p)  # a shared server: visitors, queue, disk (README "Limits and safety")
    args = p.parse_args(argv)
    try:
        args.quotas = quotas.from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    if args.max_job_minutes < 0:
        p.error(f"--max-job-minutes must be >= 0 (0 = no limit), got {args.max_job_minutes:g}")
    if args.single_user is None:
        args.single_user = args.host in LOCAL_HOSTS and not args.share and not on_space
    return args


def main(argv: list[str] | None = None) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    limits = dataclasses.replace(LIMITS, max_job_minutes=args.max_job_minutes)
    studio = Studio(args.runs_dir, single_user=args.single_user, limits=limits, quotas=args.quotas)
    studio.datasets.clean_leftovers()
    logging.getLogger(__name__).info("single-user mode: %s; max job minutes: %g", args.single_user,
                                     args.max_job_minutes)
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.quotas.queue_size)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                **launch_options(studio, args.max_upload_mb))


if __name__ == "__main__":
    main()
