"""A stand-in for the few tracking-server endpoints the prediction log calls, in a thread:
it keeps runs and uploaded files in memory, checks basic auth, and remembers every request."""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

PROXY_ROOT = "/api/2.0/mlflow-artifacts/artifacts/"


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class FakeTracking:
    def __init__(self, experiments: dict[str, str], accounts: dict[str, str]) -> None:
        self.experiments = experiments  # name -> id
        self.accounts = {basic(user, password): user for user, password in accounts.items()}
        self.runs: list[dict] = []
        self.files: dict[str, bytes] = {}  # path under the proxy root -> body
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.answer_status: int | None = None  # answer every request with this status instead
        self.refuse_uploads = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeTracking:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def day_runs(self, day: str) -> list[dict]:
        return [run for run in self.runs if run["tags"].get("prediction_day") == day]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlparse(self.path)
                with fake._lock:
                    fake.requests.append((method, url.path, self.headers.get("Authorization")))
                    if fake.answer_status is not None:
                        return self._reply(fake.answer_status, {"message": "unavailable"})
                    if self.headers.get("Authorization") not in fake.accounts:
                        return self._reply(401, {"error_code": "UNAUTHENTICATED", "message": "login"})
                    status, answer = fake._route(method, url.path, parse_qs(url.query), body)
                return self._reply(status, answer)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PUT(self) -> None:
                self._serve("PUT")

        return Handler

    def _route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        if method == "GET" and path == "/api/2.0/mlflow/experiments/get-by-name":
            name = query["experiment_name"][0]
            if name not in self.experiments:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"no experiment {name}"}
            return 200, {"experiment": {"experiment_id": self.experiments[name], "name": name}}
        if method == "POST" and path == "/api/2.0/mlflow/runs/search":
            request = json.loads(body)
            day = re.fullmatch(r"tags\.prediction_day = '([^']*)'", request["filter"]).group(1)
            found = sorted((r for r in self.day_runs(day) if r["experiment_id"] in request["experiment_ids"]),
                           key=lambda r: r["start_time"])[:request["max_results"]]
            return 200, {"runs": [{"info": self._info(r)} for r in found]} if found else {}
        if method == "POST" and path == "/api/2.0/mlflow/runs/create":
            request = json.loads(body)
            run = {"run_id": uuid.uuid4().hex, "experiment_id": request["experiment_id"],
                   "run_name": request["run_name"], "start_time": request["start_time"], "status": "RUNNING",
                   "tags": {t["key"]: t["value"] for t in request["tags"]}}
            self.runs.append(run)
            return 200, {"run": {"info": self._info(run)}}
        if method == "POST" and path == "/api/2.0/mlflow/runs/update":
            request = json.loads(body)
            run = next(r for r in self.runs if r["run_id"] == request["run_id"])
            run["status"] = request["status"]
            return 200, {"run_info": self._info(run)}
        if method == "PUT" and path.startswith(PROXY_ROOT):
            if self.refuse_uploads:
                return 403, {"error_code": "PERMISSION_DENIED", "message": "Permission denied"}
            self.files[unquote(path[len(PROXY_ROOT):])] = body
            return 200, {}
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"{method} {path}"}

    @staticmethod
    def _info(run: dict) -> dict:
        return {"run_id": run["run_id"], "experiment_id": run["experiment_id"], "run_name": run["run_name"],
                "status": run["status"], "start_time": run["start_time"],
                "artifact_uri": f"mlflow-artifacts:/{run['experiment_id']}/{run['run_id']}/artifacts"}
