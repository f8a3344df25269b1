"""`python -m dptrain` does what the `dptrain` command does."""

from .cli import main

if __name__ == "__main__":
    main()
