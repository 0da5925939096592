"""The units a file transfer is built from, each through its own public methods: the segment table,
the connection ramp, the resume state, the checkpoint clock and the prefix hasher. No sockets."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from hfmirror import constants
from hfmirror.hashing import HandedBlocks, PrefixHasher
from hfmirror.listing import RemoteFile
from hfmirror.resume import CheckpointClock, ResumeState, boot_id
from hfmirror.segments import ConnectionRamp, Segment, SegmentTable, cut_into_pieces

MIB = 1 << 20

# ------------------------------------------------------------------------------------ segment table


def test_connections_claim_pieces_in_file_order_and_give_them_back() -> None:
    table = SegmentTable(cut_into_pieces(0, 64 * MIB, connections=2), 64 * MIB)
    first, second = table.claim(now=0.0), table.claim(now=0.0)
    assert first is not None and second is not None and first.end == second.start == table.rows()[1][0]
    table.release(first)
    assert table.claim(now=0.0) is first  # the earliest unclaimed one comes first again


def test_only_the_segment_at_the_end_of_the_finished_prefix_is_at_the_front() -> None:
    """Only its bytes are the next the hash needs: they, and no others, are handed to it in memory."""
    table = SegmentTable(cut_into_pieces(0, 64 * MIB, connections=2), 64 * MIB)
    first, second = table.claim(now=0.0), table.claim(now=0.0)
    assert first is not None and second is not None
    assert table.at_front(first) and not table.at_front(second)
    table.written(first, first.end - first.start, now=0.1)  # the first piece is complete
    assert table.at_front(second) and not table.at_front(first)


def test_the_slow_tail_is_split_but_a_fast_one_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "MIN_SPLIT", MIB)
    table = SegmentTable([Segment(0, 0, 16 * MIB)], 16 * MIB)
    running = table.claim(now=0.0)
    assert running is not None
    table.written(running, MIB, now=1.0)  # 1 MiB/s: 15 s left, far more than SPLIT_IF_SECONDS_LEFT
    tail = table.claim(now=1.0)
    assert tail is not None and tail.start == running.end == MIB + 15 * MIB // 2 and tail.end == 16 * MIB
    fast = SegmentTable([Segment(0, 0, 16 * MIB)], 16 * MIB)
    busy = fast.claim(now=0.0)
    assert busy is not None
    fast.written(busy, 15 * MIB, now=1.0)  # 1 MiB left at 15 MiB/s: splitting would only waste bytes
    assert fast.claim(now=1.0) is None
    unsplittable = SegmentTable([Segment(0, 0, 16 * MIB)], 16 * MIB, ranges_supported=False)
    only = unsplittable.claim(now=0.0)
    assert (
        only is not None and unsplittable.written(only, MIB, now=1.0) and unsplittable.claim(now=1.0) is None
    )


def test_a_write_never_runs_past_an_end_a_re_split_moved_closer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "MIN_SPLIT", 1000)
    table = SegmentTable([Segment(0, 0, 10_000)], 10_000)
    segment = table.claim(now=0.0)
    assert segment is not None
    table.written(segment, 1000, now=1.0)
    offset, usable = table.writable(segment, 6000)  # a read of 6000 bytes is being written ...
    assert (offset, usable) == (1000, 6000)
    tail = table.claim(now=1.0)  # ... when another connection takes the far half
    assert tail is not None and segment.end == tail.start == 5500
    table.written(segment, usable, now=1.1)
    assert segment.pos == segment.end == 5500  # clamped: the rest belongs to the tail
    assert all(start <= pos <= end for start, pos, end in table.rows())


def test_what_a_write_changes_is_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "CHECKPOINT_BYTES", 3000)
    table = SegmentTable([Segment(0, 0, 2000), Segment(2000, 2000, 5000)], 5000)
    first, second = table.claim(now=0.0), table.claim(now=0.0)
    assert first is not None and second is not None
    progress = table.written(second, 3000, now=0.1)
    assert progress.finished and not progress.all_in and progress.save_due  # crossed 3000 unsaved
    assert table.prefix_end() == 0 and table.done_bytes == 3000
    progress = table.written(first, 1000, now=0.2)
    assert not progress.finished and not progress.save_due  # already past: not reported again
    assert table.take_rows() == [[0, 1000, 2000], [2000, 5000, 5000]] and table.unsaved == 0
    progress = table.written(first, 1000, now=0.3)
    assert progress.finished and progress.all_in and table.prefix_end() == 5000 and not table.unfinished()


def test_a_slow_first_connection_opens_the_others_and_cuts_the_rest_into_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(constants, "FAST_CONNECTION", 100 * MIB)
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0.1)
    size = 256 * MIB
    table = SegmentTable([Segment(0, 0, size)], size, ramp=ConnectionRamp(4, now=0.0))
    first = table.claim(now=0.0)
    assert first is not None and table.ramp.allowed == 1
    assert table.next_read(first) == constants.PROBE_READ_BLOCK  # small reads while on probation
    progress = table.written(first, MIB, now=0.5)  # 2 MiB/s, far below FAST_CONNECTION
    assert progress.opened and table.ramp.allowed == 4 and len(table.rows()) > 4
    assert table.rows()[0][:2] == [0, MIB] and table.rows()[-1][2] == size
    assert table.connections_worth_opening(4) == 4 and table.connections_worth_opening(8) > 4


def test_the_written_run_from_an_offset_stops_at_the_first_gap() -> None:
    """What a reader of the partial file (the team mirror streaming a cold file) may hand out."""
    rows = [[0, 10, 10], [10, 25, 30], [30, 30, 40], [40, 50, 50]]
    table = SegmentTable.from_rows(rows, 50)
    assert table.written_from(0) == 25  # through the first segment into the unfinished second
    assert table.written_from(12) == 25
    assert table.written_from(25) == 25  # nothing written at 25 yet
    assert table.written_from(40) == 50
    full = SegmentTable.from_rows([[0, 20, 20], [20, 40, 40]], 40)
    assert full.written_from(5) == 40  # finished segments join up


def test_waiting_for_news_returns_when_notified_and_not_at_all_when_not_idle() -> None:
    table = SegmentTable([Segment(0, 0, 10)], 10)
    table.wait_while(lambda: False, timeout=3600)  # not idle: returns at once
    waiting = threading.Event()
    waiter = threading.Thread(target=lambda: table.wait_while(lambda: waiting.set() or True, timeout=3600))
    waiter.start()
    assert waiting.wait(30)
    table.notify()
    waiter.join(30)
    assert not waiter.is_alive(), "the notify was lost"


# ------------------------------------------------------------------------------------ resume state


def test_resume_state_round_trip_and_rejects_damage(tmp_path: Path) -> None:
    file = RemoteFile("w.bin", 100 * MIB, "a" * 64)
    path = tmp_path / "w.json"
    state = ResumeState.fresh(path, file)
    assert state.table.rows() == [[0, 0, file.size]]
    assert ResumeState.fresh(path, RemoteFile("empty", 0, "a" * 64)).table.rows() == []
    segment = state.table.claim(now=0.0)
    assert segment is not None
    state.table.written(segment, 1000, now=0.0)
    state.validators["mirror"] = '"abc"'
    state.save(state.table.take_rows(), synced=False)
    loaded = ResumeState.load(path, file)
    assert loaded is not None and loaded.done_bytes == 1000 and loaded.table.prefix_end() == 1000
    assert loaded.validators == {"mirror": '"abc"'} and ResumeState.saved_bytes(path) == 1000
    # Another file's state, a hole in the table, or garbage: all mean "start over" (and nothing saved).
    assert ResumeState.load(path, RemoteFile("w.bin", file.size, "b" * 64)) is None
    holed = SegmentTable(cut_into_pieces(0, file.size, connections=4), file.size).rows()[1:]
    state.save(holed, synced=True)
    assert ResumeState.load(path, file) is None
    path.write_text("{not json")
    assert ResumeState.load(path, file) is None and ResumeState.saved_bytes(path) == 0
    assert ResumeState.saved_bytes(tmp_path / "missing.json") == 0


@pytest.mark.parametrize(
    "damage",
    [
        {"validators": "abc"},
        {"validators": [["host", "etag", "extra"]]},
        {"validators": {"host": 1}},
        {"durable": None},
        {"durable": [[0, 300]]},
        {"durable": [[0, 300, 1000], "x"]},
        {"segments": [[0, "700", 1000], [1000, 1500, 4000]]},
        {"segments": {"0": [0, 700, 1000]}},
        {"ranges_supported": "no"},
        {"size": True},
    ],
    ids=str,
)
def test_a_damaged_state_is_no_state_never_an_error(tmp_path: Path, damage: dict) -> None:
    file = RemoteFile("w.bin", 4000, "a" * 64)
    path = tmp_path / "w.json"
    _saved(path, file, boot=boot_id())
    assert ResumeState.load(path, file) is not None  # undamaged, it is read
    data = json.loads(path.read_text())
    data.update(damage)
    path.write_text(json.dumps(data))
    assert ResumeState.load(path, file) is None
    assert ResumeState.saved_bytes(path) == 0


def _saved(path: Path, file: RemoteFile, *, boot: str | None, version: int = 2) -> None:
    """A state whose written table is ahead of its durable one (as between two syncs)."""
    written = [[0, 700, 1000], [1000, 1500, file.size]]
    durable = [[0, 300, 1000], [1000, 1000, file.size]]
    data = {"version": version, "oid": file.oid, "size": file.size, "boot_id": boot}
    data.update({"segments": written, "durable": durable} if version == 2 else {"segments": written})
    path.write_text(json.dumps(data))


def test_a_state_from_this_boot_trusts_what_was_written_one_from_another_only_what_was_synced(
    tmp_path: Path,
) -> None:
    file = RemoteFile("w.bin", 4000, "a" * 64)
    path = tmp_path / "w.json"
    assert boot_id()  # Linux: the kernel names each boot
    _saved(path, file, boot=boot_id())
    same_boot = ResumeState.load(path, file)
    assert same_boot is not None and same_boot.done_bytes == 700 + 500 == ResumeState.saved_bytes(path)
    assert same_boot.durable == [[0, 300, 1000], [1000, 1000, 4000]]
    # After a reboot (a power cut), bytes written but never synced may be lost: only the synced count.
    _saved(path, file, boot="another-boot")
    rebooted = ResumeState.load(path, file)
    assert rebooted is not None and rebooted.done_bytes == 300 == ResumeState.saved_bytes(path)
    # Version 1 files synced before every save: their one table is durable.
    _saved(path, file, boot=None, version=1)
    old = ResumeState.load(path, file)
    assert old is not None and old.done_bytes == 1200


def test_a_save_after_a_sync_becomes_the_durable_table(tmp_path: Path) -> None:
    file = RemoteFile("w.bin", 4000, "a" * 64)
    state = ResumeState(tmp_path / "s.json", file, [Segment(0, 100, 4000)])
    state.save([[0, 900, 4000]], synced=False)
    assert json.loads(state.path.read_text())["durable"] == [[0, 100, 4000]]
    state.save([[0, 1500, 4000]], synced=True)
    assert json.loads(state.path.read_text())["durable"] == [[0, 1500, 4000]]


# ------------------------------------------------------------------------------------ checkpoint clock


def test_saves_come_every_4_mib_but_no_closer_together_than_the_minimum_gap() -> None:
    """On a slow link the state is saved every CHECKPOINT_BYTES; on a fast one, where those bytes
    arrive in a few milliseconds, at most once per CHECKPOINT_MIN_GAP (a save per 4 MiB at 1 GB/s
    was CPU taken from the hash); and at least every CHECKPOINT_INTERVAL whatever arrives."""
    many, gap, interval = (
        constants.CHECKPOINT_BYTES,
        constants.CHECKPOINT_MIN_GAP,
        constants.CHECKPOINT_INTERVAL,
    )
    clock = CheckpointClock(now=0.0)
    assert clock.seconds_to_save(many, now=0.001) == pytest.approx(gap - 0.001)  # fast: wait
    assert clock.seconds_to_save(many, now=gap) <= 0  # enough bytes and time: save now
    assert clock.seconds_to_save(many - 1, now=gap) > 0  # not enough bytes yet
    assert clock.seconds_to_save(0, now=interval) <= 0  # nothing new, but time to save anyway
    clock.saved(interval, synced=False)
    assert clock.seconds_to_save(0, now=interval) == pytest.approx(interval)


def test_the_data_is_flushed_before_a_save_every_sync_interval() -> None:
    assert boot_id()  # where there is no boot id, every save flushes first
    clock = CheckpointClock(now=0.0)
    assert not clock.sync_due(constants.SYNC_INTERVAL - 0.01)
    assert clock.sync_due(constants.SYNC_INTERVAL)
    clock.saved(constants.SYNC_INTERVAL, synced=False)  # saved without a flush: still due
    assert clock.sync_due(constants.SYNC_INTERVAL + 0.01)
    clock.saved(constants.SYNC_INTERVAL, synced=True)
    assert not clock.sync_due(constants.SYNC_INTERVAL + 0.01)


# ------------------------------------------------------------------------------------ prefix hasher


def _hasher_over(tmp_path: Path, content: bytes) -> tuple[PrefixHasher, int]:
    path = tmp_path / "w.bin.incomplete"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    return PrefixHasher(fd, hashlib.sha256(content).hexdigest(), len(content)), fd


def test_the_hash_advances_in_bounded_steps_so_checkpoints_are_not_held_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wave of pieces finishing together leaves a long run to hash. Hashing it in one go kept the
    coordinator from saving checkpoints meanwhile (a kill at 50% lost 2% of a 1 GiB file, not 0.5%),
    so one step hashes at most HASH_STEP and the coordinator's loop gets its turn in between."""
    monkeypatch.setattr(constants, "HASH_STEP", MIB)
    content = os.urandom(3 * MIB + 5)
    hasher, fd = _hasher_over(tmp_path, content)
    try:
        steps = []
        while hasher.hashed < len(content):
            steps.append(hasher.step(len(content)))
        assert hasher.step(len(content)) == len(content)  # nothing more to do: no read, no change
    finally:
        os.close(fd)
    assert steps == [MIB, 2 * MIB, 3 * MIB, len(content)]
    assert hasher.hexdigest() == hashlib.sha256(content).hexdigest()


def test_a_hash_step_never_goes_past_the_finished_prefix_it_is_given(tmp_path: Path) -> None:
    content = os.urandom(3 * MIB + 5)
    hasher, fd = _hasher_over(tmp_path, content)
    try:
        assert hasher.step(2 * MIB) == 2 * MIB
        assert hasher.step(2 * MIB) == 2 * MIB  # nothing final beyond it yet
        assert hasher.step(len(content)) == len(content)
    finally:
        os.close(fd)
    assert hasher.hexdigest() == hashlib.sha256(content).hexdigest()


def test_handed_blocks_are_hashed_from_memory_and_the_rest_is_read_back(tmp_path: Path) -> None:
    """A block a connection hands over is hashed as it is, not read back from the file (that copy of
    every byte is CPU the hash needs); bytes before it, not handed, are read back. To tell the two
    apart, the file holds zeros where the handed block holds the content."""
    content = os.urandom(4 * MIB)
    on_disk = content[: 2 * MIB] + bytes(2 * MIB)  # the second half differs on disk: only in memory
    path = tmp_path / "w.bin.incomplete"
    path.write_bytes(on_disk)
    fd = os.open(path, os.O_RDONLY)
    handed = HandedBlocks(2 * MIB, count=2)
    hasher = PrefixHasher(fd, hashlib.sha256(content).hexdigest(), len(content), handed=handed)
    try:
        buffer = handed.borrow(lambda: False)
        assert buffer is not None and len(buffer) == 2 * MIB
        buffer[:] = content[2 * MIB :]
        handed.hand(2 * MIB, buffer, buffer)
        while hasher.hashed < len(content):
            hasher.step(len(content))
    finally:
        os.close(fd)
    assert hasher.hexdigest() == hashlib.sha256(content).hexdigest()
    assert not handed.pending()  # hashed: the buffer is free again
    assert handed.borrow(lambda: False) is buffer


def test_a_connection_waits_for_a_buffer_only_while_the_hash_works_on_handed_blocks(tmp_path: Path) -> None:
    """Waiting makes a receiver that runs ahead of the hash keep pace with it (no tail left to hash
    after the last byte). But while the hash still reads back older bytes (a resumed file), waiting
    would idle the link for as long: then the connection gets None and uses its own buffer."""
    handed = HandedBlocks(10, count=1)
    first = handed.borrow(lambda: False)
    assert first is not None
    handed.hand(1000, first[:10], first)  # the hash is at 0: reading back 1000 bytes first
    assert handed.borrow(lambda: False) is None  # no waiting behind the read-back

    handed.hashed_up_to(1005)  # now halfway through the handed block
    released: list[memoryview | None] = []
    waiter = threading.Thread(target=lambda: released.append(handed.borrow(lambda: False)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # waits for the hash, which is working on the handed block
    handed.hashed_up_to(1010)  # hashed: the buffer comes back, to the one waiting
    waiter.join(5)
    assert released == [first]

    stopped = threading.Event()
    handed.hand(1010, first[:10], first)
    handed.hashed_up_to(1012)
    waiter = threading.Thread(target=lambda: released.append(handed.borrow(stopped.is_set)))
    waiter.start()
    stopped.set()  # the pass stops: the wait ends without a buffer
    waiter.join(5)
    assert not waiter.is_alive() and released[-1] is None


def test_bytes_that_cannot_be_read_back_are_an_error(tmp_path: Path) -> None:
    hasher, fd = _hasher_over(tmp_path, b"short")
    try:
        with pytest.raises(OSError, match="could not read back"):
            hasher.step(1000)  # told 1000 bytes are final, but the file holds 5
    finally:
        os.close(fd)
