"""A history keeper's messages on disk (``GLUE_HISTORY_PATH``): SQLite, standard library only.

What a keeper holds (``Topics.keep``) lives in memory, where it is served from; this store
mirrors it so that a restarted keeper still serves it (``docs/history.md``). The topics layer
journals its changes (``Topics.take_kept_changes``); the runtime hands them here after each burst
(``submit``), and one writer thread applies them in a transaction per batch, so the event loop
never waits for the disk. At start, ``load`` reads back what has not expired.

The file holds one table, ``kept``: a row per message (topic, publisher id, incarnation and
name, sequence, envelope line, payload, expiry in wall-clock seconds since the epoch). It is
bounded as the memory is (``GLUE_HISTORY_MAX_BYTES``): a message dropped there (replaced,
expired, evicted for space) is deleted here in the same batch. What a crash loses: the batches
not yet written, at most the last burst's.
"""

from __future__ import annotations

import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from glue.errors import ConfigError
from glue.topics import KeptChange, KeptMessage, Topics
from glue.wire import EndpointId

__all__ = ["HistoryStore", "open_store"]

logger = logging.getLogger(__name__)

#: The schema's version, in SQLite's ``user_version``: a file of another version is refused.
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS kept (
    topic TEXT NOT NULL,
    publisher INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    name TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    payload BLOB NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (topic, publisher, sequence)
) WITHOUT ROWID
"""

#: A burst's changes and the wall clock's offset to the runtime's monotonic one then.
_Batch = tuple[Sequence[KeptChange], float]


class HistoryStore:
    """A keeper's messages in an SQLite file; ``submit`` from the loop, written by a thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise ConfigError(
                    f"GLUE_HISTORY_PATH: {self.path} holds history of schema version {version}; "
                    f"this glue writes version {SCHEMA_VERSION} (move the file away to start anew)",
                    variable="GLUE_HISTORY_PATH",
                )
            self._db.execute(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise ConfigError(
                f"GLUE_HISTORY_PATH: cannot use {self.path} as an SQLite file ({exc}); expected "
                f"a writable file path, e.g. /var/lib/glue/history.db",
                variable="GLUE_HISTORY_PATH",
            ) from exc
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()  # None: stop
        self._writer: threading.Thread | None = None
        self.batches_written = 0
        self.write_errors = 0

    def load(self, wall_offset: float) -> Iterator[KeptMessage]:
        """What the file holds that has not expired, oldest first per publisher and topic, with
        expiry in the runtime's monotonic time (``wall_offset``: wall time minus monotonic)."""
        self._db.execute("DELETE FROM kept WHERE expires_at <= ?", (time.time(),))
        rows = self._db.execute(
            "SELECT topic, publisher, incarnation, name, sequence, envelope, payload, expires_at"
            " FROM kept ORDER BY topic, publisher, sequence"
        )
        for topic, publisher, incarnation, name, sequence, envelope, payload, expires in rows:
            yield (
                topic,
                EndpointId(publisher),
                incarnation,
                name,
                sequence,
                bytes(envelope),
                bytes(payload),
                expires - wall_offset if expires < 1e308 else math.inf,  # (retained: never)
            )

    def forget(self, topic: str, publisher: EndpointId, sequence: int) -> None:
        """Delete one message (read back, but no longer kept: no pattern matches it)."""
        self._db.execute(
            "DELETE FROM kept WHERE topic = ? AND publisher = ? AND sequence = ?",
            (topic, publisher, sequence),
        )

    def sync(self, topics: Topics) -> None:
        """Queue what changed in ``topics``' kept history since the last call (cheap if nothing)."""
        changes = topics.take_kept_changes()
        if changes:
            self._queue.put((changes, topics.wall_offset))

    def start(self) -> None:
        """Start the writer thread (after ``load``)."""
        self._writer = threading.Thread(
            target=self._write_forever, name="glue-history", daemon=True
        )
        self._writer.start()

    def submit(self, changes: Sequence[KeptChange], wall_offset: float) -> None:
        """Queue a burst's changes (from ``Topics.take_kept_changes``) to be written."""
        self._queue.put((changes, wall_offset))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting up to ``timeout``), then close the file."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout)
            if self._writer.is_alive():
                logger.warning("history store %s: writes still pending at stop", self.path)
                return  # the thread closes the file when it is done
        self._db.close()

    def _write_forever(self) -> None:
        while True:
            item = self._queue.get()
            batches = [item]
            while not self._queue.empty():  # whatever else waits goes in the same transaction
                batches.append(self._queue.get())
            stop = None in batches
            try:
                self._write([batch for batch in batches if batch is not None])
            except sqlite3.Error as exc:
                self.write_errors += 1
                logger.warning("history store %s: a write failed: %s", self.path, exc)
            if stop:
                if self._writer is not None and threading.current_thread() is self._writer:
                    self._db.close()
                return

    def _write(self, batches: list[_Batch]) -> None:
        if not batches:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            for batch in batches:
                changes, wall_offset = batch
                for kind, detail in changes:
                    if kind == "put":
                        topic, publisher, incarnation, name, sequence, line, body, expires = detail
                        wall = expires + wall_offset if math.isfinite(expires) else 1e308
                        db.execute(
                            "INSERT OR REPLACE INTO kept VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (topic, publisher, incarnation, name, sequence, line, body, wall),
                        )
                    else:
                        topic, publisher, up_to = detail
                        if up_to < 0:
                            db.execute(
                                "DELETE FROM kept WHERE topic = ? AND publisher = ?",
                                (topic, publisher),
                            )
                        else:
                            db.execute(
                                "DELETE FROM kept WHERE topic = ? AND publisher = ? "
                                "AND sequence <= ?",
                                (topic, publisher, up_to),
                            )
            db.execute("COMMIT")
            self.batches_written += len(batches)
        except BaseException:
            db.execute("ROLLBACK")
            raise


def open_store(path: str | Path, topics: Topics) -> HistoryStore:
    """Open the store at ``path``, give ``topics`` back what it kept, journal from now on, and
    start writing. Messages no pattern keeps any more are deleted from the file.

    Raises:
        ConfigError: the file cannot be used (``GLUE_HISTORY_PATH``).
    """
    store = HistoryStore(path)
    topics.journal_kept()
    restored = forgotten = 0
    for message in list(store.load(topics.wall_offset)):
        if topics.restore_kept(message):
            restored += 1
        else:
            store.forget(message[0], message[1], message[4])
            forgotten += 1
    logger.info(
        "history store %s: %d kept messages restored%s",
        store.path,
        restored,
        f", {forgotten} no longer kept deleted" if forgotten else "",
    )
    store.start()
    store.sync(topics)
    return store
