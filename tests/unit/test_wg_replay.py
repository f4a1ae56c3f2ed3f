"""The sliding replay window against a simple set-based model (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relaymesh.wireguard.replay import WINDOW_SIZE, ReplayWindow


class Model:
    """Accept a counter iff it is below the limit, new, and at most WINDOW_SIZE behind the max."""

    def __init__(self, limit: int) -> None:
        self.seen: set[int] = set()
        self.last = 0
        self.limit = limit

    def accept(self, c: int) -> bool:
        if c >= self.limit or c in self.seen or (c < self.last and self.last - c > WINDOW_SIZE):
            return False
        self.seen.add(c)
        self.last = max(self.last, c)
        return True


LIMIT = 2**64 - 2**13 - 1


def counters() -> st.SearchStrategy[list[int]]:
    near = st.integers(0, 3 * WINDOW_SIZE)
    jumps = st.integers(0, 2**20)
    edge = st.sampled_from([LIMIT - 2, LIMIT - 1, LIMIT, LIMIT + 1, 2**64 - 1])
    return st.lists(st.one_of(near, jumps, edge), max_size=300)


@settings(max_examples=300)
@given(counters())
def test_window_matches_set_model(seq: list[int]) -> None:
    w, model = ReplayWindow(), Model(LIMIT)
    for c in seq:
        assert w.check_and_update(c) == model.accept(c), c


@given(st.lists(st.integers(0, 5000), max_size=200), st.integers(0, 2**16))
def test_window_matches_model_after_a_jump(seq: list[int], base: int) -> None:
    w, model = ReplayWindow(), Model(LIMIT)
    for c in [base, *(base + x - 2500 for x in seq if base + x - 2500 >= 0)]:
        assert w.check_and_update(c) == model.accept(c), c


def test_window_is_at_least_2048() -> None:
    w = ReplayWindow()
    assert w.check_and_update(10_000)
    assert w.check_and_update(10_000 - 2048)  # out of order but inside the window
    assert w.check_and_update(10_000 - WINDOW_SIZE)
    assert not w.check_and_update(10_000 - WINDOW_SIZE - 1)  # too old
    assert not w.check_and_update(10_000)  # replay


def test_reordered_sequence_all_accepted_once() -> None:
    w = ReplayWindow()
    order = [i ^ 5 for i in range(4096)]  # locally shuffled
    assert all(w.check_and_update(c) for c in order)
    assert not any(w.check_and_update(c) for c in order)
