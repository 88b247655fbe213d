"""Transformer Engine layer specs (GPU only): adapters are refused on TE linears until the
design in the README ("Transformer Engine layer specs") is implemented, never applied to the
un-normalised input of TELayerNormColumnParallelLinear. Skipped without Transformer Engine."""
import pytest


def test_te_linears_are_refused_not_silently_adapted():
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed (GPU only): "
                                                     "the TE layer-spec test needs it")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("Transformer Engine layer specs need a GPU")
    import megatron_mole as mm
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer import TransformerConfig

    mm.init_distributed(device="cuda")
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, add_bias_linear=False)
    model = GPTModel(config, get_gpt_layer_with_transformer_engine_spec(), vocab_size=128, max_sequence_length=16)
    with pytest.raises(NotImplementedError, match="return_layernorm_output"):
        mm.apply_mole(model, mm.MoLEConfig(num_experts=2, rank=4, targets=["linear_qkv"]))
