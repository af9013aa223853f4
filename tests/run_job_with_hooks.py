"""The indexing job as a separate process, with a test action at one point of the run (`jobs.pipeline.RunHooks`).

    python tests/run_job_with_hooks.py ACTION -- JOB FLAGS...

ACTION is one of:
    kill-after-write:N       SIGKILL this driver once N written batches reached it
    kill-before-commit:N     SIGKILL it just before its N-th commit
    kill-before-videos:N     SIGKILL it between the segments and videos commits of its N-th commit
    kill-after-commit:N      SIGKILL it once its N-th commit landed
    hold-before-commit:PATH  before each commit, create PATH.ready.<pid> and wait until PATH.go exists
    none                     run plainly

A finished run prints "driver imported: ..." (which of torch, open_clip and torchvision the driver imported, or
"-") and then its run id.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _nth(n: int) -> Callable[..., None]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1
        if calls[0] >= n:
            _kill()

    return hook


def main(argv: list[str]) -> int:
    from jobs.config import config_from_args
    from jobs.pipeline import RunHooks, run_index_job

    action, sep, *job_argv = argv
    assert sep == "--", "usage: run_job_with_hooks.py ACTION -- JOB FLAGS..."
    kind, _, arg = action.partition(":")
    if kind == "kill-after-write":
        hooks = RunHooks(after_write=lambda received: _kill() if received >= int(arg) else None)
    elif kind == "kill-before-commit":
        hooks = RunHooks(before_commit=_nth(int(arg)))
    elif kind == "kill-before-videos":
        hooks = RunHooks(before_videos_commit=_nth(int(arg)))
    elif kind == "kill-after-commit":
        hooks = RunHooks(after_commit=_nth(int(arg)))
    elif kind == "hold-before-commit":

        def hold() -> None:
            Path(f"{arg}.ready.{os.getpid()}").touch()
            deadline = time.monotonic() + 120
            while not Path(f"{arg}.go").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never released the commit")
                time.sleep(0.01)

        hooks = RunHooks(before_commit=hold)
    elif kind == "none":
        hooks = RunHooks()
    else:
        raise SystemExit(f"unknown action {action!r}")
    logging.basicConfig(level=logging.INFO)
    summary = run_index_job(config_from_args(job_argv), hooks=hooks)
    print("driver imported:", " ".join(sorted({"torch", "open_clip", "torchvision"} & set(sys.modules))) or "-")
    print(summary["run_id"])
    return 0


if __name__ == "__main__":
    from jobs.index_videos import exit_process

    exit_process(main(sys.argv[1:]))  # as the job's entry point ends
