"""Adapter wrappers around Megatron-core modules.

- ``linear.LoRALinear`` / ``linear.MoLELinear``: a plain LoRA or a MoLE
  mixture (``expert_scope="linear"``) around one Column/RowParallelLinear
  (or a plain ``nn.Linear``);
- ``mole_mlp.MoLEMLP``: the MLP-scope mixture (``expert_scope="mlp"``);
- ``parallel``: the TP/SP placement of adapters, derived from the base layer;
- ``expert_parallel``: expert sharding and the choice of dispatcher;
- ``mlp_core``: the fused SwiGLU mixture; ``bench``: ``megatron-mole bench layer``.

Wrappers only wire routing/, dispatch/ and experts/ together.
"""
