"""Data: LLM-Adapters JSON sets, your own files (alpaca, prompt/completion, chat), prompts, tokenisation and batching.

GLUE data lives with the rest of GLUE in neuroada_cli/glue/.
"""

IGNORE_INDEX = -100  # the label of positions the loss skips (prompt, padding): torch cross_entropy's default
