"""`kvmux eval`: long-context quality of every policy preset on the same seeded tasks (see `cli.py`)."""
