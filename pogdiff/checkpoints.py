"""Checkpoints: safetensors + JSON only, written atomically, resumable, exportable to diffusers.

Layout of ``run_dir/checkpoint-{step:06d}/``::

    unet/                     tiny or full fine-tune: UNet2DConditionModel.save_pretrained (safetensors)
                              LoRA: pytorch_lora_weights.safetensors (StableDiffusionPipeline.save_lora_weights)
    ema_unet/                 optional, same format as unet/
    configs.json              {"model": ModelConfig, "train": TrainConfig}
    trainer_state.safetensors optimizer state tensors, keys "state.{param_idx}.{name}"
    trainer_state.json        step, extra, optimizer param_groups and non-tensor state values

Nothing is ever loaded with pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from pogdiff.config import ModelConfig, TrainConfig, from_dict, to_dict
from pogdiff.models import (
    DiffusionModel,
    default_text_encoder,
    from_parts,
    is_lora,
    load_stable_diffusion,
    make_noise_scheduler,
)

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{6,})$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
UNET_DIR = "unet"
EMA_DIR = "ema_unet"
CONFIGS_FILE = "configs.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


# --- UNet weights -----------------------------------------------------------------------------


def _lora_state_dict(unet: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """peft LoRA weights of ``unet`` (or of ``state_dict``) in diffusers' key format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=state_dict))


def _save_unet(unet: nn.Module, folder: Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``unet`` (full weights) or its LoRA weights to ``folder``."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    if is_lora(unet):
        lora = {k: v.detach().cpu().contiguous() for k, v in _lora_state_dict(unet, state_dict).items()}
        StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=lora, safe_serialization=True)
    else:
        assert state_dict is None, "full-weight EMA must be copied into the module before saving"
        unet.save_pretrained(folder, safe_serialization=True)


def _load_lora(unet: nn.Module, folder: Path) -> None:
    """Load LoRA weights saved by :func:`_save_unet` into ``unet``'s "default" adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    raw = load_file(folder / LORA_WEIGHTS)
    prefix = "unet."
    sd = convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in raw.items()})
    result = set_peft_model_state_dict(unet, sd, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{folder}: LoRA weights do not fit the UNet, unexpected keys {unexpected[:5]}")


def _save_ema(ema: Any, model: DiffusionModel, folder: Path) -> None:
    """``ema`` is a UNet of the same structure as ``model.unet`` or a diffusers ``EMAModel``
    whose shadow parameters follow ``model.trainable_parameters()``."""
    if isinstance(ema, nn.Module):
        _save_unet(ema, folder)
        return
    params = model.trainable_parameters()
    if model.is_lora:
        names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
        _save_unet(model.unet, folder, state_dict=dict(zip(names, ema.shadow_params, strict=True)))
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        _save_unet(model.unet, folder)
    finally:
        ema.restore(params)


# --- optimizer state --------------------------------------------------------------------------


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state -> tensors ``{"state.{idx}.{name}": T}`` and JSON (param_groups + scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "state_scalars": scalars}


def _restore_like(value: Any, reference: Any) -> Any:
    """JSON turned tuples into lists; give them back the type of ``reference``."""
    if isinstance(reference, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                         optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["state_scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    fresh = optimizer.state_dict()["param_groups"]
    if len(fresh) != len(meta["param_groups"]):
        raise ValueError(
            f"optimizer has {len(fresh)} param group(s), checkpoint has {len(meta['param_groups'])}"
        )
    groups = [
        {k: _restore_like(v, ref.get(k)) for k, v in group.items()}
        for group, ref in zip(meta["param_groups"], fresh, strict=True)
    ]
    return {"state": state, "param_groups": groups}


# --- save / find / load -----------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _checkpoint_step(path: Path) -> int | None:
    """Step of a complete checkpoint folder (from trainer_state.json), None otherwise."""
    state = path / STATE_JSON
    if path.name.startswith(".") or not state.is_file():
        return None
    return int(json.loads(state.read_text())["step"])


def _numbered(run_dir: Path) -> list[Path]:
    """checkpoint-NNNNNN folders, oldest first."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: DiffusionModel,
    *,
    train_cfg: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    ema_unet: Any = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    name: str | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-{step:06d}`` (or ``run_dir/name``, e.g. "final") atomically.

    The folder is built under a hidden temporary name and renamed into place, so a reader never
    sees a partial checkpoint. Afterwards only the ``keep`` newest numbered checkpoints remain;
    named ones (e.g. "final") are never pruned. ``extra`` must be JSON-serialisable.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = name or f"checkpoint-{step:06d}"
    target = run_dir / name
    tmp = run_dir / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_unet(model.unet, tmp / UNET_DIR)
        if ema_unet is not None:
            _save_ema(ema_unet, model, tmp / EMA_DIR)
        _write_json(tmp / CONFIGS_FILE, {"model": to_dict(model.config), "train": to_dict(train_cfg)})
        state: dict[str, Any] = {"step": int(step), "extra": extra or {}}
        if optimizer is not None:
            tensors, state["optimizer"] = _flatten_optimizer(optimizer)
            save_file(tensors, tmp / STATE_TENSORS)
        if ema_unet is not None and not isinstance(ema_unet, nn.Module):
            state["ema"] = {k: v for k, v in ema_unet.state_dict().items() if k != "shadow_params"}
        _write_json(tmp / STATE_JSON, state)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _numbered(run_dir)[:-keep]:
        if old != target:
            shutil.rmtree(old)
            logger.debug("pruned %s", old)
    logger.info("saved checkpoint %s", target)
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is first renamed aside, then removed."""
    if target.exists():
        aside = target.with_name(f"{OLD_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, aside)
        os.replace(tmp, target)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, target)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of ``run_dir`` with the highest step (a named one wins a tie)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for path in run_dir.iterdir():
        step = _checkpoint_step(path) if path.is_dir() else None
        if step is not None:
            key = (step, 0 if CHECKPOINT_RE.match(path.name) else 1, path)
            best = key if best is None or key[:2] > best[:2] else best
    return None if best is None else best[2]


def load_configs(ckpt_dir: str | Path) -> tuple[ModelConfig, TrainConfig]:
    data = json.loads((Path(ckpt_dir) / CONFIGS_FILE).read_text())
    return from_dict(ModelConfig, data["model"]), from_dict(TrainConfig, data["train"])


def load_model(ckpt_dir: str | Path, *, device: torch.device | str = "cpu", text_encoder: Any = None,
               use_ema: bool = False) -> DiffusionModel:
    """Rebuild the model of a checkpoint (its UNet or, with ``use_ema``, its EMA UNet)."""
    ckpt_dir = Path(ckpt_dir)
    cfg, _ = load_configs(ckpt_dir)
    folder = ckpt_dir / (EMA_DIR if use_ema else UNET_DIR)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist" + (" (saved without EMA)" if use_ema else ""))
    if cfg.preset != "sd15":
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
        if text_encoder is None:
            text_encoder = default_text_encoder(cfg)
        model = from_parts(cfg, unet=unet, scheduler=make_noise_scheduler(cfg), text_encoder=text_encoder)
    elif cfg.full_finetune:
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
        model = load_stable_diffusion(cfg, device=device, unet=unet)
    else:
        model = load_stable_diffusion(cfg, device=device)
        _load_lora(model.unet, folder)
    if text_encoder is not None:
        model.text_encoder = text_encoder
    return model.to(device)


def store_half_precision(ckpt_dir: str | Path) -> None:
    """Rewrite the UNet weights of a checkpoint in float16, halving what the repository ships.

    :func:`load_model` always loads them back as float32; the rounding changes sampled pixels by
    at most a few levels. Optimizer state is not kept (shipped checkpoints are for fine-tuning
    from and sampling, not for resuming).
    """
    ckpt_dir = Path(ckpt_dir)
    for weights in (ckpt_dir / UNET_DIR).glob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    for name in (STATE_TENSORS,):
        (ckpt_dir / name).unlink(missing_ok=True)


def load_trainer_state(ckpt_dir: str | Path, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore ``optimizer`` exactly (if given) and return ``{"step", "extra", "ema"}``."""
    ckpt_dir = Path(ckpt_dir)
    state = json.loads((ckpt_dir / STATE_JSON).read_text())
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"{ckpt_dir} was saved without optimizer state")
        tensors = load_file(ckpt_dir / STATE_TENSORS) if (ckpt_dir / STATE_TENSORS).is_file() else {}
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"], optimizer))
    return {"step": state["step"], "extra": state.get("extra", {}), "ema": state.get("ema")}

