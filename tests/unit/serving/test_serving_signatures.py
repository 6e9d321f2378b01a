"""Serving loads only versions the trainer signed: anything else is refused before its code
can run, the old version keeps serving, and /status says why in plain words."""

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest
from refused_models import REFUSED_KINDS
from serving_helpers import ONE_IMAGE_BODY, post_json, wait_until


def test_signed_version_is_served(registry, make_app, tmp_path):
    name = registry.new_model("good-a")
    registry.point(name, 1)
    app = make_app(name)
    wait_until(lambda: app.watcher.status()["version"] == "1", what="version 1 served")
    assert app.watcher.status()["last_error"] is None
    # What was verified is what was loaded: the signature and provenance sit beside it.
    served = Path(app.watcher.current.path)
    assert {"MLmodel", "model.sig", "provenance.json"} <= set(os.listdir(served))
    assert json.loads((served / "provenance.json").read_text())["registered_model"] == name


@pytest.mark.parametrize("kind", sorted(REFUSED_KINDS))
def test_version_not_signed_by_the_trainer_is_refused_and_never_runs(registry, make_app, tmp_path, kind):
    name = registry.new_model("good-a", kind)
    registry.point(name, 1)
    app = make_app(name)
    wait_until(lambda: app.watcher.status()["version"] == "1", what="version 1 served")

    registry.point(name, 2)
    st = wait_until(lambda: (s := app.watcher.status())["failed_attempts"] >= 1 and s, what="refusal")
    assert st["version"] == "1" and st["alias_version"] == "2"
    assert st["last_error"] == f"version 2 refused: {REFUSED_KINDS[kind]}"
    answer = asyncio.run(post_json(app, ONE_IMAGE_BODY))
    assert answer.status == 200 and answer.version == "1"
    # Its code never ran: not at load, not at unpickling, not as a loader module.
    assert not registry.marker.exists()
    # And it is not kept: a retry (e.g. after `make sign`) downloads it afresh.
    cached = [p for p in os.listdir(tmp_path / "cache" / name) if p.startswith("v2-")]
    assert cached == []


def test_cached_version_is_verified_again(registry, make_app, tmp_path):
    """A worker that restarts finds versions in the cache; they are verified like downloads.
    (Without a warm start, so that the alias names the altered copy; the warm start's own
    refusal is in test_serving_rollout.py.)"""
    cache = tmp_path / "cache"
    name = registry.new_model("good-a")
    registry.point(name, 1)
    first = make_app(name, cache=cache)
    wait_until(lambda: first.watcher.status()["version"] == "1", what="version 1 served")
    path = Path(first.watcher.current.path)
    first.stop()

    # The cached code is changed to write the marker, as an intruder in the cache would.
    code = path / "standin_model.py"
    code.write_text(f"open({str(registry.marker)!r}, 'w').write('ran')\n" + code.read_text())
    second = make_app(name, cache=cache, warm_start=False)
    st = wait_until(lambda: (s := second.watcher.status())["failed_attempts"] >= 1 and s, what="refusal")
    assert st["state"] == "waiting"
    assert st["last_error"] == "version 1 refused: its files differ from the files that were signed"
    assert str(path) not in json.dumps(st)
    assert not registry.marker.exists()
    # The altered copy was dropped; the retry downloads the signed files and serves them.
    wait_until(lambda: second.watcher.status()["version"] == "1", timeout=30, what="version 1 served again")
    assert not registry.marker.exists()


def test_status_shows_no_internal_error_text(registry, make_app, tmp_path):
    name = registry.new_model("good-a", "altered-code")
    registry.point(name, 2)
    app = make_app(name)
    st = wait_until(lambda: (s := app.watcher.status())["failed_attempts"] >= 1 and s, what="refusal")
    assert st["waiting_for"] == (f"waiting for a version of {name}@production that works: "
                                 "version 2 refused: its files differ from the files that were signed")
    # Anyone who reaches the port reads /status: no path, no URI, no library message.
    shown = json.dumps({k: v for k, v in st.items() if k != "model_uri"})
    assert "/" not in shown
    for word in ("Traceback", "Error", "Exception", "sha256", "mismatch"):
        assert word not in shown


@pytest.mark.parametrize("kind", ["altered-code", "unsigned"])
def test_workers_refusing_the_same_version_at_once_give_the_same_reason(registry, tmp_path, kind):
    """Workers share the cache: one worker's refusal must not change what another sees."""
    from model_signatures import Refused
    from serving.model_store import ModelStore, resolve_alias

    name = registry.new_model("good-a", kind)
    registry.point(name, 2)
    ref = resolve_alias(registry.client, name, "production")
    stores = [ModelStore(str(tmp_path), registry.tracking_uri, registry.client, registry.public_key)
              for _ in range(4)]
    reasons, others = [], []
    barrier = threading.Barrier(len(stores))

    def prepare(store):
        barrier.wait()
        try:
            store.verify(ref, store.fetch(ref))
        except Refused as e:
            reasons.append(e.reason)
        except Exception as e:  # reported below
            others.append(e)

    threads = [threading.Thread(target=prepare, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not others
    assert reasons == [REFUSED_KINDS[kind]] * len(stores)
    assert os.listdir(tmp_path / name) == []  # nothing refused is left for the next worker
