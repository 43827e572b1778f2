"""An OpenAI-compatible chat client for the methods that need a language model (explainers, judges).

It speaks ``POST {base_url}/chat/completions`` to any OpenAI-compatible server: vLLM
(``vllm serve``), hosted APIs, or ``transformers serve`` on loopback (docs/llm.md).

Policy (ours, not the transport's)
----------------------------------
* **Timeout**: ``timeout_s`` bounds every phase of one request (connect, write, each read, waiting
  for a pooled connection). A non-streaming completion sends nothing until it is done, so for
  an answer it is in effect the time the server may spend generating.
* **Retries**: at most ``max_retries`` retries (``max_retries + 1`` attempts), only for failures that
  may pass: connection errors, timeouts, HTTP 429 and 5xx. Any other answer (400, 401, 403, 404,
  422, a 200 without a message) fails at once. Between attempts: exponential backoff
  ``backoff_base_s * 2**(retry-1)``, capped at ``backoff_max_s``, times a random factor in
  [0.5, 1] (jitter, so that many workers do not retry in lockstep); a ``Retry-After`` header of a
  429/503 is honoured up to ``backoff_max_s``. Every retry is logged at WARNING (URL, attempt,
  cause, delay). After the last attempt :class:`LLMError` is raised; its message names the base
  URL, the attempts made and the last cause. The total time is therefore bounded by about
  ``(max_retries + 1) * timeout_s`` (x the phases) plus the backoff: no hang.
* **Concurrency**: at most ``max_concurrency`` requests of one client are in flight at once, from
  :meth:`LLMClient.chat_many` and from any number of threads calling :meth:`LLMClient.chat` (one
  semaphore per client). A request holds its slot for one attempt, not while it backs off.
* **Rate**: with ``requests_per_s`` set, request starts (retries included) are spaced at least
  ``1 / requests_per_s`` seconds apart, whichever thread sends them.
* **The API key** is read from the environment variable named by ``api_key_env`` (the config holds
  the variable's *name*, never the value). It is sent only as the ``Authorization`` header; it is
  never logged, and every text that reaches a log record or an exception (including a server's
  error message that echoes it) is scrubbed of it. :class:`LLMError` does not chain the transport's
  exception (``raise ... from None``), whose request/response objects carry the headers.

Why the ``openai`` package rather than raw httpx: it is the reference client of the API that vLLM,
``transformers serve`` and the hosted providers implement (request/response types, error classes
by status), it is already a dependency of ``transformers[serving]``, and its logging never prints
headers. Its own retry loop is switched off (``max_retries=0``) so that the policy above is the
only one: without that, each of our attempts would hide up to two more of its own, with its own
backoff, and neither the attempt count nor the time bound would hold.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import InputError, SaerayError

log = logging.getLogger(__name__)

Message = Mapping[str, str]
Messages = Sequence[Message] | str

_PLACEHOLDER_KEY = "EMPTY"  # servers without auth (vLLM, transformers serve) ignore the header


class LLMError(SaerayError):
    """A chat request failed for good: after the bounded retries, or at once when the failure cannot
    pass by retrying (bad request, auth, unknown model). The message names the base URL, the
    attempts made and the last cause; the same facts are attributes. Never contains the API key."""

    def __init__(self, message: str, *, base_url: str, attempts: int, last_cause: str,
                 status_code: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.base_url = base_url
        self.attempts = attempts
        self.last_cause = last_cause
        self.status_code = status_code
        self.retryable = retryable

    def __reduce__(self):  # picklable across Ray/multiprocessing with its attributes
        return (_rebuild_llm_error, (self.args[0], self.base_url, self.attempts, self.last_cause,
                                     self.status_code, self.retryable))


def _rebuild_llm_error(message, base_url, attempts, last_cause, status_code, retryable):
    return LLMError(message, base_url=base_url, attempts=attempts, last_cause=last_cause,
                    status_code=status_code, retryable=retryable)


@dataclass(frozen=True)
class LLMConfig:
    """Where the chat model is and how hard to try.

    ``base_url`` is the OpenAI-compatible root including its version path, e.g.
    ``http://127.0.0.1:8000/v1`` (vLLM, transformers serve) or ``https://api.openai.com/v1``.
    ``api_key_env`` is the *name* of the environment variable holding the key (``None``: the
    server needs none). ``model`` is the id the server expects (``GET {base_url}/models``).
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_concurrency: int = 4
    temperature: float = 0.0
    max_tokens: int = 256
    requests_per_s: float | None = None   # at most this many request starts per second (None: no limit)

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise InputError(f"llm.base_url: {self.base_url!r} is not an http(s) URL "
                             "(e.g. http://127.0.0.1:8000/v1)")
        if not self.model:
            raise InputError("llm.model: empty; give the model id the server lists at GET {base_url}/models")
        for name in ("timeout_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"llm.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.backoff_base_s < 0:
            raise InputError(f"llm.backoff_base_s: must be >= 0, got {self.backoff_base_s!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InputError(f"llm.max_retries: must be an integer >= 0, got {self.max_retries!r}")
        if not isinstance(self.max_concurrency, int) or self.max_concurrency < 1:
            raise InputError(f"llm.max_concurrency: must be an integer >= 1, got {self.max_concurrency!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"llm.max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if self.requests_per_s is not None and not self.requests_per_s > 0:
            raise InputError(f"llm.requests_per_s: must be > 0 (or unset), got {self.requests_per_s!r}")
        if self.temperature < 0:
            raise InputError(f"llm.temperature: must be >= 0, got {self.temperature!r}")
        if self.api_key_env is not None and not self.api_key_env:
            raise InputError("llm.api_key_env: empty; give the name of an environment variable or leave it unset")


class _Failure(Exception):
    """One failed attempt, already described without secrets."""

    def __init__(self, cause: str, retryable: bool, status_code: int | None = None,
                 retry_after: float | None = None):
        super().__init__(cause)
        self.cause = cause
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after = retry_after


class LLMClient:
    """Chat completions against one OpenAI-compatible endpoint, with :class:`LLMConfig`'s policy.

    Thread-safe; use as a context manager or call :meth:`close` to release connections."""

    def __init__(self, config: LLMConfig):
        import openai

        self.config = config
        key = None
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise InputError(f"llm.api_key_env: the environment variable {config.api_key_env} is not set "
                                 "(or empty); export the API key there")
        self._secret = key  # only used to scrub texts; never formatted
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._pace = threading.Lock()
        self._next_start = 0.0
        self._client = openai.OpenAI(
            api_key=key or _PLACEHOLDER_KEY,
            base_url=config.base_url,
            timeout=openai.Timeout(config.timeout_s),
            max_retries=0,  # ours is the only retry loop (module docstring)
        )

    def __repr__(self) -> str:
        c = self.config
        return f"LLMClient(base_url={c.base_url!r}, model={c.model!r}, api_key_env={c.api_key_env!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- public API ----

    def chat(self, messages: Messages, **overrides) -> str:
        """The assistant's answer to ``messages`` (a list of ``{"role", "content"}`` dicts, or a
        plain string taken as one user message). ``overrides`` may set ``temperature`` and
        ``max_tokens`` for this call. Raises :class:`LLMError` after the bounded retries."""
        msgs = _normalise(messages)
        params = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        unknown = set(overrides) - set(params)
        if unknown:
            raise InputError(f"chat(): unknown option(s) {sorted(unknown)}; allowed: temperature, max_tokens")
        params.update(overrides)
        return self._with_retries(msgs, params)

    def chat_many(self, conversations: Sequence[Messages], *, return_exceptions: bool = False,
                  **overrides) -> list:
        """Answers to many conversations, in the order given, at most ``max_concurrency`` at once.

        If any fails, the first failure (in input order) is raised once all have finished, with its
        index in the message; ``return_exceptions=True`` puts each :class:`LLMError` in its place
        instead."""
        convs = [_normalise(m) for m in conversations]  # validate all before sending any
        if not convs:
            return []
        workers = min(self.config.max_concurrency, len(convs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="saeray-llm") as pool:
            futures = [pool.submit(self.chat, m, **overrides) for m in convs]
            results: list = []
            for f in futures:
                try:
                    results.append(f.result())
                except LLMError as e:
                    results.append(e)
        if not return_exceptions:
            for i, r in enumerate(results):
                if isinstance(r, LLMError):
                    raise LLMError(f"conversation {i} of {len(results)}: {r}", base_url=r.base_url,
                                   attempts=r.attempts, last_cause=r.last_cause, status_code=r.status_code,
                                   retryable=r.retryable) from None
        return results

    # ---- internals ----

    def _with_retries(self, messages: list[dict], params: dict) -> str:
        cfg = self.config
        total = cfg.max_retries + 1
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._slots:
                    self._wait_turn()
                    return self._attempt(messages, params)
            except _Failure as f:
                failure = f
            if not failure.retryable or attempt >= total:
                break
            delay = self._backoff(attempt, failure.retry_after)
            log.warning("LLM request to %s failed (attempt %d/%d: %s); retrying in %.2fs",
                        cfg.base_url, attempt, total, failure.cause, delay)
            time.sleep(delay)

        if failure.retryable:
            what = f"failed after {attempt} attempt(s) (max_retries={cfg.max_retries})"
        else:
            what = f"failed after {attempt} attempt(s) (not retried: {_not_retried_hint(failure.status_code)})"
        msg = f"LLM request to {cfg.base_url} (model {cfg.model!r}) {what}; last cause: {failure.cause}"
        hint = _hint(failure, cfg)
        if hint:
            msg += f". {hint}"
        raise LLMError(self._scrub(msg), base_url=cfg.base_url, attempts=attempt, last_cause=failure.cause,
                       status_code=failure.status_code, retryable=failure.retryable) from None

    def _attempt(self, messages: list[dict], params: dict) -> str:
        import openai

        try:
            resp = self._client.chat.completions.create(model=self.config.model, messages=messages, **params)
        except openai.APITimeoutError:
            raise _Failure(f"timed out after {self.config.timeout_s:g}s", retryable=True) from None
        except openai.APIConnectionError as e:
            raise _Failure(self._scrub(f"connection error ({_root_cause(e)})"), retryable=True) from None
        except openai.APIStatusError as e:
            code = e.status_code
            retryable = code == 429 or code >= 500
            raise _Failure(self._scrub(f"HTTP {code}: {_status_text(e)}"), retryable=retryable, status_code=code,
                           retry_after=_retry_after(e) if code in (429, 503) else None) from None
        except openai.OpenAIError as e:  # e.g. an unparseable body
            raise _Failure(self._scrub(f"{type(e).__name__}: {_short(str(e))}"), retryable=False) from None
        choices = getattr(resp, "choices", None) or []
        content = choices[0].message.content if choices and choices[0].message is not None else None
        if content is None:
            raise _Failure("the server answered 200 without a message (no choices or no content)",
                           retryable=False, status_code=200)
        return content

    def _wait_turn(self) -> None:
        """Space request starts ``1 / requests_per_s`` apart across this client's threads (retries
        included: a provider's rate limit counts them too)."""
        if self.config.requests_per_s is None:
            return
        with self._pace:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + 1.0 / self.config.requests_per_s
        if start > now:
            time.sleep(start - now)

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            return min(cfg.backoff_max_s, max(0.0, retry_after))
        base = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** (retry - 1)))
        return base * random.uniform(0.5, 1.0)

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text


def _normalise(messages: Messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InputError(f"messages[{i}]: expected a {{'role': ..., 'content': ...}} mapping, "
                             f"got {type(m).__name__}")
        out.append(dict(m))
    if not out:
        raise InputError("messages: empty; give at least one {'role': 'user', 'content': ...}")
    return out


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _root_cause(e: BaseException) -> str:
    """The innermost exception's text (e.g. "[Errno 111] Connection refused"); the transport's
    wrapper only says "Connection error."."""
    inner = e
    seen = 0
    while (inner.__cause__ or inner.__context__) is not None and seen < 10:
        inner = inner.__cause__ or inner.__context__
        seen += 1
    text = str(inner) or type(inner).__name__
    return _short(f"{type(inner).__name__}: {text}" if inner is not e else text, 200)


def _status_text(e) -> str:
    body = getattr(e, "body", None)  # the parsed JSON body, or its "error" member
    if isinstance(body, str) and body.strip():
        return _short(body)
    if isinstance(body, Mapping):
        detail = body.get("error") or body.get("detail") or body.get("message")
        if isinstance(detail, Mapping):
            detail = detail.get("message") or detail
        if detail:
            return _short(str(detail))
    return _short(getattr(e, "message", "") or str(e))


def _retry_after(e) -> float | None:
    try:
        value = e.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def _not_retried_hint(code: int | None) -> str:
    return f"HTTP {code} does not pass by retrying" if code else "the answer was not usable"


def _hint(f: _Failure, cfg: LLMConfig) -> str:
    if f.status_code in (401, 403):
        src = f"the environment variable {cfg.api_key_env}" if cfg.api_key_env else "no key (api_key_env unset)"
        return f"Check the API key: it comes from {src}"
    if f.status_code in (400, 404):
        return f"Check the model id {cfg.model!r} against GET {cfg.base_url.rstrip('/')}/models and the base URL"
    if f.cause.startswith("connection error"):
        return f"Is an OpenAI-compatible server listening at {cfg.base_url}?"
    if f.cause.startswith("timed out"):
        return "Raise timeout_s or lower max_tokens, or check the server's load"
    return ""
