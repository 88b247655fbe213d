"""Host syncs in the hot path: at most one device -> host transfer per dispatch
(the split sizes the grouped matmul and the all-to-all need), none in backward.

Counted on CPU by patching the calls that wait for a GPU (tests/_syncs.py). Single
process here (local dispatch, both scopes, top-1/top-2 and a router using a variable
number of experts); the expert-parallel and TP-split dispatch are counted inside the
4-process launch of tests/test_expert_parallel.py.
"""
import pytest
import torch
from torch import nn

from tests._syncs import count_host_syncs
from tests.test_extending import _MLP  # noqa: F401  (also registers the variable router)


@pytest.mark.parametrize("router,k", [("topk", 1), ("topk", 2), ("test_threshold", 3)])
def test_one_sync_per_dispatch_none_in_backward(router, k):
    from megatron_mole.config import MoLEConfig
    from megatron_mole.layers.linear import MoLELinear
    from megatron_mole.layers.mole_mlp import MoLEMLP
    from megatron_mole.routing import set_aux_loss_scale

    kw = dict(num_experts=4, top_k=k, rank=2, router=router, aux_loss_coeff=0.01, z_loss_coeff=0.01)
    if router == "test_threshold":
        kw["router_args"] = {"ratio": 0.3}
    layers = [MoLEMLP(_MLP(8, 6), MoLEConfig(**kw)), MoLELinear(nn.Linear(8, 8), MoLEConfig(**kw, expert_scope="linear"))]
    x = torch.randn(10, 2, 8, requires_grad=True)
    set_aux_loss_scale(1.0)
    try:
        with count_host_syncs() as forward:
            y = layers[0](x)[0]
            y = layers[1](y)
        with count_host_syncs() as backward:
            y.sum().backward()
    finally:
        set_aux_loss_scale(None)
    assert sum(forward.values()) == len(layers), dict(forward)  # one .tolist() of the counts per layer
    assert set(forward) == {"tolist"}
    assert sum(backward.values()) == 0, dict(backward)
    assert x.grad is not None
