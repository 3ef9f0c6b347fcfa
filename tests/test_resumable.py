"""The resumable training data: an epoch started part-way continues the uninterrupted order, and a
sample's augmentation depends on (seed, epoch, index) only — not on the worker, the run or what
was drawn before."""

import pytest
import torch
from monai.transforms import Compose, RandGaussianNoise
from torch.utils.data import DataLoader, DistributedSampler

from medvar_bundle.data.resumable import ResumableSampler, SeededSamples, derived_seed


def test_the_sampler_draws_the_distributed_samplers_order_with_its_epoch():
    data = list(range(10))
    ours, theirs = ResumableSampler(data, num_replicas=2, rank=1, seed=3), DistributedSampler(data, 2, 1, seed=3)
    for epoch in (0, 1, 5):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == [(epoch, i) for i in theirs]
    assert len(ours) == len(theirs) == 5


def test_an_epoch_started_part_way_continues_the_order_once():
    sampler = ResumableSampler(list(range(12)), num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.start_at(5)
    assert list(sampler) == full[5:]
    assert list(sampler) == full  # the next epoch iterated starts at its beginning again
    with pytest.raises(ValueError, match="12 samples at sample 12"):
        sampler.start_at(12)


def test_a_resumed_loader_gives_the_remaining_batches_of_the_epoch():
    data = SeededSamples(list(range(16)))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=1)
    loader = DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    sampler.set_epoch(1)
    batches = [b.tolist() for b in loader]
    sampler.start_at(2 * 4)  # two batches done before the kill
    assert [b.tolist() for b in loader] == batches[2:]


class Items:
    """Sixteen constant 4×4 images: item i holds the value i."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((1, 4, 4), float(i))


def test_augmentation_depends_on_seed_epoch_and_index_only():
    noise = Compose([RandGaussianNoise(prob=1.0, std=1.0)])
    samples = SeededSamples(Items(), noise, seed=7)
    first = samples[(3, 5)]
    samples[(0, 1)], samples[(9, 2)]  # other draws in between change nothing
    assert torch.equal(samples[(3, 5)], first)
    assert not torch.equal(samples[(4, 5)], first) and not torch.equal(SeededSamples(Items(), noise, 8)[(3, 5)], first)
    # the draw is the transform's own, seeded with derived_seed(seed, epoch, index)
    expected = Compose([RandGaussianNoise(prob=1.0, std=1.0)]).set_random_state(seed=derived_seed(7, 3, 5))
    assert torch.equal(first, expected(torch.full((1, 4, 4), 5.0)))


def test_loader_workers_augment_as_the_main_process_does():
    noise = Compose([RandGaussianNoise(prob=1.0, std=1.0)])
    samples = SeededSamples(Items(), noise, seed=0)
    sampler = ResumableSampler(samples, num_replicas=1, rank=0, seed=0)
    in_process = torch.cat(list(DataLoader(samples, batch_size=4, sampler=sampler)))
    with_workers = torch.cat(list(DataLoader(samples, batch_size=4, sampler=sampler, num_workers=2)))
    assert torch.equal(in_process, with_workers)
    assert len({float(x[0, 0, 0] - x[0, 0, 1]) for x in in_process}) == 16  # every sample its own noise


def test_derived_seeds_differ_where_sums_would_collide():
    assert derived_seed(0, 1, 2) != derived_seed(0, 2, 1) != derived_seed(1, 0, 2)
    assert derived_seed(0, 1, 2) == derived_seed(0, 1, 2) and 0 <= derived_seed(5) < 2**32
