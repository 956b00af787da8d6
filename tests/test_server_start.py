"""`scripts/serve.sh`'s start (scripts/server.py) where it must refuse, in one line, before doing anything: Java it
cannot use, a server already running, the front's port taken; and `scripts/stop.sh`'s stop of a real detached
server, which must return only once what it stops is gone. Serving for real: tests/test_server.py, test_ui.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import server
from scripts.model_store import Store
from tests.servers import need, tiny_torchserve


def test_java_is_looked_for_where_torchserve_will_run_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchServe's launcher runs $JAVA_HOME/bin/java when JAVA_HOME is set, whatever PATH holds."""
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    problem = server.java_problem()
    assert problem is not None and problem.startswith(f"java was not found in JAVA_HOME ({tmp_path}/bin/java)")
    monkeypatch.delenv("JAVA_HOME")
    need(server.java_problem())  # this machine's java on PATH is 17+


@pytest.fixture
def java(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start's tests past its Java check, whether or not this machine has Java."""
    monkeypatch.setattr(server, "java_problem", lambda: None)


@pytest.fixture
def front_port_taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The front's port (SD_FRONT_PORT), with something listening on it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("SD_FRONT_PORT", str(port))
        yield port


@pytest.mark.usefixtures("java")
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


def test_a_stale_torchserve_pid_naming_another_process_is_no_server(tmp_path: Path) -> None:
    """TorchServe's pid file outlived its server (an out-of-memory kill, a reboot) and its number now names another
    process: no server is running, so a start goes ahead, and a stop signals nothing."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / server.PID_FILE).write_text(str(other.pid))
        stale = server.TorchServe(server.ROOT / "config.properties", tmp_path, tmp_path, "tiny=tiny.mar")
        assert not stale.alive()
        stale.stop()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.usefixtures("java")
def test_a_start_refuses_taken_ports_before_touching_the_model_store(
    front_port_taken: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Named with what each serves, before a build that may take minutes (TorchServe's own ports are left out here:
    a server of this machine's may hold them)."""

    class Stopped:
        def alive(self) -> bool:
            return False

        def ports(self) -> dict[str, int]:
            return {}

    def rebuild() -> None:
        raise AssertionError("the store was prepared though a port was taken")

    monkeypatch.setattr(server, "user_server", Stopped)
    monkeypatch.setattr(server, "prepare", rebuild)
    assert server.start() == 1
    assert f"already in use: port {front_port_taken} (the web front). scripts/stop.sh" in capsys.readouterr().err


@pytest.mark.usefixtures("java")
def test_an_interrupted_or_failed_start_stops_torchserve_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while the model loads, or a worker that never comes up, leaves no TorchServe running detached."""
    stopped: list[str] = []

    class Loading(server.TorchServe):
        failure: BaseException

        def start(self, foreground: bool = False) -> None:
            pass

        def alive(self) -> bool:
            return False

        def wait_ready(self, model: str, timeout: float, workers: int = 1) -> None:
            raise self.failure

        def stop(self) -> None:
            stopped.append("stopped")

    monkeypatch.setattr(server, "user_server", lambda: Loading(server.ROOT / "config.properties", server.RUN_DIR,
                                                                 server.MODEL_STORE, "sd=sd"))  # fmt: skip
    monkeypatch.setattr(server, "prepare", lambda: Store(server.MODEL_STORE / "sd", None, demo=False))
    monkeypatch.setattr(server, "listening", lambda port: False)
    for failure, code, says in ((KeyboardInterrupt(), 130, "interrupted"), (TimeoutError("no worker"), 1, "no worker")):
        Loading.failure = failure
        assert server.start() == code
        assert says in capsys.readouterr().err
    assert stopped == ["stopped", "stopped"]


def test_the_front_refuses_a_taken_port_and_records_no_pid(
    front_port_taken: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "RUN_DIR", tmp_path)
    with pytest.raises(server.FrontError, match=f"port {front_port_taken} is taken"):
        server.start_front(server.user_server())
    assert not (tmp_path / server.FRONT_PID_FILE).exists()


def test_a_stale_front_pid_naming_another_process_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """front.pid outlived its front (a reboot, a kill) and its number now leads another process group."""
    monkeypatch.setattr(server, "RUN_DIR", tmp_path)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / server.FRONT_PID_FILE).write_text(str(other.pid))
        server.stop_front()
        assert other.poll() is None
        assert not (tmp_path / server.FRONT_PID_FILE).exists()
    finally:
        other.kill()
        other.wait()


def live_members(group: int) -> list[int]:
    """Pids of the processes of a process group that still run (not zombies, which hold no ports: in a container
    whose init reaps nothing, an exited Java stays one)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.integration
def test_stop_returns_once_a_detached_server_and_its_workers_are_gone(tmp_path: Path) -> None:
    """`torchserve --stop` signals Java and returns while Java still holds its ports for seconds, so
    `scripts/stop.sh; scripts/serve.sh` could find them taken. A stopped server leaves no process of its group
    running. Its workers' sockets are in a private folder, where no other server's (or user's) can be in the way, of
    a path short enough for a socket (107 bytes) however deep the server's own folder is, as a checkout's may be."""
    home = tmp_path / ("a-deep-checkout-" * 6)
    home.mkdir()
    with tiny_torchserve(home, detached=True) as ts:
        assert ts.process is None and ts.ready_workers("tiny")
        sockets = Path((home / server.SOCKETS_FILE).read_text())
        assert list(sockets.glob(".ts.sock.*")), "TEMP names Java's temp folder, which holds the worker sockets"
        assert len(str(sockets / ".ts.sock.65535")) < 108  # whatever the length of the server's folder
        group = os.getpgid(int((home / server.PID_FILE).read_text().split()[0]))
        assert len(live_members(group)) >= 2  # Java and the worker, in the group `start` gave the launcher
        ts.stop()
        assert live_members(group) == []
        assert not ts.alive()
        assert not sockets.exists() and not (home / server.SOCKETS_FILE).exists()
    # A server never started here (no folder: `.torchserve/` on a fresh checkout) has nothing to stop.
    server.TorchServe(ts.config, tmp_path / "never-started", ts.model_store, ts.models).stop()
    assert not (tmp_path / "never-started").exists()


def test_serve_sh_without_java_says_so_before_setting_up(tmp_path: Path) -> None:
    """Java is TorchServe's, not pip's: a machine without it learns so before minutes of downloads."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname") or "/usr/bin/dirname")
    serve = subprocess.run(["/bin/bash", str(server.ROOT / "scripts" / "serve.sh")], env={"PATH": str(bin_dir)},
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert serve.returncode == 1
    assert serve.stderr.startswith("serve: TorchServe needs Java 17 or newer, and there is no java on PATH")
