"""Where scripts/setup.sh takes torch from: PyTorch's CPU index on Linux without an NVIDIA GPU when it answers,
pip's own indexes otherwise, and whatever SD_TORCH_INDEX_URL says above all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scripts.server import ROOT
from scripts.torch_index import CPU_INDEX, INDEX_SETTING, OVERRIDE, choose


def never(*_: object) -> bool:
    raise AssertionError("not to be asked")


@pytest.mark.parametrize(
    ("system", "nvidia", "reachable", "expected"),
    [
        ("Linux", False, True, ["--index-url", CPU_INDEX]),
        ("Linux", False, False, []),
        ("Linux", True, True, []),
        ("Darwin", False, True, []),
        ("Windows", False, True, []),
    ],
)
def test_the_cpu_index_only_for_linux_without_an_nvidia_gpu(
    system: str, nvidia: bool, reachable: bool, expected: list[str]
) -> None:
    asked: list[str] = []

    def answers(url: str) -> bool:
        asked.append(url)
        return reachable

    arguments, message = choose(system, {}, nvidia=lambda: nvidia, reachable=answers, configured=lambda: False)
    assert arguments == expected
    # The index is asked only where it would be used, and at torch's own page.
    assert asked == ([f"{CPU_INDEX}/torch/"] if system == "Linux" and not nvidia else [])
    if asked and not reachable:
        assert message and "CUDA" in message and OVERRIDE in message
    else:
        assert (message is None) == (expected == [])


@pytest.mark.parametrize(
    ("value", "expected"), [("https://mirror.example/cpu", ["--index-url", "https://mirror.example/cpu"]), ("", [])]
)
def test_the_override_wins_and_nothing_is_probed(value: str, expected: list[str]) -> None:
    arguments, message = choose("Linux", {OVERRIDE: value}, nvidia=never, reachable=never, configured=never)
    assert arguments == expected
    assert message and OVERRIDE in message and (value or "pip's own") in message


def test_an_index_pip_is_set_to_is_kept() -> None:
    """A company mirror in pip.conf or PIP_INDEX_URL serves torch like every other package; an extra index does not
    count (this machine's pip has one)."""
    assert choose("Linux", {}, nvidia=lambda: False, reachable=never, configured=lambda: True) == ([], None)
    listed = "global.extra-index-url='file:///opt/pypi/simple'\n:env:.find-links='/opt/wheels'\n"
    assert INDEX_SETTING.search(listed) is None
    for setting in ("global.index-url='https://mirror/simple'", ":env:.index-url='https://mirror/simple'"):
        assert INDEX_SETTING.search(listed + setting + "\n")


def test_the_script_prints_one_argument_per_line_and_talks_on_stderr() -> None:
    """As setup.sh reads it: the arguments alone on stdout, so a message never becomes a pip argument."""
    env = {OVERRIDE: "https://mirror.example/cpu", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "scripts.torch_index"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines() == ["--index-url", "https://mirror.example/cpu"]
    assert OVERRIDE in done.stderr
