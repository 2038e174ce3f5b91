"""Every deployment file is checked here: the NATS configs by nats-server itself, docker-compose.yml
against the compose-spec JSON schema (vendored by check-jsonschema) and the invariants that matter,
the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate) and the same invariants."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from cli import natsd
from cli.cluster import LocalCluster, plan, render_server
from shared.config import DEFAULT_PORTS, SERVICES
from shared.replication import stream_replicas

yaml = pytest.importorskip(
    "yaml", reason="PyYAML (a dependency of transformers/huggingface_hub) is needed to read the files"
)

ROOT = Path(__file__).resolve().parents[2]
NATS_DIR, K8S_DIR = ROOT / "infra" / "nats", ROOT / "infra" / "k8s"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
NATS_ENV = {"NATS_SERVER_NAME": "nats-1", "NATS_HUB_LEAF_URL": "nats-leaf://hub.example.com:7422", "POD_NAME": "nats-0"}
STRATA_COMMAND = re.compile(r"^serve$")


def nats_config_ok(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(natsd.binary()), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **NATS_ENV},
        timeout=30,
    )


# -- NATS --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["single.conf", "cluster.conf", "leaf.conf"])
def test_nats_configs_are_accepted_by_nats_server(name):
    result = nats_config_ok(NATS_DIR / name)
    assert result.returncode == 0, result.stderr


def test_a_broken_nats_config_is_rejected(tmp_path):
    broken = tmp_path / "broken.conf"
    broken.write_text((NATS_DIR / "cluster.conf").read_text().replace("port: 6222", "port: six"))
    assert nats_config_ok(broken).returncode != 0


def test_the_loopback_rendering_is_a_valid_config(tmp_path):
    specs = plan(tmp_path, 3)
    path = tmp_path / "n1.conf"
    path.write_text(render_server(specs[0], [s.route_url for s in specs]))
    result = nats_config_ok(path)
    assert result.returncode == 0, result.stderr


def test_a_killed_member_rejoins_and_the_cluster_is_ready_again(tmp_path):
    with LocalCluster(tmp_path, size=3) as cluster:
        cluster.kill_server("n2")
        assert "n2" not in cluster.processes
        cluster.start_server("n2")
        cluster.wait_ready(30)
        assert cluster.problems() == []


def test_stream_replicas_setting():
    assert stream_replicas({}) == 1
    assert stream_replicas({"STRATA_STREAM_REPLICAS": "3"}) == 3
    for bad in ("0", "6", "three", "-1"):
        with pytest.raises(ValueError, match="STRATA_STREAM_REPLICAS"):
            stream_replicas({"STRATA_STREAM_REPLICAS": bad})


# -- docker-compose.yml ------------------------------------------------------------------------------
def test_compose_matches_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    resources = pytest.importorskip(
        "check_jsonschema.builtin_schemas.vendor", reason="check-jsonschema (PyPI) vendors the compose-spec schema"
    )
    from importlib.resources import files

    schema = json.loads((files(resources) / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [e.message for e in validator.iter_errors(COMPOSE)] == []
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["api-gateway"]["helthcheck"] = broken["services"]["api-gateway"].pop(
        "healthcheck"
    )  # a typo is caught
    assert list(validator.iter_errors(broken))


def strata_services() -> dict[str, dict]:
    """Compose services that run a Strata service (command `serve NAME`), by service name."""
    return {name: spec for name, spec in COMPOSE["services"].items() if (spec.get("command") or [""])[0] == "serve"}


def test_compose_runs_every_strata_service_and_two_cpu_workers():
    served = {spec["command"][1] for spec in strata_services().values()}
    assert served == set(SERVICES)
    cpu_workers = [
        n for n, s in strata_services().items() if s["command"][1] == "inference-worker" and not s.get("profiles")
    ]
    assert len(cpu_workers) == 2


def test_every_compose_service_has_a_health_check_and_a_restart_policy():
    for name, spec in COMPOSE["services"].items():
        assert spec.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert spec.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name} has no restart policy"


def test_strata_health_checks_and_ports_use_the_default_ports():
    for name, spec in strata_services().items():
        port = DEFAULT_PORTS[spec["command"][1]]
        assert f"http://127.0.0.1:{port}/healthz" in " ".join(spec["healthcheck"]["test"]), name
        for mapping in spec.get("ports", []):
            assert str(mapping).endswith(f":{port}"), f"{name} publishes {mapping}, its port is {port}"


def test_nodes_pair_an_agent_and_a_worker_on_one_node_id():
    by_node: dict[str, set[str]] = {}
    for spec in strata_services().values():
        env = spec["environment"]
        if node := env.get("STRATA_NODE_ID"):
            role = "agent" if spec["command"][1] == "hardware-inventory" else spec["command"][1]
            by_node.setdefault(node, set()).add(role)
            if role == "agent":
                assert env["STRATA_INVENTORY_ROLES"] == "agent"
    assert by_node and all(roles == {"agent", "inference-worker"} for roles in by_node.values()), by_node
    registry = [
        s
        for s in strata_services().values()
        if s["command"][1] == "hardware-inventory" and "STRATA_NODE_ID" not in s["environment"]
    ]
    assert [s["environment"]["STRATA_INVENTORY_ROLES"] for s in registry] == ["registry"]


def test_nats_cluster_routes_resolve_to_compose_services_with_three_replicas():
    routes = re.findall(r"nats-route://([\w-]+):(\d+)", (NATS_DIR / "cluster.conf").read_text())
    nats_services = {n for n, s in COMPOSE["services"].items() if "cluster.conf" in " ".join(s.get("command", []))}
    assert {host for host, _ in routes} == nats_services and len(nats_services) == 3
    assert {
        s["environment"]["NATS_SERVER_NAME"] for n, s in COMPOSE["services"].items() if n in nats_services
    } == nats_services
    for spec in strata_services().values():
        env = spec["environment"]
        assert env["STRATA_STREAM_REPLICAS"] == "3"
        host = re.search(r"nats://(?:[^@/]+@)?([\w-]+):", env["STRATA_NATS_URL"]).group(1)
        assert host in nats_services
        assert set(spec["depends_on"]) == nats_services


def test_named_volumes_are_declared_and_bind_mounts_exist():
    declared = set(COMPOSE.get("volumes") or {})
    missing_elsewhere = []
    for name, spec in COMPOSE["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                path = ROOT / source
                if source.startswith(("./infra/prometheus", "./infra/grafana")) and not path.exists():
                    missing_elsewhere.append(source)  # written by the monitoring work, not this file's owner
                    continue
                assert path.exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses volume {source!r}, not declared under volumes:"
    used = {v.split(":", 1)[0] for s in COMPOSE["services"].values() for v in s.get("volumes", [])}
    assert declared <= used, f"declared but unused: {declared - used}"
    if missing_elsewhere:
        pytest.skip(f"monitoring files not in the repository yet: {', '.join(sorted(set(missing_elsewhere)))}")


def test_the_gpu_profile_reserves_nvidia_devices_and_uses_the_cuda_image():
    gpu = {n: s for n, s in COMPOSE["services"].items() if "gpu" in s.get("profiles", [])}
    assert {s["command"][1] for s in gpu.values()} == {"hardware-inventory", "inference-worker"}
    for name, spec in gpu.items():
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert spec["build"]["target"] == "worker-cuda", name


def test_dockerfile_targets_named_by_compose_exist():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM \S+ AS ([\w-]+)", dockerfile, re.M))
    for name, spec in COMPOSE["services"].items():
        if "build" in spec:
            assert spec["build"]["target"] in targets, name
            assert (ROOT / spec["build"]["dockerfile"]).exists()


def test_the_cuda_image_keeps_its_torch():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "worker_requirements", ROOT / "infra" / "docker" / "worker_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reqs = module.requirements(ROOT / "pyproject.toml")
    assert reqs and not any(r.lower().startswith(("torch", "triton")) for r in reqs)
    assert any(r.startswith("safetensors") for r in reqs)


# -- Kubernetes ---------------------------------------------------------------------------------------
def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [(str(path.relative_to(ROOT)), doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def workloads() -> list[tuple[str, dict]]:
    return [(f, d) for f, d in manifests() if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def test_manifests_match_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (PyPI) bundles the schemas"
    )
    for _path, doc in manifests():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    broken = copy.deepcopy(workloads()[0][1])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def test_kustomizations_list_every_manifest():
    for kustomization in K8S_DIR.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text())["resources"]
        here = {p.name for p in kustomization.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert here == {r for r in listed if r.endswith(".yaml")}, kustomization
        for resource in listed:
            assert (kustomization.parent / resource).exists(), resource


def test_selectors_match_their_pod_labels():
    for path, doc in workloads():
        selector = doc["spec"]["selector"]["matchLabels"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{path} {doc['metadata']['name']}"
    pods = [d["spec"]["template"]["metadata"]["labels"] for _, d in workloads()]
    for path, doc in manifests():
        if doc["kind"] == "Service":
            assert any(doc["spec"]["selector"].items() <= labels.items() for labels in pods), f"{path}: selects no pod"


def test_every_strata_service_runs_with_healthz_probes_on_its_port():
    served = set()
    for path, doc in workloads():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if container.get("args", [""])[0] != "serve":
                continue
            service = container["args"][1]
            served.add(service)
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["http"] == DEFAULT_PORTS[service], f"{path}: {service}"
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] == "/healthz" and ports.get(get["port"], get["port"]) == DEFAULT_PORTS[service], (
                    f"{path}: {service} {probe}"
                )
            env = {e["name"] for e in container.get("env", [])}
            assert "STRATA_NATS_URL" in env, f"{path}: {service} reads the NATS URL from the strata-nats Secret"
    assert served == set(SERVICES)


def test_services_target_named_container_ports():
    for path, doc in manifests():
        if doc["kind"] != "Service":
            continue
        pods = [
            d
            for _, d in workloads()
            if doc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        names = {p["name"] for d in pods for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in doc["spec"]["ports"]:
            assert port["targetPort"] in names, f"{path}: {doc['metadata']['name']} -> {port['targetPort']}"


def test_gpu_worker_requests_a_gpu_and_pairs_with_an_agent_by_node_name():
    gpu = {d["metadata"]["name"]: d for p, d in workloads() if "/gpu/" in p}
    worker = gpu["inference-worker-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for _, doc in workloads():
        if doc["kind"] == "DaemonSet":
            env = {e["name"]: e for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["STRATA_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_the_nats_statefulset_config_is_valid_and_routes_to_its_pods(tmp_path):
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in manifests()}
    config = docs[("ConfigMap", "nats-config")]["data"]["nats.conf"]
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "auth.conf").write_text(docs[("Secret", "nats-auth")]["stringData"]["auth.conf"])
    (tmp_path / "nats.conf").write_text(config)
    result = nats_config_ok(tmp_path / "nats.conf")
    assert result.returncode == 0, result.stderr
    sts = docs[("StatefulSet", "nats")]
    headless = docs[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    expected = {f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}" for i in range(sts["spec"]["replicas"])}
    assert set(re.findall(r"nats-route://([\w.-]+):6222", config)) == expected
    assert docs[("ConfigMap", "strata-config")]["data"]["STRATA_STREAM_REPLICAS"] == str(sts["spec"]["replicas"])
