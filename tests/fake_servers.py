"""Local HTTP servers standing in for an OpenAI-compatible endpoint and the Okareo API in tests.

Both run ``http.server`` on a thread at 127.0.0.1 with an ephemeral port and
record every request, so tests can assert what the real clients sent. Faults
are scripted: each server pops the next planned fault (status code, delay,
malformed body) before answering normally.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client that timed out and left is expected


class _Server:
    def __init__(self, handler_cls):
        self.requests: list[dict[str, Any]] = []
        self.faults: list[Any] = []
        self.lock = threading.Lock()
        handler = type("Handler", (handler_cls,), {"fake": self})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def next_fault(self):
        with self.lock:
            return self.faults.pop(0) if self.faults else None


class _Handler(BaseHTTPRequestHandler):
    fake: _Server

    def log_message(self, *args):  # keep test output clean
        pass

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any, raw: bytes | None = None, headers: dict | None = None):
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _fault(self) -> bool:
        """Apply the next scripted fault; True when it answered the request."""
        fault = self.fake.next_fault()
        if fault is None:
            return False
        kind, value = fault
        if kind == "sleep":
            time.sleep(value)
            return False
        if kind == "status":
            self._send(value, {"detail": [f"scripted {value}"]}, headers={"Retry-After": "0"} if value == 429 else None)
        elif kind == "raw":
            self._send(200, None, raw=value)
        elif kind == "reply":  # (status, raw body): e.g. a proxy's HTML page under the status the route uses
            status, raw = value
            self._send(status, None, raw=raw)
        return True


# ------------------------------------------------------------------- OpenAI


class _OpenAIHandler(_Handler):
    def do_POST(self):
        body = json.loads(self._body() or b"{}")
        with self.fake.lock:
            self.fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self._fault():
            return
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": "not found"})
            return
        content = self.fake.reply(body)
        self._send(200, {"id": "cmpl-1", "object": "chat.completion", "model": body.get("model"),
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})


def _asked_n(body: dict) -> int:
    match = re.search(r"Write (\d+) different", body["messages"][-1]["content"])
    return int(match.group(1)) if match else 1


def _subject(body: dict) -> str:
    text = body["messages"][-1]["content"]
    quoted = re.search(r'A customer wrote: "([^"]+)"', text)
    source = quoted.group(1) if quoted else text.split("\n")[1]
    return " ".join(re.findall(r"[a-z]+", source.lower())[:6])


class FakeOpenAI(_Server):
    """Answers every chat completion with a JSON array of ``n`` distinct questions about the prompt's subject."""

    def __init__(self):
        super().__init__(_OpenAIHandler)

    @staticmethod
    def reply(body: dict) -> str:
        subject = _subject(body)
        openers = ["could you help me with", "what should I do about", "I have a question on",
                   "is there a way to sort out", "who can tell me more about", "need advice regarding"]
        return json.dumps([f"{openers[i % len(openers)]} {subject} (case {i + 1})?" for i in range(_asked_n(body))])


# ------------------------------------------------------------------- Okareo


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class _OkareoHandler(_Handler):
    def _record(self, body: Any):
        with self.fake.lock:
            self.fake.requests.append({"method": self.command, "path": self.path, "body": body,
                                       "api_key": self.headers.get("api-key")})

    def do_GET(self):
        self._record(None)
        if self._fault():
            return
        fake: FakeOkareo = self.fake  # type: ignore[assignment]
        if self.path == "/v0/projects":
            self._send(201, [{"id": fake.project_id, "name": "Global", "onboarding_status": "complete", "tags": []}])
        elif self.path.startswith("/v0/scenario_data_points/"):
            sid = self.path.rsplit("/", 1)[1]
            if sid not in fake.scenarios:
                self._send(404, {"detail": "scenario not found"})
                return
            self._send(200, fake.scenarios[sid]["rows"])
        else:
            self._send(404, {"detail": f"no route {self.path}"})

    def do_POST(self):
        raw = self._body()
        ctype = self.headers.get("Content-Type", "")
        body = json.loads(raw) if raw and "json" in ctype else raw.decode("utf-8", "replace")
        self._record(body)
        if self._fault():
            return
        fake: FakeOkareo = self.fake  # type: ignore[assignment]
        if self.path == "/v0/scenario_sets":
            rows = [{"id": str(uuid.uuid4()), "input": r["input"], "result": r["result"], "meta_data": {}}
                    for r in body["seed_data"]]
            self._send(201, fake.add_scenario(body["name"], rows))
        elif self.path == "/v0/scenario_sets_generate":
            source = fake.scenarios.get(body.get("source_scenario_id"))
            if source is None:
                self._send(404, {"detail": "source scenario not found"})
                return
            n = int(body["number_examples"])
            if fake.empty_generations:
                self._send(422, {"detail": [f"No scenario rows generated for scenario_id {body['source_scenario_id']}"]})
                return
            rows = []
            for seed in source["rows"]:
                words = re.findall(r"[a-z]+", json.dumps(seed["input"]).lower())[:5]
                for i in range(n):
                    if body["generation_type"] == "TEXT_REVERSE_QUESTION":
                        text, result = f"how does {' '.join(words)} work for me, variant {i + 1}?", [seed["result"]]
                    else:
                        text, result = f"hey, quick one: {seed['input']} (version {i + 1})", seed["result"]
                    rows.append({"id": str(uuid.uuid4()), "input": text, "result": result,
                                 "meta_data": {"seed_id": seed["id"]}})
            self._send(201, fake.add_scenario(body["name"], rows, body["generation_type"]))
        elif self.path == "/v0/register_model":
            fake.models.append(body)
            self._send(201, {"id": str(uuid.uuid4()), "project_id": fake.project_id, "name": body["name"],
                             "tags": body.get("tags") or [], "time_created": _now(), "version": 1,
                             "app_link": "http://fake/model"})
        elif self.path == "/v0/test_run":
            fake.test_runs.append(body)
            self._send(201, {"id": str(uuid.uuid4()), "project_id": fake.project_id, "mut_id": body.get("mut_id"),
                             "scenario_set_id": body.get("scenario_id"), "name": body.get("name"),
                             "type": body.get("type"), "status": "FINISHED", "start_time": _now(),
                             "end_time": _now(), "test_data_point_count": len(body["model_results"]["model_data"]),
                             "app_link": "http://fake/eval"})
        else:
            self._send(404, {"detail": f"no route {self.path}"})


class FakeOkareo(_Server):
    """The endpoints and status codes notes/okareo.md §3 lists; generation derives rows from the seed rows."""

    def __init__(self):
        super().__init__(_OkareoHandler)
        self.project_id = str(uuid.uuid4())
        self.scenarios: dict[str, dict] = {}
        self.models: list[dict] = []
        self.test_runs: list[dict] = []
        self.empty_generations = False

    def add_scenario(self, name: str, rows: list[dict], type_: str = "SEED") -> dict:
        sid = str(uuid.uuid4())
        self.scenarios[sid] = {"name": name, "rows": rows}
        return {"project_id": self.project_id, "scenario_id": sid, "time_created": _now(), "type": type_,
                "name": name, "scenario_count": len(rows), "scenario_input": [], "app_link": f"http://fake/{sid}"}
