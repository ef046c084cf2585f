"""Caption encoders: shapes, closed-form pooling, sentence-transformers parity, cache round trip."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pogdiff.config import ModelConfig
from pogdiff.model.text import (
    CachedEncoder,
    CaptionEncoder,
    CLIPCaptionEncoder,
    MiniLMEncoder,
    TextEmbeddings,
    build_text_encoder,
    default_minilm,
    minilm_model_dir,
)
from tests.fakes import tiny_clip_parts

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, never the hub

CAPTIONS = [
    "a photo of Mira Okafor, about 60 years old, smiling, wearing glasses",
    "a photo of Mira Okafor, about 30 years old",
    "a photo of Tomas Varga with a neutral expression",
    "quarterly tax report",
]


def _emb(n: int, seed: int = 0) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(5)[None, :] < torch.randint(1, 6, (n, 1), generator=g)
    return TextEmbeddings(torch.randn(n, 3, generator=g), torch.randn(n, 5, 2, generator=g), mask)


def test_text_embeddings_index_cat_to():
    e = _emb(6)
    assert len(e) == 6
    for idx in ([4, 1], torch.tensor([4, 1]), np.array([4, 1])):
        sub = e.index(idx)
        assert len(sub) == 2
        assert torch.equal(sub.pooled, e.pooled[[4, 1]]) and torch.equal(sub.tokens[1], e.tokens[1])
        assert torch.equal(sub.mask, e.mask[[4, 1]])
    assert torch.equal(e.index(slice(2, 4)).tokens, e.tokens[2:4])
    assert len(e.index(3)) == 1
    both = TextEmbeddings.cat([e.index(slice(0, 2)), e.index(slice(2, 6))])
    assert all(torch.equal(getattr(both, f), getattr(e, f)) for f in ("pooled", "tokens", "mask"))
    assert e.to("cpu").mask.dtype == torch.bool
    with pytest.raises(ValueError, match="at least one part"):
        TextEmbeddings.cat([])
    with pytest.raises(ValueError, match="pooled has 2 rows but tokens has 3"):
        TextEmbeddings(torch.zeros(2, 3), torch.zeros(3, 5, 2), torch.zeros(3, 5, dtype=torch.bool))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_clip_parts(tmp_path_factory.mktemp("clip"), hidden_size=32, seed=0)


def test_tiny_clip_encoder_shapes_and_pooling(tiny_clip):
    tokenizer, model = tiny_clip
    enc = CLIPCaptionEncoder(tokenizer, model, max_tokens=16)
    assert isinstance(enc, CaptionEncoder)
    assert (enc.pooled_dim, enc.token_dim, enc.max_tokens) == (32, 32, 16)
    out = enc.encode(CAPTIONS[2:] + ["x"])
    assert out.pooled.shape == (3, 32) and out.tokens.shape == (3, 16, 32) and out.mask.shape == (3, 16)
    assert out.pooled.dtype == out.tokens.dtype == torch.float32 and out.mask.dtype == torch.bool
    torch.testing.assert_close(out.pooled.norm(dim=1), torch.ones(3))
    # "x" -> <start> x <end>: 3 real tokens; the long caption is truncated to 16 with <end> last
    n_real = out.mask.sum(1)
    assert n_real.tolist()[2] == 3 and n_real.tolist()[0] == 16
    ids = tokenizer(["x"]).input_ids[0]
    assert ids == [tokenizer.bos_token_id, ids[1], tokenizer.eos_token_id]
    # pooled = the final-layer-normed state at the end token, L2-normalised
    eos_state = out.tokens[torch.arange(3), n_real - 1]
    torch.testing.assert_close(out.pooled, torch.nn.functional.normalize(eos_state, dim=1))
    # real tokens do not see the padding (causal attention): a longer max_tokens changes nothing
    longer = CLIPCaptionEncoder(tokenizer, model, max_tokens=24).encode(["x"])
    torch.testing.assert_close(longer.tokens[0, :3], out.tokens[2, :3])
    torch.testing.assert_close(longer.pooled[0], out.pooled[2])
    empty = enc.encode([])
    assert empty.pooled.shape == (0, 32) and empty.tokens.shape == (0, 16, 32)


def test_tiny_clip_parts_deterministic(tmp_path):
    tok_a, model_a = tiny_clip_parts(tmp_path / "a", seed=3)
    tok_b, model_b = tiny_clip_parts(tmp_path / "b", seed=3)
    _, model_c = tiny_clip_parts(tmp_path / "c", seed=4)
    state = torch.get_rng_state()
    a = CLIPCaptionEncoder(tok_a, model_a, max_tokens=8).encode(CAPTIONS)
    b = CLIPCaptionEncoder(tok_b, model_b, max_tokens=8).encode(CAPTIONS)
    c = CLIPCaptionEncoder(tok_a, model_c, max_tokens=8).encode(CAPTIONS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    assert not torch.allclose(a.pooled, c.pooled)
    assert torch.equal(torch.get_rng_state(), state)
    assert (tmp_path / "a" / "vocab.json").is_file() and (tmp_path / "a" / "merges.txt").is_file()
    assert tok_a.tokenize("a photo of")[1:] == ["photo</w>", "of</w>"]


class _Counting:
    """Delegating encoder that counts calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.pooled_dim = inner.name, inner.pooled_dim
        self.token_dim, self.max_tokens = inner.token_dim, inner.max_tokens

    def encode(self, captions):
        self.calls += 1
        return self.inner.encode(captions)


def test_cached_encoder_round_trip(tiny_clip, tmp_path):
    tokenizer, model = tiny_clip
    inner = _Counting(CLIPCaptionEncoder(tokenizer, model, max_tokens=12))
    cached = CachedEncoder(inner, tmp_path / "cache")
    first = cached.encode(CAPTIONS)
    assert inner.calls == 1 and cached.path(CAPTIONS).is_file()
    again = CachedEncoder(inner, tmp_path / "cache").encode(CAPTIONS)
    assert inner.calls == 1  # read from disk
    for field in ("pooled", "tokens", "mask"):
        got, want = getattr(again, field), getattr(first, field)
        assert got.dtype == want.dtype and torch.equal(got, want)
    direct = inner.inner.encode(CAPTIONS)
    assert torch.equal(direct.tokens, again.tokens)
    # the key depends on captions (order included), the encoder name and max_tokens
    assert cached.key(CAPTIONS) != cached.key(CAPTIONS[::-1])
    other = CachedEncoder(CLIPCaptionEncoder(tokenizer, model, max_tokens=13), tmp_path / "cache")
    assert other.key(CAPTIONS) != cached.key(CAPTIONS)
    cached.encode(CAPTIONS[:2])
    assert inner.calls == 2
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))


@pytest.fixture(scope="module")
def minilm():
    return default_minilm(32)


def test_minilm_shapes_normalisation_and_padding(minilm):
    out = minilm.encode(CAPTIONS)
    assert (minilm.pooled_dim, minilm.token_dim) == (384, 384)
    assert out.pooled.shape == (4, 384) and out.tokens.shape == (4, 32, 384) and out.mask.shape == (4, 32)
    torch.testing.assert_close(out.pooled.norm(dim=1), torch.ones(4))
    tok = minilm._tokenizer
    lengths = [min(len(tok(c).input_ids), 32) for c in CAPTIONS]
    assert out.mask.sum(1).tolist() == lengths
    assert torch.all(out.tokens[~out.mask] == 0) and torch.all(out.tokens[out.mask].abs().sum(-1) > 0)
    # nearest caption by cosine is the paraphrase, not the unrelated one
    sims = out.pooled @ out.pooled.T
    assert sims[0, 1] > sims[0, 2] > sims[0, 3]


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_model_dir()), device="cpu").encode(
        CAPTIONS, convert_to_numpy=True, normalize_embeddings=False
    )
    np.testing.assert_allclose(minilm.encode(CAPTIONS).pooled.numpy(), reference, atol=1e-5)


def test_minilm_deterministic_and_batch_independent(minilm):
    a = minilm.encode(CAPTIONS)
    b = minilm.encode(CAPTIONS)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)
    small = MiniLMEncoder(max_tokens=8, batch_size=1)
    assert small._model is None  # weights load lazily, on the first encode
    small._tokenizer, small._model = minilm._tokenizer, minilm._model  # same weights, no reload
    c = small.encode(CAPTIONS)
    torch.testing.assert_close(c.pooled, a.pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(c.tokens, a.tokens[:, :8], atol=1e-4, rtol=0)
    assert torch.equal(c.mask, a.mask[:, :8]) and c.mask[:3].all() and not c.mask[3].all()


def test_default_minilm_is_shared_and_factory(tmp_path, tiny_clip):
    assert default_minilm(32) is default_minilm(32)
    assert default_minilm(16) is not default_minilm(32)
    enc = build_text_encoder(ModelConfig(text_encoder="minilm", max_caption_tokens=32))
    assert enc is default_minilm(32)
    cached = build_text_encoder(ModelConfig(), cache_dir=tmp_path)
    assert isinstance(cached, CachedEncoder) and cached.max_tokens == 32
    tokenizer, model = tiny_clip
    clip = build_text_encoder(ModelConfig(text_encoder="clip", max_caption_tokens=10),
                              clip_tokenizer=tokenizer, clip_model=model)
    assert isinstance(clip, CLIPCaptionEncoder) and clip.max_tokens == 10
    with pytest.raises(ValueError, match="text_encoder 'clip' needs clip_tokenizer and clip_model"):
        build_text_encoder(ModelConfig(text_encoder="clip"))
    with pytest.raises(ValueError, match="unknown text_encoder 't5'; choose one of minilm, clip"):
        build_text_encoder(ModelConfig(text_encoder="t5"))
    with pytest.raises(TypeError, match="not a single string"):
        enc.encode("a photo")
