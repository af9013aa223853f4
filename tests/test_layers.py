"""The packages import in one direction: vitaclip <- index <- jobs (the model core knows nothing of the tables or
the job; the tables and the index know nothing of the job). Every import counts, including those inside
functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("vitaclip", "index", "jobs")  # each may import those before it


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_imports_go_one_way() -> None:
    wrong = []
    checked = 0
    for rank, package in enumerate(LAYERS):
        above = set(LAYERS[rank + 1 :])
        for path in sorted((ROOT / package).rglob("*.py")):
            checked += 1
            for line, module in _imports(path):
                if module.split(".")[0] in above:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert checked > 40  # the walk really saw the packages
    assert not wrong, "imports against the layer order vitaclip <- index <- jobs:\n" + "\n".join(wrong)


def test_the_command_line_lives_at_the_top() -> None:
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.findall(r'^vitaclip\s*=\s*"([^"]+)"', scripts, re.M) == ["jobs.cli:main"]
