"""`scripts/serve.sh`'s start (scripts/server.py) where it must refuse, in one line, before doing anything: Java it
cannot use, a server already running, the front's port taken. Starting for real: tests/test_server.py, test_ui.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from scripts import server


def test_java_is_looked_for_where_torchserve_will_run_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchServe's launcher runs $JAVA_HOME/bin/java when JAVA_HOME is set, whatever PATH holds."""
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    problem = server.java_problem()
    assert problem is not None and problem.startswith(f"java was not found in JAVA_HOME ({tmp_path}/bin/java)")
    monkeypatch.delenv("JAVA_HOME")
    assert server.java_problem() is None  # this machine's java on PATH is 17+


def test_a_second_start_refuses_before_touching_the_model_store(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Running:
        def alive(self) -> bool:
            return True

    def rebuild() -> None:
        raise AssertionError("the store of a running server was prepared")

    monkeypatch.setattr(server, "user_server", Running)
    monkeypatch.setattr(server, "prepare", rebuild)
    assert server.start() == 1
    assert capsys.readouterr().err == (
        "server: TorchServe is already running here; scripts/stop.sh stops it (and the front)\n"
    )


def test_the_front_refuses_a_taken_port_and_records_no_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "RUN_DIR", tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("SD_FRONT_PORT", str(port))
        with pytest.raises(server.FrontError, match=f"port {port} is taken"):
            server.start_front(server.user_server())
    assert not (tmp_path / server.FRONT_PID_FILE).exists()
