"""SendBudget's rules: the bound, a replay's extra allowance, and a stall over two ticks."""

from __future__ import annotations

from services.socket.guards import SendBudget


def test_live_data_over_the_bound_is_refused():
    budget = SendBudget(100)
    assert budget.admits(100)
    assert not budget.admits(101)


def test_a_replay_is_allowed_until_it_drains():
    budget = SendBudget(100)
    budget.replayed(5000)  # a client asked for it: not counted against live data
    assert budget.admits(4000)
    assert budget.admits(80)  # drained below the bound: the extra allowance ends here
    assert not budget.admits(101)


def test_stalled_only_when_over_at_two_ticks_in_a_row():
    budget = SendBudget(100)
    assert not budget.stalled(500)  # a burst at one tick
    assert not budget.stalled(50)  # drained by the next
    assert not budget.stalled(500)
    assert budget.stalled(500)  # still over a tick later: the client stopped reading
    budget.drained()
    budget.replayed(1000)
    assert not budget.stalled(1000) and not budget.stalled(1000)  # a replay's own bytes
