"""A raw LSP client for hostile-input tests: the real `codevista serve` process over stdio,
fed exact bytes (broken frames, invalid JSON, wrong types) that a well-behaved client
library would refuse to send. Messages from the server are parsed on a reader thread;
requests the server sends to the client are answered with null."""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SERVE = [sys.executable, "-m", "codevista.server.cli", "serve"]


class ServerGone(RuntimeError):
    """The server process exited, or stopped answering within the timeout."""


def frame(body: bytes | str) -> bytes:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return f"Content-Length: {len(data)}\r\n\r\n".encode("ascii") + data


class RawServer:
    def __init__(self, *args: str, log_level: str = "INFO",
                 env: dict[str, str] | None = None, prelude: str | None = None) -> None:
        """`args` go after `serve`; `prelude` is Python run in the server process first."""
        self.log = Path(tempfile.mkstemp(prefix="codevista-raw-", suffix=".log")[1])
        self._log_file = self.log.open("wb")
        cli = ["--log-level", log_level, "serve", *args]
        cmd = [*SERVE[:3], *cli] if prelude is None else [
            sys.executable, "-c", f"{prelude}\nimport sys\nfrom codevista.server.cli import main"
            f"\nsys.exit(main({cli!r}))"]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
            env={**os.environ, **(env or {})})
        self.messages: list[dict[str, Any]] = []  # everything the server sent, in order
        self.unparsable: list[bytes] = []  # frames that were not JSON (must stay empty)
        self.arrived: dict[str, float] = {}  # json.dumps(id) -> when its first response came
        self._responses: dict[Any, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="rawlsp-reader", daemon=True)
        self._reader.start()

    # -- wire ----------------------------------------------------------------------------
    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return  # EOF: the server exited
                line = line.strip()
                if not line:
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length is None:
                continue
            body = out.read(length)
            try:
                msg = json.loads(body)
            except ValueError:
                self.unparsable.append(body)
                continue
            self._dispatch(msg)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        with self._lock:
            self.messages.append(msg)
        if "method" in msg and "id" in msg:  # a request from the server: answer it
            self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
            return
        if "method" not in msg:
            key = json.dumps(msg.get("id"))
            with self._lock:
                q = self._responses.setdefault(key, queue.Queue())
                self.arrived.setdefault(key, time.monotonic())
            q.put(msg)

    def send_bytes(self, data: bytes) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        with self._write_lock:
            try:
                stdin.write(data)
                stdin.flush()
            except (BrokenPipeError, OSError) as e:
                raise ServerGone(f"the server closed its input: {e}") from e

    def send(self, obj: Any) -> None:
        self.send_bytes(frame(json.dumps(obj)))

    # -- JSON-RPC ------------------------------------------------------------------------
    def next_id(self) -> int:
        return next(self._ids)

    def notify(self, method: str, params: Any = None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)

    def send_request(self, method: str, params: Any = None, msg_id: Any = None) -> Any:
        msg_id = self.next_id() if msg_id is None else msg_id
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return msg_id

    def response(self, msg_id: Any, timeout: float = 20.0) -> dict[str, Any]:
        """The next response carrying `msg_id` (raises ServerGone if none comes)."""
        key = json.dumps(msg_id)
        with self._lock:
            q = self._responses.setdefault(key, queue.Queue())
        deadline = time.monotonic() + timeout
        while True:
            try:
                return q.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise ServerGone(f"the server exited ({self.proc.returncode}) before "
                                     f"answering {msg_id!r}; log:\n{self.log_tail()}") from None
                if time.monotonic() >= deadline:
                    raise ServerGone(f"no response to {msg_id!r} within {timeout} s") from None

    def no_response(self, msg_id: Any, wait: float) -> bool:
        try:
            self.response(msg_id, wait)
        except ServerGone:
            return True
        return False

    def request(self, method: str, params: Any = None, timeout: float = 20.0,
                msg_id: Any = None) -> dict[str, Any]:
        return self.response(self.send_request(method, params, msg_id), timeout)

    def notifications(self, method: str) -> list[Any]:
        with self._lock:
            return [m.get("params") for m in self.messages
                    if m.get("method") == method and "id" not in m]

    def wait_status(self, timeout: float = 60.0) -> dict[str, Any]:
        """The first codevista/status that is final (ready or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.notifications("codevista/status"):
                if s["state"] in ("ready", "error"):
                    return s
            if self.proc.poll() is not None:
                raise ServerGone(f"the server exited; log:\n{self.log_tail()}")
            time.sleep(0.02)
        raise ServerGone(f"no final status within {timeout} s")

    # -- session -------------------------------------------------------------------------
    def initialize(self, options: dict[str, Any] | None = None,
                   root: Path | None = None, encodings: list[str] | None = None
                   ) -> dict[str, Any]:
        params: dict[str, Any] = {"processId": os.getpid(), "rootUri": None,
                                  "capabilities": {"general": {
                                      "positionEncodings": encodings or ["utf-16"]}},
                                  "initializationOptions": options or {}}
        if root is not None:
            params["rootUri"] = root.as_uri()
            params["workspaceFolders"] = [{"uri": root.as_uri(), "name": root.name}]
        result = self.request("initialize", params, timeout=60)
        self.notify("initialized", {})
        return result

    def alive_and_serving(self, timeout: float = 20.0) -> bool:
        """A valid request right now gets a proper answer."""
        r = self.request("workspace/executeCommand", {"command": "codevista.stats"}, timeout)
        return "result" in r and isinstance(r["result"], dict)

    def open(self, uri: str, text: str, language: str = "python", version: int = 1) -> None:
        self.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": language, "version": version, "text": text}})

    def inline(self, uri: str, line: Any, character: Any, timeout: float = 30.0,
               msg_id: Any = None) -> dict[str, Any]:
        return self.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 1}}, timeout, msg_id)

    def log_tail(self, n: int = 4000) -> str:
        self._log_file.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")[-n:]

    def log_text(self) -> str:
        self._log_file.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def close(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            try:
                self.request("shutdown", None, timeout)
                self.notify("exit")
                self.proc.wait(timeout)
            except (ServerGone, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._log_file.close()
        return self.proc.returncode

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.log.unlink(missing_ok=True)
