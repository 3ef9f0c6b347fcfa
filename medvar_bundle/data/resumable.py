"""Training data that a killed run repeats exactly when it resumes, whatever step it was killed at.

Two things stand between a checkpoint and a bit-identical resume part-way through an epoch:

- Ignite resumes counting from the checkpointed iteration but asks the data loader for a new
  epoch, which starts at the epoch's first batch. :class:`ResumableSampler` can start its next
  epoch at any sample (:meth:`ResumableSampler.start_at`, called by the training checkpoint
  handler on resume), so the resumed epoch continues where the killed one stopped.
- MONAI's random transforms carry their own generator, whose state no checkpoint holds (and which
  every loader worker copies). :class:`SeededSamples` seeds the transform before each sample
  from ``(seed, epoch, index)``, so a sample is augmented alike by any run, process or worker.

The sampler yields ``(epoch, index)`` keys for :class:`SeededSamples`; both follow
:class:`torch.utils.data.DistributedSampler` (``set_epoch``, ``num_replicas``, ``rank``), which
MONAI's workflows drive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from monai.transforms import Randomizable, apply_transform
from torch.utils.data import Dataset, DistributedSampler


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (NumPy's ``SeedSequence`` hash): ``(seed, epoch, index)``
    or ``(seed, step, rank)`` give independent streams, unlike ``seed + step``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """A seeded :class:`~torch.utils.data.DistributedSampler` of ``(epoch, index)`` keys that can
    start an epoch part-way.

    The order of an epoch depends on ``seed`` and the epoch only (``set_epoch``, called by MONAI's
    workflows when an epoch starts), as with the parent class; every index comes with the epoch it
    was drawn for. ``len`` stays the full epoch's, so the trainer's epoch length does not change
    on resume.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def start_at(self, sample: int) -> None:
        """Start the next epoch iterated at its ``sample``-th key of this rank (once; later epochs start at 0).

        Raises:
            ValueError: ``sample`` is negative or not below this rank's samples per epoch.
        """
        if not 0 <= sample < self.num_samples:
            raise ValueError(f"cannot start an epoch of {self.num_samples} samples at sample {sample}")
        self.skip = sample

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter([(self.epoch, index) for index in indices])


class SeededSamples(Dataset):
    """``transform(data[index])`` with the transform's random draws seeded by ``(seed, epoch, index)``.

    Args:
        data: a map-style dataset (a slice or token store).
        transform: a MONAI transform (a ``Compose`` of random and non-random ones), or None.
        seed: the run's seed.

    Items are read with ``(epoch, index)`` keys from :class:`ResumableSampler`, or with a plain
    ``index`` (epoch 0).
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, seed: int = 0) -> None:
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.data[index]
        if self.transform is None:
            return item
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=derived_seed(self.seed, epoch, index))
        return apply_transform(self.transform, item)
