"""Fails when a function in the project is longer than the limit (80 lines, decorators and docstring included).

A function may be longer only when it is a documented state machine: the line right above its ``def`` (or above
its decorators) is a comment starting with ``# state machine:`` that says why it stays whole.

    python scripts/check_function_length.py            # the project's folders
    python scripts/check_function_length.py --max-lines 60 jobs
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("vitaclip", "jobs", "index", "benchmarks", "tests", "scripts")
MARKER = "# state machine:"


def long_functions(path: Path, max_lines: int) -> Iterator[tuple[int, str, int]]:
    """(line, qualified name, length) of each function in `path` over `max_lines` lines without the marker."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    length = (child.end_lineno or child.lineno) - first + 1
                    marked = first >= 2 and lines[first - 2].strip().startswith(MARKER)
                    if length > max_lines and not marked:
                        yield child.lineno, name, length
                yield from visit(child, f"{name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help=f"files or folders (default: {', '.join(FOLDERS)})")
    parser.add_argument("--max-lines", type=int, default=80)
    args = parser.parse_args(argv)
    roots = [Path(p) for p in args.paths] or [ROOT / f for f in FOLDERS]
    files = sorted({f for r in roots for f in ([r] if r.is_file() else r.rglob("*.py"))})
    found = [(f, *hit) for f in files for hit in long_functions(f, args.max_lines)]
    for path, line, name, length in found:
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"{shown}:{line}: {name} is {length} lines (limit {args.max_lines})")
    if found:
        print(
            f"{len(found)} functions over {args.max_lines} lines: split them, or mark a state machine with "
            f"'{MARKER} <why>' on the line above its def",
            file=sys.stderr,
        )
        return 1
    print(f"{len(files)} files: no function over {args.max_lines} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
