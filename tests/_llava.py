"""Tiny transformers LLaVA bases (CLIP tower + Llama or Qwen2 LM) built from configs, no hub."""
from __future__ import annotations

IMAGE_TOKEN = 99


def tiny_llava_config(lm: str = "llama", vision_layers: int = 3, feature_layer: int = -2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=16, patch_size=4, projection_dim=32)
    text_kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, max_position_embeddings=40)
    text = LlamaConfig(**text_kwargs) if lm == "llama" else Qwen2Config(**text_kwargs)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                       vision_feature_layer=feature_layer, image_seq_length=16)


def save_tiny_llava(path: str, lm: str = "llama", seed: int = 0, std: float = 0.1) -> str:
    """A random tiny LlavaForConditionalGeneration saved at ``path`` (weights drawn with ``std``
    so that every part, the vision tower's included, moves the logits)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(lm))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 or "embedding" in name:
                param.normal_(0.0, std)
            elif "bias" in name:
                param.normal_(0.0, 0.02)
            else:
                param.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return path


def llava_batches(spec, steps: int, global_batch: int, text_len: int = 8, seed: int = 5):
    """``steps`` global batches of micro-batch dicts (one sample each): an image, its one image
    token at position 2, next-token labels, loss on the text after the image."""
    import torch

    from megatron_mole.checkpoint.llava_run import random_llava_inputs

    out = []
    for step in range(steps):
        images, ids = random_llava_inputs(spec, global_batch, text_len + 1, seed=seed + step)
        inputs, labels = ids[:, :-1], ids[:, 1:]
        loss_mask = (torch.arange(text_len) > 2).float().expand(global_batch, -1)
        out.append([{"images": images[i:i + 1], "input_ids": inputs[i:i + 1], "labels": labels[i:i + 1],
                     "loss_mask": loss_mask[i:i + 1]} for i in range(global_batch)])
    return out


def train_llava(model, batches, lr: float = 0.1, after_step=None):
    """SGD on ``batches`` through Megatron's schedule with its DDP; returns the per-step mean losses."""
    from megatron.core import parallel_state as ps

    from megatron_mole.checkpoint.llava_run import combined_length, llava_forward_step, schedule_seq_length
    from megatron_mole.routing import set_aux_loss_scale
    from tools.smoke import sgd_train

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def prepare(global_batch):
        share = len(global_batch) // dp
        micro = global_batch[dp_rank * share:(dp_rank + 1) * share]
        combined = combined_length(micro[0]["input_ids"], model.image_token_index, model.img_seq_len)
        set_aux_loss_scale(1.0 / len(micro))  # as Megatron's schedules scale the main loss
        return micro, schedule_seq_length(model, combined), 1

    return sgd_train(model, model.language_model.config, batches, prepare, llava_forward_step, lr, after_step)
