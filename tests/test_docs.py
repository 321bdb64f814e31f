"""The getting-started page runs as written (as a user's .py file), in under 30 lines of code, and says how many."""

import importlib
import pathlib
import re
import sys

import pytest

DOC = pathlib.Path(__file__).parent.parent / "docs" / "getting-started.md"


def _page():
    text = DOC.read_text()
    return text, re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_getting_started_states_its_own_length():
    text, code = _page()
    lines = len(code.strip().splitlines())
    stated = re.search(r"That is (\d+) lines", text)
    assert stated, "the page no longer says how long its example is"
    assert int(stated.group(1)) == lines
    assert lines <= 30


@pytest.mark.compile
def test_getting_started_runs(tmp_path, monkeypatch):
    _, code = _page()
    (tmp_path / "getting_started_page.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("getting_started_page", None)
    importlib.import_module("getting_started_page")  # its asserts are the test
