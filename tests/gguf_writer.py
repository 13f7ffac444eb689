"""Write a (float) GGUF the way llama.cpp's converter does, from an mlx-lm model folder.

Tests use it to check that importing undoes every conversion step: tensor names,
the llama q/k row permutation, and the tokenizer stored as metadata lists.
"""

import json
from pathlib import Path

import mlx.core as mx

_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(w: mx.array, n_head: int) -> mx.array:
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder: Path, out: Path, pre: str) -> Path:
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg["model_type"]
    weights = mx.load(str(folder / "model.safetensors"))
    tensors = {}
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        elif name == "lm_head.weight":
            key = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            base, suffix = rest.rsplit(".", 1)
            key = f"blk.{layer}.{_NAMES[base]}.{suffix}"
            if arch == "llama" and base in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg["num_attention_heads"] if "q_proj" in base else cfg["num_key_value_heads"]
                w = _permute(w, heads)
        tensors[key] = w
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    specials = {a["content"]: a["id"] for a in tok["added_tokens"]}
    vocab.update(specials)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg["vocab_size"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": arch,
        "general.name": folder.name,
        f"{arch}.block_count": u32(cfg["num_hidden_layers"]),
        f"{arch}.embedding_length": u32(cfg["hidden_size"]),
        f"{arch}.feed_forward_length": u32(cfg["intermediate_size"]),
        f"{arch}.attention.head_count": u32(cfg["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": u32(cfg["num_key_value_heads"]),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(cfg["rms_norm_eps"], dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(cfg.get("rope_theta", 10000.0), dtype=mx.float32),
        f"{arch}.context_length": u32(cfg.get("max_position_embeddings", 2048)),
        f"{arch}.vocab_size": u32(len(tokens)),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if t in specials else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": u32(vocab[tcfg["eos_token"]]),
        "tokenizer.ggml.padding_token_id": u32(vocab[tcfg.get("pad_token") or tcfg["eos_token"]]),
        "tokenizer.chat_template": tcfg["chat_template"],
    }
    mx.save_gguf(str(out), tensors, meta)
    return Path(out)
