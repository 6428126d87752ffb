"""History bounds and the recovery rules: exact resume, or `recovered: false`, never a gap."""

from __future__ import annotations

from services.socket.history import NOT_RECOVERED, History


class Clock:
    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def make(size: int = 5, age_s: float = 60, channels: int = 10, slack_ms: int = 100) -> History:
    history = History(size, age_s, channels, slack_ms, clock_ms=Clock())
    history.stream_started(0)
    return history


def fill(history: History, channel: str, ids: list[str], start_ms: int = 1000) -> None:
    for offset, message_id in enumerate(ids):
        history.append(channel, message_id, start_ms + offset, message_id.encode())


def test_resume_after_an_id_returns_every_later_entry_in_order():
    history = make()
    fill(history, "c", ["a", "b", "c", "d"])
    recovery = history.recover("c", "b")
    assert recovery.recovered and [e.id for e in recovery.entries] == ["c", "d"]
    assert history.recover("c", "d") == (True, [])


def test_unknown_id_is_none_and_evicted_id_is_unknown():
    history = make(size=3)
    fill(history, "c", ["a", "b", "c", "d"])
    assert history.recover("c", "a") is None  # evicted: no longer provable
    assert history.recover("c", "zzz") is None
    assert history.recover("other", "b") is None
    assert history.message_count == 3


def test_a_break_makes_older_ids_unrecoverable():
    history = make()
    fill(history, "c", ["a", "b"])
    history.stream_started(5000)  # the stream died and came back: something may be missing
    fill(history, "c", ["c", "d"], start_ms=6000)
    assert history.recover("c", "b") == NOT_RECOVERED
    assert [e.id for e in history.recover("c", "c").entries] == ["d"]
    assert history.position("c") == "d"


def test_position_is_the_newest_id_or_a_time_mark():
    history = make()
    assert history.position("c") == "@1000000"
    fill(history, "c", ["a", "b"])
    assert history.position("c") == "b"
    history.stream_started(10)
    assert history.position("c").startswith("@")  # pre-break ids cannot anchor


def test_time_mark_recovers_what_came_after_it():
    history = make(slack_ms=100)
    fill(history, "c", ["a", "b", "c"], start_ms=1000)  # publish times 1000, 1001, 1002
    recovery = history.recover("c", "@1101")  # floor 1001
    assert recovery.recovered and [e.id for e in recovery.entries] == ["c"]
    assert history.recover("empty", "@5000") == (True, [])


def test_time_mark_before_the_stream_or_eviction_is_not_recovered():
    history = History(2, 60, 10, 100, clock_ms=Clock())
    history.stream_started(2000)
    assert history.recover("c", "@2050") == NOT_RECOVERED  # floor 1950 < stream start
    fill(history, "c", ["a", "b", "c"], start_ms=3000)  # "a" (3000) evicted
    assert history.recover("c", "@3050") == NOT_RECOVERED  # floor 2950 < evicted 3000
    assert history.recover("c", "@3101").recovered


def test_garbage_marks_are_unknown_positions():
    history = make()
    for since in ("@", "@x", "@-5", "@1e9", "@" + "9" * 30):
        assert history.recover("c", since) is None


def test_channel_count_is_bounded_least_recently_active_first():
    history = make(channels=2)
    fill(history, "a", ["a1"])
    fill(history, "b", ["b1"], start_ms=2000)
    fill(history, "a", ["a2"], start_ms=3000)  # touches a
    fill(history, "c", ["c1"], start_ms=4000)  # evicts b
    assert history.channel_count == 2
    assert not history.contains("b", "b1")
    assert history.recover("b", "@2050") == NOT_RECOVERED  # b's past is gone
    assert history.contains("a", "a1")


def test_age_bound_expires_old_entries():
    clock = Clock(10_000)
    history = History(10, 5, 10, 0, clock_ms=clock)
    history.stream_started(0)
    fill(history, "c", ["a", "b"], start_ms=4000)
    fill(history, "d", ["x"], start_ms=9000)
    history.expire()  # cutoff 5000
    assert history.channel_count == 1 and history.message_count == 1
    assert history.recover("c", "@4000") == NOT_RECOVERED  # c's entries were expired
    assert history.recover("c", "@6000") == (True, [])  # nothing of c came after 4001


def test_duplicate_detection_by_channel_and_id():
    history = make()
    fill(history, "c", ["a"])
    assert history.contains("c", "a") and not history.contains("d", "a")
