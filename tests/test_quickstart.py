"""`megatron-mole quickstart` end to end, as the README runs it (a subprocess; it launches its own 2 ranks),
shortened to 2 training steps."""
import json
import re
import subprocess
import sys

from megatron_mole.checkpoint import ckpt_io
from megatron_mole.training.train_config import load_train_config


def test_quickstart_runs_end_to_end(tmp_path):
    work = tmp_path / "qs"
    completed = subprocess.run(
        [sys.executable, "-m", "megatron_mole", "quickstart", "--work-dir", str(work), "--max-steps", "2",
         "--save-interval", "1", "--heldout", "2", "--pretrain-steps", "5"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    cfg = load_train_config(work / "config.yaml")
    assert cfg.mole["top_k"] == 1 and cfg.mole["expert_scope"] == "mlp"
    records = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 and r["expert_load"] for r in records)
    assert ckpt_io.latest_step(work / "checkpoints") == 2
    assert ckpt_io.list_steps(work / "checkpoints") == [1, 2]  # keep_last 2
    lines = (work / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 256 and {json.loads(line)["domain"] for line in lines} == {
        "arithmetic", "reverse", "translate", "capitalize"}
    assert "quickstart: done" in completed.stdout
    assert "training ranks run on" in completed.stdout
    assert ("skipping export" in completed.stdout) or (work / "hf_adapter").is_dir()
    # the accuracy table: every domain, before (base) and after (+adapter) training
    table = completed.stdout.split("exact-match accuracy on 2 held-out prompts per domain", 1)[1]
    for domain in ("arithmetic", "reverse", "translate", "capitalize"):
        assert re.search(rf"{domain}\s+\d+%\s+\d+%", table), table


def test_quickstart_ranks_fit_the_visible_gpus(monkeypatch):
    """Mocked device counts: 2 GPUs -> GPU ranks; 1 GPU -> CPU ranks (GPUs hidden), said so; none -> CPU."""
    import torch

    from megatron_mole.training.quickstart import rank_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env, message = rank_devices(2)
    assert env == {} and "run on GPUs" in message
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    env, message = rank_devices(2)
    assert env == {"CUDA_VISIBLE_DEVICES": ""}
    assert "1 GPU(s) visible, fewer than the 2 training ranks" in message and "run on CPU" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    env, message = rank_devices(2)
    assert env == {} and "no GPU" in message and "run on CPU" in message


def test_heldout_prompts_are_new_and_follow_the_rules():
    from megatron_mole.training.synthetic import DOMAINS, generate_records, heldout_prompts, make_example

    train = generate_records(64, seed=0)
    seen = {r.get("prompt") or r["messages"][0]["content"] for r in train}
    prompts = heldout_prompts(5, train)
    assert [d for d, _, _ in prompts] == [d for d in DOMAINS for _ in range(5)]
    assert not seen & {p for _, p, _ in prompts} and len({p for _, p, _ in prompts}) == 20
    assert prompts == heldout_prompts(5, train)  # seeded
