"""The serving container: MLflow's scoring server for models:/NAME@ALIAS, following the alias.

Kept import-free so that `python -m serving.healthcheck` starts in milliseconds.
"""
