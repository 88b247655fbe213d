"""Megatron's own GPTModel trains identically at every layout on the CPU runtime.

All layouts run inside one 4-process launch (``set_model_parallel`` switches the
layout); the same global batch is split over the data-parallel ranks, so TP1×DP4,
TP2×DP2, PP2×DP2 and TP2×PP2 see the same data. Initialisation comes from
per-tensor seeds (``seed_full_params``) because Megatron's own CPU init depends on
construction order, which PP changes.
"""
import pytest

from tests._dist import run_distributed

DENSE_LAYOUTS = [
    dict(tp=1, pp=1, sp=False),
    dict(tp=2, pp=1, sp=False),
    dict(tp=2, pp=1, sp=True),
    dict(tp=1, pp=2, sp=False),
    dict(tp=2, pp=2, sp=False),
]
MOE_LAYOUTS = [
    dict(tp=1, pp=1, ep=1, sp=False),
    dict(tp=1, pp=1, ep=2, sp=False),
    dict(tp=2, pp=1, ep=2, sp=True),
]
STEPS = 3


def _run_layouts(layouts, moe):
    import megatron_mole as mm
    from megatron_mole.runtime import set_model_parallel
    from tests import _models

    mm.init_distributed(device="cpu", seed=1234)
    # One global batch repeated: the loss must fall, which shows the updates land.
    batches = _models.make_batches(1, global_batch=4).expand(STEPS, -1, -1)
    results = []
    for layout in layouts:
        set_model_parallel(tp=layout["tp"], pp=layout["pp"], ep=layout.get("ep", 1))
        model, config = _models.build_gpt(moe=moe, sequence_parallel=layout["sp"])
        _models.seed_full_params(model, seed=3)
        results.append(_models.train(model, config, batches, lr=0.2))
    return results


def _assert_parity(per_rank, layouts):
    results = per_rank[0]
    print({str(layout): losses for layout, losses in zip(layouts, results)})
    reference = results[0]
    assert reference[-1] < reference[0], f"loss did not decrease: {reference}"
    for layout, losses in zip(layouts[1:], results[1:]):
        for step, (ref, got) in enumerate(zip(reference, losses)):
            assert abs(got - ref) <= 1e-5 * abs(ref), (layout, step, ref, got)
    # every rank agrees on the broadcast losses
    for other in per_rank[1:]:
        assert other == results


def test_dense_gpt_parity_tp_sp_pp():
    _assert_parity(run_distributed(_run_layouts, 4, DENSE_LAYOUTS, False, timeout=600), DENSE_LAYOUTS)


def test_moe_gpt_parity_ep_tp_sp():
    _assert_parity(run_distributed(_run_layouts, 4, MOE_LAYOUTS, True, timeout=600), MOE_LAYOUTS)
