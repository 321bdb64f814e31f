"""The supported torch range (one gate, stated once, no version tests outside compat.py) and compat's helpers."""

import pathlib
import re
import tomllib

import pytest
import torch
import torch.fx

from fxfuse import compat

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize(
    "version, want",
    [
        ("2.9.1", (2, 9)),
        ("2.9.1+rocm6.4", (2, 9)),
        ("2.10.0+cu128", (2, 10)),
        ("2.13.0+cpu", (2, 13)),
        ("2.15.0a0+git3f1c2d", (2, 15)),
        ("2.16.0.dev20261101+cu132", (2, 16)),
        ("3.0", (3, 0)),
    ],
)
def test_release_reads_build_and_prerelease_strings(version, want):
    assert compat.release(version) == want


@pytest.mark.parametrize("version", ["", "2", "torch", "two.nine"])
def test_release_refuses_what_is_not_a_version(version):
    with pytest.raises(ValueError, match="cannot read a torch release"):
        compat.release(version)


@pytest.mark.parametrize("version", ["2.9.0", "2.9.1+rocm6.4", "2.10.0", "2.12.1+cu130", "2.15.0", "2.15.2a0+gitabc"])
def test_supported_releases_pass_the_gate(version):
    compat.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.8.0", "2.8.1+cu126", "2.16.0", "2.16.0.dev20261101", "1.13.1", "3.0.0"])
def test_other_releases_are_refused_with_the_range_and_the_found_version(version):
    with pytest.raises(ImportError) as e:
        compat.check_torch_version(version)
    msg = str(e.value)
    assert "supports torch 2.9 to 2.15" in msg and f"found torch {version}" in msg
    assert "'torch>=2.9,<2.16'" in msg  # what to install instead


def test_running_torch_is_in_range():
    assert compat.SUPPORTED[0] <= compat.TORCH_VERSION <= compat.SUPPORTED[1]
    assert compat.TORCH_VERSION == compat.release(torch.__version__)


def test_package_metadata_states_the_same_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (lo_major, lo_minor), (hi_major, hi_minor) = compat.SUPPORTED
    assert f"torch>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}" in deps


# Reading torch's version to decide behaviour; displaying it or keying a cache on it is fine.
_VERSION_TEST = re.compile(
    r"TORCH_VERSION|\btorch_version\b|TorchVersion|packaging\.version"
    r"|torch\.__version__\s*(?:[<>]=?|[!=]=)|(?:[<>]=?|[!=]=)\s*torch\.__version__"
    r"|torch\.__version__\.(?:startswith|split)"
)


def test_no_version_branch_outside_compat():
    offenders = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in sorted((ROOT / "src" / "fxfuse").rglob("*.py"))
        if path.name != "compat.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if _VERSION_TEST.search(line)
    ]
    assert not offenders, "torch-version branches belong in compat.py:\n" + "\n".join(offenders)


class _Recorder:
    def __init__(self, name, log, key):
        self.name, self.log, self.key = name, log, key

    def __call__(self, graph):
        self.log.append(self.name)

    def uuid(self):
        return self.key


def test_one_custom_pass_runs_a_list_in_order_under_one_key():
    # torch 2.13 takes a list of custom passes; fxfuse chains it as one pass on every release.
    log = []
    a, b = _Recorder("a", log, "ka"), _Recorder("b", log, "kb")
    assert compat.one_custom_pass(None) is None and compat.one_custom_pass([]) is None
    assert compat.one_custom_pass(a) is a and compat.one_custom_pass([None, a]) is a
    both = compat.one_custom_pass([b, a])
    both(torch.fx.Graph())
    assert log == ["b", "a"]
    assert both.uuid() == ("kb", "ka")
    assert compat.one_custom_pass([a, _Recorder("c", log, None)]).uuid() is None
    assert compat.one_custom_pass([a, lambda g: None]).uuid() is None


def test_a_list_in_global_config_is_chained_after_the_fusion_passes():
    import fxfuse
    from torch._inductor import config

    log = []
    with config.patch({compat.custom_post_pass_key(): [_Recorder("a", log, "ka"), _Recorder("b", log, "kb")]}):
        manager = fxfuse.inductor_options([])[compat.custom_post_pass_key()]
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    manager(gm.graph)
    assert log == ["a", "b"]
    assert manager.uuid() is not None
