"""Stand-ins and small helpers shared by the tests: a caption encoder, a train function and a data set
for the job manager, small image-text sets on disk, a Train form, a free port, a tiny CLIP, the browser."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

TOKEN_DIM = 16
GATE_TIMEOUT = 10.0  # seconds a gated FakeTrain waits for the test to release a step


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
        from pogdiff.model.text import TextEmbeddings

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


# --------------------------------------------------------------------------------------------
# the job manager's train function and data set


@dataclass
class FakeStep:
    step: int
    max_steps: int
    terms: dict = field(default_factory=dict)
    lr: float = 1e-4
    psi_mean: float = 0.1
    psi_active: float = 0.5
    seconds_per_step: float = 0.01
    eta_seconds: float = 1.0


@dataclass
class FakeResult:
    run_dir: Path
    last_checkpoint: Path
    steps_done: int
    stopped: bool
    history: list


class FakeTrain:
    """Mimics pogdiff.training.run.train: steps gated by the test, honours stop_event, writes a checkpoint."""

    def __init__(self, *, gated: bool = False, fail_at: int | None = None) -> None:
        self.gated = gated
        self.fail_at = fail_at
        self.step_gate = threading.Semaphore(0)
        self.started = threading.Event()
        self.kwargs: dict = {}

    def __call__(self, *, dataset, model_cfg, train_cfg, run_dir, base_checkpoint=None, callback=None,
                 preview_callback=None, preview_captions=None, stop_event=None, cache_dir=None):
        self.kwargs = dict(dataset=dataset, base_checkpoint=base_checkpoint, preview_captions=preview_captions,
                           run_dir=Path(run_dir), train_cfg=train_cfg)
        self.started.set()
        steps_done, stopped = 0, False
        for step in range(1, train_cfg.max_steps + 1):
            if self.gated:
                assert self.step_gate.acquire(timeout=GATE_TIMEOUT)
            if stop_event is not None and stop_event.is_set():
                stopped = True
                break
            if self.fail_at == step:
                raise ValueError("learning_rate must be positive, got -1")
            steps_done = step
            callback(FakeStep(step, train_cfg.max_steps, {"loss": 1.0 / step, "mse": 0.5 / step, "pog": 0.1}))
            if preview_callback is not None and step % 2 == 0:
                preview_callback(step, np.full((2, 8, 8, 3), step, np.uint8), list(preview_captions or ["a", "b"]))
        ckpt = Path(run_dir) / f"checkpoint-{steps_done:06d}"
        (ckpt / "unet").mkdir(parents=True, exist_ok=True)
        (ckpt / "configs.json").write_text(json.dumps({"model": {}, "train": {"method": train_cfg.method}}))
        (ckpt / "unet" / "weights.safetensors").write_bytes(b"\0" * 16)
        return FakeResult(Path(run_dir), ckpt, steps_done, stopped, [])


class FakeDataset:
    root = "demo"
    samples = [0, 1, 2]
    subjects = ["a", "a", "b"]


# --------------------------------------------------------------------------------------------
# small image-text sets and the Train form


def tiny_set(folder, counts=None):
    """A metadata.jsonl set of random 32 px images in ``folder``: ``counts`` images per subject (default
    Ann Lee 6, Bo Chan 2)."""
    counts = counts or {"Ann Lee": 6, "Bo Chan": 2}
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for subject, n in counts.items():
        for i in range(n):
            name = f"{subject.split()[0].lower()}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
            rows.append({"file_name": name, "text": f"a photo of {subject}, about {20 + 5 * i} years old",
                         "subject": subject})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def noop_progress(*args, **kwargs):
    return None


SHAPES = {"red circle": 8, "blue square": 5, "green triangle": 3, "yellow star": 2, "purple hexagon": 1}


def kohya_zip(path):
    """A flat kohya-style zip: one .txt of comma-separated tags per image, the class tag first (the load
    benchmark's small upload, :func:`pogdiff.bench.visitors.small_zip`, with seed 0; its classes are ``SHAPES``)."""
    from pogdiff.bench.visitors import small_zip

    return small_zip(path, seed=0)


def train_form(**changes):
    """A small :class:`pogdiff.ui.TrainForm`: 4 steps of batch 2, psi over 3 neighbours from any caption,
    previews every 2, ``changes`` applied (any field)."""
    from pogdiff.ui.train_form import TrainForm

    small = TrainForm(steps=4, batch_size=2, lr=1e-4, psi_max=1.0, k=3, pool="all", sample_every=2, seed=0)
    return dataclasses.replace(small, **changes)


# --------------------------------------------------------------------------------------------
# a real browser (Debian's chromium driven by Playwright)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
VIEWPORT = {"width": 1440, "height": 1000}


def browser_or_skip():
    """Playwright's sync_playwright, or a skip (a failure with POGDIFF_REQUIRE_BROWSER=1) without
    Debian's chromium or playwright."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
        if os.environ.get("POGDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (POGDIFF_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover
        if os.environ.get("POGDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"playwright is not installed: {exc}")
        pytest.skip(f"playwright is not installed: {exc}")
    return sync_playwright


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


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
    :func:`pogdiff.model.models.load_stable_diffusion` loads as it would a real one; returns its path.

    ``python -m tests.fakes FOLDER`` writes one (``scripts/gpu_check.sh`` uses it).
    """
    folder = Path(folder)
    tiny_sd_pipeline(folder, hidden=hidden, seed=seed).save_pretrained(folder / "pipe")
    return folder / "pipe"


if __name__ == "__main__":
    import sys

    print(write_tiny_sd_pipeline(sys.argv[1]))


def loss_curve(history, term: str = "loss") -> np.ndarray:
    """[S] float array of one loss term over the steps of a run (``TrainResult.history``)."""
    return np.array([h.terms.get(term, float("nan")) for h in history], dtype=np.float64)


def relative_luminance(hex_colour: str) -> float:
    """WCAG relative luminance of ``#rrggbb`` (0 black .. 1 white)."""
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def family_of(spec) -> dict[str, str]:
    """Subject -> head of its family in an embedded set (families kind; every subject is its own head otherwise)."""
    from pogdiff.data.demo import demo_identities

    idents = demo_identities(spec)
    if spec.kind != "families":
        return {i.name: i.name for i in idents}
    size = 1 + spec.relatives
    return {ident.name: idents[(k // size) * size].name for k, ident in enumerate(idents)}


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --- small files for the data loader tests ---------------------------------------------------

def png(colour=RED, size=(8, 8), mode="RGB", fmt="PNG", **save) -> bytes:
    """One image of one colour, encoded (PNG unless ``fmt``)."""
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, fmt, **save)
    return buf.getvalue()


def jsonl(*rows) -> str:
    """``metadata.jsonl`` text of ``rows``."""
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"


def write_folder(root, files):
    """Write ``{relative name: bytes or text}`` under ``root``; return ``root``."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return root


def write_zip(path, files, compression=zipfile.ZIP_DEFLATED):
    """A zip of ``[(name, bytes or text)]``, names kept as given (duplicates and unsafe names included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names on purpose
        with zipfile.ZipFile(path, "w", compression) as zf:
            for name, data in files:
                info = zipfile.ZipInfo(name)  # keeps unsafe names as given, unlike writestr(str, ...)
                info.compress_type = compression
                zf.writestr(info, data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def issue(ds_or_report, code):
    """The first issue with ``code`` of a loaded set or a report (the test fails when there is none)."""
    report = getattr(ds_or_report, "report", ds_or_report)
    found = [i for i in report.issues if i.code == code]
    assert found, f"no {code!r} issue in {report.codes()}"
    return found[0]


# --- tiny Stable Diffusion parts -------------------------------------------------------------

SD_HIDDEN = 32  # the tiny CLIP's width, also the UNet's cross-attention width
SD_LORA_RANK = 4
