"""GGUF import on tiny models: exact round trip, and bad files refused cleanly."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mondrian.models.gguf import GGUFError, import_gguf
from mondrian.models.sources import ModelError, import_gguf_model, models_dir, resolve
from tests.gguf_writer import write_gguf

TEXTS = ["wind sites over 100kw in berkshire", "Größe: 1.5 MW — £20, 東京!", '{"a": [1, 2.5]}\n\tend']


@pytest.fixture(scope="module")
def tiny_qwen2(mondrian_home):
    return resolve("tiny:qwen2")


@pytest.fixture(scope="module")
def llama_gguf(tiny_llama, tmp_path_factory):
    return write_gguf(tiny_llama.path, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", pre="qwen2")


def _logits(path: str, ids: list[int]) -> mx.array:
    from mlx_lm import load

    model, _ = load(path)
    return model(mx.array([ids]))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_import_round_trips_weights_and_tokenizer(arch, tiny_llama, tiny_qwen2, tmp_path):
    """llama.cpp's conversion (names, q/k permutation, tokenizer as lists) is undone exactly."""
    from mlx_lm import load

    original = tiny_llama if arch == "llama" else tiny_qwen2
    gguf = write_gguf(original.path, tmp_path / f"{arch}.gguf", pre="qwen2")
    imported = import_gguf(gguf, tmp_path / "imported")
    ids = list(range(3, 40))
    assert mx.allclose(_logits(original.path, ids), _logits(str(imported), ids), atol=1e-5).item()
    _, tok_a = load(original.path)
    _, tok_b = load(str(imported))
    for text in TEXTS:
        assert tok_a.encode(text) == tok_b.encode(text), text
        assert tok_b.decode(tok_b.encode(text)) == text
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["vocab_size"] == len(tok_b.vocab)
    assert tok_b.eos_token == tok_a.eos_token
    assert "chat_template" in json.loads((imported / "tokenizer_config.json").read_text())


def _corruptions(src: bytes):
    yield "truncated", src[: len(src) // 2]
    yield "header only", src[:200]
    yield "bad magic", b"GGUX" + src[4:]
    yield "empty", b""
    yield "huge tensor count", src[:8] + b"\xff" * 8 + src[16:]
    yield "huge string length", src[:24] + b"\xff" * 8 + src[32:]


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.is_dir()]


@pytest.mark.parametrize("kind", [k for k, _ in _corruptions(b"x" * 400)])
def test_bad_gguf_is_refused_and_leaves_nothing(kind, llama_gguf, tmp_path):
    data = dict(_corruptions(llama_gguf.read_bytes()))[kind]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    dest = tmp_path / "models" / "bad"
    with pytest.raises(GGUFError, match=str(bad)):
        import_gguf(bad, dest)
    assert not dest.exists()
    assert not (dest.parent.exists() and _no_leftovers(dest.parent))
    with pytest.raises(ModelError):
        import_gguf_model(bad, name=f"bad-{kind.replace(' ', '-')}")
    assert not (models_dir() / f"bad-{kind.replace(' ', '-')}").exists()
    assert not _no_leftovers(models_dir())


def test_unsupported_architecture_and_tokenizer_named(tiny_llama, tmp_path):
    gguf = write_gguf(tiny_llama.path, tmp_path / "t.gguf", pre="qwen2")
    weights, meta = mx.load(str(gguf), return_metadata=True)
    meta["general.architecture"] = "falcon"
    mx.save_gguf(str(tmp_path / "falcon.gguf"), weights, meta)
    with pytest.raises(GGUFError, match="architecture 'falcon' is not supported"):
        import_gguf(tmp_path / "falcon.gguf", tmp_path / "out")
    meta["general.architecture"] = "llama"
    meta["tokenizer.ggml.pre"] = "mystery"
    mx.save_gguf(str(tmp_path / "pre.gguf"), weights, meta)
    with pytest.raises(GGUFError, match="pre-tokenizer 'mystery' is not supported"):
        import_gguf(tmp_path / "pre.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


FUZZ = r"""
import random, sys, pathlib
import mondrian
from mondrian.models.gguf import GGUFError, import_gguf
src = pathlib.Path(sys.argv[1]).read_bytes()
out = pathlib.Path(sys.argv[2])
rng = random.Random(0)
header_end = 4096
refused = imported = 0
for i in range(60):
    data = bytearray(src)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(4, header_end)] = rng.randrange(256)
    path = out / f"f{i}.gguf"
    path.write_bytes(bytes(data))
    try:
        import_gguf(path, out / f"m{i}")
        imported += 1
    except GGUFError:
        refused += 1
print(refused, imported)
"""


def test_random_header_corruption_never_crashes(llama_gguf, tmp_path):
    """mx.load segfaults on some garbled headers; the validator must catch every one first."""
    res = subprocess.run([sys.executable, "-c", FUZZ, str(llama_gguf), str(tmp_path)],
                         capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    refused, imported = map(int, res.stdout.split())
    assert refused + imported == 60 and refused > 0


def test_import_is_cached_by_sha256(llama_gguf):
    first = import_gguf_model(llama_gguf, name="tiny-from-gguf")
    weights = models_dir() / "tiny-from-gguf" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = import_gguf_model(llama_gguf, name="tiny-from-gguf")
    assert again.fingerprint == first.fingerprint and weights.stat().st_mtime_ns == mtime
    assert first.source["sha256"] and first.source["kind"] == "gguf"
    other = llama_gguf.with_name("other.gguf")
    other.write_bytes(llama_gguf.read_bytes() + b"\0" * 32)
    with pytest.raises(ModelError, match="already exists from another source"):
        import_gguf_model(other, name="tiny-from-gguf")
