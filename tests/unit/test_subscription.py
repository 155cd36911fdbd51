"""Subscriptions and the callback pool, without an endpoint (threads, no sockets)."""

from __future__ import annotations

import threading

from glue.events import Message
from glue.subscription import CallbackPool, Subscription
from tests.helpers import wait_until


def _message(n: int) -> Message:
    return Message("t", "k", b"%d" % n, 1, "p", n, 0.0, 0.0)


def _subscription(pool: CallbackPool, callback, queue_size: int = 100) -> Subscription:  # type: ignore[no-untyped-def]
    return Subscription(
        "t", "k", callback, queue_size=queue_size, pool=pool, unsubscribe=lambda _: None
    )


def test_a_blocked_callback_does_not_hold_up_a_subscription_queued_right_after_it() -> None:
    pool = CallbackPool(4, "test")
    try:
        warm = threading.Event()
        _subscription(pool, lambda m: warm.set())._put_many([_message(1)])
        assert warm.wait(5)  # one pool thread now exists and goes idle
        release, other_ran = threading.Event(), threading.Event()
        blocked = _subscription(pool, lambda m: release.wait(10))
        other = _subscription(pool, lambda m: other_ran.set())
        # Both queued before the idle thread can wake: each must get a thread of its own.
        blocked._put_many([_message(1)])
        other._put_many([_message(1)])
        assert other_ran.wait(5)
        release.set()
    finally:
        pool.stop()


def test_callbacks_of_one_subscription_run_in_order_one_at_a_time() -> None:
    pool = CallbackPool(4, "test")
    seen: list[int] = []
    running = threading.Lock()
    done = threading.Event()

    def callback(message: Message) -> None:
        assert running.acquire(blocking=False), "two callbacks of one subscription at once"
        seen.append(message.sequence)
        running.release()
        if message.sequence == 1000:
            done.set()

    try:
        subscription = _subscription(pool, callback, queue_size=10_000)
        for start in range(1, 1001, 50):
            subscription._put_many([_message(n) for n in range(start, start + 50)])
        assert done.wait(10)
        assert seen == list(range(1, 1001))
    finally:
        pool.stop()


def test_one_subscriptions_long_stream_runs_on_one_pool_thread() -> None:
    # A subscription with more than a batch waiting goes round the pool's queue after each
    # batch; the thread that ran it takes the next item itself. It used to start a new thread
    # each time (the thread was not idle yet), until the pool's limit: 4 threads for one
    # subscription, its batches hopping between them.
    pool = CallbackPool(4, "one-stream")
    done = threading.Event()
    ran_on: set[int] = set()

    def callback(message: Message) -> None:
        ran_on.add(threading.get_ident())
        if message.sequence == 5000:
            done.set()

    try:
        subscription = _subscription(pool, callback, queue_size=10_000)
        subscription._put_many([_message(n) for n in range(1, 5001)])  # ~20 batches
        assert done.wait(10)
        started = [t for t in threading.enumerate() if t.name.startswith("glue-callbacks-one")]
        assert len(started) == 1, started
        assert len(ran_on) == 1
    finally:
        pool.stop()


def test_a_full_queue_drops_the_newest_and_counts_them() -> None:
    pool = CallbackPool(1, "test")
    release = threading.Event()
    try:
        subscription = _subscription(pool, lambda m: release.wait(10), queue_size=10)
        lost = subscription._put_many([_message(n) for n in range(1, 31)])
        assert lost == 20
        assert subscription.dropped == 20
        release.set()
    finally:
        pool.stop()


def test_close_waits_for_a_running_callback_and_no_callback_starts_after() -> None:
    pool = CallbackPool(2, "test")
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def callback(message: Message) -> None:
        calls.append(message.sequence)
        entered.set()
        release.wait(10)

    try:
        subscription = _subscription(pool, callback)
        subscription._put_many([_message(n) for n in range(1, 6)])
        assert entered.wait(5)
        closer = threading.Thread(target=subscription.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive()  # waiting for the running callback
        release.set()
        closer.join(5)
        assert not closer.is_alive()
        assert calls == [1]
        assert subscription._put_many([_message(9)]) == 0  # closed: ignored, not queued
        assert calls == [1]
    finally:
        pool.stop()


def test_a_stuck_callback_holds_at_most_the_queue_and_the_message_it_is_in() -> None:
    pool = CallbackPool(2, "test")
    started, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def stuck(message: Message) -> None:
        seen.append(message.sequence)
        started.set()
        release.wait(10)

    try:
        subscription = _subscription(pool, stuck, queue_size=10)
        # The pool thread takes these 5 as one batch and gets stuck in the first one's callback:
        # the other 4 still wait (taken for the batch, not yet called back), so only 6 more fit.
        assert subscription._put_many([_message(n) for n in range(1, 6)]) == 0
        assert started.wait(5)
        assert subscription._put_many([_message(n) for n in range(6, 26)]) == 14
        assert subscription.dropped == 14
        release.set()
        assert wait_until(lambda: len(seen) == 11, timeout=5)
        assert seen == list(range(1, 12))  # the first 11, in order; the newest were dropped
    finally:
        release.set()
        pool.stop()
