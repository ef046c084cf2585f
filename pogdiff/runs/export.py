"""Export a checkpoint as a diffusers folder (with a model card) and optionally push it to the Hub.

``tiny`` checkpoints become a self-contained pipeline folder::

    model_index.json          _class_name ["pipeline_pogdiff", "PoGDiffPipeline"]
    pipeline_pogdiff.py       the pipeline class (a copy of pogdiff/runs/pipeline_pogdiff.py)
    unet/                     UNet2DConditionModel, float32 safetensors
    scheduler/                DDIMScheduler: clip_sample, trailing spacing (as ``pogdiff sample``)
    text_encoder/, tokenizer/ the frozen caption encoder's files (all-MiniLM-L6-v2)
    configs.json, README.md   the run's configs and the model card

which loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` and needs
only diffusers + transformers. ``sd15`` LoRA checkpoints become
``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``, ``pipe.fuse_lora()``),
plus with ``merge=True`` a full pipeline with the LoRA fused under ``merged/``; fully fine-tuned
``sd15`` checkpoints become a full Stable Diffusion pipeline folder. See the README's
"Export and the Hub" section.
"""

from __future__ import annotations

import json
import logging
import shutil
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pogdiff.model import checkpoints as ckpts
from pogdiff.config import ModelConfig, TrainConfig

logger = logging.getLogger(__name__)

PIPELINE_MODULE = "pipeline_pogdiff"
PIPELINE_CLASS = "PoGDiffPipeline"
PIPELINE_SOURCE = Path(__file__).with_name(f"{PIPELINE_MODULE}.py")
MERGED_DIR = "merged"
METRICS_FILE = "per_class.csv"
TEXT_ENCODER_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
WIDGET_PROMPTS = 3
DEFAULT_WIDGET = "a photo of a person"
LICENSES = {"tiny": "mit", "sd15": "other"}


@dataclass
class CardInfo:
    """What the model card says beyond the checkpoint's own configs."""

    license: str | None = None
    base_model: str | None = None  # a Hub id; None: cfg.pretrained when it is not a local folder
    prompts: tuple[str, ...] = ()  # widget prompts; default: the rarest classes of the metrics
    metrics_csv: str | Path | None = None  # default: per_class.csv beside the checkpoint or its run


# --- small helpers ----------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest checkpoint of a run folder."""
    path = Path(path)
    if (path / ckpts.CONFIGS_FILE).is_file():
        return path
    latest = ckpts.latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {path}: pass a checkpoint-XXXXXX folder or a run folder")
    return latest


def is_local_path(name: str) -> bool:
    """True for a file-system path (absolute, relative with a separator, or an existing folder)."""
    if not name:
        return False
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or Path(name).exists()


def strip_local_names(folder: Path) -> list[Path]:
    """Remove where a model was loaded from (``_name_or_path``, and a local ``name_or_path``),
    which diffusers and transformers write into their JSON configs, from every ``*.json`` under
    ``folder``; returns the files changed."""
    changed = []
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        drop = [k for k in ("_name_or_path", "name_or_path")
                if k in data and (k == "_name_or_path" or is_local_path(str(data[k])))]
        if drop:
            for key in drop:
                del data[key]
            path.write_text(json.dumps(data, indent=2) + "\n")
            changed.append(path)
    return changed


def _public_configs(ckpt_dir: Path, base_model: str | None) -> dict[str, Any]:
    """configs.json of the checkpoint with a local ``pretrained`` folder replaced by ``base_model``
    (or the folder's name), so no machine path is shipped."""
    data = json.loads((ckpt_dir / ckpts.CONFIGS_FILE).read_text())
    pretrained = data["model"].get("pretrained", "")
    if is_local_path(pretrained):
        data["model"]["pretrained"] = base_model or Path(pretrained).name
    return data


# --- model card -------------------------------------------------------------------------------


def find_metrics(ckpt_dir: Path, given: str | Path | None = None):
    """The per-class metric table (pandas) of a checkpoint: ``given``, else ``per_class.csv`` in
    the checkpoint folder or its run folder; None when there is none."""
    import pandas as pd

    candidates = [Path(given)] if given else [ckpt_dir / METRICS_FILE, ckpt_dir.parent / METRICS_FILE]
    for path in candidates:
        if path.is_file():
            return pd.read_csv(path)
    if given:
        raise FileNotFoundError(f"metrics file {given} does not exist")
    return None


def widget_prompts(metrics, given: tuple[str, ...] = ()) -> list[str]:
    """``given`` prompts, else "a photo of {subject}" for the rarest classes of ``metrics``."""
    if given:
        return list(given)
    if metrics is not None and {"subject", "train_count"} <= set(metrics.columns):
        rare = metrics.sort_values(["train_count", "subject"]).head(WIDGET_PROMPTS)
        return [f"a photo of {s}" for s in rare["subject"]]
    return [DEFAULT_WIDGET]


def _settings_rows(model_cfg: ModelConfig, train_cfg: TrainConfig, step: int, base: str) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("method", train_cfg.method), ("preset", model_cfg.preset), *([("base model", base)] if base else []),
        ("steps trained", step), ("batch size", train_cfg.batch_size), ("learning rate", train_cfg.learning_rate),
        ("warm-up steps", train_cfg.warmup_steps), ("caption dropout", train_cfg.caption_dropout),
        ("EMA decay", train_cfg.ema_decay), ("mixed precision", train_cfg.mixed_precision), ("seed", train_cfg.seed),
        ("resolution", model_cfg.resolution), ("text encoder", model_cfg.text_encoder),
    ]
    if model_cfg.preset == "sd15":
        rows.append(("LoRA rank", "full fine-tune" if model_cfg.full_finetune else model_cfg.lora_rank))
    if train_cfg.method == "pogdiff":
        psi = train_cfg.psi
        rows += [("psi_max", psi.psi_max), ("k neighbours", psi.k), ("neighbour sampling", psi.sampling),
                 ("neighbour pool", psi.pool), ("psi schedule", psi.schedule), ("w_density / s_img / s_txt",
                                                             f"{psi.use_density} / {psi.use_image_sim} / {psi.use_text_sim}")]
    if train_cfg.method == "cbdm":
        rows.append(("CBDM tau", train_cfg.cbdm_tau))
    return rows


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _metrics_section(metrics) -> str:
    if metrics is None:
        return ""
    cols = [c for c in ("subject", "train_count", "shot", "accuracy", "gRecall", "dino") if c in metrics.columns]
    parts = ["## Per-class metrics\n"]
    if {"shot", "accuracy"} <= set(metrics.columns):
        buckets = metrics.groupby("shot", sort=False)["accuracy"].agg(["mean", "count"]).reset_index()
        parts.append(_md_table(["shot", "mean accuracy", "classes"], buckets.values.tolist()) + "\n")
    parts.append(_md_table(cols, metrics[cols].values.tolist()) + "\n")
    return "\n".join(parts)


def model_card(ckpt_dir: Path, kind: str, info: CardInfo, *, folder_name: str) -> str:
    """README.md text: YAML front matter (license, base_model, tags, widget prompts) + usage,
    training settings and, when computed, the per-class metrics."""
    import yaml

    model_cfg, train_cfg = ckpts.load_configs(ckpt_dir)
    step = ckpts.load_trainer_state(ckpt_dir)["step"]
    metrics = find_metrics(ckpt_dir, info.metrics_csv)
    base = info.base_model or ("" if is_local_path(model_cfg.pretrained) else model_cfg.pretrained)
    meta: dict[str, Any] = {"license": info.license or LICENSES.get(model_cfg.preset, "other")}
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if kind == "lora" else "finetune"
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    tags = ["text-to-image", "diffusers", "pogdiff", f"method-{train_cfg.method}", "imbalanced-data"]
    meta["tags"] = tags + (["lora"] if kind == "lora" else []) + (["custom-pipeline"] if kind == "tiny" else [])
    meta["widget"] = [{"text": p} for p in widget_prompts(metrics, info.prompts)]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    shown_base = base or (Path(model_cfg.pretrained).name if model_cfg.pretrained else "")
    usage = {
        "tiny": TINY_USAGE.format(folder=folder_name, prompt=meta["widget"][0]["text"], res=model_cfg.resolution),
        "lora": LORA_USAGE.format(folder=folder_name, base=shown_base or "BASE_MODEL_ID"),
        "full": FULL_USAGE.format(folder=folder_name),
    }[kind]
    settings = _md_table(["setting", "value"], [list(r) for r in _settings_rows(model_cfg, train_cfg, step, shown_base)])
    body = (f"# {folder_name}\n\nA text-to-image model fine-tuned with PoGDiff Studio "
            f"(method `{train_cfg.method}`, {model_cfg.preset} preset).\n\n## Use\n\n{usage}\n"
            f"## Training settings\n\n{settings}\n\n{_metrics_section(metrics)}")
    return f"---\n{front}---\n\n{body}"


TINY_USAGE = """```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)
seeds = [0, 1, 2, 3]
images = pipe("{prompt}", num_images_per_prompt=len(seeds),
              generator=[torch.Generator().manual_seed(s) for s in seeds]).images
```

A pixel-space model ({res}x{res} RGB). The pipeline class is `pipeline_pogdiff.py` in this folder;
with one CPU generator per image it gives the same pictures as `python -m pogdiff sample` with
those seeds (25 DDIM steps, guidance 3.0 by default). It needs only `diffusers` and `transformers`.
"""

LORA_USAGE = """```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{folder}")
pipe.fuse_lora()  # optional: merge the LoRA into the UNet
```

If a `merged/` folder is present it is the same pipeline with the LoRA already fused:
`StableDiffusionPipeline.from_pretrained("{folder}/merged")`.
"""

FULL_USAGE = """```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{folder}")
```
"""


# --- the export -------------------------------------------------------------------------------


def _noise_schedule_only(model_cfg: ModelConfig) -> types.SimpleNamespace:
    """What :func:`pogdiff.model.sampling.make_scheduler` reads of a model, for the pixel-space preset."""
    from pogdiff.model.models import make_noise_scheduler

    return types.SimpleNamespace(noise_scheduler=make_noise_scheduler(model_cfg), vae=None)


def _caption_encoder_dir(model_cfg: ModelConfig) -> Path:
    if model_cfg.text_encoder != "minilm":
        raise ValueError(f"a tiny export needs the 'minilm' caption encoder, this checkpoint uses "
                         f"{model_cfg.text_encoder!r}; export an sd15 checkpoint instead")
    from pogdiff.model.text import minilm_model_dir

    return minilm_model_dir()


def _copy_files(src: Path, names: tuple[str, ...], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} is missing; reinstall the caption encoder package")
        shutil.copy2(src / name, dst / name)


def export_tiny(ckpt_dir: Path, out_dir: Path, *, use_ema: bool = False) -> None:
    """Write the self-contained pipeline folder of a tiny checkpoint (see the module docstring)."""
    from diffusers import UNet2DConditionModel

    from pogdiff.model.sampling import make_scheduler

    model_cfg, _ = ckpts.load_configs(ckpt_dir)
    src = ckpt_dir / (ckpts.EMA_DIR if use_ema else ckpts.UNET_DIR)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist" + (" (saved without EMA)" if use_ema else ""))
    encoder_dir = _caption_encoder_dir(model_cfg)
    unet = UNet2DConditionModel.from_pretrained(src, torch_dtype=torch.float32)
    hidden = json.loads((encoder_dir / "config.json").read_text())["hidden_size"]
    if unet.config.cross_attention_dim != hidden:
        raise ValueError(f"the UNet of {ckpt_dir} attends to {unet.config.cross_attention_dim}-d token states but the "
                         f"caption encoder gives {hidden}-d ones; it was trained with another text encoder and "
                         "cannot be exported as a pipeline")
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    make_scheduler(_noise_schedule_only(model_cfg), "ddim").save_pretrained(out_dir / "scheduler")
    _copy_files(encoder_dir, TEXT_ENCODER_FILES, out_dir / "text_encoder")
    _copy_files(encoder_dir, TOKENIZER_FILES, out_dir / "tokenizer")
    shutil.copy2(PIPELINE_SOURCE, out_dir / PIPELINE_SOURCE.name)
    st_config = json.loads((encoder_dir / "sentence_bert_config.json").read_text())
    use_mask = model_cfg.use_attention_mask if model_cfg.use_attention_mask is not None else True
    index = {
        "_class_name": [PIPELINE_MODULE, PIPELINE_CLASS],
        "_diffusers_version": _diffusers_version(),
        "max_caption_tokens": model_cfg.max_caption_tokens,
        "max_seq_length": int(st_config["max_seq_length"]),
        "use_attention_mask": bool(use_mask),
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _stable_diffusion(base: str, **kwargs):
    from diffusers import StableDiffusionPipeline

    from pogdiff.model.models import use_local_files

    return StableDiffusionPipeline.from_pretrained(base, local_files_only=use_local_files(base), **kwargs)


def export_sd(ckpt_dir: Path, out_dir: Path, *, use_ema: bool = False, merge: bool = False) -> str:
    """LoRA weights (+ a fused pipeline under ``merged/`` when ``merge``) or, for a full
    fine-tune, a whole Stable Diffusion pipeline; returns "lora" or "full"."""
    from diffusers import UNet2DConditionModel

    model_cfg, _ = ckpts.load_configs(ckpt_dir)
    src = ckpt_dir / (ckpts.EMA_DIR if use_ema else ckpts.UNET_DIR)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist" + (" (saved without EMA)" if use_ema else ""))
    if (src / ckpts.LORA_WEIGHTS).is_file():
        shutil.copy2(src / ckpts.LORA_WEIGHTS, out_dir / ckpts.LORA_WEIGHTS)
        if merge:
            pipe = _stable_diffusion(model_cfg.pretrained)
            pipe.load_lora_weights(out_dir)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            pipe.save_pretrained(out_dir / MERGED_DIR, safe_serialization=True)
        return "lora"
    unet = UNet2DConditionModel.from_pretrained(src, torch_dtype=torch.float32)
    _stable_diffusion(model_cfg.pretrained, unet=unet).save_pretrained(out_dir, safe_serialization=True)
    return "full"


def export_diffusers(ckpt_dir: str | Path, out_dir: str | Path, *, use_ema: bool = False, merge: bool = False,
                     card: CardInfo | None = None) -> Path:
    """Export a checkpoint (or a run folder's latest) to ``out_dir`` for diffusers; returns it.

    ``out_dir`` is written from scratch (an existing folder is replaced). The folder carries
    ``configs.json`` (local paths removed) and a model card ``README.md``.
    """
    ckpt_dir, out_dir = resolve_checkpoint(ckpt_dir), Path(out_dir)
    card = card or CardInfo()
    model_cfg, _ = ckpts.load_configs(ckpt_dir)
    if merge and model_cfg.preset != "sd15":
        raise ValueError("--merge applies to sd15 LoRA checkpoints only; a tiny export is already a full pipeline")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    try:
        if model_cfg.preset == "sd15":
            kind = export_sd(ckpt_dir, out_dir, use_ema=use_ema, merge=merge)
        else:
            export_tiny(ckpt_dir, out_dir, use_ema=use_ema)
            kind = "tiny"
        configs = _public_configs(ckpt_dir, card.base_model)
        (out_dir / ckpts.CONFIGS_FILE).write_text(json.dumps(configs, indent=2, sort_keys=True) + "\n")
        (out_dir / "README.md").write_text(model_card(ckpt_dir, kind, card, folder_name=out_dir.name))
        strip_local_names(out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    logger.info("exported %s (%s) to %s", ckpt_dir, kind, out_dir)
    return out_dir


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (a model repository) if needed and upload ``folder``; returns the
    commit URL. Uses the token of ``huggingface-cli login`` / ``HF_TOKEN`` unless ``token``."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not an export folder (no README.md); run the export first")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             commit_message="Upload a PoGDiff Studio export")
    url = str(getattr(info, "commit_url", info))
    logger.info("pushed %s to %s", folder, url)
    return url
