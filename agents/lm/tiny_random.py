"""``tiny-random``: a seeded toy Llama (2 layers, hidden 64) with a byte-level BPE tokenizer, for tests.

Built in memory in a fraction of a second, the same weights and tokenizer for the same seed,
with a ChatML template so that every chat-based path of the project runs on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TINY_RANDOM_SEED = 0

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Training text for the tiny tokenizer: GSM8K-style prose and arithmetic, so that test prompts
# tokenize into a realistic mix of merged words and single digits.
_TINY_CORPUS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? "
    "Natalia sold 48 / 2 = 24 clips in May. Natalia sold 48 + 24 = 72 clips altogether. The answer is 72.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn? Weng earns 12 / 60 = $0.2 per minute. Working 50 minutes, she earned "
    "0.2 * 50 = $10. The answer is 10.",
    "Betty has 3 apples and buys 5 more. Each apple costs 2 dollars. How much did she spend in total? "
    "She spent 5 * 2 = 10 dollars. The answer is 10.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) % $ . , ? ! : ; ' \" Let's think step by step.",
)
_TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

TINY_DESCRIPTION = "Tiny random Llama (2 layers, hidden 64) with a byte-level BPE tokenizer, for tests"


def build_tiny_random(seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small Llama and a BPE tokenizer trained on a fixed corpus: same seed, same bits, no files."""
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(BPE())
    # Single digits, as Qwen does, so numbers tokenize the same way whatever their length.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(_TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, so any text round-trips
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer)
    max_positions = 4096  # room for long reflect prompts, as real models have; rotary positions need no weights
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",  # ends an assistant turn, so generation stops there
        pad_token="<|endoftext|>",
        chat_template=_CHATML_TEMPLATE,
        model_max_length=max_positions,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like Qwen2.5
        intermediate_size=128,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer
