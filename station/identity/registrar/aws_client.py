"""The station's one AWS IoT client: threads, rate limits, throttling reports, clear errors.

Every boto3 call leaves the event loop on a dedicated thread pool (the default pool has
min(32, cpus + 4) threads: 6 on the 2-core rig, which would queue 16 boards behind each
other). Before each call a station-wide token bucket per API keeps the whole station
under AWS IoT's per-account quotas; botocore's standard/adaptive retries absorb what
throttling remains. Whenever a board has to wait for either, `on_throttled(api)` tells
the dashboard (on the loop thread).

Errors come out as `AwsError` (a RegistrationError carrying the AWS error code and the
IAM action), with messages an operator can act on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from station.errors import RegistrationError

log = logging.getLogger("station.registrar.aws")

NOT_FOUND = "ResourceNotFoundException"
THROTTLING_CODES = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException",
    "RequestLimitExceeded", "LimitExceededException", "SlowDown",
})
ACCESS_CODES = frozenset({"AccessDeniedException", "AccessDenied", "UnauthorizedException",
                          "ForbiddenException"})
CREDENTIAL_CODES = frozenset({"UnrecognizedClientException", "InvalidClientTokenId",
                              "InvalidSignatureException", "SignatureDoesNotMatch",
                              "ExpiredTokenException", "ExpiredToken"})
TRANSIENT_CODES = THROTTLING_CODES | frozenset({
    "ServiceUnavailableException", "InternalFailureException", "InternalException",
    "InternalServerException", "RequestTimeout", "RequestTimeoutException",
})
DEFAULT_TPS = 10.0
"""For an API the config's tps table does not name (the start-time calls)."""
SLOW_WAIT = 1.0
"""A board that waits longer than this for the limiter shows as throttled."""
MAX_THREADS = 32
"""Threads for boto3 calls: 16 boards with a call each in flight, and room for retries."""
CREDENTIALS_HELP = ("set AWS_PROFILE (or [registrar.aws] profile), or AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, run `aws configure`, or run on a host with an "
                    "instance role; secrets never go in station.toml")


class AwsError(RegistrationError):
    """An AWS call failed; `code` is AWS's error code, `action` the IAM action."""

    def __init__(self, message: str, *, code: str, action: str, transient: bool) -> None:
        super().__init__(message, transient=transient)
        self.code = code
        self.action = action


class RateLimiter:
    """A token bucket per API, shared by the whole station; runs on the event loop.

    Each API may burst one second's worth of calls, then gets `tps` per second. A caller
    reserves its token at once (the bucket may go into debt) and sleeps until it is due,
    so waiters are served in order without a lock.
    """

    def __init__(self, tps: Mapping[str, float], clock: Callable[[], float] = time.monotonic,
                 default: float = DEFAULT_TPS) -> None:
        self._tps = dict(tps)
        self._default = default
        self._clock = clock
        self._tokens: dict[str, float] = {}
        self._stamp: dict[str, float] = {}

    def rate(self, api: str) -> float:
        return self._tps.get(api, self._default)

    def reserve(self, api: str) -> float:
        """Take a token; returns how long the caller must wait for it (seconds)."""
        rate = self.rate(api)
        burst = max(1.0, rate)
        now = self._clock()
        tokens = self._tokens.get(api, burst)
        tokens = min(burst, tokens + (now - self._stamp.get(api, now)) * rate)
        tokens -= 1.0
        self._tokens[api], self._stamp[api] = tokens, now
        return 0.0 if tokens >= 0 else -tokens / rate

    async def acquire(self, api: str) -> float:
        wait = self.reserve(api)
        if wait > 0:
            await asyncio.sleep(wait)  # pacing, not synchronisation: the token is ours
        return wait


class IotClient:
    """One boto3 IoT client for the whole station, used from the event loop."""

    def __init__(self, *, region: str, endpoint_url: str, profile: str, retry_mode: str,
                 max_attempts: int, tps: Mapping[str, float],
                 on_throttled: Callable[[str], None] | None = None) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.retry_mode = retry_mode
        self.max_attempts = max_attempts
        self.limiter = RateLimiter(tps)
        self.on_throttled = on_throttled
        self.calls: Counter[str] = Counter()
        self.throttles: Counter[str] = Counter()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def where(self) -> str:
        return self.endpoint_url or f"https://iot.{self.region}.amazonaws.com"

    async def open(self) -> None:
        """Create the session and client; fails with a clear message without credentials."""
        if self._client is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=MAX_THREADS, thread_name_prefix="aws-iot")
        self._client = await self._loop.run_in_executor(self._executor, self._make_client)

    def _make_client(self) -> Any:
        """The one client of the run, on botocore's session (boto3 adds nothing a client
        needs) and the process's shared model loader (botocore_data.py)."""
        import botocore.config
        import botocore.exceptions

        from station.config.botocore_data import aws_session

        session = aws_session(self.profile)
        try:
            credentials = session.get_credentials()
        except botocore.exceptions.ProfileNotFound:
            raise RegistrationError(f"AWS profile {self.profile!r} ([registrar.aws] profile) "
                                    "is not in ~/.aws/config or ~/.aws/credentials") from None
        if credentials is None:
            raise RegistrationError(f"no AWS credentials found: {CREDENTIALS_HELP}")
        config = botocore.config.Config(
            retries={"mode": self.retry_mode, "max_attempts": self.max_attempts},
            max_pool_connections=MAX_THREADS, connect_timeout=10, read_timeout=30)
        try:
            client = session.create_client("iot", region_name=self.region,
                                           endpoint_url=self.endpoint_url or None,
                                           config=config)
        except botocore.exceptions.InvalidRegionError:
            raise RegistrationError(f"[registrar.aws] region {self.region!r} is not an AWS "
                                    "region name (like eu-west-1)") from None
        except ValueError as e:
            raise RegistrationError(f"[registrar.aws] endpoint_url {self.endpoint_url!r} is "
                                    f"not usable: {e}") from None
        client.meta.events.register_first("needs-retry.iot", self._saw_retry)
        return client

    def _saw_retry(self, response: Any = None, operation: Any = None, **_: Any) -> None:
        """botocore hook (a worker thread): a throttled attempt is about to be retried."""
        if not response or operation is None:
            return None
        code = response[1].get("Error", {}).get("Code") if len(response) > 1 else None
        if code in THROTTLING_CODES:
            self._report_throttle(operation.name, threadsafe=True)
        return None

    def _report_throttle(self, api: str, *, threadsafe: bool) -> None:
        self.throttles[api] += 1
        if self.on_throttled is None or self._loop is None:
            return
        if threadsafe:
            self._loop.call_soon_threadsafe(self.on_throttled, api)
        else:
            self.on_throttled(api)

    async def call(self, api: str, **params: Any) -> dict[str, Any]:
        """Call IoT operation `api` (e.g. "CreateThing") with rate limiting; raises AwsError."""
        import botocore.exceptions
        from botocore import xform_name

        if self._client is None or self._loop is None:
            raise RegistrationError("AWS IoT client used before start()")
        waited = await self.limiter.acquire(api)
        if waited > SLOW_WAIT:
            self._report_throttle(api, threadsafe=False)
        method = getattr(self._client, xform_name(api))
        self.calls[api] += 1
        action = f"iot:{api}"
        try:
            # The copied context lets a throttle seen by botocore's retry hook (in the
            # thread) be reported against the board that made the call.
            result: dict[str, Any] = await self._loop.run_in_executor(
                self._executor, functools.partial(contextvars.copy_context().run, method,
                                                  **params))
            return result
        except botocore.exceptions.ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            message = str(error.get("Message", "")) or str(e)
            if code in THROTTLING_CODES:
                self._report_throttle(api, threadsafe=False)
                raise AwsError(f"{action}: AWS is still throttling after {self.max_attempts} "
                               f"attempts ({code}); lower [registrar.aws.tps] {api}",
                               code=code, action=action, transient=True) from None
            if code in ACCESS_CODES:
                raise AwsError(f"AWS denied {action} ({code}: {message}); give the station's "
                               "identity the actions in config/station-iam-permissions.json",
                               code=code, action=action, transient=False) from None
            if code in CREDENTIAL_CODES:
                raise AwsError(f"AWS rejected the station's credentials on {action} ({code}: "
                               f"{message}); check them: {CREDENTIALS_HELP}",
                               code=code, action=action, transient=False) from None
            raise AwsError(f"{action} failed: {code}: {message}", code=code, action=action,
                           transient=code in TRANSIENT_CODES) from None
        except botocore.exceptions.NoCredentialsError:
            raise AwsError(f"no AWS credentials found: {CREDENTIALS_HELP}", code="NoCredentials",
                           action=action, transient=False) from None
        except (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError,
                botocore.exceptions.ConnectionClosedError) as e:
            raise AwsError(f"cannot reach AWS IoT at {self.where} ({e}); check [registrar.aws] "
                           "region / endpoint_url and the network", code="Unreachable",
                           action=action, transient=True) from None
        except botocore.exceptions.ParamValidationError as e:
            raise AwsError(f"{action}: invalid request: {e}", code="ParamValidation",
                           action=action, transient=False) from None

    async def close(self) -> None:
        client, executor = self._client, self._executor
        self._client = self._executor = None
        if executor is not None:
            # waits for calls in flight (a cancelled board's call still runs to its end)
            await asyncio.to_thread(executor.shutdown, wait=True)
        if client is not None:
            client.close()
