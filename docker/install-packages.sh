#!/bin/sh
# Installs the project's packages bind-mounted under /src (pyproject.toml and the package
# folders an image runs) into the image's venv. pip builds in a copy: the mounts are
# read-only, and nothing of the source or the build is left in the layer.
set -eu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r /src/. "$work/"
pip-install --no-deps "$work"
