"""saeray.interp.client: the OpenAI-compatible chat client.

Fast tests use a scripted HTTP server on 127.0.0.1 (in a thread of this process) to count the
attempts exactly and to check the retry policy, the concurrency bound and the key's secrecy; the
slow tests talk to a real `transformers serve` of SmolLM2-135M-Instruct (the `llm_server` fixture).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saeray.errors import InputError, SaerayError
from saeray.interp.client import LLMClient, LLMConfig, LLMError

from conftest import free_port

SECRET = "sk-test-9f8e7d6c5b4a-TOPSECRET"
LOGGER = "saeray.interp.client"


# ---- a scripted OpenAI-compatible server on loopback ----

class Scripted:
    """Answers POST /v1/chat/completions with the next (status, body, headers) of ``script`` (the
    last one repeats); records every request's Authorization header and the peak concurrency."""

    def __init__(self, script, delay_s: float = 0.0):
        self.script = list(script)
        self.delay_s = delay_s
        self.hits = 0
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()

    def next(self):
        with self.lock:
            i = self.hits
            self.hits += 1
        return self.script[min(i, len(self.script) - 1)]


def ok(text: str):
    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}]}, {}


def echo_content(body: dict):
    return ok("echo:" + body["messages"][-1]["content"])


@contextmanager
def scripted_server(script, delay_s: float = 0.0):
    state = Scripted(script, delay_s)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with state.lock:
                state.auth.append(self.headers.get("Authorization"))
                state.bodies.append(body)
                state.in_flight += 1
                state.peak = max(state.peak, state.in_flight)
            try:
                if state.delay_s:
                    time.sleep(state.delay_s)
                item = state.next()
                status, payload, headers = item(body) if callable(item) else item
                if callable(payload):
                    payload = payload(self.headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def log_message(self, *args):  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive()


def config(base_url: str, **kw) -> LLMConfig:
    kw = {"model": "m", "timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.02, "backoff_max_s": 0.2, **kw}
    return LLMConfig(base_url=base_url, **kw)


def retry_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and "retrying in" in r.getMessage()]


# ---- fast tests ----

def test_server_down_fails_after_exactly_max_retries_plus_one_attempts(caplog):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with LLMClient(config(url, max_retries=3)) as client, pytest.raises(LLMError) as ei:
        t0 = time.monotonic()
        try:
            client.chat("hello?")
        finally:
            elapsed = time.monotonic() - t0
    e = ei.value
    assert isinstance(e, SaerayError) and e.exit_code == 1
    assert e.attempts == 4 and e.retryable
    assert len(retry_records(caplog)) == 3  # one WARNING per retry, none after the last attempt
    assert url in str(e) and "4 attempt(s)" in str(e) and "max_retries=3" in str(e)
    assert "Connection refused" in str(e) and "connection error" in e.last_cause
    assert elapsed < 5.0, elapsed  # backoff 0.02 * (1, 2, 4) at most: no hang


def test_transient_failures_are_retried_then_succeed(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    script = [(503, {"error": "loading"}, {}), (429, {"error": "slow down"}, {"Retry-After": "0.05"}),
              (502, {"error": "bad gateway"}, {}), ok("fine")]
    with scripted_server(script) as (url, srv), LLMClient(config(url, max_retries=3)) as client:
        assert client.chat("hi") == "fine"
    assert srv.hits == 4
    causes = [r.getMessage() for r in retry_records(caplog)]
    assert len(causes) == 3 and "HTTP 503" in causes[0] and "HTTP 502" in causes[2]
    assert "HTTP 429" in causes[1] and "retrying in 0.05s" in causes[1]  # Retry-After honoured


def test_5xx_gives_up_after_bounded_retries():
    with scripted_server([(500, {"error": "boom"}, {})]) as (url, srv), \
            LLMClient(config(url, max_retries=2)) as client, pytest.raises(LLMError) as ei:
        client.chat("hi")
    assert srv.hits == 3 and ei.value.attempts == 3 and ei.value.status_code == 500
    assert "HTTP 500: boom" in str(ei.value) and url in str(ei.value)


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(status):
    with scripted_server([(status, {"error": {"message": f"nope {status}"}}, {})]) as (url, srv), \
            LLMClient(config(url, max_retries=3)) as client, pytest.raises(LLMError) as ei:
        client.chat("hi")
    assert srv.hits == 1 and ei.value.attempts == 1 and not ei.value.retryable
    assert f"HTTP {status}: nope {status}" in str(ei.value) and "not retried" in str(ei.value)


def test_200_without_message_is_an_error_not_a_hang():
    with scripted_server([(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                 "choices": []}, {})]) as (url, srv), \
            LLMClient(config(url)) as client, pytest.raises(LLMError, match="without a message"):
        client.chat("hi")
    assert srv.hits == 1


def test_request_carries_model_and_sampling_options():
    with scripted_server([ok("a")]) as (url, srv), \
            LLMClient(config(url, temperature=0.3, max_tokens=17)) as client:
        client.chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        client.chat("v", max_tokens=5)
    first, second = srv.bodies
    assert first["model"] == "m" and first["temperature"] == 0.3 and first["max_tokens"] == 17
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert second["max_tokens"] == 5 and second["messages"] == [{"role": "user", "content": "v"}]


def test_chat_many_keeps_order_and_bounds_concurrency():
    prompts = [f"p{i}" for i in range(8)]
    with scripted_server([echo_content], delay_s=0.15) as (url, srv), \
            LLMClient(config(url, max_concurrency=3)) as client:
        answers = client.chat_many(prompts)
    assert answers == [f"echo:{p}" for p in prompts]
    assert srv.hits == 8 and 2 <= srv.peak <= 3, srv.peak


def test_chat_many_reports_the_failing_conversation():
    def by_prompt(body):
        if body["messages"][-1]["content"] == "bad":
            return 400, {"error": "rejected"}, {}
        return echo_content(body)

    with scripted_server([by_prompt]) as (url, srv), LLMClient(config(url, max_concurrency=2)) as client:
        with pytest.raises(LLMError, match="conversation 1 of 3"):
            client.chat_many(["a", "bad", "c"])
        out = client.chat_many(["a", "bad", "c"], return_exceptions=True)
    assert out[0] == "echo:a" and isinstance(out[1], LLMError) and out[2] == "echo:c"


def test_api_key_is_sent_but_never_logged_nor_in_errors(monkeypatch, caplog):
    monkeypatch.setenv("SAERAY_TEST_LLM_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # every logger, the transport's included

    def echo_auth(headers):  # like hosted APIs that quote the key they rejected
        return {"error": {"message": f"retry later, key {headers.get('Authorization')}"}}

    def reject_auth(headers):
        return {"error": {"message": f"Incorrect API key provided: {headers.get('Authorization')}"}}

    errors = []
    with scripted_server([(503, echo_auth, {}), (401, reject_auth, {})]) as (url, srv):
        client = LLMClient(config(url, api_key_env="SAERAY_TEST_LLM_KEY", max_retries=2))
        with client, pytest.raises(LLMError) as ei:
            client.chat("hi")
        errors.append(ei.value)
        assert srv.auth == [f"Bearer {SECRET}"] * 2  # it was sent, as the Authorization header only
        assert "SAERAY_TEST_LLM_KEY" in str(ei.value)  # the hint names the variable, not the value
        assert ei.value.status_code == 401 and "***" in str(ei.value)
        reprs = [repr(client), repr(client.config)]
    down = LLMClient(config(f"http://127.0.0.1:{free_port()}/v1", api_key_env="SAERAY_TEST_LLM_KEY",
                            max_retries=1))
    with down, pytest.raises(LLMError) as ei:
        down.chat("hi")
    errors.append(ei.value)

    assert len(retry_records(caplog)) == 2  # the 503 retry and the connection-error retry were logged
    for record in caplog.records:
        assert SECRET not in record.getMessage() and SECRET not in str(record.args)
    assert SECRET not in caplog.text
    for e in errors:
        # nothing chained: the transport's exceptions hold the request and its headers
        assert e.__cause__ is None and e.__suppress_context__
        for text in (str(e), repr(e), e.last_cause, str(e.args)):
            assert SECRET not in text
    for text in reprs:
        assert SECRET not in text


def test_missing_key_variable_is_an_input_error(monkeypatch):
    monkeypatch.delenv("SAERAY_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(InputError, match="SAERAY_TEST_NO_SUCH_KEY is not set"):
        LLMClient(config("http://127.0.0.1:1/v1", api_key_env="SAERAY_TEST_NO_SUCH_KEY"))


@pytest.mark.parametrize("bad", [{"base_url": "127.0.0.1:8000"}, {"max_retries": -1}, {"timeout_s": 0},
                                 {"max_concurrency": 0}, {"max_tokens": 0}, {"model": ""}])
def test_config_is_validated(bad):
    kw = {"base_url": "http://127.0.0.1:8000/v1", "model": "m", **bad}
    with pytest.raises(InputError):
        LLMConfig(**kw)


def test_llm_error_pickles_with_its_attributes():
    import pickle

    e = LLMError("msg", base_url="http://h/v1", attempts=3, last_cause="c", status_code=503, retryable=True)
    e2 = pickle.loads(pickle.dumps(e))
    assert (str(e2), e2.base_url, e2.attempts, e2.last_cause, e2.status_code, e2.retryable) == \
        ("msg", "http://h/v1", 3, "c", 503, True)


# ---- against a real `transformers serve` (SmolLM2-135M-Instruct on CPU) ----

@pytest.mark.slow
def test_real_server_answers(llm_server):
    base_url, model_id = llm_server
    with LLMClient(LLMConfig(base_url=base_url, model=model_id, timeout_s=120, max_tokens=32)) as client:
        answer = client.chat([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_real_server_chat_many_in_order(llm_server):
    base_url, model_id = llm_server
    questions = {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo"}
    with LLMClient(LLMConfig(base_url=base_url, model=model_id, timeout_s=180, max_tokens=24,
                             max_concurrency=2)) as client:
        answers = client.chat_many([f"What is the capital of {c}?" for c in questions])
    assert len(answers) == 3
    for answer, city in zip(answers, questions.values()):
        assert city in answer, answers


@pytest.mark.slow
def test_real_server_wrong_model_id_is_not_retried(llm_server):
    base_url, _ = llm_server
    with LLMClient(LLMConfig(base_url=base_url, model="not-the-served-model", max_retries=3)) as client, \
            pytest.raises(LLMError) as ei:
        client.chat("hi")
    assert ei.value.status_code == 400 and ei.value.attempts == 1 and "pinned" in str(ei.value)


@pytest.mark.slow
def test_real_server_too_slow_fails_after_bounded_retries(llm_server, caplog):
    """A 0.05 s timeout against real generation: LLMError after max_retries+1 attempts, no hang. The
    server (sequential, non-streaming) finishes the abandoned generations anyway, so max_tokens is
    large for the timeout but small in absolute terms, and a patient request afterwards shows the
    server recovers."""
    base_url, model_id = llm_server
    caplog.set_level(logging.WARNING, logger=LOGGER)
    slow = LLMConfig(base_url=base_url, model=model_id, timeout_s=0.05, max_retries=1, backoff_base_s=0.05,
                     max_tokens=64)
    with LLMClient(slow) as client, pytest.raises(LLMError) as ei:
        t0 = time.monotonic()
        try:
            client.chat("Write a long story about a dragon who learns to bake bread.")
        finally:
            elapsed = time.monotonic() - t0
    assert ei.value.attempts == 2 and ei.value.retryable and "timed out after 0.05s" in str(ei.value)
    assert len(retry_records(caplog)) == 1
    assert elapsed < 5.0, elapsed

    with LLMClient(LLMConfig(base_url=base_url, model=model_id, timeout_s=300, max_tokens=16)) as client:
        assert "Paris" in client.chat("What is the capital of France?")
