"""Fixtures shared by test files: one tiny converted Llama for the training tests (built once per session)."""
import pytest


@pytest.fixture(scope="session")
def tiny_train_base(tmp_path_factory):
    """A directory with ``data/train.jsonl`` (4 domains x 16 examples), ``hf_base/`` (hidden 64, 2 layers,
    not pretrained) and ``mcore/`` (its conversion). Tests write their own files next to them."""
    from megatron_mole.training.quickstart import build_base, convert

    work = tmp_path_factory.mktemp("train")
    convert(build_base(work, seed=0, examples_per_domain=16, pretrain_steps=0), work / "mcore")
    return work
