"""Scenario helpers on a lab: a coordination server and node daemons as real processes.

Used by the lab tests, the benchmarks and `make demo`, so that every one of them starts a tailnet
the same way. The CLI talks to each daemon's unix socket from the root namespace (unix sockets are
not per network namespace); data-plane checks run inside the hosts' namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relaymesh.lab.lab import Lab, LabProcess

CTL_PORT = 8080
WG_PORT = 41641
ECHO_PORT = 7777
ALLOW_ALL = '{\n  // everyone may reach everyone\n  "acls": [{"action": "accept", "src": ["*"], ' \
            '"dst": ["*:*"]}],\n}\n'


class ScenarioError(AssertionError):
    """A scenario step failed or timed out (an AssertionError so pytest reports it as a failure)."""


ECHO_SERVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(sys.argv[1]))); s.listen(16); s.settimeout(1.0)
    print("ready", flush=True)
    end = time.monotonic() + 600
    while time.monotonic() < end:
        try:
            c, _ = s.accept()
        except TimeoutError:
            continue
        c.settimeout(2.0)
        try:
            c.sendall(c.recv(1024))
        except OSError:
            pass
        c.close()
""")

# Connect until success or the deadline; print JSON with the outcome and the time it took.
ECHO_CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    host, port = sys.argv[1], int(sys.argv[2])
    deadline, each = float(sys.argv[3]), float(sys.argv[4])
    t0 = time.monotonic(); err = None
    while time.monotonic() - t0 < deadline:
        try:
            with socket.create_connection((host, port), timeout=each) as c:
                c.settimeout(each)
                c.sendall(b"hello " + host.encode())
                data = c.recv(1024)
            print(json.dumps({"ok": data == b"hello " + host.encode(),
                              "elapsed": time.monotonic() - t0}))
            sys.exit(0)
        except OSError as e:
            err = f"{type(e).__name__}: {e}"
            time.sleep(0.05)
    print(json.dumps({"ok": False, "elapsed": time.monotonic() - t0, "error": err}))
""")


def until(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> float:
    """Poll ``pred`` until true; seconds it took. ScenarioError after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise ScenarioError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - t0


class Tailnet:
    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.ctl_state = root / "ctl"
        self.policy_file = root / "policy.hujson"
        self.policy_file.write_text(ALLOW_ALL)
        self.ctl: LabProcess | None = None
        self.daemons: dict[str, LabProcess] = {}
        self.url = f"http://{lab.address('ctl')}:{CTL_PORT}"

    # -- processes ------------------------------------------------------------------------------
    def start_control(self) -> None:
        self.ctl = self.lab.spawn("ctl", [
            "relaymesh", "control", "serve", "--state-dir", str(self.ctl_state),
            "--listen", f"0.0.0.0:{CTL_PORT}", "--policy", str(self.policy_file), "-v"],
            name="control")
        until(lambda: (self.ctl_state / "admin.sock").exists()
              and "node API on" in self.ctl_output(), 20, "control server start")

    def reload_policy(self) -> None:
        """SIGHUP the server (`ip netns exec` execs it, so the spawned pid is the server)."""
        assert self.ctl is not None and self.ctl.alive
        os.kill(self.ctl.pid, signal.SIGHUP)

    def ctl_output(self) -> str:
        return self.ctl.output() if self.ctl else ""

    def stop_control(self) -> None:
        assert self.ctl is not None
        self.ctl.stop()
        self.ctl = None

    def sock(self, name: str) -> str:
        return str(self.root / f"{name}.sock")

    def start_daemon(self, name: str, host: str | None = None, port: int = WG_PORT,
                     tun: str = "rm0") -> LabProcess:
        p = self.lab.spawn(host or name, [
            "relaymesh", "daemon", "--state-dir", str(self.root / f"{name}-state"),
            "--socket", self.sock(name), "--tun", tun, "--port", str(port)], name=f"d-{name}")
        until(lambda: "listening on" in p.output() or not p.alive, 20, f"daemon {name}")
        assert p.alive, p.output()
        self.daemons[name] = p
        return p

    def stop_daemon(self, name: str) -> None:
        self.daemons.pop(name).stop()

    # -- commands -------------------------------------------------------------------------------
    def cli(self, name: str, *args: str, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([sys.executable, "-m", "relaymesh", *args, "--socket",
                             self.sock(name)], capture_output=True, text=True, timeout=timeout,
                            check=False)
        if check and cp.returncode != 0:
            raise ScenarioError(f"relaymesh {' '.join(args)} on {name}: {cp.stderr.strip()}")
        return cp

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([sys.executable, "-m", "relaymesh", "control", "--socket",
                             str(self.ctl_state / "admin.sock"), *args],
                            capture_output=True, text=True, timeout=30, check=False)
        if check and cp.returncode != 0:
            raise ScenarioError(f"control {' '.join(args)}: {cp.stderr.strip()}")
        return cp

    def new_key(self, *flags: str) -> str:
        out = self.admin("preauthkeys", "create", "-u", "alice", "-o", "json", *flags).stdout
        return str(json.loads(out)["key"])

    def status(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli(name, "status", "--json").stdout))

    def peers(self, name: str) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.status(name)["peers"]}

    def ipv4(self, name: str) -> str:
        return self.cli(name, "ip", "-4").stdout.strip()

    def echo(self, src: str, dst_ip: str, deadline: float = 5.0,
             each: float = 1.0) -> dict[str, Any]:
        cp = self.lab.exec(src, [sys.executable, "-c", ECHO_CLIENT, dst_ip, str(ECHO_PORT),
                                 str(deadline), str(each)], timeout=deadline + 15)
        return dict(json.loads(cp.stdout))

    def all_direct(self, names: tuple[str, ...]) -> bool:
        for n in names:
            ps = self.peers(n)
            if {p for p in ps if p in names} != set(names) - {n}:
                return False
            if any(ps[p]["path"] != "direct" for p in names if p != n):
                return False
        return True
