"""Creates one RayJob from a template and waits for it to finish: the body of the vitaclip scheduler CronJob.

Runs in the cluster with its pod's ServiceAccount (RBAC: rayjobs create/get/list/delete in its own namespace) and
needs only the standard library and PyYAML, both in the vitaclip image. One run:

1. refuses to start while a RayJob made from the same template is unfinished (a manual run, or one left by a
   scheduler pod that was killed while waiting): two runs must never write to one output at once;
2. creates the RayJob under a generated name (``<template name>-xxxxx``), with the image given by ``--image``
   (default: the ``VITACLIP_IMAGE`` environment variable) in place of the template's placeholder ``vitaclip``;
3. with ``--wait``, polls it until it finishes and exits 0 only if the Ray job SUCCEEDED, so the CronJob's history
   shows failed runs and ``concurrencyPolicy: Forbid`` covers the whole run, not only its creation;
4. deletes finished RayJobs of the template beyond the newest ``--keep-finished``.

For a one-off run from a workstation, render the manifest instead::

    python infra/k8s/base/create_rayjob.py --template infra/k8s/base/rayjob.yaml --image IMAGE --print \\
        | kubectl create -n vitaclip -f -

Exit codes: 0 created (and, with ``--wait``, succeeded); 1 the run failed or vanished; 2 bad arguments or an API
error; 3 refused because a run of this template is still going.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

PLACEHOLDER_IMAGE = "vitaclip"
"""Image name the templates use; replaced by the real image when a RayJob is made from them."""
TEMPLATE_LABEL = "vitaclip.io/template"
"""Label on every RayJob made from a template: the template's name (used to find earlier runs)."""
FINISHED_DEPLOYMENT_STATES = frozenset({"Complete", "Failed", "ValidationFailed"})
"""``status.jobDeploymentStatus`` values after which KubeRay does nothing more with a RayJob."""
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

Outcome = Literal["running", "succeeded", "failed"]


class ApiError(RuntimeError):
    """The Kubernetes API refused a request; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


def render(template: dict[str, Any], *, image: str | None, namespace: str | None) -> dict[str, Any]:
    """The RayJob to create from ``template``: a generated name, the template label, the real image."""
    if template.get("kind") != "RayJob":
        raise ValueError(f"the template must be a RayJob, got kind {template.get('kind')!r}")
    manifest = copy.deepcopy(template)
    meta = manifest.setdefault("metadata", {})
    name = meta.pop("name", None) or str(meta.get("generateName", "")).rstrip("-")
    if not name:
        raise ValueError("the template needs metadata.name (runs are named <name>-xxxxx)")
    for key in ("generateName", "uid", "resourceVersion", "creationTimestamp", "managedFields"):
        meta.pop(key, None)
    manifest.pop("status", None)
    meta["generateName"] = f"{name}-"
    meta.setdefault("labels", {})[TEMPLATE_LABEL] = name
    if namespace:
        meta["namespace"] = namespace
    placeholders = 0
    for container in _containers(manifest):
        if container.get("image") == PLACEHOLDER_IMAGE:
            placeholders += 1
            if image:
                container["image"] = image
    if placeholders and not image:
        raise ValueError(
            f"the template uses the placeholder image {PLACEHOLDER_IMAGE!r}: give --image or VITACLIP_IMAGE"
        )
    return manifest


def _containers(node: Any) -> list[dict[str, Any]]:
    """Every container and init container anywhere under ``node`` (head, worker groups, submitter)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.extend(c for c in value if isinstance(c, dict))
            else:
                found.extend(_containers(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_containers(item))
    return found


def outcome(rayjob: dict[str, Any]) -> Outcome:
    """Where a RayJob stands, from its status: still running, succeeded, or failed."""
    status = rayjob.get("status") or {}
    if status.get("jobDeploymentStatus") not in FINISHED_DEPLOYMENT_STATES:
        return "running"
    if status.get("jobDeploymentStatus") == "Complete" and status.get("jobStatus") == "SUCCEEDED":
        return "succeeded"
    return "failed"


class KubeApi:
    """The few calls this script makes on ``rayjobs.ray.io/v1``, authenticated with a ServiceAccount token."""

    def __init__(
        self, server: str, *, token_file: Path | None, ca_file: Path | None, timeout_seconds: float = 30
    ) -> None:
        self.server = server.rstrip("/")
        self.token_file = token_file
        self.timeout_seconds = timeout_seconds
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file and ca_file.exists() else None

    @classmethod
    def in_cluster(cls) -> KubeApi:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError("not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST unset): give --api-server")
        host = f"[{host}]" if ":" in host else host
        return cls(
            f"https://{host}:{port}", token_file=SERVICE_ACCOUNT_DIR / "token", ca_file=SERVICE_ACCOUNT_DIR / "ca.crt"
        )

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """One API call; None for 404, the decoded answer otherwise."""
        headers = {"Accept": "application/json"}
        if self.token_file is not None:  # re-read every time: projected tokens are rotated
            headers["Authorization"] = "Bearer " + self.token_file.read_text().strip()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_seconds, context=self.context) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            detail = exc.read().decode(errors="replace")[:500]
            raise ApiError(f"{method} {path}: HTTP {exc.code}: {detail}", status=exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(f"{method} {path}: {exc}", status=0) from None
        return json.loads(payload) if payload else {}

    def rayjobs_path(self, namespace: str, name: str = "") -> str:
        path = f"/apis/ray.io/v1/namespaces/{urllib.parse.quote(namespace)}/rayjobs"
        return f"{path}/{urllib.parse.quote(name)}" if name else path

    def list_rayjobs(self, namespace: str, template_name: str) -> list[dict[str, Any]]:
        selector = urllib.parse.quote(f"{TEMPLATE_LABEL}={template_name}")
        answer = self.request("GET", f"{self.rayjobs_path(namespace)}?labelSelector={selector}") or {}
        return list(answer.get("items", []))

    def create_rayjob(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        created = self.request("POST", self.rayjobs_path(namespace), manifest)
        if not created:
            raise ApiError("creating the RayJob returned nothing (is the KubeRay operator installed?)", status=404)
        return created

    def get_rayjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", self.rayjobs_path(namespace, name))

    def delete_rayjob(self, namespace: str, name: str) -> None:
        self.request("DELETE", self.rayjobs_path(namespace, name), {"propagationPolicy": "Background"})


def _namespace(arg: str | None) -> str | None:
    if arg:
        return arg
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    path = SERVICE_ACCOUNT_DIR / "namespace"
    return path.read_text().strip() if path.exists() else None


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}", flush=True)


def _prune(api: KubeApi, namespace: str, template_name: str, keep: int) -> None:
    finished = [job for job in api.list_rayjobs(namespace, template_name) if outcome(job) != "running"]
    finished.sort(key=lambda job: job["metadata"].get("creationTimestamp", ""), reverse=True)
    for job in finished[keep:]:
        _log(f"deleting finished RayJob {job['metadata']['name']} ({outcome(job)})")
        api.delete_rayjob(namespace, job["metadata"]["name"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Create a RayJob from a template (the vitaclip scheduler).")
    p.add_argument("--template", required=True, help="RayJob YAML (metadata.name becomes the generated name's prefix)")
    p.add_argument("--image", default=os.environ.get("VITACLIP_IMAGE"), help="image for the placeholder 'vitaclip'")
    p.add_argument("--namespace", help="default: POD_NAMESPACE, else the ServiceAccount's namespace")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the manifest as YAML, create nothing")
    p.add_argument("--wait", action="store_true", help="wait for the run; exit 0 only if it succeeded")
    p.add_argument("--poll-seconds", type=float, default=30.0)
    p.add_argument("--keep-finished", type=int, default=5, help="finished RayJobs of this template to keep")
    p.add_argument("--api-server", help="Kubernetes API URL (default: the in-cluster service)")
    p.add_argument("--token-file", type=Path, help="bearer token file (default with --api-server: none)")
    p.add_argument("--ca-file", type=Path, help="CA bundle for the API server")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        template = yaml.safe_load(Path(args.template).read_text())
        namespace = _namespace(args.namespace)
        manifest = render(template, image=args.image, namespace=namespace)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"create_rayjob: error: {exc}", file=sys.stderr)
        return 2
    if args.print_only:
        print(yaml.safe_dump(manifest, sort_keys=False), end="")
        return 0
    if not namespace:
        print("create_rayjob: error: no namespace: give --namespace or set POD_NAMESPACE", file=sys.stderr)
        return 2
    template_name = manifest["metadata"]["labels"][TEMPLATE_LABEL]
    try:
        api = (
            KubeApi(args.api_server, token_file=args.token_file, ca_file=args.ca_file)
            if args.api_server
            else KubeApi.in_cluster()
        )
        active = [
            job["metadata"]["name"] for job in api.list_rayjobs(namespace, template_name) if outcome(job) == "running"
        ]
        if active:
            _log(f"not starting: RayJob {', '.join(active)} of {template_name} is still running (one run per output)")
            return 3
        created = api.create_rayjob(namespace, manifest)
        name = created["metadata"]["name"]
        _log(f"created RayJob {namespace}/{name}")
        if not args.wait:
            return 0
        while True:
            time.sleep(args.poll_seconds)
            job = api.get_rayjob(namespace, name)
            if job is None:
                _log(f"RayJob {name} was deleted before it finished")
                return 1
            state = outcome(job)
            if state != "running":
                status = job.get("status") or {}
                _log(
                    f"RayJob {name} finished: {state} (deployment {status.get('jobDeploymentStatus')}, "
                    f"job {status.get('jobStatus')}, reason {status.get('reason', '-')}: {status.get('message', '')})"
                )
                if args.keep_finished >= 0:
                    _prune(api, namespace, template_name, args.keep_finished)
                return 0 if state == "succeeded" else 1
    except (ApiError, ValueError, OSError) as exc:
        print(f"create_rayjob: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
