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


@pytest.fixture(scope="session")
def tiny_moe_base(tiny_train_base, tmp_path_factory):
    """``hf_mixtral/`` (hidden 32, 2 layers, 4 experts top-2, routers far from uniform, the tiny
    Llama's tokenizer) and ``mixtral_mcore/`` (its conversion) in a fresh directory."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from megatron_mole.training.quickstart import convert

    root = tmp_path_factory.mktemp("moe")
    tokenizer = AutoTokenizer.from_pretrained(tiny_train_base / "hf_base")
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    with torch.no_grad():  # routers far from uniform: no near-ties between fp32 computations
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    model.save_pretrained(root / "hf_mixtral")
    tokenizer.save_pretrained(root / "hf_mixtral")
    convert(root / "hf_mixtral", root / "mixtral_mcore")
    return root
