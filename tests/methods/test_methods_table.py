"""Every method declares its metadata, and the README's methods table is the registry's."""

from __future__ import annotations

from pathlib import Path

import pytest

import weightweaving
from weightweaving.methods import get_method
from weightweaving.methods.table import methods_table

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name", weightweaving.list_methods())
def test_method_declares_data_free_reported_and_reference(name):
    cls = type(get_method(name))
    for attribute in ("data_free", "reported", "reference"):
        assert attribute in vars(cls), f"method '{name}' does not declare '{attribute}'"
    assert isinstance(cls.data_free, bool)
    assert cls.reported.strip() and cls.reference.strip()


def test_readme_table_is_generated_from_the_registry():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- methods-table")
    body = text[text.index("\n", start) + 1 : text.index("<!-- /methods-table -->")].strip()
    assert body == methods_table(), "run `weightweaving methods --markdown` and paste it into README.md"
    for name in weightweaving.list_methods():
        assert f"| `{name}` |" in body
