"""Fail closed when credentials are revoked while a process runs.

Kafka and Redis keep an authenticated connection working after its credentials were deleted or
changed; a client only meets the refusal when it reconnects, and then retries for ever
(kafka-python logs "Unable to bootstrap", redis-py retries). So a long-running command (``train``,
``serve``) re-checks its credentials with a fresh connection every ``every_s`` seconds (the
start-up probe of :mod:`stream.connect`: TLS, SASL login, Redis ``AUTH`` + ``PING``). When they are
refused ``refusals`` checks in a row, the watch logs one clear line, sets the process's stop event
(the trainer and the worker stop as on SIGTERM) and keeps the refusal; the command then exits
with status 3 and that line on stderr, as when the credentials are wrong at start. A service that
does not answer at all is not a refusal (outages are waited out as before). An error that ends
the command early (e.g. kafka-python's "Unable to bootstrap" when the credentials went away
between the start-up probe and the clients' first connection) is checked the same way: when the
credentials are refused, that refusal is what the command reports.

Bound: the process stops at most ``every_s * refusals`` (plus one probe's timeout) after the
revocation, then shuts down as on SIGTERM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from fmstream.errors import CredentialWatchError
from stream.connect import ConnectError, Unreachable

log = logging.getLogger(__name__)


class CredentialWatch:
    """Re-runs ``checks`` every ``every_s``; after ``refusals`` refusals in a row it sets ``stop``.

    Args:
        checks: callables that return when the credentials work and raise
            :class:`~stream.connect.ConnectError` when refused (``Unreachable`` = no answer, not a
            refusal).
        stop: the process's stop event (set on a lasting refusal).
        every_s: seconds between checks (> 0).
        refusals: refusals in a row that stop the process (>= 1).
    """

    def __init__(
        self,
        checks: Sequence[Callable[[], None]],
        stop: threading.Event,
        *,
        every_s: float,
        refusals: int = 2,
    ) -> None:
        if every_s <= 0 or refusals < 1:
            raise CredentialWatchError(
                f"every_s must be > 0 and refusals >= 1, got every_s={every_s}, "
                f"refusals={refusals}: check FMSTREAM_CREDENTIALS_CHECK_S")
        self.checks = list(checks)
        self.stop = stop
        self.every_s = every_s
        self.refusals = refusals
        self.failed: ConnectError | None = None
        self.refused_in_a_row = 0
        self.checked = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fmstream-credentials")

    def start(self) -> CredentialWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def refusal_now(self) -> ConnectError | None:
        """Run the checks once: the refusal, or None when accepted (or only unreachable)."""
        for check in self.checks:
            try:
                check()
            except Unreachable as exc:  # an outage, not a refusal: waited out elsewhere
                log.debug("credential check: %s", exc)
            except ConnectError as exc:
                return exc
        return None

    def check_once(self) -> bool:
        """One round of checks; True when the process must stop (refused long enough)."""
        self.checked += 1
        refusal = self.refusal_now()
        if refusal is None:
            if self.refused_in_a_row:
                log.warning("credentials accepted again")
            self.refused_in_a_row = 0
            return False
        self.refused_in_a_row += 1
        if self.refused_in_a_row < self.refusals:
            log.warning("credentials refused (%d of %d before stopping): %s",
                        self.refused_in_a_row, self.refusals, refusal)
            return False
        self.failed = refusal
        log.error("credentials refused %d times in a row, stopping: %s",
                  self.refused_in_a_row, refusal)
        self.stop.set()
        return True

    def _run(self) -> None:
        while not (self._done.wait(self.every_s) or self.stop.is_set()):
            try:
                if self.check_once():
                    return
            except Exception:  # noqa: BLE001 - a broken check must not kill the process
                log.exception("credential check failed unexpectedly")


__all__ = ["CredentialWatch"]
