"""The training state a checkpoint carries beyond the weights, and what makes a resumed run compute
what the uninterrupted one computed (docs/ARCHITECTURE.md "Shapes and conventions").

Each step's draws come from generators seeded by :func:`seed_of`; a checkpoint stores the global RNG
states (:func:`rng_state`), the lr scheduler, the grad scaler and the run's fingerprint
(:func:`checkpoint_extra`) beside the weights, optimizer and EMA weights; :func:`restore_state` puts
them all back.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from pogdiff.model import checkpoints

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003


def seed_of(*parts: int) -> int:
    """A 64-bit seed mixing any number of non-negative-or-not integers (no stride limits)."""
    entropy = [int(x) % 2**64 for x in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def own_storage(module: torch.nn.Module) -> None:
    """Give every parameter and buffer a fresh contiguous copy of its data.

    Weights loaded from safetensors may live in differently aligned memory than freshly made
    ones, and CPU kernels may then pick another summation order (differences of ~1e-6): with
    fresh copies a resumed run computes exactly what the uninterrupted run computed.
    """
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.data = t.data.clone(memory_format=torch.contiguous_format)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Global RNG states: JSON part (python, numpy scalars) and tensor part (torch, numpy key)."""
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                             float(np_state[4])]}
    return meta, tensors


def set_rng_state(meta: dict | None, tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if meta:
        py = meta["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "rng.numpy" in tensors:
            name, pos, has_gauss, cached = meta["numpy"]
            np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def fast_forward_scheduler(scheduler, step: int) -> None:
    """Put an lr ``scheduler`` at ``step`` (a pure function of the step for LambdaLR schedules)."""
    if step > 0:
        scheduler.last_epoch = step
        for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                   strict=True):
            group["lr"] = base * fn(step)
        scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def checkpoint_extra(*, fingerprint: dict | None, lr_scheduler, scaler,
                     num_processes: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """What a checkpoint stores beside the weights, optimizer and EMA weights: a JSON part (the run's
    fingerprint, the lr scheduler, the python / numpy RNG states, the number of processes, the grad
    scaler) and a tensor part (the torch, numpy and CUDA RNG states)."""
    rng_meta, rng_tensors = rng_state()
    extra = {
        "fingerprint": fingerprint,
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": rng_meta,
        "num_processes": num_processes,
    }
    if scaler is not None:
        extra["grad_scaler"] = {k: (v.item() if isinstance(v, torch.Tensor) else v)
                                for k, v in scaler.state_dict().items()}
    return extra, rng_tensors


def restore_state(state: dict, *, model, params, optimizer, lr_scheduler, scaler, ema, num_processes: int) -> None:
    """Put back what a checkpoint read by :func:`pogdiff.model.checkpoints.read_trainer_state` holds
    beyond the weights: optimizer, lr scheduler (fast-forwarded to the step when the checkpoint has
    none), grad scaler, EMA weights and global RNG states."""
    extra = state.get("extra") or {}
    checkpoints.apply_optimizer_state(optimizer, state)
    if "lr_scheduler" in extra:
        lr_scheduler.load_state_dict(extra["lr_scheduler"])
    else:
        fast_forward_scheduler(lr_scheduler, int(state["step"]))
    if scaler is not None and "grad_scaler" in extra:
        scaler.load_state_dict(extra["grad_scaler"])
    if ema is not None:
        restore_ema(ema, state, model, params)
    if extra.get("num_processes", 1) != num_processes:
        logger.info("resuming a %s-process checkpoint on %d process(es)", extra.get("num_processes", 1),
                    num_processes)
    set_rng_state(extra.get("rng"), state.get("extra_tensors") or {})


def restore_ema(ema, state: dict, model, params) -> None:
    """The EMA weights of a checkpoint into ``ema``; without them (a warning) the EMA restarts from the
    current weights."""
    try:
        shadow = checkpoints.load_ema_shadow(state["path"], model)
    except FileNotFoundError:
        logger.warning("%s has no EMA weights; the EMA restarts from the current weights", state["path"])
        return
    ema_state = dict(state.get("ema") or {})
    ema_state["shadow_params"] = [s.to(device=p.device, dtype=p.dtype) for s, p in zip(shadow, params, strict=True)]
    ema.load_state_dict(ema_state)
