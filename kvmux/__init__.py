"""kvmux: a long-context LLM inference server with a KV-cache policy chosen per request."""

__version__ = "0.1.0"
