"""The element's timer queue: every armed timer fires once, in deadline
order, unless cancelled or re-armed, whichever FIFO holds it (a fixed-delay
name's own, or the shared ones for any other delay)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.element import TimerQueue

FIXED = {"G": 0.5, "H": 32.0, "I": 5.0}
NAMES = ["G", "H", "I", "X"]  # X has no FIFO of its own
DELAYS = [0.5, 1.0, 2.0, 4.0, 5.0, 32.0]

operations = st.lists(
    st.tuples(
        st.sampled_from(["arm", "cancel", "advance"]),
        st.integers(0, 3),  # owner
        st.sampled_from(NAMES),
        st.sampled_from(DELAYS),
    ),
    max_size=60,
)


@given(operations)
def test_the_queue_behaves_like_a_dictionary_of_deadlines(
    ops: list[tuple[str, int, str, float]],
) -> None:
    queue = TimerQueue(FIXED)
    model: dict[tuple[object, str], float] = {}
    now = 0.0
    fired: list[tuple[object, str]] = []
    for op, owner, name, delay in ops:
        if op == "arm":
            queue.arm(owner, name, delay, now)
            model[owner, name] = now + delay
        elif op == "cancel":
            queue.cancel(owner, name)
            model.pop((owner, name), None)
        else:
            now += delay
            due = queue.pop_due(now)
            expected = sorted((at, k) for k, at in model.items() if at <= now)
            assert sorted(due, key=lambda k: model[k]) == due  # in deadline order
            assert sorted(due, key=repr) == sorted((k for _, k in expected), key=repr)
            fired += due
            for key in due:
                del model[key]
        assert len(queue) == len(model)
        assert queue.next_deadline() == (min(model.values()) if model else None)


def test_a_timer_re_armed_with_another_delay_moves_to_that_fifo() -> None:
    queue = TimerQueue(FIXED)
    queue.arm("t", "G", 0.5, 0.0)  # the fixed FIFO
    queue.arm("t", "G", 1.0, 0.0)  # doubled: a shared FIFO, the first one gone
    assert len(queue) == 1
    assert queue.pop_due(0.6) == []
    assert queue.pop_due(1.0) == [("t", "G")]
    queue.arm("t", "G", 1.0, 2.0)
    queue.arm("t", "G", 0.5, 2.0)  # and back
    assert len(queue) == 1 and queue.next_deadline() == 2.5
    queue.cancel("t", "G")
    assert len(queue) == 0 and queue.next_deadline() is None


def test_earliest_armed_reports_the_earliest_new_deadline_once() -> None:
    queue = TimerQueue(FIXED)
    queue.arm("a", "H", 32.0, 0.0)
    queue.arm("b", "G", 0.5, 0.0)
    queue.arm("c", "X", 2.0, 0.0)
    assert queue.earliest_armed() == 0.5
    assert queue.earliest_armed() is None
