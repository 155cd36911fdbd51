"""Models over real sockets, both APIs: edits reach every holder, changes are reported, a late
joiner syncs by state vector, and malformed messages from a peer are dropped and counted."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pycrdt
import pytest

from glue import AsyncEndpointManager, EndpointManager, Model, ModelChange
from glue.errors import UsageError, UsageValueError
from glue.modelsync import TOPIC_TYPE, state_topic, update_topic
from tests.helpers import async_wait_until, wait_until

NAME = "plant/state"


def same(*models: Model) -> bool:
    first = models[0].snapshot()
    return all(m.snapshot() == first for m in models[1:])


def test_edits_reach_every_holder_and_a_late_joiner_syncs(settings: dict[str, Any]) -> None:
    with (
        EndpointManager.from_env(**settings) as a,
        EndpointManager.from_env(**settings) as b,
    ):
        model_a = a.model(NAME)
        assert a.model(NAME) is model_a
        with model_a.transaction() as root:
            root["config"] = pycrdt.Map({"rate": 5})
            root["log"] = pycrdt.Array(["started"])
            root["notes"] = pycrdt.Text("hello")
        model_b = b.model(NAME)
        seen: list[ModelChange] = []
        model_b.on_change(seen.append)
        assert model_b.wait_synced(timeout=10, peers=1) == [a.endpoint_id]
        assert model_b.snapshot() == {
            "config": {"rate": 5.0},
            "log": ["started"],
            "notes": "hello",
        }
        assert wait_until(lambda: len(seen) >= 1, timeout=5)
        assert not seen[0].local
        assert seen[0].source_id == a.endpoint_id

        def edit(model: Model, label: str) -> None:
            for i in range(50):
                with model.transaction() as root:
                    root["config"][f"{label}{i % 5}"] = i
                    root["log"].append(f"{label}{i}")
                    root["notes"].insert(0, label)

        threads = [threading.Thread(target=edit, args=(m, m.name[-1] + x)) for m, x in
                   ((model_a, "a"), (model_b, "b"))]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wait_until(lambda: same(model_a, model_b), timeout=10)
        snapshot = model_a.snapshot()
        assert len(snapshot["log"]) == 101
        assert len(snapshot["notes"]) == len("hello") + 2 * 50 * 2
        assert any(c.local for c in seen)

        with EndpointManager.from_env(**settings) as c:
            model_c = c.model(NAME)
            assert sorted(model_c.wait_synced(timeout=10, peers=2)) == sorted(
                [a.endpoint_id, b.endpoint_id]
            )
            assert model_c.snapshot() == snapshot
            counters = model_c.counters()
            assert counters["pulls_sent"] >= 2
            assert counters["updates_applied"] >= 2
            model_c.close()
            assert model_c.closed
            with pytest.raises(UsageError, match="closed"):
                model_c.wait_synced(timeout=1)
        model_a.close()
        model_b.close()


def test_changes_iterate_and_the_model_thread_ends_with_its_endpoint(
    settings: dict[str, Any],
) -> None:
    with EndpointManager.from_env(**settings) as a, EndpointManager.from_env(**settings) as b:
        model_a, model_b = a.model(NAME), b.model(NAME)
        model_b.wait_synced(timeout=10, peers=1)
        changes = model_b.changes(timeout=10)
        with model_a.transaction() as root:
            root["x"] = 1
        change = next(changes)
        assert change.keys == ("x",)
        assert not change.local
    # Both endpoints stopped without closing their models: the leaked-thread check of
    # conftest.py fails the test if a glue-model thread outlives it.
    assert wait_until(lambda: model_a.closed and model_b.closed, timeout=5)


def test_flush_returns_once_the_edits_are_acknowledged(settings: dict[str, Any]) -> None:
    with EndpointManager.from_env(**settings) as a, EndpointManager.from_env(**settings) as b:
        model_a, model_b = a.model(NAME), b.model(NAME)
        model_b.wait_synced(timeout=10, peers=1)
        with model_a.transaction() as root:
            root["x"] = 1
        model_a.flush(timeout=10)
        assert model_a.counters()["updates_sent"] == 1
        # Acknowledged means received: b's model thread applies it at once.
        assert wait_until(lambda: model_b.snapshot() == {"x": 1.0}, timeout=5)
        model_a.close()
        with pytest.raises(UsageError, match="closed"):
            model_a.flush(timeout=1)


def test_waiting_from_an_on_change_callback_is_refused(settings: dict[str, Any]) -> None:
    with EndpointManager.from_env(**settings) as a:
        model = a.model(NAME)
        refused: list[str] = []

        def on_change(change: ModelChange) -> None:
            for wait in (model.flush, model.wait_synced):
                try:
                    wait(timeout=1)
                except UsageError as exc:
                    refused.append(str(exc))

        model.on_change(on_change)
        with model.transaction() as root:
            root["x"] = 1
        assert wait_until(lambda: len(refused) == 2, timeout=5)
        assert "flush() from an on_change callback" in refused[0]
        model.close()


def test_an_edit_outside_a_transaction_is_sent_and_warned_about(
    settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with EndpointManager.from_env(**settings) as a, EndpointManager.from_env(**settings) as b:
        model_a, model_b = a.model(NAME), b.model(NAME)
        model_b.wait_synced(timeout=10, peers=1)
        with caplog.at_level(logging.WARNING, logger="glue.model"):
            model_a.root["outside"] = True
        assert any("outside `with model.transaction()" in r.message for r in caplog.records)
        assert wait_until(lambda: model_b.snapshot() == {"outside": True}, timeout=10)


def test_malformed_messages_from_a_peer_are_dropped_and_counted(settings: dict[str, Any]) -> None:
    with EndpointManager.from_env(**settings) as a, EndpointManager.from_env(**settings) as bad:
        model = a.model(NAME)
        bad.wait_for_subscribers(update_topic(NAME), timeout=10)
        bad.publish(update_topic(NAME), TOPIC_TYPE, b'{"k":"u"}\n\xff\xfe garbage')
        bad.publish(update_topic(NAME), TOPIC_TYPE, b"no header at all")
        bad.publish(state_topic(NAME), TOPIC_TYPE, b'{"k":"a","d":"x"}\n\x09')
        assert wait_until(
            lambda: sum(v for k, v in model.counters().items() if k.startswith("dropped_")) == 3,
            timeout=10,
        ), model.counters()
        with model.transaction() as root:
            root["still"] = "working"
        assert model.snapshot() == {"still": "working"}
        assert not model.closed
        model.close()


def test_a_history_keeper_of_the_model_topics_is_not_taken_for_a_holder(
    settings: dict[str, Any],
) -> None:
    with EndpointManager.from_env(**settings) as keeper:
        keeper.keep_history("_model/#", depth=10)
        with EndpointManager.from_env(**settings) as a:
            model_a = a.model(NAME)
            with model_a.transaction() as root:
                root["x"] = 1
            a.wait_for_subscribers(update_topic(NAME), timeout=10)
            assert wait_until(lambda: model_a.counters().get("announced", 0) >= 2, timeout=10)
            model_a.flush(timeout=10)
            model_a.close()
        with EndpointManager.from_env(**settings) as c:
            model_c = c.model(NAME)
            # The keeper subscribes (its keep pattern is interest) but never announces, and
            # the announcement it replays is a's, who is gone: nobody to wait for, no pull.
            assert model_c.wait_synced(timeout=10) == []
            assert wait_until(
                lambda: model_c.counters().get("announcements_from_absent_holders", 0) >= 1,
                timeout=10,
            ), model_c.counters()
            assert model_c.counters().get("pulls_sent", 0) == 0
            model_c.close()


def test_wait_synced_says_what_is_missing(settings: dict[str, Any]) -> None:
    with EndpointManager.from_env(**settings) as a:
        model = a.model(NAME)
        assert model.wait_synced(timeout=1) == []  # nobody holds it: nothing to wait for
        with pytest.raises(TimeoutError, match="0 of 1 peers holding it"):
            model.wait_synced(timeout=0.3, peers=1)
        model.close()


def test_a_full_inbox_drops_and_counts(
    settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import glue.model

    with EndpointManager.from_env(**settings) as a, EndpointManager.from_env(**settings) as b:
        model_a, model_b = a.model(NAME), b.model(NAME)
        model_b.wait_synced(timeout=10, peers=1)
        monkeypatch.setattr(glue.model, "INBOX_SIZE", 0)  # as if the model's thread were stuck
        with model_a.transaction() as root:
            root["x"] = 1
        assert wait_until(lambda: model_b.counters().get("dropped_inbox_full", 0) >= 1, timeout=5)
        monkeypatch.undo()  # the next announcement shows b what it lacks; it pulls it
        assert wait_until(lambda: model_b.snapshot() == {"x": 1.0}, timeout=10)
        model_a.close()
        model_b.close()


def test_bad_names_are_refused(settings: dict[str, Any]) -> None:
    with EndpointManager.from_env(**settings) as a:
        with pytest.raises(UsageValueError):
            a.model("not a name")
        with pytest.raises(UsageValueError):
            a.model("x" * 201)


async def test_async_models_converge_and_report_changes(settings: dict[str, Any]) -> None:
    async with (
        AsyncEndpointManager.from_env(**settings) as a,
        AsyncEndpointManager.from_env(**settings) as b,
    ):
        model_a, model_b = a.model(NAME), b.model(NAME)
        assert a.model(NAME) is model_a
        assert await model_b.wait_synced(timeout=10, peers=1) == [a.endpoint_id]
        got: list[ModelChange] = []

        async def collect() -> None:
            async for change in model_b.changes():
                got.append(change)

        collecting = asyncio.ensure_future(collect())
        await asyncio.sleep(0)  # let the iteration register before the edits
        model_a.root["items"] = pycrdt.Array([1, 2])
        with model_a.transaction() as root:
            root["items"].append(3)
            root["name"] = "pump"
        model_b.root["from_b"] = True
        assert await async_wait_until(
            lambda: model_a.snapshot() == model_b.snapshot() and len(got) >= 2, timeout=10
        ), (model_a.snapshot(), model_b.snapshot(), got)
        assert model_a.snapshot() == {"items": [1.0, 2.0, 3.0], "name": "pump", "from_b": True}
        await model_a.flush(timeout=10)
        # a's two transactions went out as one update (merged before the model's task ran)
        assert [c.local for c in got].count(True) == 1
        assert {k for c in got for k in c.keys} == {"items", "name", "from_b"}
        model_a.close()
        model_b.close()
        await asyncio.wait_for(collecting, 5)
