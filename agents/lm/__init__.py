"""The model runtime: loading and the GGUF conversion cache, precision, generation backends
(torch with continuous batching and CPU kernels, llama.cpp) and the generation request/result types.

It knows nothing of the loop's roles (prompts, solver, reflector): those live in ``agents``.
"""
