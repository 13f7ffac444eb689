"""Import a GGUF file into an mlx-lm model folder.

llama.cpp's converter renames tensors, permutes the q/k rows of llama models
for its rotary layout, and stores the tokenizer as flat lists in the metadata.
We undo all three so the folder is a plain Hugging Face / mlx-lm checkpoint:
`mlx_lm.load(folder)` and `python -m mlx_lm generate --model folder` work.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from tokenizers import Tokenizer

from mondrian.core.atomic import atomic_folder

# mx.load maps GGUF Q4_0/Q4_1/Q8_0 blocks onto MLX affine quantization, 32 values a group.
_GROUP_SIZE = 32

# Architectures whose q/k rows llama.cpp permuted at conversion time.
_PERMUTED_ARCHS = {"llama"}
_SUPPORTED_ARCHS = {"llama", "qwen2"}

_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Pre-tokenizer regexes llama.cpp names in `tokenizer.ggml.pre`.
_GPT2_SPLIT = None  # ByteLevel's built-in GPT-2 regex
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": ("bytelevel", False),
    "gpt2": ("bytelevel", False),
    "smollm": ("bytelevel", True),  # digits one by one, then GPT-2 byte-level
    "llama-bpe": ("split", _LLAMA3_SPLIT),
    "llama3": ("split", _LLAMA3_SPLIT),
    "qwen2": ("split", _QWEN2_SPLIT),
}


class GGUFError(ValueError):
    """The GGUF file cannot be imported; the message names the file and the cause."""


@dataclass
class ImportOptions:
    dtype: str = "float32"  # dtype of dequantized weights
    keep_quant: bool = False  # keep Q4_0/Q4_1/Q8_0 as MLX quantized weights


def _meta_value(value):
    if isinstance(value, mx.array):
        return value.item() if value.size == 1 else value.tolist()
    return value


# GGUF tensor types MLX can load: type id -> (name, bytes per block, values per block).
_TENSOR_TYPES = {0: ("F32", 4, 1), 1: ("F16", 2, 1), 2: ("Q4_0", 18, 32), 3: ("Q4_1", 20, 32),
                 8: ("Q8_0", 34, 32), 30: ("BF16", 2, 1)}
# Metadata value types: id -> struct format of a scalar (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Header:
    """Bounds-checked reads from a GGUF header: every overrun is a GGUFError, never a crash."""

    def __init__(self, path: Path, buf: mmap.mmap, size: int):
        self.path, self.buf, self.size = path, buf, size
        self.pos = 4  # after the magic

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise GGUFError(f"{self.path}: header ends early at byte {self.pos}: "
                            "truncated or corrupt file")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.take("Q")
        if n > self.size - self.pos:
            raise GGUFError(f"{self.path}: {what} length {n} runs past the end of the file")
        try:
            value = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: {what} is not UTF-8 at byte {self.pos}") from exc
        self.pos += n
        return value

    def value(self, vtype: int, key: str, depth: int = 0):
        """A metadata value; arrays are skipped (None): only scalars matter here."""
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string(f"metadata '{key}'")
        if vtype == 9 and depth == 0:
            itype, count = self.take("I"), self.take("Q")
            if itype in _SCALARS:  # skip fixed-size arrays without decoding them
                n = count * struct.calcsize(_SCALARS[itype])
                if n > self.size - self.pos:
                    raise GGUFError(f"{self.path}: metadata array '{key}' runs past the end of the file")
                self.pos += n
                return None
            if count > (self.size - self.pos) // 8:
                raise GGUFError(f"{self.path}: metadata array '{key}' count {count} is impossible")
            for _ in range(count):
                self.value(itype, key, depth + 1)
            return None
        raise GGUFError(f"{self.path}: metadata '{key}' has unknown value type {vtype}")

    def tensor_infos(self, n_tensors: int) -> list[tuple[str, int, int, int]]:
        """(name, value count, GGUF type, offset) of each tensor."""
        tensors = []
        for _ in range(n_tensors):
            name = self.string("tensor name")
            n_dims = self.take("I")
            if n_dims > 8:
                raise GGUFError(f"{self.path}: tensor '{name}' has {n_dims} dimensions: corrupt file")
            count = 1
            for _ in range(n_dims):
                count *= self.take("Q")
            ttype, offset = self.take("I"), self.take("Q")
            tensors.append((name, count, ttype, offset))
        return tensors


def _check_tensor_ranges(path: Path, tensors: list[tuple[str, int, int, int]], data_start: int,
                         size: int) -> None:
    for name, count, ttype, offset in tensors:
        if ttype not in _TENSOR_TYPES:
            names = ", ".join(t[0] for t in _TENSOR_TYPES.values())
            raise GGUFError(f"{path}: tensor '{name}' has GGUF type {ttype}, which MLX cannot "
                            f"load (supported: {names})")
        _, block_bytes, block_values = _TENSOR_TYPES[ttype]
        end = data_start + offset + count // block_values * block_bytes
        if count % block_values or end > size:
            raise GGUFError(f"{path}: tensor '{name}' extends past the end of the file "
                            f"({end} > {size} bytes): truncated or corrupt file")


def validate_gguf(path: Path) -> None:
    """Walk the whole GGUF header with bounds checks before handing the file to MLX.

    mx.load trusts the header: a garbled count or offset crashes the process
    (segfault) instead of raising. Checking every length, type and tensor range
    here turns any such file into a clear GGUFError.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 24 or f.read(4) != b"GGUF":
            f.seek(0)
            raise GGUFError(f"{path}: not a GGUF file (magic {f.read(4)!r}, expected b'GGUF')")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header = _Header(path, buf, size)
    try:
        version = header.take("I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = header.take("Q"), header.take("Q")
        if n_tensors > size // 24 or n_kv > size // 13:
            raise GGUFError(f"{path}: header counts ({n_tensors} tensors, {n_kv} keys) are impossible "
                            f"for a file of {size} bytes: truncated or corrupt file")
        alignment = 32
        for _ in range(n_kv):
            key = header.string("metadata key")
            v = header.value(header.take("I"), key)
            if key == "general.alignment" and isinstance(v, int) and v > 0:
                alignment = v
        tensors = header.tensor_infos(n_tensors)
        data_start = (header.pos + alignment - 1) // alignment * alignment
        _check_tensor_ranges(path, tensors, data_start, size)
    finally:
        buf.close()


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """Read tensors and metadata, turning any parse failure into a GGUFError."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    validate_gguf(path)
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError/ValueError on truncated data
        raise GGUFError(f"{path}: corrupt or truncated GGUF ({exc})") from exc
    return weights, {k: _meta_value(v) for k, v in metadata.items()}


def _require(meta: dict, key: str, path: Path):
    if key not in meta:
        raise GGUFError(f"{path}: metadata key '{key}' is missing")
    return meta[key]


def model_config(meta: dict, path: Path, has_output: bool) -> dict:
    arch = _require(meta, "general.architecture", path)
    if arch not in _SUPPORTED_ARCHS:
        raise GGUFError(
            f"{path}: architecture '{arch}' is not supported (supported: {sorted(_SUPPORTED_ARCHS)})"
        )
    hidden = int(_require(meta, f"{arch}.embedding_length", path))
    heads = int(_require(meta, f"{arch}.attention.head_count", path))
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, f"{arch}.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "vocab_size": int(meta.get(f"{arch}.vocab_size", len(tokens))),
        "head_dim": hidden // heads,
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2",
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    if config["vocab_size"] != len(tokens):
        raise GGUFError(
            f"{path}: vocab_size {config['vocab_size']} does not match {len(tokens)} tokenizer tokens"
        )
    return config


def _unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's rotary row permutation (works on packed quantized rows too)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(weights: dict[str, mx.array], config: dict, meta: dict, path: Path,
                    opts: ImportOptions) -> tuple[dict[str, mx.array], dict | None]:
    """GGUF tensor names/layout -> HF names; dequantize unless keep_quant."""
    dtype = getattr(mx, opts.dtype)
    permute = config["model_type"] in _PERMUTED_ARCHS
    out: dict[str, mx.array] = {}
    layer_bits: dict[str, int] = {}  # a GGUF mixes widths (SmolLM2's Q4_1 keeps Q8_0 embeddings)
    bases = sorted({k.rsplit(".", 1)[0] for k in weights})
    for base in bases:
        if base == "token_embd":
            name = "model.embed_tokens"
        elif base == "output_norm":
            name = "model.norm"
        elif base == "output":
            name = "lm_head"
        elif base.startswith("blk."):
            _, layer, kind = base.split(".", 2)
            if kind not in _TENSOR_NAMES:
                raise GGUFError(f"{path}: unexpected tensor '{base}'")
            name = f"model.layers.{layer}.{_TENSOR_NAMES[kind]}"
        elif base == "rope_freqs":
            continue  # recomputed from rope_theta by mlx-lm
        else:
            raise GGUFError(f"{path}: unexpected tensor '{base}'")
        parts = {s: weights[f"{base}.{s}"] for s in ("weight", "scales", "biases", "bias")
                 if f"{base}.{s}" in weights}
        if "scales" in parts:
            if parts["weight"].dtype != mx.uint32 or "biases" not in parts:
                raise GGUFError(f"{path}: tensor '{base}' has an unsupported quantized layout")
            # Bits per value follow from the packed width: 32-bit words per group of scales.
            bits = parts["weight"].shape[-1] * 32 // (parts["scales"].shape[-1] * _GROUP_SIZE)
            if opts.keep_quant:
                layer_bits[name] = bits
            else:
                parts["weight"] = mx.dequantize(parts.pop("weight"), parts.pop("scales"),
                                                parts.pop("biases"), group_size=_GROUP_SIZE,
                                                bits=bits)
        elif parts.get("weight") is not None and not mx.issubdtype(parts["weight"].dtype, mx.floating):
            raise GGUFError(f"{path}: tensor '{base}' has unsupported dtype {parts['weight'].dtype}")
        if permute and base.endswith(("attn_q", "attn_k")):
            n = config["num_attention_heads"] if base.endswith("attn_q") else config["num_key_value_heads"]
            parts = {s: (_unpermute(v, n) if v.ndim == 2 or s == "bias" else v) for s, v in parts.items()}
        for suffix, value in parts.items():
            if mx.issubdtype(value.dtype, mx.floating) and not (name in layer_bits and suffix in ("scales", "biases")):
                value = value.astype(dtype)
            out[f"{name}.{suffix}"] = value
    if "model.embed_tokens.weight" not in out:
        raise GGUFError(f"{path}: token embedding tensor 'token_embd.weight' is missing")
    n_layers = config["num_hidden_layers"]
    missing = [f"blk.{i}" for i in range(n_layers) if f"model.layers.{i}.self_attn.q_proj.weight" not in out]
    if missing:
        raise GGUFError(f"{path}: tensors missing for layers {missing[:5]}")
    if not layer_bits:
        return out, None
    common = max(set(layer_bits.values()), key=list(layer_bits.values()).count)
    quant: dict = {"group_size": _GROUP_SIZE, "bits": common}
    quant.update({name: {"group_size": _GROUP_SIZE, "bits": b}
                  for name, b in layer_bits.items() if b != common})
    return out, quant


def tokenizer_files(meta: dict, path: Path) -> dict[str, dict]:
    """Rebuild tokenizer.json / tokenizer_config.json from the GGUF metadata."""
    model = _require(meta, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise GGUFError(
            f"{path}: tokenizer model '{model}' is not supported (byte-level BPE 'gpt2' is)"
        )
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    merges = _require(meta, "tokenizer.ggml.merges", path)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: pre-tokenizer '{pre}' is not supported ({sorted(_PRE_TOKENIZERS)})")
    kind, arg = _PRE_TOKENIZERS[pre]
    if kind == "bytelevel":
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        pretok = byte_level if not arg else {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        pretok = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": arg}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}]}
    # token_type 3 = control, 4 = user-defined: both are added tokens, not BPE pieces.
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] == 4, "special": types[i] == 3}
             for i, tok in enumerate(tokens) if types[i] in (3, 4)]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        # Qwen2's own tokenizer.json normalizes to NFC; llama/gpt2 tokenizers do not.
        "normalizer": {"type": "NFC"} if pre == "qwen2" else None,
        "pre_tokenizer": pretok,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length", 2048)),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding") or token("eos"),
        "unk_token": token("unknown"),
        "additional_special_tokens": [a["content"] for a in added if a["special"]],
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config}


def _check_tokenizer(folder: Path, path: Path) -> None:
    """A rebuilt tokenizer must round-trip text exactly, or the import is wrong."""
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # the tokenizers library raises a bare Exception
        raise GGUFError(f"{path}: rebuilt tokenizer is invalid ({exc})") from exc
    sample = "The capital of France is Paris. 1,234.5 kW — Größe: 東京? {\"a\": [1, 2]}\n"
    ids = tok.encode(sample, add_special_tokens=False).ids
    back = tok.decode(ids, skip_special_tokens=False)
    if back != sample:
        raise GGUFError(f"{path}: rebuilt tokenizer does not round-trip text ({back!r})")


def import_gguf(gguf: Path, dest: Path, opts: ImportOptions | None = None) -> Path:
    """Convert `gguf` into the model folder `dest`, atomically.

    The folder is built beside `dest` and swapped in only when complete
    (`atomic_folder`), so a failure leaves no half-written model.
    """
    opts = opts or ImportOptions()
    gguf, dest = Path(gguf), Path(dest)
    try:
        weights, meta = read_gguf(gguf)
        config = model_config(meta, gguf, has_output="output.weight" in weights)
        tensors, quant = convert_tensors(weights, config, meta, gguf, opts)
        tok_files = tokenizer_files(meta, gguf)
    except GGUFError:
        raise
    except Exception as exc:  # a header that parses but holds nonsense (wrong types, shapes)
        raise GGUFError(f"{gguf}: cannot convert ({type(exc).__name__}: {exc})") from exc
    if quant:
        config["quantization"] = quant
    config["torch_dtype"] = opts.dtype
    try:
        floats = {k: v for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.floating)}
        mx.eval(list(floats.values()))
        bad = [k for k, v in floats.items() if not mx.all(mx.isfinite(v)).item()]
    except Exception as exc:
        raise GGUFError(f"{gguf}: tensor data is unreadable ({exc})") from exc
    if bad:
        raise GGUFError(f"{gguf}: non-finite values in {bad[:3]}: the file is corrupt")
    with atomic_folder(dest) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, content in tok_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _check_tokenizer(tmp, gguf)
    return dest
