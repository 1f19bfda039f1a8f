"""kvmux's measurement tools: `quality/` (`kvmux eval`: long-context accuracy and stream perplexity
per preset) and `bench/` (`kvmux bench`: speed and memory per preset, or serving load), on prompts
from `tasks/` (seeded task generators and the shipped corpus), with `helpers.py` shared by both."""
