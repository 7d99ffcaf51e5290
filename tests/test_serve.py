"""`medtune serve`: a real server process on the SmolLM2 Q4_1 GGUF, driven by the `openai` client and raw HTTP."""

from __future__ import annotations

import http.client
import inspect
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai  # dev extra: the official client is what the server must satisfy
import pytest
from conftest import SMOLLM2, medtune

API_KEY = "test-key-123"
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
N_CTX = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(host, port) of a running `medtune serve` with an API key; stopped (SIGTERM) when the module is done."""
    from medtune.models import package_file

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "medtune.cli", "serve", "-m", str(package_file(SMOLLM2)), "--port", "0",
           "--n-ctx", str(N_CTX), "--threads", "2", "--api-key", API_KEY]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"})
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield "127.0.0.1", int(found.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()  # SIGTERM is a clean stop


@pytest.fixture(scope="module")
def client(server):
    host, port = server
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def request(server, method: str, path: str, body: bytes | None = None, key: str | None = API_KEY,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server, timeout=120)
    try:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if key:
            all_headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def chat_body(**fields) -> bytes:
    return json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                       **fields}).encode()


def test_health_and_models(server, client):
    status, body = request(server, "GET", "/health", key=None)  # health needs no key: it is for probes
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL_ID
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    status, body = request(server, "GET", "/v1/models")
    assert "not a medical device" in body["data"][0]["meta"]["disclaimer"]
    assert body["data"][0]["meta"]["n_ctx"] == N_CTX
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_plain_completion(client):
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "system", "content": "You are a medical tutor."},
                                  {"role": "user", "content": "Which organ pumps blood around the body?"}],
        max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == MODEL_ID
    assert 0 < reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 0


def test_streamed_completion(client):
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Name one symptom of anaemia."}], max_tokens=16,
        temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # streaming and not streaming give the same greedy text
    whole = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Name one symptom of anaemia."}], max_tokens=16,
        temperature=0)
    assert whole.choices[0].message.content == text


def test_eight_concurrent_requests_are_all_answered(client):
    def ask(i: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": f"Give one fact about organ number {i}."}],
            max_tokens=16, stream=i % 2 == 1)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in reply)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(answers) == 8 and all(a.strip() for a in answers)


LONG = " ".join(["symptom"] * (N_CTX + 100))
MALFORMED = [
    (b"{not json", 400, None),
    (b"\xff\xfe\x00", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
    (json.dumps({"model": MODEL_ID}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL_ID, "messages": "hello"}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL_ID, "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": 5}]}).encode(), 400,
     "messages.[0].content"),
    (json.dumps({"model": MODEL_ID, "messages": [{"role": "robot", "content": "x"}]}).encode(), 400,
     "messages.[0].role"),
    (json.dumps({"model": MODEL_ID, "messages": ["hi"]}).encode(), 400, "messages.[0]"),
    (chat_body(model="gpt-4o"), 404, "model"),
    (chat_body(temperature="hot"), 400, "temperature"),
    (chat_body(temperature=5), 400, "temperature"),
    (chat_body(top_p=1.5), 400, "top_p"),
    (chat_body(max_tokens=0), 400, "max_tokens"),
    (chat_body(max_tokens="16"), 400, "max_tokens"),
    (chat_body(max_tokens=True), 400, "max_tokens"),
    (chat_body(stream="yes"), 400, "stream"),
    (chat_body(n=3), 400, "n"),
    (chat_body(stop=[1]), 400, "stop"),
    (chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (chat_body(messages=[{"role": "user", "content": LONG}]), 400, "messages"),
    (chat_body(messages=[{"role": "user", "content": LONG}], stream=True), 400, "messages"),
    (b"[" * 100_000, 400, None),  # deeper than json's parser recurses
    (b'{"model": ' + b'{"a": ' * 100_000, 400, None),
]


@pytest.mark.parametrize(("body", "status", "param"), MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_get_4xx_json(server, body, status, param):
    got, answer = request(server, "POST", "/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if b"symptom symptom" in body:
        assert error["code"] == "context_length_exceeded"
        assert f"does not fit the context of {N_CTX} tokens" in error["message"]


def test_deeply_nested_json_is_a_400_without_a_server():
    from medtune.infer.server import ApiError, parse_chat_request

    with pytest.raises(ApiError, match="nested too deeply") as info:
        parse_chat_request(b"[" * 100_000, MODEL_ID)
    assert info.value.status == 400 and info.value.body()["error"]["type"] == "invalid_request_error"


def test_wrong_method_unknown_path_and_raw_garbage(server):
    assert request(server, "GET", "/v1/chat/completions")[0] == 405
    assert request(server, "POST", "/v1/models", b"{}")[0] == 405
    status, body = request(server, "GET", "/v2/everything")
    assert status == 404 and body["error"]["code"] == "not_found"
    for raw, status in ((b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + API_KEY.encode() + b"\r\n\r\n", 411),
                        (b"GET /health HTTX/9\r\n\r\n", 400), (b"BREW /coffee HTTP/1.1\r\n\r\n", 501)):
        with socket.create_connection(server, timeout=30) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.split()[1] == str(status).encode(), reply
        assert json.loads(payload)["error"]["message"]
    assert request(server, "GET", "/health")[0] == 200  # still serving


def test_api_key_is_enforced(server):
    host, port = server
    wrong = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": f"Bearer {API_KEY}x"}):
        status, body = request(server, "POST", "/v1/chat/completions", chat_body(), key=None, headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert request(server, "GET", "/v1/models", key=None, headers=headers)[0] == 401


def test_client_leaving_a_stream_frees_the_model(server, client):
    conn = http.client.HTTPConnection(*server, timeout=60)
    conn.request("POST", "/v1/chat/completions", chat_body(max_tokens=400, stream=True),
                 {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    assert response.readline().startswith(b"data: ")
    conn.close()  # mid-generation
    reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
    assert reply.choices[0].message.content


def test_serve_refuses_a_model_directory(tmp_path):
    result = medtune("serve", "-m", str(tmp_path), columns=300, timeout=120)
    assert result.returncode == 2
    assert "serve takes a .gguf file" in result.stderr


def test_default_bind_is_loopback():
    from medtune.cli import serve_command

    assert inspect.signature(serve_command).parameters["host"].default == "127.0.0.1"
