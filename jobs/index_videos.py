"""Entry point of the indexing job, the same locally, under ``ray job submit`` and in a KubeRay ``RayJob``::

python -m jobs.index_videos s3://bucket/videos/ --output s3://bucket/index/ --checkpoint models/vitaclip-b16
vitaclip index ./videos --output ./out --model vitaclip-tiny --random-weights
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from jobs.config import config_from_args
from jobs.ray_resources import RayUnreachableError, stopped_by_sigterm
from vitaclip.redact import error_line, install_log_redaction, redact_text, terminal_text, traceback_text


def setup_logging() -> None:
    """The job's log lines: INFO with times, credentials in URLs masked, faiss's loader quiet."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_log_redaction()  # endpoint URLs may carry userinfo: never print it
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU variant it tried


def _commit_words(commit: dict[str, Any]) -> str:
    """What the run's commits added: a run that lost every video to another run committing them first says so."""
    committed = commit.get("videos_committed", 0)
    dropped = commit.get("dropped_done_by_another_run", 0)
    stale = commit.get("changed_since_listed_rows_kept", 0)
    return (
        f"; {committed} video rows committed"
        + (f", {dropped} left out: another run committed them first" if dropped else "")
        + (f", {stale} left out: changed since listed (a stale listing), their committed rows kept" if stale else "")
    )


INTERRUPTED = "interrupted: what this run committed stays, and the next run plans only the rest"


def print_summary(summary: dict[str, Any]) -> None:
    """The two lines a finished run prints: its counts and where its record is."""
    counts = summary["counts"]
    print(
        f"run {summary['run_id']}: {counts.get('processed', 0)} videos processed, "
        f"{counts.get('already_indexed', 0)} already indexed, {counts.get('duplicate_in_listing', 0)} listed twice"
        + (f", {exhausted} failed in every allowed attempt" if (exhausted := counts.get("attempts_exhausted")) else "")
        + (
            f", {unlisted} folders not readable (left as they are)"
            if (unlisted := len(summary["unlisted_folders"]))
            else ""
        )
        + f"; status {json.dumps(summary['status'])}{_commit_words(summary.get('commit', {}))}; "
        f"{summary['elapsed_seconds']} s"
    )
    print(f"summary: {summary['output'].rstrip('/')}/runs/{summary['run_id']}.json")


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m jobs.index_videos") -> int:
    """Runs one indexing run; returns 0 when it committed (bad videos are rows, not failures), 2 on bad input, 3
    when it committed but held back pruning (`--prune-max`), 130 when interrupted (143: SIGTERM), 1 on other
    failures."""
    setup_logging()
    previous = quit_on_a_second_interrupt(prog)
    try:
        return _main(argv, prog)
    finally:  # a later run in this process (tests, a library's caller) gets its own first interrupt
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: Sequence[str] | None, prog: str) -> int:
    try:
        config = config_from_args(sys.argv[1:] if argv is None else argv, prog=prog)
        from jobs import pipeline

        try:
            summary = pipeline.run_index_job(config)
        except pipeline.IndexUpdateError as exc:  # storage failing after the commits: what holds, no traceback
            print(f"{prog}: error: {terminal_text(redact_text(str(exc)))}", file=sys.stderr)
            return 1
    except ValueError as exc:  # bad configuration, missing bucket, wrong credentials, unreadable checkpoint
        print(f"{prog}: error: {terminal_text(redact_text(str(exc)))}", file=sys.stderr)
        return 2
    except RayUnreachableError as exc:  # the cluster may come back: not a configuration error
        print(f"{prog}: error: {terminal_text(redact_text(str(exc)))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGINT: the run's record says "interrupted"; its commits stay
        print(f"\n{prog}: {INTERRUPTED}", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM (ray job stop, a pod's end): Ray's handler in the driver exits
        if not stopped_by_sigterm(exc):
            raise
        print(f"\n{prog}: {INTERRUPTED} (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as exc:  # storage failing after its retries, a full disk, files gone: what failed, no traceback
        print(f"{prog}: error: {redact_text(error_line(exc))}", file=sys.stderr)
        return 1
    except Exception:  # a bug: the traceback matters, but not the credentials an endpoint URL may carry
        print(redact_text(traceback_text(sys.exc_info())), file=sys.stderr, end="")
        return 1
    # Committed and recorded: a SIGTERM now (a pod's end, `ray job stop`) would only turn the exit status into 143,
    # "interrupted", for a run whose record says committed (a CronJob would count it failed). Printing is left.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print_summary(summary)
    for held in summary.get("prune_held_back") or ():
        total = held["no_longer_listed"] + held["listed"]
        print(
            f"{prog}: error: pruning held back under {redact_text(held['scope'])}: {held['no_longer_listed']} of "
            f"{total} videos no longer listed, more than --prune-max {config.prune_max:g}; if they were deleted, "
            "run once with a larger --prune-max",
            file=sys.stderr,
        )
    return 3 if summary.get("prune_held_back") else 0


def quit_on_a_second_interrupt(prog: str) -> Any:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt once: the run records itself as interrupted and ends. A second one
    while it does (a slow store, Ray's shutdown) ends the process at once, its embedded Ray's agents stopped: it
    used to interrupt Ray's shutdown with a traceback (at times a segfault) and leave the agents running. Only in
    the main thread, and only where SIGINT has Python's own handler. Returns that handler, for the caller to put
    back (None: nothing was changed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None

    def again(signum: int, frame: Any) -> None:
        print(f"\n{prog}: interrupted again: ending now (the run's record may still say running)", file=sys.stderr)
        _end_now(128 + signal.SIGINT)

    def first(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, again)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first)
    return previous


def _end_now(code: int) -> NoReturn:
    """Ends the process here: embedded Ray's agents stopped, streams flushed, no interpreter teardown."""
    stop_embedded_ray()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_process(code: int) -> NoReturn:
    """Ends the process with ``code`` without the interpreter's last garbage collections: with torch and open_clip
    loaded they walk millions of objects, about 1.3 s of CPU at every run's end. Only as a process's last step:
    what is frozen here is never collected (files are flushed by their owners and at exit as before)."""
    gc.freeze()
    if code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        # Stopped by SIGTERM (ray job stop, a pod's end) or Ctrl-C: the Ray core worker in this process can abort in
        # ray.shutdown() or while the interpreter tears down (SIGABRT, exit -6: an actor whose creation the stop
        # cancelled fails a check), which would hide the 143 that a supervisor reads, and a second Ctrl-C would
        # interrupt that shutdown. What the run committed and its record are written by now: end here, streams
        # flushed. A cluster's processes drop the driver's work; an embedded Ray's are stopped here
        # (`stop_embedded_ray`).
        for name in ("SIGINT", "SIGTERM"):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        _end_now(code)
    sys.exit(code)


def stop_embedded_ray() -> None:
    """Ends the processes that the raylet of a Ray node started by this process (none when it attached to a
    cluster) started: the GCS and the raylet end with this process, but the raylet, killed outright then, left its
    dashboard and runtime-env agents (about 210 MB) running, one pair per interrupted run; they are killed (they
    hold nothing a run needs). Stopping the raylet itself first would end this process with the core worker's exit
    1 instead of 143. Linux (/proc) only."""
    if "ray" not in sys.modules:
        return
    try:
        import ray._private.worker

        node = ray._private.worker._global_node  # a private attribute: anything unexpected leaves it as it was
        raylets: set[int] = {p.process.pid for p in node.all_processes.get("raylet", ())} if node is not None else set()
        for pid in _children_of(raylets):
            with contextlib.suppress(OSError):
                # SIGKILL: an agent still starting, or shutting down gracefully with its raylet gone, outlived the
                # job by over 30 s after SIGTERM on a loaded machine; waiting for them would let the core worker
                # see its node die and end this process with 1.
                os.kill(pid, signal.SIGKILL)
    except Exception as exc:
        print(f"could not stop the embedded Ray's agents: {exc}", file=sys.stderr)


def _children_of(parents: set[int]) -> list[int]:
    found = []
    for name in os.listdir("/proc") if parents and os.path.isdir("/proc") else ():
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2 :].split()[1]) in parents:
                found.append(int(name))
    return found


if __name__ == "__main__":
    exit_process(main())
