"""kvmux package."""
