"""A training process for the fault and multi-process tests (run as ``python -m tests.train_worker``).

Prints ``step N`` after every step (flushed), so a parent can kill it at a known step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    import torch

    from pogdiff.config import DataConfig, TrainConfig
    from pogdiff.data import load_image_text_set
    from pogdiff.training.run import train
    from tests.conftest import SMALL_MODEL

    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--method", default="pogdiff")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig(batch_size=4, max_steps=args.steps, checkpoint_every=args.checkpoint_every, log_every=0,
                      warmup_steps=1, checkpoint_minutes=0.0, method=args.method, ema_decay=args.ema_decay)
    dataset = load_image_text_set(args.data, DataConfig())

    def on_step(info) -> None:
        print(f"step {info.step} loss {info.terms['loss']:.6f}", flush=True)

    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(cfg), run_dir=args.run_dir,
                   callback=on_step)
    print(f"done {result.steps_done} rank {os.environ.get('RANK', '0')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
