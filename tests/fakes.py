"""Small stand-ins shared by the model, sampling and checkpoint tests."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import torch

TOKEN_DIM = 16


class HashEncoder:
    """Deterministic stand-in caption encoder: one seeded random vector per word, padded to L."""

    name = "hash"
    pooled_dim = TOKEN_DIM
    token_dim = TOKEN_DIM
    max_tokens = 6

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, captions):
        self.calls += 1
        n, L = len(captions), self.max_tokens
        tokens, mask = torch.zeros(n, L, TOKEN_DIM), torch.zeros(n, L, dtype=torch.bool)
        for i, caption in enumerate(captions):
            for j, word in enumerate((["<s>"] + caption.split())[:L]):
                seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
                tokens[i, j] = torch.randn(TOKEN_DIM, generator=torch.Generator().manual_seed(seed))
                mask[i, j] = True
        from pogdiff.text import TextEmbeddings

        return TextEmbeddings(torch.nn.functional.normalize(tokens.sum(1), dim=-1), tokens, mask)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# a tiny CLIP text encoder, built offline


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: each byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


# A handful of merges so that common caption words become single tokens.
_TINY_MERGES = (
    "o f</w>", "p h", "o t", "ph ot", "phot o</w>", "t h", "th e</w>", "a n", "an d</w>",
    "i n", "in g</w>", "t h</w>", "w i", "wi th</w>", "y e", "a r", "ye ar", "year s</w>", "o l", "ol d</w>",
)


def tiny_clip_parts(tmp_dir: str | Path, *, hidden_size: int = 32, seed: int = 0) -> tuple[Any, Any]:
    """A tiny CLIP tokenizer and randomly initialised CLIPTextModel, for the CLIP and SD tests.

    Writes ``vocab.json`` and ``merges.txt`` (byte-level alphabet, each byte also with the
    ``</w>`` end-of-word suffix, a few merges, start / end tokens) into ``tmp_dir`` and builds
    from them; nothing is downloaded. The model has 2 layers, ``hidden_size`` dims and 77
    positions; its weights depend only on ``seed`` (the global RNG is left untouched).

    :return: ``(tokenizer, text_model)``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(tmp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in _TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_TINY_MERGES) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(folder)

    heads = next(h for h in (4, 2, 1) if hidden_size % h == 0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config).eval()
    return tokenizer, model


def tiny_sd_pipeline(folder: str | Path, *, hidden: int = 32, seed: int = 0):
    """A tiny randomly initialised Stable Diffusion pipeline (UNet, VAE, CLIP from
    :func:`tiny_clip_parts`, whose files go to ``folder/clip``, DDPM scaled-linear schedule): 32 px
    images, 8 x 8 latents. Nothing is downloaded; the weights depend only on ``seed``."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, text_encoder = tiny_clip_parts(Path(folder) / "clip", hidden_size=hidden, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=hidden,
            attention_head_dim=2,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=8, sample_size=32,
        )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_tiny_sd_pipeline(folder: str | Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """:func:`tiny_sd_pipeline` saved as a local diffusers folder ``folder/pipe`` that
    :func:`pogdiff.models.load_stable_diffusion` loads as it would a real one; returns its path.

    ``python -m tests.fakes FOLDER`` writes one (``scripts/gpu_check.sh`` uses it).
    """
    folder = Path(folder)
    tiny_sd_pipeline(folder, hidden=hidden, seed=seed).save_pretrained(folder / "pipe")
    return folder / "pipe"


if __name__ == "__main__":
    import sys

    print(write_tiny_sd_pipeline(sys.argv[1]))
