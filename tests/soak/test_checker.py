"""The soak's checker on hand-made histories: each kind of violation is flagged, a clean history
passes."""

from __future__ import annotations

from typing import Any

from devtools.soak.checker import Msg, Settings, check

CH = "soak:a"


def published(*ids: str, pub: str = "p1", ch: str = CH, t0: float = 1000.0) -> dict[str, Msg]:
    return {
        m: Msg(id=m, ch=ch, pub=pub, seq=i, sent_ms=t0 + 10 * i, accepted=True)
        for i, m in enumerate(ids)
    }


def ts_of(m: str, messages: dict[str, Msg]) -> float:
    return messages[m].sent_ms + 1


def life(
    messages: dict[str, Msg],
    deliveries: list[str],
    *,
    pos: str = "@0",
    gaps: dict[int, tuple[str, str]] | None = None,
    drained: bool = True,
    ch: str = CH,
) -> list[dict[str, Any]]:
    """join, subscribed at `pos`, the deliveries (with a `recovered: false` before the delivery at
    each index of `gaps`: (since, new position)), end."""
    events: list[dict[str, Any]] = [
        {"e": "join", "ch": ch, "t": 0},
        {"e": "subd", "ch": ch, "pos": pos, "rec": None, "t": 1, "pod": "s1"},
    ]
    for i, m in enumerate(deliveries):
        if gaps and i in gaps:
            since, new = gaps[i]
            events.append(
                {
                    "e": "subd",
                    "ch": ch,
                    "pos": new,
                    "rec": False,
                    "since": since,
                    "t": ts_of(m, messages) - 1,
                    "pod": "s2",
                }
            )
        events.append({"e": "msg", "ch": ch, "id": m, "ts": ts_of(m, messages), "t": 0})
    events.append({"e": "end", "drained": drained, "t": 99_999})
    return events


def kinds(result) -> list[str]:
    return sorted(v.kind for v in result.violations)


def test_a_clean_history_passes():
    messages = published("a", "b", "c", "d")
    result = check(
        messages,
        {
            "c1": life(messages, ["a", "b", "c", "d"]),
            "c2": life(messages, ["a", "b", "c", "d"]),
            # joined later: its position is the pod's last id
            "c3": life(messages, ["c", "d"], pos="b"),
        },
    )
    assert result.ok, [v.as_dict() for v in result.violations]
    assert result.deliveries == 10
    assert result.orders[CH] == ["a", "b", "c", "d"]


def test_a_recovery_across_reconnects_is_one_stretch():
    messages = published("a", "b", "c")
    events = life(messages, ["a", "b", "c"])
    events.insert(3, {"e": "subd", "ch": CH, "pos": "x", "rec": True, "since": "a", "t": 5})
    result = check(messages, {"c1": events})
    assert result.ok
    assert result.recoveries == {"true": 1}


def test_a_lost_message_is_flagged():
    messages = published("a", "b", "c", "d")
    result = check(
        messages,
        {"c1": life(messages, ["a", "b", "c", "d"]), "c2": life(messages, ["a", "c", "d"])},
    )
    assert kinds(result) == ["lost"]
    (violation,) = result.violations
    assert violation.client == "c2" and violation.channel == CH and violation.ids == ["b"]


def test_a_lost_tail_is_flagged_for_a_drained_client():
    messages = published("a", "b", "c")
    result = check(messages, {"c1": life(messages, ["a", "b"])})
    assert kinds(result) == ["lost"]
    assert result.violations[0].ids == ["c"]


def test_a_message_nobody_got_is_placed_by_its_publisher_and_flagged():
    messages = published("a", "b", "c")
    result = check(
        messages,
        {"c1": life(messages, ["a", "c"]), "c2": life(messages, ["a", "c"])},
    )
    assert kinds(result) == ["lost", "lost"]
    assert {v.ids[0] for v in result.violations} == {"b"}


def test_a_message_without_a_202_may_be_missing_but_not_repeated():
    messages = published("a", "b", "c")
    messages["b"].accepted = False  # its publish got a 503
    assert check(messages, {"c1": life(messages, ["a", "c"])}).ok
    assert check(messages, {"c1": life(messages, ["a", "b", "c"])}).ok
    assert kinds(check(messages, {"c1": life(messages, ["a", "b", "b", "c"])})) == ["duplicate"]


def test_a_duplicate_is_flagged():
    messages = published("a", "b", "c")
    result = check(messages, {"c1": life(messages, ["a", "b", "b", "c"])})
    assert kinds(result) == ["duplicate"]
    assert result.violations[0].ids == ["b"]


def test_a_reorder_against_other_clients_is_flagged():
    messages = published("a", "b", "c")
    messages.update(published("x", "y", pub="p2"))
    result = check(
        messages,
        {
            "c1": life(messages, ["a", "x", "b", "y", "c"]),
            "c2": life(messages, ["a", "x", "b", "y", "c"]),
            "c3": life(messages, ["a", "b", "x", "y", "c"]),
        },
    )
    assert "reorder" in kinds(result)
    assert all(v.kind == "reorder" for v in result.violations)


def test_a_reorder_against_the_publisher_is_flagged():
    messages = published("a", "b", "c")
    result = check(messages, {"c1": life(messages, ["a", "c", "b"])})
    assert "reorder" in kinds(result)
    text = " ".join(v.detail for v in result.violations)
    assert "publisher p1" in text and "client c1" in text


def test_an_unexplained_recovered_false_is_flagged():
    messages = published("a", "b", "c", "d")
    result = check(messages, {"c1": life(messages, ["a", "b", "d"], gaps={2: ("b", "c")})})
    assert kinds(result) == ["unexplained_gap"]
    assert result.recoveries == {"false:unexplained": 1}


def test_a_recovered_false_after_a_marked_break_is_explained():
    messages = published("a", "b", "c", "d")
    events = life(messages, ["a", "b", "d"], gaps={2: ("b", "c")})
    marks = [{"pod": "s2", "t": ts_of("c", messages), "kind": "break"}]
    result = check(messages, {"c1": events}, marks=marks)
    assert result.ok
    assert result.recoveries == {"false:pod_break": 1}
    # the same break on another pod explains nothing
    other = [{"pod": "s3", "t": ts_of("c", messages), "kind": "break"}]
    assert kinds(check(messages, {"c1": events}, marks=other)) == ["unexplained_gap"]


def test_a_recovered_false_during_a_stream_fault_is_explained():
    messages = published("a", "b", "c", "d")
    events = life(messages, ["a", "b", "d"], gaps={2: ("b", "c")})
    faults = [{"kind": "unavailable", "start_ms": ts_of("b", messages), "end_ms": 1100}]
    assert check(messages, {"c1": events}, faults=faults).recoveries == {
        "false:during_unavailable": 1
    }
    kill = [{"kind": "kill_api", "start_ms": ts_of("b", messages), "end_ms": 1100}]
    assert kinds(check(messages, {"c1": events}, faults=kill)) == ["unexplained_gap"]


def test_a_recovered_false_past_the_history_window_is_explained():
    ids = [f"m{i:03d}" for i in range(30)]
    messages = published(*ids)
    events = life(messages, [*ids[:2], ids[-1]], gaps={2: (ids[1], ids[-2])})
    result = check(messages, {"c1": events}, settings=Settings(history_size=20))
    assert result.ok
    assert result.recoveries == {"false:history_window": 1}


def test_a_gap_after_recovered_false_is_not_a_loss_but_one_inside_a_stretch_is():
    messages = published("a", "b", "c", "d", "e")
    # b and c missed across the recovered: false (explained), d and e after its position
    events = life(messages, ["a", "d", "e"], gaps={1: ("a", "c")})
    marks = [{"pod": "s2", "t": ts_of("b", messages), "kind": "break"}]
    assert check(messages, {"c1": events}, marks=marks).ok
    # position c, but d never came
    events = life(messages, ["a", "e"], gaps={1: ("a", "c")})
    result = check(messages, {"c1": events}, marks=marks)
    assert kinds(result) == ["lost"] and result.violations[0].ids == ["d"]


def test_a_time_position_requires_what_was_published_after_it():
    messages = published("a", "b", "c")
    late = "@1003"  # between a (sent at 1000) and b (sent at 1010)
    assert check(messages, {"c1": life(messages, ["b", "c"], pos=late)}).ok
    assert check(messages, {"c1": life(messages, ["a", "b", "c"], pos=late)}).ok  # slack
    result = check(messages, {"c1": life(messages, ["c"], pos=late)})
    assert kinds(result) == ["lost"] and result.violations[0].ids == ["b"]


def test_a_client_that_left_needs_no_tail_and_a_socketio_connect_is_checked():
    messages = published("a", "b", "c")
    events = life(messages, ["a"], drained=False)
    assert check(messages, {"c1": events}).ok
    events = [
        {"e": "sio", "rec": False, "pod": "s1", "t": 5000},
        *life(messages, ["a", "b", "c"]),
    ]
    assert kinds(check(messages, {"c1": events})) == ["unexplained_gap"]
    events[0]["rec"] = True
    assert check(messages, {"c1": events}).ok


def test_a_wire_duplicate_and_a_phantom_are_flagged():
    messages = published("a", "b")
    events = life(messages, ["a", "b"])
    events.insert(3, {"e": "msg", "ch": CH, "id": "zz", "ts": 1005, "t": 0})
    events.insert(2, {"e": "wiredup", "ch": CH, "id": "a", "t": 3})
    assert kinds(check(messages, {"c1": events})) == ["phantom", "wire_duplicate"]


def test_a_message_already_had_before_a_recovered_false_needs_no_second_copy():
    """A pod behind the client answers `recovered: false` with a position older than what the
    client has; the client drops what it already had when the pod sends it again."""
    messages = published("a", "b", "c", "d")
    events = life(messages, ["a", "b", "c", "d"], gaps={3: ("c", "a")})
    faults = [{"kind": "unavailable", "start_ms": ts_of("c", messages), "end_ms": 1100}]
    assert check(messages, {"c1": events}, faults=faults).ok
    # a second copy across the two stretches is still a duplicate
    events = life(messages, ["a", "b", "c", "b", "d"], gaps={3: ("c", "a")})
    assert kinds(check(messages, {"c1": events}, faults=faults)) == ["duplicate"]


def test_a_pod_that_had_the_position_cannot_blame_a_fault():
    """The answering pod's own clients show whether it had the position's message: a pod behind
    after a fault is explained, one that had it is not (whatever the faults around)."""
    messages = published("a", "b", "c", "d")
    events = life(messages, ["a", "b", "d"], gaps={2: ("b", "c")})  # answered by pod s2
    t_false = ts_of("c", messages) - 1
    fault = [{"kind": "close_streams", "start_ms": t_false - 1000, "end_ms": t_false - 900}]

    def watcher(b_at: float) -> list[dict[str, Any]]:
        return [
            {"e": "join", "ch": CH, "t": 0},
            {"e": "subd", "ch": CH, "pos": "@0", "rec": None, "t": 1, "pod": "s2"},
            *(
                {"e": "msg", "ch": CH, "id": m, "ts": ts_of(m, messages), "t": at, "pod": "s2"}
                for m, at in (("a", ts_of("a", messages)), ("b", b_at))
            ),
            {"e": "end", "drained": False, "t": 99_999},
        ]

    late = check(messages, {"c1": events, "w": watcher(t_false + 500)}, faults=fault)
    assert late.ok and late.recoveries == {"false:pod_behind_after_close_streams": 1}
    had = check(messages, {"c1": events, "w": watcher(t_false - 500)}, faults=fault)
    assert kinds(had) == ["unexplained_gap"]
    alone = check(messages, {"c1": events, "w": watcher(t_false + 500)})
    assert kinds(alone) == ["unexplained_gap"]  # behind with no fault around: a finding
