"""Inspect what a run learned: its rules and their provenance (rules), the memory graph (memory_graph),
an expert as a PEFT folder (expert_export). Everything opens the run read-only, so it works while a loop writes."""
