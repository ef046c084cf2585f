"""pogdiff.runs.export and ``python -m pogdiff export``: the self-contained tiny pipeline (loaded in a
Python where pogdiff cannot be imported, same pixels as ``sample``), the sd15 LoRA / merged
export, the model card and the Hub upload (offline, the upload call replaced)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pogdiff.runs import export
from pogdiff.model.checkpoints import save_checkpoint
from pogdiff.cli import main
from pogdiff.config import ModelConfig, TrainConfig
from pogdiff.runs.export import CardInfo, export_diffusers, push_to_hub
from pogdiff.model.models import build_tiny, load_stable_diffusion
from tests.fakes import TOKEN_DIM, HashEncoder

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "checkpoints" / "demo-pogdiff"
PROMPT = "a photo of Mira Santos"
SEEDS = (0, 1)
STEPS = 4

# Runs in a fresh interpreter (-I: no PYTHONPATH, no cwd, no user site); importing pogdiff raises.
LOADER = """
import importlib.abc, json, sys

class NoPogdiff(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pogdiff" or name.startswith("pogdiff."):
            raise ImportError("pogdiff must not be needed by the exported pipeline")

sys.meta_path.insert(0, NoPogdiff())
import numpy as np, torch
from diffusers import DiffusionPipeline

folder, prompt, steps, seeds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
images = pipe(prompt, num_images_per_prompt=len(seeds), num_inference_steps=steps,
              generator=[torch.Generator().manual_seed(s) for s in seeds]).images
np.save(out, np.stack([np.asarray(im) for im in images]))
print(json.dumps({"class": type(pipe).__name__, "pogdiff_modules": [m for m in sys.modules if "pogdiff" in m.split(".")[0] and m != pipe.__class__.__module__]}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "pogdiff-demo"
    assert main(["export", "--checkpoint", str(SHIPPED), "--out", str(out)]) == 0
    return out


def _grid_tiles(path: Path, n: int, size: int) -> np.ndarray:
    """Tiles of a ``sample --scale 1`` grid (one row, GRID_GAP pixels apart)."""
    from pogdiff.model.sampling import GRID_GAP

    grid = np.asarray(Image.open(path).convert("RGB"))
    return np.stack([grid[:size, i * (size + GRID_GAP): i * (size + GRID_GAP) + size] for i in range(n)])


def test_tiny_export_loads_without_pogdiff_and_matches_sample(exported, tmp_path):
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(SHIPPED), "--prompt", PROMPT, "--seeds", *map(str, SEEDS),
                 "--sample-steps", str(STEPS), "--scale", "1", "--out", str(grid)]) == 0
    ours = _grid_tiles(grid, len(SEEDS), 32)

    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    npy = tmp_path / "theirs.npy"
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(exported), PROMPT, str(STEPS), json.dumps(list(SEEDS)), str(npy)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"class": "PoGDiffPipeline", "pogdiff_modules": []}
    theirs = np.load(npy)
    assert theirs.shape == ours.shape == (2, 32, 32, 3)
    assert ours.std() > 10 and not np.array_equal(ours[0], ours[1])  # real, seed-dependent pictures
    np.testing.assert_array_equal(theirs, ours)


def test_export_folder_is_complete_and_holds_no_local_paths(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_pogdiff", "PoGDiffPipeline"]
    assert {k for k, v in index.items() if isinstance(v, list) and not k.startswith("_")} == {
        "unet", "scheduler", "text_encoder", "tokenizer"}
    assert index["max_caption_tokens"] == 32 and index["use_attention_mask"] is True
    for name in ("pipeline_pogdiff.py", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "configs.json", "README.md"):
        assert (exported / name).is_file(), name
    scheduler = json.loads((exported / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler["clip_sample"] is True and scheduler["timestep_spacing"] == "trailing"
    pipeline_src = (exported / "pipeline_pogdiff.py").read_text()
    assert "import pogdiff" not in pipeline_src and "from pogdiff" not in pipeline_src
    for path in exported.rglob("*"):
        if path.suffix in (".json", ".md", ".py"):
            text = path.read_text()
            assert "_name_or_path" not in text, path
            assert str(REPO) not in text and str(exported.parent) not in text, path


def test_model_card_has_front_matter_settings_and_per_class_metrics(exported):
    text = (exported / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "mit" and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"pogdiff", "text-to-image", "method-pogdiff"} <= set(meta["tags"])
    table = pd.read_csv(SHIPPED / "per_class.csv")
    rarest = table.sort_values(["train_count", "subject"]).head(3)["subject"]
    assert meta["widget"] == [{"text": f"a photo of {s}"} for s in rarest]
    assert "base_model" not in meta  # the tiny base is not a Hub model
    steps = json.loads((SHIPPED / "trainer_state.json").read_text())["step"]  # what the shipped run trained
    assert "| method | pogdiff |" in text and f"| steps trained | {steps} |" in text and "| psi_max | 1 |" in text
    few = table[table["shot"] == "few"]["accuracy"]
    assert f"| few | {few.mean():.4g} | {len(few)} |" in text
    assert "| Mira Santos | 2 | few |" in text


def _small_checkpoint(tmp_path: Path, **model_kw) -> Path:
    cfg = ModelConfig(block_out_channels=(8, 16, 32), resolution=16, **model_kw)
    encoder = HashEncoder() if cfg.cross_attention_dim == TOKEN_DIM else None  # None: MiniLM (384-d)
    model = build_tiny(cfg, seed=0, text_encoder=encoder)
    return save_checkpoint(tmp_path / "run", 3, model, train_cfg=TrainConfig(method="baseline", max_steps=3))


def test_run_folder_prompts_and_license_options_reach_the_card(tmp_path):
    ckpt = _small_checkpoint(tmp_path, cross_attention_dim=384)
    out = export_diffusers(tmp_path / "run", tmp_path / "out",  # a run folder: its latest checkpoint
                           card=CardInfo(license="apache-2.0", prompts=("a red cube", "a blue ball")))
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["license"] == "apache-2.0"
    assert meta["widget"] == [{"text": "a red cube"}, {"text": "a blue ball"}]
    text = (out / "README.md").read_text()
    assert "Per-class metrics" not in text and "psi_max" not in text and "| method | baseline |" in text
    assert json.loads((out / "configs.json").read_text()) == json.loads((ckpt / "configs.json").read_text())


def test_export_errors_say_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
        export_diffusers(tmp_path / "empty", tmp_path / "out")
    ckpt = _small_checkpoint(tmp_path, cross_attention_dim=TOKEN_DIM)
    with pytest.raises(ValueError, match="attends to 16-d token states but the caption encoder gives 384-d"):
        export_diffusers(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written is left
    with pytest.raises(ValueError, match="--merge applies to sd15 LoRA checkpoints only"):
        export_diffusers(ckpt, tmp_path / "out", merge=True)
    with pytest.raises(FileNotFoundError, match="saved without EMA"):
        export_diffusers(ckpt, tmp_path / "out", use_ema=True)
    assert main(["export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


def test_push_to_hub_uploads_the_export_folder(exported, tmp_path, monkeypatch, capsys):
    import inspect

    from huggingface_hub import HfApi

    calls = []
    real_create, real_upload = inspect.signature(HfApi.create_repo), inspect.signature(HfApi.upload_folder)

    def create_repo(self, repo_id, **kw):
        real_create.bind(self, repo_id, **kw)  # the real method accepts these arguments
        calls.append(("create", repo_id, kw))

    def upload_folder(self, **kw):
        real_upload.bind(self, **kw)
        calls.append(("upload", kw["repo_id"], kw))
        assert (Path(kw["folder_path"]) / "model_index.json").is_file()
        return "https://huggingface.co/me/pogdiff-demo/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "card-only"
    shutil.copytree(exported, out, ignore=shutil.ignore_patterns("*.safetensors"))
    url = push_to_hub(out, "me/pogdiff-demo", private=True)
    assert url.endswith("/commit/abc")
    assert calls[0] == ("create", "me/pogdiff-demo", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][1] == "me/pogdiff-demo" and calls[1][2]["folder_path"] == str(out)
    assert calls[1][2]["repo_type"] == "model"

    calls.clear()
    cli_out = tmp_path / "cli"
    assert main(["export", "--checkpoint", str(SHIPPED), "--out", str(cli_out), "--push-to-hub", "me/x"]) == 0
    assert [c[0] for c in calls] == ["create", "upload"]
    assert calls[1][2]["folder_path"] == str(cli_out) and "pushed to me/x" in capsys.readouterr().out

    with pytest.raises(FileNotFoundError, match="not an export folder"):
        push_to_hub(tmp_path, "me/x")


# --- sd15 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_checkpoint(tmp_path_factory):
    from tests.fakes import SD_HIDDEN as HIDDEN, tiny_sd_pipeline

    root = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(root).save_pretrained(root / "pipe")
    cfg = ModelConfig(preset="sd15", pretrained=str(root / "pipe"), resolution=32, cross_attention_dim=HIDDEN,
                      text_encoder="clip", max_caption_tokens=77, beta_schedule="scaled_linear", lora_rank=4)
    model = load_stable_diffusion(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a LoRA that really changes the output
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ckpt = save_checkpoint(root / "run", 4, model, train_cfg=TrainConfig(max_steps=4), keep=1)
    return ckpt, model, root


def test_sd15_lora_export_fuses_and_merged_pipeline_matches(sd_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline

    ckpt, model, root = sd_checkpoint
    out = export_diffusers(ckpt, tmp_path / "lora", merge=True,
                           card=CardInfo(base_model="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, *model.latent_shape, generator=g)
    t = torch.tensor([10, 700])
    tokens, _ = model.encode_captions(["a photo of a cat", "a photo of a dog"])
    with torch.no_grad():
        ours = model.predict_eps(x_t, t, tokens)
        pipe = StableDiffusionPipeline.from_pretrained(root / "pipe")
        base = pipe.unet(x_t, t, encoder_hidden_states=tokens).sample
        pipe.load_lora_weights(out)
        pipe.fuse_lora()
        fused = pipe.unet(x_t, t, encoder_hidden_states=tokens).sample
        merged = StableDiffusionPipeline.from_pretrained(out / "merged")
        merged_eps = merged.unet(x_t, t, encoder_hidden_states=tokens).sample
    assert (base - ours).abs().max() > 1e-3
    torch.testing.assert_close(fused, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_eps, ours, rtol=1e-4, atol=1e-4)
    assert not any("lora" in k for k in merged.unet.state_dict())

    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["base_model_relation"] == "adapter" and "lora" in meta["tags"]
    assert json.loads((out / "configs.json").read_text())["model"]["pretrained"] == meta["base_model"]
    for path in out.rglob("*.json"):
        assert str(root) not in path.read_text(), path


def test_sd15_local_base_is_named_by_folder_not_path(sd_checkpoint, tmp_path):
    ckpt, _, root = sd_checkpoint
    out = export_diffusers(ckpt, tmp_path / "lora")
    assert not (out / "merged").exists()
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert "base_model" not in meta and meta["license"] == "other"
    assert json.loads((out / "configs.json").read_text())["model"]["pretrained"] == "pipe"
    assert str(root) not in (out / "README.md").read_text()
    assert export.is_local_path(str(root / "pipe")) and not export.is_local_path("runwayml/stable-diffusion-v1-5")


def test_sd15_full_finetune_exports_a_whole_pipeline(sd_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, lora_model, root = sd_checkpoint
    cfg = ModelConfig(**{**lora_model.config.__dict__, "full_finetune": True})
    model = load_stable_diffusion(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    ckpt = save_checkpoint(tmp_path / "run", 2, model, train_cfg=TrainConfig(max_steps=2))
    out = export_diffusers(ckpt, tmp_path / "full")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    x_t = torch.randn(1, *model.latent_shape, generator=g)
    t = torch.tensor([500])
    tokens, _ = model.encode_captions(["a photo of a cat"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x_t, t, encoder_hidden_states=tokens).sample,
                                   model.predict_eps(x_t, t, tokens), rtol=1e-5, atol=1e-5)
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert "lora" not in meta["tags"] and 'StableDiffusionPipeline.from_pretrained("full")' in (out / "README.md").read_text()
