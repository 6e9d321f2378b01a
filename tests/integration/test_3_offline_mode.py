"""Without a registry, the stack runs on local stand-ins and compose never pulls."""

from __future__ import annotations

import subprocess

import pytest
from stack import Stack


def test_no_image_was_pulled_while_the_stack_came_up(stack: Stack, session_started_at):
    if not stack.offline:
        pytest.skip("a registry is reachable: this run uses the upstream images, not the stand-ins")
    events = subprocess.run(
        ["docker", "events", "--since", session_started_at, "--until", "0s",
         "--filter", "type=image", "--filter", "event=pull", "--format", "{{.Actor.ID}}"],
        capture_output=True, text=True, check=True, timeout=60)
    assert events.stdout.strip() == "", f"images were pulled: {events.stdout}"
    running = stack.compose("ps", "--format", "{{.Service}} {{.Image}}").stdout
    images = dict(line.split(" ", 1) for line in running.splitlines() if " " in line)
    assert images["postgres"] == stack.env["OFFLINE_POSTGRES_IMAGE"]
    assert images["minio"] == stack.env["OFFLINE_S3_IMAGE"]
