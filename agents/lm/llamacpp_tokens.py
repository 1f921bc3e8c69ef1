"""llama.cpp's streamed frames back into the transformers tokenizer's token ids.

The server streams one frame per token with that token's id, except that it holds back
tokens which leave the text in the middle of a UTF-8 character; such tokens are recovered
from the bytes of the frame that completes the character and the frame's token count.
"""

from __future__ import annotations

import logging

from agents.lm.generation import answer_complete

log = logging.getLogger(__name__)


class TokenStream:
    """Collects one request's token ids from the server's frames; asks to stop once the answer is complete."""

    def __init__(self, backend, max_new_tokens: int, stop_at_answer: bool):
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.stop_at_answer = stop_at_answer
        self.ids: list[int] = []
        self.error: str | None = None
        self.done = False

    def on_frame(self, frame: dict) -> bool:
        """Called from the server per frame; returning True ends the request (llama.cpp cancels it)."""
        if self.done:
            return True
        if "choices" not in frame:
            self.error = str(frame.get("error", frame))[:500]
            return True
        choice = frame["choices"][0]
        items = (choice.get("logprobs") or {}).get("content") or []
        counted = (frame.get("timings") or {}).get("predicted_n")
        # Tokens counted but not shown were held back and come out with this frame's first token.
        held_back = 0 if counted is None else counted - len(self.ids) - len(items)
        for k, item in enumerate(items):
            new = self._recover(item, held_back) + [item["id"]] if k == 0 and held_back > 0 else [item["id"]]
            for token in new:
                self.ids.append(token)
                if len(self.ids) >= self.max_new_tokens or (self.stop_at_answer and self._answer_complete()):
                    self.done = True
                    return True
        return choice.get("finish_reason") is not None

    def _recover(self, item: dict, count: int) -> list[int]:
        """The ids of `count` tokens held back before item's token, from the bytes the frame carries."""
        own = self.backend._token_bytes[item["id"]]
        frame_bytes = bytes(item.get("bytes") or [])
        recovered = None
        if frame_bytes.endswith(own):
            gap = frame_bytes[: len(frame_bytes) - len(own)]
            recovered = segment(gap, count, self.backend._bytes_token)
            if recovered is None:
                recovered = segment(gap, None, self.backend._bytes_token)
        if recovered is None or len(recovered) != count:
            log.warning("could not recover %d held-back token ids exactly; token counts may be off", count)
        return recovered or []

    def _answer_complete(self) -> bool:
        return answer_complete(self.backend.tokenizer, self.ids)


def byte_tables(tokenizer) -> tuple[list[bytes], dict[bytes, int]]:
    """Each token id's bytes as the tokenizer decodes it, and the reverse map (non-empty, first id wins)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table = []
    for token_id, token in enumerate(tokens):
        if token_id in added or token is None or not all(c in byte_of for c in token):
            text = tokenizer.decode([token_id], skip_special_tokens=True)
            table.append(text.encode("utf-8", errors="surrogatepass"))
        else:
            table.append(bytes(byte_of[c] for c in token))
    reverse: dict[bytes, int] = {}
    for token_id, data in enumerate(table):
        if data and token_id not in added:
            reverse.setdefault(data, token_id)
    return table, reverse


def segment(gap: bytes, count: int | None, vocab: dict[bytes, int]) -> list[int] | None:
    """Token ids whose bytes concatenate to `gap`: exactly `count` of them, or fewest when None.

    Longest first piece first, so the usual case (one held-back multi-byte token) is found at once.
    """
    if not gap:
        return [] if count in (None, 0) else None
    if len(gap) > 64:
        return None  # a held-back run is a few bytes of one character; anything longer is not one
    if count == 0:
        return None
    best = None
    for cut in range(len(gap), 0, -1):
        head = vocab.get(gap[:cut])
        if head is None:
            continue
        rest = segment(gap[cut:], None if count is None else count - 1, vocab)
        if rest is None:
            continue
        if count is not None:
            return [head, *rest]
        if best is None or 1 + len(rest) < len(best):
            best = [head, *rest]
    return best
