"""The live-storage tracker that measures CPU runs: hand-counted bytes."""

import pytest

torch = pytest.importorskip("torch")

from trainer.measure import LiveStorageTracker  # noqa: E402


def test_counts_new_storages_until_they_are_freed():
    with LiveStorageTracker() as tracker:
        a = torch.zeros(1000, dtype=torch.float32)  # 4000 B
        b = torch.ones(500, dtype=torch.bfloat16)  # 1000 B
        assert tracker.current == 5000
        del a
        assert tracker.current == 1000
        c = torch.empty(10, dtype=torch.int64)  # 80 B
        assert (tracker.current, tracker.peak) == (1080, 5000)
        del b, c
    assert tracker.current == 0


def test_views_and_in_place_ops_allocate_nothing_even_on_older_storages():
    base = torch.zeros(256)  # made before the tracker: invisible to it
    with LiveStorageTracker() as tracker:
        view = base[10:20].view(2, 5)
        base.add_(1)
        transposed = view.t()
        assert tracker.current == 0
        copy = transposed.contiguous()  # a real copy: 10 float32
        assert tracker.current == 40
        del view, transposed, copy


def test_reset_peak_starts_from_what_is_live():
    with LiveStorageTracker() as tracker:
        keep = torch.zeros(100)  # 400 B
        tmp = torch.zeros(1000)  # 4000 B
        del tmp
        tracker.reset_peak()
        assert tracker.peak == 400
        del keep
