"""The credential watch's rules (no I/O: the checks are plain callables here; the real probes
against a SASL_SSL broker are in tests/test_security.py)."""

from __future__ import annotations

import threading

import pytest

from fmstream.credentials import CredentialWatch
from fmstream.errors import CredentialWatchError
from stream.connect import AuthenticationFailed, TlsFailed, Unreachable


def refused() -> None:
    raise AuthenticationFailed("Kafka at x refused the credentials")


def ok() -> None:
    return None


def away() -> None:
    raise Unreachable("no Kafka broker answered")


def test_two_refusals_in_a_row_stop_the_process_with_the_refusal() -> None:
    stop = threading.Event()
    watch = CredentialWatch([ok, refused], stop, every_s=1.0, refusals=2)
    assert not watch.check_once() and not stop.is_set()
    assert watch.check_once() and stop.is_set()
    assert isinstance(watch.failed, AuthenticationFailed)


def test_an_accepted_check_resets_the_count_and_outages_are_not_refusals() -> None:
    stop = threading.Event()
    results = iter([refused, ok, refused, away, away, refused])
    watch = CredentialWatch([lambda: next(results)()], stop, every_s=1.0, refusals=2)
    for _ in range(6):
        assert not watch.check_once()
    assert not stop.is_set() and watch.failed is None and watch.refused_in_a_row == 1


def test_a_tls_failure_counts_as_a_refusal_and_refusal_now_reports_it() -> None:
    def tls() -> None:
        raise TlsFailed("TLS to Kafka failed")

    watch = CredentialWatch([away, tls], threading.Event(), every_s=1.0, refusals=1)
    assert isinstance(watch.refusal_now(), TlsFailed)
    assert CredentialWatch([away, ok], threading.Event(), every_s=1.0).refusal_now() is None


def test_the_thread_stops_the_process_and_exits() -> None:
    stop = threading.Event()
    watch = CredentialWatch([refused], stop, every_s=0.01, refusals=2).start()
    assert stop.wait(30)
    watch.close()
    assert isinstance(watch.failed, AuthenticationFailed) and watch.checked == 2


@pytest.mark.parametrize(("every_s", "refusals"), [(0, 2), (-1, 2), (1, 0)])
def test_bad_parameters_are_refused(every_s: float, refusals: int) -> None:
    with pytest.raises(CredentialWatchError,
                       match=rf"every_s must be > 0 and refusals >= 1, got every_s={every_s}, "
                             rf"refusals={refusals}: check FMSTREAM_CREDENTIALS_CHECK_S") as exc:
        CredentialWatch([ok], threading.Event(), every_s=every_s, refusals=refusals)
    assert isinstance(exc.value, ValueError)
