"""Packs a folder of wheels into parts that each fit what one call to a GPU machine may carry (64 MiB).

Wheels larger than a part (ray's is ~77 MB) are cut into byte ranges named ``<wheel>.part-NN``; the GPU side joins
them again (`join_parts`). Parts are filled largest piece first.

    python scripts/pack_wheels.py .whl/all .whl --part-mib 60      # -> .whl/1, .whl/2, ...
    python scripts/pack_wheels.py --join .gpu-stage                 # on the GPU machine: whole wheels again
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MIB = 2**20


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


def write_parts(source: Path, target: Path, limit: int) -> list[Path]:
    sizes = {p.name: p.stat().st_size for p in sorted(source.glob("*.whl"))}
    plan = plan_parts(sizes, limit)
    folders = []
    for number, pieces in enumerate(plan, start=1):
        folder = target / str(number)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, start, end in pieces:
            whole = start == 0 and end == sizes[name]
            out = folder / (name if whole else f"{name}.part-{start // limit:02d}")
            with (source / name).open("rb") as src, out.open("wb") as dst:
                src.seek(start)
                dst.write(src.read(end - start))
        folders.append(folder)
    return folders


def join_parts(folder: Path) -> list[Path]:
    """Joins ``<wheel>.part-NN`` pieces in `folder` into their wheels (pieces removed); returns the wheels."""
    groups: dict[str, list[Path]] = {}
    for piece in folder.glob("*.whl.part-*"):
        groups.setdefault(piece.name.rsplit(".part-", 1)[0], []).append(piece)
    for name, pieces in groups.items():
        with (folder / name).open("wb") as dst:
            for piece in sorted(pieces, key=lambda p: int(p.name.rsplit("-", 1)[1])):
                dst.write(piece.read_bytes())
        for piece in pieces:
            piece.unlink()
    return sorted(folder.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("target", type=Path, nargs="?")
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--join", action="store_true", help="join pieces in SOURCE into wheels")
    args = p.parse_args(argv)
    if args.join:
        wheels = join_parts(args.source)
        print(f"{len(wheels)} wheels in {args.source}")
        return 0
    if args.target is None:
        p.error("give SOURCE and TARGET")
    for folder in write_parts(args.source, args.target, int(args.part_mib * MIB)):
        total = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{folder}: {total / MIB:.1f} MiB, {len(list(folder.iterdir()))} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
