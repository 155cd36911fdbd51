"""How long busy polling stops after the polling thread was kept from running (BusyBackoff)."""

from __future__ import annotations

import math

import pytest

from glue.runtime import BusyBackoff


def test_a_pause_now_and_then_stops_polling_briefly() -> None:
    backoff = BusyBackoff()
    assert backoff.until == -math.inf  # polling allowed from the start
    backoff.preempted(10.0)
    assert backoff.until == pytest.approx(10.01)
    backoff.preempted(20.0)  # long after: as short again
    assert backoff.until == pytest.approx(20.01)


def test_pauses_that_keep_coming_stop_polling_longer_up_to_a_second() -> None:
    backoff = BusyBackoff()
    now = 0.0
    pauses = []
    for _ in range(12):
        backoff.preempted(now)
        pauses.append(round(backoff.until - now, 3))
        now = backoff.until + 0.001  # polling again, and kept from running again at once
    assert pauses[:4] == [0.01, 0.02, 0.04, 0.08]
    assert max(pauses) == 1.0
    assert pauses[-1] == 1.0
