"""deploy/: every Kubernetes manifest and the compose file validate offline, and agree with the code.

Kubernetes objects are checked with kubernetes-validate's bundled schemas (strict: unknown fields
fail); KEDA and Prometheus Operator objects with the abridged CRD schemas in deploy/schemas/; the
compose file with check-jsonschema's vendored compose-spec schema. The overlays are rendered by a
small kustomize subset here (so no binary is needed), checked against `kubectl kustomize` where
kubectl exists.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.32"  # the oldest Kubernetes minor still supported upstream when this was written
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}
# Variables in the manifests that are not genq's own.
FOREIGN_ENV = {"REDIS_PASSWORD", "VLLM_CPU_KVCACHE_SPACE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


# -- a kustomize subset: resources, labels, configMapGenerator, images, JSON 6902 patches --------
def _apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if op["op"] == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        elif op["op"] in ("add", "replace"):
            node[last] = op["value"]
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")


def render(folder: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "labels", "configMapGenerator", "images", "patches"}
    assert set(k) <= known, f"{folder}: kustomize features this renderer lacks: {set(k) - known}"
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = folder / res
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        assert gen["options"]["disableNameSuffixHash"] is True
        data = {}
        for f in gen["files"]:
            key, _, name = f.rpartition("=")
            data[key or name] = (folder / name).read_text()
        meta = {"name": gen["name"], "labels": dict(gen["options"].get("labels", {}))}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for lab in k.get("labels", []):
        assert not lab.get("includeSelectors") and not lab.get("includeTemplates")
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(lab["pairs"])
    for img in k.get("images", []):
        for c in containers(docs):
            if c["image"].split(":")[0] == img["name"]:
                c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    for patch in k.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, patch
        _apply_json_patch(hits[0], ops)
    return docs


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for d in docs if "template" in d.get("spec", {}) for c in d["spec"]["template"]["spec"]["containers"]]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (hit,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return hit


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


def _key(d: dict[str, Any]) -> tuple[str, str]:
    return d["kind"], d["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_the_renderer_agrees_with_kubectl_kustomize(rendered) -> None:
    overlay, docs = rendered
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=_key)
    assert json.dumps(sorted(docs, key=_key), sort_keys=True) == json.dumps(theirs, sort_keys=True)


# -- schemas -------------------------------------------------------------------------------------
def validate(doc: dict[str, Any]) -> None:
    schema_file = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_file is None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    else:
        schema = json.loads((DEPLOY / "schemas" / schema_file).read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)


def test_every_manifest_validates(rendered) -> None:
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    need = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "StatefulSet", "ConfigMap"}
    assert need | {"ScaledObject", "ServiceMonitor", "PrometheusRule"} <= kinds
    for d in docs:
        validate(d)
    assert len({_key(d) for d in docs}) == len(docs), "two objects with one kind and name"


def test_the_secret_example_validates() -> None:
    (doc,) = yaml.safe_load_all((K8S / "secret.example.yaml").read_text())
    validate(doc)
    used = {
        ref["key"]
        for overlay in OVERLAYS
        for c in containers(render(K8S / "overlays" / overlay))
        for e in c.get("env", [])
        if (ref := e.get("valueFrom", {}).get("secretKeyRef")) and ref["name"] == "genq"
    }
    assert used == set(doc["stringData"])


def test_a_typo_fails_the_crd_schema() -> None:
    docs = render(K8S / "overlays" / "cpu")
    so = copy.deepcopy(find(docs, "ScaledObject", "genq-worker"))
    so["spec"]["minReplicas"] = 0  # the HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        validate(so)
    so = copy.deepcopy(find(docs, "ScaledObject", "genq-worker"))
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 5  # KEDA reads strings only
    with pytest.raises(jsonschema.ValidationError):
        validate(so)


def test_compose_validates_against_the_compose_spec() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert all("healthcheck" in s for s in services.values())
    assert services["worker-cpu"]["profiles"] == ["cpu"] and services["worker-gpu"]["profiles"] == ["gpu"]
    for name in ("worker-cpu", "worker-gpu"):
        env = services[name]["environment"]
        assert json.loads(env["GENQ_MODELS"]) == [env["GENQ_WORKER_SERVED_MODEL_NAME"]]
        assert _seconds(services[name]["stop_grace_period"]) > float(env["GENQ_WORKER_DRAIN_GRACE_S"]) + 10
    _check_env_names({k for s in services.values() for k in s.get("environment", {})})
    # The batcher: the API's image, the same Redis, and the API's files on one shared volume.
    api, batcher = services["api"], services["batcher"]
    assert batcher["image"] == api["image"] and batcher["build"] == api["build"]
    assert batcher["command"] == ["genq", "batcher"] and "profiles" not in batcher
    assert batcher["healthcheck"] == {"disable": True}  # no HTTP; the image's /readyz check is the API's
    folder = api["environment"]["GENQ_FILES_URL"]
    assert batcher["environment"]["GENQ_FILES_URL"] == folder and folder.startswith("/")
    for env in ("GENQ_REDIS_URL", "GENQ_QUEUE"):
        assert batcher["environment"].get(env) == api["environment"].get(env)
    mounts = [{v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == folder} for svc in (api, batcher)]
    assert mounts[0] == mounts[1] and len(mounts[0]) == 1 and mounts[0] <= set(compose["volumes"])


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)s", text)
    assert m, text
    return float(m.group(1))


# -- cross-checks with the code --------------------------------------------------------------------
def _check_env_names(names: set[str]) -> None:
    from genq.config import all_variables

    real = {v.name for v in all_variables()}
    unknown = {n for n in names if n.startswith("GENQ_") and n not in real} | {
        n for n in names if not n.startswith("GENQ_") and n not in FOREIGN_ENV
    }
    assert not unknown, f"not genq variables: {sorted(unknown)}"


def _env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for src in container.get("envFrom", []):
        out.update(find(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for e in container.get("env", []):
        out[e["name"]] = e.get("value")
    return out


def test_env_vars_are_real_and_the_worker_serves_a_model_the_api_admits(rendered) -> None:
    overlay, docs = rendered
    names = set(find(docs, "ConfigMap", "genq-config")["data"])
    for c in containers(docs):
        names |= {e["name"] for e in c.get("env", [])}
    _check_env_names(names)
    api = _env(docs, find(docs, "Deployment", "genq-api")["spec"]["template"]["spec"]["containers"][0])
    worker_spec = find(docs, "Deployment", "genq-worker")["spec"]["template"]["spec"]
    worker = _env(docs, worker_spec["containers"][0])
    served = worker["GENQ_WORKER_SERVED_MODEL_NAME"]
    assert served in json.loads(api["GENQ_MODELS"] or "[]")
    # the KEDA queries and the worker's queue are the same model
    for trig in find(docs, "ScaledObject", "genq-worker")["spec"]["triggers"]:
        assert f'model="{served}"' in trig["metadata"]["query"]
    # a model path must be on a mounted volume (the old layout named an unmounted /models/served)
    if model := worker.get("GENQ_WORKER_MODEL"):
        mounts = [m["mountPath"] for m in worker_spec["containers"][0].get("volumeMounts", [])]
        assert any(model.startswith(p.rstrip("/") + "/") for p in mounts), (model, mounts)
    if overlay == "gpu":
        assert worker_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert "GENQ_WORKER_MODEL" in worker
    shm = [v for v in worker_spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert shm and {"name": shm[0]["name"], "mountPath": "/dev/shm"} in worker_spec["containers"][0]["volumeMounts"]


def test_the_batcher_runs_the_api_image_with_the_apis_redis_and_files(rendered) -> None:
    _, docs = rendered
    api_spec = find(docs, "Deployment", "genq-api")["spec"]["template"]["spec"]
    deploy = find(docs, "Deployment", "genq-batcher")
    spec = deploy["spec"]["template"]["spec"]
    (api,), (batcher,) = api_spec["containers"], spec["containers"]
    assert batcher["image"] == api["image"] and batcher["args"] == ["genq", "batcher"]
    assert spec["securityContext"] == api_spec["securityContext"]
    assert batcher["resources"]["requests"] and batcher["resources"]["limits"]["memory"]
    # It serves no HTTP: no probe could check it (arq's health-check key is written hourly).
    assert not {"readinessProbe", "livenessProbe", "startupProbe", "ports"} & set(batcher)

    def source(c: dict[str, Any], name: str) -> Any:
        (e,) = [e for e in c["env"] if e["name"] == name]
        return e.get("valueFrom", e.get("value"))

    # the same Redis, queue namespace and file store as the API (the API writes the files it reads)
    assert batcher["envFrom"] == api["envFrom"]
    for name in ("GENQ_REDIS_URL", "GENQ_FILES_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert source(batcher, name) == source(api, name), name
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    pdb = find(docs, "PodDisruptionBudget", "genq-batcher")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < deploy["spec"]["replicas"]  # a node drain never blocks for good


def test_the_api_image_holds_every_package_the_api_and_the_batcher_import() -> None:
    # a fresh interpreter: this process has imported whatever earlier tests needed (benchmarks, ...)
    probe = (
        "import sys, api.app, batcher.worker, genq.cli; print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    ours = {name for name in loaded.stdout.split() if (ROOT / name).is_dir()}
    ours &= {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    copied = set(re.findall(r"^COPY (\w+) \1$", (DEPLOY / "Dockerfile.api").read_text(), re.M))
    assert {"api", "batcher", "broker", "genq"} <= ours
    assert ours - {"tests"} <= copied, ours - copied


def test_grace_period_covers_the_worker_drain(rendered) -> None:
    from worker.loop import HANDBACK_TIMEOUT_S
    from worker.settings import WorkerSettings

    _, docs = rendered
    spec = find(docs, "Deployment", "genq-worker")["spec"]["template"]["spec"]
    env = _env(docs, spec["containers"][0])
    drain_s = float(env.get("GENQ_WORKER_DRAIN_GRACE_S") or WorkerSettings.model_fields["drain_grace_s"].default)
    assert spec["terminationGracePeriodSeconds"] > drain_s + HANDBACK_TIMEOUT_S


def test_probes_point_at_real_routes(rendered) -> None:
    from api.app import create_app

    _, docs = rendered
    routes = {getattr(r, "path", None) for r in create_app().routes}
    api = find(docs, "Deployment", "genq-api")["spec"]["template"]["spec"]["containers"][0]
    assert (
        api["readinessProbe"]["httpGet"]["path"] == "/readyz" and api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports["http"] == int(_env(docs, api)["GENQ_PORT"] or 0)
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] in routes
    worker = find(docs, "Deployment", "genq-worker")["spec"]["template"]["spec"]["containers"][0]
    wports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert wports["metrics"] == int(_env(docs, worker)["GENQ_WORKER_METRICS_PORT"] or 0)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_redis_runs_the_repository_redis_conf(rendered) -> None:
    _, docs = rendered
    assert find(docs, "ConfigMap", "genq-redis")["data"]["redis.conf"] == (DEPLOY / "redis.conf").read_text()
    sts = find(docs, "StatefulSet", "genq-redis")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def _metric_names() -> set[str]:
    from api.metrics import ApiMetrics
    from worker.metrics import WorkerMetrics

    names: set[str] = set()
    for registry in (ApiMetrics().registry, WorkerMetrics("m", "w").registry):
        for fam in registry.collect():
            names |= {fam.name, *(fam.name + s for s in ("_total", "_bucket", "_count", "_sum"))}
    return names


def test_alerts_dashboard_and_scaling_use_metrics_genq_exports(rendered) -> None:
    _, docs = rendered
    exprs = [r["expr"] for g in find(docs, "PrometheusRule", "genq")["spec"]["groups"] for r in g["rules"]]
    alerts = {r.get("alert") for g in find(docs, "PrometheusRule", "genq")["spec"]["groups"] for r in g["rules"]}
    assert {"GenqQueueTooOld", "GenqNoWorkerWithBacklog", "GenqJobErrorRate"} <= alerts
    so = find(docs, "ScaledObject", "genq-worker")["spec"]
    assert so["minReplicaCount"] == 0 and so["maxReplicaCount"] >= 1  # to zero, and back on backlog
    assert all(t["type"] == "prometheus" for t in so["triggers"])
    exprs += [t["metadata"]["query"] for t in so["triggers"]]
    dashboard = json.loads(find(docs, "ConfigMap", "genq-grafana-dashboard")["data"]["genq.json"])
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:genq|process)_[a-z_]+)\b", e)}
    assert used - _metric_names() == set()


def test_dockerfiles() -> None:
    for name in ("Dockerfile.api", "Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / name).read_text()
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert froms and all(":" in f and not f.endswith(":latest") for f in froms), (name, froms)
        assert re.search(r"^USER 10001", text, re.M), f"{name} runs as root"
        assert "HEALTHCHECK" in text, name
    api_runs = [ln for ln in (DEPLOY / "Dockerfile.api").read_text().splitlines() if ln.startswith("RUN")]
    assert api_runs and not [ln for ln in api_runs if re.search(r"vllm|torch|\[(cpu|gpu)\]", ln)]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in (DEPLOY / "Dockerfile.cpu").read_text()
    assert (ROOT / ".dockerignore").is_file()
