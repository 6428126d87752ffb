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


# -- rewind: the last N messages, or those of the last T seconds, with an honest `complete` --


def ids(rewind) -> list[str]:
    return [entry.id for entry in rewind.entries]


def recent(size: int = 10, channels: int = 10, started_ms: int = 0) -> History:
    """Now is 100 s; the history window is 60 s (a count alone looks back to 40 s)."""
    history = History(size, 60, channels, 0, clock_ms=Clock(100_000))
    history.stream_started(started_ms)
    return history


def test_rewind_count_is_the_newest_n_oldest_first():
    history = recent()
    fill(history, "c", ["a", "b", "c", "d"], start_ms=90_000)
    rewind = history.rewind("c", 2, None)
    assert ids(rewind) == ["c", "d"] and rewind.complete
    assert history.rewind("c", 10, None) == (history.rewind("c", 4, None).entries, True)
    assert ids(history.rewind("c", 10, None)) == ["a", "b", "c", "d"]
    assert history.rewind("nothing", 5, None) == ([], True)  # complete: the room is quiet


def test_rewind_seconds_is_what_was_published_after_now_minus_t():
    history = recent()
    for n, publish_ms in enumerate((30_000, 96_000, 97_000, 99_999)):
        history.append("c", f"m{n}", publish_ms, b"")
    rewind = history.rewind("c", None, 4)  # after 96 000
    assert ids(rewind) == ["m2", "m3"] and rewind.complete
    assert ids(history.rewind("c", 1, 4)) == ["m3"]  # both bounds apply
    assert ids(history.rewind("c", 5, 4)) == ["m2", "m3"]
    assert ids(history.rewind("c", 5, None)) == ["m1", "m2", "m3"]  # m0: out of the window


def test_a_young_history_is_complete_only_from_its_start():
    history = recent(started_ms=95_000)  # a pod started 5 s ago, without a warm start
    fill(history, "c", ["a", "b", "c"], start_ms=96_000)
    inside = history.rewind("c", None, 4)  # after 96 000: the pod was there
    assert ids(inside) == ["b", "c"] and inside.complete
    longer = history.rewind("c", None, 10)  # the window starts before the pod did
    assert ids(longer) == ["a", "b", "c"] and not longer.complete
    assert not history.rewind("c", 5, None).complete  # fewer than asked: older ones unknown
    assert history.rewind("c", 3, None).complete  # 3 found, all on the pod's own stream
    assert history.rewind("c", 2, None).complete


def test_a_count_is_complete_after_evictions_of_one_publish_time():
    history = recent(size=3)
    for message_id in "abcde":  # one batch: one publish time; "a" and "b" are evicted
        history.append("c", message_id, 90_000, b"")
    rewind = history.rewind("c", 3, None)
    assert ids(rewind) == ["c", "d", "e"] and rewind.complete
    assert not history.rewind("c", 4, None).complete  # "a" and "b" are gone
    assert not history.rewind("c", None, 60).complete


def test_a_break_limits_what_a_rewind_can_prove():
    history = recent()
    fill(history, "c", ["a", "b"], start_ms=90_000)
    history.stream_started(95_000)  # broke and came back: something may be missing before
    fill(history, "c", ["c", "d"], start_ms=96_000)
    assert history.rewind("c", 2, None).complete
    across = history.rewind("c", 3, None)
    assert ids(across) == ["b", "c", "d"] and not across.complete
    assert history.rewind("c", None, 5).complete and not history.rewind("c", None, 6).complete


def test_a_channel_in_a_warm_start_backlog_is_not_complete_until_its_backlog_is_over():
    history = recent()
    history.stream_started(40_000, backlog_until_ms=99_000)  # seeked back to 40 s
    fill(history, "c", ["a", "b"], start_ms=50_000)  # backlog: newer backlog may follow
    assert not history.rewind("c", 2, None).complete
    assert not history.rewind("c", None, 30).complete
    assert history.rewind("c", None, 1).complete  # the window starts after the opening
    fill(history, "c", ["live"], start_ms=99_500)  # the channel's backlog is over
    assert history.rewind("c", 2, None).complete
    assert history.rewind("c", None, 60).complete  # complete from the seek point
    fill(history, "other", ["x"], start_ms=60_000)
    assert not history.rewind("other", 1, None).complete
    history.backlog_over()
    assert history.rewind("other", 1, None).complete


def test_a_seek_point_inside_the_window_is_not_complete():
    history = recent(started_ms=70_000)  # seeked back 30 s only (TOPIC_RETENTION_S < age)
    fill(history, "c", ["a"], start_ms=80_000)
    assert not history.rewind("c", 5, None).complete  # 60 s window: 40 000 is not covered
    assert history.rewind("c", 5, 30).complete


def test_rewind_of_an_evicted_channel_or_expired_entries():
    clock = Clock(100_000)
    history = History(10, 30, 1, 0, clock_ms=clock)
    history.stream_started(0)
    fill(history, "a", ["a1"], start_ms=95_000)
    fill(history, "b", ["b1"], start_ms=96_000)  # evicts channel a
    fill(history, "b", ["b2"], start_ms=98_000)
    assert history.rewind("a", 1, None) == ([], False)
    assert history.rewind("a", None, 4).complete  # after a's newest evicted message
    clock.now_ms = 126_000 + 500
    history.expire()  # cutoff 96 500: b1 goes, out of every window a rewind may ask
    assert history.message_count == 1
    rewind = history.rewind("b", 5, None)
    assert ids(rewind) == ["b2"] and rewind.complete
