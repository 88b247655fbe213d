"""tools/gpu_check.py's plumbing on CPU: two real checks (Megatron smoke, MoLE bf16 vs fp32) pass,
one line each; a failing check makes the exit status 1; the SP check skips on one GPU."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_cpu(capsys, tmp_path):
    gpu_check = _gpu_check()
    assert gpu_check.main(["--device", "cpu", "--only", "smoke-tp1", "mole-bf16", "--work-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[1:3]] == ["PASS smoke-tp1", "PASS mole-bf16"], lines
    assert "router logits ['torch.float32']" in lines[2] and lines[-1] == "gpu_check: 0 failed"


def test_gpu_check_failure_sets_exit_status_and_sp_skips_on_one_gpu(capsys, monkeypatch, tmp_path):
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check, "check_smoke_tp1", lambda device, work, gpus: ("FAIL", "loss 4.1 -> 4.3"))
    assert gpu_check.main(["--device", "cpu", "--only", "smoke-tp1", "--work-dir", str(tmp_path)]) == 1
    assert "FAIL smoke-tp1: loss 4.1 -> 4.3" in capsys.readouterr().out
    status, detail = gpu_check.check_smoke_sp("cuda", tmp_path, 1)
    assert status == "SKIP" and "needs 2 GPUs; 1 visible" in detail
