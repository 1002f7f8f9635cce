"""The waiting room: unit tests of each ordering rule, and properties over random use."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.waiting import WaitingRoom

PROPERTY = settings(max_examples=300, derandomize=True, database=None, deadline=None)


def always(key: str | None) -> bool:
    """Every key may start."""
    return True


def picks(
    room: WaitingRoom[str], n: int, may_start: Callable[[str | None], bool] = always
) -> list[str]:
    """The next ``n`` picks; fails if the room runs dry first."""
    out = []
    for _ in range(n):
        item = room.pick(may_start)
        assert item is not None
        out.append(item)
    return out


def fill(room: WaitingRoom[str], key: str | None, n: int, *, priority: int = 0) -> None:
    """Offer ``n`` items named ``<key><i>`` (``-`` for the None key)."""
    for i in range(n):
        assert room.offer(f"{key or '-'}{i}", priority=priority, key=key)


# -- validation and bounds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "key_capacity", "share", "message"),
    [
        (-1, None, 0.1, r"capacity must be >= 0, got -1"),
        (5, 0, 0.1, r"key_capacity must be >= 1 or None .*, got 0"),
        (5, None, -0.1, r"reserved_share must be between 0 and 0.9, got -0.1"),
        (5, None, 0.95, r"reserved_share must be between 0 and 0.9, got 0.95"),
        (5, None, math.nan, r"reserved_share must be between 0 and 0.9, got nan"),
    ],
)
def test_invalid_values_raise_naming_the_value_and_the_range(
    capacity: int, key_capacity: int | None, share: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        WaitingRoom[str](capacity, key_capacity=key_capacity, reserved_share=share)
    room = WaitingRoom[str](3, key_capacity=2, reserved_share=0.5)
    with pytest.raises(ValueError, match=message):
        room.reconfigure(capacity=capacity, key_capacity=key_capacity, reserved_share=share)
    assert (room.capacity, room.key_capacity, room.reserved_share) == (3, 2, 0.5)


def test_capacity_refuses_offers_when_full() -> None:
    room = WaitingRoom[str](2)
    assert room.offer("a", priority=0, key="A")
    assert room.offer("b", priority=5, key=None)
    assert not room.offer("c", priority=9, key="C")
    assert len(room) == 2
    assert room.pick(always) == "b"
    assert room.offer("c", priority=9, key="C")
    assert not WaitingRoom[str](0).offer("x", priority=0, key=None)


def test_key_capacity_counts_every_level_but_never_caps_the_none_key() -> None:
    room = WaitingRoom[str](10, key_capacity=2)
    assert room.offer("a0", priority=0, key="A")
    assert room.offer("a1", priority=1, key="A")
    assert not room.offer("a2", priority=2, key="A")
    assert room.offer("b0", priority=0, key="B")
    fill(room, None, 5)
    assert room.count(key="A") == 2
    assert room.count(key=None) == 5
    assert room.pick(lambda key: key == "A") == "a1"
    assert room.offer("a2", priority=0, key="A")


# -- order within a level ----------------------------------------------------------------


def test_round_robin_across_keys_and_fifo_within_a_key() -> None:
    room = WaitingRoom[str](2000)
    fill(room, "A", 1000)
    others = "BCDEFGHIJK"
    for key in others:
        fill(room, key, 10)
    fill(room, None, 10)
    rounds = [picks(room, 12) for _ in range(10)]
    for i, served in enumerate(rounds):
        assert served == [f"{k}{i}" for k in ("A", *others, "-")]
    assert picks(room, 3) == ["A10", "A11", "A12"]  # the others are done: A alone
    assert room.count(key="A") == 987


def test_a_blocked_key_is_skipped_keeps_its_items_and_its_turn() -> None:
    room = WaitingRoom[str](10)
    for key in "ABC":
        fill(room, key, 3)
    not_b = lambda key: key != "B"  # noqa: E731
    assert picks(room, 3, not_b) == ["A0", "C0", "A1"]
    assert room.count(key="B") == 3
    assert room.pick(lambda key: False) is None
    # B was passed over, not sent to the back: it goes first once it may start.
    assert picks(room, 6) == ["B0", "C1", "A2", "B1", "C2", "B2"]
    assert room.pick(always) is None


def test_a_key_that_empties_rejoins_at_the_back() -> None:
    room = WaitingRoom[str](10)
    fill(room, "A", 1)
    fill(room, "B", 2)
    assert picks(room, 1) == ["A0"]
    assert room.offer("A1", priority=0, key="A")
    assert picks(room, 3) == ["B0", "A1", "B1"]


# -- order across levels -----------------------------------------------------------------


def test_share_zero_is_strict_priority() -> None:
    room = WaitingRoom[str](100, reserved_share=0.0)
    fill(room, "L", 10, priority=0)
    fill(room, "M", 10, priority=5)
    fill(room, "H", 10, priority=9)
    assert picks(room, 30) == [f"{k}{i}" for k in "HML" for i in range(10)]


def test_a_blocked_higher_level_lets_the_lower_one_start() -> None:
    room = WaitingRoom[str](10, reserved_share=0.0)
    fill(room, "H", 2, priority=1)
    fill(room, "L", 2, priority=0)
    assert picks(room, 2, lambda key: key != "H") == ["L0", "L1"]


@pytest.mark.parametrize("share", [0.1, 0.25, 1 / 3, 0.5, 0.9])
def test_the_lower_level_gets_its_share_of_every_prefix_of_picks(share: float) -> None:
    room = WaitingRoom[str](4000, reserved_share=share)
    fill(room, "H", 1000, priority=1)
    fill(room, "L", 1000, priority=0)
    lower = 0
    for n in range(1, 1001):
        lower += picks(room, 1)[0].startswith("L")
        assert math.floor(share * n) - 1 <= lower <= math.ceil(share * n) + 1, n
    assert lower == math.floor(share * 1000)


def test_the_share_is_spread_evenly_not_in_bursts() -> None:
    room = WaitingRoom[str](100, reserved_share=0.25)
    fill(room, "H", 20, priority=1)
    fill(room, "L", 20, priority=0)
    assert [item[0] for item in picks(room, 12)] == list("HHHL" * 3)


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_three_levels_split_the_share_recursively(share: float) -> None:
    room = WaitingRoom[str](10_000, reserved_share=share)
    for priority, key in enumerate("LMH"):
        fill(room, key, 2000, priority=priority)
    n = 1000
    got = Counter(item[0] for item in picks(room, n))
    expected = {"H": (1 - share) * n, "M": share * (1 - share) * n, "L": share * share * n}
    for key, want in expected.items():
        assert abs(got[key] - want) <= 1, (key, got)


def test_a_level_with_only_blocked_items_does_not_consume_the_share() -> None:
    room = WaitingRoom[str](100, reserved_share=0.5)
    fill(room, "H", 30, priority=2)
    fill(room, "M", 30, priority=1)
    fill(room, "L", 30, priority=0)
    not_m = lambda key: key != "M"  # noqa: E731
    # M is skipped: H and L split as two levels would, not as the top and third of three.
    assert [item[0] for item in picks(room, 8, not_m)] == list("HLHLHLHL")
    # A blocked lower level earns no credit: once free it gets its share, not a burst.
    assert [item[0] for item in picks(room, 10, lambda key: key == "H")] == ["H"] * 10
    assert [item[0] for item in picks(room, 4, not_m)] == list("HLHL")


def test_startable_counts_only_keys_that_may_start() -> None:
    room = WaitingRoom[str](20)
    fill(room, "A", 3, priority=1)
    fill(room, "A", 2, priority=0)
    fill(room, "B", 4)
    fill(room, None, 1)
    assert room.startable(always) == 10
    assert room.startable(lambda key: key != "A") == 5
    assert room.startable(lambda key: key is None) == 1
    assert len(room) == 10


# -- remove, drain, count, reconfigure ---------------------------------------------------


def test_remove_drops_the_oldest_equal_item_only() -> None:
    room = WaitingRoom[str](10)
    assert room.offer("B0", priority=3, key="B")  # level 3 is created (and looked at) first
    fill(room, "A", 2)
    assert room.offer("A0", priority=3, key="B")  # equal to the older A0 of key A
    assert room.remove("A0")
    assert room.count(key="A") == 1
    assert room.count(key="B") == 2
    assert not room.remove("zz")
    assert room.remove("A1")  # A is empty now and leaves the rotation
    assert room.count(key="A") == 0
    assert picks(room, 2) == ["B0", "A0"]
    assert len(room) == 0


def test_remove_matches_by_identity_too() -> None:
    class Unequal:
        def __eq__(self, other: object) -> bool:
            return False

        __hash__ = object.__hash__

    room = WaitingRoom[Unequal](10)
    first, second = Unequal(), Unequal()
    room.offer(first, priority=0, key="A")
    room.offer(second, priority=0, key="A")
    assert room.remove(second)
    assert room.items() == [first]


def test_drain_returns_everything_oldest_first_and_empties_the_room() -> None:
    room = WaitingRoom[str](10)
    for item, key, priority in [("a", "A", 0), ("b", "B", 9), ("c", "A", 9), ("d", None, 1)]:
        room.offer(item, priority=priority, key=key)
    assert room.items() == ["a", "b", "c", "d"]
    assert len(room) == 4  # items() is a snapshot
    assert room.drain() == ["a", "b", "c", "d"]
    assert (len(room), room.count(key="A"), room.count(priority=9)) == (0, 0, 0)
    assert room.pick(always) is None
    assert room.offer("e", priority=0, key="A")


def test_count_filters_by_key_and_priority() -> None:
    room = WaitingRoom[str](20)
    fill(room, "A", 3, priority=1)
    fill(room, "A", 2, priority=0)
    fill(room, None, 4, priority=1)
    assert room.count() == 9
    assert room.count(key="A") == 5
    assert room.count(key=None) == 4
    assert room.count(priority=1) == 7
    assert room.count(key="A", priority=0) == 2
    assert room.count(key=None, priority=0) == 0
    assert room.count(key="Z", priority=7) == 0


def test_reconfigure_keeps_held_items_and_refuses_until_below() -> None:
    room = WaitingRoom[str](6, key_capacity=4, reserved_share=0.0)
    fill(room, "A", 4, priority=1)
    fill(room, "B", 2, priority=0)
    room.reconfigure(capacity=4, key_capacity=1, reserved_share=0.5)
    assert (room.capacity, room.key_capacity, room.reserved_share) == (4, 1, 0.5)
    assert len(room) == 6
    assert not room.offer("C0", priority=0, key="C")
    assert picks(room, 3) == ["A0", "B0", "A1"]  # the new share applies at once
    assert not room.offer("A9", priority=0, key="A")  # A still holds 2 > 1
    assert room.offer("C0", priority=0, key="C")
    room.reconfigure(capacity=10, key_capacity=None, reserved_share=0.0)
    assert room.offer("A9", priority=0, key="A")


# -- properties over random use ----------------------------------------------------------

KEYS = st.sampled_from(["A", "B", "C", None])
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), KEYS, st.integers(0, 2)),
        st.tuples(st.just("pick"), st.frozensets(KEYS)),  # the keys that are blocked
        st.tuples(st.just("remove"), st.integers(0, 60)),
        st.tuples(st.just("drain")),
    ),
    max_size=60,
)


@PROPERTY
@given(
    ops=OPERATIONS,
    capacity=st.integers(0, 12),
    key_capacity=st.none() | st.integers(1, 4),
    share=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
)
def test_no_item_is_lost_or_duplicated_and_blocked_keys_never_start(
    ops: list[tuple[object, ...]], capacity: int, key_capacity: int | None, share: float
) -> None:
    room = WaitingRoom[int](capacity, key_capacity=key_capacity, reserved_share=share)
    key_of: dict[int, str | None] = {}
    held: set[int] = set()
    for op in ops:
        match op:
            case ("offer", str() | None as key, int(priority)):
                item = len(key_of)
                key_of[item] = key
                if room.offer(item, priority=priority, key=key):
                    held.add(item)
            case ("pick", frozenset() as blocked):
                picked = room.pick(lambda key: key not in blocked)
                allowed = sum(1 for i in held if key_of[i] not in blocked)
                assert (picked is None) == (allowed == 0)
                if picked is not None:
                    assert key_of[picked] not in blocked
                    held.remove(picked)
            case ("remove", int(item)):
                assert room.remove(item) == (item in held)
                held.discard(item)
            case ("drain",):
                drained = room.drain()
                assert sorted(drained) == sorted(held)
                assert drained == sorted(drained)  # items are numbered in arrival order
                held.clear()
        assert sorted(room.items()) == sorted(held)
        assert len(room) == len(held) <= max(capacity, 0)
        for key in ("A", "B", "C", None):
            count = sum(1 for i in held if key_of[i] == key)
            assert room.count(key=key) == count
            if key is not None and key_capacity is not None:
                assert count <= key_capacity


@PROPERTY
@given(st.lists(st.sampled_from(["A", "B", "C", "D", "pick", "pick", "pick"]), max_size=80))
def test_no_key_is_picked_twice_while_another_waited_the_whole_time(ops: list[str]) -> None:
    room = WaitingRoom[tuple[int, str]](1000)
    held: Counter[str] = Counter()
    nonempty_since: dict[str, int] = {}  # key -> step since which it has held items
    last_pick: dict[str, int] = {}
    for step, op in enumerate(ops):
        if op != "pick":
            room.offer((step, op), priority=0, key=op)
            held[op] += 1
            nonempty_since.setdefault(op, step)
            continue
        item = room.pick(always)
        if item is None:
            assert not +held
            continue
        key = item[1]
        if key in last_pick:
            previous = last_pick[key]
            for other, since in nonempty_since.items():
                if other != key and since < previous:
                    assert last_pick.get(other, -1) > previous, (key, other, ops[: step + 1])
        last_pick[key] = step
        held[key] -= 1
        if not held[key]:
            del nonempty_since[key]
