"""A real, local OpenAI-compatible chat server for tests and benchmarks.

Why a real HTTP server rather than mocking the client: the backend's retry, timeout and
concurrency behaviour lives partly in the HTTP stack (connection pools, read timeouts, status
codes, headers), and only a socket exercises all of it. The server binds 127.0.0.1 only, on an
ephemeral port, serves from a background thread, and needs no pytest:

    with fake_openai(faults=["429", None], latency=0.2) as server:
        backend = OpenAIBackend(OpenAIBackend.Params(model="m", base_url=server.base_url))
        ...
        assert server.request_count == 2

Scripting: `reply(body) -> str` makes the assistant text (default: echo of the last user text),
or `replies` queues texts consumed in arrival order. Faults: `faults` is a schedule indexed by
arrival order (or a callable `(index, body) -> fault | None`), and/or `fault_rate` draws faults
from `fault_kinds` with a seeded RNG. A fault is an HTTP status ("429", "500", 503, ...),
"timeout" (stall `stall_seconds`, bounded, then answer), "garbage" (200 with a non-JSON body) or
"disconnect" (close the socket without answering). Every request (path, headers, body) is
recorded, and the peak number of requests in flight is tracked.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Fault = str | int | None
FaultSchedule = Sequence[Fault] | Callable[[int, dict[str, Any]], Fault]

MAX_STALL_SECONDS = 30.0  # a "timeout" fault never holds a thread longer than this
FAULT_KINDS: tuple[str, ...] = ("429", "500", "503", "400", "timeout", "garbage", "disconnect")


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased (HTTP header names are case-insensitive)
    body: dict[str, Any] | None
    index: int  # arrival order among chat-completion requests; -1 for other paths
    fault: str | None = None
    received_at: float = field(default_factory=time.monotonic)


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message, whether content is a string or a list of parts."""
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        return "\n".join(p.get("text", "") for p in content or [] if p.get("type") == "text")
    return ""


def echo_reply(body: dict[str, Any]) -> str:
    """Deterministic default reply: the last user text, so tests can match outputs to inputs."""
    return f"echo: {last_user_text(body)}"


class FakeOpenAIServer:
    """OpenAI-compatible `/v1/chat/completions` and `/v1/models` on 127.0.0.1 (thread-safe)."""

    def __init__(
        self,
        reply: Callable[[dict[str, Any]], str] | None = None,
        replies: Sequence[str] | None = None,
        faults: FaultSchedule | None = None,
        fault_rate: float = 0.0,
        fault_kinds: Sequence[str] = ("429", "500", "503"),
        seed: int = 0,
        latency: float | Callable[[dict[str, Any]], float] = 0.0,
        stall_seconds: float = 2.0,
        model: str = "fake-model",
        leak_auth_in_errors: bool = False,
    ) -> None:
        self.reply = reply or echo_reply
        self._replies: deque[str] = deque(replies or ())
        self.faults = faults
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self._rng = random.Random(seed)
        self.latency = latency
        self.stall_seconds = min(float(stall_seconds), MAX_STALL_SECONDS)
        self.model = model
        # Some real proxies echo credentials in error text; this lets tests prove we redact them.
        self.leak_auth_in_errors = leak_auth_in_errors

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._chat_count = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._sockets: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake stalled handlers and close open connections."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what tests read -------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.index >= 0]

    @property
    def request_count(self) -> int:
        """Number of chat-completion requests received (faulted ones included)."""
        with self._lock:
            return self._chat_count

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._chat_count = 0
            self._max_in_flight = self._in_flight

    # ---- internals used by the handler -----------------------------------------------------
    def _admit(self, method: str, path: str, headers: dict[str, str], body: dict[str, Any] | None) -> RecordedRequest:
        with self._lock:
            is_chat = path.rstrip("/").endswith("/chat/completions") and method == "POST"
            index = self._chat_count if is_chat else -1
            rec = RecordedRequest(method, path, headers, body, index)
            if is_chat:
                self._chat_count += 1
                rec.fault = self._pick_fault(index, body or {})
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._requests.append(rec)
            return rec

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _pick_fault(self, index: int, body: dict[str, Any]) -> str | None:
        fault: Fault = None
        if callable(self.faults):
            fault = self.faults(index, body)
        elif self.faults is not None and index < len(self.faults):
            fault = self.faults[index]
        if fault is None and self.fault_rate > 0 and self._rng.random() < self.fault_rate:
            fault = self._rng.choice(self.fault_kinds)
        return None if fault is None else str(fault)

    def _next_reply(self, body: dict[str, Any]) -> str:
        with self._lock:
            if self._replies:
                return self._replies.popleft()
        return self.reply(body)

    def _latency_for(self, body: dict[str, Any]) -> float:
        value = self.latency(body) if callable(self.latency) else self.latency
        return min(max(float(value), 0.0), MAX_STALL_SECONDS)

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._sockets.add if add else self._sockets.discard)(sock)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; False if interrupted by shutdown."""
        return not self._stopping.wait(seconds) if seconds > 0 else True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # listen backlog: a burst of concurrent clients must not be refused

    def __init__(self, addr: tuple[str, int], handler: type, owner: FakeOpenAIServer) -> None:
        self.owner = owner
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._track(request, add=True)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.owner._track(request, add=False)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # client hung up (e.g. after its own timeout): expected in fault tests


def _completion_json(model: str, text: str, body: dict[str, Any], index: int) -> dict[str, Any]:
    prompt_words = sum(len(json.dumps(m.get("content", "")).split()) for m in body.get("messages") or [])
    return {
        "id": f"chatcmpl-fake-{index}",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", model),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
             "logprobs": _logprobs_json(text, body)}
        ],
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_words + len(text.split()),
        },
    }


def _logprobs_json(text: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """When asked (`logprobs`), the reply's first word as the first token with log-probability
    log(0.8), and the word's case-flipped twin and "No"/"Yes" (the other answer) as alternatives:
    enough to test yes/no scoring."""
    if not body.get("logprobs"):
        return None
    first = (text.split() or [""])[0]
    other = "No" if first.lower().startswith("yes") else "Yes"
    top = [(first, math.log(0.8)), (first.swapcase(), math.log(0.05)), (other, math.log(0.1))]
    top = top[: int(body.get("top_logprobs") or 0) or 1]
    return {"content": [{"token": first, "logprob": math.log(0.8), "bytes": None,
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]}]}


def _make_handler(owner: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
        disable_nagle_algorithm = True  # headers and body go out in two writes: avoid 40 ms stalls

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _headers(self) -> dict[str, str]:
            return {k.lower(): v for k, v in self.headers.items()}

        def _send_json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self._send_raw(status, data, "application/json", extra)

        def _send_raw(self, status: int, data: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            owner._admit("GET", self.path, self._headers(), None)
            if self.path.rstrip("/").endswith("/models"):
                self._send_json(200, {"object": "list", "data": [{"id": owner.model, "object": "model", "created": 0, "owned_by": "fake"}]})
            else:
                self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                body = None
            rec = owner._admit("POST", self.path, self._headers(), body)
            if rec.index < 0:
                self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                return
            try:
                self._chat(rec, body)
            finally:
                owner._release()

        def _chat(self, rec: RecordedRequest, body: dict[str, Any] | None) -> None:
            if body is None:
                self._send_json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                return
            if not owner._sleep(owner._latency_for(body)):
                return
            fault = rec.fault
            if fault == "timeout":
                if not owner._sleep(owner.stall_seconds):
                    return
                fault = None  # answer late; the client has normally given up by now
            if fault == "disconnect":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "garbage":
                self._send_raw(200, b"<html>this is not json{", "application/json")
                return
            if fault is not None:
                status = int(fault)
                message = f"injected fault {status}"
                if owner.leak_auth_in_errors:
                    message += f" (auth was {self.headers.get('Authorization', '')})"
                extra = {"Retry-After": "0"} if status == 429 else None
                self._send_json(status, {"error": {"message": message, "type": "fake_error", "code": str(status)}}, extra)
                return
            text = owner._next_reply(body)
            self._send_json(200, _completion_json(owner.model, text, body, rec.index))

    return Handler


@contextlib.contextmanager
def fake_openai(**kwargs: Any) -> Iterator[FakeOpenAIServer]:
    """Run a FakeOpenAIServer for the duration of a `with` block (kwargs as the constructor)."""
    server = FakeOpenAIServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
