"""The Helm chart deploy/k8s/onejump, checked offline: rendered for the CPU and the GPU image from its one
values.yaml with Helm's own engine (the helm-python-sdk package), the committed renders up to date, every object
valid against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail) or, for the
Prometheus operator's ServiceMonitor and KEDA's ScaledObject, against the schemas in deploy/k8s/schemas; and
cross-checked with the server: every ONEJUMP_* variable is a setting with a valid value, every metric the
autoscalers and the dashboard name is exported, and the /ready probe that sends the API key passes on a live
server. No cluster is involved."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support.deploy import (
    ROOT,
    dashboard_exprs,
    needs_prometheus,
    query,
    referenced_metrics,
    registry_names,
    running_prometheus,
    wait_for,
)
from support.server import running_server, tiny_settings

from service.config import Settings

pytestmark = pytest.mark.k8s
K8S = ROOT / "deploy/k8s"
SCHEMAS = K8S / "schemas"
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor_v1.json",
               ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "scaledobject_v1alpha1.json"}
# the chart's kubeVersion floor (Chart.yaml: preStop sleep needs 1.30) and the newest schemas the package bundles
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
FLAVORS = ("cpu", "gpu")
# variables the pods get that are not server settings, and who reads them
OTHER_ENV = {"ONEJUMP_CACHE": "shortcuts/assets.py", "HF_HOME": None, "HF_HUB_OFFLINE": None, "HOME": None,
             "TORCHINDUCTOR_CACHE_DIR": "shortcuts/engine/runner.py", "TRITON_CACHE_DIR": None}


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


renderer = _load(K8S / "render.py", "k8s_render")


def render(**values: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(renderer.render(values)) if d]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {o["kind"]: o for o in objects}


@pytest.fixture(scope="module", params=FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def objects(flavor: str) -> dict[str, dict[str, Any]]:
    return by_kind(render(flavor=flavor))


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod_spec(workload)["containers"]
    return c


def env(workload: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(workload)["env"]}


def validate(obj: dict[str, Any]) -> None:
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        jsonschema.Draft7Validator(json.loads(crd.read_text())).validate(obj)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# ---------------------------------------------------------------- rendering and schemas

def test_committed_renders_are_current(flavor: str) -> None:
    path = renderer.rendered_path(flavor)
    assert path.read_text() == renderer.header(flavor) + renderer.render({"flavor": flavor}), \
        f"{path} is stale: run make k8s"


def test_chart_lints() -> None:
    import helm_python

    assert helm_python.lint(renderer.CHART)["errors"] == []


def test_every_object_is_valid(objects: dict[str, dict[str, Any]]) -> None:
    assert set(objects) == {"Deployment", "Service", "PersistentVolumeClaim", "Job", "ServiceMonitor", "ScaledObject",
                            "ConfigMap"}
    for obj in objects.values():
        validate(obj)
        assert obj["metadata"]["namespace"] == renderer.NAMESPACE


def test_the_hpa_variant_is_valid() -> None:
    objects = by_kind(render(flavor="gpu", autoscaling={"kind": "hpa"}))
    assert "ScaledObject" not in objects
    for obj in objects.values():
        validate(obj)
    (metric,) = objects["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"] == "onejump_num_requests_inflight"


def test_the_schemas_refuse_what_the_cluster_would() -> None:
    """The validators are not vacuous: an unknown field, a wrong type and a non-string KEDA metadata value fail."""
    objects = by_kind(render(flavor="cpu"))
    bad_deployment = json.loads(json.dumps(objects["Deployment"]))
    container(bad_deployment)["readinesProbe"] = container(bad_deployment)["readinessProbe"]
    bad_service = json.loads(json.dumps(objects["Service"]))
    bad_service["spec"]["ports"][0]["port"] = "eight thousand"
    bad_scaled = json.loads(json.dumps(objects["ScaledObject"]))
    bad_scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 2
    bad_monitor = json.loads(json.dumps(objects["ServiceMonitor"]))
    bad_monitor["spec"]["endpoints"][0]["interval"] = "5 seconds"
    for bad in (bad_deployment, bad_service, bad_scaled, bad_monitor):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


MINIMAL = {"metrics": {"podAnnotations": False, "serviceMonitor": {"enabled": False}}, "dashboard": {"enabled": False},
           "autoscaling": {"enabled": False}, "apiKey": {"existingSecret": "", "allowUnauthenticated": True},
           "model": {"fetch": {"enabled": False}, "volume": {"existingClaim": "models"}}}
EXTRAS = {"flavor": "gpu", "podAnnotations": {"team": "ml"}, "podLabels": {"team": "ml"},
          "imagePullSecrets": [{"name": "registry"}], "affinity": {"podAntiAffinity": {}},
          "model": {"volume": {"storageClassName": "nfs"}},
          "metrics": {"serviceMonitor": {"labels": {"release": "kps"}}}}


@pytest.mark.parametrize("values", [MINIMAL, EXTRAS], ids=["everything-off", "extras-on"])
def test_other_values_render_valid_objects(values: dict[str, Any]) -> None:
    objects = by_kind(render(**values))
    for obj in objects.values():
        validate(obj)
    if values is MINIMAL:
        assert set(objects) == {"Deployment", "Service"}
    else:
        assert objects["ServiceMonitor"]["metadata"]["labels"]["release"] == "kps"
        assert objects["PersistentVolumeClaim"]["spec"]["storageClassName"] == "nfs"


def test_bad_values_stop_the_render() -> None:
    import helm_python

    for values in ({"flavor": "tpu"}, {"autoscaling": {"kind": "vpa"}}):
        with pytest.raises(helm_python.HelmError, match="expected"):
            renderer.render(values)
    with pytest.raises(helm_python.HelmError, match="allowUnauthenticated"):  # no key, not allowed by name
        renderer.render({"apiKey": {"existingSecret": ""}})


# ---------------------------------------------------------------- the pods

def test_flavors_differ_in_image_gpu_and_device(objects: dict[str, dict[str, Any]], flavor: str) -> None:
    deployment = objects["Deployment"]
    c, spec = container(deployment), pod_spec(deployment)
    gpus = {k: c["resources"][k].get("nvidia.com/gpu") for k in ("requests", "limits")}
    tolerated = [t["key"] for t in spec.get("tolerations", [])]
    assert c["image"].endswith(f":{flavor}")
    assert container(objects["Job"])["image"] == c["image"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys()
    if flavor == "gpu":
        assert gpus == {"requests": 1, "limits": 1}
        assert tolerated == ["nvidia.com/gpu"]
        assert env(deployment)["ONEJUMP_DEVICE"] == "cuda"
    else:
        assert gpus == {"requests": None, "limits": None}
        assert tolerated == []
        assert env(deployment)["ONEJUMP_DEVICE"] == "cpu"


def test_pods_run_as_the_image_user_read_only_without_capabilities(objects: dict[str, dict[str, Any]]) -> None:
    (uid,) = re.findall(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    for workload in (objects["Deployment"], objects["Job"]):
        pod, sc = pod_spec(workload)["securityContext"], container(workload)["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] == sc["runAsUser"] == int(uid) == 10001
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"] for m in container(workload)["volumeMounts"]}
        assert "/tmp" in mounts  # the one writable place besides the model volume
        assert pod_spec(workload)["automountServiceAccountToken"] is False


def test_probes(objects: dict[str, dict[str, Any]]) -> None:
    c = container(objects["Deployment"])
    (port,) = c["ports"]
    assert port["name"] == "http"
    assert str(port["containerPort"]) == env(objects["Deployment"])["ONEJUMP_PORT"] == "8000"
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    for probe in ("readinessProbe", "startupProbe"):  # the API key is on: /ready needs it
        assert "/ready" in c[probe]["exec"]["command"][-1]
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model loading may take minutes


def test_without_an_api_key_the_probes_are_plain_http() -> None:
    no_key = {"existingSecret": "", "allowUnauthenticated": True}
    deployment = by_kind(render(flavor="cpu", apiKey=no_key))["Deployment"]
    c = container(deployment)
    assert "ONEJUMP_API_KEY" not in env(deployment)
    assert "ONEJUMP_API_KEY_FILE" not in env(deployment)
    assert env(deployment)["ONEJUMP_ALLOW_UNAUTHENTICATED"] == "true"  # allowed by name, never by default
    for probe in ("readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/ready", "port": "http"}
    validate(deployment)


def test_api_key_comes_from_a_secret_file(objects: dict[str, dict[str, Any]]) -> None:
    """The key is a file from the Secret (ONEJUMP_API_KEY_FILE), never an environment variable."""
    deployment = objects["Deployment"]
    variables = env(deployment)
    assert "ONEJUMP_API_KEY" not in variables
    assert "ONEJUMP_ALLOW_UNAUTHENTICATED" not in variables
    path = Path(variables["ONEJUMP_API_KEY_FILE"])
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "onejump-api-key"
    assert secret["items"] == [{"key": "api-key", "path": path.name}]
    assert secret["defaultMode"] == 0o440


def test_compile_caches_are_writable(objects: dict[str, dict[str, Any]]) -> None:
    """ONEJUMP_COMPILE=true writes inductor's and triton's caches: on a writable emptyDir, never the read-only
    model volume (ONEJUMP_CACHE=/data would put inductor's at /data/inductor) or root filesystem."""
    deployment = objects["Deployment"]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    writable = [m["mountPath"] for m in container(deployment)["volumeMounts"]
                if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HOME"):
        path = env(deployment)[name]
        assert any(path == w or path.startswith(w + "/") for w in writable), (name, path, writable)


def test_env_vars_are_server_settings_with_valid_values(objects: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    settings = {f"ONEJUMP_{name.upper()}" for name in Settings.model_fields}
    values = yaml.safe_load((renderer.CHART / "values.yaml").read_text())
    for workload in (objects["Deployment"], objects["Job"]):
        for name in env(workload):
            assert name in settings or name in OTHER_ENV, f"{name} is neither a server setting nor known"
    assert set(values["env"]) <= settings
    for name, reader in OTHER_ENV.items():
        assert reader is None or name in (ROOT / reader).read_text()
    given = {k.removeprefix("ONEJUMP_").lower(): v for k, v in env(objects["Deployment"]).items()
             if k in settings and isinstance(v, str)}
    key = tmp_path / "api-key"  # the Secret's file, as the pod would have it
    key.write_text("s3cret\n")
    given["api_key_file"] = str(key)
    parsed = Settings(**given)  # the server would start with these (bad values raise here)
    assert parsed.api_key is not None
    assert parsed.api_key.get_secret_value() == "s3cret"
    assert parsed.model_name == values["model"]["servedName"]


def test_model_volume(objects: dict[str, dict[str, Any]]) -> None:
    claim = objects["PersistentVolumeClaim"]["metadata"]["name"]
    deployment, job = objects["Deployment"], objects["Job"]
    for workload, read_only in ((deployment, True), (job, False)):
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        (mount,) = [m for m in container(workload)["volumeMounts"] if m["mountPath"] == "/data"]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
        assert mount.get("readOnly", False) is read_only
        assert env(workload)["ONEJUMP_CACHE"] == "/data"
    assert env(deployment)["ONEJUMP_MODEL"].startswith("/data/models/")
    assert container(job)["args"][:2] == ["onejump", "assets"]
    existing = by_kind(render(flavor="cpu", model={"volume": {"existingClaim": "models"}}))
    assert "PersistentVolumeClaim" not in existing
    assert pod_spec(existing["Deployment"])["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models"


# ---------------------------------------------------------------- service, monitoring, autoscaling

def test_service_and_servicemonitor_find_the_pods(objects: dict[str, dict[str, Any]]) -> None:
    deployment, service, monitor = objects["Deployment"], objects["Service"], objects["ServiceMonitor"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container(deployment)["ports"][0]["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(container(deployment)["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_autoscaler_targets_the_deployment(objects: dict[str, dict[str, Any]]) -> None:
    scaled, deployment = objects["ScaledObject"], objects["Deployment"]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]  # the CRD's CEL rule
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert referenced_metrics([trigger["metadata"]["query"]]) == {"onejump_num_requests_running",
                                                                  "onejump_num_requests_waiting"}
    # at the batch size, a replica is added exactly when requests start to wait
    assert trigger["metadata"]["threshold"] == env(deployment)["ONEJUMP_MAX_BATCH_SIZE"] == "8"
    assert f'namespace="{renderer.NAMESPACE}"' in trigger["metadata"]["query"]
    assert f'service="{objects["Service"]["metadata"]["name"]}"' in trigger["metadata"]["query"]
    fixed = by_kind(render(flavor="cpu", autoscaling={"enabled": False}, replicaCount=3))
    assert fixed["Deployment"]["spec"]["replicas"] == 3
    assert not {"ScaledObject", "HorizontalPodAutoscaler"} & fixed.keys()


def adapter_rule() -> dict[str, Any]:
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]["custom"]
    return rule


def adapter_query(matchers: str, group_by: str = "pod") -> str:
    """The rule's metricsQuery with its <<...>> filled in as prometheus-adapter fills them."""
    rule = adapter_rule()
    return (rule["metricsQuery"].replace("<<.Series>>", "onejump_num_requests_waiting")
            .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by))


def test_every_metric_named_is_exported(objects: dict[str, dict[str, Any]]) -> None:
    dashboard = json.loads(objects["ConfigMap"]["data"]["onejump.json"])
    rule = adapter_rule()
    named = {
        "ScaledObject query": referenced_metrics([objects["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]]),
        "prometheus-adapter rule": referenced_metrics([rule["seriesQuery"], rule["name"]["matches"],
                                                       rule["metricsQuery"]]),
        "dashboard ConfigMap": referenced_metrics(dashboard_exprs(dashboard)),
    }
    exported = registry_names()
    for where, names in named.items():
        assert names, where
        assert names <= exported, f"{where} names metrics service/metrics.py does not export: {names - exported}"
    # the HPA's metric is the one the adapter makes from them
    hpa = by_kind(render(autoscaling={"kind": "hpa"}))["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]


def test_dashboard_configmap_is_the_dashboard(objects: dict[str, dict[str, Any]]) -> None:
    config_map = objects["ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    grafana_json = (ROOT / "deploy/grafana/dashboards/onejump.json").read_text()
    assert (renderer.CHART / "dashboards/onejump.json").read_text() == grafana_json, "stale copy: make dashboard"
    shipped = json.loads(config_map["data"]["onejump.json"])
    expected = json.loads(grafana_json.replace('"uid": "onejump-prometheus"', '"uid": "prometheus"'))
    assert shipped == expected
    uids = {t["datasource"]["uid"] for p in shipped["panels"] for t in p["targets"]}
    assert uids == {"prometheus"}


@needs_prometheus
def test_promql_parses(tmp_path: Path) -> None:
    """promtool parses the KEDA query and the adapter's query (its <<...>> filled as the adapter does)."""
    objects = by_kind(render(flavor="cpu"))
    exprs = [objects["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"],
             adapter_query('namespace="onejump",pod=~"a|b"'), adapter_rule()["seriesQuery"]]
    rules = {"groups": [{"name": "k8s", "rules": [{"record": f"onejump:check_{i}", "expr": e}
                                                  for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_prometheus
@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_autoscaler_queries_return_data_on_prometheus(tiny_folder: Path, tmp_path: Path) -> None:
    """KEDA's query and the adapter's rule, on a real Prometheus scraping a server whose series carry the labels
    that the ServiceMonitor gives them in a cluster (namespace, service, pod)."""
    objects = by_kind(render(flavor="cpu"))
    keda = objects["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]
    labels = {"namespace": renderer.NAMESPACE, "service": objects["Service"]["metadata"]["name"],
              "pod": "onejump-7d9f-x2x4q"}
    adapter = adapter_query(f'namespace="{labels["namespace"]}",pod=~"onejump-.*"')
    with running_server(tiny_settings(tiny_folder)) as url, running_prometheus(url, tmp_path, labels) as prom:
        wait_for(lambda: bool(query(prom, keda)), 30, lambda: f"no data for {keda}: {query(prom, 'up')}")
        assert [float(r["value"][1]) for r in query(prom, keda)] == [0.0]  # idle: nothing running or waiting
        (series,) = query(prom, adapter)
        assert series["metric"] == {"pod": labels["pod"]}  # one value per pod, for the custom metrics API
        assert query(prom, adapter_rule()["seriesQuery"])


# ---------------------------------------------------------------- the probe on a live server

@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_the_ready_probe_with_the_api_key_passes_on_a_server(tiny_folder: Path) -> None:
    """The exec probe's own command line, run as kubelet would, against a server with an API key."""
    command = container(by_kind(render(flavor="cpu"))["Deployment"])["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]  # the image's python; here the test's
    with running_server(tiny_settings(tiny_folder, api_key="s3cret")) as url:
        port = url.rsplit(":", 1)[1]

        def probe(key: str) -> int:
            path = tiny_folder.parent / "api-key"
            path.write_text(key + "\n")
            probe_env = {**os.environ, "ONEJUMP_PORT": port, "ONEJUMP_API_KEY_FILE": str(path)}
            return subprocess.run([sys.executable, *command[1:]], env=probe_env, capture_output=True,
                                  timeout=30).returncode

        assert probe("s3cret") == 0
        assert probe("wrong") != 0
