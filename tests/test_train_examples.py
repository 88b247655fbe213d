"""The example job configs parse, fit their 16-GPU layout, and their memory estimates hold together:
base weights against an independent count from transformers' own parameter count."""
import json
from pathlib import Path

import pytest

from megatron_mole.training.memory import GIB, estimate, padded_vocab, shapes_from_hf_config
from megatron_mole.training.train_config import load_train_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
JOBS = [("llama3_8b_mole.yaml", "llama3-8b.config.json"), ("mixtral_8x7b_lora_attn.yaml", "mixtral-8x7b.config.json"),
        ("mixtral_8x7b_perft_r.yaml", "mixtral-8x7b.config.json"), ("mixtral_8x7b_perft_e.yaml", "mixtral-8x7b.config.json")]


def _hf_param_count(hf: dict) -> int:
    """Parameters of the HF model, counted by transformers on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config_name, model_name", JOBS)
def test_example_job_fits_and_estimate_matches_transformers(config_name, model_name):
    cfg = load_train_config(EXAMPLES / config_name)
    assert cfg.parallel.data_parallel_size(16) == 8
    hf = json.loads((EXAMPLES / "models" / model_name).read_text())
    shapes = shapes_from_hf_config(hf)
    result = estimate(shapes, cfg, world_size=16)
    first = result["first stage"]
    assert 10 * GIB < first["total"] < 80 * GIB  # fits an 80 GB GPU
    # pp=1: one rank holds 1/tp of the dense weights and 1/(ep*etp) of the experts
    tp, ep = cfg.parallel.tp, cfg.parallel.ep
    total = _hf_param_count({k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    expert = shapes.layers * shapes.base_experts * 3 * shapes.hidden * shapes.expert_ffn
    norms = shapes.layers * 2 * shapes.hidden + shapes.hidden  # replicated over TP
    routers = shapes.layers * shapes.base_experts * shapes.hidden  # replicated over TP
    padding = 2 * (padded_vocab(shapes.vocab, tp) - shapes.vocab) * shapes.hidden
    per_rank = (total - expert - norms - routers + padding) / tp + expert / (ep * tp) + norms + routers
    assert first["base_weights"] == pytest.approx(2 * per_rank, rel=1e-9)
