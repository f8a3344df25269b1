"""`python -m dptrain` does what the `dptrain` command does."""

from dptrain.cli import main

if __name__ == "__main__":
    main()
