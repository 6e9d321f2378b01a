#!/bin/sh
# Serving container entry point. Everything lives in `python -m serving`: it validates the
# environment (one line, exit 2, on nonsense), points writable paths at /tmp, then execs
# gunicorn with serving/gunicorn.conf.py. The serving package must be importable
# (WORKDIR /app with the package at /app/serving, or PYTHONPATH=/app).
set -eu
exec python -m serving "$@"
