"""A scripted fake generation backend for node and agent logic: deterministic, no model."""

from __future__ import annotations

from typing import Callable, Sequence

from agents.lm.generation import GREEDY, Generation, Sampling


class ScriptedBackend:
    """Answers each prompt with script(prompt, sampling, weights_row) and records every call."""

    name = "scripted"
    description = "scripted (tests)"

    def __init__(self, script: Callable[[str, Sampling, object], str]):
        self.script = script
        self.calls: list[dict] = []
        self.together: list[list[int]] = []  # per backend call: the row count of each request it served
        self.closed = False  # like llama.cpp's backend: unusable after close()

    def close(self) -> None:
        self.closed = True

    def chat_prompt(self, system: str | None, user: str) -> str:
        assert not self.closed, "chat_prompt on a closed backend"
        return f"<system>{system or ''}</system>\n<user>{user}</user>\n<assistant>"

    def generate(self, prompts: Sequence[str], *, weights=None, max_new_tokens: int = 384,
                 stop_at_answer: bool = False, sampling: Sampling = GREEDY) -> list[Generation]:
        assert not self.closed, "generate on a closed backend"
        outs = []
        for i, prompt in enumerate(prompts):
            row = None if weights is None else weights[0 if weights.shape[0] == 1 else i]
            self.calls.append({"prompt": prompt, "sampling": sampling, "weights": row})
            text = self.script(prompt, sampling, row)
            outs.append(Generation(text, len(text.split()), 0.0))
        return outs

    def generate_requests(self, requests) -> list[list[Generation]]:
        """Several requests as one call, as the torch backend serves them."""
        self.together.append([len(r.prompts) for r in requests])
        return [self.generate(r.prompts, weights=r.weights, max_new_tokens=r.max_new_tokens,
                              stop_at_answer=r.stop_at_answer, sampling=r.sampling) for r in requests]

    def prompts_containing(self, needle: str) -> list[str]:
        return [c["prompt"] for c in self.calls if needle in c["prompt"]]
