"""``python -m randlora_io`` runs the CLI."""

from .cli.main import main

main()
