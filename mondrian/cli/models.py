"""`mondrian models ...` (base models: import, list, show) and `mondrian generate`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mondrian.cli.common import echo_json, fail
from mondrian.models import upstream
from mondrian.models.sources import (
    EMBEDDED,
    TINY,
    ModelCard,
    ModelError,
    check_folder,
    list_models,
    resolve,
)


@click.group()
def models() -> None:
    """Base models: import, list, show."""


def _card_line(card: ModelCard) -> str:
    return (f"{card.name:28} {card.model_type or '?':10} {card.source.get('kind'):8} "
            f"{card.fingerprint[:12]}  {card.path}")


@models.command("import")
@click.argument("spec")
@click.option("--name", help="Name in the model home (default: from the file name).")
@click.option("--keep-quant", is_flag=True, help="Keep GGUF Q4_0/Q4_1/Q8_0 weights quantized.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="dtype of dequantized weights (float32 is fastest on CPU).")
@click.option("--force", is_flag=True, help="Re-import even if cached.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_import(spec: str, name: str | None, keep_quant: bool, dtype: str, force: bool,
                  as_json: bool) -> None:
    """Import SPEC (a GGUF file, an embedded name, tiny:KIND, a folder or hub id)."""
    t0 = time.perf_counter()
    opts = {"keep_quant": keep_quant, "dtype": dtype, "force": force}
    if name:
        opts["name"] = name
    gguf_like = spec.endswith(".gguf") or spec in EMBEDDED
    try:
        card = resolve(spec, **opts) if gguf_like else resolve(spec)
    except ModelError as exc:
        fail(exc)
    if as_json:
        echo_json(card.to_dict() | {"seconds": round(time.perf_counter() - t0, 2)})
    else:
        click.echo(f"{card.name}: {card.path} (fingerprint {card.fingerprint[:12]})")


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_list(as_json: bool) -> None:
    """Imported models, and the embedded ones that can be imported."""
    cards = list_models()
    if as_json:
        echo_json({"imported": [c.to_dict() for c in cards],
                   "available": list(EMBEDDED) + [f"tiny:{t}" for t in TINY]})
        return
    for card in cards:
        click.echo(_card_line(card))
    if not cards:
        click.echo("no models imported yet")
    imported = {c.name for c in cards}
    for name, (_, _, what) in EMBEDDED.items():
        if name not in imported:
            click.echo(f"{name:28} (embedded, not imported yet: {what})")


@models.command("show")
@click.argument("spec")
@click.option("--files", is_flag=True, help="List every file with its sha256.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_show(spec: str, files: bool, as_json: bool) -> None:
    """Show one model: source, fingerprint, config summary."""
    try:
        card = resolve(spec)
        config = check_folder(Path(card.path))
    except ModelError as exc:
        fail(exc)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "quantization")
    summary = {k: config[k] for k in keys if k in config}
    data = card.to_dict(with_files=files) | {"config": summary}
    if as_json:
        echo_json(data)
        return
    for key, value in data.items():
        if key == "files":
            for rel, sha in value.items():
                click.echo(f"  {sha[:16]}  {rel}")
        else:
            click.echo(f"{key:12} {json.dumps(value) if isinstance(value, dict) else value}")


@click.command()
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Model spec.")
@click.option("--prompt", required=True, help="User message.")
@click.option("--system", help="System message.")
@click.option("--adapter-path", type=click.Path(exists=True, file_okay=False),
              help="LoRA adapter folder.")
@click.option("--max-tokens", default=100, show_default=True, type=click.IntRange(1, 8192))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def generate(model_spec: str, prompt: str, system: str | None, adapter_path: str | None,
             max_tokens: int, as_json: bool) -> None:
    """Greedy answer of a model (optionally with an adapter) to one chat prompt."""
    try:
        card = resolve(model_spec)
    except ModelError as exc:
        fail(exc)
    result = _generate(card.path, prompt, system, adapter_path, max_tokens)
    if as_json:
        echo_json({"model": card.name, "fingerprint": card.fingerprint} | result)
    else:
        click.echo(result["answer"])


def _generate(path: str, prompt: str, system: str | None, adapter_path: str | None,
              max_tokens: int) -> dict:
    from mlx_lm import generate as lm_generate  # noqa: PLC0415 - heavy: mlx_lm import costs ~1 s; other commands skip it

    model, tokenizer = upstream.load_lm(path, adapter_path=adapter_path)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    t0 = time.perf_counter()
    answer = lm_generate(model, tokenizer, text, max_tokens=max_tokens)
    return {"prompt": prompt, "answer": answer.strip(),
            "seconds": round(time.perf_counter() - t0, 3)}
