"""`kvmux calibrate`: the retrieval-head profile of a model (copy-paste scores of Retrieval Heads,
arXiv 2404.15574) on synthetic needle prompts over the shipped prose corpus: `prompts.py` (the
prompts), `probe.py` (one prompt's copy events per head), `cli.py` (the command: resume, progress,
the profile JSON), `plot.py` (the heat-map of the scores)."""
