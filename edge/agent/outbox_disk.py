"""The disk the outbox's SQLite files may take: the database, its WAL and the WAL's index together.

Message bytes (payload and topic, ``OutboxLimits.max_bytes``) are not disk use: SQLite stores rows
in pages, a page that keeps one surviving event among dropped telemetry stays allocated, and the
WAL grows to about 4 MB between checkpoints by default. :func:`plan` splits a disk budget into a
bounded WAL (checkpointed early, truncated after each checkpoint) and a number of database pages;
the outbox drops messages by its policy until the pages in use fit (see :mod:`edge.agent.outbox`).
Freed pages are reused before the file grows, so the file never outgrows the pages in use.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

# SQLite's shared-memory WAL index: 32 KiB while the WAL holds fewer than about 4,000 frames.
SHM_BYTES = 32 * 1024
# The WAL's share of the budget, bounded: big enough that checkpoints (an fsync of the database
# each) come every few messages at worst, small enough to leave the rest to messages.
WAL_SHARE = 4
WAL_MIN_BYTES, WAL_MAX_BYTES = 128 * 1024, 4 * 1024 * 1024
# Bytes of a WAL frame beyond its page, and of the WAL's own header.
FRAME_HEADER, WAL_HEADER = 24, 32
# WAL frames kept free for the transaction that crosses the checkpoint threshold, beyond its
# message's own pages: a put or a delete writes about 10 (row, index, freelist, counters, header).
TXN_FRAMES = 16
# Pages a B-tree may allocate beyond a row's own when it inserts one (splits up the tree, index).
SPLIT_PAGES = 3
# The smallest budget that holds the schema, one message and a WAL.
MIN_DISK_BYTES = 256 * 1024


@dataclass(frozen=True)
class DiskPlan:
    """How a disk budget is spent."""

    page_size: int
    db_pages: int  # pages the database file may use
    wal_bytes: int  # journal_size_limit: the WAL is truncated to this after a checkpoint
    checkpoint_pages: int  # wal_autocheckpoint: the rest of the WAL is for the crossing transaction
    max_message: int  # larger messages would overrun the WAL in one transaction

    def pages_for(self, size: int) -> int:
        """Return the pages a message of ``size`` bytes may need when inserted."""
        usable = self.page_size - 100  # page and cell headers, generously
        return -(-size // usable) + SPLIT_PAGES


def plan(disk_bytes: int, page_size: int) -> DiskPlan:
    """Split ``disk_bytes`` into a WAL and database pages for pages of ``page_size`` bytes."""
    wal = min(max(disk_bytes // WAL_SHARE, WAL_MIN_BYTES), WAL_MAX_BYTES)
    frames = (wal - WAL_HEADER) // (page_size + FRAME_HEADER)
    message_frames = frames // 4
    return DiskPlan(page_size=page_size, db_pages=(disk_bytes - wal - SHM_BYTES) // page_size, wal_bytes=wal,
                    checkpoint_pages=max(1, frames - TXN_FRAMES - message_frames),
                    max_message=(message_frames - SPLIT_PAGES) * (page_size - 100))


def apply(db: sqlite3.Connection, disk: DiskPlan) -> None:
    """Bound the WAL of ``db`` and shrink one a previous run left bigger."""
    db.execute(f"PRAGMA journal_size_limit={disk.wal_bytes}")
    db.execute(f"PRAGMA wal_autocheckpoint={disk.checkpoint_pages}")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def used_pages(db: sqlite3.Connection) -> int:
    """Return the database pages holding data (inside the current transaction)."""
    total = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return int(total) - int(free)


def files_bytes(path: Path) -> int:
    """Return the bytes the database at ``path``, its WAL and its index take on disk now."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += Path(f"{path}{suffix}").stat().st_size
        except FileNotFoundError:
            pass
    return total
