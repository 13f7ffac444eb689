"""mondrian.models.tiny / tiny_vlm: tiny random-weight models that the real loaders accept, built offline."""

from __future__ import annotations

import json
import socket
import unicodedata
from pathlib import Path

import pytest

from mondrian.models import tiny, tiny_tokenizer
from mondrian.models.tiny_vlm import build_tiny_qwen2_vl

ROUND_TRIP = "Größe 1.5 MW, £20 — 東京"
SMALL = {"hidden_size": 64, "num_layers": 2}  # for tests about files, not about the model


@pytest.fixture(scope="module", params=tiny.TEXT_ARCHS)
def text_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_text(tmp_path_factory.mktemp("tiny") / request.param, arch=request.param)


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny") / "qwen2_vl")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record (and refuse) any hub download or internet socket; the test asserts none happened."""
    import huggingface_hub
    import mlx_vlm.utils

    attempts: list = []
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(("socket", address))
            raise OSError("network disabled in this test")
        return real_connect(self, address)

    def no_hub(*args: object, **kwargs: object) -> None:
        attempts.append(("hub", args, kwargs))
        raise OSError("hub disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    # mlx-vlm imports hf_hub_download lazily from huggingface_hub (patched here) when a
    # processor file is missing, and snapshot_download at import time.
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(mlx_vlm.utils, "snapshot_download", no_hub)
    return attempts


# --- text models -----------------------------------------------------------------------------


def test_text_loads_and_generates(text_model: Path) -> None:
    import mlx_lm
    from mlx_lm.utils import get_total_parameters

    model, tokenizer = mlx_lm.load(str(text_model))
    config = json.loads((text_model / "config.json").read_text())
    assert config["model_type"] == text_model.name
    assert 4_000_000 < get_total_parameters(model) < 6_000_000
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How much wind capacity is in Berkshire?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == (
        "<|im_start|>user\nHow much wind capacity is in Berkshire?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    responses = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=8))
    assert responses and responses[-1].generation_tokens > 0
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=8)
    assert text == "".join(r.text for r in responses)  # greedy: the same tokens twice


def test_text_qwen2_has_qkv_bias_and_tied_embeddings(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import mlx.core as mx

    llama = tiny.build_tiny_text(tmp_path_factory.mktemp("arch") / "llama", **SMALL)
    qwen2 = tiny.build_tiny_text(tmp_path_factory.mktemp("arch") / "qwen2", arch="qwen2", **SMALL)
    llama_w = mx.load(str(llama / "model.safetensors"))
    qwen2_w = mx.load(str(qwen2 / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in qwen2_w
    assert "model.layers.0.self_attn.q_proj.bias" not in llama_w
    assert "lm_head.weight" not in qwen2_w and "lm_head.weight" in llama_w
    assert json.loads((qwen2 / "config.json").read_text())["tie_word_embeddings"] is True


def test_tokenizer_size_matches_config_and_round_trips(text_model: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    config = json.loads((text_model / "config.json").read_text())
    raw = Tokenizer.from_file(str(text_model / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(text_model))
    assert raw.get_vocab_size(with_added_tokens=True) == config["vocab_size"] == len(hf)
    assert 1000 <= config["vocab_size"] <= 2000
    for text in [ROUND_TRIP, '{"capacity_kw":4.5,"postcode":"RG1"}', "  two  spaces\n\nand lines "]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids  # tokenizer.json honoured
        assert hf.decode(ids) == text
    # NFC (as Qwen2): decomposed input comes back composed, the same under every loader.
    nfd = unicodedata.normalize("NFD", ROUND_TRIP)
    assert hf.decode(hf.encode(nfd, add_special_tokens=False)) == ROUND_TRIP
    # Specials are single tokens; domain words were learned (short encodings, not bytes).
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        assert hf.encode(f"a{special}b", add_special_tokens=False)[1:-1] == [
            hf.convert_tokens_to_ids(special)
        ]
    assert len(hf.encode(" photovoltaic capacity", add_special_tokens=False)) <= 3


def test_text_build_is_deterministic(tmp_path: Path) -> None:
    a = tiny.build_tiny_text(tmp_path / "a", seed=3, **SMALL)
    b = tiny.build_tiny_text(tmp_path / "b", seed=3, **SMALL)
    c = tiny.build_tiny_text(tmp_path / "c", seed=4, **SMALL)
    for name in ["model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


# --- atomic, reusable builds -----------------------------------------------------------------


def test_existing_build_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tiny.build_tiny_text(tmp_path / "m", **SMALL)
    before = (target / "model.safetensors").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a complete model")

    monkeypatch.setattr(tiny_tokenizer, "train_tokenizer", fail)
    assert tiny.build_tiny_text(tmp_path / "m", **SMALL) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == before


def test_other_spec_replaces_and_no_temp_left(tmp_path: Path) -> None:
    first = tiny.build_tiny_text(tmp_path / "m", seed=0, **SMALL)
    old = (first / "model.safetensors").read_bytes()
    second = tiny.build_tiny_text(tmp_path / "m", seed=1, **SMALL)
    assert second == first
    assert (second / "model.safetensors").read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # temp folders cleaned up


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_text(tmp_path / "m", **SMALL)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (tiny.build_tiny_text(empty, **SMALL) / "config.json").is_file()


def test_bad_arch_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch"):
        tiny.build_tiny_text(tmp_path / "m", arch="gpt2")
    assert not (tmp_path / "m").exists()


# --- Qwen2-VL ------------------------------------------------------------------------------


def test_qwen2_vl_loads_and_generates_offline(vl_model: Path, no_network: list) -> None:
    import mlx_vlm
    from mlx.utils import tree_flatten
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import load_config, prepare_inputs
    from PIL import Image

    model, processor = mlx_vlm.load(str(vl_model))
    config = load_config(vl_model)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert 300_000 < n_params < 2_000_000

    prompt = apply_chat_template(processor, config, "Describe the colour balance.", num_images=1)
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert prompt.endswith("<|im_start|>assistant\n")

    image = Image.new("RGB", (84, 84), (200, 30, 30))
    inputs = prepare_inputs(
        processor, images=[image], prompts=[prompt], image_token_index=config["image_token_id"]
    )
    # 84 px / patch 14 = 6x6 patches; 2x2 merge -> 9 image tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert (inputs["input_ids"] == config["image_token_id"]).sum().item() == 9

    result = mlx_vlm.generate(model, processor, prompt, image=[image], max_tokens=6)
    assert result.generation_tokens > 0
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert no_network == []


def test_qwen2_vl_files(vl_model: Path) -> None:
    from tokenizers import Tokenizer

    config = json.loads((vl_model / "config.json").read_text())
    assert isinstance(config["vision_config"]["mlp_ratio"], int)
    assert config["vision_config"]["hidden_size"] == config["hidden_size"]
    for name in ["preprocessor_config.json", "processor_config.json", "tokenizer_config.json"]:
        assert (vl_model / name).is_file(), name
    raw = Tokenizer.from_file(str(vl_model / "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) == config["vocab_size"]
    for key, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
    ]:
        assert raw.token_to_id(token) == config[key]
    assert raw.decode(raw.encode(ROUND_TRIP).ids) == ROUND_TRIP
