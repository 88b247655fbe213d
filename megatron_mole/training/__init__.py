"""Fine-tuning on Megatron-core: ``megatron-mole train`` and ``megatron-mole quickstart``.

- ``train_config``: the YAML schema (dataclasses), command-line overrides;
- ``data``, ``sampler``: instruction JSONL -> tokenised rows, domain-mixing resumable sampler;
- ``preprocess``, ``indexed``: ``megatron-mole preprocess`` (JSONL / HF datasets -> a memory-mapped
  indexed dataset directory) and its reader for ``data.prefix``;
- ``tokenizer``, ``synthetic``: the quickstart's local BPE tokenizer and multi-domain dataset;
- ``loop``: the training loop (Megatron DDP, distributed optimizer, scheduler, schedules);
- ``logging``: progress, JSON lines, router stats (checkpoints: ``megatron_mole.checkpoint.ckpt_io``);
- ``cli``, ``quickstart``: the two subcommands; ``memory``: expected memory per GPU of a job.

Nothing is imported here: Megatron-core's import costs seconds.
"""
