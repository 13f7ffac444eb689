"""The request bodies the routes parse by hand (`http.read_json`, `uploads.read_analyze_form`),
described for the OpenAPI document at `/openapi.json`, so clients and API fuzzers
(tests/test_http_fuzz.py runs schemathesis from it) know what each route takes."""

from __future__ import annotations

from typing import Any

MAX_TOKENS = {"type": "integer", "minimum": 1, "maximum": 4096}


def _json_body(properties: dict[str, Any], required: list[str], optional_body: bool = False) -> dict:
    # open objects: these routes ignore fields they do not use (the openai client sends more)
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": not optional_body, "content": {"application/json": {"schema": schema}}}}


ANALYZE = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "object", "required": ["text"], "additionalProperties": False,
        "properties": {"text": {"type": "string", "description": "the question (text advisors)"},
                       "user": {"type": "string", "description": "sticky key for A/B assignment"},
                       "max_tokens": MAX_TOKENS,
                       "version": {"type": "string", "description": "pin a version: vN, an alias, or base"}}}},
    "multipart/form-data": {"schema": {
        "type": "object",
        "properties": {"text": {"type": "string"}, "user": {"type": "string"}, "version": {"type": "string"},
                       "max_tokens": MAX_TOKENS, "image": {"type": "string", "format": "binary"}}}},
}}}

_CONTENT_PART = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "image_url"]}, "text": {"type": "string"},
    "image_url": {"type": "object", "properties": {"url": {"type": "string"}}}}}

CHAT = _json_body({
    "model": {"type": "string", "description": "advisor, or advisor@version"},
    "messages": {"type": "array", "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "user", "assistant"]},
                       "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _CONTENT_PART}]}}}},
    "max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS,
    "temperature": {"type": "number", "enum": [0]}, "n": {"type": "integer", "enum": [1]},
    "stream": {"type": "boolean", "enum": [False]}, "user": {"type": "string"},
}, ["model", "messages"])

LOAD = _json_body({"version": {"type": "string"}}, ["version"])
ACTIVATE = _json_body({"version": {"type": "string"}, "alias": {"type": "string"}}, ["version"])
ROLLBACK = _json_body({"alias": {"type": "string"}}, [], optional_body=True)
FEEDBACK = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["verdict"], "additionalProperties": False,
    "properties": {"verdict": {"enum": ["accepted", "rejected", "corrected"]},
                   "answer": {"type": "object", "description": "the right answer (verdict corrected only); "
                                                           "it must meet the advisor's contract"},
                   "user": {"type": "string", "description": "who judged; one current verdict per user"}}}}}}}
