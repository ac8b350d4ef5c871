"""The Helm chart (helm/textnorm-reward), offline: lint and render through helm-python-sdk (Helm's
own Go SDK, no helm binary, no cluster; in a child process, tests/helm_sdk.py), every manifest
against Kubernetes' JSON schemas (kubernetes-validate, strict), and the chart's contract with the
product: the gateway's env vars are real `REWARD_*` settings, its probe paths answer on a real
gateway app, Triton's probes, Services and GPU set-up are the ones the deployment needs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from service.gateway import check_bind, create_app
from service.gateway.onnx_backend import OnnxBackend
from service.gateway.provenance import load_provenance
from service.settings import SHIPPED_MODEL_DIR, Settings
from tests import helm_sdk as helm
from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "helm" / "textnorm-reward"
RELEASE, NAMESPACE = "reward", "ml"
FULLNAME = f"{RELEASE}-textnorm-reward"
# A current Kubernetes release that kubernetes-validate ships strict schemas for (it carries
# 1.25 … 1.37); the chart's own kubeVersion floor is 1.26.
KUBE_VERSION = "1.33.0"
API_KEY = "test-key"
# Kinds kubernetes-validate has no schema for: CRDs. ServiceMonitor (prometheus-operator) is the
# only one the chart renders; it is checked structurally in test_service_monitor instead.
CRD_KINDS = {"ServiceMonitor"}
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"

# Every optional feature switched on at once (export Job, prompt sets, HPAs, Prometheus).
FULL: dict[str, Any] = {
    "extraApiVersions": [SERVICE_MONITOR_API],
    "model": {"source": "exportJob", "exportJob": {"extraArgs": ["--no-head"]}},
    "gateway": {
        "promptSets": {"inline": {"a red circle": ["a blue circle", "two red circles"]}},
        "autoscaling": {"enabled": True},
    },
    "triton": {"autoscaling": {"enabled": True}},
    "networkPolicy": {"prometheus": {"enabled": True}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
}
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": helm.values_from_yaml((CHART / "values-gpu.yaml").read_text()),
    "minimal": helm.values_from_yaml((CHART / "values-minimal.yaml").read_text()),
    "full": FULL,
    "pvc": {"model": {"source": "pvc", "pvc": {"claimName": "models"}}},
    "gpu-export": {"model": {"source": "exportJob"}, "triton": {"gpu": {"enabled": True}}},
}


# -- helpers ---------------------------------------------------------------------------------------
def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of values layers, later ones win (what `-f a.yaml -f b.yaml` does)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def with_key(*layers: dict[str, Any]) -> dict[str, Any]:
    """Values with a gateway API key (required) under the given layers."""
    return merged({"gateway": {"apiKeys": [API_KEY]}}, *layers)


def set_path(dotted: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b"."""
    out: Any = value
    for key in reversed(dotted.split(".")):
        out = {key: out}
    return out


def render(values: dict[str, Any]) -> dict[str, str]:
    """`helm template` of the chart: {template path: rendered text}."""
    return helm.render(CHART, values, name=RELEASE, namespace=NAMESPACE)


def manifests(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object (NOTES.txt and empty documents left out)."""
    docs = []
    for path, text in render(values).items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def notes(values: dict[str, Any]) -> str:
    return render(values)[f"{CHART.name}/templates/NOTES.txt"]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (named `name`, if given)."""
    hits = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"{len(hits)} {kind} {name or ''} in {[d['kind'] for d in docs]}"
    return hits[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container(deployment: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    pod = deployment["spec"]["template"]["spec"]
    found = [
        c for c in pod.get("initContainers" if init else "containers", []) if c["name"] == name
    ]
    assert found, f"no {'init' if init else ''}container {name!r}"
    return found[0]


def gateway_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The gateway container's environment: envFrom ConfigMaps, then env (Secret refs decoded)."""
    dep = find(docs, "Deployment", f"{FULLNAME}-gateway")
    gateway = container(dep, "gateway")
    env: dict[str, str] = {}
    for source in gateway.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in gateway.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            secret = find(docs, "Secret", ref["name"])
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def setting_env_names() -> set[str]:
    """REWARD_<FIELD> for every field of the gateway's settings object."""
    prefix = Settings.model_config["env_prefix"]
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def lint_errors(values: dict[str, Any]) -> list[str]:
    """Findings of `helm lint --strict` at warning level or above."""
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    return report["errors"] + [m["error"] for m in report["messages"] if m["severity"] >= 2]


@pytest.fixture(scope="module", autouse=True)
def _helm_child() -> Iterator[None]:
    """The helm-python child process (tests/helm_sdk.py) is stopped when these tests end."""
    yield
    helm.close()


def test_the_go_library_stays_out_of_the_test_process() -> None:
    """Rendering works, yet this process has not imported helm-python (the child has)."""
    assert find(manifests(with_key()), "Deployment", f"{FULLNAME}-gateway")
    assert "helm_python" not in sys.modules


# -- lint and render -------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["default", "gpu", "minimal"])
def test_lint_passes(profile: str) -> None:
    assert lint_errors(with_key(PROFILES[profile])) == []


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_manifest_validates_strictly(profile: str) -> None:
    docs = manifests(with_key(PROFILES[profile]))
    assert {"Deployment", "Service", "ConfigMap"} <= set(kinds(docs))
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)  # raises on any error


def test_strict_validation_catches_unknown_fields() -> None:
    """The validator is a real check: a typo in a rendered Deployment fails it."""
    dep = find(manifests(with_key()), "Deployment", f"{FULLNAME}-gateway")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSION, strict=True)


def test_full_profile_renders_every_optional_object() -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in manifests(with_key(FULL))}
    for kind, suffix in [
        ("Job", None),
        ("PersistentVolumeClaim", "models"),
        ("ConfigMap", "prompt-sets"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("HorizontalPodAutoscaler", "triton"),
        ("PodDisruptionBudget", "gateway"),
        ("PodDisruptionBudget", "triton"),
        ("NetworkPolicy", "triton"),
        ("ServiceMonitor", "gateway"),
        ("ServiceMonitor", "triton"),
    ]:
        assert any(k == kind and (suffix is None or n.endswith(suffix)) for k, n in names), kind


# -- values.schema.json ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("gateway.replicas", "two"),
        ("gateway.replicas", -1),
        ("triton.gpu.count", -1),
        ("triton.gpu.count", "1"),
        ("triton.gpu.enabled", "yes"),
        ("model.source", "s3"),
        ("gateway.apiKeys", "key1"),
        ("gateway.settings.max_items_per_request", "many"),
        ("gateway.settings.max_contrastive_prompts", 33),
        ("gateway.settings.triton_url", "set-by-the-chart"),  # chart-managed, not a knob
        ("gateway.settings.max_itmes_per_request", 8),  # a typo is not silently ignored
        # export-time: the gateway serves provenance.json's c and λ and ignored these
        ("gateway.settings.textnorm_scale", 10.0),
        ("gateway.settings.ensemble_lambda", 0.25),
        ("triton.autoscaling.minReplicas", 0.5),
        ("replicaCount", 2),  # unknown top-level key
    ],
)
def test_schema_rejects_wrong_values(path: str, value: Any) -> None:
    values = with_key(set_path(path, value))
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert path.rsplit(".", 1)[-1] in str(err.value)
    assert lint_errors(values), "helm lint accepted it"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("gateway.replicas", 3),
        ("triton.gpu.count", 2),
        ("gateway.settings.max_items_per_request", 8),
        # the README's security and admission settings (refused by the schema before)
        ("gateway.settings.rate_limit_per_key_rps", 5.0),
        ("gateway.settings.expose_docs", False),
        ("gateway.settings.max_requests_in_flight", 16),
    ],
)
def test_schema_accepts_right_values(path: str, value: Any) -> None:
    render(with_key(set_path(path, value)))


# -- the gateway -----------------------------------------------------------------------------------
def test_rendering_without_an_api_key_fails_naming_the_values() -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        render({})
    assert "gateway.apiKeys" in str(err.value)
    assert "gateway.existingSecret" in str(err.value)
    with pytest.raises(helm.HelmRenderError, match="gateway.apiKeys"):
        render({"gateway": {"apiKeys": []}})


def test_existing_secret_replaces_the_chart_secret() -> None:
    docs = manifests({"gateway": {"existingSecret": "keys", "existingSecretKey": "k"}})
    assert "Secret" not in kinds(docs)
    gateway = container(find(docs, "Deployment", f"{FULLNAME}-gateway"), "gateway")
    ref = {v["name"]: v for v in gateway["env"]}["REWARD_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "keys", "key": "k"}


def test_api_keys_secret_is_the_json_list_the_gateway_reads() -> None:
    env = gateway_env(manifests(with_key({"gateway": {"apiKeys": [API_KEY, "other"]}})))
    assert json.loads(env["REWARD_API_KEYS"]) == [API_KEY, "other"]


EVERY_SETTING: dict[str, Any] = {
    "identity_check_interval_s": 2.5,
    "max_items_per_request": 32,
    "max_image_bytes": 8 * 1024 * 1024,  # float64 inside Helm: must not render as 8.388608e+06
    "max_image_pixels": 4096 * 4096,
    "max_image_aspect_ratio": 10.0,
    "max_request_pixels": 64 * 1024 * 1024,
    "max_request_bytes": 128 * 1024 * 1024,
    "max_prompt_chars": 1000,
    "max_contrastive_prompts": 16,
    "truncate_long_prompts": True,
    "backend_timeout_s": 12.5,
    "keep_alive_s": 90,
    "body_read_timeout_s": 45.5,
    "body_total_timeout_s": 90.0,
    "retry_after_s": 3,
    "embedding_cache_entries": 1000,
    "max_prompt_sets": 50,
    "text_token_bucket": 8,
    "access_log": True,
    "max_requests_in_flight": 32,
    "max_body_bytes_in_flight": 512 * 1024 * 1024,
    "max_images_in_flight": 512,
    "max_decoded_bytes_in_flight": 256 * 1024 * 1024,
    "max_backend_calls": 32,
    "merged_calls_in_flight": 2,
    "max_backend_calls_per_request": 8,
    "overload_retry_after_s": 2,
    "decode_threads": 2,
    "idempotency_cache_entries": 256,
    "rate_limit_per_key_rps": 2.5,
    "rate_limit_burst": 5,
    "expose_metrics": False,
    "expose_docs": False,
    "triton_channel_max_age_s": 30.0,
}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_gateway_env_names_are_real_settings(profile: str) -> None:
    values = with_key(PROFILES[profile], {"gateway": {"settings": EVERY_SETTING}})
    env = gateway_env(manifests(values))
    unknown = set(env) - setting_env_names()
    assert not unknown, f"the chart sets env vars that are not REWARD_* settings: {unknown}"
    assert {"REWARD_HOST", "REWARD_PORT", "REWARD_TRITON_URL", "REWARD_REPOSITORY"} <= set(env)


def test_schema_settings_are_real_settings() -> None:
    schema = helm.schema(CHART)
    assert schema is not None
    knobs = schema["properties"]["gateway"]["properties"]["settings"]["properties"]
    assert set(knobs) == set(EVERY_SETTING)
    assert {f"REWARD_{k.upper()}" for k in knobs} <= setting_env_names()


def test_schema_bounds_are_the_settings_bounds() -> None:
    """A value the chart accepts but the gateway's Settings refuses crash-loops the pod (a
    max_items_per_request of 5000 past the gateway's 4096): every bound of a knob in
    service/settings.py is in the schema, as the same JSON Schema keyword."""
    import annotated_types

    from service.settings import Settings

    schema = helm.schema(CHART)
    knobs = schema["properties"]["gateway"]["properties"]["settings"]["properties"]
    keyword = {
        annotated_types.Ge: ("minimum", "ge"),
        annotated_types.Gt: ("exclusiveMinimum", "gt"),
        annotated_types.Le: ("maximum", "le"),
        annotated_types.Lt: ("exclusiveMaximum", "lt"),
    }
    checked = 0
    for name, knob in knobs.items():
        for bound in Settings.model_fields[name].metadata:
            if type(bound) in keyword:
                key, attr = keyword[type(bound)]
                assert knob.get(key) == getattr(bound, attr), (name, key, knob)
                checked += 1
    assert checked >= len(knobs) - 2  # nearly every knob has a bound


def test_gateway_settings_parse_from_the_rendered_env(clean_reward_env: pytest.MonkeyPatch) -> None:
    """The settings object reads the chart's env to the values given (types and formatting)."""
    env = gateway_env(manifests(with_key({"gateway": {"settings": EVERY_SETTING}})))
    for name, value in env.items():
        clean_reward_env.setenv(name, value)
    settings = Settings()
    for name, value in EVERY_SETTING.items():
        assert getattr(settings, name) == value, name
    assert [key.get_secret_value() for key in settings.api_keys] == [API_KEY]
    assert settings.host == "0.0.0.0" and settings.port == 8000
    check_bind(settings.host, settings)  # a non-loopback bind is allowed: there is a key


def test_gateway_security_context_and_ports() -> None:
    docs = manifests(with_key())
    dep = find(docs, "Deployment", f"{FULLNAME}-gateway")
    pod = dep["spec"]["template"]["spec"]
    gateway = container(dep, "gateway")
    sc = gateway["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert gateway["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert gateway_env(docs)["REWARD_PORT"] == "8000"
    assert dep["spec"]["replicas"] == 2
    svc = find(docs, "Service", f"{FULLNAME}-gateway")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_gateway_gets_provenance_and_tokenizer() -> None:
    # image: an initContainer copies the two files out of the triton image into an emptyDir
    docs = manifests(with_key())
    dep = find(docs, "Deployment", f"{FULLNAME}-gateway")
    env = gateway_env(docs)
    copy = container(dep, "copy-provenance", init=True)
    assert copy["image"] == "textnorm-reward/triton:0.2.0"
    assert copy["command"][1:3] == [
        "/models/shapes-clip/provenance.json",
        "/models/shapes-clip/tokenizer.json",
    ]
    mounts = {m["name"]: m["mountPath"] for m in container(dep, "gateway")["volumeMounts"]}
    assert mounts["repository"] == env["REWARD_REPOSITORY"] == copy["command"][-1].rstrip("/")
    assert env["REWARD_TOKENIZER_FILE"] == f"{env['REWARD_REPOSITORY']}/tokenizer.json"
    # pvc: the claim, read-only, at /models
    docs = manifests(with_key(PROFILES["pvc"]))
    dep = find(docs, "Deployment", f"{FULLNAME}-gateway")
    assert "initContainers" not in dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert gateway_env(docs)["REWARD_REPOSITORY"] == "/models/shapes-clip"


def test_pvc_source_requires_a_claim() -> None:
    with pytest.raises(helm.HelmRenderError, match="model.pvc.claimName"):
        render(with_key({"model": {"source": "pvc"}}))


def test_prompt_sets_are_mounted_where_the_setting_points() -> None:
    inline = FULL["gateway"]["promptSets"]["inline"]
    docs = manifests(with_key({"gateway": {"promptSets": {"inline": inline}}}))
    env = gateway_env(docs)
    path = Path(env["REWARD_PROMPT_SETS_FILE"])
    dep = find(docs, "Deployment", f"{FULLNAME}-gateway")
    mount = {m["name"]: m for m in container(dep, "gateway")["volumeMounts"]}["prompt-sets"]
    volume = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}["prompt-sets"]
    assert Path(mount["mountPath"]) == path.parent and mount["readOnly"]
    assert volume["configMap"]["items"] == [{"key": path.name, "path": path.name}]
    cm = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert json.loads(cm["data"][path.name]) == inline
    # the file's own text (--set-file gateway.promptSets.json=sets.json) passes through verbatim
    text = json.dumps(inline, indent=2)
    docs = manifests(with_key({"gateway": {"promptSets": {"json": text}}}))
    assert find(docs, "ConfigMap", f"{FULLNAME}-prompt-sets")["data"][path.name] == text
    # none configured: no setting, no ConfigMap
    docs = manifests(with_key())
    assert "REWARD_PROMPT_SETS_FILE" not in gateway_env(docs)
    assert not [d for d in docs if d["metadata"]["name"].endswith("prompt-sets")]


# -- the gateway's probes against a real gateway app (slow: exports a repository) ----------------
@pytest.fixture(scope="module")
def exported_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped CLIP exported once (CPU flavour, no head), as tests/test_gateway.py does."""
    assert (SHIPPED_MODEL_DIR / "model.safetensors").is_file(), "the shipped model is missing"
    out = tmp_path_factory.mktemp("helm") / "repo"
    cmd = [sys.executable, "-m", "service.cli", "export", "--model", str(SHIPPED_MODEL_DIR)]
    cmd += ["--no-head", "--out", str(out), "--max-batch", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture
def chart_gateway(
    exported_repo: Path, tmp_path: Path, clean_reward_env: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The gateway app with the chart's rendered settings; its repository directory holds only
    the two files the chart's initContainer copies (paths made local to this machine)."""
    docs = manifests(with_key())
    repository = tmp_path / "repository"
    repository.mkdir()
    for name in ("provenance.json", "tokenizer.json"):
        shutil.copy(exported_repo / name, repository / name)
    env = gateway_env(docs)
    env["REWARD_REPOSITORY"] = str(repository)
    env["REWARD_TOKENIZER_FILE"] = str(repository / "tokenizer.json")
    for name, value in env.items():
        clean_reward_env.setenv(name, value)
    settings = Settings()
    app = create_app(
        settings, OnnxBackend(exported_repo, intra_op_threads=1), load_provenance(repository)
    )
    with TestClient(app) as client:
        yield client


@pytest.mark.slow
def test_gateway_probe_paths_are_served(chart_gateway: TestClient) -> None:
    dep = find(manifests(with_key()), "Deployment", f"{FULLNAME}-gateway")
    gateway = container(dep, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    probes = {kind: gateway[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert ports[probe["port"]] == 8000
        # kubelet sends no Authorization header: the probe paths must not need the API key
        response = chart_gateway.get(probe["path"])
        assert response.status_code == 200, (probe["path"], response.text)
    # the ServiceMonitor scrapes /metrics on the same port
    assert chart_gateway.get("/metrics").status_code == 200
    # while /v1 needs the key the chart put in the Secret
    assert chart_gateway.get("/v1/models").status_code == 401
    authorized = chart_gateway.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert authorized.status_code == 200


# -- Triton ----------------------------------------------------------------------------------------
def _copied_into_triton_image(source: str) -> str:
    """Where the Dockerfile's triton stage COPYs `source` from the build context."""
    lines = (REPO_ROOT / "Dockerfile").read_text().split("AS triton\n", 1)[1].split("\nFROM ")[0]
    for line in lines.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and source in parts:
            return parts[-1]
    raise AssertionError(f"the triton stage does not copy {source}")


def test_triton_liveness_runs_the_stub_probe_the_image_ships() -> None:
    triton = container(find(manifests(with_key()), "Deployment", f"{FULLNAME}-triton"), "triton")
    probe = triton["livenessProbe"]
    command = probe["exec"]["command"]
    assert command[:2] == ["python3", _copied_into_triton_image("deploy/triton_liveness.py")]
    assert "--url=http://127.0.0.1:8000" in command  # the container's own http port
    # the script's budget for all its calls, under the kubelet's limit on the whole probe
    assert f"--timeout={probe['timeoutSeconds'] - 1}" in command
    assert (REPO_ROOT / "deploy/triton_liveness.py").is_file()

    values = with_key(set_path("triton.livenessChecksStubs", False))
    plain = container(find(manifests(values), "Deployment", f"{FULLNAME}-triton"), "triton")
    assert plain["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert "exec" not in plain["livenessProbe"]
    assert plain["livenessProbe"]["periodSeconds"] == probe["periodSeconds"]


def test_triton_command_probes_and_services() -> None:
    docs = manifests(with_key())
    dep = find(docs, "Deployment", f"{FULLNAME}-triton")
    triton = container(dep, "triton")
    args = triton["args"]
    assert args[0] == "tritonserver"
    assert args[1:] == [
        "--model-repository=/models/shapes-clip",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--model-control-mode=none",
    ]
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for kind, path in [
        ("startupProbe", "/v2/health/ready"),
        ("readinessProbe", "/v2/health/ready"),
    ]:
        assert triton[kind]["httpGet"] == {"path": path, "port": "http"}, kind
    assert "httpGet" not in triton["livenessProbe"]  # the stub-checking exec probe, below
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # generous
    assert not [e for e in triton.get("env", []) if e["name"].startswith("REWARD_")]
    assert "nvidia.com/gpu" not in triton["resources"].get("limits", {})
    assert "initContainers" not in dep["spec"]["template"]["spec"]  # CPU flavour, as is

    cluster_ip = find(docs, "Service", f"{FULLNAME}-triton")
    assert "clusterIP" not in cluster_ip["spec"] and cluster_ip["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in cluster_ip["spec"]["ports"]} == ports
    headless = find(docs, "Service", f"{FULLNAME}-triton-grpc")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"] == [
        {"name": "grpc", "port": 8001, "targetPort": "grpc", "protocol": "TCP"}
    ]
    for svc in (cluster_ip, headless):
        assert (
            svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
    assert gateway_env(docs)["REWARD_TRITON_URL"] == (
        f"dns:///{FULLNAME}-triton-grpc.{NAMESPACE}.svc.cluster.local:8001"
    )


def test_gpu_values_build_engines_on_the_node() -> None:
    docs = manifests(with_key(PROFILES["gpu"]))
    dep = find(docs, "Deployment", f"{FULLNAME}-triton")
    pod = dep["spec"]["template"]["spec"]
    triton = container(dep, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--model-repository=/repository" in triton["args"]
    assert [c["name"] for c in pod["initContainers"]] == ["copy-repository", "build-engines"]
    copy = container(dep, "copy-repository", init=True)
    assert "/models/shapes-clip-gpu/." in copy["command"][-1]
    build = container(dep, "build-engines", init=True)
    assert build["image"] == "textnorm-reward/export:0.2.0-gpu"  # the export-gpu target
    # a pinned CPU export tag gave build-engines the CPU image (no TensorRT)
    for export, image in (({"tag": "1.2.3"}, "1.2.3-gpu"), ({"gpuTag": "trt10"}, "trt10")):
        pinned = manifests(with_key(PROFILES["gpu"], {"images": {"export": export}}))
        tagged = container(
            find(pinned, "Deployment", f"{FULLNAME}-triton"), "build-engines", init=True
        )
        assert tagged["image"] == f"textnorm-reward/export:{image}"
    assert [*build["command"], *build["args"]] == [
        "reward-service",
        "build-engines",
        "/repository",
        "--cache",
        "/engine-cache",
    ]
    assert build["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not [e for e in build.get("env", []) if e["name"].startswith("REWARD_")]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["repository"] and "emptyDir" in volumes["engine-cache"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # the gateway reads the provenance of the repository Triton serves
    assert (
        "/models/shapes-clip-gpu/provenance.json"
        in container(find(docs, "Deployment", f"{FULLNAME}-gateway"), "copy-provenance", init=True)[
            "command"
        ]
    )
    # an engine cache on a claim
    cached = with_key(
        PROFILES["gpu"], {"triton": {"gpu": {"engineCache": {"type": "pvc", "claimName": "trt"}}}}
    )
    pod = find(manifests(cached), "Deployment", f"{FULLNAME}-triton")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["engine-cache"]["persistentVolumeClaim"] == {
        "claimName": "trt"
    }


@pytest.mark.parametrize("gpu", [False, True])
def test_export_job_writes_the_repository_the_pods_wait_for(gpu: bool) -> None:
    docs = manifests(with_key(PROFILES["gpu-export" if gpu else "full"]))
    name = "shapes-clip-gpu" if gpu else "shapes-clip"
    job = find(docs, "Job")
    export = job["spec"]["template"]["spec"]["containers"][0]
    assert export["image"] == "textnorm-reward/export:0.2.0"
    assert export["command"] == ["reward-service"]
    assert export["args"][:5] == [
        "export",
        "--out",
        f"/models/{name}",
        "--target",
        "gpu" if gpu else "cpu",
    ]
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert find(docs, "PersistentVolumeClaim", claim)
    for component in ("triton", "gateway"):
        dep = find(docs, "Deployment", f"{FULLNAME}-{component}")
        wait = container(dep, "wait-for-repository", init=True)
        assert f"/models/{name}/provenance.json" in wait["command"][-1]
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim
    # a plain Job is named by its arguments: another export is another Job (pod specs are immutable)
    other = manifests(
        with_key(PROFILES["full"], {"model": {"exportJob": {"model": "openai/clip"}}})
    )
    assert (
        find(other, "Job")["metadata"]["name"]
        != find(manifests(with_key(FULL)), "Job")["metadata"]["name"]
    )


def test_export_job_passes_each_ensemble_member() -> None:
    members = ["/app/models/shapes-clip-b", "org/another-clip"]
    docs = manifests(with_key(PROFILES["full"], {"model": {"exportJob": {"members": members}}}))
    args = find(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["args"]
    flagged = [args[i + 1] for i, a in enumerate(args) if a == "--member"]
    assert flagged == members
    with pytest.raises(Exception, match="members"):  # the schema: a list of non-empty names
        manifests(with_key(PROFILES["full"], {"model": {"exportJob": {"members": [""]}}}))


def test_long_names_fit_kubernetes_limits() -> None:
    docs = manifests(with_key(FULL, {"fullnameOverride": "x" * 70}))
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_export_job_as_a_hook() -> None:
    docs = manifests(with_key(FULL, {"model": {"exportJob": {"hook": True}}}))
    job = find(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    pvc = find(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/hook"] == "pre-install"
    assert int(pvc["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    # The release's ServiceAccount was created after pre-install hooks: the Job's pods could
    # not be created and `helm install` timed out. The Job gets its own hook account, made
    # before it with the release account's annotations (IRSA, Workload Identity for a bucket's
    # checkpoint), deleted once the event's hooks succeeded (nothing left on uninstall); the
    # release's account stays an ordinary resource (an upgrade never deletes it under pods).
    annotated = with_key(
        FULL,
        {
            "model": {"exportJob": {"hook": True}},
            "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "x@y"}},
        },
    )
    docs = manifests(annotated)
    job = find(docs, "Job")
    release_account = find(docs, "ServiceAccount", FULLNAME)
    export_account = find(docs, "ServiceAccount", f"{FULLNAME}-export")
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == f"{FULLNAME}-export"
    hook = export_account["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert hook["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert hook["iam.gke.io/gcp-service-account"] == "x@y"
    assert int(hook["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert release_account["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "x@y"}
    for name in ("gateway", "triton"):
        pod = find(docs, "Deployment", f"{FULLNAME}-{name}")["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == FULLNAME
    # without the hook: one account, the release's, for the Job too
    plain = manifests(with_key(FULL))
    assert [d["metadata"]["name"] for d in plain if d["kind"] == "ServiceAccount"] == [FULLNAME]
    assert "helm.sh/hook" not in (
        find(plain, "ServiceAccount")["metadata"].get("annotations") or {}
    )
    # an account the operator made (create: false) is the Job's too
    theirs = with_key(
        FULL,
        {
            "model": {"exportJob": {"hook": True}},
            "serviceAccount": {"create": False, "name": "theirs"},
        },
    )
    docs = manifests(theirs)
    assert "ServiceAccount" not in kinds(docs)
    assert find(docs, "Job")["spec"]["template"]["spec"]["serviceAccountName"] == "theirs"


# -- scaling, disruption, network, monitoring ------------------------------------------------------
def test_autoscalers_are_off_by_default_and_autoscaling_v2() -> None:
    assert "HorizontalPodAutoscaler" not in kinds(manifests(with_key()))
    docs = manifests(with_key(FULL))
    triton_hpa = find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-triton")
    assert triton_hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = triton_hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    gateway_hpa = find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-gateway")
    assert gateway_hpa["apiVersion"] == "autoscaling/v2"
    assert gateway_hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    for component in ("triton", "gateway"):  # the HPA owns replicas
        assert "replicas" not in find(docs, "Deployment", f"{FULLNAME}-{component}")["spec"]


def test_pod_disruption_budgets() -> None:
    docs = manifests(with_key())
    assert find(docs, "PodDisruptionBudget", f"{FULLNAME}-gateway")["spec"]["minAvailable"] == 1
    assert find(docs, "PodDisruptionBudget", f"{FULLNAME}-triton")["spec"]["maxUnavailable"] == 1
    assert "PodDisruptionBudget" not in kinds(manifests(with_key(PROFILES["minimal"])))
    docs = manifests(with_key({"gateway": {"pdb": {"minAvailable": "50%"}}}))
    pdb = find(docs, "PodDisruptionBudget", f"{FULLNAME}-gateway")["spec"]
    selector = find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["selector"]
    assert pdb == {"minAvailable": "50%", "selector": selector}
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(with_key({"gateway": {"pdb": {"maxUnavailable": 1}}}))


def test_network_policy_admits_only_gateway_trainers_and_prometheus() -> None:
    docs = manifests(with_key())
    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-triton")["spec"]
    triton_labels = find(docs, "Deployment", f"{FULLNAME}-triton")["spec"]["template"]["metadata"][
        "labels"
    ]
    gateway_labels = find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"][
        "metadata"
    ]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= triton_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    gateway_rule, trainer_rule = policy["ingress"]
    assert gateway_rule["from"][0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert (
        not gateway_rule["from"][0]["podSelector"]["matchLabels"].items() <= triton_labels.items()
    )
    assert trainer_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"textnorm-reward/trainer": "true"}}}
    ]
    assert {p["port"] for p in trainer_rule["ports"]} == {"http", "grpc"}
    # a configurable label, and the scraper on the metrics port only when asked for
    custom = {
        "networkPolicy": {
            "trainerNamespaceLabel": {"key": "team", "value": "rl"},
            "prometheus": {"enabled": True},
        }
    }
    policy = find(manifests(with_key(custom)), "NetworkPolicy")["spec"]
    assert policy["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"] == {"team": "rl"}
    assert [p["port"] for p in policy["ingress"][2]["ports"]] == ["metrics"]
    assert "NetworkPolicy" not in kinds(manifests(with_key({"networkPolicy": {"enabled": False}})))


def test_service_monitor_needs_the_value_and_the_api() -> None:
    enabled = {"metrics": {"serviceMonitor": {"enabled": True}}}
    api = {"extraApiVersions": [SERVICE_MONITOR_API]}
    # helm-python-sdk renders with Helm's default capabilities (no CRDs, and no --api-versions
    # option): the "API present" case goes through extraApiVersions, which the same helper ORs
    # with .Capabilities.APIVersions.Has.
    assert "ServiceMonitor" not in kinds(manifests(with_key(api)))
    assert "ServiceMonitor" not in kinds(manifests(with_key(enabled)))
    assert "no ServiceMonitor was rendered" in notes(with_key(enabled))
    docs = manifests(
        with_key(enabled, api, {"metrics": {"serviceMonitor": {"labels": {"r": "p"}}}})
    )
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {f"{FULLNAME}-gateway", f"{FULLNAME}-triton"}
    for component, port in [("gateway", "http"), ("triton", "metrics")]:
        monitor = monitors[f"{FULLNAME}-{component}"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["r"] == "p"
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == port and endpoint["path"] == "/metrics"
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            d
            for d in docs
            if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()
        ]
        # every selected Service that has the port is one whose pods serve /metrics there
        assert [
            s["metadata"]["name"]
            for s in services
            if port in {p["name"] for p in s["spec"]["ports"]}
        ] == [f"{FULLNAME}-{component}"]


def test_notes_tell_how_to_call_it() -> None:
    text = notes(with_key())
    assert f"port-forward service/{FULLNAME}-gateway 8000:8000" in text
    assert "/v1/score" in text and "Authorization: Bearer" in text
    assert f"dns:///{FULLNAME}-triton-grpc.{NAMESPACE}.svc.cluster.local:8001" in text


def test_the_gateway_may_take_minutes_to_listen_before_liveness_counts() -> None:
    # It encodes the configured prompt sets before it listens (150 sets on a ViT-B/32: 34 s),
    # and the liveness probe alone killed it after 30 s: CrashLoopBackOff on every rollout.
    pod = find(manifests(with_key()), "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]
    (gateway,) = [c for c in pod["spec"]["containers"] if c["name"] == "gateway"]
    startup = gateway["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize(
    "enabled",
    [
        {"metrics": {"serviceMonitor": {"enabled": True}}},
        {"triton": {"autoscaling": {"enabled": True}}},
    ],
)
def test_prometheus_may_scrape_triton_when_its_metrics_are_used(enabled: dict[str, Any]) -> None:
    # The policy opened the metrics port only with networkPolicy.prometheus.enabled: with a
    # ServiceMonitor or the queue-time autoscaler on, nothing was scraped and it never scaled.
    policy = find(manifests(with_key(enabled)), "NetworkPolicy")
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert "metrics" in ports
    default = find(manifests(with_key()), "NetworkPolicy")
    assert "metrics" not in [
        p["port"] for rule in default["spec"]["ingress"] for p in rule["ports"]
    ]


@pytest.mark.parametrize("secret", ['["sk-1", "sk-2"]', "sk-1", '"sk-1"'])
def test_the_notes_read_the_first_key_of_any_accepted_form(secret: str) -> None:
    import re
    import subprocess
    import sys

    notes = render(with_key())["textnorm-reward/templates/NOTES.txt"]
    (snippet,) = re.findall(r"python3 -c '([^']+)'", notes)[:1]
    out = subprocess.run(
        [sys.executable, "-c", snippet], input=secret, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "sk-1", out.stderr


def test_a_changed_export_under_the_same_name_rolls_the_pods_that_serve_it() -> None:
    # Only the Job changed: both Deployments rendered the same, so running pods kept the old
    # export while any restarted Triton pod loaded the new one (and failed the identity check).
    def export_of(model: str) -> tuple[str, str, str]:
        job = {"model": {"name": "b32", "source": "exportJob", "exportJob": {"model": model}}}
        docs = manifests(with_key(job))
        return (
            find(docs, "Job")["metadata"]["name"],
            *(
                find(docs, "Deployment", f"{FULLNAME}-{c}")["spec"]["template"]["metadata"][
                    "annotations"
                ]["checksum/export"]
                for c in ("triton", "gateway")
            ),
        )

    b32 = export_of("openai/clip-vit-base-patch32")
    large = export_of("openai/clip-vit-large-patch14")
    assert b32[1] == b32[2] and b32[0].endswith(b32[1][:8])  # the Job's hash is the pods'
    assert all(x != y for x, y in zip(b32, large, strict=True))
