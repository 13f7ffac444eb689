"""The tiny models' tokenizer: a byte-level BPE trained on the built-in corpus, with ChatML.

Real files in the real formats (tokenizer.json, tokenizer_config.json, special_tokens_map.json),
so mlx-lm, mlx-vlm and transformers load them as they load a downloaded model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mondrian.models.tiny_build import write_json
from mondrian.models.tiny_corpus import tiny_corpus

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_SPECIALS = [ENDOFTEXT, IM_START, IM_END]

# Plain ChatML, no default system prompt: what mondrian's training data is rendered with.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split: single digits, words with one leading non-letter, punctuation runs.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(special_tokens: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on the built-in corpus."""
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


def write_tokenizer(
    folder: Path,
    special_tokens: list[str],
    vocab_size: int,
    chat_template: str,
    extra_config: dict[str, Any] | None = None,
) -> tuple[int, dict[str, int]]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    Returns (tokenizer size, special token ids).
    """
    tok = train_tokenizer(special_tokens, vocab_size)
    tok.save(str(folder / "tokenizer.json"), pretty=False)
    ids = {t: tok.token_to_id(t) for t in special_tokens}
    config: dict[str, Any] = {
        # The generic class (TokenizersBackend in transformers 5) loads tokenizer.json as-is.
        # transformers 5 ignores this for model_type "qwen2" and uses Qwen2Tokenizer, which
        # adds NFC; train_tokenizer adds NFC too, so both paths encode alike.
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
    write_json(folder / "tokenizer_config.json", config)
    write_json(
        folder / "special_tokens_map.json",
        {
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "additional_special_tokens": config["additional_special_tokens"],
        },
    )
    return tok.get_vocab_size(with_added_tokens=True), ids
