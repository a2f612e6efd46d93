"""Teacher servers for the tests: ``ctopd serve-teacher`` as a real subprocess (started, killed,
restarted on its port), and a scripted fake that answers whatever a test tells it to."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.training.tiny import subprocess_env

API_KEY = "test-key-0123"


class ServerProcess:
    """``python -m ctopd serve-teacher --model MODEL`` on 127.0.0.1 (a free port the first time,
    the same port after :meth:`restart`); its stderr goes to ``log``."""

    def __init__(self, model: Path, log: Path, *, api_key: str | None = API_KEY) -> None:
        self.model, self.log, self.api_key = model, log, api_key
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 120.0) -> str:
        command = [
            sys.executable,
            "-m",
            "ctopd",
            "serve-teacher",
            "--model",
            str(self.model),
            "--port",
            str(self.port),
        ]
        if self.api_key:
            command += ["--api-key", self.api_key]
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, env=subprocess_env(), text=True
            )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: lines.put(self.process.stdout.readline()), daemon=True
        ).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise RuntimeError(
                f"serve-teacher did not start in {timeout} s; see {self.log}"
            ) from None
        match = re.search(r"on (http://127\.0\.0\.1:(\d+)/v1)", line)
        if not match:
            self.kill()
            raise RuntimeError(f"serve-teacher printed {line!r}; see {self.log}")
        self.url, self.port = match.group(1), int(match.group(2))
        return self.url

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=30)

    def restart(self) -> str:
        self.kill()
        return self.start()


def kill_after_first_step(
    server: ServerProcess, run_dir: Path, *, restart_after: float | None, timeout: float = 120.0
) -> threading.Thread:
    """A thread that kills ``server`` once ``run_dir/metrics.jsonl`` has a row, and restarts it
    ``restart_after`` seconds later (never, when None). ``thread.rows_at_kill`` records how many
    steps were done when it struck."""
    metrics = run_dir / "metrics.jsonl"

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if metrics.is_file() and metrics.read_text().count("\n") >= 1:
                thread.rows_at_kill = metrics.read_text().count("\n")
                server.kill()
                if restart_after is not None:
                    time.sleep(restart_after)
                    server.start()
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.rows_at_kill = None
    thread.start()
    return thread


class FakeServer:
    """A scripted ``/v1/completions``: ``answer(body) -> (status, reply)``; ``/v1/models`` and
    ``/tokenize`` (404) for the handshake, any other route 404. ``requests`` counts completions
    calls."""

    def __init__(self, answer: Callable[[dict], tuple[int, object]]) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path != "/v1/models":  # as vLLM: the API lives under /v1
                    return self._reply(404, {"error": {"message": f"no route GET {self.path}"}})
                self._reply(200, {"object": "list", "data": [{"id": "fake"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    return self._reply(404, {"error": {"message": "no route"}})
                fake.requests += 1
                fake.bodies.append(body)
                self._reply(*answer(body))

            def _reply(self, status, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.requests = 0
        self.bodies: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
