"""Shared test setup: offline, deterministic, with a deliberate torch thread count."""

import os

# Nothing in the test run may reach a model hub or send telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import torch  # noqa: E402

# Two cores on the CI machine: one process, two threads, no oversubscription.
torch.set_num_threads(int(os.environ.get("SELFIMPROVE_TEST_THREADS", "2")))

import pytest  # noqa: E402


@pytest.fixture
def tiny():
    """A fresh tiny-random model and tokenizer (function scope: banks modify the model in place)."""
    from agents.lm.models import load_model

    return load_model("tiny-random")
