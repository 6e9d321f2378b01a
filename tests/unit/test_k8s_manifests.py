"""What deploy/kubernetes promises, asserted on the YAML kustomize renders for each overlay:
hardened pods, probes, limits, the compose networks as NetworkPolicies, secrets only in
Secrets and only where compose gives them, pinned images, and the rollout machinery.

Needs kustomize (scripts/k8s-tools.sh installs it); without it every test here is skipped
with that reason.
"""

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS_DIR = ROOT / "deploy" / "kubernetes" / "overlays"
OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if p.is_dir())
WORKLOADS = {"Deployment", "StatefulSet", "Job", "CronJob"}
SECRET_NAMES = ("PASSWORD", "SECRET", "SIGNING_KEY", "ACCESS_KEY", "BACKUP_KEY", "TOKEN")
# compose's backend network: who may reach each store (the schema upgrade and the backup
# log in as the tracking server's own role and key).
STORE_CLIENTS = {
    "postgres": {"mlflow", "db-init", "schema-upgrade", "backup"},
    "minio": {"mlflow", "s3-init", "backup"},
}
STORE_PORTS = {"postgres": 5432, "minio": 9000}
Resource = dict[str, Any]


def render(overlay: str) -> list[Resource]:
    kustomize = shutil.which("kustomize")
    if kustomize is None:
        pytest.skip("kustomize is not installed; scripts/k8s-tools.sh installs it")
    result = subprocess.run([kustomize, "build", str(OVERLAYS_DIR / overlay)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kustomize build {overlay}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Resource]]:
    return request.param, render(request.param)


@pytest.fixture(scope="module")
def dev() -> list[Resource]:
    return render("dev")


@pytest.fixture(scope="module")
def prod() -> list[Resource]:
    return render("prod")


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(resource: Resource) -> Resource:
    if resource["kind"] == "CronJob":
        return resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return resource["spec"]["template"]["spec"]


def pod_name_label(resource: Resource) -> str:
    template = (resource["spec"]["jobTemplate"]["spec"]["template"] if resource["kind"] == "CronJob"
                else resource["spec"]["template"])
    return template["metadata"]["labels"]["app.kubernetes.io/name"]


def workloads(resources: list[Resource]) -> Iterator[Resource]:
    return (r for r in resources if r["kind"] in WORKLOADS)


def containers(resource: Resource) -> list[Resource]:
    spec = pod_spec(resource)
    return spec.get("initContainers", []) + spec["containers"]


def secret_refs(resource: Resource) -> set[str]:
    """The Secrets a workload's containers read."""
    names = set()
    for container in containers(resource):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    return names


def selected_names(selector: Resource) -> set[str] | None:
    """The app.kubernetes.io/name values a pod selector matches; None for every pod."""
    if not selector:
        return None
    names: set[str] = set()
    if "app.kubernetes.io/name" in selector.get("matchLabels", {}):
        names.add(selector["matchLabels"]["app.kubernetes.io/name"])
    for expression in selector.get("matchExpressions", []):
        assert expression["key"] == "app.kubernetes.io/name" and expression["operator"] == "In", expression
        names |= set(expression["values"])
    return names


def policies(resources: list[Resource]) -> list[Resource]:
    return [r for r in resources if r["kind"] == "NetworkPolicy"]


def test_every_pod_runs_as_non_root_with_the_runtime_default_seccomp_profile(
        rendered: tuple[str, list[Resource]]) -> None:
    overlay, resources = rendered
    for workload in workloads(resources):
        context = pod_spec(workload)["securityContext"]
        where = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] > 0, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod_spec(workload)["automountServiceAccountToken"] is False, where


def test_every_container_is_read_only_without_capabilities_and_bounded(rendered: tuple[str, list[Resource]]) -> None:
    overlay, resources = rendered
    for workload in workloads(resources):
        for container in containers(workload):
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context.get("privileged") is not True, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where}: {bound}"


def test_every_image_is_pinned_to_a_tag_other_than_latest(rendered: tuple[str, list[Resource]]) -> None:
    overlay, resources = rendered
    for workload in workloads(resources):
        for container in containers(workload):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (name and "/" not in tag and tag != "latest"), f"{overlay}: {image}"


def test_the_same_entry_points_as_compose(dev: list[Resource]) -> None:
    commands = {
        ("Deployment", "mlflow"): ["python", "-m", "tracking.start_server"],
        ("Job", "db-init"): ["python", "-m", "tracking.init_database"],
        ("Job", "s3-init"): ["python", "-m", "tracking.create_bucket"],
        ("Job", "mlflow-init"): ["python", "-m", "tracking.provision_users"],
        ("Deployment", "serving"): ["python", "-m", "serving"],
        ("Job", "trainer"): ["python", "-m", "trainer"],
    }
    for (kind, name), command in commands.items():
        assert pod_spec(find(dev, kind, name))["containers"][0]["command"] == command


def test_the_server_and_serving_have_probes_and_serving_is_ready_only_with_a_model(dev: list[Resource]) -> None:
    for name in ("mlflow", "serving"):
        container = pod_spec(find(dev, "Deployment", name))["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in container, f"{name}: {probe}"
    server = pod_spec(find(dev, "Deployment", "mlflow"))["containers"][0]
    assert server["readinessProbe"]["exec"]["command"] == ["python", "-m", "tracking.healthcheck"]
    serving = pod_spec(find(dev, "Deployment", "serving"))["containers"][0]
    readiness = " ".join(serving["readinessProbe"]["exec"]["command"])
    # /ping answers while waiting for the alias; readiness asks whether a model is served.
    assert "/status" in readiness and '== "serving"' in readiness


def test_rollouts_keep_serving_and_the_server_available(dev: list[Resource]) -> None:
    for name in ("mlflow", "serving"):
        deployment = find(dev, "Deployment", name)
        assert deployment["spec"]["replicas"] >= 2, name
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name
        budget = find(dev, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert budget["spec"]["minAvailable"] >= 1
    autoscaler = find(dev, "HorizontalPodAutoscaler", "serving")
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "serving"}
    assert 1 <= autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"]


def test_the_schema_upgrade_is_a_job_applied_before_the_server(dev: list[Resource]) -> None:
    # deploy.sh applies the "prepare" phase and waits for its Jobs before anything else.
    upgrade = find(dev, "Job", "schema-upgrade")
    assert upgrade["metadata"]["labels"]["mlops.stack/phase"] == "prepare"
    assert pod_spec(upgrade)["containers"][0]["command"] == ["python", "-m", "tracking.upgrade_schema"]
    assert "mlops.stack/phase" not in find(dev, "Deployment", "mlflow")["metadata"]["labels"]
    deploy_script = (ROOT / "deploy" / "kubernetes" / "deploy.sh").read_text()
    assert deploy_script.index("wait_job \"$job\"") < deploy_script.index("rollout status deployment/mlflow")


def test_no_secret_in_a_config_map_and_every_secret_from_a_secret(rendered: tuple[str, list[Resource]]) -> None:
    overlay, resources = rendered
    for config_map in (r for r in resources if r["kind"] == "ConfigMap"):
        for key in config_map.get("data", {}):
            assert not any(word in key for word in SECRET_NAMES), f"{overlay}: {config_map['metadata']['name']}: {key}"
    assert not [r for r in resources if r["kind"] == "Secret"], f"{overlay}: Secrets are created by hand, never shipped"
    for workload in workloads(resources):
        for container in containers(workload):
            for env in container.get("env", []):
                if any(word in env["name"] for word in SECRET_NAMES):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{overlay}: {container['name']}: {env['name']}"


def test_each_workload_holds_only_the_secrets_compose_gives_it(dev: list[Resource]) -> None:
    held = {pod_name_label(w): secret_refs(w) for w in workloads(dev)}
    assert held == {
        "postgres": {"mlops-postgres-superuser"},
        "db-init": {"mlops-postgres-superuser", "mlops-db-app", "mlops-db-optuna"},
        "minio": {"mlops-s3-root"},
        "s3-init": {"mlops-s3-root", "mlops-s3-app"},
        "schema-upgrade": {"mlops-db-app"},
        "mlflow": {"mlops-db-app", "mlops-mlflow-admin", "mlops-s3-app", "mlops-mlflow-server"},
        "mlflow-init": {"mlops-mlflow-admin", "mlops-trainer-account", "mlops-serving-account",
                        "mlops-monitoring-account", "mlops-prediction-log-account"},
        "trainer": {"mlops-trainer-account", "mlops-model-signing"},
        "serving": {"mlops-serving-account", "mlops-model-signing-public", "mlops-serving-metrics",
                    "mlops-prediction-log-account"},
        "backup": {"mlops-db-app", "mlops-s3-app"},
    }


def test_everything_is_denied_unless_a_policy_allows_it(rendered: tuple[str, list[Resource]]) -> None:
    overlay, resources = rendered
    deny = find(resources, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny and "egress" not in deny, overlay


def test_the_stores_take_connections_only_from_the_server_and_their_jobs(dev: list[Resource]) -> None:
    for store, clients in STORE_CLIENTS.items():
        admitting = [p for p in policies(dev) if selected_names(p["spec"]["podSelector"]) == {store}]
        sources = set()
        for policy in admitting:
            assert "Egress" in policy["spec"]["policyTypes"] and not policy["spec"].get("egress"), store
            for rule in policy["spec"].get("ingress", []):
                assert rule["ports"] == [{"protocol": "TCP", "port": STORE_PORTS[store]}], store
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, f"{store} admits more than pods of the stack: {peer}"
                    sources |= selected_names(peer["podSelector"]) or {"every pod"}
        assert sources == clients, store
        # And only those pods may send to it.
        senders = set()
        for policy in policies(dev):
            for rule in policy["spec"].get("egress", []):
                if any(selected_names(peer.get("podSelector", {})) == {store} for peer in rule.get("to", [])):
                    senders |= selected_names(policy["spec"]["podSelector"]) or {"every pod"}
        assert senders == clients, store


def test_prod_reaches_the_external_stores_from_the_same_pods_only(prod: list[Resource]) -> None:
    assert not [r for r in prod if r["kind"] == "StatefulSet"]
    for store, policy_name in (("postgres", "postgres-clients"), ("minio", "s3-clients")):
        policy = find(prod, "NetworkPolicy", policy_name)["spec"]
        assert selected_names(policy["podSelector"]) == STORE_CLIENTS[store]
        assert all("ipBlock" in peer for rule in policy["egress"] for peer in rule["to"])
    db = next(r for r in prod if r["kind"] == "ConfigMap" and "POSTGRES_HOST" in r.get("data", {}))
    assert db["data"]["POSTGRES_HOST"] != "postgres"


def test_serving_and_the_trainer_reach_only_the_tracking_server_inside_the_cluster(dev: list[Resource]) -> None:
    for policy in policies(dev):
        names = selected_names(policy["spec"]["podSelector"])
        if names is None or not ({"serving", "trainer"} & names):
            continue
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert selected_names(peer["podSelector"]) == {"mlflow"}, policy["metadata"]["name"]
                if "ipBlock" in peer:
                    assert "10.0.0.0/8" in peer["ipBlock"]["except"], policy["metadata"]["name"]


def test_the_ingress_serves_both_hosts_over_tls_and_the_server_accepts_its_name(dev: list[Resource]) -> None:
    hosts = {}
    for name in ("mlflow", "serving"):
        ingress = find(dev, "Ingress", name)["spec"]
        (rule,) = ingress["rules"]
        assert rule["http"]["paths"][0]["backend"]["service"]["name"] == name
        assert rule["host"] in {h for tls in ingress["tls"] for h in tls["hosts"]}
        assert all(tls["secretName"] for tls in ingress["tls"])
        hosts[name] = rule["host"]
    server_settings = next(r for r in dev if r["kind"] == "ConfigMap" and "MLFLOW_PUBLIC_HOSTS" in r.get("data", {}))
    assert hosts["mlflow"] in server_settings["data"]["MLFLOW_PUBLIC_HOSTS"].split(",")
    # The model endpoint asks for a login; MLflow checks its own.
    annotations = find(dev, "Ingress", "serving")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/auth-type"] == "basic"
    assert "nginx.ingress.kubernetes.io/auth-type" not in find(dev, "Ingress", "mlflow")["metadata"]["annotations"]


def test_a_nightly_backup_of_both_databases_and_the_bucket(dev: list[Resource]) -> None:
    backup = find(dev, "CronJob", "backup")
    assert backup["spec"]["concurrencyPolicy"] == "Forbid" and backup["spec"]["schedule"]
    scripts = " ".join(" ".join(c["command"]) for c in containers(backup))
    assert "pg_dump" in scripts and "tracking.bucket_archive export" in scripts


def test_the_gpu_overlay_puts_training_on_a_gpu_node() -> None:
    spec = pod_spec(find(render("prod-gpu"), "Job", "trainer"))
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_multi_node_training_is_an_indexed_job_behind_a_headless_service() -> None:
    resources = render("prod-multinode")
    job = find(resources, "Job", "trainer-multinode")
    service = find(resources, "Service", "trainer-rendezvous")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] >= 2
    assert service["spec"]["clusterIP"] == "None"
    assert pod_spec(job)["subdomain"] == "trainer-rendezvous"
    command = pod_spec(job)["containers"][0]["command"]
    assert f"--nnodes={job['spec']['completions']}" in command
    assert "waiting for the trainer" in job["metadata"]["annotations"]["mlops.stack/status"]
    # Never started by a plain deploy: only on request, once the trainer supports it.
    assert job["metadata"]["labels"]["mlops.stack/phase"] == "train-multinode"
