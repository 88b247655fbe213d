"""Domain-mixing sampler and global-batch loader: mixing proportions, epochs, determinism,
resume from the state dict, data-parallel invariance, packing order.

Legend: G global batch, S seq_length.
"""
import math
from collections import Counter

import pytest
import torch

from megatron_mole.training import data as D
from megatron_mole.training.sampler import DomainMixSampler, GlobalBatchLoader
from megatron_mole.training.synthetic import generate_records, record_texts
from megatron_mole.training.tokenizer import train_tokenizer

SIZES = {"arithmetic": 7, "capitalize": 11, "reverse": 5, "translate": 13}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    records = generate_records(16, seed=4)
    tokenizer = train_tokenizer(record_texts(records), tmp_path_factory.mktemp("tok"), vocab_size=400)
    taken, examples = Counter(), []
    for i, record in enumerate(records):
        domain = record["domain"]
        if taken[domain] < SIZES[domain]:
            taken[domain] += 1
            examples.append(D.Example(domain, D.parse_record(record)[1], f"r:{i}"))
    return D.InstructionDataset(examples, tokenizer, seq_length=48)


def test_mixing_follows_weights_and_skips_zero_weight():
    sampler = DomainMixSampler({"a": 10, "b": 10, "c": 10}, {"a": 3, "b": 1, "c": 0}, seed=1)
    n = 8000
    counts = Counter(sampler.advance()[0] for _ in range(n))
    assert counts[2] == 0
    share = counts[0] / n  # binomial(n, 0.75): sd ~ 0.0048
    assert abs(share - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n), share


def test_default_weights_are_proportional_to_sizes():
    sampler = DomainMixSampler({"a": 30, "b": 10}, None, seed=2)
    share = sum(sampler.advance()[0] == 0 for _ in range(8000)) / 8000
    assert abs(share - 0.75) < 0.025


def test_each_domain_epoch_is_a_permutation():
    sampler = DomainMixSampler({"a": 5, "b": 3}, {"a": 1, "b": 1}, seed=3)
    picks = {0: [], 1: []}
    for _ in range(200):
        domain, index = sampler.advance()
        picks[domain].append(index)
    for domain, size in ((0, 5), (1, 3)):
        epochs = [picks[domain][i:i + size] for i in range(0, len(picks[domain]) - size + 1, size)]
        assert len(epochs) >= 10
        assert all(sorted(e) == list(range(size)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # a fresh order per epoch


def test_stream_is_deterministic_and_seed_dependent():
    def stream(seed):
        sampler = DomainMixSampler({"a": 4, "b": 9}, {"a": 1, "b": 2}, seed=seed)
        return [sampler.advance() for _ in range(5000)]  # crosses a draw block

    assert stream(7) == stream(7)
    assert stream(7) != stream(8)


@pytest.mark.parametrize("weights, message", [
    ({"a": 1, "b": 1, "z": 1}, r"names domain\(s\) \['z'\]"),
    ({"a": 1}, r"no weight for domain\(s\) \['b'\]"),
    ({"a": 1, "b": -1}, r"domain_weights\['b'\] must be a finite number >= 0, got -1"),
    ({"a": 0, "b": 0}, "all zero"),
])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(D.DataError, match=message):
        DomainMixSampler({"a": 2, "b": 2}, weights)


def test_state_from_another_seed_or_dataset_is_refused():
    state = DomainMixSampler({"a": 2, "b": 2}, seed=1).state_dict()
    with pytest.raises(D.DataError, match="seed=1, this run has seed=2"):
        DomainMixSampler({"a": 2, "b": 2}, seed=2).load_state_dict(state)
    with pytest.raises(D.DataError, match="domain sizes"):
        DomainMixSampler({"a": 2, "b": 3}, seed=1).load_state_dict(state)


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_state_dict_reproduces_the_stream(dataset, packing):
    weights = {"arithmetic": 1, "capitalize": 2, "reverse": 1, "translate": 0.5}
    uninterrupted = GlobalBatchLoader(dataset, 4, weights=weights, seed=11, packing=packing)
    expected = _batches(uninterrupted, 9)

    first = GlobalBatchLoader(dataset, 4, weights=weights, seed=11, packing=packing)
    head = _batches(first, 4)
    state = first.state_dict()
    resumed = GlobalBatchLoader(dataset, 4, weights=weights, seed=11, packing=packing)
    resumed.load_state_dict(state)
    _assert_same(head + _batches(resumed, 5), expected)


@pytest.mark.parametrize("packing", [False, True])
def test_global_batch_does_not_depend_on_data_parallel_size(dataset, packing):
    reference = _batches(GlobalBatchLoader(dataset, 8, seed=5, packing=packing), 3)
    for dp_size in (2, 4):
        ranks = [_batches(GlobalBatchLoader(dataset, 8, seed=5, packing=packing, dp_rank=r, dp_size=dp_size), 3)
                 for r in range(dp_size)]
        joined = [{k: torch.cat([ranks[r][step][k] for r in range(dp_size)]) for k in reference[0]}
                  for step in range(3)]
        _assert_same(joined, reference)
        assert ranks[0][0]["tokens"].shape == (8 // dp_size, 48)


def test_packing_keeps_the_stream_order_and_drops_nothing(dataset):
    """Unpacked rows hold one example each: their sequence is the sampler stream."""
    unpacked = GlobalBatchLoader(dataset, 4, seed=9)
    stream = []
    for _ in range(12):
        batch = next(unpacked)
        for row in range(4):
            stream.append(batch["tokens"][row][batch["segment_ids"][row] == 1].tolist())
    packed = GlobalBatchLoader(dataset, 4, seed=9, packing=True)
    seen, fill = [], []
    while len(seen) < 40:
        batch = next(packed)
        for row in range(4):
            segments = batch["segment_ids"][row]
            fill.append((segments > 0).float().mean().item())
            for number in range(1, int(segments.max()) + 1):
                seen.append(batch["tokens"][row][segments == number].tolist())
    # The last example of a full row may lose its final token to the label shift (S+1 tokens, S inputs).
    for packed_tokens, unpacked_tokens in zip(seen[:40], stream[:40]):
        common = min(len(packed_tokens), len(unpacked_tokens))
        assert packed_tokens[:common] == unpacked_tokens[:common]
        assert common >= max(len(packed_tokens), len(unpacked_tokens)) - 1
    assert sum(fill) / len(fill) > 0.6  # several examples per row


def test_domain_ids_name_the_example_domain(dataset):
    loader = GlobalBatchLoader(dataset, 4, seed=2, packing=True)
    examples = [(e.ids_L.tolist(), d) for d, group in enumerate(dataset.examples) for e in group]
    batch = next(loader)
    for row in range(4):
        segments = batch["segment_ids"][row]
        for number in range(1, int(segments.max()) + 1):
            where = segments == number
            tokens = batch["tokens"][row][where].tolist()
            owners = {d for ids, d in examples if ids[: len(tokens)] == tokens}
            assert set(batch["domain_ids"][row][where].tolist()) == owners and len(owners) == 1
        assert (batch["domain_ids"][row][segments == 0] == -1).all()


def test_loader_checks_batch_and_rank():
    with pytest.raises(D.DataError, match="global_batch_size=6 must be a positive multiple of dp_size=4"):
        GlobalBatchLoader(None, 6, dp_size=4)
    with pytest.raises(D.DataError, match="dp_rank=2 must lie in"):
        GlobalBatchLoader(None, 4, dp_rank=2, dp_size=2)
