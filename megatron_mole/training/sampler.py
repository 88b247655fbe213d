"""Domain-mixing sampler and the global-batch loader built on it.

The stream of examples is a function of the seed alone: draw i picks a domain
from the configured weights (blocks of draws from a generator seeded by
``(seed, block)``), and the k-th pick of domain d is element ``k % n_d`` of a
permutation of that domain seeded by ``(seed, d, k // n_d)``, a fresh order each
epoch of the domain. So the whole state is the position in the stream and how
many times each domain was picked: a small dict that restores the stream exactly.
Changing the weights on resume is allowed (draws from then on follow the new
weights); changing the seed or a domain's size is refused, as it would reorder
what was already seen.

Every data-parallel rank builds the same global batch from the same stream and
keeps its own contiguous slice of rows, so the rows trained (and their order
inside the global batch) do not depend on the data-parallel size.

Legend: G global batch (rows), B rows on this rank, S seq_length, D domains.
"""
from typing import Mapping

import numpy as np

from megatron_mole.training.data import DataError, InstructionDataset, build_rows

_BLOCK = 4096  # domain draws generated per block; any size gives the same stream per block seed
_DOMAIN_STREAM, _ORDER_STREAM = 0, 1


class DomainMixSampler:
    """Deterministic, resumable stream of (domain index, example index) pairs."""

    def __init__(self, domain_sizes: Mapping[str, int], weights: Mapping[str, float] | None = None,
                 seed: int = 1234):
        self.domains = sorted(domain_sizes)
        self.sizes_D = [int(domain_sizes[d]) for d in self.domains]
        self.seed = int(seed)
        self.position = 0
        self.counts_D = [0] * len(self.domains)
        self._block_cache = (None, None)
        self._order_cache = {}
        self.set_weights(weights)

    def set_weights(self, weights: Mapping[str, float] | None):
        """Weights by domain name; None mixes in proportion to domain sizes (a shuffle of the union)."""
        if weights is None:
            weights = dict(zip(self.domains, self.sizes_D))
        unknown = sorted(set(weights) - set(self.domains))
        if unknown:
            raise DataError(f"domain_weights names domain(s) {unknown} that the data does not contain "
                            f"(domains: {self.domains})")
        missing = [d for d in self.domains if d not in weights]
        if missing:
            raise DataError(f"domain_weights has no weight for domain(s) {missing}; give 0 to leave one out")
        weights_D = np.array([float(weights[d]) for d in self.domains])
        for d, w in zip(self.domains, weights_D):
            if not np.isfinite(w) or w < 0:
                raise DataError(f"domain_weights[{d!r}] must be a finite number >= 0, got {w}")
        for d, w, n in zip(self.domains, weights_D, self.sizes_D):
            if w > 0 and n == 0:
                raise DataError(f"domain {d!r} has weight {w} but no usable example")
        if weights_D.sum() <= 0:
            raise DataError(f"domain_weights are all zero: {dict(weights)}")
        self.cumulative_D = np.cumsum(weights_D / weights_D.sum())
        # cumulative_D[-1] may round below 1.0; a uniform above it belongs to the last weighted domain
        self._last_weighted = int(np.flatnonzero(weights_D > 0)[-1])
        self._block_cache = (None, None)

    def _domain_at(self, position: int) -> int:
        block, offset = divmod(position, _BLOCK)
        if self._block_cache[0] != block:
            uniform = np.random.default_rng([self.seed, _DOMAIN_STREAM, block]).random(_BLOCK)
            draws = np.searchsorted(self.cumulative_D, uniform, side="right")
            self._block_cache = (block, np.minimum(draws, self._last_weighted))
        return int(self._block_cache[1][offset])

    def _example_of(self, domain: int, count: int) -> int:
        epoch, offset = divmod(count, self.sizes_D[domain])
        key = (domain, epoch)
        if key not in self._order_cache:
            if len(self._order_cache) > 4 * len(self.domains):
                self._order_cache.clear()
            rng = np.random.default_rng([self.seed, _ORDER_STREAM, domain, epoch])
            self._order_cache[key] = rng.permutation(self.sizes_D[domain])
        return int(self._order_cache[key][offset])

    def peek(self) -> tuple:
        """The next (domain index, example index) without consuming it."""
        domain = self._domain_at(self.position)
        return domain, self._example_of(domain, self.counts_D[domain])

    def advance(self) -> tuple:
        picked = self.peek()
        self.counts_D[picked[0]] += 1
        self.position += 1
        return picked

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed,
                "domain_counts": dict(zip(self.domains, self.counts_D)),
                "domain_sizes": dict(zip(self.domains, self.sizes_D))}

    def load_state_dict(self, state: Mapping):
        for key in ("position", "seed", "domain_counts", "domain_sizes"):
            if key not in state:
                raise DataError(f"sampler state lacks {key!r} (has {sorted(state)})")
        if int(state["seed"]) != self.seed:
            raise DataError(f"sampler state was saved with seed={state['seed']}, this run has seed={self.seed}")
        sizes = dict(zip(self.domains, self.sizes_D))
        if dict(state["domain_sizes"]) != sizes:
            raise DataError(f"sampler state was saved for domain sizes {dict(state['domain_sizes'])}; "
                            f"the data now has {sizes}")
        self.position = int(state["position"])
        self.counts_D = [int(state["domain_counts"][d]) for d in self.domains]


class GlobalBatchLoader:
    """Yields this data-parallel rank's rows of each global batch as a dict of tensors [B, S].

    Rows: ``tokens``, ``labels`` (-100 off-response), ``loss_mask`` (float 0/1),
    ``position_ids``, ``segment_ids`` (0 = padding), ``domain_ids`` (index into
    ``self.domains``, -1 = padding); all on the CPU (the loop moves them).
    """

    def __init__(self, dataset: InstructionDataset, global_batch_size: int, *,
                 weights: Mapping[str, float] | None = None, seed: int = 1234, packing: bool = False,
                 dp_rank: int = 0, dp_size: int = 1):
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if global_batch_size <= 0 or global_batch_size % dp_size:
            raise DataError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                            f"dp_size={dp_size}")
        self.dataset = dataset
        self.sampler = DomainMixSampler(dataset.domain_sizes(), weights, seed)
        self.domains = self.sampler.domains
        if self.domains != dataset.domains:
            raise DataError(f"sampler domains {self.domains} differ from dataset domains {dataset.domains}")
        self.global_batch_size = global_batch_size
        self.packing = packing
        self.rows_per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank

    def _next_group(self) -> tuple:
        capacity = self.dataset.seq_length + 1
        group, group_domains, used = [], [], 0
        while True:
            domain, index = self.sampler.peek()
            example = self.dataset.examples[domain][index]
            if group and (not self.packing or used + len(example.ids_L) > capacity):
                return group, group_domains
            self.sampler.advance()
            group.append(example)
            group_domains.append(domain)
            used += len(example.ids_L)

    def next_global_batch(self) -> dict:
        """All G rows (identical on every rank); consumes the stream."""
        groups, domains = zip(*(self._next_group() for _ in range(self.global_batch_size)))
        return build_rows(groups, domains, self.dataset.seq_length, self.dataset.pad_token_id)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.dp_rank * self.rows_per_rank
        return {k: v[start:start + self.rows_per_rank] for k, v in self.next_global_batch().items()}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping):
        self.sampler.load_state_dict(state)
