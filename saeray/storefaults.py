"""S3 faults: one bounded retry budget for every request, and errors a user can act on.

Retries happen in one place, :meth:`RetryingS3FileSystem._call_s3`, which every s3fs request
goes through (reads, writes, multipart parts, listing pages). botocore's own retries are switched
off (``total_max_attempts: 1``) and s3fs's ``retries`` only re-reads a response body that broke
mid-stream; a request whose budget is spent raises :class:`StoreUnavailable`, which s3fs does not
retry, so budgets never multiply. botocore's standard mode was not used: its delays are fully
random (an outage it rides out is a matter of luck) and its per-client retry quota gives up early
once many requests fail together, which is exactly an outage.

Transient (retried): connection refused / reset / closed, connect and read timeouts, HTTP 5xx,
throttling (SlowDown, 429, ...). Everything else fails at once: a missing key stays s3fs's
``FileNotFoundError``; missing or rejected credentials, access denied and a missing bucket become
:class:`~saeray.errors.InputError` messages naming the ``store.*`` field to fix (exit 2).

Messages name fields (``store.key``), never their values: a key id or secret must not reach a log.
"""
from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass
from http.client import IncompleteRead

import fsspec
from fsspec.asyn import sync_wrapper
from s3fs import S3FileSystem
from s3fs.errors import translate_boto_error

from .errors import InputError, SaerayError
from .spec import redact_url


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per request; before try i+1 a pause of ``base * 2**i`` seconds, at most
    ``cap``, each scaled by a random factor in [1 - jitter, 1 + jitter] so that many workers do
    not hit a recovering server in step."""

    attempts: int = 10
    base: float = 0.1
    cap: float = 8.0
    jitter: float = 0.2

    def pause(self, i: int) -> float:
        return min(self.base * 2 ** i, self.cap) * random.uniform(1 - self.jitter, 1 + self.jitter)

    def span(self) -> float:
        """Seconds of pauses over the whole budget, without jitter: the length of an outage (with
        connections refused at once) that a request rides out."""
        return sum(min(self.base * 2 ** i, self.cap) for i in range(self.attempts - 1))


# A start-of-run check that cannot reach the store is a configuration problem: fail fast.
CHECK_POLICY = RetryPolicy(attempts=3)

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
                   "TooManyRequestsException", "RequestThrottled", "RequestThrottledException",
                   "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException",
                   "InternalError", "ServiceUnavailable", "XAmzContentSHA256Mismatch"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "InvalidClientTokenId", "TokenRefreshRequired", "AuthorizationHeaderMalformed"}


class StoreUnavailable(SaerayError):
    """The store did not answer within the retry budget (exit 1; a re-run resumes)."""


def _transient_types() -> tuple[type, ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from botocore.parsers import ResponseParserError
    from fsspec.exceptions import FSTimeoutError

    types: list[type] = [BotoConnectionError, HTTPClientError, ResponseParserError, FSTimeoutError, socket.timeout,
                         asyncio.TimeoutError, ConnectionError, IncompleteRead]
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    except ImportError:  # pragma: no cover - aiobotocore depends on aiohttp
        pass
    return tuple(types)


def _status_and_code(e: BaseException) -> tuple[int | None, str]:
    resp = getattr(e, "response", None)
    if not isinstance(resp, dict):
        return None, ""
    return resp.get("ResponseMetadata", {}).get("HTTPStatusCode"), str(resp.get("Error", {}).get("Code", ""))


def is_transient(e: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        status, code = _status_and_code(e)
        return code in _THROTTLE_CODES or status in (429, 500, 502, 503, 504)
    return isinstance(e, _transient_types())


@dataclass(frozen=True)
class Where:
    """What a message says about the store: its URL and endpoint (both secret-free)."""

    url: str
    endpoint: str

    def endpoint_text(self) -> str:
        return f"store.endpoint_url {self.endpoint}" if self.endpoint else "the AWS default endpoint (store.endpoint_url unset)"


def unavailable(where: Where, last: BaseException, policy: RetryPolicy, elapsed: float) -> StoreUnavailable:
    e = StoreUnavailable(
        f"store: {where.url} did not answer at {where.endpoint_text()}: {_short(last)} (still failing after "
        f"{policy.attempts} attempts over {elapsed:.0f} s; store.retries = {policy.attempts}). The run stopped here and "
        "everything it finished is kept: re-run the same command once the store is reachable and it resumes "
        "from there (a larger store.retries rides out longer outages).")
    e.reason = _short(last)
    return e


def as_input_error(e: BaseException, where: Where, bucket: str) -> InputError | None:
    """The configuration problem behind ``e`` as an InputError, or None if ``e`` is not one."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return InputError(
            f"store: no S3 credentials were found for {where.url} ({where.endpoint_text()}). Set store.key and "
            "store.secret in the spec (as ${ENV_VAR} placeholders) or export AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for saeray and every Ray process, then re-run.")
    if not isinstance(e, ClientError):
        return None
    status, code = _status_and_code(e)
    if code in _CREDENTIAL_CODES:
        return InputError(
            f"store: the S3 service at {where.endpoint_text()} rejected the credentials for {where.url} ({code}). "
            "Check store.key and store.secret (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): the key id must "
            "exist on that service and the secret must be its pair; then re-run.")
    if code == "NoSuchBucket":
        return InputError(
            f"store: the bucket '{bucket}' of store.url {where.url} does not exist at {where.endpoint_text()}. "
            f"Create it first (e.g. `aws s3 mb s3://{bucket}"
            + (f" --endpoint-url {where.endpoint}" if where.endpoint else "") + "`) or fix store.url, then re-run.")
    if code in ("AccessDenied", "AllAccessDisabled", "Forbidden") or status == 403:
        return InputError(
            f"store: access to {where.url} was denied at {where.endpoint_text()} ({code or status}). The "
            "credentials in store.key / store.secret (or the AWS environment) need s3:GetObject, s3:PutObject, "
            "s3:DeleteObject and s3:ListBucket on that bucket and prefix; fix the policy or the credentials, then "
            "re-run.")
    return None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class RetryingS3FileSystem(S3FileSystem):
    """s3fs with saeray's retry budget (:class:`RetryPolicy`) and messages. Keyword ``attempts``
    sets the budget, ``store_url`` the URL messages name. A module-level class: Ray Train pickles
    the filesystem by reference to it."""

    def __init__(self, *args, attempts: int = RetryPolicy.attempts, store_url: str = "", **kwargs):
        cfg = dict(kwargs.pop("config_kwargs", None) or {})
        cfg["retries"] = {"total_max_attempts": 1}  # one retry layer: ours
        super().__init__(*args, config_kwargs=cfg, **kwargs)
        self.retries = 3  # s3fs's own loop now only re-reads a response body that broke mid-stream
        self.policy = RetryPolicy(attempts=max(1, int(attempts)))
        self.store_url = store_url

    def _where(self) -> Where:
        endpoint = (self.client_kwargs or {}).get("endpoint_url") or ""
        return Where(url=self.store_url or "the S3 store", endpoint=redact_url(endpoint) if endpoint else "")

    async def _call_s3(self, method, *akwarglist, **kwargs):
        await self.set_session()
        s3 = await self.get_s3(kwargs.get("Bucket"))
        meth = getattr(s3, method)
        call_kwargs = self._get_s3_method_kwargs(meth, *akwarglist, **kwargs)
        t0 = time.monotonic()
        for i in range(self.policy.attempts):
            try:
                return await meth(**call_kwargs)
            except Exception as e:  # noqa: BLE001 - classified below
                bad_input = as_input_error(e, self._where(), kwargs.get("Bucket", ""))
                if bad_input is not None:
                    raise bad_input from None
                if not is_transient(e):
                    raise translate_boto_error(e) from None
                if i + 1 == self.policy.attempts:
                    raise unavailable(self._where(), e, self.policy, time.monotonic() - t0) from None
                await asyncio.sleep(self.policy.pause(i))

    # S3File's commits and uploads come through here; s3fs binds it to its own _call_s3
    call_s3 = sync_wrapper(_call_s3)


_REGISTERED = False


def s3_class() -> type:
    """The s3fs subclass saeray opens S3 stores with, registered as fsspec's ``s3`` implementation."""
    global _REGISTERED
    if not _REGISTERED:
        fsspec.register_implementation("s3", RetryingS3FileSystem, clobber=True)
        _REGISTERED = True
    return RetryingS3FileSystem


def check_writable(store) -> None:
    """:meth:`saeray.store.Store.check_writable`: write and delete one hidden probe object."""
    import uuid

    name = f".tmp-probe-{uuid.uuid4().hex[:12]}"
    if store.is_local:
        _check_local(store.root, name)
        return
    cls = s3_class()
    fs = store.fs
    # the start check fails fast: a fresh client with a short budget, the store's own settings otherwise
    probe_fs = cls(**{**fs.storage_options, "attempts": min(CHECK_POLICY.attempts, fs.policy.attempts)}) \
        if isinstance(fs, cls) else fs
    bucket = store.root.split("/", 1)[0]
    endpoint = (getattr(probe_fs, "client_kwargs", None) or {}).get("endpoint_url")
    where = Where(url=store.url, endpoint=redact_url(endpoint) if endpoint else "")
    path = f"{store.root}/{name}"
    try:
        probe_fs.pipe_file(path, b"saeray write probe\n")
        probe_fs.rm_file(path)
    except InputError:
        raise
    except StoreUnavailable as e:
        raise InputError(
            f"store: cannot reach {where.endpoint_text()} for store.url {store.url}: "
            f"{getattr(e, 'reason', e)}. Check store.endpoint_url (or "
            "AWS_ENDPOINT_URL) and that the service is up and reachable from here and from every Ray node, then "
            "re-run; nothing was written.") from None
    except FileNotFoundError as e:
        raise InputError(
            f"store: the bucket '{bucket}' of store.url {store.url} was not found at {where.endpoint_text()} ({e}); "
            f"create it first (e.g. `aws s3 mb s3://{bucket}`) or fix store.url, then re-run.") from None
    except PermissionError:
        raise InputError(
            f"store: writing to {store.url} was denied at {where.endpoint_text()}; the credentials in store.key / "
            "store.secret (or the AWS environment) need s3:PutObject and s3:DeleteObject there. Fix the policy or "
            "the credentials, then re-run.") from None
    except OSError as e:
        raise InputError(f"store: could not write a probe object to {store.url} at {where.endpoint_text()}: "
                         f"{_short(e)}; check store.url and store.endpoint_url, then re-run.") from None


def _check_local(root: str, name: str) -> None:
    """Probe the store folder, or the nearest folder above it that exists: nothing is created
    for a start that fails."""
    import os

    d = root
    while not os.path.isdir(d):
        if os.path.exists(d):
            raise InputError(f"store: store.url {root} is not a folder: {d} is a file; choose a folder for store.url "
                             "(or --store), then re-run.")
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    probe = os.path.join(d, name)
    try:
        with open(probe, "wb") as f:
            f.write(b"saeray write probe\n")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"store: the store folder {root} cannot be written ({d}: {e.strerror or e}); choose a "
                         "folder you can write for store.url (or --store), or fix its permissions, then re-run.") from None
