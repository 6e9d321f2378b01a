"""Registered versions and the alias the serving container follows.

Every training run registers a new version tagged with its eval accuracy. The promotion
policy then decides whether the alias (production by default) moves to it, and the
comparison behind that decision is written on the version. Each move is appended to an
alias history kept as a JSON tag on the registered model, so `rollback` can hand the
alias back to the version that held it before.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stack_common.registry import alias_missing

HISTORY_LIMIT = 100
# What serving reads from the challenger version: how it is rolled out and to what share.
ROLLOUT_MODE_TAG = "rollout.mode"
ROLLOUT_PERCENT_TAG = "rollout.percent"
ROLLOUT_ENDED = "ended"  # the mode of a version whose rollout is over; serving routes nothing to it


class RegistryError(Exception):
    """A user-facing registry problem: unknown version, nothing to roll back to."""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def history_tag(alias: str) -> str:
    return f"alias_history.{alias}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def register(model_uri: str, name: str, run_id: str, tags: dict[str, Any]) -> ModelVersion:
    """Create a new version of `name` from the logged model; return it."""
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client = MlflowClient()
    # register_model stores the logged model as source; the run id makes the version
    # traceable in `list` without a second lookup.
    client.set_model_version_tag(name, version.version, "run_id", run_id)
    return client.get_model_version(name, version.version)


def holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding alias, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if alias_missing(error):
            return None
        raise


def accuracy(version: ModelVersion) -> float | None:
    value = (version.tags or {}).get("eval_accuracy")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def decide(policy: str, candidate: ModelVersion, current: ModelVersion | None) -> Decision:
    """Whether `candidate` should take the alias from `current` (None if unheld)."""
    if policy == "never":
        return Decision(False, "policy never")
    if current is None:
        return Decision(True, "no version held the alias")
    if policy == "always":
        return Decision(True, f"policy always, replacing version {current.version}")
    mine, theirs = accuracy(candidate), accuracy(current)
    if theirs is None:
        return Decision(False, f"version {current.version} has no eval_accuracy to compare with")
    caveat = ""
    if any((candidate.tags or {}).get(k) != (current.tags or {}).get(k) for k in ("dataset_sha256", "eval_samples")):
        caveat = ", evaluated on a different test set"
    if mine > theirs:
        return Decision(True, f"eval_accuracy {mine:.4f} > {theirs:.4f} of version {current.version}{caveat}")
    return Decision(False, f"eval_accuracy {mine:.4f} <= {theirs:.4f} of version {current.version}{caveat}")


def read_history(client: MlflowClient, name: str, alias: str) -> list[dict[str, str]]:
    tags = client.get_registered_model(name).tags or {}
    try:
        entries = json.loads(tags.get(history_tag(alias), "[]"))
    except json.JSONDecodeError:
        entries = []
    return [e for e in entries if isinstance(e, dict) and "version" in e]


def move_alias(client: MlflowClient, name: str, alias: str, version: str, how: str) -> str | None:
    """Point alias at version and record the move; return the previous holder's number."""
    previous = holder(client, name, alias)
    entries = read_history(client, name, alias)
    # An alias moved elsewhere (UI, another tool) is recorded first, so rollback can
    # still return to it.
    if previous is not None and (not entries or entries[-1]["version"] != str(previous.version)):
        entries.append({"version": str(previous.version), "at": now(), "how": "found"})
    client.set_registered_model_alias(name, alias, version)
    entries.append({"version": str(version), "at": now(), "how": how})
    client.set_registered_model_tag(name, history_tag(alias), json.dumps(entries[-HISTORY_LIMIT:]))
    return str(previous.version) if previous is not None else None


def promote_by_policy(name: str, alias: str, version: str, policy: str) -> Decision:
    """Apply the promotion policy to a freshly registered version; return the Decision."""
    client = MlflowClient()
    candidate = client.get_model_version(name, version)
    current = holder(client, name, alias)
    if current is not None and str(current.version) == str(version):
        # Only a retry after a lost answer gets here: the move already took effect.
        return Decision(True, f"version {version} already holds the alias")
    decision = decide(policy, candidate, current)
    record = {
        "promotion.policy": policy,
        "promotion.alias": alias,
        "promotion.decision": "promoted" if decision.promoted else "not promoted",
        "promotion.reason": decision.reason,
        "promotion.candidate_eval_accuracy": (candidate.tags or {}).get("eval_accuracy", ""),
        "promotion.holder_version": str(current.version) if current is not None else "",
        "promotion.holder_eval_accuracy": (current.tags or {}).get("eval_accuracy", "") if current else "",
        "promotion.decided_at": now(),
    }
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, str(value))
    if decision.promoted:
        move_alias(client, name, alias, version, how=policy)
    return decision


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as error:
        raise RegistryError(f"cannot list versions of {name}: {error}") from error
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r}") from None
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = ", ".join(str(v.version) for v in reversed(versions(client, name))) or "none"
        raise RegistryError(f"{name} has no version {version} (versions: {known})") from None


def promote(name: str, alias: str, version: str, challenger_alias: str | None = None) -> str | None:
    """Move alias to version by hand; return the previous holder's number. A rollout of
    that version (challenger_alias on it) is complete then, and its alias removed."""
    client = MlflowClient()
    target = get_version(client, name, version)
    current = holder(client, name, alias)
    if current is None or str(current.version) != str(target.version):
        previous = move_alias(client, name, alias, target.version, how="promote")
        client.set_model_version_tag(name, target.version, "promotion.decision", "promoted")
        client.set_model_version_tag(name, target.version, "promotion.reason", "promoted by hand")
        client.set_model_version_tag(name, target.version, "promotion.decided_at", now())
    else:
        previous = str(current.version)
    if challenger_alias:
        challenger = holder(client, name, challenger_alias)
        if challenger is not None and str(challenger.version) == str(target.version):
            end_rollout(client, name, challenger_alias, challenger, "promoted")
    return previous


def start_rollout(name: str, alias: str, challenger_alias: str, version: str, mode: str,
                  percent: float) -> str | None:
    """Serve version beside alias's holder as a canary or a shadow; return the challenger it replaces."""
    client = MlflowClient()
    target = get_version(client, name, version)
    current = holder(client, name, alias)
    if current is None:
        raise RegistryError(f"no version holds @{alias} of {name}: a {mode} needs a production version to "
                            "compare with; promote one first")
    if str(current.version) == str(target.version):
        raise RegistryError(f"version {version} already holds @{alias}: nothing to roll out")
    previous = holder(client, name, challenger_alias)
    # The tags first: a worker that sees the alias move reads the mode and share with it.
    client.set_model_version_tag(name, target.version, ROLLOUT_MODE_TAG, mode)
    client.set_model_version_tag(name, target.version, ROLLOUT_PERCENT_TAG, f"{percent:g}")
    client.set_model_version_tag(name, target.version, "rollout.started_at", now())
    client.set_registered_model_alias(name, challenger_alias, target.version)
    ended = previous is None or (previous.tags or {}).get(ROLLOUT_MODE_TAG) == ROLLOUT_ENDED
    if not ended and str(previous.version) != str(target.version):
        client.set_model_version_tag(name, previous.version, "rollout.outcome", f"replaced by version {version}")
        return str(previous.version)
    return None


def abort_rollout(name: str, challenger_alias: str) -> tuple[str, bool]:
    """End the rollout: production answers everything again. Return the challenger's
    version and whether its alias was removed."""
    client = MlflowClient()
    challenger = holder(client, name, challenger_alias)
    if challenger is None or (challenger.tags or {}).get(ROLLOUT_MODE_TAG) == ROLLOUT_ENDED:
        raise RegistryError(f"no rollout to abort: no version of {name} holds @{challenger_alias}")
    return str(challenger.version), end_rollout(client, name, challenger_alias, challenger, "aborted")


def end_rollout(client: MlflowClient, name: str, challenger_alias: str, challenger: ModelVersion,
                outcome: str) -> bool:
    """End the rollout of challenger; False when its alias could not be removed (serving
    stops routing to it all the same: it reads the mode tag)."""
    # The tag first: it takes effect with EDIT on the model, which the trainer's account has.
    client.set_model_version_tag(name, challenger.version, ROLLOUT_MODE_TAG, ROLLOUT_ENDED)
    client.set_model_version_tag(name, challenger.version, "rollout.outcome", outcome)
    client.set_model_version_tag(name, challenger.version, "rollout.ended_at", now())
    try:
        # MLflow's auth checks removing an alias as deleting the model: MANAGE on it.
        client.delete_registered_model_alias(name, challenger_alias)
    except MlflowException as error:
        if error.error_code != "PERMISSION_DENIED":
            raise
        return False
    return True


def rollback(name: str, alias: str) -> tuple[str | None, str]:
    """Give alias back to the version that held it before; return (from, to)."""
    client = MlflowClient()
    existing = {str(v.version) for v in versions(client, name)}
    if not existing:
        raise RegistryError(f"no registered model named {name!r} or it has no versions")
    current = holder(client, name, alias)
    current_version = str(current.version) if current is not None else None
    entries = read_history(client, name, alias)
    # Walk back past the current holder and any version deleted since.
    while entries and (entries[-1]["version"] == current_version or entries[-1]["version"] not in existing):
        entries.pop()
    if not entries:
        raise RegistryError(f"nothing to roll back to: no earlier holder of @{alias} of {name} is recorded")
    target = entries[-1]["version"]
    client.set_registered_model_alias(name, alias, target)
    # The history is a stack: rolling back pops, so a second rollback goes further back.
    client.set_registered_model_tag(name, history_tag(alias), json.dumps(entries))
    if current_version is not None:
        client.set_model_version_tag(name, current_version, "rolled_back_at", now())
    return current_version, target
