"""Resume exactness of the checkpoint payload on a plain PyTorch model: the data loader
position, optimizer, scheduler and RNG states (dropout) restored from a checkpoint give
the uninterrupted run's losses bit for bit (fp32, CPU)."""
import random

import numpy as np
import pytest
import torch

from megatron_mole.checkpoint import ckpt_io as C
from megatron_mole.training.data import InstructionDataset, read_jsonl
from megatron_mole.training.sampler import GlobalBatchLoader
from megatron_mole.training.synthetic import generate_records, record_texts, write_instruction_dataset
from megatron_mole.training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    tokenizer = train_tokenizer(record_texts(generate_records(16)), work / "tok", vocab_size=320)
    examples, report = read_jsonl(write_instruction_dataset(work, examples_per_domain=16))
    return InstructionDataset(examples, tokenizer, seq_length=32, report=report), len(tokenizer)


def _job(dataset, vocab, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    loader = GlobalBatchLoader(dataset, 4, seed=3, packing=True,
                               weights={"arithmetic": 2, "capitalize": 1, "reverse": 1, "translate": 1})
    return model, optimizer, scheduler, loader


def _step(model, optimizer, scheduler, loader):
    batch = next(loader)
    logits_BSV = model(batch["tokens"])
    losses_BS = torch.nn.functional.cross_entropy(logits_BSV.transpose(1, 2), batch["labels"], reduction="none")
    loss = (losses_BS * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def test_resume_reproduces_uninterrupted_losses(dataset, tmp_path):
    data, vocab = dataset
    job = _job(data, vocab, seed=0)
    expected = [_step(*job) for _ in range(6)]

    job = _job(data, vocab, seed=0)
    losses = [_step(*job) for _ in range(3)]
    model, optimizer, scheduler, loader = job
    shared, rank_payload = C.training_payloads(
        step=3, adapters=model.state_dict(), optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(), sampler_state=loader.state_dict(),
        base={"checkpoint": "/base"}, layout={"tp": 1, "pp": 1, "ep": 1, "dp": 1})
    C.save_checkpoint(tmp_path, 3, rank_payload, shared_payload=shared)

    # A new process would start from other states: scramble them all, then restore.
    random.seed(5), np.random.seed(5)
    model, optimizer, scheduler, loader = _job(data, vocab, seed=123)
    checkpoint = C.load_checkpoint(tmp_path, rank=0)
    assert checkpoint.shared["base"] == {"checkpoint": "/base"} and checkpoint.shared["step"] == 3
    assert checkpoint.rank_state["layout"] == checkpoint.shared["layout"]
    model.load_state_dict(checkpoint.shared["adapters"])
    optimizer.load_state_dict(checkpoint.rank_state["optimizer"])
    scheduler.load_state_dict(checkpoint.shared["scheduler"])
    loader.load_state_dict(checkpoint.shared["data"])
    C.restore_rng_state(checkpoint.rank_state["rng"])
    losses += [_step(model, optimizer, scheduler, loader) for _ in range(3)]
    assert losses == expected
