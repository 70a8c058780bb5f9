"""hf_moe_routers stand-in for transformers' ``tests/exporters/test_export.py`` (not in the sdist).

``ModelTesterMixin`` derives from ``ExportTesterMixin``; the export tests are out of scope for the
conformance harness, so the stand-in adds no tests.
"""


class ExportTesterMixin:
    """Empty: no export tests."""
