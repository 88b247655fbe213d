"""Benchmarks and the smoke run of megatron_mole: source-checkout tools, not library code.

``megatron-mole bench layer|dispatch`` and ``megatron-mole smoke`` are thin entry
points into these modules (megatron_mole/cli.py puts the checkout's root on
``sys.path`` and imports ``tools.<name>``). They may import anything from
megatron_mole; megatron_mole never imports them. A wheel install does not
ship this folder, and those subcommands then say so.

- ``smoke``: a tiny Megatron GPT trained a few steps at any layout (the tests'
  model builder and training loop, tests/_models.py, come from here too);
- ``bench``: the ``bench`` dispatcher over ``bench_layer`` (adapted-MLP cost) and
  ``bench_dispatch`` (all-to-all vs replicated experts);
- ``gpu_check``: the GPU (CUDA, NCCL, bf16) checks the CPU test suite cannot run
  (``python tools/gpu_check.py``);
- scripts run by path: ``bench_convert`` (conversion time and memory), ``data_scale``
  (data loading at scale).
"""
