"""The diffusion model bundle: UNet + training noise schedule + frozen caption encoder (+ VAE).

Two presets (docs/ARCHITECTURE.md):

- ``tiny``: a pixel-space :class:`diffusers.UNet2DConditionModel` of a few M parameters with
  cross-attention only at the lowest resolution, conditioned on a frozen sentence encoder's
  token states. ``x0`` is the image itself, ``[N, 3, H, W]`` in ``[-1, 1]``.
- ``sd15``: any Stable Diffusion 1.x/2.x pipeline in diffusers format. ``x0`` is the VAE latent
  times ``vae.config.scaling_factor``, ``[N, 4, H/8, W/8]``. LoRA on the UNet attention via peft
  (full fine-tune optional); VAE and text encoder frozen.

This module does no file I/O besides reading a pretrained pipeline in
:func:`load_stable_diffusion`; checkpoints live in :mod:`pogdiff.model.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from pogdiff.config import ModelConfig

if TYPE_CHECKING:
    from pogdiff.model.text import CaptionEncoder

logger = logging.getLogger(__name__)

TINY_DOWN_BLOCKS = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
TINY_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
MAX_NORM_GROUPS = 8  # GroupNorm groups of the tiny UNet: the largest divisor of all widths <= this
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
VAE_ENCODE_BATCH = 8  # images per VAE forward pass in encode_images / decode
HALF_DTYPES = (torch.float16, torch.bfloat16)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (itself if none).

    ``accelerate.prepare`` wraps the UNet in DDP when several processes train; the wrapper has
    neither ``dtype`` nor ``config`` nor ``peft_config``. ``torch.compile``'s wrapper is looked
    through too (``TrainConfig.compile_unet``).
    """
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            module = module._orig_mod
        else:
            return module


def attention_processors(unet: nn.Module) -> set[str]:
    """Class names of the attention processors of ``unet`` (``AttnProcessor2_0``: PyTorch's fused
    ``scaled_dot_product_attention``, which diffusers picks by default)."""
    return {type(p).__name__ for p in unwrap(unet).attn_processors.values()}


def is_lora(unet: nn.Module) -> bool:
    """True when peft LoRA adapters were added to ``unet`` (wrappers are looked through)."""
    return bool(getattr(unwrap(unet), "peft_config", None))


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def output_to_eps(output: Tensor, x_t: Tensor, t: Tensor, scheduler: DDPMScheduler) -> Tensor:
    """Convert a UNet output in the scheduler's ``prediction_type`` to an eps-prediction.

    With ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` and ``v = sqrt(abar) eps - sqrt(1 - abar) x0``:

    - ``epsilon``: the output is eps;
    - ``v_prediction``: ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``;
    - ``sample``: ``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``.

    This is the one place where prediction types meet the eps-space losses of
    :mod:`pogdiff.method.losses`; ``pogdiff.method.losses.eps_loss_weights`` gives the per-sample weight that
    turns the eps-space squared error back into the prediction type's own squared error.

    :param output: ``[N, ...]`` UNet output; ``x_t`` the same shape; ``t`` ``[N]`` integer timesteps.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {kind!r}; supported: {', '.join(PREDICTION_TYPES)}")
    abar = scheduler.alphas_cumprod.to(x_t.device)[t.to(x_t.device).long()]
    abar = abar.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    if kind == "v_prediction":
        return abar.sqrt() * output + (1 - abar).sqrt() * x_t
    return (x_t - abar.sqrt() * output) / (1 - abar).sqrt()


class DiffusionModel:
    """A UNet, its training noise schedule, a frozen caption encoder and an optional VAE.

    ``x0`` is the clean sample in diffusion space with shape ``[N, *latent_shape]``; captions
    condition the UNet through ``context`` ``[N, L, C]`` token states and a ``mask`` ``[N, L]``.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        text_encoder: CaptionEncoder,
        vae: AutoencoderKL | None = None,
    ) -> None:
        self.config = config
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.text_encoder = text_encoder
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)
            vae.eval()
        self._null: tuple[Tensor, Tensor] | None = None
        self.latent_shape = self._latent_shape()
        token_dim = getattr(text_encoder, "token_dim", None)
        if token_dim is not None and token_dim != unet.config.cross_attention_dim:
            raise ValueError(
                f"text encoder token_dim={token_dim} does not match the UNet's "
                f"cross_attention_dim={unet.config.cross_attention_dim}; set "
                f"ModelConfig.cross_attention_dim={token_dim} or use another text encoder"
            )

    # --- shapes and devices -------------------------------------------------------------------

    def _latent_shape(self) -> tuple[int, int, int]:
        res = self.config.resolution
        if self.vae is None:
            return (self.unet.config.in_channels, res, res)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if res % factor:
            raise ValueError(f"resolution={res} must be a multiple of the VAE factor {factor}")
        return (self.vae.config.latent_channels, res // factor, res // factor)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the UNet's frozen (or, for the tiny model, all) weights."""
        return unwrap(self.unet).dtype

    @property
    def is_lora(self) -> bool:
        return is_lora(self.unet)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move UNet and VAE (and the text encoder if it can move) in place; returns self.

        With a half ``dtype`` LoRA parameters stay float32 (frozen weights in half precision,
        trainable ones in full precision, as diffusers' LoRA training scripts do).
        """
        self.unet.to(device=device, dtype=dtype)
        if self.vae is not None:
            self.vae.to(device=device, dtype=dtype)
        mover = getattr(self.text_encoder, "to", None)
        if callable(mover):
            mover(device)
        if dtype in HALF_DTYPES and self.is_lora:
            for p in self.trainable_parameters():
                p.data = p.data.float()
        self._null = None
        return self

    def train(self, mode: bool = True) -> DiffusionModel:
        """UNet train/eval mode; the VAE always stays in eval mode."""
        self.unet.train(mode)
        return self

    def eval(self) -> DiffusionModel:
        return self.train(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """All UNet parameters for tiny / full fine-tune; only the LoRA parameters for LoRA."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        return count_parameters(self.unet, trainable_only=trainable_only)

    # --- diffusion space -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[N, 3, H, W]`` in ``[-1, 1]`` -> ``x0`` ``[N, *latent_shape]``.

        Identity for the pixel model. For a VAE: the latent mean (or a sample drawn with
        ``generator`` when given) times ``scaling_factor``, computed in chunks; returned on the
        input's device in float32.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects RGB images [N, 3, H, W], got shape {tuple(images.shape)}: "
                             "convert uint8 [N, H, W, 3] arrays with pogdiff.method.prepare.images_to_tensor")
        if self.vae is None:
            return images.float()
        out = []
        for chunk in images.split(VAE_ENCODE_BATCH):
            dist = self.vae.encode(chunk.to(self.device, self.vae.dtype)).latent_dist
            z = dist.mode() if generator is None else dist.sample(generator=generator)
            out.append(z.float() * self.vae.config.scaling_factor)
        x0 = torch.cat(out).to(images.device)
        if tuple(x0.shape[1:]) != self.latent_shape:
            raise ValueError(f"the VAE encoded {tuple(images.shape)} images to latents {tuple(x0.shape[1:])}, but the "
                             f"model expects {self.latent_shape}: resize the images to {self.config.resolution}x"
                             f"{self.config.resolution} (DataConfig.resolution = ModelConfig.resolution)")
        return x0

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """``x0`` ``[N, *latent_shape]`` -> images ``[N, 3, H, W]`` clamped to ``[-1, 1]`` (float32)."""
        if self.vae is None:
            return x0.float().clamp(-1, 1)
        out = []
        for chunk in x0.split(VAE_ENCODE_BATCH):
            z = chunk.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
            out.append(self.vae.decode(z).sample.float())
        return torch.cat(out).clamp(-1, 1).to(x0.device)

    # --- conditioning and the noise prediction -------------------------------------------------

    @property
    def uses_attention_mask(self) -> bool:
        """Whether ``mask`` reaches the UNet: the config's choice, else True except for SD
        (Stable Diffusion was trained attending to CLIP's padding tokens)."""
        if self.config.use_attention_mask is not None:
            return bool(self.config.use_attention_mask)
        return self.config.preset != "sd15"

    def predict_eps(self, x_t: Tensor, t: Tensor, context: Tensor, mask: Tensor | None = None, *,
                    unet: nn.Module | None = None) -> Tensor:
        """eps_theta(x_t, t, y): ``x_t`` ``[N, *latent_shape]``, ``t`` ``[N]`` (or scalar) integer
        timesteps, ``context`` ``[N, L, C]``, ``mask`` ``[N, L]`` bool -> ``[N, *latent_shape]``.

        A v- or sample-prediction UNet's output is converted to eps by :func:`output_to_eps`.
        ``unet``: the module to run instead of ``self.unet`` (the trainer passes the one accelerate
        prepared, which is DDP-wrapped when several processes train).
        """
        unet = self.unet if unet is None else unet
        dtype = unwrap(unet).dtype
        context = _plain(context, x_t.device)
        kwargs: dict[str, Any] = {}
        if mask is not None and self.uses_attention_mask:
            kwargs["encoder_attention_mask"] = mask.to(x_t.device)
        out = unet(
            x_t.to(dtype), t, encoder_hidden_states=context.to(dtype), **kwargs
        ).sample
        if out.shape != x_t.shape:
            raise ValueError(f"the UNet returned {tuple(out.shape)} for input {tuple(x_t.shape)}: its in/out channels "
                             "must match the diffusion space (an image-to-image or upscaling UNet cannot be used here)")
        out = out.to(x_t.dtype)
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return output_to_eps(out, x_t, t, self.noise_scheduler)

    def null_context(self, n: int) -> tuple[Tensor, Tensor]:
        """Token states ``[n, L, C]`` and mask ``[n, L]`` of the empty caption, on the model's
        device (computed once, cached; used for caption dropout and classifier-free guidance)."""
        if self._null is None:
            emb = self.text_encoder.encode([""])
            self._null = (_plain(emb.tokens, self.device), _plain(emb.mask, self.device))
        tokens, mask = self._null
        return tokens.expand(n, -1, -1), mask.expand(n, -1)

    def encode_captions(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> token states ``[N, L, C]`` and mask ``[N, L]`` on the model's device."""
        emb = self.text_encoder.encode(list(captions))
        return _plain(emb.tokens, self.device), _plain(emb.mask, self.device)


def _plain(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device`` as an ordinary tensor (encoders may return inference-mode tensors,
    which autograd, e.g. gradient checkpointing, cannot save)."""
    x = x.to(device)
    return x.clone() if x.is_inference() else x


# --- tiny preset ------------------------------------------------------------------------------


def _norm_groups(channels: tuple[int, ...]) -> int:
    g = math.gcd(*channels)
    return max(d for d in range(1, MAX_NORM_GROUPS + 1) if g % d == 0)


def tiny_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """Pixel-space UNet (3 -> 3 channels at ``cfg.resolution``) with cross-attention only at the
    lowest resolution (last down block, mid block, first up block).

    ``cfg.attention_head_dim`` is the per-head width: each attention block has
    ``channels // attention_head_dim`` heads (diffusers' ``attention_head_dim`` argument of
    this class is really a head count, so it is passed per block).
    """
    channels = tuple(cfg.block_out_channels)
    if len(channels) != len(TINY_DOWN_BLOCKS):
        raise ValueError(
            f"block_out_channels must have {len(TINY_DOWN_BLOCKS)} entries, got {channels}"
        )
    downsample = 2 ** (len(channels) - 1)
    if cfg.resolution % downsample:
        raise ValueError(f"resolution={cfg.resolution} must be a multiple of {downsample}")
    heads = tuple(max(1, c // cfg.attention_head_dim) for c in channels)
    return UNet2DConditionModel(
        sample_size=cfg.resolution,
        in_channels=3,
        out_channels=3,
        down_block_types=TINY_DOWN_BLOCKS,
        up_block_types=TINY_UP_BLOCKS,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=_norm_groups(channels),
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=heads,
    )


def make_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The DDPM training schedule of ``cfg`` (epsilon prediction)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )


def default_text_encoder(cfg: ModelConfig) -> CaptionEncoder:
    """The frozen caption encoder of a tiny model: the shared MiniLM instance, or
    ``text.build_text_encoder(cfg)`` for other choices."""
    from pogdiff.model import text

    if cfg.text_encoder == "minilm":
        return text.default_minilm(cfg.max_caption_tokens)
    return text.build_text_encoder(cfg)


def build_tiny(cfg: ModelConfig, *, seed: int = 0, text_encoder: CaptionEncoder | None = None) -> DiffusionModel:
    """A freshly initialised tiny model; the same ``seed`` gives the same weights and the global
    RNG is left untouched. ``text_encoder`` defaults to the shared MiniLM encoder."""
    if text_encoder is None:
        text_encoder = default_text_encoder(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_unet(cfg)
    model = from_parts(cfg, unet=unet, scheduler=make_noise_scheduler(cfg), text_encoder=text_encoder)
    logger.info("tiny UNet: %.2fM parameters", model.num_parameters() / 1e6)
    return model


def from_parts(
    cfg: ModelConfig,
    *,
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    text_encoder: CaptionEncoder,
    vae: AutoencoderKL | None = None,
) -> DiffusionModel:
    """Bundle existing parts (the caller decides which parameters are trainable)."""
    return DiffusionModel(cfg, unet=unet, noise_scheduler=scheduler, text_encoder=text_encoder, vae=vae)


# --- Stable Diffusion preset ------------------------------------------------------------------


def lora_config(rank: int):
    """peft LoraConfig on the UNet attention projections (alpha = rank, so scale 1)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES)
    )


def add_lora(unet: UNet2DConditionModel, rank: int) -> None:
    """Freeze ``unet`` and add a trainable LoRA adapter of ``rank`` to its attention layers."""
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank))


def use_local_files(pretrained: str) -> bool:
    """True when `pretrained` is a local folder or the Hub is switched off (``HF_HUB_OFFLINE``): load without asking the Hub."""
    return Path(pretrained).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


def load_stable_diffusion(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    unet: UNet2DConditionModel | None = None,
) -> DiffusionModel:
    """Stable Diffusion components of ``cfg.pretrained`` (hub id or local diffusers folder).

    VAE and CLIP text encoder are frozen in ``dtype``. The UNet gets LoRA (frozen weights in
    ``dtype``, LoRA weights float32) unless ``cfg.full_finetune`` (then the whole UNet is
    trainable and kept float32). The training schedule is the pipeline's own scheduler config,
    with ``num_train_timesteps`` and ``beta_schedule`` from ``cfg``. A given ``unet`` (e.g. a
    fully fine-tuned one from a checkpoint) replaces the pipeline's.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    from pogdiff.model import text

    if not cfg.pretrained:
        raise ValueError("ModelConfig.pretrained is empty; give a hub id or a local pipeline folder")
    src = cfg.pretrained
    kw = {"local_files_only": use_local_files(src)}
    scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    overrides = {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule}
    changed = {k: v for k, v in overrides.items() if scheduler.config.get(k) != v}
    if changed:
        logger.warning("overriding the pipeline's scheduler config with %s", changed)
        scheduler = DDPMScheduler.from_config(scheduler.config, **changed)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
    clip = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=dtype, **kw)
    clip.requires_grad_(False).eval()
    unet_dtype = torch.float32 if cfg.full_finetune else dtype
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=unet_dtype, **kw)
    unet.to(unet_dtype)
    if cfg.cross_attention_dim != unet.config.cross_attention_dim:
        logger.warning(
            "ModelConfig.cross_attention_dim=%d differs from the pipeline's %d; using the pipeline's",
            cfg.cross_attention_dim, unet.config.cross_attention_dim,
        )
        cfg = dataclasses.replace(cfg, cross_attention_dim=unet.config.cross_attention_dim)
    if cfg.full_finetune:
        unet.requires_grad_(True)
    else:
        add_lora(unet, cfg.lora_rank)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.gradient_checkpointing == "on":  # "auto" is decided by the trainer, on the training device
        unet.enable_gradient_checkpointing()
    encoder = text.build_text_encoder(cfg, clip_tokenizer=tokenizer, clip_model=clip, device=str(device))
    unet.to(device)
    vae.to(device)
    model = from_parts(cfg, unet=unet, scheduler=scheduler, text_encoder=encoder, vae=vae)
    logger.info(
        "Stable Diffusion from %s: UNet %.1fM parameters, %.2fM trainable",
        src, model.num_parameters() / 1e6, model.num_parameters(trainable_only=True) / 1e6,
    )
    return model
