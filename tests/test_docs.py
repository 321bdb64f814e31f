"""The getting-started page runs as written (as a user's .py file), in under 30 lines of code."""

import importlib
import pathlib
import re
import sys

import pytest

DOC = pathlib.Path(__file__).parent.parent / "docs" / "getting-started.md"


@pytest.mark.compile
def test_getting_started_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 30
    (tmp_path / "getting_started_page.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("getting_started_page", None)
    importlib.import_module("getting_started_page")  # its asserts are the test
