"""Reading the CPU's flags: the AMX flag whole, from the flags line alone, and no error where there is no file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.cpu_features import has_amx_bf16

PROCESSOR = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PROCESSOR + "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n", True),
        (PROCESSOR + "flags\t\t: fpu avx2 avx512_bf16\n", False),  # bf16 dot products, no matrix units
        (PROCESSOR + "flags\t\t: fpu amx_bf16_extra\n", False),
        ("model name\t: amx_bf16 in a name\nflags\t\t: fpu avx2\n", False),
        ("", False),
    ],
)
def test_the_amx_flag_is_read_from_the_flags_line(tmp_path: Path, text: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert has_amx_bf16(cpuinfo) is expected


def test_no_cpuinfo_means_no_amx(tmp_path: Path) -> None:
    assert has_amx_bf16(tmp_path / "missing") is False
