"""Tiny random-weight models, built offline in seconds, for tests.

No model hub is reachable here and real checkpoints are big, so tests build their own:
an mlx-lm text model (llama or qwen2) or an mlx-vlm Qwen2-VL, each with a real byte-level
BPE tokenizer trained on a small built-in corpus and a ChatML chat template. The weights
are random (the models babble), but every file is in the format the real loaders expect,
and the same seed gives byte-identical files.
"""

from __future__ import annotations

import importlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mondrian.core.atomic import atomic_folder

# mlx, mlx-lm, mlx-vlm and tokenizers are imported inside the builders: importing this module
# stays cheap, and by then the `lora` package has imported mondrian (OpenBLAS preload).

__all__ = [
    "CHATML_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "TEXT_ARCHS",
    "build_tiny_qwen2_vl",
    "build_tiny_text",
    "tiny_corpus",
]

TEXT_ARCHS = ("llama", "qwen2")

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_SPECIALS = [ENDOFTEXT, IM_START, IM_END]
VISION_SPECIALS = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Plain ChatML, no default system prompt: what mondrian's training data is rendered with.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2-VL's own template (minus its default system prompt, as above): image parts render as
# <|vision_start|><|image_pad|><|vision_end|>; the processor then expands <|image_pad|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split: single digits, words with one leading non-letter, punctuation runs.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_MARKER = ".tiny-model.json"  # written last inside the temp folder: "this folder is complete"
_WEIGHT_STD = 0.02  # the usual transformer init; keeps random logits small and finite


# ---------------------------------------------------------------------------------------------
# Corpus and tokenizer


def tiny_corpus() -> list[str]:
    """The built-in training text for the tiny tokenizers (deterministic, ~3k lines)."""
    rng = random.Random(1234)  # fixed: the corpus (hence the vocab) never depends on `seed`
    techs = [
        "wind",
        "solar",
        "solar photovoltaic",
        "photovoltaic",
        "hydro",
        "micro hydro",
        "anaerobic digestion",
        "micro chp",
        "heat pump",
        "biomass",
    ]
    places = [
        "Berkshire",
        "Yorkshire",
        "North Yorkshire",
        "West Yorkshire",
        "Cornwall",
        "Devon",
        "Kent",
        "Cumbria",
        "Norfolk",
        "Highland",
        "Aberdeenshire",
        "Gwynedd",
        "London",
        "Reading",
        "Leeds",
        "York",
    ]
    postcodes = ["RG1", "RG14", "YO1", "LS6", "HU17", "TR1", "EX4", "CT2", "AB10", "LL55", "SW1A"]
    colours = ["red", "green", "blue", "yellow", "white", "black", "grey", "orange", "purple"]
    shapes = ["square", "circle", "triangle", "stripe", "rectangle", "line", "grid"]
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "How many wind installations are there in Berkshire?",
        "What is the total capacity of solar photovoltaic sites in Yorkshire?",
        "List the hydro schemes above 1.5 MW commissioned after 2012.",
        "Anaerobic digestion plants turn food waste and slurry into biogas.",
        "A feed-in tariff pays a fixed rate for every kWh of electricity generated.",
        "Capacity is declared in kW; large sites are quoted in MW.",
        "The postcode district tells you roughly where an installation is.",
        "Describe the composition of the painting: colour, balance and rhythm.",
        "The colour balance of the image is warm, with a strong red block in the corner.",
        "Mondrian used primary colours, black lines and white space.",
        "Answer with a single JSON object and nothing else.",
        "Return an empty list when no record matches the question.",
        "Count the records, then sum the declared net capacity.",
        "The installation date, tariff code and export status are optional fields.",
        "Which technology has the highest average capacity in North Yorkshire?",
        "Show me domestic solar installations under 4 kW in postcode RG1.",
        "Is there any wind capacity in Cornwall above 500 kW?",
        "Please give the answer in kilowatts, rounded to one decimal place.",
        "I'm not sure; it's either wind or hydro, isn't it? We'll see, they've said.",
    ]
    # Plain English from small word lists, so the BPE learns ordinary words and suffixes too.
    nouns = (
        "site scheme farm turbine panel roof field river valley village town city county region "
        "district street house school hospital church station factory warehouse office market "
        "record table column row field value answer question query report survey summary list "
        "number total average count sum date year month week day hour minute meter reading "
        "tariff rate price cost payment export import generator owner operator developer council "
        "grid network cable substation transformer inverter battery storage pump boiler engine "
        "picture painting image photo canvas frame border corner edge centre shape block line "
        "colour light shadow pattern texture surface artist gallery museum style rhythm balance "
        "composition contrast harmony space weight direction movement structure order system "
        "model adapter dataset example prompt response token message assistant user version test"
    ).split()
    verbs = (
        "shows lists counts finds returns describes measures compares reports records generates "
        "exports installs connects supplies produces stores converts heats powers reduces increases "
        "contains includes matches filters sorts groups selects changes updates checks explains "
        "paints draws fills divides balances separates frames crosses repeats follows answers"
    ).split()
    adjectives = (
        "small large new old local national public private domestic commercial community rural "
        "urban northern southern eastern western total average annual monthly daily maximum minimum "
        "bright dark primary secondary simple complex vertical horizontal thick thin strong weak "
        "balanced asymmetric geometric abstract modern famous quiet busy renewable green clean "
        "accurate exact approximate valid invalid empty missing optional required first last"
    ).split()
    words_extra = (
        "January February March April May June July August September October November December "
        "Monday Tuesday Wednesday Thursday Friday Saturday Sunday one two three four five six seven "
        "eight nine ten eleven twelve twenty thirty hundred thousand million kilowatt megawatt "
        "kilowatts megawatts hour hours electricity energy power heat gas biogas methane slurry "
        "England Scotland Wales Ireland Britain Lancashire Derbyshire Hampshire Wiltshire "
        "Oxfordshire Somerset Dorset Essex Suffolk Lincolnshire Northumberland Durham Surrey Sussex"
    ).split()
    lines: list[str] = list(sentences)
    lines.append(" ".join(words_extra))
    for _ in range(1500):
        n1, n2 = rng.choice(nouns), rng.choice(nouns)
        lines.append(
            rng.choice(
                [
                    f"The {rng.choice(adjectives)} {n1} {rng.choice(verbs)} the {n2}.",
                    f"Each {n1} {rng.choice(verbs)} a {rng.choice(adjectives)} {n2} in {rng.choice(words_extra)}.",
                    f"Why does the {n1} need a {rng.choice(adjectives)} {n2}?",
                    f"{n1.capitalize()}s and {n2}s are {rng.choice(adjectives)}.",
                ]
            )
        )
    lines.append("0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 250 500 1000 2024 2025 3.14 0.5 1.5 99.9")
    lines.append('{ } [ ] : , " . - + = ( ) / % & # @ ! ? ; * _ < > | ~ ^')
    for _ in range(1200):
        tech, place = rng.choice(techs), rng.choice(places)
        kw = round(rng.uniform(0.5, 5000.0), rng.choice([0, 1, 2]))
        year = rng.randint(2009, 2025)
        code = rng.choice(postcodes)
        unit = rng.choice(["kW", "kw", "MW", "mw"])
        lines.append(
            rng.choice(
                [
                    f"How much {tech} capacity is installed in {place}?",
                    f"A {kw} {unit} {tech} installation in {place} ({code}) since {year}.",
                    f"Find {tech} sites near postcode {code} with capacity over {kw} {unit}.",
                    f"In {year}, {place} added {kw} {unit} of {tech}.",
                    f"What is the average {tech} capacity in {place} for {year}?",
                ]
            )
        )
        record: dict[str, Any] = {
            "technology": tech,
            "region": place,
            "postcode": code,
            "capacity_kw": kw,
            "year": year,
        }
        if rng.random() < 0.3:
            record["count"] = rng.randint(0, 400)
        lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
    for _ in range(600):
        c1, c2, shape = rng.choice(colours), rng.choice(colours), rng.choice(shapes)
        lines.append(
            rng.choice(
                [
                    f"A {c1} {shape} on a {c2} background.",
                    f"The composition is balanced: a {c1} {shape} sits beside a {c2} {shape}.",
                    f"Colour: {c1}. Shape: {shape}. Balance: {rng.choice(['left', 'right', 'even'])}.",
                    json.dumps({"colour": c1, "shape": shape, "count": rng.randint(1, 9)}),
                ]
            )
        )
    return lines


def _train_tokenizer(special_tokens: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE on the built-in corpus. Returns a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # NFC as in Qwen2's tokenizer.json; transformers 5 forces Qwen2Tokenizer (which adds NFC) on
    # model_type "qwen2" whatever tokenizer_config says, so this keeps every loader consistent.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            # use_regex=False: the split above already did GPT-2's job; this maps bytes to chars.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # A "ByteLevel" decoder is what makes mlx-lm pick its BPE streaming detokenizer.
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,  # ids 0..n-1, in this order
        # All 256 byte symbols up front: any text (non-ASCII included) round-trips exactly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return tok


def _write_tokenizer(
    folder: Path,
    special_tokens: list[str],
    vocab_size: int,
    chat_template: str,
    extra_config: dict[str, Any] | None = None,
) -> tuple[int, dict[str, int]]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    Returns (tokenizer size, special token ids).
    """
    tok = _train_tokenizer(special_tokens, vocab_size)
    tok.save(str(folder / "tokenizer.json"), pretty=False)
    ids = {t: tok.token_to_id(t) for t in special_tokens}
    config: dict[str, Any] = {
        # The generic class (TokenizersBackend in transformers 5) loads tokenizer.json as-is.
        # transformers 5 ignores this for model_type "qwen2" and uses Qwen2Tokenizer, which
        # adds NFC; _train_tokenizer adds NFC too, so both paths encode alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": chat_template,
        "added_tokens_decoder": {
            str(ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in special_tokens
        },
        "additional_special_tokens": [t for t in special_tokens if t not in (ENDOFTEXT, IM_END)],
    }
    config.update(extra_config or {})
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(
        folder / "special_tokens_map.json",
        {
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "additional_special_tokens": config["additional_special_tokens"],
        },
    )
    return tok.get_vocab_size(with_added_tokens=True), ids


# ---------------------------------------------------------------------------------------------
# Weights


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Deterministic float32 weights: N(0, 0.02) matrices, ones for norm scales, zero biases."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):  # sorted: the draw order (hence the bytes) is fixed
        shape = shapes[name]
        if name.endswith(".bias"):
            out[name] = np.zeros(shape, dtype=np.float32)
        elif len(shape) == 1:  # only norm layers have 1-D weights
            out[name] = np.ones(shape, dtype=np.float32)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(_WEIGHT_STD)
    return out


def _param_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of an mlx module (shapes only: nothing is evaluated)."""
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _save_weights(folder: Path, weights: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    # {"format": "mlx"} is what mlx-lm itself writes; the header is key-sorted, so bytes are stable.
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "mlx"})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Atomic build


def _atomic_build(
    path: str | os.PathLike[str], spec: dict[str, Any], fill: Callable[[Path], None]
) -> Path:
    """Build into a temp sibling folder, then rename it into place.

    Readers never see a half-written model; a target with a matching marker is reused; one
    built from a different spec is replaced; a non-empty folder we did not build is an error.
    """
    target = Path(path).resolve()
    if _is_built(target, spec):
        return target
    if target.exists() and not _is_ours(target) and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a tiny model built by mondrian.models.tiny")
    try:
        with atomic_folder(target) as tmp:
            fill(tmp)
            _write_json(tmp / _MARKER, spec)  # last: its presence means every other file is there
            for f in tmp.iterdir():  # safetensors writes 0600 files: open them up to read
                f.chmod(0o644)
    except OSError:
        # Lost a race with a concurrent builder: fine if it built the same thing.
        if _is_built(target, spec):
            return target
        raise
    return target


def _is_ours(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def _is_built(folder: Path, spec: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text(encoding="utf-8")) == spec
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Public builders


def build_tiny_text(
    path: str | os.PathLike[str],
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 6,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_target: int = 1536,
    tie_word_embeddings: bool | None = None,
) -> Path:
    """Build (or reuse) a tiny random-weight mlx-lm model folder at `path`; return its path.

    `arch` is "llama" or "qwen2". Defaults give ~5M parameters. `intermediate_size` defaults
    to 8/3 * hidden rounded up to a multiple of 16 (688 for 256). `tie_word_embeddings`
    defaults to False for llama (an lm_head exists) and True for qwen2 (as Qwen2-0.5B).
    `vocab_target` is the BPE trainer's target; config `vocab_size` is the size it reaches.
    """
    if arch not in TEXT_ARCHS:
        raise ValueError(f"arch must be one of {TEXT_ARCHS}, not {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    if intermediate_size is None:
        intermediate_size = -(-hidden_size * 8 // 3 // 16) * 16
    if tie_word_embeddings is None:
        tie_word_embeddings = arch == "qwen2"
    spec = {
        "kind": "text",
        "arch": arch,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_target": vocab_target,
        "tie_word_embeddings": tie_word_embeddings,
        "format": 1,
    }

    def fill(folder: Path) -> None:
        vocab_size, ids = _write_tokenizer(folder, CHATML_SPECIALS, vocab_target, CHATML_TEMPLATE)
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
            "model_type": arch,
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "intermediate_size": intermediate_size,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "vocab_size": vocab_size,  # must equal the tokenizer's size (mlx-lm detokenizer)
            "tie_word_embeddings": tie_word_embeddings,
            "bos_token_id": None,
            "eos_token_id": ids[IM_END],
            "pad_token_id": ids[ENDOFTEXT],
            "torch_dtype": "float32",
        }
        if arch == "llama":
            config.update(
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                head_dim=hidden_size // num_heads,
                attention_bias=False,
                mlp_bias=False,
            )
        else:
            config.update(
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                use_sliding_window=False,
                sliding_window=4096,
            )
        _write_json(folder / "config.json", config)
        _write_json(
            folder / "generation_config.json",
            {"eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT]},
        )
        # Instantiate mlx-lm's own class so names/shapes are exactly what its loader checks.
        module = importlib.import_module(f"mlx_lm.models.{arch}")
        model = module.Model(module.ModelArgs.from_dict(config))
        _save_weights(folder, _random_weights(_param_shapes(model), seed))

    return _atomic_build(path, spec, fill)


def build_tiny_qwen2_vl(
    path: str | os.PathLike[str],
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_embed_dim: int = 64,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vocab_target: int = 1536,
    max_pixels: int = 224 * 224,
) -> Path:
    """Build (or reuse) a tiny random-weight Qwen2-VL folder that mlx-vlm loads; return its path.

    Patch 14, merge 2: an 84x84 image is a 6x6 patch grid, merged 2x2 into 9 image tokens.
    `max_pixels` caps what the image processor resizes to (keeps the vision tower cheap).
    """
    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim % 4 or num_heads % num_kv_heads:
        raise ValueError("hidden_size/num_heads must be a multiple of 4 (M-RoPE sections)")
    if vision_embed_dim % vision_heads or (vision_embed_dim // vision_heads) % 4:
        raise ValueError("vision head dim must be a multiple of 4 (2-D vision RoPE)")
    spec = {
        "kind": "qwen2_vl",
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "vision_embed_dim": vision_embed_dim,
        "vision_depth": vision_depth,
        "vision_heads": vision_heads,
        "vocab_target": vocab_target,
        "max_pixels": max_pixels,
        "format": 1,
    }
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); Qwen2-VL uses
    # [16, 24, 24] of 64, i.e. a quarter / three eighths / three eighths.
    half = head_dim // 2
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]

    def fill(folder: Path) -> None:
        specials = CHATML_SPECIALS + VISION_SPECIALS
        vocab_size, ids = _write_tokenizer(
            folder,
            specials,
            vocab_target,
            QWEN2_VL_CHAT_TEMPLATE,
            extra_config={"processor_class": "Qwen2VLProcessor"},
        )
        vision_config = {
            "model_type": "qwen2_vl",
            "depth": vision_depth,
            "embed_dim": vision_embed_dim,
            "hidden_size": hidden_size,  # the merger projects into the text model's width
            "num_heads": vision_heads,
            "mlp_ratio": 2,  # must be an int: mlx-vlm and HF both use it in int() sizes
            "in_channels": 3,
            "in_chans": 3,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "hidden_act": "quick_gelu",
        }
        config: dict[str, Any] = {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "intermediate_size": -(-hidden_size * 8 // 3 // 16) * 16,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": mrope_section},
            "max_position_embeddings": 4096,
            "vocab_size": vocab_size,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "sliding_window": 4096,
            "bos_token_id": None,
            "eos_token_id": ids[IM_END],
            "pad_token_id": ids[ENDOFTEXT],
            # The real model's ids are ~151k; ours are the tokenizer's.
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_config": vision_config,
            "torch_dtype": "float32",
        }
        _write_json(folder / "config.json", config)
        _write_json(
            folder / "generation_config.json",
            {"eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT]},
        )
        image_processor = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "min_pixels": 56 * 56,
            "max_pixels": max_pixels,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        }
        # Each of these files, if missing, makes the loader ask the hub for it.
        _write_json(folder / "preprocessor_config.json", image_processor)
        _write_json(folder / "video_preprocessor_config.json", image_processor)
        _write_json(
            folder / "processor_config.json",
            {"processor_class": "Qwen2VLProcessor", "chat_template": QWEN2_VL_CHAT_TEMPLATE},
        )
        _write_json(folder / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
        from mlx_vlm.models import qwen2_vl

        model_config = qwen2_vl.ModelConfig.from_dict(json.loads(json.dumps(config)))
        model_config.text_config = qwen2_vl.TextConfig.from_dict(model_config.text_config)
        model_config.vision_config = qwen2_vl.VisionConfig.from_dict(vision_config)
        model = qwen2_vl.Model(model_config)
        # mlx-vlm's native names (vision_tower.*, language_model.*) pass its sanitize unchanged;
        # the patch conv is saved in mlx layout (out, t, h, w, in), which sanitize keeps as is.
        _save_weights(folder, _random_weights(_param_shapes(model), seed))

    return _atomic_build(path, spec, fill)
