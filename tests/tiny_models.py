"""Tiny models built locally from a config (random weights, seeded): no hub.

Every architecture gets two or three decoder layers of width 64 with SmolLM2's
vocabulary, and the embedded model's tokenizer is copied beside it, so text
prompts and chat work. vLLM's CPU attention needs a head size of 32, 64, 80,
...; an initializer range of ~0.1 and an untied lm_head keep greedy outputs
varied.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from workbench.embedded import ensure_embedded_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

HIDDEN = 64
LAYERS = 3
VOCAB = 49152
"""SmolLM2's vocabulary, so its tokenizer fits every model."""

_DECODER = {
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MOE = {"num_experts_per_tok": 2}
_GEMMA = {"head_dim": 32, "query_pre_attn_scalar": 32, "tie_word_embeddings": True}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "mistral": {"sliding_window": None},
    # vLLM's Gemma, Gemma2, Gemma3, Cohere and Bloom always tie the lm_head to the embeddings.
    "gemma": {"head_dim": 32, "tie_word_embeddings": True},
    # Logit soft-capping is off: vLLM's CPU attention implements it with a
    # different rounding (2.8e-3 relative to HF in plain vLLM too).
    "gemma2": {**_GEMMA, "attn_logit_softcapping": None},
    "gemma3_text": {**_GEMMA, "sliding_window": 512},
    "phi3": {"pad_token_id": 0},
    "qwen3_moe": {**_MOE, "head_dim": 32, "num_experts": 4, "moe_intermediate_size": HIDDEN},
    "mixtral": {**_MOE, "num_local_experts": 4},
    "olmoe": {**_MOE, "num_experts": 4},
    "cohere": {"logit_scale": 0.5, "tie_word_embeddings": True},
    "stablelm": {"partial_rotary_factor": 0.5},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2},
    "olmo2": {},
    "gpt_neox": {"rotary_pct": 0.5, "use_parallel_residual": True},
    "gpt2": {"n_embd": HIDDEN, "n_head": 2, "n_layer": LAYERS, "n_positions": 1024},
    "gptj": {"n_embd": HIDDEN, "n_head": 2, "n_layer": LAYERS, "n_positions": 1024, "rotary_dim": 16},
    "falcon": {"num_kv_heads": 2, "new_decoder_architecture": True, "parallel_attn": True},
    "qwen2_moe": {**_MOE, "num_experts": 4, "moe_intermediate_size": HIDDEN, "shared_expert_intermediate_size": HIDDEN},
    "granitemoe": {**_MOE, "num_local_experts": 4, "embedding_multiplier": 2.0, "residual_multiplier": 0.5},
    "bloom": {"n_head": 2, "n_layer": LAYERS, "tie_word_embeddings": True},
    "opt": {"ffn_dim": 2 * HIDDEN, "word_embed_proj_dim": HIDDEN, "do_layer_norm_before": True},
    "gpt_oss": {**_MOE, "num_local_experts": 4, "head_dim": 32, "sliding_window": 128},
    "llama4_text": {"num_experts_per_tok": 1, "num_local_experts": 4, "head_dim": 32},  # routes to one expert
    "glm4": {"pad_token_id": 0},
    "exaone4": {},
    # Gemma 4: a small per-layer input table (262144 x 256 per layer by default); the last
    # layer reads the KV cache of the one before (a layer of its own type).
    "gemma4_text": {
        "head_dim": 32,
        "hidden_size_per_layer_input": 16,
        "vocab_size_per_layer_input": VOCAB,
        "layer_types": ["sliding_attention", "full_attention", "full_attention"],
        "num_kv_shared_layers": 1,
    },
    "phi": {},
    "olmo3": {},
    "nemotron": {"head_dim": 32},
}
"""model_type -> what its tiny config sets beyond the shared decoder settings."""

_GPT = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
_NOT_FOR = {"gpt2": _GPT, "gptj": _GPT, "bloom": _GPT[1:]}
"""Shared settings a config spells differently (GPT-2 and GPT-J use n_embd, n_head, n_layer)."""


def tiny_model(model_type: str, folder: Path, dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Path:
    """A seeded tiny ``model_type`` model, with SmolLM2's tokenizer unless ``tokenizer`` is
    False (token-id prompts), saved in ``folder`` (reused if there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").exists():
        return folder
    settings = {key: value for key, value in _DECODER.items() if key not in _NOT_FOR.get(model_type, ())}
    config = AutoConfig.for_model(model_type, **{**settings, **ARCHITECTURES[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # some models initialise norms to zero, which hides everything after them
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in name:
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    if not tokenizer:
        return folder
    source = ensure_embedded_checkpoint()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def tiny_llama(folder: Path) -> Path:
    return tiny_model("llama", folder)
