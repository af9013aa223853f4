"""The GPU check cannot rot: its dry run (the same code paths on CPU, tiny sizes) and the wheel packing it relies on."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pack_module():
    spec = importlib.util.spec_from_file_location("pack_wheels", ROOT / "scripts" / "pack_wheels.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_files_are_packed_into_parts_that_fit_and_join_back_only_when_whole(tmp_path: Path) -> None:
    pack = _pack_module()
    source = tmp_path / "all"
    source.mkdir()
    sizes = {"site-job.tar.xz": 2500, "site-core.tar.xz": 700, "small-1.0-py3-none-any.whl": 90}
    digests = {}
    for name, size in sizes.items():
        data = bytes((i * 7 + len(name)) % 256 for i in range(size))
        (source / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    folders = pack.write_parts(source, tmp_path / "parts", 1000)
    assert all(sum(f.stat().st_size for f in folder.iterdir()) <= 1000 for folder in folders)
    assert len(folders) == 4  # 3 pieces of the big file, the others packed beside them
    staged = tmp_path / "stage"
    staged.mkdir()
    for folder in folders:  # what the GPU machine accumulates, one part per call
        for piece in folder.iterdir():
            (staged / piece.name).write_bytes(piece.read_bytes())
        whole, missing = pack.join_parts(staged)
        if folder != folders[-1]:  # a file is joined only once all its pieces are there
            assert "site-job.tar.xz" not in {w.name for w in whole} and missing
    assert {w.name for w in whole} == set(sizes) and not missing
    assert {w.name: hashlib.sha256(w.read_bytes()).hexdigest() for w in whole} == digests
    assert not list(staged.glob("*.part-*"))


def test_pieces_of_two_builds_are_never_joined_together_and_a_damaged_join_is_refused(tmp_path: Path) -> None:
    pack = _pack_module()
    builds = []
    for seed in (1, 2):  # the same file name and size, other bytes: two builds of the same wheel
        source = tmp_path / f"all{seed}"
        source.mkdir()
        (source / "site-job.tar.xz").write_bytes(bytes((i * seed) % 251 for i in range(2500)))
        (tmp_path / "parts" / "7").mkdir(parents=True, exist_ok=True)  # a part folder of an earlier, longer build
        builds.append(pack.write_parts(source, tmp_path / "parts", 1000))
        assert not (tmp_path / "parts" / "7").exists()
        builds[-1] = {p.name: p.read_bytes() for folder in builds[-1] for p in folder.iterdir()}
    stage = tmp_path / "stage"
    stage.mkdir()
    first, second = (sorted(b.items()) for b in builds)
    for name, data in first[:2] + second[2:]:  # pieces 0-1 of one build, piece 2 of the other
        (stage / name).write_bytes(data)
    whole, missing = pack.join_parts(stage)
    assert not whole and len(missing) == 2 and all("not carried yet" in line for line in missing)
    name, data = second[0]
    (stage / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the second build complete, one byte damaged
    (stage / second[1][0]).write_bytes(second[1][1])
    whole, missing = pack.join_parts(stage)
    assert not whole and any("do not match" in line for line in missing)
    assert not (stage / "site-job.tar.xz").exists()


def _wheel(path: Path, files: dict[str, tuple[bytes, int]]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            archive.writestr(info, data)


def test_sites_unpack_wheels_as_installed_keeping_executables_and_leaving_out_dropped_paths(tmp_path: Path) -> None:
    pack = _pack_module()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels / "av-1.0-cp312-abi3-any.whl", {"av/__init__.py": (b"x = 1\n", 0o644)})
    _wheel(
        wheels / "ray-1.0-cp312-cp312-any.whl",
        {"ray/__init__.py": (b"", 0o644), "ray/core/raylet": (b"\x7fELF", 0o755), "ray/jars/big.jar": (b"j", 0o644),
         "ray/ui/main.js.map": (b"{}", 0o644)},
    )  # fmt: skip
    archives = pack.build_sites(wheels, tmp_path / "site", core=["av"], drop=["ray/jars", "*.js.map"])
    assert [a.name for a in archives] == ["site-core.tar.xz", "site-job.tar.xz"]
    members = {}
    for archive in archives:
        with tarfile.open(archive, "r:xz") as tar:
            members[archive.name] = {m.name: m.mode & 0o777 for m in tar.getmembers()}
    assert members["site-core.tar.xz"] == {"av/__init__.py": 0o644}
    assert members["site-job.tar.xz"] == {"ray/__init__.py": 0o644, "ray/core/raylet": 0o755}


def test_dry_run_covers_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    scratch = set(Path(tempfile.gettempdir()).glob("gpu-check-*"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"model", "stage", "agreement", "faiss", "train", "job"}
    assert [r["compiled"] for r in sections["stage"]["runs"]] == [False] and sections["stage"]["runs"][0][
        "videos_per_second"
    ] > 0
    assert all(s["ok"] for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    modes = {run["mode"] for run in sections["model"]["runs"]}
    assert modes == {"fp16-autocast", "bf16-weights"} and sections["model"]["gflops_per_video"] > 0
    assert sections["agreement"]["half_dtype"] == "float16"
    assert sections["agreement"]["vitaclip-demo"]["cos_min"] >= 0.999
    flat = [r for r in sections["faiss"]["runs"] if r["kind"] == "Flat"]
    assert flat and flat[0]["recall_at_10"] == 1.0
    assert sections["train"]["steps_per_second"] > 0
    assert sections["job"]["videos_per_second"] > 0 and sections["job"]["embed_device"] == "cpu"
    assert "sections failed: none" in done.stdout
    assert set(Path(tempfile.gettempdir()).glob("gpu-check-*")) <= scratch  # its videos and outputs removed
