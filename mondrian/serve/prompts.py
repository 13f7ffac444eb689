"""One request's prompt per version: what each version's model is asked.

A version is asked with the prompt it was trained with (its pinned system prompt and
input settings) and, if it was trained with a retrieval index, shows its k nearest examples
(mondrian.core.retrieval); the base is asked with the advisor's prompt and no examples. A
prompt is built once per (prompt settings, index), on first use (the assigned arm, then a
fallback or shadow version only if they run).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from mondrian.core.contracts import Advisor
from mondrian.core.retrieval import RetrievalIndex, prompt_messages
from mondrian.serve.engine import ModelWorker
from mondrian.serve.errors import ServiceError
from mondrian.serve.vision import VisionRequest, VisionWorker

Prompt = list[int] | VisionRequest
Asked = Callable[[str | None], tuple[Advisor, RetrievalIndex | None]]


class Prompts:
    def __init__(self, worker: ModelWorker | VisionWorker, text: str, image: bytes | None,
                 max_tokens: int, asked_of: Asked):
        self.worker, self.text, self.image = worker, text, image
        self.max_tokens, self.asked_of = max_tokens, asked_of
        # by (asked fingerprint, id(index)): versions asked alike share one prompt
        self._built: dict[tuple, tuple[Prompt, list[str]]] = {}

    def _build(self, version: str | None) -> tuple[Prompt, list[str]]:
        advisor, index = self.asked_of(version)
        key = (advisor.fingerprint, id(index) if index is not None else 0)  # the prompt settings are in it
        if key not in self._built:
            if isinstance(self.worker, VisionWorker):
                messages, _ = prompt_messages(advisor, self.text, image=True)
                self._built[key] = (VisionRequest(self.worker.vision_prompt(messages), self.image), [])
            else:
                messages, shown = prompt_messages(advisor, self.text, index)
                prompt = self.worker.prompt_tokens(messages)
                if len(prompt) > self.max_tokens:
                    raise ServiceError(413, f"the prompt is {len(prompt)} tokens; the limit is {self.max_tokens}")
                self._built[key] = (prompt, [e.job_id or "" for e in shown])
        return self._built[key]

    def get(self, version: str | None) -> Prompt:
        """The prompt `version` (None: the base) decodes; ServiceError 413 if it is too long."""
        return self._build(version)[0]

    def examples(self, version: str | None) -> str | None:
        """The job ids of the examples `version`'s prompt showed, as JSON (None: no retrieval)."""
        if self.asked_of(version)[1] is None:
            return None
        return json.dumps(self._build(version)[1])
