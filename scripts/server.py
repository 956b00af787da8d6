"""Start and stop TorchServe with our model: the user's checkpoint if present, else a tiny demo model.

    python -m scripts.server start     # build the model store if needed, start, wait until a worker is ready
    python -m scripts.server stop      # (scripts/serve.sh and scripts/stop.sh run these)

Tests use `TorchServe` directly: each server gets its own folder (TMPDIR, logs), a private folder for its workers'
sockets, and free ports, runs in the foreground in its own process group, and is killed with all its
children when done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

from scripts.model_store import MODEL_NAME, MODEL_STORE, ROOT, RUN_DIR, USER_CKPT, other_checkpoints, prepare

# What `torchserve --start` writes into its TMPDIR, and the class its Java process runs.
PID_FILE = ".model_server.pid"
# In a server's folder: the path of the folder that holds its workers' sockets (`TorchServe.start`).
SOCKETS_FILE = "sockets-dir"
JAVA_MAIN_CLASS = "org.pytorch.serve.ModelServer"
# Seconds a stopping TorchServe gets to exit on its own before its processes are killed.
STOP_TIMEOUT = 20
# The web front: the original app's port, so its users' clients and bookmarks keep working.
FRONT_PORT = 5000
FRONT_PID_FILE = "front.pid"
FRONT_MODULE = "front.cli"
JAVA_HELP = (
    "TorchServe needs Java 17 or newer. Install it, e.g.:\n"
    "  Debian/Ubuntu:  sudo apt-get install -y openjdk-17-jre-headless\n"
    "  Fedora/RHEL:    sudo dnf install -y java-17-openjdk-headless\n"
    "  macOS:          brew install openjdk@17  (then put it on PATH, or JAVA_HOME, as brew says)\n"
    "  conda:          conda install -c conda-forge openjdk=17\n"
    "then check with `java -version`."
)


def java_problem() -> str | None:
    """Why TorchServe cannot start for want of Java, or None when the Java it will run is 17 or newer: like
    TorchServe's launcher, `$JAVA_HOME/bin/java` when JAVA_HOME is set, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    java = shutil.which(str(Path(home) / "bin" / "java")) if home else shutil.which("java")
    if java is None:
        where = f"in JAVA_HOME ({home}/bin/java), which TorchServe uses" if home else "on PATH"
        return f"java was not found {where}. " + JAVA_HELP
    banner = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', banner)
    if match is None:
        return f"could not read the Java version from `java -version`: {banner.strip()!r}. " + JAVA_HELP
    major = int(match.group(2)) if match.group(1) == "1" else int(match.group(1))
    return None if major >= 17 else f"found Java {major}. " + JAVA_HELP


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines of a Java properties file (no continuation lines: ours has none)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def write_properties(base: Path, out: Path, overrides: dict[str, str]) -> Path:
    """A copy of `base` with some keys replaced or added, comments kept."""
    lines = []
    for line in base.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        replaced = "=" in line and not line.startswith("#") and key in overrides
        lines.append(f"{key}={overrides[key]}" if replaced else line)
    present = set(read_properties(base))
    lines += [f"{key}={value}" for key, value in overrides.items() if key not in present]
    out.write_text("\n".join(lines) + "\n")
    return out


def free_port() -> int:
    """A TCP port nothing listens on right now, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_listeners(store: Path) -> dict[str, str]:
    """config.properties overrides: every listener (gRPC too) on a free loopback port, models from `store`, so a
    second server (a test's, a benchmark's) runs beside any other."""
    return {
        "inference_address": f"http://127.0.0.1:{free_port()}",
        "management_address": f"http://127.0.0.1:{free_port()}",
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_port": str(free_port()),
        "grpc_management_port": str(free_port()),
        "model_store": str(store),
    }


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def ready_workers(management_url: str, model: str, timeout: float = 5.0) -> list[dict]:
    """Workers of `model` that are READY, from the management API ([] while loading or unreachable).

    TorchServe's /ping says Healthy while workers are still loading the model; only this tells that one can serve.
    """
    try:
        status, body = _get(f"{management_url}/models/{model}", timeout)
    except OSError:
        return []
    if status != 200:
        return []
    return [w for w in json.loads(body)[0]["workers"] if w["status"] == "READY"]


class TorchServe:
    """One TorchServe instance: its config, its folder, its process."""

    def __init__(self, config: Path, home: Path, model_store: Path, models: str) -> None:
        self.config, self.home, self.model_store, self.models = config, home, model_store, models
        self.properties = read_properties(config)
        self.inference_url = self.properties["inference_address"]
        self.management_url = self.properties["management_address"]
        self.metrics_url = self.properties["metrics_address"]
        self.process: subprocess.Popen[bytes] | None = None

    def ports(self) -> dict[str, int]:
        """The ports its listeners take, by what each serves."""
        ports = {f"TorchServe's {name} API": urllib.parse.urlsplit(self.properties[f"{name}_address"]).port
                 for name in ("inference", "management", "metrics")}  # fmt: skip
        # TorchServe's own defaults for the gRPC ports a config leaves out.
        ports |= {f"TorchServe's gRPC {name} API": int(self.properties.get(f"grpc_{name}_port", default))
                  for name, default in (("inference", 7070), ("management", 7071))}  # fmt: skip
        return {name: port for name, port in ports.items() if port is not None}

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # TorchServe's pid file lives in the temp folder: a folder of our own lets servers run side by side.
        env["TMPDIR"] = str(self.home)
        # On Apple silicon (MPS), an operation torch has no GPU kernel for runs on the CPU instead of failing every
        # request that needs it; torch reads this as it loads, in the worker. Elsewhere nothing reads it.
        env.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
        return env

    def command(self, *extra: str) -> list[str]:
        launcher = Path(sys.executable).with_name("torchserve")
        return [
            str(launcher if launcher.exists() else "torchserve"),
            "--start", "--ncs",
            "--ts-config", str(self.config),
            "--model-store", str(self.model_store),
            "--models", self.models,
            *extra,
        ]  # fmt: skip

    def start(self, foreground: bool = False) -> None:
        """Start TorchServe; in the foreground as a child in its own process group (tests), else detached.

        Its console output goes to `home/torchserve.log` either way: a detached Java process must not hold the
        caller's terminal or pipe open.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        # The workers' Unix sockets (.ts.sock.<port>) go to Java's temp folder, which the launcher takes from TEMP,
        # else the system's, where another user's stale socket keeps a worker from starting. A socket's path holds
        # 107 bytes at most, so not under `home` (a checkout's path may be long) but in a private folder of the
        # system's temp folder, recorded for `stop` to remove.
        self._remove_sockets()  # a folder a crashed server left
        sockets = tempfile.mkdtemp(prefix="ts-")
        (self.home / SOCKETS_FILE).write_text(sockets)
        with open(self.home / "torchserve.log", "ab") as out:
            command = self.command("--foreground") if foreground else self.command()
            process = subprocess.Popen(
                command, cwd=self.home, env={**self.environment(), "TEMP": sockets}, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        if foreground:
            self.process = process
        elif process.wait() != 0:
            raise RuntimeError(f"torchserve --start failed:\n{self.log_tail()}")

    def ready_workers(self, model: str) -> list[dict]:
        """Workers of `model` that are READY ([] while loading or unreachable)."""
        return ready_workers(self.management_url, model)

    def wait_ready(self, model: str, timeout: float, workers: int = 1) -> None:
        """Until `workers` workers of `model` are READY; raises with the log's tail if they are not in time or the
        server died. (A synchronous scale-up can answer before its new worker reports READY.)"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"TorchServe is not running:\n{self.log_tail()}")
            if len(self.ready_workers(model)) >= workers:
                return
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {workers} READY workers of {model} after {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        """Our foreground child still runs, or (detached) the TorchServe its pid file names does."""
        if self.process is not None:
            return self.process.poll() is None
        return self._recorded_java() is not None

    def _recorded_java(self) -> psutil.Process | None:
        """The running TorchServe Java process the pid file names: a pid file that outlived its server (a kill, an
        out-of-memory kill, a reboot: it lives in `home`, not in a temp folder the reboot empties) may name another
        process by now, which TorchServe's own launcher ignores too."""
        try:
            java = psutil.Process(int((self.home / PID_FILE).read_text().split()[0]))
        except (OSError, ValueError, IndexError, psutil.Error):
            return None
        return java if _running(java.pid) and _runs(java, JAVA_MAIN_CLASS) else None

    def log_tail(self, lines: int = 40) -> str:
        logs = sorted(self.home.glob("**/*.log"))
        return "\n".join("\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in logs)

    def stop(self) -> None:
        """Stop TorchServe and every process it started (Java frontend, Python workers), and return once they are
        gone: `torchserve --stop` only signals Java, which then takes seconds to let go of its ports, so a start
        right after it (`scripts/stop.sh; scripts/serve.sh`) could find them taken."""
        if self.process is None and not self.home.is_dir():
            return  # never started here (its pid file, folder and logs would be there)
        group = self._detached_group()  # read before --stop removes the pid file
        subprocess.run([*self.command()[:1], "--stop"], cwd=self.home, env=self.environment(), capture_output=True)
        if self.process is not None:
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            else:
                # The launcher may be gone while a worker lingers in its group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
        elif group is not None:
            java, pgid = group
            _wait_gone([java], STOP_TIMEOUT)
            # Java gone (or stuck): whatever is left of its group, workers included, goes with it. A worker may take
            # a moment to die (a GPU worker frees its memory as it exits), and the next start needs that too.
            members = _group_members(pgid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            _wait_gone(members, STOP_TIMEOUT)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Remove the folder of its workers' sockets (`start`), once they are gone."""
        recorded = self.home / SOCKETS_FILE
        if recorded.is_file():
            shutil.rmtree(recorded.read_text(), ignore_errors=True)
            recorded.unlink()

    def _detached_group(self) -> tuple[int, int] | None:
        """(Java's pid, its process group) of a server started detached, from its pid file; None if not running.
        `start` gives the launcher a session of its own, which Java and the workers inherit."""
        java = self._recorded_java() if self.process is None else None
        if java is None:
            return None
        try:
            pgid = os.getpgid(java.pid)
        except OSError:
            return None
        # A server started outside `start`, in our own group: not ours to kill.
        return (java.pid, pgid) if pgid != os.getpgrp() else None


def _running(pid: int) -> bool:
    """Whether `pid` is alive. A zombie (exited, not yet reaped by whoever inherited it: in a container whose init
    reaps nothing, nobody) counts as gone, since it holds no ports or memory."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _wait_gone(pids: list[int], timeout: float) -> bool:
    """Until every process of `pids` is gone or `timeout` seconds have passed; whether they are gone."""
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _group_members(pgid: int) -> list[int]:
    """Pids of the processes in process group `pgid`."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(process.pid) == pgid:
                members.append(process.pid)
    return members


def _runs(process: psutil.Process, program: str) -> bool:
    """Whether `process` runs `program` (a word of its command line): a pid read from a file may be reused."""
    try:
        return program in process.cmdline()
    except psutil.Error:
        return False


class FrontError(RuntimeError):
    """The web front did not come up; TorchServe, already running, is stopped again."""


def listening(port: int) -> bool:
    """Whether something already listens on `port` of this machine."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def front_port() -> int:
    """The front's port: SD_FRONT_PORT, as for `sd-front` itself, else the original app's 5000."""
    return int(os.environ.get("SD_FRONT_PORT", FRONT_PORT))


def start_front(server: TorchServe, timeout: float = 60) -> str:
    """Start the web front (`sd-front`) detached, in front of `server`; returns its URL once /healthz answers.

    The port must be free first: a front left from an earlier start would answer the health check in this one's
    place. Its pid is recorded only once it answers: a front that never came up must not leave a pid for stop.sh to
    signal later, when that number may be another process's.
    """
    port = front_port()
    if listening(port):
        raise FrontError(f"port {port} is taken (a front from an earlier start? scripts/stop.sh stops it; or "
                         "SD_FRONT_PORT=... picks another)")  # fmt: skip
    log = open(RUN_DIR / "front.log", "ab")  # noqa: SIM115 (handed to the detached child)
    with log:
        process = subprocess.Popen(
            [sys.executable, "-m", FRONT_MODULE, "--port", str(port), "--inference-url", server.inference_url,
             "--model", MODEL_NAME],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    url = f"http://localhost:{port}/"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FrontError(f"sd-front exited with {process.returncode}; see {RUN_DIR / 'front.log'}")
            with contextlib.suppress(OSError):
                if _get(f"{url}healthz", timeout=2)[0] == 200:
                    (RUN_DIR / FRONT_PID_FILE).write_text(str(process.pid))
                    return url
            time.sleep(0.3)
        raise FrontError(f"sd-front did not answer {url}healthz in {timeout:.0f} s; see {RUN_DIR / 'front.log'}")
    except BaseException:  # Ctrl-C too: a front no pid file names would hold its port for good
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        raise


def stop_front() -> None:
    """Stop the front `start_front` started, if it runs, and return once it is gone (its port free again)."""
    pid_file = RUN_DIR / FRONT_PID_FILE
    if not pid_file.exists():
        return
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        front = psutil.Process(int(pid_file.read_text()))
        if _runs(front, FRONT_MODULE):
            os.killpg(front.pid, signal.SIGTERM)
            if not _wait_gone([front.pid], STOP_TIMEOUT):
                os.killpg(front.pid, signal.SIGKILL)
    pid_file.unlink()


def user_server() -> TorchServe:
    return TorchServe(ROOT / "config.properties", RUN_DIR, MODEL_STORE, f"{MODEL_NAME}={MODEL_NAME}")


def start() -> int:
    problem = java_problem()
    if problem:
        print(f"server: {problem}", file=sys.stderr)
        return 1
    server = user_server()
    if server.alive():
        # Checked before the model store, which a rebuild would replace under the running server.
        print("server: TorchServe is already running here; scripts/stop.sh stops it (and the front)", file=sys.stderr)
        return 1
    # Checked before the model store too, which may take minutes to build.
    wanted = {**server.ports(), "the web front": front_port()}
    taken = [f"{port} ({what})" for what, port in wanted.items() if listening(port)]
    if taken:
        print(
            f"server: already in use: port {', '.join(taken)}. scripts/stop.sh stops what an earlier start here left "
            "running; otherwise stop what holds it (on macOS, AirPlay Receiver holds port 5000), or pick other ports: "
            "SD_FRONT_PORT=... for the front, config.properties for TorchServe.",
            file=sys.stderr,
        )
        return 1
    store = prepare()
    if store.demo:
        others = other_checkpoints()
        found = f" That folder holds {', '.join(others)}: name the one to serve model.ckpt." if others else ""
        if USER_CKPT.is_symlink():
            found += f" {USER_CKPT.name} is a link to {os.readlink(USER_CKPT)}, which does not exist."
        print(
            f"WARNING: no checkpoint at {USER_CKPT.relative_to(ROOT)}; serving a tiny RANDOM-WEIGHT demo model whose "
            f"images are noise. Put sd-v1-4.ckpt (or any SD v1.x checkpoint) there and run this again.{found}",
            file=sys.stderr,
        )
    if store.source is None:
        print(
            f"Serving {store.path.relative_to(ROOT)} as it is: scripts/serve.sh did not build it, so it never "
            "rebuilds it. Delete that folder to have it built from your checkpoint.",
            file=sys.stderr,
        )
    print(f"Loading the model (logs: {RUN_DIR.relative_to(ROOT)}/logs/) ...", file=sys.stderr)
    try:
        server.start()
        server.wait_ready(MODEL_NAME, timeout=900)
        front = start_front(server)
    except (RuntimeError, TimeoutError) as error:  # the worker never came up, or the front did not
        server.stop()
        print(f"server: {error}\nTorchServe stopped again.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        server.stop()
        print("server: interrupted; TorchServe stopped again.", file=sys.stderr)
        return 130
    print(f"Open {front} (the web UI; POST {front}imagine is the original app's API).")
    vae = f" with the VAE of {store.vae.name}" if store.vae else ""
    print(f"TorchServe is serving {store.source.name if store.source else store.path}{vae} as '{MODEL_NAME}'.")
    print(f"  inference:  {server.inference_url}/predictions/{MODEL_NAME}")
    print(f"  management: {server.management_url}/models/{MODEL_NAME}   (this machine only)")
    print(f"  metrics:    {server.metrics_url}/metrics")
    size = 64 if store.demo else 512
    body = json.dumps({"prompt": "a cottage garden full of tulips", "H": size, "W": size, "seed": 42})
    print("Try (through the front, or straight to TorchServe at the inference URL above):")
    print(f"  curl -s {front}imagine -H 'Content-Type: application/json' -H 'Accept: image/png' \\")
    print(f"       -d '{body}' -o tulips.png")
    print(f"Logs: {RUN_DIR.relative_to(ROOT)}/logs/   Stop with: scripts/stop.sh")
    return 0


def stop() -> int:
    stop_front()
    user_server().stop()
    print("The web front and TorchServe stopped.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"))
    args = parser.parse_args(argv)
    return start() if args.action == "start" else stop()


if __name__ == "__main__":
    sys.exit(main())
