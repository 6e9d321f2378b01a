"""Secure by default: who may do what on the tracking server, what the host can reach, what
images and processes carry; then the opt-in TLS proxy (compose.tls.yaml) in front of it all."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from stack import ROOT, Stack, free_port

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
# Settings in .env whose values must never leave it (make env generates them).
SECRET_NAME = re.compile(r"(PASSWORD|SECRET_KEY|ACCESS_KEY)$")


def running_services(compose) -> dict[str, dict]:
    """`docker compose ps` of the running containers, by service name; `compose` is
    Stack.compose or TlsProxy.compose."""
    out = compose("ps", "--format", "json").stdout
    # Compose prints one JSON object per line (2.21+) or one JSON list (older).
    rows = json.loads(out) if out.lstrip().startswith("[") else [json.loads(line) for line in out.splitlines() if line]
    return {row["Service"]: row for row in rows}


def service_processes(container: str) -> list[tuple[int, int, str]]:
    """(pid, uid, command) of the container's PID 1 and everything it started, PID 1 first.
    Processes that `docker exec` adds (healthchecks, our own probes) are not the service's
    and are left out: their parent is the runtime, not PID 1."""
    init = int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", container],
                              capture_output=True, text=True, check=True).stdout)
    # docker top needs the pid column to map host processes to the container.
    out = subprocess.run(["docker", "top", container, "-eo", "pid,ppid,uid,comm"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()[1:] if line.strip()]
    children: dict[int, list[tuple[int, int, str]]] = {}
    by_pid = {}
    for pid, ppid, uid, comm in rows:
        by_pid[int(pid)] = (int(pid), int(uid), comm.strip())
        children.setdefault(int(ppid), []).append(by_pid[int(pid)])
    tree, todo = [], [by_pid[init]]
    while todo:
        process = todo.pop(0)
        tree.append(process)
        todo += children.get(process[0], [])
    return tree


# --- the tracking server's own authentication and authorization ----------------------------

def test_anonymous_api_call_is_refused(stack: Stack):
    assert requests.get(stack.mlflow_url + SEARCH, timeout=10).status_code == 401


def test_wrong_password_is_refused(stack: Stack):
    user, _ = stack.credentials("admin")
    response = requests.get(stack.mlflow_url + SEARCH, auth=(user, "not-the-password"), timeout=10)
    assert response.status_code == 401
    # And the right one works, so the 401 above is about the password, not the route.
    assert requests.get(stack.mlflow_url + SEARCH, auth=stack.credentials("admin"), timeout=10).status_code == 200


def test_trainer_cannot_administer_users(stack: Stack):
    """Creating users, making oneself admin and deleting users are admin-only in MLflow's auth
    app (user creation is also open to workspace admins, which the trainer is not)."""
    trainer = stack.credentials("trainer")
    api = stack.mlflow_url + "/api/2.0/mlflow/users"
    create = requests.post(f"{api}/create", auth=trainer, timeout=10,
                           json={"username": "intruder", "password": secrets.token_urlsafe(16)})
    assert create.status_code == 403, create.text
    promote = requests.patch(f"{api}/update-admin", auth=trainer, timeout=10,
                             json={"username": trainer[0], "is_admin": True})
    assert promote.status_code == 403, promote.text
    delete = requests.delete(f"{api}/delete", auth=trainer, timeout=10,
                             json={"username": stack.credentials("serving")[0]})
    assert delete.status_code == 403, delete.text
    # The admin reaches the same API: the 403s are about rights, not a wrong path.
    admin = requests.get(f"{api}/get", params={"username": trainer[0]}, auth=stack.credentials("admin"), timeout=10)
    assert admin.status_code == 200 and admin.json()["user"]["is_admin"] is False


def test_serving_user_reads_but_cannot_write(stack: Stack, admin_client: MlflowClient):
    experiment = admin_client.get_experiment_by_name(stack.env["EXPERIMENT_NAME"])
    serving = stack.credentials("serving")
    read = requests.get(stack.mlflow_url + "/api/2.0/mlflow/experiments/get",
                        params={"experiment_id": experiment.experiment_id}, auth=serving, timeout=10)
    assert read.status_code == 200, read.text
    write = requests.post(stack.mlflow_url + "/api/2.0/mlflow/runs/create", auth=serving, timeout=10,
                          json={"experiment_id": experiment.experiment_id})
    assert write.status_code == 403, write.text


def test_foreign_host_header_is_refused(stack: Stack):
    """DNS rebinding: a page on evil.example that resolves to this machine must not reach the
    API, even with valid credentials."""
    for host in ("evil.example", f"evil.example:{stack.env['MLFLOW_PORT']}"):
        response = requests.get(stack.mlflow_url + SEARCH, headers={"Host": host},
                                auth=stack.credentials("admin"), timeout=10)
        assert response.status_code == 403, f"Host: {host} -> {response.status_code}"


# --- what the host can reach -----------------------------------------------------------------

def test_only_mlflow_and_the_model_gateway_publish_ports_and_only_on_loopback(stack: Stack):
    services = running_services(stack.compose)
    assert {"postgres", "minio", "mlflow", "serving", "gateway"} <= services.keys(), services.keys()
    published = {name: [p for p in row.get("Publishers") or [] if p.get("PublishedPort")]
                 for name, row in services.items()}
    assert published["postgres"] == [] and published["minio"] == [] and published["serving"] == [], published
    for name in ("mlflow", "gateway"):
        assert published[name] and all(p["URL"] == "127.0.0.1" for p in published[name]), published[name]
    for service, port in (("postgres", 5432), ("minio", 9000), ("minio", 9001)):
        result = stack.compose("port", service, str(port), check=False)
        assert result.returncode != 0 or result.stdout.strip() in ("", ":0"), result.stdout


@pytest.mark.parametrize("port", [5432, 9000, 9001])
def test_database_and_object_store_ports_are_closed_on_the_host(stack: Stack, port: int):
    with socket.socket() as sock:
        sock.settimeout(2)
        connected = sock.connect_ex(("127.0.0.1", port)) == 0
    assert not connected, (f"something listens on 127.0.0.1:{port}; the stack publishes no such port "
                           "(see the test above), so check `docker ps` and `ss -ltnp` on this machine")


# --- images and processes --------------------------------------------------------------------

def test_no_secret_from_env_is_baked_into_any_image(stack: Stack):
    secret_values = {name: value for name, value in stack.env.items()
                     if SECRET_NAME.search(name) and len(value) >= 8}
    assert {"POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "S3_SECRET_KEY"} <= secret_values.keys()
    files = [arg for f in stack.compose_files + [ROOT / "compose.tls.yaml"] for arg in ("-f", str(f))]
    images = subprocess.run(
        ["docker", "compose", "--project-name", stack.project, "--env-file", str(stack.env_file),
         *files, "--profile", "train", "config", "--images"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    present = [image for image in sorted(set(images))
               if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0]
    assert len(present) >= 4, f"expected the stack's images to exist locally, found {present}"
    for image in present:
        history = subprocess.run(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
                                 capture_output=True, text=True, check=True).stdout
        config = json.loads(subprocess.run(["docker", "image", "inspect", image],
                                           capture_output=True, text=True, check=True).stdout)[0]["Config"]
        metadata = json.dumps({key: config.get(key) for key in ("Env", "Labels", "Cmd", "Entrypoint")})
        for name, value in secret_values.items():
            assert value not in history, f"{name} appears in the build history of {image}"
            assert value not in metadata, f"{name} appears in the metadata of {image}"


def test_every_service_process_runs_as_non_root(stack: Stack):
    """Every process of every running service, tini and the server it starts included, has a
    uid other than 0; for our own images (mlflow, serving, and the proxy below) without any
    exception. Two exceptions are asserted as they are rather than hidden:
    - the offline Postgres stand-in keeps dumb-init as root PID 1: its entrypoint must start as
      root to hand the data directory to postgres, then drops to uid 999 with setpriv; the init
      above it only reaps and forwards signals. The server processes are checked as usual.
    - the upstream MinIO image (used only when a registry is reachable) has no USER and runs
      as root; it is reachable only on the internal backend network, with no host port and
      no-new-privileges. The offline S3 stand-in runs as uid 1000."""
    services = running_services(stack.compose)
    for name, row in sorted(services.items()):
        processes = service_processes(row["ID"])
        assert len(processes) >= 1, f"{name}: no processes"
        if name == "minio" and not stack.offline:
            host_config = json.loads(subprocess.run(["docker", "inspect", row["ID"]], capture_output=True,
                                                    text=True, check=True).stdout)[0]["HostConfig"]
            assert "no-new-privileges:true" in host_config["SecurityOpt"]
            assert not any(p.get("PublishedPort") for p in row.get("Publishers") or [])
            continue
        if name == "postgres" and stack.offline and processes[0][2] == "dumb-init":
            processes = processes[1:]
        as_root = [(pid, comm) for pid, uid, comm in processes if uid == 0]
        assert processes and not as_root, f"{name} runs {as_root} as root (all: {processes})"
        if name in ("mlflow", "serving", "gateway"):
            assert processes[0][2] == "tini" and len(processes) >= 2, processes


def test_our_services_drop_capabilities_and_have_read_only_roots(stack: Stack):
    for name, row in running_services(stack.compose).items():
        if name not in ("mlflow", "serving", "gateway", "proxy"):
            continue
        host_config = json.loads(subprocess.run(["docker", "inspect", row["ID"]], capture_output=True,
                                                text=True, check=True).stdout)[0]["HostConfig"]
        assert host_config["CapDrop"] == ["ALL"], name
        assert host_config["ReadonlyRootfs"] is True, name
        assert "no-new-privileges:true" in host_config["SecurityOpt"], name


# --- the opt-in TLS proxy --------------------------------------------------------------------

# Small limits, so that a short burst reaches them: 1 failed login a minute after a burst of 5.
FAILED_LOGIN_BURST = 5


class TlsProxy:
    """The proxy service of compose.tls.yaml, added to the shared stack without touching the
    other services (--no-deps), with its own ports. Its .env is the stack's without any
    SERVING_AUTH line (one written before that setting existed), so whether the model
    endpoint asks for credentials is decided by the defaults alone."""

    def __init__(self, stack: Stack, workdir: Path):
        self.stack = stack
        self.workdir = workdir
        self.env_file = workdir / ".env"
        self.env_file.write_text("".join(line + "\n" for line in stack.env_file.read_text().splitlines()
                                         if not line.startswith("SERVING_AUTH=")))
        self.env_file.chmod(0o600)
        self.client = (stack.env["SERVING_CLIENT_USERNAME"], stack.env["SERVING_CLIENT_PASSWORD"])
        self.env = dict(os.environ,
                        MLFLOW_TLS_PORT=str(free_port()),
                        SERVING_TLS_PORT=str(free_port()),
                        PROXY_FAILED_LOGINS_PER_MINUTE="1",
                        PROXY_FAILED_LOGIN_BURST=str(FAILED_LOGIN_BURST))
        for name in ("SERVING_AUTH", "SERVING_CLIENT_USERNAME", "SERVING_CLIENT_PASSWORD"):
            self.env.pop(name, None)
        if stack.offline:
            # Without a registry the proxy is built on the same local Debian image as ours.
            self.env["BASE_IMAGE"] = stack.env.get("OFFLINE_BASE_IMAGE", "mlops-local/debian:trixie")
        self.cert = workdir / "proxy.crt"

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", "--project-name", self.stack.project, "--env-file", str(self.env_file)]
        for f in self.stack.compose_files + [ROOT / "compose.tls.yaml"]:
            cmd += ["-f", str(f)]
        result = subprocess.run(cmd + list(args), capture_output=True, text=True, env=self.env, cwd=ROOT,
                                timeout=900)
        if check and result.returncode != 0:
            raise AssertionError(f"`docker compose {' '.join(args)}` (with compose.tls.yaml) exited "
                                 f"{result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def start(self) -> None:
        self.compose("build", "proxy")
        try:
            self.compose("up", "-d", "--no-deps", "--wait", "--wait-timeout", "120", "proxy")
        except AssertionError:
            print(self.compose("logs", "--no-color", "proxy", check=False).stdout[-5000:])
            raise
        # The self-signed certificate the proxy generated: what a teammate would be handed.
        self.cert.write_text(self.compose("exec", "-T", "proxy", "cat", "/certs/self-signed.crt").stdout)

    def stop(self) -> None:
        self.compose("rm", "--stop", "--force", "proxy", check=False)
        subprocess.run(["docker", "volume", "rm", "-f", f"{self.stack.project}_proxy-certs"], capture_output=True)

    @property
    def mlflow_url(self) -> str:
        return f"https://localhost:{self.env['MLFLOW_TLS_PORT']}"

    @property
    def serving_url(self) -> str:
        return f"https://localhost:{self.env['SERVING_TLS_PORT']}"

    def handshake(self, port_name: str, lowest: ssl.TLSVersion, highest: ssl.TLSVersion, ciphers: str) -> str:
        """The TLS version a client limited to these protocols and TLS 1.2 ciphers gets, or
        the ssl.SSLError the server's refusal raises. Security level 0 lets this client offer
        what its OpenSSL would otherwise keep to itself, so a refusal comes from the proxy."""
        context = ssl.create_default_context(cafile=str(self.cert))
        context.minimum_version, context.maximum_version = lowest, highest
        context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", int(self.env[port_name])), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.version()


@pytest.fixture(scope="module")
def tls_proxy(stack: Stack, tmp_path_factory):
    proxy = TlsProxy(stack, tmp_path_factory.mktemp("tls"))
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()


def test_tls_proxy_serves_the_tracking_api_with_its_certificate(stack: Stack, tls_proxy: TlsProxy):
    admin = stack.credentials("admin")
    for url in (tls_proxy.mlflow_url, tls_proxy.mlflow_url.replace("localhost", "127.0.0.1")):
        response = requests.get(url + SEARCH, auth=admin, verify=str(tls_proxy.cert), timeout=10)
        assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:200]}"
    # MLflow's own checks still apply behind the proxy: credentials, and the Host header.
    assert requests.get(tls_proxy.mlflow_url + SEARCH, verify=str(tls_proxy.cert), timeout=10).status_code == 401
    foreign = requests.get(tls_proxy.mlflow_url + SEARCH, auth=admin, headers={"Host": "evil.example"},
                           verify=str(tls_proxy.cert), timeout=10)
    assert foreign.status_code == 403
    # Plain http on the TLS port is sent to https instead of being answered in clear text.
    plain = requests.get(tls_proxy.mlflow_url.replace("https", "http") + "/", allow_redirects=False, timeout=10)
    assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")


def holder(stack: Stack, admin_client: MlflowClient) -> str:
    """The version holding the alias now (earlier tests may have moved it)."""
    return admin_client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]).version


def test_mlflow_client_works_over_tls(stack: Stack, trained, admin_client: MlflowClient, tls_proxy: TlsProxy,
                                      monkeypatch, tmp_path):
    """What a teammate configures (docker/proxy/README.md): the https URL, the certificate,
    their MLflow login, and artifact transfers through the server rather than straight from
    S3, which only the tracking server can reach."""
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(tls_proxy.cert))
    # A teammate who works on the experiment (serving's account may not read runs).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.credentials("trainer")[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.credentials("trainer")[1])
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    expected = holder(stack, admin_client)
    client = MlflowClient(tls_proxy.mlflow_url)
    version = client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"])
    assert version.version == expected
    # Artifacts stream through nginx (no buffering to its small tmpfs) and arrive whole.
    local = Path(client.download_artifacts(version.run_id, "", str(tmp_path)))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_size > 0 for p in files), files


def test_tls_proxy_requires_basic_auth_for_invocations(stack: Stack, trained, admin_client: MlflowClient,
                                                       tls_proxy: TlsProxy):
    served = holder(stack, admin_client)
    stack.wait_served_version(served, timeout=180)
    url = tls_proxy.serving_url + "/invocations"
    body = {"inputs": [[[[0.0] * 28] * 28]]}
    verify = str(tls_proxy.cert)
    assert requests.post(url, json=body, verify=verify, timeout=30).status_code == 401
    wrong = requests.post(url, json=body, auth=(tls_proxy.client[0], "wrong"), verify=verify, timeout=30)
    assert wrong.status_code == 401
    ok = requests.post(url, json=body, auth=tls_proxy.client, verify=verify, timeout=30)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["predictions"][0]) == 10
    assert ok.headers["X-Model-Version"] == served


def test_model_endpoint_asks_for_credentials_by_default(stack: Stack, tls_proxy: TlsProxy):
    assert "SERVING_AUTH=" not in tls_proxy.env_file.read_text() and "SERVING_AUTH" not in tls_proxy.env
    for path in ("/invocations", "/ping", "/version"):
        response = requests.get(tls_proxy.serving_url + path, verify=str(tls_proxy.cert), timeout=10)
        assert response.status_code == 401, f"{path}: {response.status_code}"
        assert response.headers["WWW-Authenticate"].startswith("Basic "), response.headers


def test_tls_proxy_streams_chunked_model_requests(stack: Stack, trained, admin_client: MlflowClient,
                                                  tls_proxy: TlsProxy):
    """A body of unknown length reaches the model through the proxy piece by piece."""
    stack.wait_served_version(holder(stack, admin_client), timeout=180)
    body = json.dumps({"inputs": [[[[0.0] * 28] * 28]] * 4}).encode()
    pieces = (body[i:i + 4096] for i in range(0, len(body), 4096))
    response = requests.post(tls_proxy.serving_url + "/invocations", data=pieces, auth=tls_proxy.client,
                             headers={"Content-Type": "application/json"}, verify=str(tls_proxy.cert), timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 4


def test_tls_proxy_sends_hsts_on_both_ports(stack: Stack, tls_proxy: TlsProxy):
    verify = str(tls_proxy.cert)
    answers = {
        "tracking, public": requests.get(tls_proxy.mlflow_url + "/health", verify=verify, timeout=10),
        "tracking, API": requests.get(tls_proxy.mlflow_url + SEARCH, auth=stack.credentials("admin"),
                                      verify=verify, timeout=10),
        "model endpoint, no login": requests.get(tls_proxy.serving_url + "/ping", verify=verify, timeout=10),
        "model endpoint, too large": requests.post(tls_proxy.serving_url + "/invocations", verify=verify,
                                                   timeout=30,
                                                   data=b"0" * (int(stack.env["SERVING_MAX_BODY_BYTES"]) + 1)),
    }
    assert [response.status_code for response in answers.values()] == [200, 200, 401, 413]
    for what, response in answers.items():
        hsts = response.headers.get("Strict-Transport-Security", "")
        max_age = re.fullmatch(r"max-age=(\d+)", hsts)
        assert max_age and int(max_age.group(1)) >= 86400, f"{what}: Strict-Transport-Security {hsts!r}"


@pytest.mark.parametrize("port_name", ["MLFLOW_TLS_PORT", "SERVING_TLS_PORT"])
def test_tls_proxy_refuses_old_protocols_and_weak_ciphers(tls_proxy: TlsProxy, port_name: str):
    # The same kind of client gets in with TLS 1.2 and a modern cipher, so the refusals below
    # are about what it offers.
    assert tls_proxy.handshake(port_name, ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_2, "DEFAULT") == "TLSv1.2"
    assert tls_proxy.handshake(port_name, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2,
                               "ECDHE-ECDSA-AES128-GCM-SHA256") == "TLSv1.2"
    refused = {
        "TLS 1.0 and 1.1": (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, "DEFAULT"),
        # CBC with SHA-1 or SHA-2 MACs, and static RSA key exchange: in OpenSSL's HIGH, not in Mozilla's list.
        "weak TLS 1.2 ciphers": (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2,
                                 "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:"
                                 "ECDHE-ECDSA-AES256-SHA384:AES128-SHA:AES256-GCM-SHA384"),
    }
    for what, (lowest, highest, ciphers) in refused.items():
        with pytest.raises(ssl.SSLError) as refusal:
            tls_proxy.handshake(port_name, lowest, highest, ciphers)
        # An alert is the server saying no; anything else would be this client giving up.
        assert "ALERT" in str(refusal.value.reason), f"{what}: {refusal.value}"


def test_tls_proxy_refuses_bodies_over_the_serving_limit(stack: Stack, trained, tls_proxy: TlsProxy):
    limit = int(stack.env.get("SERVING_MAX_BODY_BYTES", "8388608"))
    response = requests.post(tls_proxy.serving_url + "/invocations", data=b"0" * (limit + 1),
                             headers={"Content-Type": "application/json"}, auth=tls_proxy.client,
                             verify=str(tls_proxy.cert), timeout=60)
    assert response.status_code == 413
    assert response.json()["error_code"] == "REQUEST_TOO_LARGE"


def test_tls_proxy_runs_unprivileged_with_a_read_only_root(stack: Stack, tls_proxy: TlsProxy):
    row = running_services(tls_proxy.compose)["proxy"]
    processes = service_processes(row["ID"])
    assert processes[0][2] == "tini" and {comm for _, _, comm in processes} >= {"tini", "nginx"}, processes
    assert all(uid == 10001 for _, uid, _ in processes), processes
    host_config = json.loads(subprocess.run(["docker", "inspect", row["ID"]], capture_output=True,
                                            text=True, check=True).stdout)[0]["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True and host_config["CapDrop"] == ["ALL"]
    # The password file lives in tmpfs only and holds a hash, never the password itself.
    htpasswd = tls_proxy.compose("exec", "-T", "proxy", "cat", "/tmp/proxy/serving.htpasswd").stdout
    assert htpasswd.startswith(f"{tls_proxy.client[0]}:$6$") and tls_proxy.client[1] not in htpasswd
    mounts = tls_proxy.compose("exec", "-T", "proxy", "cat", "/proc/mounts").stdout
    assert any(line.split()[1] == "/tmp" and line.split()[0] == "tmpfs" for line in mounts.splitlines())


def test_failed_logins_are_limited_per_client_but_correct_logins_never_are(stack: Stack, trained,
                                                                          tls_proxy: TlsProxy):
    """Last in this module on purpose: afterwards this client's failed logins get 429 for
    minutes (the fixture allows 1 a minute). Every request here comes from the same address
    as the proxy sees it, the Docker network's gateway."""
    verify = str(tls_proxy.cert)
    admin = stack.credentials("admin")
    search = tls_proxy.mlflow_url + SEARCH

    def status(url: str, auth: tuple[str, str] | None = None) -> int:
        return requests.get(url, auth=auth, verify=verify, timeout=30).status_code

    # Neither requests without credentials (a browser before its login prompt) nor correct
    # logins count: three bursts' worth of each, and none is refused.
    many = 3 * FAILED_LOGIN_BURST
    assert [status(search) for _ in range(many)] == [401] * many
    assert [status(search, admin) for _ in range(many)] == [200] * many
    # Wrong passwords: 401 until this client's burst is spent (earlier tests here used at
    # most one of it), then 429; bounded, so a limit that never comes fails the test.
    wrong = (admin[0], "not-the-password")
    codes: list[int] = []
    while 429 not in codes and len(codes) < FAILED_LOGIN_BURST + 10:
        codes.append(status(search, wrong))
    assert 429 in codes, codes
    assert codes.index(429) >= FAILED_LOGIN_BURST - 1 and set(codes[:codes.index(429)]) == {401}, codes
    # The same client logging in correctly right after is served as always.
    assert status(search, admin) == 200
    # One allowance per client for both ports: the model endpoint's own login check is
    # limited too, and its right password still gets through.
    assert status(tls_proxy.serving_url + "/ping", (tls_proxy.client[0], "wrong")) == 429
    assert status(tls_proxy.serving_url + "/ping", tls_proxy.client) == 200
    assert status(search, admin) == 200
