"""Packs what the GPU check needs into parts that each fit what one call to a GPU machine may carry (64 MiB).

Two steps here, one there:

    python scripts/pack_wheels.py site .whl/all .whl/site --core av faiss_cpu open_clip_torch ftfy wcwidth \\
        --drop ray/jars ray/rllib                           # wheels -> site-core.tar.xz, site-job.tar.xz
    python scripts/pack_wheels.py .whl/site .whl --part-mib 53      # -> .whl/1, .whl/2, ...
    python scripts/pack_wheels.py --join .gpu-stage                 # on the GPU machine: whole files again

``site`` unpacks the wheels as pip would install them (files at the top of the site folder, executable bits kept)
and recompresses them with xz: 200 MB of wheels become about 105 MB, two calls instead of four. The distributions
named by ``--core`` (the encoder, decoding, FAISS) go into their own archive, so a call that carries it can run
every section but the job even if the other archive never arrives.

Files larger than a part are cut into byte ranges named ``<file>.part-<i>of<n>.<sha>`` (the first 16 hex digits of
the whole file's SHA-256); the GPU side joins a file only when all its pieces of one build are there and checks the
joined file against that digest (`join_parts`): pieces of two builds are never mixed. Parts are filled largest
piece first; writing them clears the parts of an earlier build.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import lzma
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MIB = 2**20
PIECE = re.compile(r"^(?P<name>.+)\.part-(?P<index>\d+)of(?P<count>\d+)\.(?P<digest>[0-9a-f]{16})$")
DIGEST_CHARS = 16
CARRIED = ("*.whl", "*.tar.xz")


def plan_parts(sizes: dict[str, int], limit: int) -> list[list[tuple[str, int, int]]]:
    """Pieces ``(file, start, end)`` per part, each part at most `limit` bytes; a file larger than `limit` is cut."""
    if limit <= 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    pieces = []
    for name, size in sizes.items():
        for start in range(0, max(size, 1), limit):
            pieces.append((name, start, min(size, start + limit)))
    pieces.sort(key=lambda p: p[2] - p[1], reverse=True)
    parts: list[list[tuple[str, int, int]]] = []
    room: list[int] = []
    for piece in pieces:
        size = piece[2] - piece[1]
        for i, free in enumerate(room):
            if size <= free:
                parts[i].append(piece)
                room[i] -= size
                break
        else:
            parts.append([piece])
            room.append(limit - size)
    return parts


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()[:DIGEST_CHARS]


def write_parts(source: Path, target: Path, limit: int) -> list[Path]:
    """The files of `source` in numbered part folders under `target` (``1``, ``2``, ...; those of an earlier build
    removed first, so that no stale part is carried)."""
    files = sorted({p for pattern in CARRIED for p in source.glob(pattern)})
    sizes = {p.name: p.stat().st_size for p in files}
    digests = {p.name: _digest(p) for p in files}
    plan = plan_parts(sizes, limit)
    if target.is_dir():
        for old in target.iterdir():
            if old.is_dir() and old.name.isdigit():
                shutil.rmtree(old)
    folders = []
    for number, pieces in enumerate(plan, start=1):
        folder = target / str(number)
        folder.mkdir(parents=True)
        for name, start, end in pieces:
            count = -(-sizes[name] // limit)
            piece = f"{name}.part-{start // limit}of{count}.{digests[name]}"
            out = folder / (name if count == 1 else piece)
            with (source / name).open("rb") as src, out.open("wb") as dst:
                src.seek(start)
                dst.write(src.read(end - start))
        folders.append(folder)
    return folders


def join_parts(folder: Path) -> tuple[list[Path], list[str]]:
    """Joins complete sets of ``<file>.part-<i>of<n>.<sha>`` pieces of one build in `folder` (pieces removed) and
    checks each joined file against its digest; returns the whole files there and a line for each file whose
    pieces are not all there yet (naming the missing ones) or whose joined bytes do not match (file removed)."""
    groups: dict[tuple[str, int, str], dict[int, Path]] = {}
    for piece in folder.iterdir():
        match = PIECE.match(piece.name)
        if match:
            key = (match["name"], int(match["count"]), match["digest"])
            groups.setdefault(key, {})[int(match["index"])] = piece
    missing = []
    for (name, count, digest), pieces in sorted(groups.items()):
        absent = sorted(set(range(count)) - set(pieces))
        if absent:
            missing.append(f"{name} (build {digest}): pieces {absent} of {count} not carried yet")
            continue
        joined = folder / name
        with joined.open("wb") as dst:
            for index in range(count):
                dst.write(pieces[index].read_bytes())
        for piece in pieces.values():
            piece.unlink()
        if _digest(joined) != digest:
            joined.unlink()
            missing.append(f"{name} (build {digest}): joined pieces do not match their digest: build the parts again")
    whole = sorted({p for pattern in CARRIED for p in folder.glob(pattern)})
    return whole, missing


def _unpack_wheel(wheel: Path, site: Path) -> None:
    """The wheel's files as pip installs them into a target folder (``*.data`` scripts aside), with the executable
    bits the wheel records (Ray's server binaries need them)."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = site / info.filename
            if not path.resolve().is_relative_to(site.resolve()):
                raise ValueError(f"{wheel.name}: {info.filename} is outside the wheel")
            archive.extract(info, site)
            if not info.is_dir():
                path.chmod(0o755 if (info.external_attr >> 16) & 0o111 else 0o644)


def _dropped(relative: str, drop: list[str]) -> bool:
    return any(relative == d or relative.startswith(d.rstrip("/") + "/") or fnmatch.fnmatch(relative, d) for d in drop)


def build_sites(wheels: Path, target: Path, core: list[str], drop: list[str]) -> list[Path]:
    """``site-core.tar.xz`` (the distributions named in `core`) and ``site-job.tar.xz`` (the others), without the
    paths in `drop` (folders or patterns relative to the site, e.g. ``ray/jars`` or ``*.js.map``)."""
    target.mkdir(parents=True, exist_ok=True)
    archives = []
    with tempfile.TemporaryDirectory(prefix="gpu-site-") as scratch:
        groups: dict[str, list[Path]] = {"core": [], "job": []}
        for wheel in sorted(wheels.glob("*.whl")):
            distribution = wheel.name.split("-", 1)[0]
            groups["core" if distribution in core else "job"].append(wheel)
        for group, members in groups.items():
            site = Path(scratch) / group
            site.mkdir()
            for wheel in members:
                _unpack_wheel(wheel, site)
            out = target / f"site-{group}.tar.xz"
            with lzma.open(out, "wb", preset=9) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
                for path in sorted(site.rglob("*")):
                    relative = path.relative_to(site).as_posix()
                    if not path.is_dir() and not _dropped(relative, drop):
                        tar.add(path, arcname=relative, recursive=False)
            archives.append(out)
    return archives


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="+", help="[site] SOURCE [TARGET]")
    p.add_argument("--part-mib", type=float, default=53.0)
    p.add_argument("--join", action="store_true", help="join complete sets of pieces in SOURCE")
    p.add_argument("--core", nargs="*", default=[], help="site: distributions for site-core.tar.xz")
    p.add_argument("--drop", nargs="*", default=[], help="site: paths left out of the archives")
    args = p.parse_args(argv)
    if args.join:
        whole, missing = join_parts(Path(args.source[0]))
        print(f"{len(whole)} whole files in {args.source[0]}: {' '.join(w.name for w in whole)}")
        for line in missing:
            print(f"incomplete: {line}")
        return 0
    if args.source[0] == "site" and len(args.source) == 3:
        for archive in build_sites(Path(args.source[1]), Path(args.source[2]), args.core, args.drop):
            print(f"{archive}: {archive.stat().st_size / MIB:.1f} MiB")
        return 0
    if len(args.source) != 2:
        p.error("give SOURCE TARGET, or site WHEELS TARGET, or --join FOLDER")
    for folder in write_parts(Path(args.source[0]), Path(args.source[1]), int(args.part_mib * MIB)):
        total = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{folder}: {total / MIB:.1f} MiB, {' '.join(sorted(f.name for f in folder.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
