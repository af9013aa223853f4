"""``vitaclip submit``: sends the indexing job to a Ray cluster through the Ray Jobs API.

A thin layer over `ray.job_submission.JobSubmissionClient`: the job is ``python -m jobs.index_videos`` with the
flags given after ``--`` (or left over after this command's own options). Those flags are checked here first with
the job's own parser, so a typo fails before anything is uploaded; paths are not checked, since an input or a
checkpoint may exist only on the cluster. ::

    vitaclip submit --address http://RAY_HEAD:8265 --wait -- s3://media/videos/ --output s3://media/index/ \\
        --checkpoint /models/vitaclip-b16

Token authentication: the token is read from ``--auth-token-file``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH`` (which must then hold one), else Ray's default (``~/.ray/auth_token``); it is sent as a header
and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitaclip.redact import redact_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_EXCLUDES = (
    ".git",
    ".venv",
    "out",
    "build",
    "dist",
    "*.egg-info",
    "**/__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
)
"""Never uploaded with the working directory (Ray also skips what ``.gitignore`` lists)."""
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
AGENT_WAIT_SECONDS = 60.0
"""How long to retry a submission that a just-started head refuses with "No available agent"."""


def build_parser(prog: str = "python -m jobs.submit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [options] -- JOB FLAGS...",
        description="Submit the indexing job (python -m jobs.index_videos) to a Ray cluster.",
        epilog="Everything after `--` (or any argument not listed above) is a flag or input of the indexing job.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help=f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--working-dir",
        default=None,
        help="uploaded as the job's working_dir (default: this checkout; none for an installed vitaclip)",
    )
    p.add_argument("--no-working-dir", action="store_true", help="upload nothing: the cluster's image has the code")
    p.add_argument("--exclude", action="append", default=[], help="also leave this pattern out of the upload")
    p.add_argument("--requirements", help="a requirements file: its packages go in the runtime_env's pip list")
    p.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="job metadata (repeatable)")
    p.add_argument("--submission-id", help="the job's id (default: chosen by Ray)")
    p.add_argument("--auth-token-file", help="file with the cluster's auth token (see the module docs for defaults)")
    p.add_argument("--no-validate", action="store_true", help="skip the local check of the job's flags")
    p.add_argument("--wait", action="store_true", help="stream the logs; exit 0 only if the job SUCCEEDED")
    return p


def split_argv(argv: Sequence[str], prog: str = "python -m jobs.submit") -> tuple[argparse.Namespace, list[str]]:
    """This command's options, and the job's arguments (after ``--``, or whatever this parser does not know)."""
    argv = list(argv)
    parser = build_parser(prog)
    if "--" in argv:
        cut = argv.index("--")
        return parser.parse_args(argv[:cut]), argv[cut + 1 :]
    args, job_args = parser.parse_known_args(argv)
    return args, job_args


def validate_job_args(job_args: Sequence[str]) -> None:
    """Checks the job's flags as ``python -m jobs.index_videos`` would, without touching inputs or outputs.

    Raises:
        ValueError: an unknown flag, a bad value, or a configuration the job would refuse.
    """
    from jobs.config import build_parser as job_parser
    from jobs.config import config_from_args

    if not job_args:
        raise ValueError("no job arguments: give the inputs and --output after `--`")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            namespace = job_parser().parse_args(list(job_args))
    except SystemExit:  # argparse reports the problem on stderr, last line "prog: error: ..."
        lines = stderr.getvalue().strip().splitlines()
        raise ValueError(f"job flags: {lines[-1] if lines else 'could not be parsed'}") from None
    if namespace.config and not Path(namespace.config).is_file():
        _refuse_relative_output(namespace.output)
        return  # a YAML file that only the cluster has: the flags themselves parsed
    _refuse_relative_output(config_from_args(list(job_args)).output)


def _refuse_relative_output(output: str | None) -> None:
    """A relative local output would be written on the cluster inside the job's uploaded working_dir (Ray's package
    cache, deleted with it), or the worker's own folder: never where the user looked."""
    if output and "://" not in output and not os.path.isabs(output):
        raise ValueError(
            f"--output {output!r} is a relative path: on the cluster the job runs in its uploaded working_dir (Ray's "
            "package cache, deleted later), not in this folder; give an absolute path on the cluster's machines or "
            "an s3:// URI"
        )


def parse_metadata(items: Sequence[str]) -> dict[str, str]:
    metadata = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata wants KEY=VALUE, got {item!r}")
        metadata[key] = value
    return metadata


def read_requirements(path: str) -> list[str]:
    lines = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            if line.startswith("-"):
                raise ValueError(f"{path}: pip options such as {line.split()[0]!r} are not supported in runtime_env")
            lines.append(line)
    return lines


def auth_headers(token_file: str | None) -> dict[str, str]:
    """An Authorization header from the first token found (see the module docs), or none."""
    token = ""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"{token_file} is empty")
    elif os.environ.get("RAY_AUTH_TOKEN"):
        token = os.environ["RAY_AUTH_TOKEN"].strip()
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):  # named on purpose: a missing file is an error, not a fallback
        named = os.environ["RAY_AUTH_TOKEN_PATH"]
        if not Path(named).is_file():
            raise ValueError(f"RAY_AUTH_TOKEN_PATH names {named!r}, which is not a file")
        token = Path(named).read_text().strip()
        if not token:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH names {named!r}, which is empty")
    elif (default := Path.home() / ".ray" / "auth_token").is_file():
        token = default.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _is_checkout(folder: Path) -> bool:
    """Whether ``folder`` is a source tree of the project (not the site-packages an installed vitaclip lives in)."""
    return (folder / "pyproject.toml").is_file() and (folder / "jobs").is_dir() and (folder / "vitaclip").is_dir()


def build_runtime_env(args: argparse.Namespace) -> dict[str, Any]:
    """The job's runtime_env. Without ``--working-dir``, this checkout is uploaded; an installed vitaclip (``pip
    install .``, as the images do) uploads nothing, as with ``--no-working-dir``: its folder is site-packages."""
    runtime_env: dict[str, Any] = {}
    if args.working_dir is None and not args.no_working_dir and not _is_checkout(REPO_ROOT):
        print(
            "vitaclip submit: vitaclip runs here as an installed package (no checkout at this path): nothing is "
            "uploaded and the cluster runs its own vitaclip; give --working-dir DIR to upload a checkout",
            file=sys.stderr,
        )
        args.no_working_dir = True
    if not args.no_working_dir:
        working_dir = Path(args.working_dir if args.working_dir is not None else REPO_ROOT)
        if not working_dir.is_dir():
            raise ValueError(f"--working-dir {args.working_dir!r} is not a folder")
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = [*DEFAULT_EXCLUDES, *args.exclude]
    if args.requirements:
        runtime_env["pip"] = read_requirements(args.requirements)
    return runtime_env


_EXCEPTION_LINE = re.compile(r"^\w+(?:Error|Exception): .+")


def _server_reason(message: str) -> str:
    """The reason in a refusal whose text carries the server's tracebacks (a reused submission id): the last
    exception line, after the status line."""
    if "Traceback (most recent call last)" not in message:
        return message
    status = message.split("Traceback", 1)[0].strip().rstrip(":")
    reasons = [line.strip() for line in message.splitlines() if _EXCEPTION_LINE.match(line.strip())]
    reason = reasons[-1] if reasons else "the server's traceback holds no reason"
    return f"{status}: {reason}" if status else reason


def _submit(client: Any, **kwargs: Any) -> str:
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return str(client.submit_job(**kwargs))
        except RuntimeError as exc:  # a head that just started has no job agent yet
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


async def _stream_logs(client: Any, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        print(redact_text(lines), end="", flush=True)


def wait_for_job(client: Any, submission_id: str, *, poll_seconds: float = 2.0) -> str:
    """Streams the job's logs until it ends; returns its final status name."""
    try:
        asyncio.run(_stream_logs(client, submission_id))
    except Exception as exc:  # the log stream broke (proxy, restart): polling still finds the outcome
        print(
            redact_text(f"vitaclip submit: log stream ended early ({type(exc).__name__}: {exc}); polling the status"),
            flush=True,
        )
    while True:
        job_status = client.get_job_status(submission_id)
        status = str(getattr(job_status, "value", job_status))
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(poll_seconds)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.submit") -> int:
    """Submits the job; prints its submission id. With ``--wait``: 0 if it SUCCEEDED, 1 otherwise; 2: bad usage."""
    try:
        args, job_args = split_argv(sys.argv[1:] if argv is None else argv, prog)
    except SystemExit as exc:  # argparse printed the usage
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    try:
        if not args.no_validate:
            validate_job_args(job_args)
        metadata = parse_metadata(args.metadata)
        runtime_env = build_runtime_env(args)
        headers = auth_headers(args.auth_token_file)
    except (OSError, ValueError) as exc:
        print(f"{prog}: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2

    from ray.job_submission import JobSubmissionClient

    entrypoint = shlex.join([args.python, "-m", "jobs.index_videos", *job_args])
    try:
        client = JobSubmissionClient(args.address, headers=headers)
        submission_id = _submit(
            client,
            entrypoint=entrypoint,
            runtime_env=runtime_env or None,
            submission_id=args.submission_id,
            metadata=metadata or None,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
        )
    except Exception as exc:  # connection refused, authentication, a rejected runtime_env: one clear line
        reason = _server_reason(str(exc))
        if args.submission_id and f"submission_id {args.submission_id} already exists" in reason:
            failure = (
                f"{args.address} has a job with submission id {args.submission_id} already: give another "
                "--submission-id, or none for one Ray chooses"
            )
            print(redact_text(f"{prog}: error: {failure}"), file=sys.stderr)
            return 2
        failure = f"submitting to {args.address} failed: {type(exc).__name__}: {reason}"
        print(redact_text(f"{prog}: error: {failure}"), file=sys.stderr)
        return 1
    print(f"submission id: {submission_id}", flush=True)
    if not args.wait:
        print(redact_text(f"follow it with: ray job logs --address {args.address} --follow {submission_id}"))
        return 0
    try:
        status = wait_for_job(client, submission_id)
    except KeyboardInterrupt:
        stop = f"ray job stop --address {args.address} {submission_id}"
        print(redact_text(f"\nstopped waiting; the job goes on ({stop})"))
        return 130
    info = client.get_job_info(submission_id)
    message = f": {info.message}" if getattr(info, "message", None) and status != "SUCCEEDED" else ""
    print(redact_text(f"job {submission_id} {status}{message}"), flush=True)
    if status == "FAILED" and _lacks_packages(client, submission_id):
        print(
            f"the job's interpreter ({args.python!r} on the cluster) lacks vitaclip's packages: pass --python with "
            "the cluster's environment (for a head started here as .venv/bin/ray start --head: --python "
            ".venv/bin/python, absolute), or start the head from an activated environment",
            flush=True,
        )
    return 0 if status == "SUCCEEDED" else 1


def _lacks_packages(client: Any, submission_id: str) -> bool:
    """Whether a failed job's logs say the interpreter could not import the job or its packages."""
    try:
        logs = str(client.get_job_logs(submission_id))
    except Exception:  # noqa: BLE001 - only a hint depends on it
        return False
    return "ModuleNotFoundError: No module named" in logs


if __name__ == "__main__":
    sys.exit(main())
