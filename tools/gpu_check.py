"""One command that checks what the CPU test suite cannot: the GPU (CUDA + NCCL, bf16) paths.

    python tools/gpu_check.py [--device auto|cuda|cpu] [--only CHECK ...] [--work-dir DIR]

Run it from a checkout on a machine with a GPU (under 10 minutes on one GPU); CI has none.
Each check runs in its own subprocess (its own process group and runtime) against the
checkout this file lives in, and prints one line: ``PASS|FAIL|SKIP name: numbers (seconds)``.
The exit status is 1 when any check failed (a SKIP is not a failure). ``--device cpu`` runs
the same plumbing on a CPU (gloo) cheaply; the test suite runs a subset that way.

Checks:

- ``smoke-tp1``: ``megatron-mole smoke`` (Megatron's GPTModel, DDP, the pipeline schedule),
  one process; the loss must fall.
- ``smoke-moe``: the same with Megatron MoE layers (4 experts, top-2).
- ``smoke-sp``: TP2 with sequence parallelism on 2 processes (2 GPUs; SKIP with fewer).
- ``mole-bf16``: a MoLE GPT (top-2, LoRA experts on every linear) run in bf16 against the
  same model in fp32: logits, loss and adapter gradients within bf16 tolerances, the
  routers' logits fp32.
- ``quickstart``: ``megatron-mole quickstart`` shortened (its ranks use GPUs when the
  machine has 2, else CPU, which it says).
- ``bench-layer``: ``megatron-mole bench layer`` (MoLE MLP cost relative to one LoRA).
- ``verify``: a tiny random Llama converted by ``megatron-mole convert`` and compared with
  transformers by ``megatron-mole verify`` (max |logits difference| <= 1e-4).

Legend: B batch, S sequence, V vocabulary.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ["smoke-tp1", "smoke-moe", "smoke-sp", "mole-bf16", "quickstart", "bench-layer", "verify"]


def _env(device: str) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # even on a GPU machine: the CPU plumbing only
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(command: list, device: str, timeout: float) -> tuple:
    """(return code, stdout+stderr) of ``command``; return code None on timeout."""
    try:
        done = subprocess.run(command, env=_env(device), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return None, f"timed out after {timeout:.0f}s " + str(exc.output or "")[-2000:]
    return done.returncode, done.stdout + done.stderr


def _mm(*args) -> list:
    return [sys.executable, "-m", "megatron_mole", *args]


def _torchrun(nproc: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_mole", *args]


def _tail(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-400:]


def _smoke(device, extra, nproc=1):
    command = (_mm if nproc == 1 else lambda *a: _torchrun(nproc, *a))("smoke", "--device", device, "--steps", "4",
                                                                       *extra)
    code, out = _run(command, device, 300)
    match = re.search(r"losses=\[([^\]]*)\]", out)
    if code != 0 or not match:
        return "FAIL", f"exit {code}: {_tail(out)}"
    losses = [float(x) for x in match.group(1).split(",")]
    return "PASS", f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def check_smoke_tp1(device, work, gpus):
    return _smoke(device, [])


def check_smoke_moe(device, work, gpus):
    return _smoke(device, ["--moe"])


def check_smoke_sp(device, work, gpus):
    if device == "cuda" and gpus < 2:
        return "SKIP", f"TP2 with sequence parallelism needs 2 GPUs; {gpus} visible"
    return _smoke(device, ["--tp", "2", "--sequence-parallel", "--global-batch", "4"], nproc=2)


def check_mole_bf16(device, work, gpus):
    code, out = _run([sys.executable, str(Path(__file__).resolve()), "--inner-mole-bf16", "--device", device],
                     device, 300)
    match = re.search(r"^mole-bf16 (PASS|FAIL): (.*)$", out, re.M)
    if code is None or not match:
        return "FAIL", f"exit {code}: {_tail(out)}"
    return match.group(1), match.group(2)


def check_quickstart(device, work, gpus):
    code, out = _run(_mm("quickstart", "--work-dir", str(work / "quickstart"), "--max-steps", "10",
                         "--save-interval", "0"), device, 420)
    where = re.search(r"quickstart: (.*training ranks run on[^\n]*)", out)
    seconds = re.search(r"quickstart: done in ([\d.]+)s", out)
    if code != 0 or not seconds:
        return "FAIL", f"exit {code}: {_tail(out)}"
    return "PASS", f"{where.group(1) if where else '?'}; done in {seconds.group(1)}s"


def check_bench_layer(device, work, gpus):
    sizes = (["--hidden", "1024", "--ffn", "2816", "--tokens", "4096", "--rounds", "5"] if device == "cuda" else
             ["--hidden", "64", "--ffn", "128", "--tokens", "128", "--rounds", "1"])
    code, out = _run(_mm("bench", "layer", "--device", device, "--experts", "8", "--ranks", "16",
                         "--variants", "base", "lora", "mole-top1", "mole-top2", *sizes), device, 300)
    ratios = dict(re.findall(r"^\s+(mole-top\d)\s+[\d.]+ ms\s+([\d.]+)x", out, re.M))
    if code != 0 or len(ratios) != 2:
        return "FAIL", f"exit {code}: {_tail(out)}"
    return "PASS", "wall vs one LoRA: " + ", ".join(f"{k} {v}x" for k, v in sorted(ratios.items()))


def _tiny_llama(directory: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per check
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)


def check_verify(device, work, gpus):
    hf, mcore = work / "tiny_llama", work / "tiny_llama_mcore"
    _tiny_llama(hf)
    code, out = _run(_mm("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mcore), "--overwrite"), device, 300)
    if code != 0:
        return "FAIL", f"convert exit {code}: {_tail(out)}"
    code, out = _run(_mm("verify", "--hf", str(hf), "--mcore", str(mcore), "--device", device, "--seq", "16"),
                     device, 300)
    match = re.search(r"= ([\d.e+-]+) at tp=", out)
    if code != 0 or not match:
        return "FAIL", f"exit {code}: {_tail(out)}"
    return "PASS", f"max |logits megatron - transformers| = {float(match.group(1)):.2e} (tolerance 1e-4)"


# ---------------------------------------------------------------- the bf16 check (in its own process)
def mole_bf16(device: str) -> int:
    """A MoLE GPT in bf16 against the same weights in fp32; prints one 'mole-bf16 PASS|FAIL: ...' line."""
    import torch

    import megatron_mole as mm
    from megatron_mole.routing import Router
    from tools.smoke import build_gpt, make_batches

    info = mm.init_distributed(device=device, seed=1234)
    cfg = mm.MoLEConfig(num_experts=4, rank=8, alpha=16, top_k=2, lora_b_init="random", seed=5,
                        targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    fp32, bf16 = (mm.apply_mole(build_gpt()[0], cfg).to(info.device) for _ in range(2))
    bf16.load_state_dict(fp32.state_dict())  # the same weights (deepcopy cannot copy process groups)
    bf16.to(torch.bfloat16)  # cast after apply_mole, as Megatron's Float16Module does
    logit_dtypes = set()
    for module in bf16.modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda mod, args, out: logit_dtypes.add(str(out.logits_TE.dtype)))
    tokens_BS1 = make_batches(1, 4)[0].to(info.device)
    inputs_BS, labels_BS = tokens_BS1[:, :-1], tokens_BS1[:, 1:]
    position_ids_BS = torch.arange(inputs_BS.shape[1], device=info.device).unsqueeze(0).expand_as(inputs_BS)
    results = {}
    for name, net in (("fp32", fp32), ("bf16", bf16)):
        logits_BSV = net(inputs_BS, position_ids_BS, None).float()
        loss = net(inputs_BS, position_ids_BS, None, labels=labels_BS).float().mean()
        loss.backward()
        grads = {n: p.grad.float() for n, p in net.named_parameters() if p.requires_grad}
        results[name] = (logits_BSV.detach(), float(loss), grads)
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results["fp32"], results["bf16"]
    logits_err = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
    grad_err = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in ref_grads.items())
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    ok = (logits_err < 5e-2 and grad_err < 1e-1 and loss_err < 1e-2 and logit_dtypes == {"torch.float32"}
          and all(torch.isfinite(g).all() for g in grads.values()))
    print(f"mole-bf16 {'PASS' if ok else 'FAIL'}: {len(ref_grads)} adapter tensors; bf16 vs fp32 max rel logits "
          f"{logits_err:.1e} (< 5e-2), loss {loss_err:.1e} (< 1e-2), worst grad rel-norm {grad_err:.1e} (< 1e-1); "
          f"router logits {sorted(logit_dtypes)} on {info.device}", flush=True)
    mm.runtime.shutdown()
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=None, help="run these checks only")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--inner-mole-bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = args.device if args.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        parser.error("--device cuda: no CUDA device is visible")
    if args.inner_mole_bf16:
        return mole_bf16(device)
    print(f"gpu_check: device={device} ({gpus} GPU(s) visible"
          f"{', ' + torch.cuda.get_device_name(0) if gpus else ''}), torch {torch.__version__}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.only or CHECKS:
            start = time.perf_counter()
            try:
                status, detail = globals()["check_" + name.replace("-", "_")](device, work, gpus)
            except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
            failed += status == "FAIL"
            print(f"{status} {name}: {detail} ({time.perf_counter() - start:.1f}s)", flush=True)
    print(f"gpu_check: {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
