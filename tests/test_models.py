"""pogdiff.model.models: tiny UNet shape / size / attention layout, determinism, conditioning, LoRA."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention

from pogdiff.config import ModelConfig
from pogdiff.model.models import (
    DiffusionModel,
    add_lora,
    build_tiny,
    count_parameters,
    from_parts,
    make_noise_scheduler,
    tiny_unet,
)
from tests.fakes import TOKEN_DIM, HashEncoder

logger = logging.getLogger(__name__)
SMALL = ModelConfig(block_out_channels=(8, 16, 32), resolution=16, cross_attention_dim=TOKEN_DIM)








def _small(seed: int = 0) -> DiffusionModel:
    return build_tiny(SMALL, seed=seed, text_encoder=HashEncoder())


def _inputs(model: DiffusionModel, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, *model.latent_shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    tokens, mask = model.encode_captions(["a red cat", "two dogs on grass"][:n])
    return x_t, t, tokens, mask


def test_default_tiny_unet_forward_shape_and_size():
    cfg = ModelConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = tiny_unet(cfg)
    n = count_parameters(unet)
    logger.info("default tiny UNet: %d parameters", n)
    assert 1_000_000 < n < 15_000_000
    x = torch.randn(2, 3, cfg.resolution, cfg.resolution)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim)
    with torch.no_grad():
        out = unet(x, torch.tensor([1, 500]), encoder_hidden_states=ctx).sample
    assert out.shape == x.shape
    assert unet.config.norm_num_groups == 8


def test_cross_attention_only_at_lowest_resolution():
    unet = tiny_unet(SMALL)
    prefixes = {k.split(".attentions")[0] for k in unet.attn_processors}
    assert prefixes == {"down_blocks.2", "mid_block", "up_blocks.0"}
    assert all(not hasattr(unet.down_blocks[i], "attentions") for i in (0, 1))
    assert all(not hasattr(unet.up_blocks[i], "attentions") for i in (1, 2))
    seen: list[int] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, kw, out: seen.append(args[0].shape[1]), with_kwargs=True)
        for name, m in unet.named_modules() if isinstance(m, Attention) and name.endswith("attn2")
    ]
    lowest = (SMALL.resolution // 4) ** 2
    with torch.no_grad():
        unet(torch.randn(1, 3, 16, 16), torch.tensor([3]), encoder_hidden_states=torch.randn(1, 4, TOKEN_DIM))
    for h in hooks:
        h.remove()
    assert seen == [lowest] * 4  # down (1 layer), mid, up (2 layers): all at 4x4 tokens


def test_attention_head_dim_is_the_per_head_width():
    unet = tiny_unet(ModelConfig(block_out_channels=(16, 32, 64), attention_head_dim=16))
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn2
    assert attn.heads == 4 and attn.inner_dim // attn.heads == 16


def test_build_tiny_is_deterministic_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a, b, c = _small(seed=3), _small(seed=3), _small(seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_predict_eps_shape_and_mask_hides_padding():
    model = _small()
    x_t, t, tokens, mask = _inputs(model)
    with torch.no_grad():
        eps = model.predict_eps(x_t, t, tokens, mask)
        garbage = tokens.clone()
        garbage[~mask] = 5.0  # change only masked-out positions
        eps_masked = model.predict_eps(x_t, t, garbage, mask)
        eps_unmasked = model.predict_eps(x_t, t, garbage, None)
    assert eps.shape == x_t.shape
    torch.testing.assert_close(eps, eps_masked, rtol=0, atol=1e-6)
    assert (eps - eps_unmasked).abs().max() > 1e-4


def test_predict_eps_converts_v_prediction():
    model = _small()
    x_t, t, tokens, mask = _inputs(model)
    with torch.no_grad():
        v = model.predict_eps(x_t, t, tokens, mask)  # epsilon model: raw UNet output
        model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config, prediction_type="v_prediction")
        eps = model.predict_eps(x_t, t, tokens, mask)
    abar = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, abar.sqrt() * v + (1 - abar).sqrt() * x_t)


def test_null_context_is_cached_and_expanded():
    model = _small()
    calls = model.text_encoder.calls
    tokens, mask = model.null_context(3)
    tokens2, _ = model.null_context(5)
    assert model.text_encoder.calls == calls + 1
    assert tokens.shape == (3, HashEncoder.max_tokens, TOKEN_DIM) and mask.shape == (3, HashEncoder.max_tokens)
    assert mask[:, 0].all() and not mask[:, 1:].any()  # the empty caption keeps only its start token
    torch.testing.assert_close(tokens2[:3], tokens)


def test_tiny_pixel_space_and_trainable_parameters():
    model = _small()
    assert model.vae is None and model.latent_shape == (3, 16, 16)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(model.encode_images(images), images)
    torch.testing.assert_close(model.decode(images * 3), (images * 3).clamp(-1, 1))
    params = model.trainable_parameters()
    assert sum(p.numel() for p in params) == model.num_parameters() == count_parameters(model.unet)
    assert not model.is_lora


def test_add_lora_trains_only_adapters_and_starts_from_the_base_output():
    model = _small()
    x_t, t, tokens, mask = _inputs(model)
    with torch.no_grad():
        base = model.predict_eps(x_t, t, tokens, mask)
    add_lora(model.unet, rank=2)
    names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert model.is_lora and len(model.trainable_parameters()) == len(names)
    with torch.no_grad():  # gaussian init: lora_B = 0, so the adapter starts as the identity
        torch.testing.assert_close(model.predict_eps(x_t, t, tokens, mask), base)
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        add_lora(tiny_unet(SMALL), rank=0)


def test_token_dim_mismatch_is_an_error():
    cfg = ModelConfig(block_out_channels=(8, 16, 32), resolution=16, cross_attention_dim=24)
    with pytest.raises(ValueError, match="token_dim=16 does not match the UNet's cross_attention_dim=24"):
        from_parts(cfg, unet=tiny_unet(cfg), scheduler=make_noise_scheduler(cfg), text_encoder=HashEncoder())


def test_bad_block_count_and_resolution():
    with pytest.raises(ValueError, match="block_out_channels must have 3 entries"):
        tiny_unet(ModelConfig(block_out_channels=(8, 16)))
    with pytest.raises(ValueError, match="resolution=18 must be a multiple of 4"):
        tiny_unet(ModelConfig(resolution=18))


def test_default_text_encoder_is_minilm_and_feeds_the_unet():
    cfg = ModelConfig(block_out_channels=(8, 16, 32), resolution=16)
    model = build_tiny(cfg, seed=0)
    assert model.text_encoder.token_dim == cfg.cross_attention_dim == model.unet.config.cross_attention_dim == 384
    tokens, mask = model.encode_captions(["a photo of Mira Okafor, smiling"])
    null_tokens, null_mask = model.null_context(2)
    assert tokens.shape == (1, cfg.max_caption_tokens, 384) and null_tokens.shape == (2, cfg.max_caption_tokens, 384)
    assert mask.sum() > null_mask[0].sum() >= 1 and not tokens.is_inference() and not null_tokens.is_inference()
    x_t = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    eps = model.predict_eps(x_t, torch.tensor([500]), tokens, mask)
    eps.square().mean().backward()  # grad flows from encoder outputs made under inference_mode
    assert model.unet.conv_in.weight.grad is not None


def _schedule(kind: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=kind,
                         clip_sample=False)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_output_to_eps_recovers_eps_from_the_exact_target_of_each_prediction_type(kind):
    from pogdiff.model.models import output_to_eps

    sched = _schedule(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    t = torch.tensor([0, 10, 300, 700, 990])
    abar = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "sample": x0}[kind]
    if kind == "v_prediction":  # the same v as diffusers' own definition
        torch.testing.assert_close(target, sched.get_velocity(x0, eps, t).double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(output_to_eps(target, x_t, t, sched), eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_eps_loss_weights_turn_the_eps_error_into_the_native_error(kind):
    from diffusers.training_utils import compute_snr

    from pogdiff.model.models import output_to_eps
    from pogdiff.method.losses import eps_loss_weights

    sched = _schedule(kind)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    pred = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)  # an arbitrary native-space output
    t = torch.tensor([1, 50, 250, 500, 750, 950])
    abar = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "sample": x0}[kind]
    native = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    in_eps = ((output_to_eps(pred, x_t, t, sched) - eps) ** 2).mean(dim=(1, 2, 3))
    w = eps_loss_weights(t, sched)
    if kind == "epsilon":
        assert w is None
        torch.testing.assert_close(in_eps, native)
    else:
        torch.testing.assert_close(in_eps * w.double(), native, rtol=1e-4, atol=0)
    # Min-SNR (diffusers' weights on the native loss) is min(snr, gamma) / snr in eps space for every type.
    snr = compute_snr(sched, t).double()
    diffusers_weight = {"epsilon": torch.clamp(snr, max=5.0) / snr,
                        "v_prediction": torch.clamp(snr, max=5.0) / (snr + 1),
                        "sample": torch.clamp(snr, max=5.0)}[kind]
    w5 = eps_loss_weights(t, sched, snr_gamma=5.0).double()
    torch.testing.assert_close(in_eps * w5, native * diffusers_weight, rtol=1e-4, atol=0)
    torch.testing.assert_close(w5, torch.clamp(snr, max=5.0) / snr, rtol=1e-5, atol=0)
    # Below gamma the weight is 1 up to float32 rounding of the eps-space conversion (last bit).
    assert torch.allclose(w5[snr < 5], torch.ones_like(w5[snr < 5]), rtol=0, atol=1e-6)
    assert bool((w5[snr > 5] < 1).all())


def test_predict_eps_works_through_a_distributed_data_parallel_wrapper():
    import torch.distributed as dist

    from pogdiff.model.models import is_lora, unwrap
    from tests.fakes import free_port

    model = _small()
    x_t, t, tokens, mask = _inputs(model)
    with torch.no_grad():
        expected = model.predict_eps(x_t, t, tokens, mask)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        raw = model.unet
        model.unet = torch.nn.parallel.DistributedDataParallel(raw)
        assert unwrap(model.unet) is raw and model.dtype == torch.float32 and not is_lora(model.unet)
        with torch.no_grad():
            got = model.predict_eps(x_t, t, tokens, mask)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
