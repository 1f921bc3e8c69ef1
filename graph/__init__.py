"""LangGraph state machine of the self-improvement loop."""
