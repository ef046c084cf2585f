"""pogdiff.model.checkpoints: round trips, atomic writes, pruning, optimizer state, EMA, export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

import pogdiff.model.checkpoints as ckpt
from pogdiff.model.checkpoints import (
    latest_checkpoint,
    load_configs,
    load_model,
    load_trainer_state,
    save_checkpoint,
)
from pogdiff.config import ModelConfig, TrainConfig
from pogdiff.model.models import DiffusionModel, build_tiny
from tests.fakes import TOKEN_DIM, HashEncoder

SMALL = ModelConfig(block_out_channels=(8, 16, 32), resolution=16, cross_attention_dim=TOKEN_DIM)
TRAIN = TrainConfig(max_steps=7, batch_size=2, learning_rate=1e-3, seed=5)








def _model(seed: int = 0) -> DiffusionModel:
    return build_tiny(SMALL, seed=seed, text_encoder=HashEncoder())


def _batch(model: DiffusionModel, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, *model.latent_shape, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    tokens, mask = model.encode_captions(["a red cat", "a blue car"])
    return model.noise_scheduler.add_noise(x0, eps, t), t, tokens, mask, eps


def _step(model: DiffusionModel, opt: torch.optim.Optimizer, seed: int) -> None:
    x_t, t, tokens, mask, eps = _batch(model, seed)
    loss = torch.nn.functional.mse_loss(model.predict_eps(x_t, t, tokens, mask), eps)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _eps(model: DiffusionModel) -> torch.Tensor:
    with torch.no_grad():
        return model.predict_eps(*_batch(model, 99)[:4])


def test_save_load_round_trip_gives_equal_outputs(tmp_path):
    model = _model(seed=1)
    path = save_checkpoint(tmp_path, 12, model, train_cfg=TRAIN, extra={"loss": 0.5})
    assert path == tmp_path / "checkpoint-000012"
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert tuple(UNet2DConditionModel.from_pretrained(path / "unet").config.block_out_channels) == (8, 16, 32)
    loaded = load_model(path, text_encoder=HashEncoder())
    torch.testing.assert_close(_eps(loaded), _eps(model), rtol=0, atol=0)
    assert load_configs(path) == (SMALL, TRAIN)
    assert json.loads((path / "configs.json").read_text())["train"]["psi"]["k"] == TRAIN.psi.k
    assert load_trainer_state(path) == {"step": 12, "extra": {"loss": 0.5}, "ema": None}


def test_optimizer_state_round_trip_gives_the_identical_next_step(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.01)
    for s in range(3):
        _step(model, opt, s)
    path = save_checkpoint(tmp_path, 3, model, train_cfg=TRAIN, optimizer=opt)
    resumed = load_model(path, text_encoder=HashEncoder())
    opt2 = torch.optim.AdamW(resumed.trainable_parameters(), lr=5.0, betas=(0.9, 0.999))
    assert load_trainer_state(path, opt2)["step"] == 3
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-3
    _step(model, opt, 3)
    _step(resumed, opt2, 3)
    for p, q in zip(model.trainable_parameters(), resumed.trainable_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    state = opt2.state_dict()["state"][0]
    torch.testing.assert_close(state["exp_avg"], opt.state_dict()["state"][0]["exp_avg"], rtol=0, atol=0)


def test_write_is_atomic_and_old_checkpoints_are_pruned(tmp_path, monkeypatch):
    model = _model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, train_cfg=TRAIN, keep=2)
    final = save_checkpoint(tmp_path, 4, model, train_cfg=TRAIN, keep=2, name="final")
    save_checkpoint(tmp_path, 3, model, train_cfg=TRAIN, keep=2)  # overwriting a step is fine
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-000002", "checkpoint-000003", "final"]
    assert latest_checkpoint(tmp_path) == final

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, model, train_cfg=TRAIN, optimizer=opt, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no partial or temporary folder
    assert latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / ".tmp-checkpoint-000009-dead").mkdir()  # a crashed write is never "latest"
    assert latest_checkpoint(tmp_path) == final


def test_ema_module_and_ema_model_round_trip(tmp_path):
    model = _model()
    ema_unet = copy.deepcopy(model.unet)
    with torch.no_grad():
        for p in ema_unet.parameters():
            p.mul_(0.5)
    path = save_checkpoint(tmp_path, 1, model, train_cfg=TRAIN, ema_unet=ema_unet)
    loaded = load_model(path, text_encoder=HashEncoder(), use_ema=True)
    ema_model = DiffusionModel(SMALL, unet=ema_unet, noise_scheduler=model.noise_scheduler,
                               text_encoder=model.text_encoder)
    torch.testing.assert_close(_eps(loaded), _eps(ema_model), rtol=0, atol=0)

    ema = EMAModel(model.trainable_parameters(), decay=0.9)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    _step(model, opt, 0)
    ema.step(model.trainable_parameters())
    before = [p.detach().clone() for p in model.trainable_parameters()]
    path = save_checkpoint(tmp_path, 2, model, train_cfg=TRAIN, ema_unet=ema)
    loaded = load_model(path, text_encoder=HashEncoder(), use_ema=True)
    for shadow, p in zip(ema.shadow_params, loaded.trainable_parameters(), strict=True):
        torch.testing.assert_close(p, shadow, rtol=0, atol=0)
    for b, p in zip(before, model.trainable_parameters(), strict=True):
        torch.testing.assert_close(p, b, rtol=0, atol=0)  # the live weights were restored
    assert load_trainer_state(path)["ema"]["optimization_step"] == 1
    plain = save_checkpoint(tmp_path, 3, model, train_cfg=TRAIN)
    with pytest.raises(FileNotFoundError, match="saved without EMA"):
        load_model(plain, use_ema=True, text_encoder=HashEncoder())


def test_half_precision_storage_loads_back_as_float32_with_small_error(tmp_path):
    from pogdiff.bench.ship import store_half_precision

    model = build_tiny(SMALL, seed=0, text_encoder=HashEncoder())
    ckpt = save_checkpoint(tmp_path, 1, model, train_cfg=TRAIN)
    size_before = sum(f.stat().st_size for f in (ckpt / "unet").glob("*.safetensors"))
    store_half_precision(ckpt)
    size_after = sum(f.stat().st_size for f in (ckpt / "unet").glob("*.safetensors"))
    assert size_after < 0.6 * size_before
    loaded = load_model(latest_checkpoint(tmp_path), text_encoder=HashEncoder())
    for (name, a), (_, b) in zip(model.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert b.dtype == torch.float32, name
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_verify_checkpoint_names_a_damaged_or_missing_file(tmp_path):
    from pogdiff.model.checkpoints import CheckpointError, verify_checkpoint

    model = _model()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    _step(model, opt, 0)
    path = save_checkpoint(tmp_path, 1, model, train_cfg=TRAIN, optimizer=opt,
                           extra_tensors={"rng.torch": torch.get_rng_state()})
    verify_checkpoint(path)
    assert torch.equal(ckpt.read_trainer_state(path)["extra_tensors"]["rng.torch"], torch.get_rng_state())
    assert load_trainer_state(path, opt)["step"] == 1  # extra tensors do not confuse the optimizer state
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors does not match its checksum"):
        verify_checkpoint(path)
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=r"has 100 bytes, expected \d+"):
        verify_checkpoint(path)
    (path / "trainer_state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.safetensors is missing"):
        verify_checkpoint(path)


def test_candidates_cleanup_and_set_aside(tmp_path):
    from pogdiff.model.checkpoints import clean_temporary, resume_candidates
    from pogdiff.training.run_folder import HISTORY_FILE, RUN_FILE, set_aside, update_record

    model = _model()
    run = tmp_path / "run"
    for step in (2, 4, 6):
        save_checkpoint(run, step, model, train_cfg=TRAIN, keep=3)  # TRAIN.max_steps is 7
    (run / ".tmp-checkpoint-000008-dead").mkdir()
    (run / ".old-checkpoint-000002-dead").mkdir()
    assert [p.name for p in resume_candidates(run)] == ["checkpoint-000006", "checkpoint-000004", "checkpoint-000002"]
    assert sorted(p.name for p in clean_temporary(run)) == [".old-checkpoint-000002-dead", ".tmp-checkpoint-000008-dead"]
    update_record(run, state="stopped", steps_done=6)
    (run / HISTORY_FILE).write_text("{}\n")
    aside = set_aside(run)
    assert aside is not None and resume_candidates(run) == [] and len(resume_candidates(aside)) == 3
    assert (aside / HISTORY_FILE).is_file() and (aside / RUN_FILE).is_file()  # the old run's files go with it
    assert set_aside(run) is None
    update_record(run, state="running", name="new")  # a new run's record, written before its first step
    assert set_aside(run) is None and (run / RUN_FILE).is_file()  # is the new run's own: it stays
