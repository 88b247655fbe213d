"""Version compatibility (runtime/compat.py), patch ranges (runtime/cpu.py) and the HybridModel
pattern <-> GPT layer mapping (runtime/hybrid.py): pure functions, no process launch."""
import dataclasses
import functools
import warnings
from unittest import mock

import pytest

from megatron_mole.runtime import compat, cpu, hybrid


def test_version_tuple():
    assert compat.version_tuple("0.19.2") == (0, 19, 2)
    assert compat.version_tuple("0.20.0rc1") == (0, 20, 0)
    assert compat.version_tuple("0.16") == (0, 16)
    assert compat.version_tuple() == compat.version_tuple(compat.megatron_version())


def test_local_mlp_submodules_on_this_release():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    sub = compat.local_mlp_submodules()
    assert sub.linear_fc1 is ColumnParallelLinear and sub.linear_fc2 is RowParallelLinear
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    # 0.19 gives a functools.partial, 0.16 a ModuleSpec: the helper reads both
    is_partial = isinstance(get_gpt_layer_local_spec().submodules.mlp, functools.partial)
    assert is_partial == (compat.version_tuple()[:2] >= (0, 19))


def test_patch_ranges_per_version():
    names = lambda version, device="cpu", te=False: [  # noqa: E731
        p.name for p in _with_version(version, lambda: cpu.patches_for(device, te))]
    all_names = [p.name for p in cpu.PATCHES]
    assert names("0.19.2") == all_names
    assert names("0.16.1") == [n for n in all_names if n != "hybrid-final-norm"]  # no HybridStack before 0.19
    assert names("0.19.2", "cuda") == [p.name for p in cpu.PATCHES if p.scope == cpu.NO_TE]
    assert names("0.16.1", "cuda") == ["torch-norm-sequence-parallel", "moe-te-general-gemm", "clip-vit-norm"]
    assert names("0.19.2", "cuda", te=True) == []
    # past a patch's checked range it still applies, with one warning naming it
    patch = dataclasses.replace(cpu.PATCHES[0], name="a-patch-of-this-test")  # not warned about yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _with_version("0.20.1", lambda: cpu.in_version_range(patch))
    assert any(patch.name in str(w.message) and "0.20.1" in str(w.message) for w in caught)


def _with_version(version, fn):
    with mock.patch.object(compat, "megatron_version", return_value=version):
        return fn()


def test_hybrid_unavailable_before_0_19():
    reason = _with_version("0.16.1", compat.hybrid_unavailable_reason)
    assert "0.19" in reason and "0.16.1" in reason
    assert _with_version("0.19.2", compat.hybrid_unavailable_reason) is None
    with pytest.raises(RuntimeError, match="HybridModel needs megatron-core >= 0.19"):
        _with_version("0.16.1", lambda: compat.build_hybrid_model(None, None, "*-"))


def test_gpt_patterns_and_layer_mapping():
    assert hybrid.gpt_pattern(2) == "*-*-"
    assert hybrid.gpt_pattern(4, [True, False, True, True], segments=2) == "*E*-|*E*E"
    with pytest.raises(ValueError, match="cannot be split into 3"):
        hybrid.gpt_pattern(4, segments=3)
    assert hybrid.check_gpt_pattern("*-*E|*-*-") == 4
    for bad in ("M*-*-", "*--*", "*-*", "*|-*-", "*-*-/*-"):
        with pytest.raises(ValueError, match="hybrid pattern"):
            hybrid.check_gpt_pattern(bad)
    # hybrid layer h (Megatron layer_number h + 1) -> GPT layer h // 2
    assert [hybrid.canonical_layer_index(n, hybrid=True) for n in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert [hybrid.canonical_layer_index(n, hybrid=False) for n in range(1, 4)] == [0, 1, 2]


def test_apply_mole_refuses_a_pattern_without_gpt_names():
    import torch

    import megatron_mole as mm

    model = torch.nn.Linear(2, 2)
    model.hybrid_layer_pattern = "M*-"
    with pytest.raises(ValueError, match="'M\\*-'.*pairs of attention"):
        mm.apply_mole(model, mm.MoLEConfig(num_experts=2, rank=2))
