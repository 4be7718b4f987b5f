"""Headers from the exchange are anyone's: the attempt count is clamped to sane values."""

from __future__ import annotations

from typing import Any

import pytest

from common.bus.dispatch import (
    ATTEMPT,
    DeadLetter,
    Delivery,
    Dispatcher,
    HandlerSpec,
    Retry,
    RetryPolicy,
)
from common.events import Event, SourceDataAvailable

POLICY = RetryPolicy(max_attempts=3, delays_s=(0.5, 2.0))


def failing(event: Event) -> None:
    raise RuntimeError("transient")


def outcome(attempt: Any) -> Retry | DeadLetter:
    event = SourceDataAvailable(dataset="d", uri="u", producer="test")
    spec = HandlerSpec("SourceDataAvailable", failing)
    dispatcher = Dispatcher("ingestion", {"SourceDataAvailable": spec}, lambda _: None,
                            policy=POLICY)
    result = dispatcher.dispatch(Delivery(event.to_json(), event.event_type, {ATTEMPT: attempt}))
    assert isinstance(result, Retry | DeadLetter)
    return result


@pytest.mark.parametrize("forged", [0, -5, -10**9, "x", b"\xff", None, 1.5, True, [2]])
def test_a_missing_low_or_malformed_attempt_counts_as_the_first(forged: Any) -> None:
    retried = outcome(forged)
    assert isinstance(retried, Retry)
    assert retried.delay_s == POLICY.delays_s[0] and retried.headers[ATTEMPT] == 2


@pytest.mark.parametrize("forged", [3, 4, 10**9, "99"])
def test_an_attempt_at_or_past_the_limit_dead_letters_with_no_retry_left(forged: Any) -> None:
    assert isinstance(outcome(forged), DeadLetter)


def test_an_attempt_as_text_is_read_as_its_number() -> None:
    retried = outcome("2")
    assert isinstance(retried, Retry)
    assert retried.delay_s == POLICY.delays_s[1] and retried.headers[ATTEMPT] == 3
