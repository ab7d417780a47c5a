from __future__ import annotations

import pytest

from stream_classifier.offsets import OffsetOrderError, OffsetTracker

TP = ("in", 0)


def test_to_commit_advances_only_over_contiguous_finished_offsets() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.register(TP, offset)
    tracker.mark_done(TP, 11)
    tracker.mark_done(TP, 13)
    assert tracker.to_commit() == {TP: 10}  # 10 is still out: only where reading began
    tracker.mark_done(TP, 10)
    assert tracker.to_commit() == {TP: 12}  # 12 is still out
    tracker.mark_done(TP, 12)
    assert tracker.to_commit() == {TP: 14}
    assert tracker.in_flight() == 0


def test_to_commit_skips_gaps_in_offset_numbering() -> None:
    tracker = OffsetTracker()
    for offset in (5, 9):  # 6-8: compacted away or transaction markers
        tracker.register(TP, offset)
    tracker.mark_done(TP, 5)
    tracker.mark_done(TP, 9)
    assert tracker.to_commit() == {TP: 10}


def test_committed_offsets_are_not_offered_again() -> None:
    tracker = OffsetTracker()
    tracker.register(TP, 0)
    tracker.mark_done(TP, 0)
    tracker.committed(tracker.to_commit())
    assert tracker.to_commit() == {}


def test_register_rejects_offsets_that_do_not_increase() -> None:
    tracker = OffsetTracker()
    tracker.register(TP, 3)
    with pytest.raises(OffsetOrderError):
        tracker.register(TP, 3)


def test_forget_drops_a_partition_and_ignores_its_late_acks() -> None:
    tracker = OffsetTracker()
    tracker.register(TP, 0)
    tracker.register(("in", 1), 0)
    tracker.forget([TP])
    tracker.mark_done(TP, 0)
    assert TP not in tracker.to_commit()
    assert tracker.in_flight() == 1


def test_the_first_offset_read_is_committable_at_once() -> None:
    """Under auto.offset.reset=latest a partition with nothing committed would start at
    the end for its next owner: committing where this owner began reading pins it."""
    tracker = OffsetTracker()
    tracker.register(TP, 40)
    tracker.register(TP, 41)
    assert tracker.to_commit() == {TP: 40}
    assert tracker.first_pending(TP, default=-1) == 40
    tracker.mark_done(TP, 40)
    assert tracker.first_pending(TP, default=-1) == 41
