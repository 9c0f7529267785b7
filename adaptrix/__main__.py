"""`python -m adaptrix` runs the CLI."""

from adaptrix.cli import main

if __name__ == "__main__":
    main()
