"""`python -m graphserve` is the `graphserve` command."""
from graphserve.entrypoints.cli import main

if __name__ == "__main__":
    main()
