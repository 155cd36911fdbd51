"""Argument checks of the public API and the exception classes they raise (issue 14, item 4).

The checks run before any I/O, so bad arguments are tested here without sockets; the integration
tests (tests/integration/test_usage_arguments.py) show each one over real sockets, with a good
message arriving after it.
"""

from __future__ import annotations

import math

import pytest

from glue import (
    EndpointManager,
    GlueError,
    StopReport,
    UsageError,
    UsageTypeError,
    UsageValueError,
)
from glue.errors import check_int, check_number, check_payload, check_timeout
from glue.manager import MAX_EXPIRY_S, _check_expiry, _check_targets
from glue.topics import validate_pattern, validate_topic_name, validate_topic_type


def test_usage_errors_are_also_the_builtin_errors_ordinary_code_catches() -> None:
    assert issubclass(UsageTypeError, UsageError)
    assert issubclass(UsageTypeError, TypeError)
    assert issubclass(UsageValueError, UsageError)
    assert issubclass(UsageValueError, ValueError)
    assert issubclass(UsageError, GlueError)
    error = UsageValueError("expiry must be...", argument="expiry")
    assert error.argument == "expiry"
    assert UsageError("not running").argument is None


@pytest.mark.parametrize(
    "expiry", [math.inf, -math.inf, math.nan, 0, 0.0, -1, 1e306, MAX_EXPIRY_S + 0.001, 10**400]
)
def test_expiry_must_be_finite_positive_and_at_most_one_day(expiry: object) -> None:
    with pytest.raises(UsageValueError, match="expiry must be a finite number") as caught:
        _check_expiry(expiry)
    assert caught.value.argument == "expiry"


@pytest.mark.parametrize("expiry", ["5", None, True, b"5", [5]])
def test_an_expiry_that_is_not_a_number_is_a_type_error(expiry: object) -> None:
    with pytest.raises(UsageTypeError, match="expiry must be a number of seconds") as caught:
        _check_expiry(expiry)
    assert caught.value.argument == "expiry"


def test_good_expiries_pass_as_floats() -> None:
    assert _check_expiry(5.0) == 5.0
    assert _check_expiry(1) == 1.0
    assert type(_check_expiry(1)) is float
    assert _check_expiry(MAX_EXPIRY_S) == 86_400.0


def test_payloads_are_bytes_like_and_anything_else_says_what_to_do() -> None:
    assert check_payload(b"x") == b"x"
    assert check_payload(bytearray(b"ab")) == b"ab"
    assert check_payload(memoryview(b"abc")[1:]) == b"bc"
    buffer = bytearray(b"ab")
    copied = check_payload(buffer)
    buffer[0] = 0
    assert copied == b"ab"  # a copy: the caller may reuse its buffer
    with pytest.raises(UsageTypeError, match=r"not str: encode text first \(payload.encode\(\)\)"):
        check_payload("text")
    with pytest.raises(UsageTypeError, match="publish_json"):
        check_payload("text", json_hint=True)
    with pytest.raises(UsageTypeError, match=r"bytes\(values\)"):
        check_payload([110, 61, 57], json_hint=True)  # was silently sent as b"n=9"
    for bad in (5, None, 1.5, {"a": 1}):
        with pytest.raises(UsageTypeError, match="payload must be bytes") as caught:
            check_payload(bad)
        assert caught.value.argument == "payload"


def test_numbers_are_never_bools_and_ints_are_never_floats() -> None:
    with pytest.raises(UsageTypeError):
        check_int(True, "count", minimum=0)
    with pytest.raises(UsageTypeError):
        check_int(1.0, "count", minimum=0)
    with pytest.raises(UsageValueError, match="count must be >= 0, not -1"):
        check_int(-1, "count", minimum=0)
    with pytest.raises(UsageValueError, match="from 0 to 10"):
        check_int(11, "depth", minimum=0, maximum=10)
    with pytest.raises(UsageTypeError):
        check_number(False, "timeout", minimum=0, maximum=10)
    assert check_number(3, "timeout", minimum=0, maximum=10) == 3.0


@pytest.mark.parametrize("timeout", [-1, -0.001, math.inf, math.nan, 1e300])
def test_timeouts_are_finite_and_not_negative(timeout: float) -> None:
    with pytest.raises(UsageValueError, match="timeout"):
        check_timeout(timeout)


def test_a_timeout_of_zero_or_an_int_is_fine() -> None:
    assert check_timeout(0) == 0.0
    assert check_timeout(2) == 2.0
    with pytest.raises(UsageTypeError):
        check_timeout("1")


def test_targets_are_endpoint_ids() -> None:
    assert _check_targets(None) is None
    assert _check_targets([1, 2]) == (1, 2)
    assert _check_targets({7}) == (7,)
    assert _check_targets(range(1, 3)) == (1, 2)
    assert _check_targets([]) == ()
    assert _check_targets(["robot-7", 3]) == ("robot-7", 3)  # names, resolved when sending
    for bad, kind, pattern in [
        (5, UsageTypeError, r"to=\[id\]"),
        ("12", UsageTypeError, "list of endpoint ids"),
        (b"12", UsageTypeError, "list of endpoint ids"),
        ({1: 2}, UsageTypeError, "list of endpoint ids"),
        ([True], UsageTypeError, "an id in to"),
        ([0], UsageValueError, "an id in to"),
        ([2**53], UsageValueError, "an id in to"),
    ]:
        with pytest.raises(kind, match=pattern) as caught:
            _check_targets(bad)
        assert caught.value.argument in ("to", "an id in to")


@pytest.mark.parametrize(
    ("check", "argument"),
    [
        (validate_topic_name, "topic_name"),
        (validate_pattern, "topic_name"),
        (validate_topic_type, "topic_type"),
    ],
)
def test_names_of_the_wrong_type_and_bad_names_are_told_apart(check, argument) -> None:  # type: ignore[no-untyped-def]
    for bad in (7, None, b"a"):
        with pytest.raises(UsageTypeError, match="expected a plain str") as caught:
            check(bad)
        assert caught.value.argument == argument
    with pytest.raises(UsageValueError) as caught_value:
        check("a b")
    assert caught_value.value.argument == argument


def test_a_manager_refuses_settings_of_the_wrong_type() -> None:
    with pytest.raises(UsageTypeError, match=r"from_env\(\*\*settings\)"):
        EndpointManager({"listen_address": "127.0.0.1:0"})  # type: ignore[arg-type]


def test_a_stop_report_says_what_was_left_behind() -> None:
    assert StopReport().clean
    assert str(StopReport()) == "nothing left behind"
    report = StopReport({5: 3, 6: 1}, 2, ("callback f of subscription 'a'",))
    assert not report.clean
    assert str(report) == (
        "4 frames unacknowledged by 2 peers; 2 messages not sent; "
        "still running: callback f of subscription 'a'"
    )
