"""`medtune serve`: an OpenAI-compatible HTTP server for one GGUF model, built on the standard library.

Endpoints: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`), `GET /v1/models`,
`GET /health`. One llama.cpp context answers every request in turn (a llama.cpp context is not thread-safe), so
concurrent requests queue on a lock and are all answered. Every error is a JSON body in OpenAI's error shape.
"""

from __future__ import annotations

import errno
import hmac
import json
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from medtune import DISCLAIMER, __version__
from medtune.engines import ContextOverflow, LlamaCppEngine, Messages
from medtune.errors import MedtuneError
from medtune.sampling import N_CTX, TEMPERATURE, TOP_P

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP_SEQUENCES = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "logit_bias")


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float | None) -> float | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number from {low:g} to {high:g}, got {value!r}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ApiError(400, f"'{key}' must be an integer >= {low}, got {value!r}", key)
    return value


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                       and isinstance(part.get("text"), str) for part in value):
        return "".join(part["text"] for part in value)
    raise ApiError(400, f"'{param}' must be a string or a list of text parts", param)


def _messages(value: Any) -> Messages:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        param = f"messages.[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{param}' must be an object with 'role' and 'content'", param)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{param}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
        messages.append({"role": ROLES[role], "content": _content(message.get("content"), f"{param}.content")})
    return messages


def parse_chat_request(raw: bytes, model_id: str) -> tuple[Messages, dict[str, Any], bool]:
    """Validate a /v1/chat/completions body: (messages, sampling arguments for llama.cpp, stream) or `ApiError`."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}).") from None
    except RecursionError:  # json's parser recurses once per nesting level (a body of 100,000 "[")
        raise ApiError(400, "We could not parse the JSON body of your request: it is nested too deeply.") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", "model")
    if model != model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'.", "model",
                       "model_not_found")
    messages = _messages(body.get("messages"))
    for key in UNSUPPORTED:
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported by this server", key)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")
    if body.get("n", 1) != 1:
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {body['n']!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a string or up to {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1)
    sampling = {
        "temperature": _number(body, "temperature", 0, 2, TEMPERATURE),
        "top_p": _number(body, "top_p", 0, 1, TOP_P),
        "max_tokens": max_tokens,
        "stop": stop or [],
        "seed": _integer(body, "seed", 0),
        "presence_penalty": _number(body, "presence_penalty", -2, 2, 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2, 2, 0.0),
    }
    return messages, sampling, stream


class ChatServer(ThreadingHTTPServer):
    """Holds the engine, the lock that serializes generations, and the optional API key."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: LlamaCppEngine, model_id: str,
                 api_key: str | None = None) -> None:
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "medtune",
                "meta": {"n_ctx": self.engine.n_ctx, "file": self.engine.path.name, "medtune": __version__,
                         "disclaimer": DISCLAIMER}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streamed replies use chunked transfer encoding
    server_version = f"medtune/{__version__}"
    timeout = 300  # seconds a client may stay silent (or stop reading a stream) before its connection is closed
    server: ChatServer
    body_read = False

    # ---- responses ----

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method, ...) as JSON too."""
        self.close_connection = True
        self.request_version = "HTTP/1.0"  # an unparsable request line counts as HTTP/0.9, which has no status line
        status = HTTPStatus(code)
        error = ApiError(code, message or status.phrase, kind="invalid_request_error" if code < 500 else "server_error")
        try:
            self._json(code, error.body())
        except OSError:
            pass

    def _error(self, error: ApiError) -> None:
        self._json(error.status, error.body(), {"WWW-Authenticate": "Bearer"} if error.status == 401 else None)

    def _event(self, payload: str) -> None:
        data = f"data: {payload}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    # ---- requests ----

    def _authorize(self, path: str) -> None:
        key = self.server.api_key
        if not key or path == "/health":
            return
        header = self.headers.get("Authorization", "")
        if not header:
            raise ApiError(401, "No API key given: send the header 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "Send the request body with a Content-Length header (chunked bodies are not read).")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "A Content-Length header is required.")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError(400, f"Invalid Content-Length {length!r}.")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        raw = self.rfile.read(int(length))
        self.body_read = True
        return raw

    def _route(self) -> None:
        method, path = self.command, self.path.split("?", 1)[0].rstrip("/")
        self.body_read = False
        try:
            self._authorize(path)
            if path == "/v1/chat/completions":
                if method != "POST":
                    raise ApiError(405, f"Use POST for {path}.")
                self._chat(self._body())
            elif path == "/v1/models" and method == "GET":
                self._json(200, {"object": "list", "data": [self.server.model_card()]})
            elif path.startswith("/v1/models/") and method == "GET":
                if path.removeprefix("/v1/models/") != self.server.model_id:
                    raise ApiError(404, f"The model '{path.removeprefix('/v1/models/')}' does not exist.", "model",
                                   "model_not_found")
                self._json(200, self.server.model_card())
            elif path == "/health" and method == "GET":
                self._json(200, {"status": "ok", "model": self.server.model_id, "disclaimer": DISCLAIMER})
            elif path in ("/v1/models", "/health") or path.startswith("/v1/models/"):
                raise ApiError(405, f"Use GET for {path}.")
            else:
                raise ApiError(404, f"Unknown path {path or '/'}: this server has /v1/chat/completions, /v1/models "
                               "and /health.", code="not_found")
        except ApiError as error:
            if method != "GET" and not self.body_read:
                self.close_connection = True  # the unread body would be taken for the next request
            self._error(error)
        except OSError:  # the client went away: nobody to answer
            self.close_connection = True
        except Exception as exc:  # a bug must still answer in JSON, not drop the connection
            traceback.print_exc()
            self.close_connection = True
            self._error(ApiError(500, f"internal error: {exc}", kind="server_error"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _route  # http.server calls do_<METHOD>

    # ---- chat ----

    def _chat(self, raw: bytes) -> None:
        messages, sampling, stream = parse_chat_request(raw, self.server.model_id)
        with self.server.lock:
            try:
                result = self.server.engine.chat(messages, stream=stream, **sampling)
            except ContextOverflow as exc:
                raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None
            except MedtuneError as exc:
                raise ApiError(400, str(exc), "messages") from None
            except Exception as exc:
                traceback.print_exc()
                raise ApiError(500, f"generation failed: {exc}", kind="server_error") from None
            if not stream:
                result["model"] = self.server.model_id
                self._json(200, result)
                return
            self._stream(result)

    def _stream(self, chunks: Any) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                chunk["model"] = self.server.model_id
                self._event(json.dumps(chunk, ensure_ascii=False))
            self._end_stream()
        except OSError:  # the client went away: stop generating and free the model for the next request
            self.close_connection = True
        except Exception as exc:  # the status line is gone: report the failure in the stream, as OpenAI does
            traceback.print_exc()
            try:
                self._event(json.dumps(ApiError(500, f"generation failed: {exc}", kind="server_error").body()))
                self._end_stream()
            except OSError:
                self.close_connection = True
        finally:
            chunks.close()

    def _end_stream(self) -> None:
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


def make_server(engine: LlamaCppEngine, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None) -> ChatServer:
    """Bind the server (port 0 picks a free one); `serve_forever()` runs it."""
    try:
        return ChatServer((host, port), engine, engine.path.stem, api_key)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MedtuneError(f"{host}:{port} is already in use; choose another --port") from None
        raise MedtuneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(model: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, n_ctx: int = N_CTX,
          threads: int | None = None, log: Callable[[str], None] = print) -> None:
    """Load a GGUF file and answer OpenAI-style requests until Ctrl-C or SIGTERM."""
    if Path(model).suffix != ".gguf":
        raise MedtuneError(f"{model}: serve takes a .gguf file (`medtune export` writes them); "
                           "`medtune chat` runs HF model directories")
    engine = LlamaCppEngine(model, n_ctx=n_ctx, threads=threads)
    server = make_server(engine, host, port, api_key)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    url = f"http://{f'[{host}]' if ':' in host else host}:{server.server_port}/v1"
    log(f"serving '{server.model_id}' (context {engine.n_ctx} tokens) at {url}"
        f"{'' if api_key else ' with no API key'}; Ctrl-C stops")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: {host} is reachable from other machines and no --api-key is set")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
