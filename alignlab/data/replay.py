r"""Replay: mix a fixed fraction of general (pre-training) data into every batch.

Rehearsing a little of the original distribution while fine-tuning is the
simplest guard against catastrophic forgetting (Robins, "Catastrophic
forgetting, rehearsal and pseudorehearsal", Connection Science 1995; for LLMs
e.g. Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train
Large Language Models", arXiv:2403.08763, who replay ~5% of old data).

With batch size :math:`B` and replay fraction :math:`f`, batch :math:`b`
(0-based) holds

.. math::  k_b = \lfloor (b+1) f B \rfloor - \lfloor b f B \rfloor

general examples and :math:`B - k_b` task examples. Every batch has
:math:`\lfloor fB \rfloor` or :math:`\lceil fB \rceil` replayed examples and
after :math:`n` batches exactly :math:`\lfloor n f B \rfloor` have been
replayed, so small fractions (5% of a batch of 8) are honoured on average
without randomness in the counts. Where the replayed examples sit inside a batch
is shuffled with a seeded RNG; everything is deterministic given ``seed`` and
the epoch (:meth:`set_epoch`).

Two forms:

* :class:`ReplayMixer` for iterables (streaming datasets, generators): yields
  lists of examples; the task stream is read once per epoch in order, the
  general stream is cycled (re-iterated when exhausted, so it may be infinite).
* :class:`ReplayBatchSampler` for map-style datasets: yields index lists into
  ``torch.utils.data.ConcatDataset([task, general])``, usable as a
  ``DataLoader(batch_sampler=...)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any

from alignlab._checks import ArgumentTypeError, as_bool, check_positive_int, is_int, is_real

__all__ = ["replay_counts", "ReplayMixer", "ReplayBatchSampler"]


def _check(batch_size: int, replay_fraction: float) -> Fraction:
    check_positive_int(batch_size, "batch_size")
    if not is_real(replay_fraction):  # Python and NumPy reals, Fraction; not a bool
        raise ArgumentTypeError(f"replay_fraction must be a number in [0, 1), got {replay_fraction!r}")
    if not 0 <= replay_fraction < 1:  # NaN fails too
        raise ValueError(f"replay_fraction must lie in [0, 1), got {replay_fraction!r}")
    if not isinstance(replay_fraction, Fraction):
        replay_fraction = float(replay_fraction)  # Fraction() refuses np.float32
    # 0.05 as a float is not 1/20; the nearest small fraction keeps long-run counts exact.
    return Fraction(replay_fraction).limit_denominator(10**6)


def _check_epoch(epoch: int) -> int:
    # int() read 1.7 as 1 and True as 1: two epochs sharing one RNG without a word
    if not is_int(epoch) or epoch < 0:
        kind = ValueError if is_int(epoch) else ArgumentTypeError
        raise kind(f"epoch must be an int >= 0, got {epoch!r}")
    return int(epoch)


def replay_counts(batch_size: int, replay_fraction: float, start: int = 0) -> Iterator[int]:
    """Endless sequence of replayed examples per batch, ``k_b`` of the module docstring.

    Args:
        batch_size: ``B >= 1``.
        replay_fraction: ``f`` in ``[0, 1)``.
        start: index of the first batch, an int >= 0.

    Raises:
        ValueError: ``batch_size < 1``, ``f`` outside ``[0, 1)`` or a ``start`` that is not an int >= 0.
        TypeError: ``batch_size`` or ``start`` not an int, ``f`` not a number (for the ints an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    f = _check(batch_size, replay_fraction) * batch_size
    if not is_int(start) or start < 0:  # int() truncates towards 0: a negative or fractional start breaks the floors
        kind = ValueError if is_int(start) else ArgumentTypeError
        raise kind(f"start must be an int >= 0, got {start!r}")
    return _counts(f, int(start))  # checked now, not at the first next()


def _counts(f: Fraction, b: int) -> Iterator[int]:
    while True:
        yield int((b + 1) * f) - int(b * f)
        b += 1


_END = object()  # end of the task stream


class _Cycle:
    """Iterate ``source`` forever, restarting it when exhausted (it must be re-iterable)."""

    def __init__(self, source: Iterable):
        self.source = source
        self.it = iter(source)

    def __next__(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            pass
        self.it = iter(self.source)
        try:
            return next(self.it)
        except StopIteration:
            raise ValueError(
                "general data ran out: pass a re-iterable (list, Dataset, DataLoader) or an endless iterator"
            ) from None


class ReplayMixer:
    """Batches of task examples with a fraction of general examples mixed in.

    >>> mixer = ReplayMixer(task_examples, general_examples, batch_size=8, replay_fraction=0.05, seed=0)
    >>> for batch in mixer:            # list of 8 examples (the last may be shorter)  # doctest: +SKIP
    ...     loss = step(collate(batch))

    Args:
        task: iterable of task examples; one pass over it is one epoch (a one-shot iterator
            gives one epoch).
        general: iterable of general examples, cycled as needed; keep it re-iterable or endless.
            Its position carries over from epoch to epoch (and from one ``iter()`` to the next), so
            the general examples an epoch replays depend on what earlier iterations consumed;
            :meth:`set_epoch` changes only where they are placed. A new mixer starts it afresh.
        batch_size: examples per batch ``B``.
        replay_fraction: ``f`` in ``[0, 1)``.
        seed: seeds where the replayed examples go inside each batch.
        drop_last: drop a final batch with fewer than ``B - k_b`` task examples.
        with_source: yield ``(source, example)`` pairs, ``source`` being ``"task"`` or ``"general"``.

    Raises:
        ValueError: bad ``batch_size``/``replay_fraction``; when iterating, a general stream that is
            empty or runs out.
        TypeError: ``task``/``general`` not iterable; ``drop_last``/``with_source`` not a bool (a string
            such as ``"no"`` would switch it on).
    """

    def __init__(
        self,
        task: Iterable,
        general: Iterable,
        *,
        batch_size: int,
        replay_fraction: float = 0.05,
        seed: int = 0,
        drop_last: bool = False,
        with_source: bool = False,
    ):
        for name, src in (("task", task), ("general", general)):
            if not isinstance(src, Iterable):
                raise TypeError(f"{name} must be iterable, got {type(src).__name__}")
        _check(batch_size, replay_fraction)
        self.task, self.general = task, general
        self.batch_size, self.replay_fraction = batch_size, replay_fraction
        self.seed = seed
        self.drop_last, self.with_source = as_bool(drop_last, "drop_last"), as_bool(with_source, "with_source")
        self.epoch = 0
        self._general: _Cycle | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the placement RNG of ``epoch`` (call before each epoch, as with DistributedSampler).

        Raises ``ValueError`` unless ``epoch`` is an int >= 0 (NumPy ints too); for one that is no int it is an
        :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too."""
        self.epoch = _check_epoch(epoch)

    def __iter__(self) -> Iterator[list]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        if self._general is None:
            self._general = _Cycle(self.general)
        task_it = iter(self.task)
        counts = replay_counts(self.batch_size, self.replay_fraction)
        # One task example is read ahead: a batch may want none (k_b = B, e.g. B = 1), and only the task
        # stream running out ends the epoch (an empty task part used to end it at the first such batch).
        ahead = next(task_it, _END)
        while ahead is not _END:
            k = next(counts)
            want = self.batch_size - k
            task_part = []
            while len(task_part) < want and ahead is not _END:
                task_part.append(ahead)
                ahead = next(task_it, _END)
            if self.drop_last and len(task_part) < want:
                return
            out = [("task", x) for x in task_part]
            # Task examples keep their order; each replayed one takes a random slot.
            for _ in range(k):
                out.insert(rng.randrange(len(out) + 1), ("general", next(self._general)))
            yield out if self.with_source else [x for _, x in out]


class ReplayBatchSampler:
    """Index batches into ``ConcatDataset([task, general])`` with a replay fraction.

    Task indices are ``0..task_size-1`` (shuffled per epoch when ``shuffle``), each used once
    per epoch; general indices are ``task_size..task_size+general_size-1``, drawn without
    replacement from a fresh permutation each time the previous one is used up.

    Unlike :class:`ReplayMixer`, nothing carries over between epochs: every ``iter()`` depends
    only on ``seed`` and the epoch, and starts a new general permutation (the rest of the last
    epoch's is dropped). Without :meth:`set_epoch` every epoch repeats the same batches, general
    examples included, as ``DistributedSampler`` does.

    Args:
        task_size: number of task examples (``>= 1``).
        general_size: number of general examples (``>= 1``, or 0 with ``replay_fraction=0``).
        batch_size, replay_fraction, drop_last: as :class:`ReplayMixer`.
        seed: seeds both permutations and placements.
        shuffle: shuffle the task order each epoch.

    Raises:
        ValueError: non-positive sizes or the conditions of :func:`replay_counts`.
        TypeError: ``shuffle``/``drop_last`` not a bool.
    """

    def __init__(
        self,
        task_size: int,
        general_size: int,
        *,
        batch_size: int,
        replay_fraction: float = 0.05,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        _check(batch_size, replay_fraction)
        check_positive_int(task_size, "task_size")
        if not is_int(general_size) or general_size < 0:
            kind = ValueError if is_int(general_size) else ArgumentTypeError
            raise kind(f"general_size must be a non-negative int, got {general_size!r}")
        if general_size == 0 and replay_fraction > 0:
            raise ValueError("general_size must be >= 1 when replay_fraction > 0")
        self.task_size, self.general_size = task_size, general_size
        self.batch_size, self.replay_fraction = batch_size, replay_fraction
        self.seed, self.shuffle, self.drop_last = seed, as_bool(shuffle, "shuffle"), as_bool(drop_last, "drop_last")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutations of ``epoch``; ``ValueError`` unless it is an int >= 0 (NumPy ints too)."""
        self.epoch = _check_epoch(epoch)

    def _plan(self) -> list[int]:
        """Task examples per batch for one epoch."""
        sizes, left, counts = [], self.task_size, replay_counts(self.batch_size, self.replay_fraction)
        while left > 0:
            want = self.batch_size - next(counts)
            if self.drop_last and left < want:
                break
            sizes.append(min(want, left))
            left -= sizes[-1]
        return sizes

    def __len__(self) -> int:
        return len(self._plan())

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        order = list(range(self.task_size))
        if self.shuffle:
            rng.shuffle(order)
        pool: list[int] = []
        pos = 0
        for b, n_task in enumerate(self._plan()):
            k = next(replay_counts(self.batch_size, self.replay_fraction, start=b))
            batch = [order[pos + i] for i in range(n_task)]
            pos += n_task
            for _ in range(k):
                if not pool:
                    pool = list(range(self.task_size, self.task_size + self.general_size))
                    rng.shuffle(pool)
                batch.insert(rng.randrange(len(batch) + 1), pool.pop())
            yield batch
