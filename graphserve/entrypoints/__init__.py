"""User entry points: the offline `LLM` and the `graphserve` command line."""
