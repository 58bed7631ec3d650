"""Packing algorithms against hand-computed packings and invariants that any correct packer keeps."""
import random

import numpy as np
import pytest

from libernie.data import FLAG_CONTINUED, BestFitPacker, ConcatPacker, Item, build, document


def doc(n, first=0):
    return document(np.arange(first, first + n, dtype=np.uint32))


def lengths(seqs):
    return [[len_ for len_ in np.diff([s for s, _ in seq.segments] + [len(seq.tokens)]).tolist()] for seq in seqs]


def test_concat_cuts_at_seq_len_and_flags_continuations():
    p = ConcatPacker(4)
    out = p.add(doc(3)) + p.add(doc(6, 100)) + p.flush()
    assert [s.tokens.tolist() for s in out] == [[0, 1, 2, 100], [101, 102, 103, 104], [105]]
    assert [s.segments for s in out] == [[(0, 0), (3, 0)], [(0, FLAG_CONTINUED)], [(0, FLAG_CONTINUED)]]
    assert [s.runs for s in out] == [[(0, 4)], [(0, 4)], [(0, 1)]]  # touching runs merge


def test_best_fit_decreasing_hand_computed():
    # seq_len 10, one window: sorted 7,5,4,3,1 -> 7 opens A (room 3); 5 opens B (5); 4 -> B (1);
    # 3 -> A (0, emitted); 1 -> B (0, emitted).
    p = BestFitPacker(10, window=5)
    out = []
    for n in (3, 5, 1, 7, 4):
        out += p.add(doc(n))
    assert lengths(out) == [[7, 3], [5, 4, 1]]
    assert p.flush() == []


def test_best_fit_keeps_bins_open_across_windows():
    p = BestFitPacker(10, window=2)
    out = p.add(doc(6)) + p.add(doc(6))  # two bins with room 4 each stay open
    assert out == []
    out = p.add(doc(4)) + p.add(doc(4))
    assert lengths(out) == [[6, 4], [6, 4]]


def test_open_bins_bound_emits_fullest():
    p = BestFitPacker(10, window=1, open_bins=1)
    assert p.add(doc(5)) == []
    out = p.add(doc(7))  # 7 does not fit room 5: second bin opens, the fuller (7) is emitted
    assert lengths(out) == [[7]]
    assert lengths(p.flush()) == [[5]]


@pytest.mark.parametrize("window, open_bins", [(1, 1), (7, 3), (50, 256)])
def test_every_token_once_never_over_capacity_and_deterministic(window, open_bins):
    rng = random.Random(window)
    sizes = [rng.randint(1, 64) for _ in range(500)]
    runs = []
    for _ in range(2):
        p, out, first = BestFitPacker(64, window, open_bins), [], 0
        for n in sizes:
            out += p.add(doc(n, first))
            first += n
        out += p.flush()
        runs.append(out)
        assert all(len(s.tokens) <= 64 for s in out)
        assert sorted(np.concatenate([s.tokens for s in out]).tolist()) == list(range(sum(sizes)))
    assert [s.tokens.tolist() for s in runs[0]] == [s.tokens.tolist() for s in runs[1]]


def test_state_round_trip_gives_same_output():
    rng = random.Random(1)
    sizes = [rng.randint(1, 30) for _ in range(300)]
    a = BestFitPacker(32, 16, 4)
    ref = [s for n in sizes for s in a.add(doc(n))] + a.flush()
    b = BestFitPacker(32, 16, 4)
    got = [s for n in sizes[:137] for s in b.add(doc(n))]
    c = BestFitPacker(32, 16, 4)
    c.load_state(__import__("orjson").loads(__import__("orjson").dumps(b.state(), option=2048)))
    got += [s for n in sizes[137:] for s in c.add(doc(n))] + c.flush()
    assert [s.tokens.tolist() for s in got] == [s.tokens.tolist() for s in ref]


def test_build_shifts_segments_and_runs():
    a = Item(np.array([1, 2, 3]), [(0, 1), (2, 2)], [(2, 1)])
    b = Item(np.array([4, 5]), [(0, 0)], [(0, 2)])
    s = build([a, b])
    assert s.tokens.tolist() == [1, 2, 3, 4, 5] and s.segments == [(0, 1), (2, 2), (3, 0)] and s.runs == [(2, 3)]
