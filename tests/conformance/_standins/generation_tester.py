"""hf_moe_routers stand-in for transformers' ``tests/generation/test_utils.py`` (not in the sdist).

``ModelTesterMixin.test_generation_tester_mixin_inheritance`` only checks that a test class of a
model that can generate inherits ``GenerationTesterMixin``; the generation tests themselves are out of
scope for the conformance harness, so the stand-in adds no tests.
"""


class GenerationTesterMixin:
    """Empty: no generation tests."""
