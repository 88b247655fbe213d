"""Core attention on torch's scaled_dot_product_attention = Megatron's local DotProductAttention.

One 2-process launch: Megatron's GPTModel (local spec, GQA 4 heads / 2 groups) built
twice from the same weights, once with Megatron's DotProductAttention and once with
``SdpaAttention`` swapped into the spec (runtime/attention.py), at TP1 and TP2 + SP;
logits and every parameter gradient agree to 1e-5 with a causal (no) mask, a
packed block-diagonal mask (training/data.packed_attention_mask) and a right-padded causal
mask. The spec swap also reaches every layer, and a config it cannot serve is refused.
"""
from tests._dist import run_distributed

LAYOUTS = [dict(tp=1, sp=False), dict(tp=2, sp=True)]


def _masks(batch, seq):
    import torch

    from megatron_mole.training.data import packed_attention_mask

    segments = torch.tensor([[1] * 6 + [2] * 7 + [0] * 3, [1] * 9 + [2] * 4 + [3] * 3])[:batch, :seq]
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[0, -4:] = False
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    padded = ~(causal[None] & valid[:, None, :])[:, None]  # True = masked, keys of padding masked
    return {"causal": None, "packed": packed_attention_mask(segments), "padded": padded}


def _run():
    import torch

    import megatron_mole as mm
    from megatron_mole.runtime import set_model_parallel
    from megatron_mole.runtime.attention import SdpaAttention
    from tests import _models

    mm.init_distributed(device="cpu", seed=1234)
    tokens = _models.make_batches(1, global_batch=2, seed=3)[0][:, :-1]
    position_ids = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    out = []
    for layout in LAYOUTS:
        set_model_parallel(tp=layout["tp"])
        runs = {}
        for attention in ("local", "sdpa"):
            model, _ = _models.build_gpt(sequence_parallel=layout["sp"], attention=attention)
            _models.seed_full_params(model, seed=5)
            kinds = {type(m.core_attention).__name__ for m in model.modules() if hasattr(m, "core_attention")}
            for name, mask in _masks(*tokens.shape).items():
                model.zero_grad()
                logits = model(tokens, position_ids, mask)
                weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
                (logits * weights).sum().backward()
                runs[(attention, name)] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
            runs[attention] = kinds
        result = {"kinds": (sorted(runs["local"]), sorted(runs["sdpa"]))}
        for name in ("causal", "packed", "padded"):
            (la, ga), (sa, gs) = runs[("local", name)], runs[("sdpa", name)]
            result[name] = (float((la - sa).abs().max() / la.abs().max()),
                            max(float((ga[n] - gs[n]).abs().max() / ga[n].abs().max()) for n in ga))
        out.append(result)
    from megatron.core.transformer import TransformerConfig
    try:
        SdpaAttention(TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, window_size=(8, 0)),
                      1, None, "self")
        out.append("accepted")
    except NotImplementedError as error:
        out.append(str(error))
    return out


def test_sdpa_matches_local_attention():
    per_rank = run_distributed(_run, 2, timeout=600)
    for out in per_rank:
        *layouts, refusal = out
        assert "window_size" in refusal and "attention='local'" in refusal, refusal
        for layout, result in zip(LAYOUTS, layouts):
            assert result["kinds"] == (["DotProductAttention"], ["SdpaAttention"]), result["kinds"]
            for name in ("causal", "packed", "padded"):
                logits_err, grad_err = result[name]
                assert logits_err <= 1e-5 and grad_err <= 1e-5, (layout, name, result[name])
