"""The retry schedule of undelivered TLS reports (RPT-21), pure: time and randomness are arguments."""

from __future__ import annotations

import random

from mta.tlsrpt.retry import FIRST_DELAY, MAX_DELAY, WINDOW, next_try

T0 = 1_000_000.0


def test_rpt_21_delays_double_from_a_minute_up_to_two_hours_with_jitter() -> None:
    rng = random.Random(1)
    for tries, base in [(1, 60), (2, 120), (3, 240), (7, 3840), (8, MAX_DELAY), (20, MAX_DELAY)]:
        now = T0 + 10
        when = next_try(T0, tries, now, rng)
        assert when is not None and base * 0.9 <= when - now <= min(base, MAX_DELAY) * 1.1
    assert FIRST_DELAY == 60 and MAX_DELAY == 7200 and WINDOW == 86400


def test_rpt_21_window_of_24_hours_ends_with_a_last_try_then_gives_up() -> None:
    rng = random.Random(2)
    assert next_try(T0, 30, T0 + WINDOW - 60, rng) == T0 + WINDOW  # the last try is at the end
    assert next_try(T0, 30, T0 + WINDOW, rng) is None
    assert next_try(T0, 1, T0 + 2 * WINDOW, rng) is None


def test_rpt_21_a_whole_run_takes_24_hours_in_about_20_rounds() -> None:
    rng = random.Random(3)
    now, tries, times = T0, 1, []
    while (when := next_try(T0, tries, now, rng)) is not None:
        assert when > now
        times.append(when)
        now, tries = when, tries + 1
    assert times[-1] == T0 + WINDOW and 15 <= len(times) <= 25
