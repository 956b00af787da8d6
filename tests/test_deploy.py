"""The deployment, checked offline with the real tools: the Helm chart rendered by helm and validated with
kubernetes-validate (Kubernetes 1.29 and 1.33, strict) and checkov, the Dockerfile with hadolint and checkov, the
KServe manifest against KServe's API schema, and the image's entrypoint serving the chart's config on this machine.

The tools live in .tools/ (scripts/deploy_tools.sh); a test that needs a missing one skips and says how to get it.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from scripts import fetch_model, ready
from scripts.build_mar import main as build_mar
from scripts.server import ROOT, TorchServe, java_problem, read_properties, write_properties
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS
from tests.servers import TIMEOUT, free_port, http_server, loopback_listeners, need

TOOLS = ROOT / ".tools"
HELM = TOOLS / "helm" / "helm"
KUBERNETES_VALIDATE = TOOLS / "venv" / "bin" / "kubernetes-validate"
CHECKOV = TOOLS / "venv" / "bin" / "checkov"
HADOLINT = TOOLS / "venv" / "bin" / "hadolint"
KSERVE_MODELS = TOOLS / "kserve" / "kserve" / "models"
CHART = ROOT / "deploy" / "helm" / "sd-torchserve"
DOCKER = ROOT / "deploy" / "docker"
KSERVE_MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")

SHA256 = hashlib.sha256(b"an archive").hexdigest()
DIGEST = "sha256:" + hashlib.sha256(b"an image").hexdigest()


def sets(*assignments: str) -> tuple[str, ...]:
    """helm's --set arguments."""
    return tuple(arg for assignment in assignments for arg in ("--set", assignment))


DOWNLOAD = sets("modelStore.download.url=https://models.example.com/sd.mar", f"modelStore.download.sha256={SHA256}")
# Each way of running the chart.
SCENARIOS = {
    "download": DOWNLOAD,
    # A peer list emptied with --set …=null: the front's own rule, and no other.
    "download-no-inference-peers": (*DOWNLOAD, *sets("networkPolicy.inferenceFrom=null")),
    "download-url-secret": sets(
        "modelStore.download.urlSecret.name=sd-model-url", f"modelStore.download.sha256={SHA256}"
    ),
    "pvc": sets(
        "modelStore.source=pvc",
        "modelStore.pvc.claimName=sd-models",
        "ingress.enabled=true",
        "ingress.tlsSecret=sd-tls",
        "metrics.serviceMonitor.enabled=true",
        "networkPolicy.inferenceFrom[0].namespaceSelector.matchLabels.team=ml",
    ),
    "image": sets(
        "modelStore.source=image", "front.enabled=false", "autoscaling.enabled=false", "torchserve.replicas=2"
    ),
    "cpu": ("--values", str(CHART / "values-cpu.yaml"), *DOWNLOAD),
}
# Images pinned by digest, as docs/KUBERNETES.md says production should.
PINNED = sets(f"image.digest={DIGEST}", f"front.image.digest={DIGEST}")
# Objects of custom resource definitions, which kubernetes-validate has no schema for; checked field by field below.
CUSTOM_KINDS = {"ServiceMonitor"}


def tool(path: Path) -> Path:
    need(None if path.exists() else f"{path.relative_to(ROOT)} is not installed: run scripts/deploy_tools.sh")
    return path


def helm_template(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool(HELM)), "template", "sd", str(CHART), "--namespace", "sd", *args], capture_output=True, text=True
    )


@functools.cache
def render(*args: str) -> str:
    result = helm_template(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(*args: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(render(*args)) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    (match,) = (doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name)
    return match


def container(deployment: dict, name: str) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    (match,) = (c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)
    return match


def config_properties(docs: list[dict]) -> dict[str, str]:
    text = find(docs, "ConfigMap", "sd-torchserve")["data"]["config.properties"]
    return dict(line.split("=", 1) for line in text.splitlines())


# --- the chart, validated by the tools ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(version: str, tmp_path: Path) -> None:
    """kubernetes-validate --strict: unknown fields are errors, and a removed API version only warns, so both fail."""
    validate = tool(KUBERNETES_VALIDATE)
    renders = [render(*DOWNLOAD)] + [render(*args, *PINNED) for args in SCENARIOS.values()]
    docs = [doc for text in renders for doc in yaml.safe_load_all(text) if doc]
    assert {doc["kind"] for doc in docs if doc["kind"] in CUSTOM_KINDS} == CUSTOM_KINDS
    manifest = tmp_path / "all.yaml"
    manifest.write_text(yaml.safe_dump_all([doc for doc in docs if doc["kind"] not in CUSTOM_KINDS]))
    result = subprocess.run([str(validate), "--strict", "-k", version, str(manifest)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"^(WARN|ERROR)", output, re.MULTILINE), output
    assert output.count("passed for resource") == len(docs) - sum(doc["kind"] in CUSTOM_KINDS for doc in docs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "needs modelStore.download.url"),
        (sets("modelStore.download.url=https://x/sd.mar"), "needs modelStore.download.sha256"),
        (sets("modelStore.download.url=https://x/sd.mar", "modelStore.download.sha256=abc"), "download.sha256"),
        (sets("modelStore.source=pvc"), "needs modelStore.pvc.claimName"),
        (sets("modelStore.source=s3"), "must be pvc, download or image"),
    ],
)
def test_an_incomplete_model_source_is_refused_at_render(args: tuple[str, ...], message: str) -> None:
    result = helm_template(*args)
    assert result.returncode != 0
    assert message in result.stderr


def test_checkov_finds_nothing_beyond_the_listed_skips(tmp_path: Path) -> None:
    """The chart in each scenario and the Dockerfile; deploy/checkov.yaml lists the skipped checks and why."""
    checkov = tool(CHECKOV)
    for name, args in SCENARIOS.items():
        (tmp_path / f"{name}.yaml").write_text(render(*args, *PINNED))
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    result = subprocess.run(
        [str(checkov), "--config-file", str(ROOT / "deploy" / "checkov.yaml"), "-d", str(tmp_path), "-o", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "LOG_LEVEL": "ERROR"},
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert failed == []
    assert result.returncode == 0, result.stderr
    assert all(r["summary"]["parsing_errors"] == 0 and r["summary"]["passed"] > 0 for r in reports)


def test_every_checkov_skip_gives_its_reason() -> None:
    text = (ROOT / "deploy" / "checkov.yaml").read_text()
    for check in yaml.safe_load(text)["skip-check"]:
        assert re.search(rf"^\s*# {check} \S.+", text, re.MULTILINE), f"{check} is skipped without a reason"


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [str(tool(HADOLINT)), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- what the chart says ---------------------------------------------------------------------------------------


def test_torchserve_pods_get_a_gpu_probes_and_a_hardened_container() -> None:
    docs = objects(*DOWNLOAD)
    deployment = find(docs, "Deployment", "sd-torchserve")
    pod = deployment["spec"]["template"]["spec"]
    ts = container(deployment, "torchserve")
    resources = ts["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"])
    # The startup budget covers loading a 4 GB model from a slow volume: TorchServe's own startupTimeout.
    startup = ts["startupProbe"]
    assert startup["httpGet"] == {"path": "/ping", "port": "inference"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert ts["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "inference"}
    assert ts["readinessProbe"]["exec"]["command"][:3] == ["python", "-m", "scripts.ready"]
    assert ts["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "60"]
    assert pod["terminationGracePeriodSeconds"] == 90
    security = ts["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
    assert not security["allowPrivilegeEscalation"] and security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # Inference and metrics are container ports; management is not.
    assert {p["name"]: p["containerPort"] for p in ts["ports"]} == {"inference": 8080, "metrics": 8082}


def test_a_runtime_class_priority_and_more_environment_reach_the_pod() -> None:
    """For clusters whose GPU runtime is not the default one, and for settings the chart does not name."""
    extra = sets("torchserve.runtimeClassName=nvidia", "torchserve.priorityClassName=inference",
                 "torchserve.extraEnv[0].name=CUDA_MODULE_LOADING", "torchserve.extraEnv[0].value=LAZY")  # fmt: skip
    deployment = find(objects(*DOWNLOAD, *extra), "Deployment", "sd-torchserve")
    pod = deployment["spec"]["template"]["spec"]
    assert (pod["runtimeClassName"], pod["priorityClassName"]) == ("nvidia", "inference")
    env = {e["name"]: e["value"] for e in container(deployment, "torchserve")["env"]}
    assert env["CUDA_MODULE_LOADING"] == "LAZY" and "TS_CONFIG" in env
    plain = find(objects(*DOWNLOAD), "Deployment", "sd-torchserve")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in plain and "priorityClassName" not in plain


def test_numbers_from_a_values_file_are_written_as_whole_numbers(tmp_path: Path) -> None:
    """A values file reads numbers as floats, which a template prints as 3.3554432e+07 from a million up; the keys a
    user raises the image limits with (extraConfig's max_request_size) and the front's timeout stay whole numbers,
    and a fraction stays one."""
    values = tmp_path / "values.yaml"
    values.write_text(
        "torchserve:\n  extraConfig:\n    max_request_size: 33554432\n    ratio: 0.5\nfront:\n  timeout: 1800000\n"
    )
    docs = objects("--values", str(values), *DOWNLOAD)
    properties = config_properties(docs)
    assert (properties["max_request_size"], properties["ratio"]) == ("33554432", "0.5")
    front = container(find(docs, "Deployment", "sd-front"), "front")
    assert {e["name"]: e.get("value") for e in front["env"]}["SD_FRONT_TIMEOUT"] == "1800000"


def test_cpu_values_ask_for_no_gpu_and_run_the_model_on_the_cpu() -> None:
    docs = objects(*SCENARIOS["cpu"])
    deployment = find(docs, "Deployment", "sd-torchserve")
    resources = container(deployment, "torchserve")["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] | resources["limits"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "tolerations" not in deployment["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in render(*SCENARIOS["cpu"])
    model_config = yaml.safe_load(find(docs, "ConfigMap", "sd-torchserve")["data"]["model-config.yaml"])
    assert (model_config["deviceType"], model_config["batchSize"]) == ("cpu", 1)
    limits = model_config["handler"]["limits"]
    # One 512x512 image of 50 steps at most, no AND sub-prompts (a UNet row each), the repository's other limits
    # kept; the front waits as long as TorchServe; a short queue; no HPA without Prometheus.
    assert (limits["max_pixels"], limits["max_images"], limits["max_steps"]) == (512 * 512, 1, 50)
    assert limits["max_and_subprompts"] == 1
    assert limits["max_prompt_chars"] == 2000
    front = container(find(docs, "Deployment", "sd-front"), "front")
    timeout = {e["name"]: e.get("value") for e in front["env"]}["SD_FRONT_TIMEOUT"]
    assert float(timeout) == model_config["responseTimeout"] == 3600
    assert config_properties(docs)["job_queue_size"] == "4"
    assert not [doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (sets("torchserve.gpus=0"), "torchserve.gpus=0 runs the model on the CPU: set torchserve.modelConfig"),
        (sets("torchserve.modelConfig.deviceType=cpu"), "deviceType=cpu would leave the pod's GPUs idle"),
        (sets("torchserve.gpus=-1"), "torchserve.gpus must be 0 (the CPU) or more"),
    ],
)
def test_gpus_and_device_type_must_agree(args: tuple[str, ...], message: str) -> None:
    result = helm_template(*DOWNLOAD, *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_model_store_comes_from_the_configured_source() -> None:
    store = "/home/model-server/model-store"
    overlay = {
        "name": "config",
        "mountPath": f"{store}/sd/model-config.yaml",
        "subPath": "model-config.yaml",
        "readOnly": True,
    }

    docs = objects(*DOWNLOAD)
    deployment = find(docs, "Deployment", "sd-torchserve")
    fetch = container(deployment, "fetch-model")
    assert fetch["command"] == ["python", "-m", "scripts.fetch_model", "--store", store, "--name", "sd"]
    assert {e["name"]: e["value"] for e in fetch["env"]} == {
        "MODEL_URL": "https://models.example.com/sd.mar",
        "MODEL_SHA256": SHA256,
    }
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["model-store"]
    assert overlay in container(deployment, "torchserve")["volumeMounts"]

    secret = find(objects(*SCENARIOS["download-url-secret"]), "Deployment", "sd-torchserve")
    fetch = container(secret, "fetch-model")
    assert fetch["args"] == ["--url-file", "/run/secrets/model-url/url"]
    assert {"name": "model-url", "mountPath": "/run/secrets/model-url", "readOnly": True} in fetch["volumeMounts"]
    assert [e["name"] for e in fetch["env"]] == ["MODEL_SHA256"]
    volumes = {v["name"]: v for v in secret["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-url"]["secret"]["secretName"] == "sd-model-url"

    pvc = find(objects(*SCENARIOS["pvc"]), "Deployment", "sd-torchserve")
    volumes = {v["name"]: v for v in pvc["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-store"]["persistentVolumeClaim"] == {"claimName": "sd-models", "readOnly": True}
    assert "initContainers" not in pvc["spec"]["template"]["spec"]

    baked = find(objects(*SCENARIOS["image"]), "Deployment", "sd-torchserve")
    mounts = container(baked, "torchserve")["volumeMounts"]
    assert overlay in mounts and not any(m["name"] == "model-store" for m in mounts)
    assert baked["spec"]["replicas"] == 2


def test_the_chart_config_is_the_repository_config_with_listeners_for_a_pod() -> None:
    chart = config_properties(objects(*DOWNLOAD))
    assert chart["inference_address"] == "http://0.0.0.0:8080"
    assert chart["metrics_address"] == "http://0.0.0.0:8082"
    assert chart["management_address"] == "http://127.0.0.1:8081"
    assert chart["grpc_inference_address"] == chart["grpc_management_address"] == "127.0.0.1"
    assert chart["model_store"] == "/home/model-server/model-store" and chart["load_models"] == "sd=sd"
    # Everything else is the repository's config.properties, whose comments explain it.
    pod_only = {"inference_address", "metrics_address", "model_store", "load_models", "vmargs"}
    repo = read_properties(ROOT / "config.properties")
    assert {k: v for k, v in chart.items() if k not in pod_only} == {k: v for k, v in repo.items() if k not in pod_only}
    # The image's file for `docker run` is the chart's default, and KServe's differs only in where the store is.
    assert read_properties(DOCKER / "config.properties") == chart
    kserve = read_properties(ROOT / "deploy" / "kserve" / "config" / "config.properties")
    assert kserve == {**chart, "model_store": "/mnt/models/model-store"}


def test_the_chart_model_config_is_the_repository_model_config() -> None:
    chart = yaml.safe_load(find(objects(*DOWNLOAD), "ConfigMap", "sd-torchserve")["data"]["model-config.yaml"])
    assert chart == yaml.safe_load((ROOT / "model-config.yaml").read_text())


def test_only_inference_and_metrics_leave_the_pod() -> None:
    docs = objects(*SCENARIOS["pvc"], *PINNED)
    services = {d["metadata"]["name"]: [p["port"] for p in d["spec"]["ports"]] for d in docs if d["kind"] == "Service"}
    assert services == {"sd-torchserve-inference": [8080], "sd-torchserve-metrics": [8082], "sd-front": [5000]}
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    container_ports = [p["containerPort"] for pod in pods for c in pod["containers"] for p in c.get("ports", [])]
    policy_ports = [
        p["port"] for d in docs if d["kind"] == "NetworkPolicy" for rule in d["spec"]["ingress"] for p in rule["ports"]
    ]
    assert 8081 not in container_ports + policy_ports

    policy = find(docs, "NetworkPolicy", "sd-torchserve")["spec"]
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(rules) == {8080, 8082}
    front = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "sd-torchserve",
                "app.kubernetes.io/instance": "sd",
                "app.kubernetes.io/component": "front",
            }
        }
    }
    assert rules[8080] == [front, {"namespaceSelector": {"matchLabels": {"team": "ml"}}}]
    assert rules[8082] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    # Without the front and extra peers, nobody may call inference: the rule is dropped, not left open.
    alone = find(objects(*SCENARIOS["image"]), "NetworkPolicy", "sd-torchserve")["spec"]
    assert [rule["ports"][0]["port"] for rule in alone["ingress"]] == [8082]


def test_the_front_calls_the_inference_service_and_the_ingress_reaches_the_front() -> None:
    docs = objects(*SCENARIOS["pvc"], *PINNED)
    front = container(find(docs, "Deployment", "sd-front"), "front")
    env = {e["name"]: e["value"] for e in front["env"]}
    assert env["SD_INFERENCE_URL"] == "http://sd-torchserve-inference:8080"
    assert (env["SD_MODEL_NAME"], env["SD_FRONT_HOST"], env["SD_FRONT_PORT"]) == ("sd", "0.0.0.0", "5000")
    assert front["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert front["livenessProbe"]["httpGet"]["path"] == "/livez"  # not restarted while TorchServe is down
    assert front["image"] == f"ghcr.io/example/sd-front@{DIGEST}"
    # A rollout lets the generations it relays finish: as long as the front waits for TorchServe, and the preStop.
    pod = find(docs, "Deployment", "sd-front")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900 + 40 and front["lifecycle"]["preStop"]["exec"]["command"]
    backend = find(docs, "Ingress", "sd-front")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend == {"service": {"name": "sd-front", "port": {"name": "http"}}}
    monitor = find(docs, "ServiceMonitor", "sd-torchserve")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    metrics = find(docs, "Service", "sd-torchserve-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()


def test_the_hpa_scales_on_the_adapter_metric_and_the_pdb_allows_drains() -> None:
    docs = objects(*DOWNLOAD)
    hpa = find(docs, "HorizontalPodAutoscaler", "sd-torchserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sd-torchserve"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    # Both TorchServe series are counters: the rule must take rates of them, never their raw values.
    query = rule["metricsQuery"]
    for counter in ("ts_queue_latency_microseconds", "ts_inference_requests_total"):
        assert f"rate({counter}{{<<.LabelMatchers>>}}[2m])" in query
    assert "replicas" not in find(docs, "Deployment", "sd-torchserve")["spec"]
    pdb = find(docs, "PodDisruptionBudget", "sd-torchserve")["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# --- KServe --------------------------------------------------------------------------------------------------------


def kserve_schema(root: str, kubernetes: dict) -> dict:
    """A strict JSON Schema for KServe's `root` type, from the KServe SDK's generated API models (the Go types the
    CRDs are generated from), with Kubernetes' own types taken from kubernetes-validate's definitions."""
    models = {}
    for source in tool(KSERVE_MODELS).glob("*.py"):
        for cls in (n for n in ast.parse(source.read_text()).body if isinstance(n, ast.ClassDef)):
            tables = {
                a.targets[0].id: ast.literal_eval(a.value)
                for a in cls.body
                if isinstance(a, ast.Assign)
                and isinstance(a.targets[0], ast.Name)
                and a.targets[0].id in ("openapi_types", "attribute_map")
            }
            if len(tables) == 2:
                models[cls.name] = tables
    by_client_name: dict[str, list[str]] = {}
    for key in kubernetes["$defs"]:
        parts = key.split(".")
        by_client_name.setdefault(parts[-2].capitalize() + parts[-1], []).append(key)
        by_client_name.setdefault("K8sIo" + "".join(p.capitalize() for p in parts[2:-1]) + parts[-1], []).append(key)
    preferred = ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1.")
    scalars = {
        "str": {"type": "string"},
        "int": {"type": "integer"},
        "bool": {"type": "boolean"},
        "float": {"type": "number"},
        "object": {},
        "datetime": {"type": "string"},
    }
    defs: dict[str, dict] = {}

    def schema(name: str) -> dict | bool:
        if match := re.fullmatch(r"list\[(.+)\]", name):
            return {"type": "array", "items": schema(match[1])}
        if match := re.fullmatch(r"dict\(str, (.+)\)", name):
            return {"type": "object", "additionalProperties": schema(match[1])}
        if name in scalars:
            return scalars[name]
        if name in models:
            if name not in defs:
                defs[name] = {}  # taken before recursing, so a type that contains itself ends
                types, keys = models[name]["openapi_types"], models[name]["attribute_map"]
                defs[name] = {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {keys[k]: schema(t) for k, t in types.items()},
                }
            return {"$ref": f"#/$defs/{name}"}
        if name.endswith("Quantity"):
            return {"$ref": f"{kubernetes['$id']}#/$defs/io.k8s.apimachinery.pkg.api.resource.Quantity"}
        keys = by_client_name.get(name, [])
        keys = [k for k in keys if k.startswith(preferred)] or keys
        # A name the definitions do not resolve is never valid: the manifest must not use that field.
        return {"$ref": f"{kubernetes['$id']}#/$defs/{keys[0]}"} if len(keys) == 1 else False

    top = schema(root)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **top, "$defs": defs}


def test_the_kserve_manifest_matches_kserve_api_and_the_torchserve_storage_layout() -> None:
    definitions = tool(TOOLS / "venv").glob(
        "lib/python3*/site-packages/kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict/_definitions.json"
    )
    kubernetes = json.loads(next(definitions).read_text())
    registry = Registry().with_resource(kubernetes["$id"], Resource.from_contents(kubernetes))
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(KSERVE_MANIFEST.read_text())}
    for kind, model in (("ServingRuntime", "V1alpha1ServingRuntime"), ("InferenceService", "V1beta1InferenceService")):
        validator = Draft202012Validator(kserve_schema(model, kubernetes), registry=registry)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(docs[kind])]
        assert errors == [], kind
    # The validator is strict: a misspelt field fails.
    validator = Draft202012Validator(kserve_schema("V1beta1InferenceService", kubernetes), registry=registry)
    typo = {**docs["InferenceService"], "spec": {"predictor": {"model": {"storageURI": "s3://x"}}}}
    assert not validator.is_valid(typo)

    runtime, service = docs["ServingRuntime"], docs["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (server,) = runtime["spec"]["containers"]
    assert server["name"] == "kserve-container" and server["image"].startswith("ghcr.io/example/sd-torchserve:")
    # KServe copies storageUri to /mnt/models: config/config.properties there, whose model store is model-store/.
    assert {e["name"]: e["value"] for e in server["env"]} == {"TS_CONFIG": "/mnt/models/config/config.properties"}
    command = server["readinessProbe"]["exec"]["command"]
    assert command[command.index("--config") + 1] == "/mnt/models/config/config.properties"
    # Generations in flight finish before SIGTERM, as with the chart: its drain, and a grace period 30 s longer.
    drain = yaml.safe_load((CHART / "values.yaml").read_text())["torchserve"]["drainSeconds"]
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(drain)]
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] == drain + 30
    config = read_properties(ROOT / "deploy" / "kserve" / "config" / "config.properties")
    assert config["model_store"] == "/mnt/models/model-store"
    assert config["inference_address"].endswith(f":{server['ports'][0]['containerPort']}")


# --- the images ----------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_build_context_admits_what_the_dockerfile_copies() -> None:
    admitted = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    sources = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            sources += [a for a in args.split()[:-1] if not a.startswith("--")]
        elif instruction == "RUN" and (bind := re.search(r"--mount=type=bind,source=([^,\s]+)", args)):
            sources.append(bind[1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == a or source.startswith(a + "/") for a in admitted), f"{source} is not in the context"


def test_the_server_image_runs_the_entrypoint_under_tini_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    server = instructions[max(i for i, (op, args) in enumerate(instructions) if op == "FROM") :]
    entrypoint = json.loads(next(args for op, args in server if op == "ENTRYPOINT"))
    assert entrypoint == ["/usr/bin/tini", "-g", "--", "/app/deploy/docker/entrypoint.sh"]
    assert next(args for op, args in server if op == "USER") == "10001:10001"
    assert "8081" not in next(args for op, args in server if op == "EXPOSE")
    # The entrypoint's default config is where the chart mounts it, and where the readiness probe reads it.
    entry = (DOCKER / "entrypoint.sh").read_text()
    assert f': "${{TS_CONFIG:={ready.DEFAULT_CONFIG}}}"' in entry
    assert "exec torchserve --foreground" in entry


def test_the_front_image_lists_every_package_front_imports() -> None:
    listed = {
        re.split(r"[<>=!~ ]", line)[0].replace("-", "_").lower()
        for line in (DOCKER / "front-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    imported = set()
    for source in (ROOT / "front").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "front"}
    assert third_party <= listed


# --- the init container and the readiness probe ------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Not on the test's stderr."""


def serving(folder: Path) -> contextlib.AbstractContextManager[str]:
    """The files of `folder` over HTTP on a free loopback port, until the block ends; yields its base URL."""
    return http_server(functools.partial(QuietHandler, directory=str(folder)))


def small_mar(path: Path) -> str:
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelName": "sd"}}')
        mar.writestr("model-config.yaml", "minWorkers: 1\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_model_unpacks_a_checked_archive_once(tmp_path: Path) -> None:
    site, store = tmp_path / "site", tmp_path / "store"
    site.mkdir()
    digest = small_mar(site / "sd.mar")
    with serving(site) as url:
        assert fetch_model.fetch(f"{url}/sd.mar", digest, store, "sd") is True
        assert (store / "sd" / "MAR-INF" / "MANIFEST.json").is_file()
        assert sorted(p.name for p in store.iterdir()) == ["sd"]
        # Run again in the same pod (same volume): nothing is downloaded.
        (site / "sd.mar").unlink()
        assert fetch_model.fetch(f"{url}/sd.mar", digest, store, "sd") is False


def test_fetch_model_keeps_nothing_that_fails_its_checksum(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    site, store = tmp_path / "site", tmp_path / "store"
    site.mkdir()
    small_mar(site / "sd.mar")
    (site / "notes.txt").write_text("not a zip")
    with serving(site) as url:
        code = fetch_model.main(["--url", f"{url}/sd.mar", "--sha256", "0" * 64, "--store", str(store), "--name", "sd"])
        assert code == 1 and "checksum mismatch" in capsys.readouterr().err
        assert list(store.iterdir()) == []
        text = hashlib.sha256(b"not a zip").hexdigest()
        with pytest.raises(fetch_model.FetchError, match="not a zip file"):
            fetch_model.fetch(f"{url}/notes.txt", text, store, "sd")
        with pytest.raises(fetch_model.FetchError, match="download failed") as failure:
            fetch_model.fetch(f"{url}/missing.mar?X-Amz-Signature=secret", "0" * 64, store, "sd")
        assert "secret" not in str(failure.value)
        assert list(store.iterdir()) == []
    with pytest.raises(SystemExit):
        fetch_model.main(["--url", "ftp://x/sd.mar", "--sha256", "0" * 64, "--store", str(store), "--name", "sd"])


def test_fetch_model_reads_a_secret_url_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    site, store = tmp_path / "site", tmp_path / "store"
    site.mkdir()
    digest = small_mar(site / "sd.mar")
    with serving(site) as url:
        (tmp_path / "url").write_text(f"{url}/sd.mar?X-Amz-Signature=secret\n")
        args = ["--url-file", str(tmp_path / "url"), "--sha256", digest, "--store", str(store), "--name", "sd"]
        assert fetch_model.main(args) == 0
    assert (store / "sd" / "MAR-INF" / "MANIFEST.json").is_file()
    assert "secret" not in capsys.readouterr().out


def test_the_readiness_probe_waits_for_the_models_that_load_at_start(tmp_path: Path) -> None:
    assert ready.loaded_models({"load_models": "sd=sd, other.mar"}) == ["sd", "other"]
    with pytest.raises(ValueError, match="ALL"):
        ready.loaded_models({"load_models": "ALL"})
    config = tmp_path / "config.properties"
    config.write_text(f"management_address=http://127.0.0.1:{free_port()}\nload_models=sd=sd\n")
    assert ready.main(["--config", str(config)]) == 1  # nothing listens there
    assert ready.main(["--config", str(tmp_path / "missing.properties")]) == 2


# --- the image's entry command, run here ---------------------------------------------------------------------------


class Container(TorchServe):
    """TorchServe started as the server image starts it: deploy/docker/entrypoint.sh, with TS_CONFIG and TS_HOME
    pointing at this test's folder instead of the image's paths, and PYTHONPATH at `image_code`, as the image's
    points at its own copy of the code (/app)."""

    def __init__(self, config: Path, home: Path, model_store: Path, models: str, image_code: Path) -> None:
        super().__init__(config, home, model_store, models)
        self.image_code = image_code

    def environment(self) -> dict[str, str]:
        return {
            **super().environment(),
            "TS_CONFIG": str(self.config),
            "TS_HOME": str(self.home),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(self.image_code),
        }

    def command(self, *extra: str) -> list[str]:
        return [str(DOCKER / "entrypoint.sh"), *extra]


@pytest.mark.integration
def test_the_entrypoint_serves_the_chart_config_and_a_downloaded_archive(tmp_path: Path) -> None:
    need(java_problem())
    docs = objects(*DOWNLOAD)
    deployment = find(docs, "Deployment", "sd-torchserve")
    chart_config = config_properties(docs)
    image_store = chart_config["model_store"]
    site, store, home = tmp_path / "site", tmp_path / "model-store", tmp_path / "home"

    # The init container's command, with the image's store path moved here, fetching a real archive.
    assert (
        build_mar(
            [
                "--ckpt",
                str(TINY_SAFETENSORS),
                "--config",
                str(TINY_CONFIG),
                "--model-name",
                "sd",
                "--export-path",
                str(site),
                "--dtype",
                "fp32",
                "--archive-format",
                "default",
            ]
        )
        == 0
    )
    fetch = container(deployment, "fetch-model")
    command = [
        sys.executable if arg == "python" else str(store) if arg == image_store else arg for arg in fetch["command"]
    ]
    with serving(site) as url:
        env = {
            **os.environ,
            "MODEL_URL": f"{url}/sd.mar",
            "MODEL_SHA256": hashlib.sha256((site / "sd.mar").read_bytes()).hexdigest(),
        }
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    # The ConfigMap's model-config.yaml over the archive's, as the subPath mount puts it.
    model_config = yaml.safe_load(find(docs, "ConfigMap", "sd-torchserve")["data"]["model-config.yaml"])
    (store / "sd" / "model-config.yaml").write_text(yaml.safe_dump(model_config))

    # The chart's config.properties, listeners moved to free loopback ports, the store to this folder.
    home.mkdir()
    (home / "chart.properties").write_text("".join(f"{k}={v}\n" for k, v in chart_config.items()))
    config = write_properties(
        home / "chart.properties",
        home / "config.properties",
        loopback_listeners(store),
    )
    # The workers run the archive's code: a `handler` package on the image's PYTHONPATH would fail them.
    image_code = tmp_path / "image"
    (image_code / "handler").mkdir(parents=True)
    (image_code / "handler" / "__init__.py").write_text("raise ImportError(\"the image's handler, not the archive's\")")
    server = Container(config, home, store, "sd=sd", image_code)
    server.start(foreground=True)
    try:
        server.wait_ready("sd", timeout=TIMEOUT)
        probe = container(deployment, "torchserve")["readinessProbe"]["exec"]["command"]
        probe = [
            sys.executable if arg == "python" else str(config) if arg.endswith(".properties") else arg for arg in probe
        ]
        assert subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0
        with urllib.request.urlopen(f"{server.inference_url}/ping", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "Healthy"}
        body = json.dumps({"prompt": "a lighthouse", "H": 64, "W": 64, "ddim_steps": 3, "seed": 5}).encode()
        request = urllib.request.Request(
            f"{server.inference_url}/predictions/sd",
            data=body,
            headers={"Content-Type": "application/json", "Accept": "image/png"},
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            assert response.headers["Content-Type"] == "image/png"
            assert response.read().startswith(b"\x89PNG")
        # The two counters the autoscaling rule takes rates of.
        with urllib.request.urlopen(f"{server.metrics_url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        for counter in ("ts_queue_latency_microseconds", "ts_inference_requests_total"):
            assert f"# TYPE {counter} counter" in metrics
    finally:
        server.stop()
    assert server.process is not None and server.process.poll() is not None
