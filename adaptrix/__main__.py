"""`python -m adaptrix` runs the CLI."""

from adaptrix.cli import main

main()
