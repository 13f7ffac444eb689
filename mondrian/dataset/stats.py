"""Dataset statistics: token lengths as mlx-lm sees them, and output field distributions."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mondrian.core.contracts import Advisor
from mondrian.dataset.rows import DatasetError, Row

_TOP_STRINGS = 10  # free-text fields: how many most common values the stats list


def _summary(values: list[int | float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    s = sorted(values)

    def rank(q: float) -> int | float:  # nearest-rank percentile: always an observed value
        return s[max(0, math.ceil(q * len(s)) - 1)]

    return {"count": len(s), "min": s[0], "mean": round(sum(s) / len(s), 2),
            "p50": rank(0.5), "p95": rank(0.95), "max": s[-1]}


def _chat_text_only(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages with image parts dropped and text parts joined: what a text tokenizer sees."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = "".join(p.get("text", "") for p in c if p.get("type") == "text")
        out.append({"role": m["role"], "content": c})
    return out


def token_stats(rows_by_split: dict[str, list[Row]], tokenizer_path: str | None,
                max_seq_length: int, image_kind: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(token lengths, truncated rows) per split, or notes saying why they were skipped."""
    if tokenizer_path is None:
        note = "skipped: no tokenizer_path given"
        return {"note": note}, {"note": note, "max_seq_length": max_seq_length}
    path = Path(tokenizer_path).expanduser()
    if not path.is_dir():
        # mlx-lm would treat a missing path as a hub repo id and try to download it.
        raise DatasetError(f"tokenizer_path {tokenizer_path}: no such model folder")
    from mlx_lm.utils import load_tokenizer  # noqa: PLC0415 - heavy: mlx_lm import costs ~1 s; only builds given a tokenizer need it

    tok = load_tokenizer(path)
    tokens: dict[str, Any] = {
        "tokenizer": str(path),
        "note": ("text tokens only: image parts are dropped before the chat template is "
                 "applied; each image adds vision tokens that depend on its resolution "
                 "(the model's image processor decides)") if image_kind else
                "whole conversation through the tokenizer's chat template, as mlx-lm trains",
    }
    truncated: dict[str, Any] = {"max_seq_length": max_seq_length}
    for split, rows in rows_by_split.items():
        full, answer, long_ids = [], [], []
        for r in rows:
            msgs = _chat_text_only(r.record["messages"]) if image_kind else r.record["messages"]
            # The same calls mlx-lm's ChatDataset makes (return_dict=False: transformers 5
            # otherwise returns a dict), so lengths and the prompt mask match training.
            n = len(tok.apply_chat_template(msgs, return_dict=False))
            prompt = len(tok.apply_chat_template(msgs[:-1], add_generation_prompt=True,
                                                 return_dict=False))
            full.append(n)
            answer.append(n - prompt)
            if n > max_seq_length:  # mlx-lm's iterate_batches cuts these
                long_ids.append(r.job_id)
        tokens[split] = {"total": _summary(full), "answer": _summary(answer)}
        truncated[split] = {"count": len(long_ids), "job_ids": long_ids}
    return tokens, truncated


def _field_kind(prop: dict[str, Any], values: list[Any]) -> str:
    t = prop.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if t is None and values:
        v = values[0]
        t = ("boolean" if isinstance(v, bool) else "number" if isinstance(v, (int, float))
             else "array" if isinstance(v, list) else "string" if isinstance(v, str) else "other")
    if t in ("number", "integer"):
        return "number"
    if t == "string":
        return "enum" if "enum" in prop else "string"
    return t if t in ("boolean", "array") else "other"


def _value_key(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _counts(values: Iterable[Any]) -> dict[str, int]:
    c = Counter(_value_key(v) for v in values)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def field_stats(advisor: Advisor, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per output field: its kind, presence, and counts / ranges / top values by kind."""
    props = advisor.schema.get("properties", {})
    names = list(advisor.fields)
    names += sorted({k for o in outputs for k in o} - set(names))
    out: dict[str, Any] = {}
    for name in names:
        values = [o[name] for o in outputs if name in o]
        kind = _field_kind(props.get(name, {}), values)
        d: dict[str, Any] = {"kind": kind, "present": len(values),
                             "absent": len(outputs) - len(values)}
        if kind == "boolean":
            d["counts"] = {"true": sum(1 for v in values if v is True),
                           "false": sum(1 for v in values if v is False)}
        elif kind == "number":
            nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if nums:
                d.update(min=min(nums), mean=round(sum(nums) / len(nums), 3), max=max(nums))
        elif kind == "array":
            lists = [v for v in values if isinstance(v, list)]
            d["lengths"] = {str(k): n for k, n in sorted(Counter(map(len, lists)).items())}
            d["values"] = _counts(x for v in lists for x in v)
        elif kind == "enum":
            d["values"] = _counts(values)
        else:  # free text (or anything else): distinct count, top values, lengths
            counts = _counts(values)
            d["distinct"] = len(counts)
            d["top"] = dict(list(counts.items())[:_TOP_STRINGS])
            lengths = [len(v) for v in values if isinstance(v, str)]
            if lengths:
                d["chars"] = {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
                              "max": max(lengths)}
        out[name] = d
    return out
