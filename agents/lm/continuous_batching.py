"""Continuous batching for the torch backend: a fixed set of sequence slots that never idle.

transformers ``generate`` runs a batch until its longest answer ends: finished rows keep
being computed as padding, and the next batch waits. Here each of ``slots`` rows leaves as
soon as its answer is complete, and a waiting prompt takes its place, so every decode step
computes only live sequences, in batches large enough for the CPU's matrix kernels. The
keys and values live in one preallocated buffer per layer (no per-step concatenation), and
a token prefix shared by every prompt (the chat template and instructions) is computed once
and copied into each slot when all rows share one expert mixture.

The model's own modules run every step (its attention, rotary embedding and the expert
bank's routed LoRA layers); only the cache and the mask are ours: the mask says, per row,
which cached positions hold its prefix, its prompt and its answer so far.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from adapters.bank import ExpertBank
from agents.lm.cpu_kernels import (ExactGreedyHead, Int8Linears, PackedLinears, PrepackedBfloat16Linears,
                                   int8_linear_available)
from agents.lm.generation import GREEDY, Generation, Request, Sampling, answer_complete, finished, mixture_applied

MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth a separate forward pass


class SlotCache:
    """Keys and values of ``slots`` sequences, row i of a forward call being slot ``first + i``.

    transformers' attention layers call ``update`` with the new keys and values of a call and
    attend over what it returns; ``positions`` (rows,) or a ``start`` offset says where the call's
    tokens go. Duck-typed, like transformers' Cache for what the model's forward uses of it.
    """

    def __init__(self, n_layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = capacity
        # Set by the caller before each forward: the slot rows it covers, where its tokens go and
        # how many cached positions the attention reads.
        self.first = 0
        self.start = 0  # a block of tokens written at [start, start + length) in every row, or
        self.positions: torch.Tensor | None = None  # one token per row, at its own position
        self.width = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = key.shape[0]
        keys = self.keys[layer_idx][self.first : self.first + rows]  # a view: (rows, kv_heads, capacity, dim)
        values = self.values[layer_idx][self.first : self.first + rows]
        if self.positions is None:
            keys[:, :, self.start : self.start + key.shape[2]] = key
            values[:, :, self.start : self.start + key.shape[2]] = value
        else:
            index = torch.arange(rows, device=key.device)
            keys[index, :, self.positions] = key[:, :, 0]
            values[index, :, self.positions] = value[:, :, 0]
        return keys[:, :, : self.width], values[:, :, : self.width]

    def move(self, source: int, dest: int, length: int) -> None:
        """Copy slot ``source``'s first ``length`` positions into slot ``dest``."""
        for keys, values in zip(self.keys, self.values):
            keys[dest, :, :length] = keys[source, :, :length]
            values[dest, :, :length] = values[source, :, :length]

    def copy_prefix(self, prefix: SlotCache, length: int, dest: slice) -> None:
        """Copy row 0's first ``length`` positions of another cache into slots ``dest``."""
        for keys, values, pkeys, pvalues in zip(self.keys, self.values, prefix.keys, prefix.values):
            keys[dest, :, :length] = pkeys[0:1, :, :length]
            values[dest, :, :length] = pvalues[0:1, :, :length]


@dataclass
class _Row:
    """One live sequence: which prompt it answers and where its tokens sit in its slot."""

    prompt: int  # index into the call's prompts
    start: int  # first position of its own tokens (the prefix, if any, sits before the padding)
    length: int  # positions filled so far
    tokens: list[int] = field(default_factory=list)  # generated so far


class ContinuousBatcher:
    """Greedy or sampled decoding of many prompts through ``slots`` continuously refilled rows."""

    def __init__(self, model, tokenizer, bank: ExpertBank | None, slots: int = 16, int8: bool = False):
        """``int8``: decode through 8-bit copies of the float32 model's linear layers (``Int8Linears``),
        the output projection included; an error where this torch or model cannot."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model, self.tokenizer, self.bank, self.slots = model, tokenizer, bank, slots
        config = model.config
        self.n_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_ids = set(eos) | {tokenizer.eos_token_id}  # what ends a sequence, as generate does
        self.strip_ids = self.stop_ids | {tokenizer.pad_token_id}  # what the generate path strips
        # In float32 a prefix computed on its own gives the same keys and values as inside each
        # prompt; in reduced precision the products round differently with the row count, and the
        # copied prefix flips near-tied greedy tokens against plain generate (seen on the tiny model).
        self.reuse_prefix = next(model.parameters()).dtype == torch.float32
        int8_linears = Int8Linears.for_model(model) if int8 else None
        if int8 and int8_linears is None:
            weight = next(model.parameters())
            raise ValueError(f"int8 decoding needs float32 weights on the CPU and torch's fbgemm int8 kernels; this "
                             f"model has {weight.dtype} weights on {weight.device}, fbgemm "
                             f"{'present' if int8_linear_available() else 'absent'}")
        self.head = None if int8 else ExactGreedyHead.for_model(model)  # in int8 the head is an int8 layer too
        # Where logits are a plain linear map of the last hidden state, the head runs on that
        # state alone: the model's own logits_to_keep=1 slices a prefill's hidden states without
        # copying, and the product of that strided slice copied the whole output matrix each call.
        output = model.get_output_embeddings()
        self.plain_head = output if type(model).__name__ in ExactGreedyHead.MODELS and type(output) is torch.nn.Linear else None
        self.packed = (int8_linears or PackedLinears.for_model(model, slots, exclude=(output,))
                       or PrepackedBfloat16Linears.for_model(model))

    @property
    def features(self) -> str:
        """What speeds this batcher up beyond slots, for run logs and reports."""
        parts = ["shared-prefix KV reuse"] if self.reuse_prefix else []
        if self.head is not None:
            parts.append("bfloat16-screened exact greedy head")
        if isinstance(self.packed, PackedLinears):
            parts.append(f"MKL-packed linears at {self.slots} rows")
        elif isinstance(self.packed, Int8Linears):
            parts.append("int8 linears (per-row activation scales)")
        elif self.packed is not None:
            parts.append("oneDNN-reordered bfloat16 linears")
        return ", ".join(parts) or "no extra kernels"

    def generate(
        self,
        prompts: Sequence[str],
        weights: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 384,
        stop_at_answer: bool = True,
        sampling: Sampling = GREEDY,
    ) -> list[Generation]:
        """Completions of templated prompts; ``weights`` (len(prompts) or 1, n_experts), None = bare model."""
        if not prompts:
            return []
        request = Request(tuple(prompts), weights, max_new_tokens, stop_at_answer, sampling)
        return self.generate_requests([request])[0]

    @torch.no_grad()
    def generate_requests(self, requests: Sequence[Request]) -> list[list[Generation]]:
        """Several requests decoded through the same slots at once, each row with its request's settings.

        A request's sampled rows draw from its own generator, seeded by its sampling seed, so a
        request alone gives exactly what ``generate`` gives it.
        """
        started = time.perf_counter()
        device = next(self.model.parameters()).device
        prompts = [p for r in requests for p in r.prompts]
        if not prompts:
            return [[] for _ in requests]
        owner = [i for i, r in enumerate(requests) for _ in r.prompts]  # the request of each row
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if not all(ids):
            raise ValueError(f"prompt {next(i for i, t in enumerate(ids) if not t)} is empty")
        weights = _weights_of(requests, self.bank)
        shared = self.reuse_prefix and (weights is None or weights.shape[0] == 1 or bool((weights == weights[:1]).all()))
        prefix = _common_prefix(ids) if shared and len(ids) > 1 else 0
        prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
        prefix = min(prefix, min(len(i) for i in ids) - 1)  # every prompt keeps a token to prefill
        slots = min(self.slots, len(prompts))
        capacity = max(len(i) for i in ids) + max(r.max_new_tokens for r in requests)
        dtype = next(self.model.parameters()).dtype
        cache = SlotCache(self.n_layers, slots, self.kv_heads, self.head_dim, capacity, dtype, device)
        pick = _Picker([r.sampling for r in requests], owner, self.head, device)
        limits = [requests[o].max_new_tokens for o in owner]
        stops = [requests[o].stop_at_answer for o in owner]

        prefix_cache = None
        if prefix:
            prefix_cache = SlotCache(self.n_layers, 1, self.kv_heads, self.head_dim, prefix, dtype, device)
            self._forward_block(prefix_cache, 0, [ids[0][:prefix]], 0, weights[:1] if weights is not None else None)

        waiting = list(range(len(prompts)))
        waiting.reverse()  # pop() takes prompts in order
        live: list[tuple[_Row, int]] = []  # slot i: a row and its newest token, not yet in the cache
        done: dict[int, list[int]] = {}
        while waiting or live:
            if waiting and len(live) < slots:
                # Fill free slots before decoding, so that every decode step runs all slots together.
                group = [waiting.pop() for _ in range(min(slots - len(live), len(waiting)))]
                first = len(live)
                if prefix_cache is not None:
                    cache.copy_prefix(prefix_cache, prefix, slice(first, first + len(group)))
                unique, copies = _same_prompts(group, ids, owner, weights, [r.sampling for r in requests])
                suffixes = [ids[p][prefix:] for p in unique]
                width = max(len(s) for s in suffixes)
                out = self._forward_block(cache, first, suffixes, prefix, _rows_of(weights, unique, device))
                fresh = [_Row(p, prefix + width - len(s), prefix + width) for p, s in zip(unique, suffixes)]
                if copies:
                    # A sampled prompt asked k times is prefilled once; its keys and values are copied.
                    sources = [unique.index(source) for _, source in copies]
                    for j, (p, i) in enumerate(zip((p for p, _ in copies), sources)):
                        cache.move(first + i, first + len(unique) + j, prefix + width)
                        fresh.append(_Row(p, fresh[i].start, fresh[i].length))
                    out = torch.cat([out, out[sources]])
            else:
                first = 0
                fresh = [row for row, _ in live]
                out = self._decode_step(cache, live, prefix, _rows_of(weights, [r.prompt for r in fresh], device))
            chosen = pick(out, [row.prompt for row in fresh])
            live = live[:first] + self._settle(cache, first, list(zip(fresh, chosen)), done, limits, stops)

        seconds = time.perf_counter() - started
        results: list[list[Generation]] = [[] for _ in requests]
        for p in range(len(prompts)):
            results[owner[p]].append(finished(self.tokenizer, done[p], self.strip_ids, seconds))
        return results

    def _settle(self, cache: SlotCache, first: int, entries, done: dict, limits: list[int], stops: list[bool]):
        """Record each row's new token; finished rows leave, the rest close up from slot ``first`` on."""
        kept = []
        for slot, (row, token) in enumerate(entries, start=first):
            if token not in self.stop_ids:
                row.tokens.append(token)
            if (token in self.stop_ids or len(row.tokens) >= limits[row.prompt]
                    or (stops[row.prompt] and answer_complete(self.tokenizer, row.tokens))):
                done[row.prompt] = row.tokens
                continue
            if slot != first + len(kept):
                cache.move(slot, first + len(kept), row.length)
            kept.append((row, token))
        return kept

    def _forward(self, cache: SlotCache, input_ids, positions, mask, weights) -> torch.Tensor:
        """The last position's hidden state (rows, hidden) when the head is ours, else its logits (rows, vocab)."""
        kwargs = dict(input_ids=input_ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True)
        packed = self.packed.applied(input_ids.numel()) if self.packed is not None else contextlib.nullcontext()
        with packed, mixture_applied(self.bank, weights):
            if self.head is None and self.plain_head is None:
                return self.model(**kwargs, logits_to_keep=1).logits[:, -1]
            hidden = self.model.get_decoder()(**kwargs).last_hidden_state[:, -1].contiguous()  # (rows, hidden)
            return hidden if self.head is not None else self.plain_head(hidden)

    def _forward_block(self, cache: SlotCache, first: int, suffixes: list[list[int]], prefix: int, weights):
        """Prefill: left-padded prompt suffixes into slots ``first``.., after ``prefix`` cached positions."""
        device = cache.keys[0].device
        width = max(len(s) for s in suffixes)
        pads = torch.tensor([width - len(s) for s in suffixes], device=device)  # (rows,)
        input_ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(s)) + s for s in suffixes], device=device)
        steps = torch.arange(width, device=device)
        positions = prefix + (steps.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)  # (rows, width)
        # Keys: the shared prefix, then the row's own tokens up to the query (padding excluded);
        # a padding query sees itself only, so that no row of the softmax is empty.
        own = (steps.view(1, 1, -1) <= steps.view(1, -1, 1)) & (steps.view(1, 1, -1) >= pads.view(-1, 1, 1))
        own |= torch.eye(width, dtype=torch.bool, device=device).unsqueeze(0)
        seen = torch.ones(len(suffixes), width, prefix, dtype=torch.bool, device=device)
        mask = torch.cat([seen, own], dim=2).unsqueeze(1)  # (rows, 1, width, prefix + width)
        cache.first, cache.start, cache.positions, cache.width = first, prefix, None, prefix + width
        return self._forward(cache, input_ids, positions, mask, weights)

    def _decode_step(self, cache: SlotCache, live: list[tuple[_Row, int]], prefix: int, weights):
        """One token for every live row, each written at its own next position."""
        device = cache.keys[0].device
        rows = [row for row, _ in live]
        tokens = [token for _, token in live]
        lengths = torch.tensor([r.length for r in rows], device=device)  # (rows,)
        starts = torch.tensor([r.start for r in rows], device=device)
        width = int(lengths.max()) + 1
        keys = torch.arange(width, device=device).unsqueeze(0)  # (1, width)
        mask = ((keys < prefix) | (keys >= starts.unsqueeze(1))) & (keys <= lengths.unsqueeze(1))  # (rows, width)
        positions = (lengths - (starts - prefix)).unsqueeze(1)  # (rows, 1): padding holds no position
        cache.first, cache.positions, cache.width = 0, lengths, width
        logits = self._forward(cache, torch.tensor(tokens, device=device).unsqueeze(1), positions,
                               mask.view(len(rows), 1, 1, width), weights)
        for row in rows:
            row.length += 1
        return logits


class _Picker:
    """The next token of each row: argmax, or temperature and top-p sampling with its request's generator."""

    def __init__(self, samplings: Sequence[Sampling], owner: list[int], head: ExactGreedyHead | None, device):
        self.samplings, self.owner, self.head = samplings, owner, head
        self.generators = [torch.Generator(device=device).manual_seed(s.seed) if not s.greedy else None
                           for s in samplings]

    def __call__(self, out: torch.Tensor, prompts: list[int]) -> list[int]:
        """``out``: hidden states (rows, hidden) when there is a head, else logits (rows, vocab); row i answers prompts[i]."""
        owners = [self.owner[p] for p in prompts]
        if len(set(owners)) == 1:
            return self._pick(out, owners[0])
        tokens = [0] * len(prompts)
        for request in dict.fromkeys(owners):  # each request's rows in slot order, requests in order of appearance
            rows = [i for i, o in enumerate(owners) if o == request]
            for i, token in zip(rows, self._pick(out[rows], request)):
                tokens[i] = token
        return tokens

    def _pick(self, out: torch.Tensor, request: int) -> list[int]:
        sampling, generator = self.samplings[request], self.generators[request]
        if self.head is not None and sampling.greedy:
            return self.head.greedy(out).tolist()
        logits = (out if self.head is None else self.head.logits(out)).float()
        if sampling.greedy:
            return logits.argmax(dim=-1).tolist()
        scaled = logits / sampling.temperature
        if sampling.top_p < 1:
            probs = torch.softmax(scaled, dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest head whose mass reaches top_p (always the top token)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        else:
            probs = (scaled - scaled.amax(dim=-1, keepdim=True)).exp()  # unnormalised: the draw scales by the total
        return _draw(probs, generator)


def _same_prompts(group: list[int], ids: list[list[int]], owner: list[int], weights: torch.Tensor | None,
                  samplings: Sequence[Sampling]) -> tuple[list[int], list[tuple[int, int]]]:
    """Rows to prefill, and (row, the row whose prefill it copies) for repeats of a sampled prompt.

    Only sampled rows share a prefill: a greedy row keeps its own, so greedy decoding stays
    what plain ``generate`` gives, whatever else is in the call.
    """
    unique: list[int] = []
    copies: list[tuple[int, int]] = []
    seen: dict[tuple, int] = {}
    for p in group:
        if samplings[owner[p]].greedy:
            unique.append(p)
            continue
        mixture = () if weights is None else tuple(weights[0 if weights.shape[0] == 1 else p].tolist())
        key = (tuple(ids[p]), mixture)
        if key in seen:
            copies.append((p, seen[key]))
        else:
            seen[key] = p
            unique.append(p)
    return unique, copies


DRAW_BLOCK = 256  # vocabulary entries per block of the two-level draw


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """One token per row with probability proportional to ``weights`` (rows, vocab), by the inverse CDF.

    One uniform number per row, against torch.multinomial's one per vocabulary entry: on a
    152k vocabulary that draw, not the model, was the largest cost of a sampled decode step.
    The CDF is walked in two levels, block totals and then the one block the number falls in,
    so the 152k-long running sum is never made; sums are float64 so every token keeps its share.
    """
    rows, vocab = weights.shape
    pad = -vocab % DRAW_BLOCK
    blocks = torch.nn.functional.pad(weights.float(), (0, pad)).view(rows, -1, DRAW_BLOCK)  # (rows, nb, block)
    totals = blocks.sum(dim=-1, dtype=torch.float64)  # (rows, nb)
    cdf = totals.cumsum(dim=-1)
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float64, device=weights.device)
    target = u * cdf[:, -1:]  # (rows, 1)
    block = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)  # (rows, 1)
    # The mass before the block, read from the same running sum the search used, so the offset is
    # never below 0; capped just under the block's own running total, which rounds differently,
    # so the walk inside never runs past the block's last token of non-zero weight.
    before = torch.nn.functional.pad(cdf, (1, 0))[:, :-1].gather(1, block)  # (rows, 1)
    inner = blocks.gather(1, block.unsqueeze(-1).expand(-1, -1, DRAW_BLOCK)).squeeze(1).double().cumsum(dim=-1)
    offset = torch.minimum(target - before, torch.nextafter(inner[:, -1:], torch.zeros_like(inner[:, -1:])))
    within = torch.searchsorted(inner, offset, right=True).clamp(max=DRAW_BLOCK - 1)  # (rows, 1)
    return (block * DRAW_BLOCK + within).clamp(max=vocab - 1).squeeze(1).tolist()


def _weights_of(requests: Sequence[Request], bank: ExpertBank | None) -> torch.Tensor | None:
    """One mixture per row (rows, n_experts), or (1, n) when every row shares one, or None for the bare model.

    A bare-model request among mixed ones gets all-zero weights: the bank then adds nothing to it.
    """
    if bank is None or all(r.weights is None for r in requests):
        return None
    if len(requests) == 1:
        return requests[0].weights
    n = bank.n_experts
    rows = [(r.weights if r.weights is not None else torch.zeros(1, n)).float().cpu().expand(len(r.prompts), -1)
            for r in requests]
    return torch.cat(rows)


def _rows_of(weights: torch.Tensor | None, prompts: list[int], device) -> torch.Tensor | None:
    if weights is None:
        return None
    if weights.shape[0] == 1:
        return weights.to(device)
    return weights[torch.tensor(prompts)].to(device)


def _common_prefix(ids: list[list[int]]) -> int:
    first = ids[0]
    length = min(len(i) for i in ids)
    for other in ids[1:]:
        n = 0
        while n < length and other[n] == first[n]:
            n += 1
        length = n
    return length
