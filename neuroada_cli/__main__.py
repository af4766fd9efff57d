"""``python -m neuroada_cli`` (and ``accelerate launch -m neuroada_cli``) runs the CLI."""
from .cli import entry

if __name__ == "__main__":
    entry()
