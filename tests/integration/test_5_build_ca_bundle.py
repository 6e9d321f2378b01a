"""The CA bundle given to a build (BUILD_CA_BUNDLE, for TLS-inspecting proxies) is used by
pip and left in no image: no layer, build argument, label or history line holds it.

The stack's images are cached between runs, so their layers may have been built with any
bundle. The layer check therefore builds afresh, without cache, one pip install through the
images' own `pip-install` (docker/pip-install.sh, the path every Python image takes) with
a bundle that carries a certificate made for this test, and looks for it in every new layer.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import tarfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from stack import ROOT, Stack

# One pip install through the images' own script, the way the Dockerfile's stages run it.
DOCKERFILE = """\
ARG BASE
FROM ${BASE}
USER root
RUN --mount=type=secret,id=ca_bundle pip-install --no-deps --force-reinstall --no-cache-dir six
"""


def marker_certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"build bundle marker {uuid.uuid4()}")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def new_layers(image: str, base: str, workdir: Path) -> list[bytes]:
    """The contents of every layer `image` adds on top of `base`."""
    base_layers = len(json.loads(subprocess.run(["docker", "image", "inspect", base], capture_output=True,
                                                text=True, check=True).stdout)[0]["RootFS"]["Layers"])
    saved = workdir / "image.tar"
    subprocess.run(["docker", "save", "-o", str(saved), image], check=True)
    with tarfile.open(saved) as outer:
        layers = json.loads(outer.extractfile("manifest.json").read())[0]["Layers"]
        contents = []
        for layer in layers[base_layers:]:
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(layer).read())) as inner:
                contents += [inner.extractfile(m).read() for m in inner if m.isfile()]
    return contents


def test_a_pip_install_through_the_build_bundle_leaves_it_in_no_layer(stack: Stack, tmp_path: Path):
    base = f"{stack.env.get('IMAGE_PREFIX', 'mlops')}/mlflow:{stack.env.get('IMAGE_TAG', 'dev')}"
    marker = marker_certificate()
    body = b"".join(marker.splitlines()[1:-1])
    # The machine's own bundle as well, so pip still reaches the index through a proxy.
    host = Path(os.environ.get("BUILD_CA_BUNDLE") or "/etc/ssl/certs/ca-certificates.crt")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((host.read_bytes() if host.exists() else b"") + marker)
    image = f"mlops-test/build-bundle:{uuid.uuid4().hex[:8]}"
    context = tmp_path / "context"
    context.mkdir()
    build = subprocess.run(["docker", "build", "--no-cache", "--build-arg", f"BASE={base}",
                            "--secret", f"id=ca_bundle,src={bundle}", "-t", image, "-f", "-", str(context)],
                           input=DOCKERFILE, capture_output=True, text=True, env={**os.environ, "DOCKER_BUILDKIT": "1"},
                           cwd=ROOT, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    try:
        contents = new_layers(image, base, tmp_path)
        assert any(b"Utilities for writing code that runs on Python 2 and 3" in c for c in contents), \
            "pip installed six into the new layer, through the bundle"
        needles = (body[:64], base64.b64decode(body)[:48])
        leaked = [i for i, c in enumerate(contents) if any(needle in c for needle in needles)]
        assert not leaked, f"{len(leaked)} files of the new layer hold the build's CA bundle"
        history = subprocess.run(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
                                 capture_output=True, text=True, check=True).stdout
        config = subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config}}", image],
                                capture_output=True, text=True, check=True).stdout
        for where, text in (("history", history), ("config (env, labels, arguments)", config)):
            assert body[:64].decode() not in text and "BEGIN CERTIFICATE" not in text, f"the bundle is in the {where}"
    finally:
        subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True)


def test_the_stacks_images_carry_no_certificate_in_history_or_config(stack: Stack):
    for service in ("mlflow", "trainer", "serving"):
        image = f"{stack.env.get('IMAGE_PREFIX', 'mlops')}/{service}:{stack.env.get('IMAGE_TAG', 'dev')}"
        history = subprocess.run(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
                                 capture_output=True, text=True, check=True).stdout
        config = subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config}}", image],
                                capture_output=True, text=True, check=True).stdout
        assert "BEGIN CERTIFICATE" not in history + config, image
        assert "PIP_CERT" not in config and "REQUESTS_CA_BUNDLE" not in config, image
        assert "ca_bundle" not in json.dumps(json.loads(config).get("Labels") or {}), image
