"""The embedded default, SmolLM2-135M-Instruct imported from its GGUF, must be *correct*."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm import generate

from mondrian.core import blas
from mondrian.models.sources import ModelError, import_gguf_model, models_dir, resolve

FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is 2+3?", "5"),
    ("How many days are in a week?", "7"),
]


def _ask(model, tokenizer, question: str, max_tokens: int = 20) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=False)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


@pytest.mark.parametrize("question,fact", FACTS)
def test_greedy_answers_are_right(smollm2_loaded, question, fact):
    model, tokenizer = smollm2_loaded
    assert fact in _ask(model, tokenizer, question)


def test_model_folder_is_a_plain_llama_checkpoint(smollm2):
    cfg = json.loads((Path(smollm2.path) / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("llama", 30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert "quantization" not in cfg
    assert smollm2.source["kind"] == "gguf" and len(smollm2.fingerprint) == 64


@pytest.mark.parametrize("text", [
    "The year 2024 had 366 days; pi ≈ 3.14159.",
    "Größe, naïve café, Zürich — «quotes» and 東京タワー 🚀",
    '{"technology": "Wind", "capacity_min_kw": 100, "postcode_patterns": ["RG", "SL"]}',
    "tabs\tand\nnewlines  double  spaces!?",
])
def test_tokenizer_round_trips(smollm2_loaded, text):
    _, tokenizer = smollm2_loaded
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_splits_digits_and_knows_chat_tokens(smollm2_loaded):
    _, tokenizer = smollm2_loaded
    ids = tokenizer.encode("12345", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == list("12345")  # SmolLM2 splits digits
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    specials = tokenizer.encode("<|im_start|>user", add_special_tokens=False)
    assert specials[0] == 1  # a control token is one id, not spelled out


def test_import_is_cached(smollm2):
    weights = Path(smollm2.path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve("smollm2-135m").fingerprint == smollm2.fingerprint
    assert weights.stat().st_mtime_ns == mtime


def test_mlx_lm_cli_generates_from_our_folder(smollm2):
    """Our folder is a valid mlx-lm model: `python -m mlx_lm generate --model DIR` works."""
    env = dict(os.environ)
    st = blas.status()
    if st.backend == "openblas":  # plain mlx_lm processes need the preload from outside
        env["LD_PRELOAD"] = st.path
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", smollm2.path,
                          "--prompt", "What is the capital of France?", "--max-tokens", "12",
                          "--temp", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout


def test_keep_quant_import_loads_and_answers(mondrian_home):
    from mlx_lm import load

    card = resolve("smollm2-135m", keep_quant=True)
    assert card.name == "smollm2-135m-q"
    cfg = json.loads((Path(card.path) / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    size = sum(p.stat().st_size for p in Path(card.path).glob("*.safetensors"))
    assert size < 150e6  # stays ~4.5 bits per weight, not dequantized
    model, tokenizer = load(card.path)
    assert "Paris" in _ask(model, tokenizer, "What is the capital of France?", max_tokens=10)


def test_truncated_real_gguf_leaves_no_model(smollm2, tmp_path):
    src = Path(smollm2.source["path"])
    bad = tmp_path / "smollm2-truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(ModelError, match="extends past the end of the file"):
        import_gguf_model(bad, name="smollm2-truncated")
    assert not (models_dir() / "smollm2-truncated").exists()
    assert not [p for p in models_dir().iterdir() if p.is_dir() and p.name.startswith(".")]
