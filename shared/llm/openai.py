"""A Model for any OpenAI-compatible Chat Completions endpoint, streamed over SSE.

Only the standard library is used (http.client, ssl, json): no new dependency, and
stdlib sockets are what gevent monkey-patches, so one call blocks one greenlet only.
The environment is deliberately not read here; the caller passes base_url/api_key.
"""
from __future__ import annotations

import http.client
import json
import random
import ssl
import time
import urllib.parse
from typing import Any

from shared.llm.base import (
    ChatMessage,
    ModelError,
    ModelResponse,
    OnDelta,
    ToolCallRequest,
    TransientModelError,
    Usage,
)
from shared.llm.interrupt import CallScope, current_scope
from shared.llm.retry import RetryBudget

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_BACKOFF = 20.0
# Default retry budget of one call (STEPRUN_MODEL_RETRY_SECONDS for agents served by steprun).
BUDGET_SECONDS = 30.0
# 408/409 are "try again" answers too; everything else in 4xx is the request's fault.
RETRYABLE_STATUS = {408, 409, 429}


class _Retryable(Exception):
    """This attempt failed in a way a new one may fix. Private (not TransientModelError) so
    nothing ``on_delta`` raises can be mistaken for a network failure and retried."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Attempt:
    """What one streamed attempt has accumulated so far."""

    def __init__(self) -> None:
        self.sent_at = time.monotonic()
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.ttft: float | None = None
        self.emitted = False  # True once on_delta has been called: retrying would duplicate

    def first_token(self) -> None:
        self.ttft = time.monotonic() - self.sent_at if self.ttft is None else self.ttft


def _error_message(body: bytes) -> str:
    """The provider's own words: error.message from a JSON body, else the raw body."""
    text = body.decode("utf-8", "replace")
    try:
        err = json.loads(text).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            text = str(msg)
    except (ValueError, AttributeError):
        pass
    return text.strip()[:500]


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is rare from LLM APIs and is ignored."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _parse_arguments(raw: str) -> dict[str, Any]:
    """Tool arguments are model output: keep a malformed string rather than crash the run."""
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {"_raw": raw}
    return parsed if isinstance(parsed, dict) else {"_raw": raw}


class OpenAIModel:
    """Streams Chat Completions from OpenAI or any server speaking its wire format."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, backoff_base: float = 0.5,
                 budget_seconds: float = BUDGET_SECONDS):
        self.model = model
        self.name = f"openai:{model}"
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key
        # A socket timeout bounds each read, not the whole stream: a long answer that
        # keeps streaming is fine, a server that goes silent for `timeout` s is not.
        self.timeout = timeout
        # The retry budget: at most max_retries + 1 requests, none started past budget_seconds.
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.budget_seconds = budget_seconds
        self._rand = random.random  # the jitter's source (a test pins it)
        url = urllib.parse.urlsplit(self.base_url + "/chat/completions")
        host = url.hostname
        if url.scheme not in ("http", "https") or not host:
            raise ValueError(f"bad base_url: {self.base_url!r}")
        self._url, self._host = url, host
        # One TLS context per model: loading the CA bundle per request would cost milliseconds.
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None

    def generate(self, messages: list[ChatMessage], tools: list[dict[str, Any]], on_delta: OnDelta,
                 *, max_output_tokens: int | None = None) -> ModelResponse:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        if tools:  # some servers reject an empty "tools" list
            body["tools"] = tools
        if max_output_tokens is not None:
            body["max_tokens"] = max_output_tokens
        payload = json.dumps(body).encode("utf-8")

        budget = RetryBudget(self.max_retries + 1, self.budget_seconds, base=self.backoff_base, cap=MAX_BACKOFF,
                             rand=self._rand)
        scope = current_scope()
        while True:
            state = _Attempt()
            budget.attempt()
            try:
                return self._attempt(payload, on_delta, state, scope)
            except _Retryable as exc:
                scope.check()  # the step was stopped (time limit, cancel): that, not a retry
                delay = budget.next_delay(exc.retry_after)
                if state.emitted:
                    # The caller already showed part of this answer; a fresh attempt would stream a
                    # different one after it: the step is re-run (its text restarts), after a backoff.
                    self._sleep(min(delay if delay is not None else self.backoff_base, MAX_BACKOFF))
                    raise TransientModelError(f"{self.name}: stream broke mid-answer: {exc}") from exc
                if delay is None:
                    # The step's budget is spent: the turn fails with the provider's last words, rather
                    # than the queue re-running the step (and its budget) again.
                    raise ModelError(f"{self.name}: gave up after {budget.describe()}: {exc}") from exc
                self._sleep(min(delay, MAX_BACKOFF))

    def _sleep(self, seconds: float) -> None:
        current_scope().sleep(seconds)  # a step's stop cuts the wait short

    def _connect(self) -> http.client.HTTPConnection:
        port = self._url.port
        if self._ssl is not None:
            return http.client.HTTPSConnection(self._host, port, timeout=self.timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, port, timeout=self.timeout)

    def _attempt(self, payload: bytes, on_delta: OnDelta, state: _Attempt, scope: CallScope) -> ModelResponse:
        """One HTTP request. The connection is closed however it ends, on_delta raising included.

        Its socket is registered with the step's call scope, so a stop can cut a blocked read."""
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        path = self._url.path + (f"?{self._url.query}" if self._url.query else "")
        conn = self._connect()
        sock = None
        try:
            try:
                conn.connect()
                sock = conn.sock
                scope.register(sock)
                conn.request("POST", path, body=payload, headers=headers)
                resp = conn.getresponse()
                if resp.status >= 400:
                    message = f"HTTP {resp.status}: {_error_message(resp.read())}"
                    if resp.status in RETRYABLE_STATUS or resp.status >= 500:
                        raise _Retryable(message, _retry_after(resp.getheader("Retry-After")))
                    raise ModelError(f"{self.name}: {message}")
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS
                raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
            # on_delta runs here, outside any except clause: what it raises propagates as is.
            for chunk in self._events(resp):
                self._apply(chunk, on_delta, state)
        finally:
            scope.unregister(sock)
            conn.close()
        return self._response(state)

    def _events(self, resp: http.client.HTTPResponse):
        """Yield the JSON object of each SSE event until [DONE]; network failures -> _Retryable."""
        data: list[str] = []
        saw_done = saw_finish = False
        while True:
            try:
                raw = resp.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(f"stream read failed: {type(exc).__name__}: {exc}") from exc
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
                continue
            if line or not data:
                if not raw:
                    break  # EOF
                continue  # comments (": keep-alive"), event:/id: fields, stray blank lines
            event, data = "\n".join(data), []
            if event.strip() == "[DONE]":
                saw_done = True
                break
            try:
                chunk = json.loads(event)
            except ValueError as exc:
                raise _Retryable(f"malformed stream event: {event[:200]!r}") from exc
            if not isinstance(chunk, dict):
                raise _Retryable(f"unexpected stream event: {event[:200]!r}")
            if chunk.get("error"):
                # Some servers report overload mid-stream as an error event after a 200.
                raise _Retryable(f"error event: {_error_message(event.encode())}")
            saw_finish = saw_finish or any(c.get("finish_reason") for c in chunk.get("choices") or [])
            yield chunk
        # Tolerate servers that omit [DONE], but not a stream cut before the answer ended.
        if not saw_done and not saw_finish:
            raise _Retryable("stream ended before finish_reason or [DONE]")

    def _apply(self, chunk: dict[str, Any], on_delta: OnDelta, state: _Attempt) -> None:
        if chunk.get("usage"):  # the include_usage chunk (empty choices) at the end
            u = chunk["usage"]
            state.usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
        choice = (chunk.get("choices") or [{}])[0]
        if choice.get("finish_reason"):
            state.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        for pos, frag in enumerate(delta.get("tool_calls") or []):
            state.first_token()
            # Fragments are keyed by index: id and name come once, arguments in pieces.
            call = state.calls.setdefault(frag.get("index", pos), {"id": "", "name": "", "args": []})
            fn = frag.get("function") or {}
            call["id"] = frag.get("id") or call["id"]
            call["name"] = fn.get("name") or call["name"]
            if fn.get("arguments"):
                call["args"].append(fn["arguments"])
        content = delta.get("content")
        if content:
            state.first_token()
            state.text.append(content)
            state.emitted = True  # set before the call: if on_delta raises, never retry
            on_delta(content)

    def _response(self, state: _Attempt) -> ModelResponse:
        calls = [ToolCallRequest(c["id"] or f"call_{i}", c["name"], _parse_arguments("".join(c["args"])))
                 for i, c in sorted(state.calls.items())]
        # No usage chunk (server ignored include_usage): count fragments as a rough estimate.
        usage = state.usage or Usage(0, len(state.text))
        finish = state.finish_reason or ("tool_calls" if calls else "stop")
        return ModelResponse("".join(state.text), calls, usage, finish, state.ttft)


def from_settings(model: str, settings: Any) -> OpenAIModel:
    """Build from steprun's settings: endpoint, key, request timeout and the step's retry budget."""
    return OpenAIModel(model, base_url=settings.openai_base_url, api_key=settings.openai_api_key,
                       timeout=settings.model_request_timeout,
                       max_retries=max(0, settings.model_retry_attempts - 1),
                       budget_seconds=settings.model_retry_seconds)


def from_spec(model: str, *, base_url: str | None, api_key: str | None) -> OpenAIModel:
    """Build from the caller's settings (e.g. OPENAI_BASE_URL / OPENAI_API_KEY, read by the caller)."""
    return OpenAIModel(model, base_url=base_url, api_key=api_key)
