"""Data: LLM-Adapters JSON sets, GLUE JSON Lines, prompts and batching."""
