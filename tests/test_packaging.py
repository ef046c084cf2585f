"""Packaging and Space readiness: the wheel and its console script, the requirements split, the
Space front matter, Git LFS rules, no local paths in shipped files, server address from the
environment, and the ZeroGPU wrapping of Compare's events."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import types
import zipfile
from pathlib import Path

import pytest
import yaml

import app
from pogdiff.ui import compare_tab

REPO = Path(__file__).resolve().parent.parent
HUB_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
SHORT_DESCRIPTION_MAX = 60


def _requirements(name: str) -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _front_matter(path: Path) -> dict:
    text = path.read_text()
    if not text.startswith("---\n"):
        raise AssertionError(f"{path} does not start with YAML front matter")
    return yaml.safe_load(text.split("---\n", 2)[1])


# ------------------------------------------------------------------------------ the package


def test_wheel_has_the_package_a_console_script_and_the_runtime_requirements(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "pogdiff", src / "pogdiff", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=120)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    ours = {str(p.relative_to(REPO)) for p in (REPO / "pogdiff").rglob("*.py")}
    assert ours <= names and "pogdiff/runs/pipeline_pogdiff.py" in names and "pogdiff/data/loader.py" in names
    assert "pogdiff = pogdiff.cli:main" in entry_points
    requires = re.findall(r"^Requires-Dist: (.+)$", meta, flags=re.M)
    assert [r for r in requires if "extra ==" not in r] == _requirements("requirements.txt")
    assert [r.split(";")[0].strip() for r in requires if 'extra == "dev"' in r] == _requirements("requirements-dev.txt")
    from pogdiff import __version__

    assert f"Version: {__version__}" in meta

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    script = target / "bin" / "pogdiff"
    proc = subprocess.run([str(script), "export", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "--push-to-hub" in proc.stdout and proc.stdout.startswith("usage: ")


def test_runtime_requirements_hold_no_test_tools_and_ci_installs_both():
    runtime = {r.split("==")[0].lower() for r in _requirements("requirements.txt")}
    dev = {r.split("==")[0].lower() for r in _requirements("requirements-dev.txt")}
    assert {"pytest", "playwright"} <= dev and not {"pytest", "playwright"} & runtime
    assert all("==" in r for r in _requirements("requirements.txt") + _requirements("requirements-dev.txt"))
    installs = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if "pip install" in line and not line.lstrip().startswith("#")]
    flags = " ".join(installs)
    assert "-r requirements.txt" in flags and "-r requirements-dev.txt" in flags
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dynamic = project["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["requirements.txt"]
    assert dynamic["optional-dependencies"]["dev"]["file"] == ["requirements-dev.txt"]


# -------------------------------------------------------------------------------- the Space


def test_space_front_matter_is_valid_for_the_hub():
    meta = _front_matter(REPO / "README.md")
    assert meta["sdk"] == "gradio" and (REPO / meta["app_file"]).is_file()
    gradio_pin = next(r for r in _requirements("requirements.txt") if r.startswith("gradio=="))
    assert meta["sdk_version"] == gradio_pin.split("==")[1]
    assert isinstance(meta["python_version"], str) and meta["python_version"].startswith("3.")
    assert len(meta["short_description"]) <= SHORT_DESCRIPTION_MAX
    assert {meta["colorFrom"], meta["colorTo"]} <= HUB_COLORS
    assert meta["suggested_hardware"] == "cpu-basic"
    assert re.search(r"preset runs on\s+`cpu-basic`", (REPO / "README.md").read_text())


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_every_tracked_binary_file_goes_through_lfs():
    try:
        files = _git("ls-files", "-z").split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    binary = [f for f in files if f and (REPO / f).is_file() and b"\0" in (REPO / f).read_bytes()[:8000]]
    assert binary, "expected weights and images in the repository"
    attrs = _git("check-attr", "filter", "--", *binary).splitlines()
    not_lfs = [line for line in attrs if not line.endswith(": filter: lfs")]
    assert not not_lfs, f"binary files without an LFS rule in .gitattributes: {not_lfs}"
    assert _git("check-attr", "filter", "--", "app.py").strip().endswith("unspecified")


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_shipped_json_files_hold_no_local_paths():
    files = sorted((REPO / "checkpoints").rglob("*.json")) + sorted((REPO / "results").rglob("*.json"))
    files = [f for f in files if "runs" not in f.relative_to(REPO).parts]  # benchmark runs are not shipped
    assert any(f.name == "config.json" for f in files)
    for path in files:
        data = json.loads(path.read_text())
        assert "_name_or_path" not in data if isinstance(data, dict) else True, path
        local = [s for s in _strings(data) if s.startswith(("/", "~")) or re.match(r"^[A-Za-z]:\\", s)]
        assert not local, f"{path}: {local[:3]}"


# ----------------------------------------------------------------------------- environment


@pytest.mark.parametrize("environ, expected", [
    ({}, ("127.0.0.1", 7860)),
    ({"SPACE_ID": "me/studio"}, ("0.0.0.0", 7860)),
    ({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8123"}, ("0.0.0.0", 8123)),
    ({"SPACE_ID": "me/studio", "GRADIO_SERVER_NAME": "10.0.0.5"}, ("10.0.0.5", 7860)),
    ({"GRADIO_SERVER_NAME": "", "GRADIO_SERVER_PORT": ""}, ("127.0.0.1", 7860)),
])
def test_server_address_follows_gradio_environment(environ, expected):
    assert app.server_address(environ) == expected


def test_bad_port_in_environment_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"GRADIO_SERVER_PORT='http' is not a port number; set it to e.g. 7860"):
        app.server_address({"GRADIO_SERVER_PORT": "http"})
    with pytest.raises(ValueError, match=r"GRADIO_SERVER_PORT=70000 is out of range"):
        app.server_address({"GRADIO_SERVER_PORT": "70000"})


def test_command_line_defaults_come_from_the_environment_and_flags_win(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9001")
    args = app.parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 9001)
    args = app.parse_args(["--host", "127.0.0.1", "--port", "7000"])
    assert (args.host, args.port) == ("127.0.0.1", 7000)


# --------------------------------------------------------------------------------- ZeroGPU


def _fake_spaces(calls: list) -> types.ModuleType:
    spaces = types.ModuleType("spaces")

    def gpu(duration=None):
        def wrap(fn):
            calls.append((fn, duration))

            def wrapped(*args, **kw):
                return fn(*args, **kw)

            wrapped.gpu_duration = duration
            wrapped.__wrapped__ = fn
            return wrapped
        return wrap

    spaces.GPU = gpu
    return spaces


def test_zero_gpu_is_identity_without_spaces(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError

    def f(x):
        return x + 1

    assert compare_tab.zero_gpu(f, 60) is f


def test_compare_events_ask_for_the_gpu_and_share_one_queue(monkeypatch, tmp_path):
    from pogdiff.ui import Studio

    calls: list = []
    monkeypatch.setitem(sys.modules, "spaces", _fake_spaces(calls))
    assert compare_tab.zero_gpu(lambda x: 2 * x, 30)(4) == 8 and calls[-1][1] == 30
    calls.clear()
    studio = Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    demo = app.build_demo(studio)
    fns = {f.api_name: f for f in demo.fns.values()}
    compare, metrics = fns["compare"], fns["metrics"]
    assert compare.fn.gpu_duration == compare_tab.COMPARE_GPU_SECONDS and compare.fn.__wrapped__ == studio.compare.generate_pair
    assert metrics.fn.gpu_duration == compare_tab.METRICS_GPU_SECONDS and metrics.fn.__wrapped__ == studio.metrics.compute_metrics
    assert compare.concurrency_id == metrics.concurrency_id == compare_tab.GPU_QUEUE
    assert fns["poll"].concurrency_id != compare_tab.GPU_QUEUE
    assert sorted(d for _, d in calls) == sorted([compare_tab.COMPARE_GPU_SECONDS, compare_tab.METRICS_GPU_SECONDS])
