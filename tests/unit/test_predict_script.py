"""scripts/predict.py, the end of `make predict`'s pipe: when what feeds it fails or sends
nonsense, one line and a non-zero exit status, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "predict.py"


def predict(stdin: str) -> subprocess.CompletedProcess:
    # Port 9 on loopback: nothing listens there, so a body that gets as far as sending fails cleanly.
    return subprocess.run([sys.executable, str(SCRIPT), "--url", "http://127.0.0.1:9/invocations"],
                          input=stdin, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("stdin", "status", "line"), [
    ("", 1, "no test images to send (see the line above)"),
    ("Traceback? no: not JSON", 2, 'expected {"inputs": [...], "labels": [...]} on stdin'),
    ('{"labels": [1]}', 2, 'expected {"inputs": [...], "labels": [...]} on stdin'),
    ('{"inputs": [[0.0]]}', 1, "could not reach http://127.0.0.1:9/invocations"),
])
def test_bad_input_gets_one_line_and_a_nonzero_status(stdin, status, line):
    result = predict(stdin)
    assert result.returncode == status
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(line)
