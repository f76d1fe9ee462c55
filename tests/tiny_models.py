"""Tiny models built locally from a config (random weights, seeded): no hub.

The embedded model's tokenizer is copied beside each, so text prompts work.
vLLM's CPU attention needs a head size of 32, 64, 80, ...; an initializer
range of ~0.1 and an untied lm_head keep greedy outputs varied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from workbench.embedded import ensure_embedded_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tiny_llama(folder: Path, layers: int = 2, hidden: int = 64) -> Path:
    """A ``layers``-layer Llama with SmolLM2's vocabulary and tokenizer, float32, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    source = ensure_embedded_checkpoint()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder
