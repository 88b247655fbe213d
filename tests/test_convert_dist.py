"""Conversion by 4 processes: the same torch_dist checkpoint as one process, bit-exact round
trips, and about a quarter of the memory per rank.

The model is built here in the pytest process; one 1-process launch converts it both ways
(the reference), one 4-process launch converts it again (several small architectures at
N = 2 run in test_convert.py's 2-process launch). Memory is each rank's peak
resident set *during* the conversion call above its resident set just before it (sampled
from /proc every 2 ms), so imports and the runtime do not count. The large model (8 layers,
hidden 512, ~125 MB in fp32) is the smallest that keeps the shares well above the
per-process noise (measured: 150 MB for one process, <= 61 MB per rank of four, 0.41x).
"""
import os
import threading
import time

import pytest
import torch

from tests._dist import run_distributed
from tests.test_convert import assert_same_dist_ckpt, assert_same_hf_files

BIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=8, vocab_size=4096, max_position_embeddings=256)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS above the RSS at entry, sampled by a thread while the block runs."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.delta = self.peak - self.base
        return False


def _convert(root, tag):
    from megatron.core import dist_checkpointing  # noqa: F401  (imports are not the conversion's memory)

    from megatron_mole.checkpoint.convert import hf_to_mcore, mcore_to_hf

    out = {}
    for name in ["big"]:
        with PeakRSS() as to_mcore:
            hf_to_mcore(os.path.join(root, name, "hf"), os.path.join(root, name, f"mcore_{tag}"))
        with PeakRSS() as to_hf:
            mcore_to_hf(os.path.join(root, name, f"mcore_{tag}"), os.path.join(root, name, f"back_{tag}"))
        out[name] = (to_mcore.delta, to_hf.delta)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import transformers

    root = str(tmp_path_factory.mktemp("convert_dist"))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BIG))
    with torch.no_grad():
        for param in model.parameters():  # 1 + noise keeps the norms realistic, the rest any values
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.05)
    model.save_pretrained(os.path.join(root, "big", "hf"), max_shard_size="40MB")
    del model
    (one,) = run_distributed(_convert, 1, root, "n1", timeout=300)
    four = run_distributed(_convert, 4, root, "n4", timeout=300)
    return root, one, four


@pytest.mark.parametrize("name", ["big"])
def test_four_processes_write_what_one_process_writes(converted, name):
    root, _, _ = converted
    assert_same_dist_ckpt(os.path.join(root, name, "mcore_n1"), os.path.join(root, name, "mcore_n4"))
    for tag in ("n1", "n4"):
        assert_same_hf_files(os.path.join(root, name, "hf"), os.path.join(root, name, f"back_{tag}"))
    assert os.listdir(os.path.join(root, name, "mcore_n4", "dist_ckpt")).count("__3_0.distcp") == 1


def test_each_of_four_ranks_holds_about_a_quarter(converted):
    root, one, four = converted
    model_bytes = sum(os.path.getsize(os.path.join(root, "big", "hf", n))
                      for n in os.listdir(os.path.join(root, "big", "hf")) if n.endswith(".safetensors"))
    single = one["big"][0]
    per_rank = [rank_result["big"][0] for rank_result in four]
    # one process holds the whole model (plus a layer); each of four about a quarter (plus a layer)
    assert single >= 0.9 * model_bytes, (single, model_bytes)
    print(f"peak above start: one process {single >> 20} MiB, ranks of four {[r >> 20 for r in per_rank]} MiB")
    assert max(per_rank) < 0.7 * single, (per_rank, single)
