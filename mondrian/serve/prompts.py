"""One request's prompt per version: what each version's model is asked.

A version trained with a retrieval index shows its k nearest examples (mondrian.core.retrieval),
others and the base show none; a prompt is built once per index, on first use (the assigned
arm, then a fallback or shadow version only if they run).
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


class Prompts:
    def __init__(self, advisor: Advisor, worker: ModelWorker | VisionWorker, text: str, image: bytes | None,
                 max_tokens: int, index_of: Callable[[str | None], RetrievalIndex | None]):
        self.advisor, self.worker, self.text, self.image = advisor, worker, text, image
        self.max_tokens, self.index_of = max_tokens, index_of
        self._built: dict[int, tuple[Prompt, list[str]]] = {}  # by id(index); 0 = no index

    def _build(self, version: str | None) -> tuple[Prompt, list[str]]:
        index = self.index_of(version)
        key = id(index) if index is not None else 0
        if key not in self._built:
            if isinstance(self.worker, VisionWorker):
                messages, _ = prompt_messages(self.advisor, self.text, image=True)
                self._built[key] = (VisionRequest(self.worker.vision_prompt(messages), self.image), [])
            else:
                messages, shown = prompt_messages(self.advisor, self.text, index)
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
        if self.index_of(version) is None:
            return None
        return json.dumps(self._build(version)[1])
