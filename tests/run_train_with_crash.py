"""`jobs.train` as a separate process that dies like a preempted worker (SIGKILL) right after a checkpoint.

    python tests/run_train_with_crash.py STEP -- TRAIN FLAGS...

The process kills itself once the checkpoint of STEP (or a later one) is published.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from jobs.train import config_from_args, run_training

    step, separator, *flags = sys.argv[1:]
    if separator != "--":
        raise SystemExit(__doc__)

    def die(done: int) -> None:
        if done >= int(step):
            os.kill(os.getpid(), signal.SIGKILL)

    config, ray = config_from_args(flags)
    run_training(config, ray, after_checkpoint=die)


if __name__ == "__main__":
    main()
