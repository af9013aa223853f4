"""The ``vitaclip`` command line, at the top of the layers (vitaclip <- index <- jobs).

Each subcommand parses its arguments and calls a library function; nothing below ``main`` sees argparse.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from vitaclip.redact import error_line, printable_name, redact_text, redact_url, refuse_object_userinfo, terminal_text


def _add_model_args(p: argparse.ArgumentParser, *, default_model: str = "vitaclip-b16") -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"registered model name or JSON config (default: {default_model}, or a checkpoint folder's own)",
    )
    p.set_defaults(default_model=default_model)
    p.add_argument("--checkpoint", default=None, help="official .pth, OpenAI/open_clip weights, or vitaclip folder")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="allow a model without trained weights (smoke runs: its labels mean nothing)",
    )
    p.add_argument("--labels", default=None, help="label set name (kinetics400) or a file with one label per line")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def _given_model(model: str | None, checkpoint: str | None) -> str | None:
    """``--model`` as given; refused when it names another model than a checkpoint folder's own (a folder carries its
    config, which would otherwise win without a word)."""
    if model is not None and checkpoint is not None:
        from jobs.config import check_model

        check_model(model, checkpoint, given=True)
    return model


def _model_name(args: argparse.Namespace) -> str:
    """The model of a command that builds one: ``--model``, checked against a checkpoint folder, else the default."""
    return _given_model(args.model, args.checkpoint) or args.default_model


def _cmd_models(args: argparse.Namespace) -> int:
    import vitaclip
    from vitaclip.registry import packaged_checkpoint

    for name in vitaclip.list_models():
        config = vitaclip.get_model_config(name)
        backbone = config.backbone or "inline"
        weights = "packaged" if packaged_checkpoint(name) else "--checkpoint"
        print(
            f"{name:18s} backbone={backbone:20s} T={config.num_frames} G={config.num_global_prompts} "
            f"local={config.num_local_prompts} summary={config.summary_token} "
            f"text_context={config.text_context.kind if config.text_context else None} weights={weights}"
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import vitaclip

    labels = vitaclip.load_label_set(args.label_names) if args.label_names else None
    model = vitaclip.create_model(args.model, checkpoint=args.src, label_names=labels)
    sha = vitaclip.save_checkpoint(model, args.dst)
    print(
        f"wrote {args.dst} ({model.config.name}, T={model.config.num_frames}, "
        f"G={model.config.num_global_prompts}, sha256 {sha})"
    )
    return 0


def label_videos(
    paths: Sequence[str],
    *,
    model_name: str,
    checkpoint: str | None,
    labels: str | None,
    top_k: int,
    num_frames: int | None,
    device: str | None,
    random_weights: bool = False,
) -> list[dict[str, Any]]:
    """Top-k zero-shot labels for local video files (`vitaclip.stages.label_files`), refusing untrained weights."""
    import vitaclip
    from vitaclip.registry import require_trained_weights
    from vitaclip.stages import label_files

    require_trained_weights(model_name, checkpoint, random_weights=random_weights)
    return label_files(
        paths,
        model=model_name,
        checkpoint=checkpoint,
        label_names=vitaclip.load_label_set(labels) if labels else None,
        top_k=top_k,
        num_frames=num_frames,
        device=device,
    )


def _print_labels(results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        if r["status"] != "ok":
            print(terminal_text(f"{printable_name(r['uri'])}: {r['status']}: {r['error_message']}"))
            continue
        tops = ", ".join(f"{n} ({p:.3f})" for n, p in zip(r["labels"], r["label_scores"], strict=True))
        print(terminal_text(f"{printable_name(r['uri'])}: {tops}"))


def _cmd_label(args: argparse.Namespace) -> int:
    results = label_videos(
        args.videos,
        model_name=_model_name(args),
        checkpoint=args.checkpoint,
        labels=args.labels,
        top_k=args.top_k,
        num_frames=args.num_frames,
        device=args.device,
        random_weights=args.random_weights,
    )
    _print_labels(results, args.json)
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from jobs.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig(
        output=args.output,
        num_videos=args.num_videos,
        seed=args.seed,
        show=args.show,
        num_cpus=args.num_cpus,
        top_k=args.top_k,
        model=_model_name(args),
        checkpoint=args.checkpoint,
        random_weights=args.random_weights,
        replace_settings=args.replace_settings,
    )
    run_quickstart(config)
    return 0


def _existing_output(output: str, *, endpoint_url: str | None) -> Any:
    """The store of an output a command reads (never made: a mistyped local path is an error, not a new folder)."""
    from jobs.storage import open_store

    if "://" not in output or output.startswith("file://"):
        folder = output.removeprefix("file://")
        if not folder or not os.path.isdir(folder):
            raise ValueError(f"no output folder at {folder!r}")
    return open_store(output, endpoint_url=endpoint_url)


def _cmd_build_index(args: argparse.Namespace) -> int:
    from index.refresh import build_index_for_output

    store = _existing_output(args.output, endpoint_url=args.s3_endpoint_url)
    info = build_index_for_output(
        store,
        model=args.model,
        checkpoint=args.checkpoint,
        kind=args.kind,
        recall_target=args.recall_target,
        rebuild=args.rebuild,
        switch=args.switch_index,
    )
    if not info["indexes"]:
        print(f"nothing to index: no row of {info['model_id']} has status ok (see `vitaclip runs {args.output}`)")
    for name, entry in info["indexes"].items():
        measured = entry.get("measured", {})
        deleted = (entry.get("deleted") or {}).get("count", 0)
        print(
            f"{name}: {entry['kind']} ({entry['factory']}), {entry['count']} vectors in "
            f"{len(entry.get('segments', []))} segment(s) ({deleted} deleted ids), "
            f"params {entry.get('search_params') or '-'}, recall@10 {measured.get('recall_at_10', '-')}, "
            f"p50 {measured.get('p50_ms', '-')} ms"
        )
        if entry.get("auto_choice"):
            print(f"  kind: {entry['auto_choice']}")
        if entry.get("rebuild_reason"):
            print(f"  built whole: {entry['rebuild_reason']}")
        elif "incremental" in entry:
            inc = entry["incremental"]
            print(
                f"  followed the tables' log: {inc['added']} added, {inc['updated']} replaced, {inc['removed']} "
                f"removed, {inc['files_read']} data files read, {inc['segments_merged']} segment merges"
            )
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from index.delta_tables import detect_old_layout, open_table
    from jobs.migrate import migrate, rows_per_model

    store = _existing_output(args.output, endpoint_url=args.s3_endpoint_url)
    if not detect_old_layout(store.location) and open_table(store.location, "videos") is not None:
        # Done already: a deploy step that runs `migrate` before every run needs no `|| true`.
        print(f"{redact_text(store.location.url)} already holds Delta tables: nothing to migrate")
        return 0
    report = migrate(store)
    for table in ("videos", "segments"):
        done = report[table]
        if done.get("committed_before"):  # a migration killed after this table's commit, finished now
            print(f"{table}: committed by an earlier, interrupted migrate ({done['old_parts']} old parts)")
        else:
            print(
                f"{table}: {done['rows']} rows from {done['old_parts']} old parts -> {done['files']} Delta data files"
            )
    print(
        f"deleted {report['deleted_old_files']} files of the old layout; video rows per model: {rows_per_model(store)}"
    )
    print(f"next: vitaclip build-index {args.output}  (or the next indexing run rebuilds the index)")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from jobs.runs import format_runs, read_runs, read_settings

    store = _existing_output(args.output, endpoint_url=args.s3_endpoint_url)
    records = read_runs(store, last=args.last)
    if not records:
        _require_output(store, args.output)
    if args.json:
        print(json.dumps(records, indent=1, default=str))
    else:
        print(format_runs(records, read_settings(store), url=store.url))
    return 0


def _require_output(store: Any, given: str) -> None:
    """Refuses a folder or prefix that is no output of the indexing job (no tables): "no runs recorded", exit 0,
    answered the parent folder of an output as if it were an empty one."""
    from index.segments import not_an_output
    from index.tables import table_versions

    if table_versions(store) is not None:
        return
    if "://" not in given:
        raise ValueError(not_an_output(Path(given)))
    raise ValueError(
        f"{redact_url(store.url)} is not an output of the indexing job (no videos table): give its --output"
    )


def _engine(args: argparse.Namespace) -> Any:
    from index.service import OutputSource

    source = OutputSource(args.index, s3_endpoint_url=args.s3_endpoint_url)
    model = _given_model(args.model, args.checkpoint)
    return source.open(model=model, checkpoint=args.checkpoint, device=args.device)


def format_hits(hits: Sequence[Any], *, segments: bool) -> str:
    lines = []
    for rank, hit in enumerate(hits, 1):
        span = f" [{hit.start_seconds:.2f}-{hit.end_seconds:.2f} s]" if segments else ""
        labels = ", ".join(hit.labels[:3])
        lines.append(terminal_text(f"{rank:2d}. {hit.score:.3f}  {printable_name(hit.uri)}{span}  ({labels})"))
    return "\n".join(lines) if lines else "no results"


def _cmd_search(args: argparse.Namespace) -> int:
    from index.search import unknown_label_note
    from index.service import single_query_threads

    if args.query and args.like is not None:
        raise ValueError("give the text to search for, or --like FILE (a picture or a short clip), not both")
    if not args.query and args.like is None:
        raise ValueError("give the text to search for, or --like FILE (a picture or a short clip)")
    upload = _read_upload(args.like) if args.like is not None else None  # a wrong path: said before the model loads
    single_query_threads()
    engine = _engine(args)
    if upload is not None:
        from index.search import Filters

        filters = Filters(label=args.label, min_duration=args.min_duration, max_duration=args.max_duration)
        hits = engine.search_upload(upload, k=args.k, segments=args.segments, filters=filters)
    else:
        hits = engine.search(
            " ".join(args.query),
            k=args.k,
            segments=args.segments,
            label=args.label,
            min_duration=args.min_duration,
            max_duration=args.max_duration,
        )
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
    else:
        print(format_hits(hits, segments=args.segments))
        note = unknown_label_note(engine, args.label, segments=args.segments) if not hits else None
        if note is not None:
            print(terminal_text(f"({note})"))
    return 0


_MAX_LIKE_BYTES = 256 * 2**20


def _read_upload(path: str) -> bytes:
    """The bytes of a picture or clip to search by (what ``POST /search/upload`` takes), at most 256 MiB."""
    try:
        # Opened without waiting (a FIFO would block until a writer came) and checked to be a regular file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"--like {path}: {exc.strerror or exc}") from None
    try:
        found = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ValueError(f"--like {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(found.st_mode):  # before fdopen, which refuses a folder with a bare IsADirectoryError
        os.close(fd)
        raise ValueError(f"--like {path}: not a regular file (a FIFO, device or folder)")
    with os.fdopen(fd, "rb") as f:
        try:
            if found.st_size > _MAX_LIKE_BYTES:
                too_big = f"{found.st_size:,} bytes, above {_MAX_LIKE_BYTES:,}"
                raise ValueError(f"--like {path}: {too_big}: use a shorter clip")
            data = f.read(_MAX_LIKE_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"--like {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_LIKE_BYTES:
        raise ValueError(f"--like {path}: more than {_MAX_LIKE_BYTES:,} bytes: use a shorter clip")
    return data


def _media_root(path: str) -> str:
    """A ``--media-root`` folder as an absolute path; one that is not a folder is refused (a typo would serve
    nothing, silently)."""
    if "://" in path or not os.path.isdir(path):
        raise ValueError(f"--media-root {path}: not a folder of this host")
    return os.path.abspath(path)


def _serve_limits(args: argparse.Namespace) -> dict[str, Any]:
    limits = {
        "max_upload_bytes": int(args.max_upload_mb * 2**20),
        "request_timeout_seconds": args.request_timeout,
        "max_connections": args.max_connections,
        "allowed_hosts": tuple(args.allowed_host),
        "send_timeout_seconds": args.send_timeout,
        "media_roots": None if args.media_root is None else tuple(_media_root(r) for r in args.media_root),
    }
    for name in ("max_concurrent_queries", "max_concurrent_uploads"):
        if getattr(args, name) is not None:
            limits[name] = getattr(args, name)
    return limits


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """What every output of a service is opened with (the same for one process and for Ray Serve replicas)."""
    return {
        "model": _given_model(args.model, args.checkpoint),
        "checkpoint": args.checkpoint,
        "device": args.device,
        "s3_endpoint_url": args.s3_endpoint_url,
    }


def _serve_logging() -> None:
    """Log lines of the service (uvicorn's are set up with its server) on stderr, credentials masked."""
    import logging

    from vitaclip.redact import install_log_redaction

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_log_redaction()  # URLs in messages and tracebacks may carry userinfo or signatures


def _cmd_serve(args: argparse.Namespace) -> int:
    from index.service import ServiceLimits, listen_socket, open_service, serve

    sock = listen_socket(args.host, args.port)  # in use, or no such address: said before minutes of loading
    if args.ray_serve:
        sock.close()  # Ray Serve's proxy binds it
        return _serve_on_ray(args)
    _serve_logging()
    service = open_service(
        args.index,
        **_model_options(args),
        limits=ServiceLimits(**_serve_limits(args)),
        reload_seconds=args.reload_seconds,
    )
    serve(service, host=args.host, port=args.port, sock=sock)
    return 0


def _serve_on_ray(args: argparse.Namespace) -> int:
    from jobs.ray_resources import Demand, connect_ray, read_cluster, require_fit, sigterm_to_python, start_embedded_ray
    from jobs.ray_serve import ServeOptions, run, stop

    options = ServeOptions(
        indexes=args.index,
        **_model_options(args),
        replicas=args.replicas,
        num_cpus_per_replica=args.num_cpus_per_replica,
        limits=_serve_limits(args),
        reload_seconds=args.reload_seconds,
    )
    # Without an address: RAY_ADDRESS (`ray job submit`), else a new local Ray, never one announced on this machine,
    # set up as the job's embedded one (replicas at the priority of the machine's other processes).
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        connect_ray(address, include_dashboard=False, ignore_reinit_error=True)
    else:
        start_embedded_ray(None, ignore_reinit_error=True)
    # Replicas the cluster cannot hold would wait for ever while the others answer (Serve warns every 30 s).
    replicas = Demand("replica", args.replicas, args.num_cpus_per_replica)
    require_fit("the service", [replicas], read_cluster(), hint="lower --replicas or --num-cpus-per-replica")
    sigterm_to_python()  # a stopped service ends through Python's handler, not Abseil's abort 3 s later
    print(f"vitaclip search on Ray Serve: {args.replicas} replicas at http://{args.host}:{args.port}/", flush=True)
    try:
        run(options, host=args.host, port=args.port, blocking=True)
    except KeyboardInterrupt:  # Ctrl-C; SIGTERM arrives as SystemExit (`sigterm_to_python`)
        stop()
        return 130
    except SystemExit:
        stop()
        raise
    return 0


def _cmd_index(argv: Sequence[str]) -> int:
    from jobs.index_videos import main as index_main

    return index_main(argv, prog="vitaclip index")


def _recall_target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"a recall target is above 0 and at most 1, got {text!r}")
    return value


_MAX_UPLOAD_MIB = 4096


def _upload_mib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= _MAX_UPLOAD_MIB:  # NaN and infinity too
        raise argparse.ArgumentTypeError(f"an upload limit is above 0 and at most {_MAX_UPLOAD_MIB} MiB, got {text!r}")
    return value


def _port(text: str) -> int:
    port = int(text) if text.strip().isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535 (0: any free one), got {text!r}")
    return port


def _version() -> str:
    from vitaclip import __version__

    return __version__


class _DefaultsShown(argparse.HelpFormatter):
    """Help that names each option's default, where it has one to name and its text does not already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS or default in ([], (), "")
        if not action.option_strings or hidden or "default" in text:
            return text
        return f"{text} (default: {default})".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitaclip", description="Vita-CLIP video embeddings, labels and search.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("convert", help="convert a checkpoint (e.g. the official release) to the vitaclip format")
    p.add_argument("src", help="official Vita-CLIP .pth, OpenAI/open_clip weights, or a vitaclip folder")
    p.add_argument("dst", help="output folder (model.safetensors + config.json)")
    p.add_argument("--model", default="vitaclip-b16", help="model the checkpoint belongs to (default: vitaclip-b16)")
    p.add_argument(
        "--label-names", default=None, help="training label names (set name or file); default: the model's label set"
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("label", help="print top-k zero-shot labels of video files")
    p.add_argument("videos", nargs="+")
    _add_model_args(p)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--num-frames", type=int, default=None, help="frames per video (default: the model's T)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser(
        "quickstart", help="generate demo videos, index them with vitaclip-demo, print labels and searches"
    )
    _add_model_args(p, default_model="vitaclip-demo")
    p.add_argument("--output", default="out/quickstart")
    p.add_argument("--num-videos", type=int, default=300)
    p.add_argument("--seed", type=int, default=2026, help="seed of the generated videos")
    p.add_argument("--show", type=int, default=8, help="rows to print")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--replace-settings",
        action="store_true",
        help="make this run's row settings (--top-k) the output's recorded ones (as for vitaclip index)",
    )
    p.set_defaults(func=_cmd_quickstart)

    sub.add_parser("index", help="run the indexing job (same flags as python -m jobs.index_videos)", add_help=False)
    sub.add_parser("submit", help="submit the indexing job to a Ray cluster (see infra/README.md)", add_help=False)
    sub.add_parser("train", help="train Vita-CLIP prompts on Ray Train (python -m jobs.train)", add_help=False)
    sub.add_parser("eval", help="top-1/top-5 of a checkpoint, supervised or zero-shot", add_help=False)
    sub.add_parser("demo", help="rebuild or re-score the vitaclip-demo model (python -m jobs.demo)", add_help=False)
    sub.add_parser("eval-retrieval", help="text-to-video retrieval recall of a checkpoint", add_help=False)

    _add_build_index_parser(sub)

    p = sub.add_parser("migrate", help="convert an output of the previous layout (_commits/) to Delta tables")
    p.add_argument("output", help="the job's output: a folder, or an s3://, gs:// or az:// prefix")
    p.add_argument("--s3-endpoint-url", default=None)
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("runs", help="the latest runs on an output: state, counts, errors, and its recorded settings")
    p.add_argument("output", help="the job's output: a folder, or an s3://, gs:// or az:// prefix")
    p.add_argument("--last", type=int, default=20, help="how many of the latest runs")
    p.add_argument("--json", action="store_true", help="the run records as JSON")
    p.add_argument("--s3-endpoint-url", default=None)
    p.set_defaults(func=_cmd_runs)

    _add_search_parser(sub)
    _add_serve_parser(sub)
    for command in sub.choices.values():
        command.formatter_class = _DefaultsShown
    return parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="text encoder (default: the index's model)")
    p.add_argument("--checkpoint", default=None, help="the weights the index was built with")
    p.add_argument("--device", default=None)
    p.add_argument("--s3-endpoint-url", default=None)


def _add_build_index_parser(sub: Any) -> None:
    p = sub.add_parser("build-index", help="build or extend OUT/index from the committed rows")
    p.add_argument("output", help="the job's output: a folder, or an s3://, gs:// or az:// prefix")
    p.add_argument("--kind", default="auto", help="auto, flat, ivf, ivfpq, hnsw or a FAISS factory string")
    p.add_argument(
        "--recall-target",
        type=_recall_target,
        default=0.95,
        help="recall at 10 that approximate kinds tune their search setting (nprobe, efSearch) to reach",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild instead of extending")
    p.add_argument(
        "--model", default=None, help="the rows' model (default: the index's, else the only one in the output)"
    )
    p.add_argument("--checkpoint", default=None)
    p.add_argument(
        "--switch-index",
        action="store_true",
        help="make OUT/index the named model's when it holds another model's rows (refused without it)",
    )
    p.add_argument("--s3-endpoint-url", default=None)
    p.set_defaults(func=_cmd_build_index)


def _add_search_parser(sub: Any) -> None:
    p = sub.add_parser("search", help="search the index by text, or by a picture or clip (--like)")
    p.add_argument("--index", required=True, help="the job's output: a folder, or an s3://, gs:// or az:// prefix")
    _add_model_options(p)
    p.add_argument("query", nargs="*", help="the text to search for")
    p.add_argument("--like", metavar="FILE", help="search by a picture or a short clip instead of text")
    p.add_argument("-k", type=int, default=10, help="how many results, 1-100 (as the service allows)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--segments", action="store_true", help="search moments of long videos")
    p.add_argument("--label", default=None, help="only videos with this label among their top labels")
    p.add_argument("--min-duration", type=float, default=None, help="only videos at least this long (s)")
    p.add_argument("--max-duration", type=float, default=None, help="only videos at most this long (s)")
    p.set_defaults(func=_cmd_search)


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="HTTP search service (JSON API, OpenAPI at /docs, page at /)")
    p.add_argument(
        "--index",
        required=True,
        action="append",
        metavar="[NAME=]OUT",
        help="an output folder or s3:// prefix, named NAME in requests (?index=NAME); repeat for several outputs",
    )
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535, 0 for any free one")
    p.add_argument("--max-upload-mb", type=_upload_mib, default=20.0, help="largest picture or clip query (MiB)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds before a query gets 504")
    p.add_argument("--max-connections", type=int, default=256, help="connections before new ones get 503")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients may use (Host header) besides localhost and loopback addresses; repeat for several. "
        "On a non-loopback --host, the only names answered when given",
    )
    p.add_argument(
        "--media-root",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder of this host /media may serve local video files from (they must also be inside the input "
        "folders the runs recorded); repeat for several. Default: a local output serves from the folders its runs "
        "recorded, an object-store output serves no local file",
    )
    p.add_argument(
        "--max-concurrent-queries", type=int, default=None, help="queries computed at once (default: 2 x cores, 4-16)"
    )
    p.add_argument(
        "--max-concurrent-uploads",
        type=int,
        default=None,
        help="of those, how many may be picture or clip queries (default: half, at least 1)",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        default=30.0,
        help="seconds an answer may wait on a client that reads nothing before its connection is dropped",
    )
    p.add_argument(
        "--reload-seconds",
        type=float,
        default=60.0,
        help="check this often whether a run updated an output's index, and load it again (0: never)",
    )
    p.add_argument("--ray-serve", action="store_true", help="serve N replicas with Ray Serve instead of one process")
    p.add_argument("--replicas", type=int, default=2, help="with --ray-serve: replicas of the service")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="with --ray-serve")
    p.add_argument("--ray-address", default=None, help="with --ray-serve: a running cluster (default: start one)")
    p.set_defaults(func=_cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["index"]:  # the job parses its own flags
        return _cmd_index(argv[1:])
    if argv[:1] == ["submit"]:
        from jobs.submit import main as submit_main

        return submit_main(argv[1:], prog="vitaclip submit")
    if argv[:1] == ["train"]:
        from jobs.train import main as train_main

        return train_main(argv[1:], prog="vitaclip train")
    if argv[:1] == ["eval"]:
        from jobs.evaluate import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["demo"]:
        from jobs.demo import main as demo_main

        return demo_main(argv[1:], prog="vitaclip demo")
    if argv[:1] == ["eval-retrieval"]:
        from jobs.evaluate import main_retrieval

        return main_retrieval(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser: its usage and "vitaclip search: error", not the top level's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        _check_endpoint(args)
        return int(args.func(args))
    except ValueError as exc:  # configuration and checkpoint errors: a clear message, no traceback
        print(f"vitaclip {args.command}: error: {terminal_text(redact_text(str(exc)))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (`vitaclip runs OUT | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 0
    except OSError as exc:  # storage or the network failing after their retries: what failed, not a traceback
        said = redact_text(error_line(exc))
        hint = storage_hint(said)
        print(f"vitaclip {args.command}: error: {said}{hint}", file=sys.stderr)
        return 2 if hint else 1


def _check_endpoint(args: argparse.Namespace) -> None:
    """Fails at once when a command reads an s3:// output through a custom endpoint that takes no connection (the
    clients would retry for over a minute first)."""
    named = getattr(args, "output", None) or getattr(args, "index", None)
    locations = [_output_of(x) for x in (named if isinstance(named, list) else [named]) if isinstance(x, str)]
    if any(x.lower().startswith("s3://") for x in locations):
        for location in locations:  # a URL with credentials is refused before any connection
            refuse_object_userinfo(location, "output")
        from index.s3 import check_credentials_found, check_endpoint_reachable

        check_endpoint_reachable(getattr(args, "s3_endpoint_url", None))
        check_credentials_found(next(x for x in locations if x.lower().startswith("s3://")))


def _output_of(spec: str) -> str:
    """The output of an ``--index`` value, which serve takes as ``[NAME=]OUT`` (as `index.service.parse_index_specs`
    reads it: a name holds no "/" and no "://")."""
    name, sep, out = spec.partition("=")
    return out if sep and "/" not in name else spec


# What the object store clients (pyarrow's AWS SDK, delta-rs, botocore) say when the configuration is wrong, not the
# storage: the endpoint cannot be reached, or the credentials are missing, wrong or not allowed.
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode: 7", "Could not connect to the endpoint URL", "Connection refused")
_DENIED = (
    "ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH", "Unable to locate credentials", "No AWS credentials", "MissingCredentials",
)  # fmt: skip


def storage_hint(message: str) -> str:
    """What to check, appended to a storage error's message, when it names a configuration problem ("" else)."""
    if any(mark in message for mark in _UNREACHABLE):
        return " (the storage endpoint cannot be reached: check --s3-endpoint-url or AWS_ENDPOINT_URL, and the network)"
    if any(mark in message for mark in _DENIED):
        return (
            " (access refused: check the credentials the standard AWS chain resolves to and their permissions on "
            "this bucket and prefix)"
        )
    return ""


def run() -> NoReturn:
    """The `vitaclip` command: `main`, then the job's way of ending the process (`jobs.index_videos.exit_process`:
    an indexing run stopped by SIGTERM exits with 143, not with the abort of Ray's core worker at teardown)."""
    from jobs.index_videos import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
