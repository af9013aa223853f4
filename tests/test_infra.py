"""infra/: manifests and images checked statically, the scheduler and checkpoint scripts, `vitaclip submit` and the
local stack (S3 server + Ray head, started and stopped by the same script a person uses).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from test_index_job import job_args, make_videos

from index import tables
from jobs import submit
from jobs.config import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BASE = INFRA / "k8s" / "base"
OVERLAY = INFRA / "k8s" / "overlays" / "example"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|(^|_)KEY($|_)|ACCESS_KEY", re.IGNORECASE)


def _load_script(path: Path) -> ModuleType:
    """Imports a script under infra/ (not a package) by path."""
    spec = importlib.util.spec_from_file_location(f"infra_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under infra/k8s, the RayJob template included (kustomization files excluded)."""
    out = []
    for path in sorted((INFRA / "k8s").rglob("*.yaml")):
        for doc in _docs(path):
            if "apiVersion" in doc and doc.get("kind") != "Kustomization":
                out.append((path, doc))
    return out


def _containers(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    yield f"{where}/{key}/{c.get('name')}", c
            else:
                yield from _containers(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _containers(item, f"{where}[{i}]")


def _rayjob() -> dict[str, Any]:
    (doc,) = _docs(BASE / "rayjob.yaml")
    return doc


def _kind(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''} under infra/k8s"
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------------- static checks


def test_every_yaml_under_infra_parses() -> None:
    paths = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert len(paths) >= 10
    for path in paths:
        docs = _docs(path)
        assert docs, f"{path} is empty"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_builds_base_and_overlay() -> None:
    built = {}
    for folder in (BASE, OVERLAY):
        out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        built[folder] = [d for d in yaml.safe_load_all(out.stdout) if d]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in built[OVERLAY]}
    assert {("RayCluster", "vitaclip"), ("CronJob", "vitaclip-nightly"), ("Role", "vitaclip-scheduler")} <= set(objects)
    assert all(d["metadata"].get("namespace") == "vitaclip" for d in built[OVERLAY] if d["kind"] != "Namespace")
    # The overlay's image reaches every container and the scheduler's VITACLIP_IMAGE (for the RayJobs it creates).
    cron = objects[("CronJob", "vitaclip-nightly")]
    (scheduler,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    image = scheduler["image"]
    assert image.endswith("/vitaclip:0.1.0-gpu")
    assert {e["name"]: e.get("value") for e in scheduler["env"]}["VITACLIP_IMAGE"] == image
    for kind_name, obj in objects.items():
        for where, container in _containers(obj):
            assert container["image"] == image, (kind_name, where)
    # The overlay's values replace the base's: job options, checkpoint, schedule, IAM role.
    job_config = objects[("ConfigMap", "vitaclip-job-config")]["data"]
    assert yaml.safe_load(job_config["job.yaml"]) == yaml.safe_load((OVERLAY / "job.yaml").read_text())
    assert job_config["checkpoint_uri"].startswith("s3://")
    assert cron["spec"]["schedule"] == "30 1 * * *"
    role = objects[("ServiceAccount", "vitaclip")]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.endswith(":role/vitaclip-indexer-example")
    template = objects[("ConfigMap", "vitaclip-rayjob-template")]["data"]["rayjob.yaml"]
    assert yaml.safe_load(template) == _rayjob()


def test_rayjob_entrypoint_runs_the_index_module_with_valid_flags(tmp_path: Path) -> None:
    spec = _rayjob()["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.index_videos"]
    assert (ROOT / "jobs" / "index_videos.py").is_file()
    flags = build_parser().parse_args(argv[3:])
    assert flags.config == "/etc/vitaclip/job/job.yaml"
    # The --config file comes from the ConfigMap: base's and overlay's job.yaml must both make a valid config.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert mounts["/etc/vitaclip/job"] == "job-config"
    for job_yaml in (BASE / "job.yaml", OVERLAY / "job.yaml"):
        local = [*argv[3:]]
        local[local.index("--config") + 1] = str(job_yaml)
        config = config_from_args(local)
        assert config.inputs and config.output.startswith("s3://")
        assert config.checkpoint == "/models/checkpoint" and "/models" in mounts


def test_rayjob_is_one_bounded_run() -> None:
    spec = _rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    cron = _kind("CronJob")["spec"]["jobTemplate"]["spec"]
    assert cron["activeDeadlineSeconds"] > spec["activeDeadlineSeconds"]  # the scheduler outwaits the run
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # The job sizes its pools from the cluster it starts on: the run's groups have a fixed size.
    for group in cluster["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] >= 1, group["groupName"]


def test_standing_cluster_autoscales_gpu_and_cpu_groups() -> None:
    cluster = _kind("RayCluster", "vitaclip")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]
    # The RayJob's cluster runs the same pods as the standing one.
    run_groups = {g["groupName"]: g for g in _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    for name, group in groups.items():
        ours = dict(_containers(group["template"]))
        theirs = dict(_containers(run_groups[name]["template"]))
        assert {k: c["resources"] for k, c in ours.items()} == {k: c["resources"] for k, c in theirs.items()}


def test_every_container_requests_and_limits_cpu_and_memory() -> None:
    count = 0
    for path, doc in _k8s_docs():
        for where, container in _containers(doc):
            count += 1
            resources = container.get("resources") or {}
            for side in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(side) or {}), f"{path.name} {where}: {side}"
        autoscaler = (doc.get("spec") or {}).get("autoscalerOptions")
        if autoscaler:
            assert {"cpu", "memory"} <= set(autoscaler["resources"]["limits"]), path.name
    assert count >= 10
    for cluster in (_kind("RayCluster")["spec"], _rayjob()["spec"]["rayClusterSpec"]):
        gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
        for where, container in _containers(gpu["template"]):
            if where.startswith("/spec/containers"):
                for side in ("requests", "limits"):
                    assert int(container["resources"][side]["nvidia.com/gpu"]) >= 1, where


def test_pods_run_as_non_root_with_the_s3_service_account() -> None:
    sa = _kind("ServiceAccount", "vitaclip")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    ray_pods = []
    for cluster in (_kind("RayCluster")["spec"], _rayjob()["spec"]["rayClusterSpec"]):
        ray_pods.append(cluster["headGroupSpec"]["template"]["spec"])
        ray_pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in ray_pods:
        assert pod["serviceAccountName"] == "vitaclip"
    cron_pod = _kind("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cron_pod["serviceAccountName"] == "vitaclip-scheduler"
    for pod in [*ray_pods, cron_pod, _rayjob()["spec"]["submitterPodTemplate"]["spec"]]:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    rules = _kind("Role", "vitaclip-scheduler")["rules"]
    assert rules == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": rules[0]["verbs"]}]
    assert "create" in rules[0]["verbs"]


def test_cronjob_forbids_overlapping_runs() -> None:
    cron = _kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert "--wait" in container["command"]  # Forbid covers the whole run only if the pod waits for it
    assert container["command"][1] == "/opt/vitaclip/scripts/create_rayjob.py"


def test_no_inline_secrets_under_infra() -> None:
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    secret_assignment = re.compile(r"aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{30,}", re.IGNORECASE)
    private_key = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
    docker_secret = re.compile(r"^\s*(ENV|ARG)\s+\S*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", re.IGNORECASE | re.MULTILINE)
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for path in files:
        text = path.read_text(errors="replace")
        for pattern in (key_id, secret_assignment, private_key):
            assert not pattern.search(text), f"{path}: {pattern.pattern}"
        if path.name.startswith("Dockerfile"):
            assert not docker_secret.search(text), path
    for path, doc in _k8s_docs():
        assert doc["kind"] != "Secret", f"{path}: a Secret manifest (create it with kubectl, never in git)"
        for where, container in _containers(doc):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "valueFrom" in env, f"{path.name} {where}: {env['name']}"


def test_ray_nodes_keep_idle_workers_beyond_the_actor_pools() -> None:
    """Every Ray node keeps at least 8 workers more than its CPUs before Ray ends idle ones (the embedded Ray does
    the same): with the default, one per CPU, write tasks on a node full of pool actors start new processes."""
    from jobs.ray_resources import worker_soft_limit

    checked = 0
    for cluster in (_kind("RayCluster")["spec"], _rayjob()["spec"]["rayClusterSpec"]):
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            (container,) = group["template"]["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in container.get("env") or []}
            cpus = int(container["resources"]["limits"]["cpu"])
            assert int(env["RAY_num_workers_soft_limit"]) >= worker_soft_limit(cpus), container["name"]
            checked += 1
    assert checked == 6
    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    (limit,) = [o.split("=")[1] for o in config["docker"]["run_options"] if "RAY_num_workers_soft_limit=" in o]
    assert int(limit) >= worker_soft_limit(16)  # c6i.4xlarge, the largest node type: 16 vCPUs


def test_cluster_launcher_config() -> None:
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    instance_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert any(i.startswith(("g5.", "g6.")) for i in instance_types) and any(i.startswith("c") for i in instance_types)
    for t in types.values():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    (image,) = overlay["images"]
    assert config["docker"]["image"] == f"{image['newName']}:{image['newTag']}"  # the same image everywhere


def test_dockerfiles_pin_the_base_and_run_as_non_root() -> None:
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (INFRA / "docker" / name).read_text()
        (base,) = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
        assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-(gpu|cpu)(@sha256:[0-9a-f]{64})?", base), base
        users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
        assert users and users[-1].split(":")[0] not in ("root", "0"), name
        assert "constraints.txt" in text
        assert (INFRA / "docker" / f"{name}.dockerignore").is_file()
    gpu = (INFRA / "docker" / "Dockerfile").read_text()
    assert ".[gpu,serve]" in gpu and "pip uninstall -y faiss-cpu" in gpu and "StandardGpuResources" in gpu
    pins = [line for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines() if line[:1] not in "#"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==\S+", line) for line in pins)
    names = {line.split("==")[0].lower().replace("_", "-") for line in pins}
    assert {"torch", "ray", "open-clip-torch", "faiss-cpu", "faiss-gpu-cu12", "av", "boto3", "pyarrow"} <= names
    # Every requirement of the image's extras is pinned (an unpinned one installs whatever is newest at build time).
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]
    required = [*project["dependencies"], *project["optional-dependencies"]["gpu"]]
    required += project["optional-dependencies"]["serve"]
    for requirement in required:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement)
        assert name and name.group(0).lower().replace("_", "-") in names, requirement


# ----------------------------------------------------------------------------------------------------- scripts


def test_scheduler_renders_a_rayjob_from_the_template() -> None:
    create = _load_script(BASE / "create_rayjob.py")
    manifest = create.render(_rayjob(), image="registry.example/vitaclip:1.2.3", namespace="vc")
    meta = manifest["metadata"]
    assert "name" not in meta and meta["generateName"] == "vitaclip-index-" and meta["namespace"] == "vc"
    assert meta["labels"][create.TEMPLATE_LABEL] == "vitaclip-index"
    images = {c["image"] for _, c in _containers(manifest)}
    assert images == {"registry.example/vitaclip:1.2.3"}
    with pytest.raises(ValueError, match="placeholder image"):
        create.render(_rayjob(), image=None, namespace="vc")


class _FakeKube(BaseHTTPRequestHandler):
    """Just enough of the Kubernetes API for create_rayjob.py: list, create, get and delete rayjobs."""

    jobs: dict[str, dict[str, Any]] = {}
    final_status: dict[str, str] = {}
    gets: dict[str, int] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        assert self.headers["Authorization"] == "Bearer fake-token"
        path, _, query = self.path.partition("?")
        name = path.rsplit("/rayjobs", 1)[1].strip("/")
        if not name:
            return self._send(200, {"items": list(self.jobs.values())})
        if name not in self.jobs:
            return self._send(404, {})
        self.gets[name] = self.gets.get(name, 0) + 1
        if self.gets[name] >= 2:  # running at the first look, finished at the second
            self.jobs[name]["status"] = dict(self.final_status)
        return self._send(200, self.jobs[name])

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = body["metadata"]["generateName"] + f"x{len(self.jobs)}"
        body["metadata"].update(name=name, creationTimestamp=f"2026-01-01T00:00:0{len(self.jobs)}Z")
        body["status"] = {"jobDeploymentStatus": "Initializing"}
        self.jobs[name] = body
        self._send(201, body)

    def do_DELETE(self) -> None:  # noqa: N802
        self.jobs.pop(self.path.rsplit("/", 1)[1], None)
        self._send(200, {})


def test_scheduler_waits_for_the_run_and_refuses_to_overlap(tmp_path: Path) -> None:
    create = _load_script(BASE / "create_rayjob.py")
    token = tmp_path / "token"
    token.write_text("fake-token\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKube)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    argv = [
        f"--template={BASE / 'rayjob.yaml'}",
        "--image=registry.example/vitaclip:1",
        "--namespace=vc",
        f"--api-server=http://127.0.0.1:{server.server_address[1]}",
        f"--token-file={token}",
        "--wait",
        "--poll-seconds=0.01",
        "--keep-finished=1",
    ]
    try:
        _FakeKube.final_status = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
        assert create.main(argv) == 0
        _FakeKube.final_status = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}
        assert create.main(argv) == 1
        assert len(_FakeKube.jobs) == 1  # the older finished run was pruned (--keep-finished=1)
        # An unfinished run of the same template blocks the next one.
        (job,) = _FakeKube.jobs.values()
        job["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
        assert create.main(argv) == 3
        assert len(_FakeKube.jobs) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_checkpoint_copies_a_file_or_a_folder(s3_bucket: tuple[Any, str], tmp_path: Path) -> None:
    fetch = _load_script(BASE / "fetch_checkpoint.py")
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="models/b16/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="models/b16/model.safetensors", Body=b"x" * 1000)
    client.put_object(Bucket=bucket, Key="models/vita_clip_b16.pth", Body=b"y" * 10)
    assert fetch.main([f"s3://{bucket}/models/b16", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == b"x" * 1000
    assert fetch.main([f"s3://{bucket}/models/vita_clip_b16.pth", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "vita_clip_b16.pth").read_bytes() == b"y" * 10
    assert fetch.main(["", str(tmp_path / "c")]) == 0 and not (tmp_path / "c").exists()
    assert fetch.main([f"s3://{bucket}/nothing/here/", str(tmp_path / "d")]) == 1
    # Whoever writes to the prefix cannot place files outside DEST (a key with '..' landed two folders up).
    (tmp_path / "e" / "models").mkdir(parents=True)
    client.put_object(Bucket=bucket, Key="evil/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="evil/../../escaped.txt", Body=b"x")
    assert fetch.main([f"s3://{bucket}/evil/", str(tmp_path / "e" / "models" / "checkpoint")]) == 1
    assert [p.name for p in tmp_path.rglob("escaped.txt")] == []


# ----------------------------------------------------------------------------------------------------- submit


def test_submit_checks_the_job_flags_before_connecting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = f"http://127.0.0.1:{_free_port()}"
    assert submit.main(["--address", nowhere, "--", "in/", "--output", "out/", "--modle", "x"]) == 2
    assert "unrecognized arguments: --modle" in capsys.readouterr().err
    assert submit.main(["--address", nowhere, "in/", "--output", "out/"]) == 2  # no checkpoint, no --random-weights
    assert "--checkpoint" in capsys.readouterr().err
    assert (
        submit.main(
            ["--address", nowhere, "--metadata", "novalue", "--", "in", "--output", "/o", "--model", "vitaclip-demo"]
        )
        == 2
    )
    assert "--metadata wants KEY=VALUE" in capsys.readouterr().err
    # A --config that only the cluster has is accepted; the connection then fails (exit 1), nothing printed secret.
    assert submit.main(["--address", nowhere, "--no-working-dir", "--", "--config", "/cluster/only.yaml"]) == 1
    # A token path named on purpose that holds no token is an error, never a silent fallback to ~/.ray/auth_token.
    assert submit.main(["--address", nowhere, "--", "in/", "--output", "out/", "--model", "vitaclip-demo"]) == 2
    assert "--output 'out/' is a relative path: on the cluster" in capsys.readouterr().err
    job = ["--", "in/", "--output", "/data/out/", "--model", "vitaclip-tiny", "--random-weights"]
    for name, content in (("missing", None), ("empty", "\n")):
        token_path = tmp_path / name
        if content is not None:
            token_path.write_text(content)
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_path))
        assert submit.main(["--address", nowhere, "--no-working-dir", *job]) == 2
        err = capsys.readouterr().err
        assert f"RAY_AUTH_TOKEN_PATH names {str(token_path)!r}" in err and ("not a file" in err or "empty" in err), err
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    args, job = submit.split_argv(["--wait", "--metadata", "a=b", "s3://b/v/", "--output", "s3://b/o/"])
    assert (
        args.wait
        and submit.parse_metadata(args.metadata) == {"a": "b"}
        and job == ["s3://b/v/", "--output", "s3://b/o/"]
    )


def test_submit_uploads_this_checkout_and_never_site_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From a checkout, the default working_dir is the checkout. An installed vitaclip (``pip install .``, as the
    images have it) lives in site-packages: that folder (gigabytes of packages) was the default upload."""
    job = ["--", "s3://b/v/", "--output", "s3://b/o/", "--model", "vitaclip-tiny", "--random-weights"]
    args, _ = submit.split_argv(job)
    assert submit.build_runtime_env(args)["working_dir"] == str(submit.REPO_ROOT)
    site_packages = tmp_path / "site-packages"
    (site_packages / "jobs").mkdir(parents=True)
    (site_packages / "vitaclip").mkdir()
    monkeypatch.setattr(submit, "REPO_ROOT", site_packages)
    args, _ = submit.split_argv(job)
    assert "working_dir" not in submit.build_runtime_env(args)
    assert "runs here as an installed package" in capsys.readouterr().err
    args, _ = submit.split_argv(["--working-dir", str(tmp_path), *job])  # asked for: uploaded
    assert submit.build_runtime_env(args)["working_dir"] == str(tmp_path)


# ----------------------------------------------------------------------------------------------------- local stack


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The stack as `infra/local/up.sh` starts it (moto + Ray head with 2 CPUs), in its own state dir."""
    state_dir = tmp_path_factory.mktemp("stack")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHON"] = sys.executable
    up = subprocess.run(
        ["bash", str(INFRA / "local" / "up.sh"), "--state-dir", str(state_dir), "--s3-server", "moto"]
        + ["--s3-port", "0", "--ray-port", "0", "--dashboard-port", "0", "--ray-num-cpus", "2", "--num-videos", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert up.returncode == 0, (up.stdout[-3000:], up.stderr[-3000:])
        state = json.loads((state_dir / "state.json").read_text())
        state["stdout"] = up.stdout
        yield state
    finally:
        subprocess.run(
            ["bash", str(INFRA / "local" / "down.sh"), "--state-dir", str(state_dir)],
            env=env,
            capture_output=True,
            timeout=120,
        )


def test_local_stack_serves_s3_and_prints_the_commands(local_stack: dict[str, Any]) -> None:
    import boto3

    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=local_stack["s3"]["endpoint"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    listed = s3.list_objects_v2(Bucket=local_stack["bucket"], Prefix="videos/")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    assert keys == ["videos/sample-00.mp4", "videos/sample-01.mp4"] == sorted(local_stack["videos"])
    assert all(o["Size"] > 1000 for o in listed["Contents"])
    token_file = Path(local_stack["token_file"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    out = local_stack["stdout"]
    assert token_file.read_text().strip() not in out  # the token never shows
    assert f"--s3-endpoint-url {local_stack['s3']['endpoint']}" in out
    assert "AWS_ACCESS_KEY_ID=testing" in out and f"RAY_AUTH_TOKEN_PATH={token_file}" in out
    assert f"index s3://{local_stack['bucket']}/videos/" in out and "job submit --address" in out
    state_dir = token_file.parent
    status = subprocess.run(
        [sys.executable, str(INFRA / "local" / "stack.py"), "status", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stdout + status.stderr


def test_submit_wait_runs_the_job_to_success(
    local_stack: dict[str, Any], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    videos = make_videos(tmp_path / "in", 2, broken=False)
    out = tmp_path / "out"
    argv = [
        "--address",
        local_stack["ray"]["dashboard_url"],
        "--auth-token-file",
        local_stack["token_file"],
        "--metadata",
        "purpose=test",
        "--wait",
        "--",
        *job_args([str(tmp_path / "in")], out, checkpoint=tiny_checkpoint),
    ]
    assert submit.main(argv) == 0
    table = tables.read_table(out, "videos")
    assert table is not None and sorted(table.column("uri").to_pylist()) == sorted(map(str, videos))


def test_submit_wait_returns_1_when_the_job_fails(
    local_stack: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--address",
        local_stack["ray"]["dashboard_url"],
        "--auth-token-file",
        local_stack["token_file"],
        "--wait",
        "--",
        str(tmp_path / "no-such-folder"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        "vitaclip-tiny",
        "--random-weights",
    ]
    assert submit.main(argv) == 1
    assert "FAILED" in capsys.readouterr().out
    # An interpreter without vitaclip's packages (a head started outside the environment runs the system's):
    # the failure says what to pass.
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # an interpreter with no packages at all
    bare = str(tmp_path / "bare" / "bin" / "python")
    assert submit.main([*argv[:4], "--python", bare, *argv[4:]]) == 1
    assert "lacks vitaclip's packages: pass --python" in capsys.readouterr().out
    # A submission id already used is refused in one line, not with the server's traceback.
    reused = ["--submission-id", f"vitaclip-test-{uuid.uuid4().hex[:8]}"]
    assert submit.main([*argv[:4], *reused, *argv[5:]]) == 0  # without --wait: submitted
    assert submit.main([*argv[:4], *reused, *argv[5:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"python -m jobs.submit: error: {argv[1]} has a job with submission id {reused[1]} already: give another "
        "--submission-id, or none for one Ray chooses"
    ), err


def test_a_token_the_cluster_refuses_is_named_as_the_likely_cause(local_stack: dict[str, Any], tmp_path: Path) -> None:
    """Ray reports a wrong token as a cluster it cannot connect to; the job's one line says to check the token."""
    make_videos(tmp_path / "in", 1, broken=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-cluster-token")
    address = f"127.0.0.1:{local_stack['ray']['port']}"
    job = [str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "vitaclip-tiny", "--random-weights"]
    done = subprocess.run(
        [sys.executable, "-m", "jobs.index_videos", *job, "--ray-address", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "cannot connect to the Ray cluster" in last and "the token is not the cluster's" in last, last
    assert "not-the-cluster-token" not in done.stderr + done.stdout


def test_local_stack_stops_cleanly(local_stack: dict[str, Any]) -> None:
    stack = _load_script(INFRA / "local" / "stack.py")
    state_dir = Path(local_stack["token_file"]).parent
    down = subprocess.run(
        ["bash", str(INFRA / "local" / "down.sh"), "--state-dir", str(state_dir)],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stdout + down.stderr
    for pid in (local_stack["s3"]["pid"], local_stack["ray"]["pid"]):
        assert not stack._group_alive(pid), f"process group {pid} still running"
    for port in (local_stack["s3"]["port"], local_stack["ray"]["port"], local_stack["ray"]["dashboard_port"]):
        assert not stack._port_open(port), f"port {port} still open"
    assert not (state_dir / "state.json").exists() and not (state_dir / "auth_token").exists()
    assert not Path(local_stack["ray"]["temp_dir"]).exists()


def test_the_local_stack_refuses_a_port_ray_gives_its_workers(tmp_path: Path) -> None:
    """`--ray-port 16490` made `ray start` fail with a traceback after the S3 server was up: refused first."""
    done = subprocess.run(
        [sys.executable, str(INFRA / "local" / "stack.py"), "up", "--state-dir", str(tmp_path), "--ray-port", "16490"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--ray-port 16490 is in the range Ray gives its workers" in done.stderr
    assert "Traceback" not in done.stderr and not any(tmp_path.iterdir())
