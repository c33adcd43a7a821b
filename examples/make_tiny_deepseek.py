#!/usr/bin/env python3
"""Builds a tiny DeepSeek-V3 model with real (random) weights and a local tokenizer. No downloads.

The model has the MLA shapes of the real one (kv_lora_rank 512, RoPE dim 64: a 576-wide cache
row, 16 heads) but 2 layers of width 256 and a 1024-token vocabulary, plus one DeepSeek MTP
layer (``num_nextn_predict_layers: 1``) for speculative decoding. Weights are saved in bf16,
so every process and every tensor-parallel rank loads the same numbers, and outputs are
deterministic. Needs ``torch``, ``transformers`` (5.x), ``tokenizers`` and ``safetensors``.

    python examples/make_tiny_deepseek.py /tmp/tiny-deepseek
    vllm serve /tmp/tiny-deepseek --attention-backend CUSTOM

``integration_tests/conftest.py`` imports this file by path and calls :func:`make_tiny_deepseek`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch

#: The tiny DeepSeek-V3 configuration. MoE with 4 routed experts from layer 1 on; the router
#: is DeepSeek-V3's (sigmoid scores, "noaux_tc" with a score-correction bias).
TINY_DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "dtype": "bfloat16",
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "kv_lora_rank": 512,
    "q_lora_rank": 64,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "qk_head_dim": 192,
    "v_head_dim": 128,
    "head_dim": 64,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "vocab_size": 1024,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_interleave": True,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "initializer_range": 0.02,
    "num_nextn_predict_layers": 1,
}

#: Special tokens in id order: bos = 0 and eos = 1 as in the model config.
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]

#: Chat format: ``<|bos|><|user|>hi<|eos|><|assistant|>``; generation stops at ``<|eos|>``.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def synthetic_corpus(num_sentences: int = 20000, seed: int = 0) -> list[str]:
    """Sentences of made-up words (deterministic), varied enough to train ~750 BPE merges."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words = sorted({"".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
                    for _ in range(3000)})
    punctuation = [".", "!", "?", ",", ";"]
    sentences = []
    for _ in range(num_sentences):
        chosen = [rng.choice(words) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            chosen.append(str(rng.randint(0, 9999)))
        sentences.append(" ".join(chosen).capitalize() + rng.choice(punctuation))
    return sentences


def build_tokenizer(out_dir: Path, vocab_size: int = 1024, seed: int = 0) -> None:
    """Trains a byte-level BPE tokenizer of at most ``vocab_size`` tokens and saves it in
    ``out_dir`` as a Hugging Face fast tokenizer with :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    if tokenizer.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than {vocab_size}")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {expected_id}")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_DEEPSEEK_V3_CONFIG["max_position_embeddings"],
    )
    fast.save_pretrained(str(out_dir))


def _mtp_tensors(config: dict[str, Any], lm_head: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The MTP-only weights of layer ``num_hidden_layers`` (its decoder block is saved by
    :func:`build_model`): input norms, the concat projection and the shared head."""
    hidden = config["hidden_size"]
    prefix = f"model.layers.{config['num_hidden_layers']}"
    generator = torch.Generator().manual_seed(seed + 1)
    eh_proj = torch.randn(hidden, 2 * hidden, generator=generator) * config["initializer_range"]
    return {
        f"{prefix}.enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{prefix}.hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{prefix}.eh_proj.weight": eh_proj.to(torch.bfloat16),
        f"{prefix}.shared_head.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{prefix}.shared_head.head.weight": lm_head.to(torch.bfloat16).clone(),
    }


def _add_tensors(out_dir: Path, extra: dict[str, torch.Tensor]) -> None:
    """Adds ``extra`` to the saved checkpoint: into the single ``model.safetensors``, or as a new
    shard listed in the index of a sharded one."""
    from safetensors.torch import load_file, save_file

    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        shard = "model-mtp.safetensors"
        save_file(extra, str(out_dir / shard), metadata={"format": "pt"})
        index = json.loads(index_path.read_text())
        index["weight_map"].update({name: shard for name in extra})
        index_path.write_text(json.dumps(index, indent=2))
        return
    path = out_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors.update(extra)
    save_file(tensors, str(path), metadata={"format": "pt"})


def build_model(out_dir: Path, config: dict[str, Any] | None = None, seed: int = 0) -> None:
    """Saves a randomly initialised bf16 DeepSeek-V3 (``config``, default
    :data:`TINY_DEEPSEEK_V3_CONFIG`) in ``out_dir`` (``config.json`` + safetensors).

    With ``num_nextn_predict_layers: 1`` the checkpoint also holds a DeepSeek MTP layer as layer
    ``num_hidden_layers``: a model with one more layer is initialised and saved, and the config
    then says ``num_hidden_layers`` again, so the last block is what vLLM loads as the MTP
    block; the MTP-only tensors are added beside it.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = dict(TINY_DEEPSEEK_V3_CONFIG if config is None else config)
    num_mtp = int(config.get("num_nextn_predict_layers", 0))
    if num_mtp not in (0, 1):
        raise ValueError(f"num_nextn_predict_layers: 0 or 1 supported, got {num_mtp}")
    hf_kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "dtype")}
    hf_kwargs["num_hidden_layers"] = config["num_hidden_layers"] + num_mtp

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_kwargs)).to(torch.bfloat16).eval()
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out_dir))

    saved = json.loads((out_dir / "config.json").read_text())
    saved.update({"architectures": config["architectures"], "num_hidden_layers": config["num_hidden_layers"],
                  "num_nextn_predict_layers": num_mtp, "dtype": "bfloat16"})
    (out_dir / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    if num_mtp:
        _add_tensors(out_dir, _mtp_tensors(config, model.lm_head.weight.detach(), seed))
    _check_checkpoint(out_dir, config)


def _check_checkpoint(out_dir: Path, config: dict[str, Any]) -> None:
    """Fails early, with the reason, if the checkpoint is not in the per-expert DeepSeek layout
    vLLM's loader reads (transformers 5 fuses experts in memory and unfuses them on save)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in out_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names.update(f.keys())
    moe_layer = config["first_k_dense_replace"]
    required = [f"model.layers.{moe_layer}.mlp.experts.0.gate_proj.weight",
                f"model.layers.{moe_layer}.self_attn.kv_a_proj_with_mqa.weight", "lm_head.weight"]
    if config.get("num_nextn_predict_layers", 0):
        mtp = config["num_hidden_layers"]
        required += [f"model.layers.{mtp}.eh_proj.weight", f"model.layers.{mtp}.self_attn.kv_b_proj.weight"]
    missing = [name for name in required if name not in names]
    if missing:
        raise RuntimeError(f"checkpoint in {out_dir} lacks {missing}; found e.g. {sorted(names)[:8]}")


def make_tiny_deepseek(out_dir: str | Path, seed: int = 0, config: dict[str, Any] | None = None) -> Path:
    """Builds model and tokenizer in ``out_dir`` (created if missing) and returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_DEEPSEEK_V3_CONFIG if config is None else config)
    build_model(out, config, seed=seed)
    build_tokenizer(out, vocab_size=config["vocab_size"], seed=seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the model and tokenizer to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")
    args = parser.parse_args()
    config = dict(TINY_DEEPSEEK_V3_CONFIG)
    if args.no_mtp:
        config["num_nextn_predict_layers"] = 0
    path = make_tiny_deepseek(args.out_dir, seed=args.seed, config=config)
    print(f"tiny DeepSeek-V3 written to {path}")


if __name__ == "__main__":
    main()
