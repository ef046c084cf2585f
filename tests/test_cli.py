"""Command line: every command has --help, and the main commands run end to end on small inputs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pogdiff.cli import build_parser, main
from pogdiff.config import PsiConfig
from tests.conftest import SMALL_SPEC

BENCHMARKS = ["speed", "quality", "report", "combine", "tune", "knn", "sampling", "data", "metrics", "gpu", "train-tab", "judge", "load"]
COMMANDS = [
    ["data", "demo"], ["data", "stats"], ["train"], ["sample"], ["export"],
    ["build", "base"], ["build", "evaluator"], *(["bench", name] for name in BENCHMARKS),
]
PACKAGE = Path(__file__).resolve().parent.parent / "pogdiff"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*command, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "pogdiff", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "bench" in out.stdout


def test_bench_help_lists_every_benchmark():
    out = subprocess.run([sys.executable, "-m", "pogdiff", "bench", "--help"], capture_output=True, text=True,
                         check=True)
    listed = out.stdout[out.stdout.index("{") + 1: out.stdout.index("}")].split(",")
    assert sorted(listed) == sorted(BENCHMARKS)
    assert all(f"\n    {name} " in out.stdout for name in BENCHMARKS)  # each with its one-line help


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b`` gives
    ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_only_the_cli_and_the_benchmarks_import_the_bench_package():
    bench = PACKAGE / "bench"
    assert (bench / "__init__.py").is_file()
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "cli.py" or bench in path.parents:
            continue
        hits = {m for m in _imports(path) if m == "pogdiff.bench" or m.startswith("pogdiff.bench.")}
        if hits:
            offenders[str(path.relative_to(PACKAGE.parent))] = sorted(hits)
    assert offenders == {}, f"only pogdiff/cli.py and pogdiff/bench/ may import pogdiff.bench: {offenders}"


def test_data_stats_prints_the_long_tail(small_demo, tmp_path, capsys):
    plot = tmp_path / "tail.png"
    assert main(["data", "stats", str(small_demo / "train"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"): out.index("}") + 1])
    assert summary["n_images"] == sum(_counts())
    assert Image.open(plot).size[0] > 100


def _counts():
    from pogdiff.data.demo import long_tail_counts

    return long_tail_counts(SMALL_SPEC)


def test_bad_source_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


def test_train_then_sample_with_fixed_seeds_is_reproducible(small_demo, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(small_demo / "train"), "--run-dir", str(run), "--method", "pogdiff",
            "--steps", "2", "--batch-size", "4", "--base", "none"]
    assert main(args) == 0
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    sample = ["sample", "--checkpoint", str(run), "--prompt", "a photo of someone", "--seeds", "1", "2",
              "--sample-steps", "2", "--scale", "1"]
    assert main([*sample, "--out", str(a)]) == 0
    assert main([*sample, "--out", str(b)]) == 0
    assert Image.open(a).tobytes() == Image.open(b).tobytes()
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(next(run.glob("checkpoint-*"))), "--out", str(export)]) == 0
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(export / "unet")
    assert unet.config.sample_size == 32


def test_psi_options_map_onto_the_config():
    from pogdiff.cli import configs_from_args

    _, default = configs_from_args(build_parser().parse_args(["train", "--run-dir", "r"]))
    assert default.psi == PsiConfig() and default.method == "pogdiff" and default.balanced_sampling is None
    _, cfg = configs_from_args(build_parser().parse_args(
        ["train", "--run-dir", "r", "--neighbour-pool", "other_class", "--psi-schedule", "gaussian",
         "--psi-max", "2", "--k", "7", "--no-image-sim", "--balanced-sampling"]))
    assert cfg.psi.pool == "other_class" and cfg.psi.schedule == "gaussian"
    assert cfg.psi.psi_max == 2.0 and cfg.psi.k == 7 and cfg.balanced_sampling is True
    assert cfg.psi.use_image_sim is False and cfg.psi.use_density is True
