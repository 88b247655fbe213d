"""init_distributed: errors on bad input, the CPU runtime's scope, single-process use."""
import pytest

from tests._dist import run_distributed


def _bad_inputs():
    import torch

    import megatron_mole as mm
    from megatron_mole.runtime import cpu

    errors = {}
    for kwargs in (dict(tp=3), dict(tp=2, pp=2), dict(ep=3), dict(device="tpu"), dict(tp=0)):
        try:
            mm.init_distributed(**kwargs)
            errors[str(kwargs)] = None
        except (ValueError, RuntimeError) as e:
            errors[str(kwargs)] = str(e)
    info = mm.init_distributed(tp=2, device="cpu")
    same = mm.init_distributed(tp=2, device="cpu")
    try:
        mm.init_distributed(tp=1, device="cpu")
        errors["second call"] = None
    except RuntimeError as e:
        errors["second call"] = str(e)
    # the CPU runtime maps Megatron's cuda allocations
    from megatron.core import tensor_parallel

    x = torch.empty(3, device=torch.cuda.current_device())
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(2)
    return errors, info.world_size, same is info, x.device.type, sorted(cpu.applied_patches())


def test_bad_input_is_named_and_runtime_on_cpu():
    results = run_distributed(_bad_inputs, 2)
    errors, world, same, device, patches = results[0]
    assert world == 2 and same and device == "cpu"
    assert "world size 2 is not divisible by tp*pp = 3*1" in errors["{'tp': 3}"]
    assert "tp*pp = 2*2" in errors["{'tp': 2, 'pp': 2}"]
    assert "etp*ep*pp" in errors["{'ep': 3}"]
    assert "'tpu'" in errors["{'device': 'tpu'}"]
    assert "tp must be a positive integer; got 0" in errors["{'tp': 0}"]
    assert "already called with tp=2" in errors["second call"] and "now asked for tp=1" in errors["second call"]
    from megatron_mole.runtime.cpu import PATCHES, patches_for

    # every patch whose tested range starts at or before this megatron-core
    assert patches == sorted(p.name for p in patches_for("cpu", have_te=False))
    assert len(patches) >= len(PATCHES) - 1


def _claims_cuda(with_te):
    """A process that claims CUDA: nccl is asked for; without Transformer Engine only the
    patches needed wherever TE is absent are applied (no CPU-only one), with TE none."""
    from unittest import mock

    import torch

    import megatron_mole as mm
    from megatron_mole.runtime import compat, cpu

    original_current_device = torch.cuda.current_device
    calls = {}
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch(
        "torch.cuda.device_count", return_value=1), mock.patch(
        "torch.cuda.set_device", side_effect=lambda d: calls.setdefault("set_device", str(d))
    ), mock.patch(
        "torch.distributed.init_process_group",
        side_effect=lambda backend, **kw: calls.setdefault("backend", backend),
    ), mock.patch("torch.distributed.is_initialized", return_value=False), mock.patch(
        "megatron.core.parallel_state.initialize_model_parallel"
    ), mock.patch("megatron.core.tensor_parallel.model_parallel_cuda_manual_seed"), mock.patch.object(
        compat, "have_transformer_engine", return_value=with_te
    ):
        info = mm.init_distributed(device="auto")
    mode_stack = torch.overrides._get_current_function_mode_stack()
    # The local spec's norm under sequence parallelism: Megatron's WrappedTorchNorm refuses
    # it unless the TE-absent patch is in place (issue: SP died at model build on GPUs).
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               normalization="RMSNorm", sequence_parallel=True,
                               tensor_model_parallel_size=2)
    try:
        norm = WrappedTorchNorm(config, 8)
        sp_norm = all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    except AssertionError:
        sp_norm = "refused"
    from megatron.core.transformer.moe import moe_utils

    return dict(
        backend=calls.get("backend"),
        set_device=calls.get("set_device"),
        info_device=str(info.device),
        patches=cpu.applied_patches(),
        info_patches=list(info.patches),
        modes=[type(m).__name__ for m in mode_stack],
        current_device_untouched=torch.cuda.current_device is original_current_device,
        sp_norm=sp_norm,
        te_general_gemm_defined=hasattr(moe_utils, "te_general_gemm"),
    )


def test_cuda_process_gets_only_te_absent_patches():
    from megatron_mole.runtime.cpu import NO_TE, PATCHES, patches_for

    no_te, with_te = run_distributed(_claims_cuda, 1, False), run_distributed(_claims_cuda, 1, True)
    expected = [p.name for p in patches_for("cuda", have_te=False)]
    assert expected and all(p.scope == NO_TE for p in PATCHES if p.name in expected)
    assert {"torch-norm-sequence-parallel", "moe-te-general-gemm"} <= set(expected)
    for (result,), patches in ((no_te, expected), (with_te, [])):
        assert result["backend"] == "nccl"
        assert result["set_device"] == "cuda:0" and result["info_device"] == "cuda:0"
        assert result["patches"] == patches and result["info_patches"] == patches
        # no CPU-only patch: no device mode, torch.cuda untouched
        assert "CudaToCpuMode" not in result["modes"]
        assert result["current_device_untouched"]
    assert no_te[0]["sp_norm"] is True and no_te[0]["te_general_gemm_defined"]
    assert with_te[0]["sp_norm"] == "refused"


def _single_process_without_torchrun():
    import os

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    import megatron_mole as mm
    from megatron.core import parallel_state

    info = mm.init_distributed()
    return info.world_size, info.backend, parallel_state.get_tensor_model_parallel_world_size()


def test_single_process_without_torchrun():
    assert run_distributed(_single_process_without_torchrun, 1) == [(1, "gloo", 1)]


def test_local_rank_beyond_visible_gpus_is_named(monkeypatch):
    """A 1-GPU node asked for a second rank: the error names LOCAL_RANK and the visible count
    (before any process group or CUDA call; here CUDA is mocked)."""
    import megatron_mole as mm

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    for device in ("auto", "cuda"):
        with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this node has 1 visible CUDA device") as info:
            mm.init_distributed(device=device)
        assert "--nproc-per-node 1" in str(info.value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    from megatron_mole.runtime import resolve_device

    assert str(resolve_device("auto")) == "cuda:0"


def _switch_layouts():
    from unittest import mock

    import torch.distributed as dist

    import megatron_mole as mm
    from megatron.core import parallel_state as ps
    from megatron_mole import runtime

    def live():
        return len(dist.distributed_c10d._world.pg_map)

    mm.init_distributed(tp=1, device="cpu")
    counts = [live()]
    for _ in range(3):
        for layout in (dict(tp=2), dict(pp=2), dict(ep=2), dict(tp=1)):
            runtime.set_model_parallel(**layout)
        counts.append(live())
    # cpu_group on a group that claims NCCL: a gloo group over the same ranks, made once
    runtime.set_model_parallel(tp=2)
    tp_group = ps.get_tensor_model_parallel_group()
    real_backend = dist.get_backend
    with mock.patch.object(dist, "get_backend", lambda g=None: "nccl" if g is tp_group else real_backend(g)):
        made = runtime.cpu_group(tp_group)
        again = runtime.cpu_group(tp_group)
    out = [None] * dist.get_world_size(made)
    dist.all_gather_object(out, {"rank": dist.get_rank()}, group=made)
    gloo = dict(new=made is not tp_group, cached=made is again, backend=real_backend(made),
                ranks=dist.get_process_group_ranks(made), gathered=out, same_for_gloo=runtime.cpu_group(tp_group) is tp_group)
    before = live()
    runtime.set_model_parallel(tp=1)
    gloo["dropped_on_switch"] = made not in dist.distributed_c10d._world.pg_map and live() == before - 1
    return counts, gloo


def test_layout_switches_do_not_leak_groups_and_cpu_group():
    results = run_distributed(_switch_layouts, 2)
    for counts, gloo in results:
        # Megatron 0.16.1's destroy_model_parallel alone: +N groups per switch
        assert len(set(counts)) == 1, counts
        assert gloo["new"] and gloo["cached"] and gloo["backend"] == "gloo" and gloo["same_for_gloo"]
        assert gloo["dropped_on_switch"]
    assert results[0][1]["ranks"] == results[1][1]["ranks"] == [0, 1]  # the TP group at tp=2
    assert results[0][1]["gathered"] == [{"rank": 0}, {"rank": 1}]
