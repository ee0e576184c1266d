"""Replay mixing: counts by hand, determinism, iterables, and the map-style batch sampler."""

import itertools
import math

import pytest
import torch

from alignlab.data.replay import ReplayBatchSampler, ReplayMixer, replay_counts


def test_counts_by_hand():
    assert list(itertools.islice(replay_counts(4, 0.25), 5)) == [1, 1, 1, 1, 1]
    assert list(itertools.islice(replay_counts(5, 0.1), 6)) == [0, 1, 0, 1, 0, 1]  # 0.5 per batch
    assert list(itertools.islice(replay_counts(8, 0.05), 5)) == [0, 0, 1, 0, 1]  # 0.4 per batch
    assert list(itertools.islice(replay_counts(8, 0.0), 3)) == [0, 0, 0]
    # Long run: exactly floor(n f B) replayed after n batches; each batch floor or ceil of f B.
    c = list(itertools.islice(replay_counts(7, 0.05), 1000))
    assert sum(c) == math.floor(1000 * 7 * 0.05 + 1e-9) and set(c) <= {0, 1}


def test_mixer_content_order_and_fraction():
    task = list(range(100))
    general = [f"g{i}" for i in range(7)]
    batches = list(ReplayMixer(task, general, batch_size=10, replay_fraction=0.2, seed=3, with_source=True))
    flat = [x for b in batches for x in b]
    task_seen = [x for s, x in flat if s == "task"]
    assert task_seen == task  # every task example once, order kept
    assert all(sum(s == "general" for s, _ in b) == 2 for b in batches[:-1])
    # the general stream is cycled: batch b replays the next k_b examples of the cycle
    pos = 0
    for b in batches:
        got = sorted(x for s, x in b if s == "general")
        assert got == sorted(general[(pos + i) % 7] for i in range(len(got)))
        pos += len(got)
    assert all(len(b) == 10 for b in batches[:-1])


def test_mixer_deterministic_and_seed_dependent():
    def run(seed, epoch=0):
        m = ReplayMixer(range(50), range(1000, 1100), batch_size=8, replay_fraction=0.3, seed=seed)
        m.set_epoch(epoch)
        return list(m)

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0, epoch=1) != run(0, epoch=0)


def test_mixer_on_one_shot_generators_and_endless_general():
    task = (i for i in range(13))
    general = itertools.count(1000)
    batches = list(ReplayMixer(task, general, batch_size=4, replay_fraction=0.25, seed=0))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 2]  # 3+3+3+3 task, last 1 task + 1 general
    assert sorted(x for b in batches for x in b if x < 1000) == list(range(13))
    assert list(ReplayMixer(iter([]), general, batch_size=4)) == []
    batches = list(ReplayMixer(range(13), general, batch_size=4, replay_fraction=0.25, drop_last=True))
    assert [len(b) for b in batches] == [4, 4, 4, 4]


def test_mixer_errors():
    with pytest.raises(ValueError, match="replay_fraction"):
        ReplayMixer([1], [2], batch_size=4, replay_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ReplayMixer([1], [2], batch_size=0)
    with pytest.raises(TypeError, match="general"):
        ReplayMixer([1], 5, batch_size=2)
    with pytest.raises(ValueError, match="general data ran out"):
        list(ReplayMixer(range(10), iter([]), batch_size=2, replay_fraction=0.5))
    with pytest.raises(ValueError, match="general data ran out"):
        list(ReplayMixer(range(10), iter([1]), batch_size=2, replay_fraction=0.5))


def test_batch_sampler_indices_and_dataloader():
    sampler = ReplayBatchSampler(23, 5, batch_size=4, replay_fraction=0.25, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8  # ceil(23 / 3)
    task_idx = [i for b in batches for i in b if i < 23]
    gen_idx = [i for b in batches for i in b if i >= 23]
    assert sorted(task_idx) == list(range(23)) and len(gen_idx) == 8
    assert all(23 <= i < 28 for i in gen_idx)
    assert sorted(gen_idx[:5]) == list(range(23, 28))  # without replacement within a cycle
    assert batches == list(ReplayBatchSampler(23, 5, batch_size=4, replay_fraction=0.25, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ds = torch.utils.data.ConcatDataset(
        [torch.utils.data.TensorDataset(torch.arange(23)), torch.utils.data.TensorDataset(-torch.arange(1, 6))]
    )
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ReplayBatchSampler(23, 5, batch_size=4, replay_fraction=0.25))
    got = [b[0] for b in loader]
    assert all(int((t < 0).sum()) == 1 for t in got)
    unshuffled = list(ReplayBatchSampler(6, 2, batch_size=3, replay_fraction=0.0, shuffle=False))
    assert unshuffled == [[0, 1, 2], [3, 4, 5]]
    assert len(ReplayBatchSampler(23, 5, batch_size=4, replay_fraction=0.25, drop_last=True)) == 7
    with pytest.raises(ValueError, match="general_size"):
        ReplayBatchSampler(4, 0, batch_size=2, replay_fraction=0.5)
    with pytest.raises(ValueError, match="task_size"):
        ReplayBatchSampler(0, 4, batch_size=2)


def test_numpy_scalars_match_python_numbers():
    np = pytest.importorskip("numpy")
    take = lambda f, b: list(itertools.islice(replay_counts(b, f), 50))  # noqa: E731
    assert take(np.float32(0.25), np.int64(8)) == take(0.25, 8)
    assert take(np.float64(0.05), 8) == take(0.05, 8)
    sampler = ReplayBatchSampler(np.int64(10), np.int64(5), batch_size=np.int64(4), replay_fraction=np.float32(0.25))
    assert list(sampler) == list(ReplayBatchSampler(10, 5, batch_size=4, replay_fraction=0.25))
    mixer = ReplayMixer(range(6), range(100, 103), batch_size=np.int64(3), replay_fraction=np.float32(0.5))
    assert list(mixer) == list(ReplayMixer(range(6), range(100, 103), batch_size=3, replay_fraction=0.5))
    with pytest.raises(TypeError, match="replay_fraction"):
        replay_counts(8, True)
    with pytest.raises(ValueError, match="replay_fraction"):
        replay_counts(8, float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        replay_counts(True, 0.1)


def test_epoch_behaviour_of_the_general_data_as_documented():
    # ReplayMixer: the general stream's position carries over to the next iteration.
    mixer = ReplayMixer(range(4), range(100, 110), batch_size=2, replay_fraction=0.5, seed=0)
    general = lambda batches: [x for b in batches for x in b if x >= 100]  # noqa: E731
    assert general(list(mixer)) == [100, 101, 102, 103]
    mixer.set_epoch(1)
    assert general(list(mixer)) == [104, 105, 106, 107]
    # ReplayBatchSampler: a pure function of (seed, epoch); a new permutation every epoch.
    sampler = ReplayBatchSampler(4, 10, batch_size=2, replay_fraction=0.5, seed=0)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_flags_must_be_bools(flag):
    """with_source="no" was truthy and yielded (source, example) pairs; shuffle="no" shuffled."""
    for name in ("drop_last", "with_source"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            ReplayMixer(range(8), range(4), batch_size=4, **{name: flag})
    for name in ("shuffle", "drop_last"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            ReplayBatchSampler(8, 4, batch_size=4, **{name: flag})


def test_numpy_bool_flags_are_stored_as_python_bools():
    np = pytest.importorskip("numpy")
    mixer = ReplayMixer(range(8), range(4), batch_size=4, replay_fraction=0.25, with_source=np.bool_(True))
    assert mixer.with_source is True and next(iter(mixer))[0][0] in ("task", "general")
    sampler = ReplayBatchSampler(8, 4, batch_size=4, shuffle=np.bool_(False), drop_last=np.bool_(True))
    assert sampler.shuffle is False and sampler.drop_last is True


@pytest.mark.parametrize("start", [-3, 1.5, "2", True])
def test_replay_counts_start_must_be_a_non_negative_int(start):
    """start=-3 gave counts off the formula (int() truncates towards zero) and start=1.5 was used as is."""
    with pytest.raises(ValueError, match="start must be an int >= 0"):
        replay_counts(8, 0.3, start=start)


def test_replay_counts_from_a_start_continue_the_sequence():
    np = pytest.importorskip("numpy")
    whole = list(itertools.islice(replay_counts(8, 0.3), 10))
    assert list(itertools.islice(replay_counts(8, 0.3, start=np.int64(4)), 6)) == whole[4:]


@pytest.mark.parametrize("epoch", [1.7, True, "1", -1])
def test_set_epoch_takes_a_non_negative_int(epoch):
    """set_epoch(1.7) and set_epoch(True) were read as epoch 1 through int(), "1" as 1."""
    for obj in (ReplayMixer(range(8), range(4), batch_size=4), ReplayBatchSampler(8, 4, batch_size=4)):
        with pytest.raises(ValueError, match="epoch must be an int >= 0"):
            obj.set_epoch(epoch)


def test_set_epoch_numpy_int():
    np = pytest.importorskip("numpy")
    sampler = ReplayBatchSampler(8, 4, batch_size=4, replay_fraction=0.25)
    sampler.set_epoch(np.int64(3))
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first and type(sampler.epoch) is int


@pytest.mark.parametrize("batch_size, fraction", [(1, 0.05), (1, 0.5), (4, 0.8)])
def test_mixer_all_general_batches_do_not_end_the_epoch(batch_size, fraction):
    # k_b = B for some batches when f > 1 - 1/B (any f > 0 with batch_size=1, the usual per-device size under
    # gradient accumulation): such a batch has no task part, and the mixer used to stop the epoch there
    # (after 19 of 100 task examples for B=1, f=0.05). It must cover the task data as the sampler does.
    task, general = list(range(100)), [f"g{i}" for i in range(10)]
    batches = list(ReplayMixer(task, general, batch_size=batch_size, replay_fraction=fraction))
    assert [x for b in batches for x in b if isinstance(x, int)] == task
    sampler = list(ReplayBatchSampler(100, 10, batch_size=batch_size, replay_fraction=fraction, shuffle=False))
    assert [len(b) for b in batches] == [len(b) for b in sampler]
    assert sum(isinstance(x, str) for b in batches for x in b) == sum(x >= 100 for b in sampler for x in b)
