"""How MLflow's model registry answers, where both the trainer and serving depend on it."""

from __future__ import annotations

from mlflow.exceptions import MlflowException


def alias_missing(error: MlflowException) -> bool:
    """Whether get_model_version_by_alias failed because nothing holds the alias: the registry
    answers RESOURCE_DOES_NOT_EXIST for an unknown model and INVALID_PARAMETER_VALUE
    "... alias ... not found" for an alias no version holds."""
    return error.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in error.message.lower())
