"""The examples in the tools' docstrings are run (a wrong example is a failing test)."""
import doctest
import importlib

import pytest

MODULES = ["faust_imaging", "clover", "autospec", "racs_pipeline", "ir_blobs"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, "%d of %d docstring examples of %s failed (run python -m doctest -v %s.py)" % (
        result.failed, result.attempted, name, name)
    if name in ("clover", "racs_pipeline"):
        assert result.attempted > 0          # these modules do carry examples
