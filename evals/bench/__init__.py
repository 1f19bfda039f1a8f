"""`kvmux bench`: speed and memory of every policy preset against transformers generate, serving
load against a running server, and the GPU check (see `cli.py`)."""
