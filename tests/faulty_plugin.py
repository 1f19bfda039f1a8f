"""Plugin module for `policy_modules`: registers the deliberately faulty policy (soak runs)."""

from kvmux.policies.registry import register
from tests.faulty_policy import FaultyPolicy

register(FaultyPolicy)
