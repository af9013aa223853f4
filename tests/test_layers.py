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
    assert re.findall(r'^vitaclip\s*=\s*"([^"]+)"', scripts, re.M) == ["jobs.cli:run"]


def test_function_length_check_flags_long_functions_unless_marked(tmp_path: Path) -> None:
    import subprocess
    import sys

    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    long = tmp_path / "long.py"
    long.write_text(f"def short():\n    return 1\n\n\nclass A:\n    def long(self):\n{body}\n")
    script = ROOT / "scripts" / "check_function_length.py"
    found = subprocess.run([sys.executable, str(script), str(long)], capture_output=True, text=True)
    assert found.returncode == 1
    assert "A.long is 81 lines" in found.stdout and "short" not in found.stdout
    long.write_text(f"class A:\n    # state machine: one loop over packets\n    def long(self):\n{body}\n")
    assert subprocess.run([sys.executable, str(script), str(long)], capture_output=True).returncode == 0
    whole = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stdout  # the project itself keeps the limit


def test_the_module_ray_workers_of_a_run_import_leaves_torch_out() -> None:
    """The planner, decode tasks and write tasks unpickle what they run from jobs.pipeline in fresh Ray workers;
    torch and open_clip there cost each such process ~3.5 s of CPU for nothing (the embed actors import them)."""
    import subprocess
    import sys

    code = "import sys, jobs.pipeline; print([m for m in ('torch', 'open_clip') if m in sys.modules])"
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == "[]"


def test_decode_tasks_import_only_what_decoding_needs() -> None:
    """Every decode task's worker imports `jobs.decode_embed` (its function's module): the output tables (delta-rs,
    pandas through pyarrow.dataset), FAISS and boto3 (reading local files) would cost each such process about 0.8 s
    of CPU before its first video."""
    import subprocess
    import sys

    heavy = ("torch", "open_clip", "faiss", "deltalake", "pandas", "pyarrow.dataset", "boto3", "ray.data")
    code = f"import sys, jobs.decode_embed; print([m for m in {heavy!r} if m in sys.modules])"
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == "[]"
    # The lazy package names still resolve.
    code = "import jobs.storage as s, index; print(s.open_store.__module__, s.VideoObject.__name__)"
    code += "; print(index.build_index.__module__)"
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert found.stdout.split() == ["index.stores", "VideoObject", "index.build"], found.stderr[-2000:]
