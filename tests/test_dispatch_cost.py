"""The dispatch cost model against hand-computed byte counts."""
import pytest

from megatron_mole.dispatch.cost import choose_dispatch, estimate


def test_bytes_by_hand():
    # one linear 16 -> 32, rank 2, 4 experts, 10 tokens top-1, ep 2, dp 4, fp32
    a2a = estimate("alltoall", 10, 1, 4, 2, [(16, 32)], ep=2, dp=4)
    # wire: 10 rows * 1/2 remote * 2 (fwd+bwd) * (16 + 32) * 4 bytes = 1920
    # grads: 2 local experts * 2*(16+32)=96 params * 4 B = 768 B, ring over dp/ep = 2: 768
    assert a2a.bytes_per_step == pytest.approx(1920 + 768)
    assert a2a.expert_state_bytes == 2 * 96 * 16
    rep = estimate("replicated", 10, 1, 4, 2, [(16, 32)], ep=2, dp=4)
    # grads of 4 experts (1536 B) over dp 4: 2 * 3/4 * 1536 = 2304
    assert rep.bytes_per_step == pytest.approx(2304)
    assert rep.bytes_per_token == pytest.approx(230.4)


def test_choice_follows_bytes_and_memory():
    small = dict(top_k=1, num_experts=4, rank=8, linears=[(1024, 2816), (2816, 1024)], ep=2, dp=2)
    # few tokens: moving them (0.5 MB) beats all-reducing every expert's grads (983 KB at dp 2,
    # while at dp == ep the owned experts need no grad all-reduce at all)
    assert choose_dispatch(64, **small)[0] == "alltoall"
    # a realistic 64k tokens per rank: the activations dominate, replicate the experts
    assert choose_dispatch(1 << 16, **small)[0] == "replicated"
    many = dict(small, num_experts=64, rank=64)
    assert choose_dispatch(256, **many)[0] == "alltoall"
    # a memory budget smaller than the replicated experts forces all-to-all
    assert choose_dispatch(1 << 16, memory_budget_bytes=1.0, **small)[0] == "alltoall"
    assert choose_dispatch(64, **dict(small, ep=1))[0] == "replicated"
    with pytest.raises(ValueError, match="num_experts=3 is not divisible by ep=2"):
        estimate("alltoall", 1, 1, 3, 1, [(4, 4)], ep=2, dp=2)
