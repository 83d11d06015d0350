"""Retry policy: exponential backoff with jitter, honouring Retry-After, bounded by attempts and a deadline.

Sleeping goes through anyio, so it is trio's sleep (and trio's clock, MockClock in tests) when
the caller runs under trio.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import anyio

from .errors import RegistryError

log = logging.getLogger(__name__)
T = TypeVar("T")

# A streamed blob fails its attempt when this many bytes take longer than attempt_timeout.
STREAM_PROGRESS_BYTES = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; waits grow base_delay * 2**n capped at max_delay, each scaled by a
    random factor in [0.5, 1]; a Retry-After from the server is waited at least (if it fits the
    deadline). No new attempt starts after `deadline` seconds from the first (None: no limit).

    `attempt_timeout` bounds each request's wait for its answer (the headers; the whole answer
    when it has no body to stream) and then each STREAM_PROGRESS_BYTES of its body (or its end)
    when it is streamed (`StreamProgress`): a server that never answers or drips a byte a
    second fails the attempt, which is retried (with mirrors, from the next host)."""

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 10.0
    deadline: float | None = 120.0
    attempt_timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must not be negative")
        if self.attempt_timeout is not None and self.attempt_timeout <= 0:
            raise ValueError("RetryPolicy.attempt_timeout must be positive")

    def backoff(self, failures: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1-based)."""
        exponential = min(self.max_delay, self.base_delay * (2 ** (failures - 1)))
        delay = exponential * (rng or random).uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


class TransientFailure(Exception):
    """One attempt failed in a way worth retrying. Carries what the final error will say."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None,
                 kind: type[RegistryError] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        # The RegistryError subclass to raise if this is the last failure (e.g. DigestMismatch).
        self.kind = kind


class StreamProgress:
    """Fails a streamed body (TransientFailure) that takes longer than `seconds` for each
    STREAM_PROGRESS_BYTES: a server that drips bytes holds no stream for ever. Checked as
    pieces arrive; a body with no bytes at all is ended by the client's read timeout."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.window_start = anyio.current_time()
        self.window_bytes = 0

    def arrived(self, nbytes: int) -> None:
        if self.seconds is None:
            return
        self.window_bytes += nbytes
        now = anyio.current_time()
        if self.window_bytes >= STREAM_PROGRESS_BYTES:
            self.window_start, self.window_bytes = now, 0
        elif now - self.window_start > self.seconds:
            raise TransientFailure(f"too slow: {self.window_bytes} bytes in {now - self.window_start:.0f}s")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Retrier:
    """Counts failures of one operation and sleeps (or gives up) according to a RetryPolicy."""

    def __init__(self, policy: RetryPolicy, what: str,
                 error_factory: Callable[[str, int | None], RegistryError]) -> None:
        self.policy = policy
        self.what = what
        self.error_factory = error_factory
        self.failures = 0
        self.started = anyio.current_time()

    async def failed(self, failure: TransientFailure) -> None:
        """Record a failure: sleep before the next attempt, or raise the final RegistryError."""
        self.failures += 1
        policy = self.policy
        if self.failures >= policy.attempts:
            raise self._final(f"{self.what} failed after {self.failures} attempts: {failure.reason}",
                              failure) from None
        delay = policy.backoff(self.failures, failure.retry_after)
        elapsed = anyio.current_time() - self.started
        if policy.deadline is not None and elapsed + delay > policy.deadline:
            raise self._final(
                f"{self.what} failed after {self.failures} attempts within the {policy.deadline:g}s "
                f"deadline: {failure.reason}", failure) from None
        log.info("%s: %s; retrying in %.2fs (attempt %d of %d)", self.what, failure.reason, delay,
                 self.failures + 1, policy.attempts)
        await anyio.sleep(delay)

    def _final(self, message: str, failure: TransientFailure) -> RegistryError:
        error = self.error_factory(message, failure.status)
        if failure.kind is not None and not isinstance(error, failure.kind):
            error = failure.kind(message, status=error.status, registry=error.registry,
                                 repository=error.repository, digest=error.digest)
        return error


async def run_with_retries(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    error_factory: Callable[[str, int | None], RegistryError],
) -> T:
    """Call `attempt` until it returns, raises a non-transient error, or the policy is exhausted.

    `attempt` raises TransientFailure for retryable problems; anything else propagates at once.
    On exhaustion `error_factory(message, status)` builds the RegistryError that is raised.
    """
    retrier = Retrier(policy, what, error_factory)
    while True:
        try:
            return await attempt()
        except TransientFailure as failure:
            await retrier.failed(failure)
