"""Build a :class:`Topology` as network namespaces with real NATs, run processes, tear down.

Layout of one run ``<run>`` (a short random id, so concurrent runs never collide)::

    rm-<run>-inet        the "internet" router: one routed /24 per attachment (198.18.<i>.0/24,
                         router .1, peer .2; IPv6 fd00:18:0:<i>::/64) and the STUN addresses
                         198.19.0.1/.2 on its loopback
    rm-<run>-<network>   a LAN router: "wan" towards inet, bridge "br0" for the LAN
                         (10.<n>.0.0/24 behind a NAT, 198.19.<n>.0/24 when routed;
                         IPv6 fd00:10:0:<n>::/64)
    rm-<run>-<host>      a host: "eth0" to its LAN bridge (.10, .11, ...) or to inet (.2)

Teardown (``close``) runs on normal exit, on exceptions (also during the build), on SIGTERM/SIGHUP
(turned into SystemExit so ``with`` unwinds), on SIGINT (KeyboardInterrupt) and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal

from relaymesh.lab import nat as natmod
from relaymesh.lab.natcheck import NatObservation
from relaymesh.lab.netns import (
    LabError,
    check_run_id,
    delete_namespaces,
    ip,
    leak_report,
    netns_inode,
    ns_exec,
    run_namespaces,
    sysctl,
)
from relaymesh.lab.topology import Impairment, Topology

DEFAULT_STATE_DIR = "/run/relaymesh-lab"


def default_state_dir() -> Path:
    """Where running labs are recorded for `relaymesh lab down/exec` (RELAYMESH_LAB_STATE)."""
    return Path(os.environ.get("RELAYMESH_LAB_STATE", DEFAULT_STATE_DIR))
INET = "inet"
# RFC 2544 benchmark range: cannot leak to (or be confused with) the real internet.
INET_V4 = "198.18.{i}.{h}"
INET_V6 = "fd00:18:0:{i:x}::{h:x}"
LAN_NAT_V4 = "10.{n}.0.{h}"
LAN_ROUTED_V4 = "198.19.{n}.{h}"
LAN_V6 = "fd00:10:0:{n:x}::{h:x}"
# Two addresses on the internet router's loopback where lab STUN responders listen.
STUN_ADDRS = ("198.19.0.1", "198.19.0.2")
STUN_PORT = 3478
# The shaper's TUN pair inside an impaired host.
SHAPER_IN, SHAPER_OUT = "rmsh0", "rmsh1"
SHAPER_TABLE = "100"
SHAPER_MARK = "0x524d"  # "RM": marks the host's own packets leaving through eth0
_TEARDOWN_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_EXEC_LOG_LIMIT = 4000  # characters of each exec's output kept in the host log


@dataclass(frozen=True)
class NodeInfo:
    """What the lab knows about one namespace (a host, a LAN router or the internet router)."""

    name: str
    netns: str
    role: str  # "host" | "router" | "inet"
    address: str | None
    address6: str | None
    public_address: str | None  # the IPv4 the internet sees for this host (NAT's, or its own)
    network: str | None
    nat: str | None


class LabProcess:
    """A long-lived process in a host's namespace; its output goes to a per-process log file."""

    def __init__(self, host: str, name: str, cmd: Sequence[str], popen: subprocess.Popen[bytes],
                 log_path: Path) -> None:
        self.host = host
        self.name = name
        self.cmd = list(cmd)
        self._popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def _signal(self, sig: int) -> None:
        if self.alive:
            # Own session (start_new_session): signal the whole group so children go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, sig)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        return self._popen.wait(timeout)

    def stop(self, grace: float = 2.0) -> None:
        """terminate, then kill after ``grace`` seconds."""
        self.terminate()
        try:
            self._popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            self._popen.wait(5)

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        """Block until ``text`` appears in the output; LabError if it exits or times out first."""
        _wait_for_line(self, text, timeout)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"LabProcess({self.host}:{self.name} pid={self.pid} alive={self.alive})"


def new_run_id() -> str:
    """5 random hex characters: short enough for interface names, unique enough per machine."""
    return secrets.token_hex(3)[:5]


class Lab:
    """A running topology. Use as a context manager; ``close()`` is idempotent."""

    def __init__(self, topology: Topology, run_id: str | None = None, *,
                 state_dir: Path | Literal["default"] | None = "default",
                 install_signal_handlers: bool = True) -> None:
        self.topology = topology
        self.run_id = check_run_id(run_id) if run_id else new_run_id()
        self.prefix = f"rm-{self.run_id}-"
        self._state_dir = default_state_dir() if state_dir == "default" else state_dir
        self._install_signals = install_signal_handlers
        self.nodes: dict[str, NodeInfo] = {}
        self._created: list[str] = []
        self._inodes: set[int] = set()
        self._procs: list[LabProcess] = []
        self._logdir: Path | None = None
        self._final_logs: dict[str, str] | None = None
        self._old_handlers: dict[int, Any] = {}
        self._started = False
        self._closed = False
        self._lock = threading.Lock()
        self._stun: LabProcess | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> Lab:
        if self._started:
            return self
        if run_namespaces(self.run_id):
            # Never adopt (and later tear down) namespaces of a lab that is already running.
            raise LabError(f"run id {self.run_id} is already in use by a running lab")
        self._started = True
        self._install_handlers()
        atexit.register(self.close)
        try:
            self._logdir = Path(tempfile.mkdtemp(prefix=f"rm-{self.run_id}-logs-"))
            self._build()
            self._write_state()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process, delete every namespace of this run, restore signal handlers."""
        # A second Ctrl-C or SIGTERM must not interrupt teardown half-way: hold those signals
        # until it is done; they are delivered (with the restored handlers) right after.
        on_main = threading.current_thread() is threading.main_thread()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _TEARDOWN_SIGNALS) if on_main else None
        with self._lock:
            first = not self._closed and self._started
            self._closed = self._closed or self._started
        if not first:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            return
        try:
            self._final_logs = self.logs()
            # SIGTERM first so daemons can clean up; whatever is left after a second is killed
            # (and delete_namespaces kills anything else still inside the namespaces).
            for p in self._procs:
                p.terminate()
            deadline = time.monotonic() + 1.0
            for p in self._procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(5)
            # By prefix, not only self._created: a half-built namespace is removed too.
            names = sorted(set(self._created) | set(run_namespaces(self.run_id)))
            errors = delete_namespaces(names)
            if errors:
                print("relaymesh lab: teardown: " + "; ".join(errors), file=sys.stderr)
        finally:
            if self._state_dir is not None:
                with contextlib.suppress(OSError):
                    (self._state_dir / f"{self.run_id}.json").unlink()
            if self._logdir is not None:
                shutil.rmtree(self._logdir, ignore_errors=True)
            self._restore_handlers()
            atexit.unregister(self.close)
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    @property
    def closed(self) -> bool:
        return self._closed

    def leaks(self) -> list[str]:
        """What of this run is still there (namespaces, root links, processes); [] when clean."""
        return leak_report(self.run_id, self._inodes)

    def _install_handlers(self) -> None:
        if not self._install_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            prev = signal.getsignal(sig)
            self._old_handlers[sig] = prev

            def handler(signum: int, frame: FrameType | None, prev: Any = prev) -> None:
                self.close()
                if callable(prev):
                    prev(signum, frame)
                raise SystemExit(128 + signum)

            signal.signal(sig, handler)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, prev)
        self._old_handlers.clear()

    # -- queries --------------------------------------------------------------------------------
    def _node(self, name: str) -> NodeInfo:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"no host, network or router named {name!r} in this lab") from None

    def address(self, host: str) -> str:
        a = self._node(host).address
        if a is None:
            raise LabError(f"{host!r} has no IPv4 address")
        return a

    def address6(self, host: str) -> str | None:
        return self._node(host).address6

    def public_address(self, host: str) -> str:
        """The IPv4 address the internet sees for ``host`` (its NAT's, its one2one, or its own)."""
        a = self._node(host).public_address
        if a is None:
            raise LabError(f"{host!r} has no public address")
        return a

    def netns(self, name: str) -> str:
        return self._node(name).netns

    @property
    def inet_netns(self) -> str:
        return self.prefix + INET

    @property
    def stun_addresses(self) -> tuple[str, str]:
        return STUN_ADDRS

    # -- running things -------------------------------------------------------------------------
    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        # Make the venv's console scripts (relaymesh, ...) and python resolvable inside namespaces.
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        env["RELAYMESH_LAB_RUN"] = self.run_id
        if extra:
            env.update(extra)
        return env

    def exec(self, host: str, cmd: Sequence[str], *, check: bool = True, timeout: float = 30,
             input: str | None = None, env: Mapping[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in ``host``'s namespace to completion; its output is also logged per host."""
        ns = self.netns(host)
        argv = ["ip", "netns", "exec", ns, *cmd]
        try:
            cp = subprocess.run(argv, input=input, capture_output=True, text=True,
                                timeout=timeout, env=self._env(env), check=False)
        except subprocess.TimeoutExpired as e:
            self._log_exec(host, cmd, None, str(e.stdout or ""), str(e.stderr or ""))
            raise
        self._log_exec(host, cmd, cp.returncode, cp.stdout, cp.stderr)
        cp.args = list(cmd)
        if check and cp.returncode != 0:
            raise subprocess.CalledProcessError(cp.returncode, list(cmd), cp.stdout, cp.stderr)
        return cp

    def _log_exec(self, host: str, cmd: Sequence[str], rc: int | None, out: str, err: str) -> None:
        if self._logdir is None or self._closed:
            return
        text = f"$ {' '.join(cmd)}  -> {'timeout' if rc is None else f'exit {rc}'}\n"
        body = (out + err)[-_EXEC_LOG_LIMIT:]
        with open(self._logdir / f"{host}.exec.log", "a") as f:
            f.write(text + body + ("" if body.endswith("\n") or not body else "\n"))

    def spawn(self, host: str, cmd: Sequence[str], *, name: str | None = None,
              env: Mapping[str, str] | None = None) -> LabProcess:
        """Start a long-lived process in ``host``'s namespace; stopped at teardown."""
        if self._closed or self._logdir is None:
            raise LabError("lab is not running")
        ns = self.netns(host)
        pname = name or Path(cmd[0]).name
        n = sum(1 for p in self._procs if p.host == host and p.name == pname)
        log_path = self._logdir / f"{host}.{pname}{'' if n == 0 else f'.{n}'}.log"
        with open(log_path, "wb") as logf:
            popen = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=subprocess.STDOUT, env=self._env(env),
                                     start_new_session=True)
        proc = LabProcess(host, pname, cmd, popen, log_path)
        self._procs.append(proc)
        return proc

    def processes(self, host: str | None = None) -> list[LabProcess]:
        return [p for p in self._procs if host is None or p.host == host]

    def logs(self) -> dict[str, str]:
        """Every node's process and exec output, keyed by node name."""
        if self._final_logs is not None and self._closed:
            return dict(self._final_logs)
        out: dict[str, str] = {}
        if self._logdir is None or not self._logdir.exists():
            return out
        for path in sorted(self._logdir.glob("*.log")):
            node = path.name.split(".", 1)[0]
            label = path.name[len(node) + 1 : -len(".log")]
            text = path.read_text(errors="replace")
            out[node] = out.get(node, "") + f"----- {label} -----\n{text}"
        return out

    def python(self, host: str, module_args: Sequence[str], *, timeout: float = 30,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``python -m relaymesh.lab.probe ARGS`` (probe helpers) in ``host``'s namespace."""
        return self.exec(host, [sys.executable, "-m", "relaymesh.lab.probe", *module_args],
                         timeout=timeout, check=check)

    def start_stun(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """Start (once) the lab STUN responder on the internet router's two addresses."""
        if self._stun is None or not self._stun.alive:
            self._stun = self.spawn(INET, [sys.executable, "-m", "relaymesh.lab.probe",
                                           "stun-server", *STUN_ADDRS, "--port", str(STUN_PORT)],
                                    name="stun")
            _wait_for_line(self._stun, "ready", 10)
        return (STUN_ADDRS[0], STUN_PORT), (STUN_ADDRS[1], STUN_PORT)

    def nat_check(self, host: str, *, local_port: int = 0) -> NatObservation:
        """Probe, from ``host``, the lab STUN responders (started on demand); see natcheck."""
        s1, s2 = self.start_stun()
        cp = self.python(host, ["nat-probe", s1[0], s2[0], "--port", str(s1[1]),
                                "--local-port", str(local_port)], timeout=30)
        return NatObservation.from_json(cp.stdout.strip().splitlines()[-1])

    # -- build ----------------------------------------------------------------------------------
    def _add_ns(self, name: str) -> str:
        ns = self.prefix + name
        self._created.append(ns)
        ip(None, "netns", "add", ns)
        inode = netns_inode(ns)
        if inode is not None:
            self._inodes.add(inode)
        ip(ns, "link", "set", "lo", "up")
        # No DAD on lab links: addresses usable at once, no 1-2 s tentative phase.
        sysctl(ns, net__ipv6__conf__default__accept_dad=0, net__ipv6__conf__all__accept_dad=0)
        return ns

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        # Created directly inside both namespaces: nothing ever appears in the root namespace.
        ip(None, "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
           "netns", ns_b)
        ip(ns_a, "link", "set", if_a, "up")
        ip(ns_b, "link", "set", if_b, "up")

    def _build(self) -> None:
        topo = self.topology
        inet = self._add_ns(INET)
        sysctl(inet, net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
        for a in STUN_ADDRS:
            ip(inet, "addr", "add", f"{a}/32", "dev", "lo")
        self.nodes[INET] = NodeInfo(INET, inet, "inet", None, None, None, None, None)

        link = 0
        for n_idx, net in enumerate(topo.networks.values(), start=1):
            link += 1
            rns = self._add_ns(net.name)
            sysctl(rns, net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
            self._veth(inet, f"l-{net.name}", rns, natmod.WAN_IF)
            wan4 = INET_V4.format(i=link, h=2)
            wan6 = INET_V6.format(i=link, h=2)
            ip(inet, "addr", "add", INET_V4.format(i=link, h=1) + "/24", "dev", f"l-{net.name}")
            ip(inet, "addr", "add", INET_V6.format(i=link, h=1) + "/64", "dev", f"l-{net.name}",
               "nodad")
            ip(rns, "addr", "add", wan4 + "/24", "dev", natmod.WAN_IF)
            ip(rns, "addr", "add", wan6 + "/64", "dev", natmod.WAN_IF, "nodad")
            ip(rns, "route", "add", "default", "via", INET_V4.format(i=link, h=1))
            ip(rns, "-6", "route", "add", "default", "via", INET_V6.format(i=link, h=1))
            routed = net.nat in natmod.ROUTED_KINDS
            lan4 = LAN_ROUTED_V4 if routed else LAN_NAT_V4
            ip(rns, "link", "add", "br0", "type", "bridge")
            ip(rns, "link", "set", "br0", "up")
            ip(rns, "addr", "add", lan4.format(n=n_idx, h=1) + "/24", "dev", "br0")
            ip(rns, "addr", "add", LAN_V6.format(n=n_idx, h=1) + "/64", "dev", "br0", "nodad")
            ip(inet, "-6", "route", "add", LAN_V6.format(n=n_idx, h=0) + "/64", "via", wan6)
            if routed:
                ip(inet, "route", "add", lan4.format(n=n_idx, h=0) + "/24", "via", wan4)
            cfg = natmod.NatConfig(net.nat)
            self.nodes[net.name] = NodeInfo(net.name, rns, "router", lan4.format(n=n_idx, h=1),
                                            LAN_V6.format(n=n_idx, h=1), wan4, None, net.nat)
            for k, host in enumerate(topo.hosts_on(net.name)):
                h = 10 + k
                hns = self._add_ns(host.name)
                self._veth(hns, "eth0", rns, f"h-{host.name}")
                ip(rns, "link", "set", f"h-{host.name}", "master", "br0")
                a4, a6 = lan4.format(n=n_idx, h=h), LAN_V6.format(n=n_idx, h=h)
                ip(hns, "addr", "add", a4 + "/24", "dev", "eth0")
                ip(hns, "addr", "add", a6 + "/64", "dev", "eth0", "nodad")
                ip(hns, "route", "add", "default", "via", lan4.format(n=n_idx, h=1))
                ip(hns, "-6", "route", "add", "default", "via", LAN_V6.format(n=n_idx, h=1))
                if net.nat == "one2one":
                    pub = INET_V4.format(i=link, h=h)
                    ip(rns, "addr", "add", pub + "/24", "dev", natmod.WAN_IF)
                    cfg.one2one[a4] = pub
                elif routed:
                    pub = a4
                else:
                    pub = wan4
                self.nodes[host.name] = NodeInfo(host.name, hns, "host", a4, a6, pub, net.name,
                                                 net.nat)
            for fwd in net.forwards:
                addr = self.nodes[fwd.host].address
                assert addr is not None
                cfg.forwards.append((addr, fwd.port))
            rules = natmod.ruleset(cfg)
            if rules:
                ns_exec(rns, "nft", "-f", "-", input=rules)

        for host in topo.hosts_on(None):
            link += 1
            hns = self._add_ns(host.name)
            self._veth(hns, "eth0", inet, f"l-{host.name}")
            a4, a6 = INET_V4.format(i=link, h=2), INET_V6.format(i=link, h=2)
            ip(inet, "addr", "add", INET_V4.format(i=link, h=1) + "/24", "dev", f"l-{host.name}")
            ip(inet, "addr", "add", INET_V6.format(i=link, h=1) + "/64", "dev", f"l-{host.name}",
               "nodad")
            ip(hns, "addr", "add", a4 + "/24", "dev", "eth0")
            ip(hns, "addr", "add", a6 + "/64", "dev", "eth0", "nodad")
            ip(hns, "route", "add", "default", "via", INET_V4.format(i=link, h=1))
            ip(hns, "-6", "route", "add", "default", "via", INET_V6.format(i=link, h=1))
            self.nodes[host.name] = NodeInfo(host.name, hns, "host", a4, a6, a4, None, None)

        for hname, imp in topo.impairments.items():
            if not imp.is_null:
                self._impair(hname, imp)

    def _impair(self, host: str, imp: Impairment) -> None:
        """Impair ``host``'s uplink egress (what ``tc netem`` on eth0 would do).

        This kernel has no sch_netem, so delay, jitter and loss come from a userspace shaper:
        locally originated packets are policy-routed into TUN ``rmsh0``; the shaper delays or drops
        them and writes them into TUN ``rmsh1``, from where they are forwarded out of eth0. Rate is
        a kernel tbf on eth0.
        """
        ns = self.netns(host)
        if imp.rate_mbit is not None:
            rate_bytes = imp.rate_mbit * 1e6 / 8
            burst = max(16_000, int(rate_bytes / 100))  # 10 ms worth, at least a few MTUs
            ip_cmd = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                      "rate", f"{imp.rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]
            ns_exec(ns, *ip_cmd)
        if not imp.needs_shaper:
            return
        for dev in (SHAPER_IN, SHAPER_OUT):
            ip(ns, "tuntap", "add", "dev", dev, "mode", "tun")
            # A deep queue: a shaper delayed by a busy CPU must not turn into extra loss.
            ip(ns, "link", "set", dev, "txqueuelen", "10000", "up")
        sysctl(ns, net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1,
               net__ipv4__conf__all__rp_filter=0,
               **{f"net__ipv4__conf__{SHAPER_OUT}__rp_filter": 0,
                  f"net__ipv4__conf__{SHAPER_OUT}__accept_local": 1})
        proc = self.spawn(host, [sys.executable, "-m", "relaymesh.lab.shaper",
                                 "--in", SHAPER_IN, "--out", SHAPER_OUT,
                                 "--delay-ms", str(imp.delay_ms), "--jitter-ms", str(imp.jitter_ms),
                                 "--loss-pct", str(imp.loss_pct)], name="shaper")
        _wait_for_line(proc, "ready", 10)
        for fam in ("-4", "-6"):
            ip(ns, fam, "route", "add", "default", "dev", SHAPER_IN, "table", SHAPER_TABLE)
            ip(ns, fam, "rule", "add", "fwmark", SHAPER_MARK, "lookup", SHAPER_TABLE, "pref", "100")
        # Only packets the host itself sends out of eth0 are shaped: the output route chain marks
        # them, which makes the kernel route them again, now by the fwmark rule into rmsh0. Traffic
        # routed elsewhere (a WireGuard TUN, loopback) is untouched, so a tunnel's inner packets
        # are not impaired twice. The shaper's re-injected packets carry no mark (a TUN write is a
        # new packet) and are forwarded by the main table out of eth0.
        ns_exec(ns, "nft", "-f", "-", input=(
            "table inet rmshaper {\n"
            "  chain out {\n"
            "    type route hook output priority mangle; policy accept;\n"
            # Link-local and multicast stay on eth0 (neighbour discovery must not be delayed).
            f'    oifname "eth0" ip daddr != 224.0.0.0/3 meta mark set {SHAPER_MARK}\n'
            '    oifname "eth0" ip6 daddr != { fe80::/10, ff00::/8 }'
            f" meta mark set {SHAPER_MARK}\n"
            "  }\n"
            "}\n"))

    # -- state for the CLI ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "name": self.topology.name,
            "pid": os.getpid(),
            "created": time.time(),
            "topology": self.topology.to_dict(),
            "nodes": {k: asdict(v) for k, v in self.nodes.items()},
        }

    def _write_state(self) -> None:
        if self._state_dir is None:
            return
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._state_dir / f".{self.run_id}.tmp"
            tmp.write_text(json.dumps(self.state(), indent=1))
            tmp.replace(self._state_dir / f"{self.run_id}.json")
        except OSError as e:
            raise LabError(f"cannot write lab state in {self._state_dir}: {e.strerror}") from None


def _wait_for_line(proc: LabProcess, token: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if token in proc.output():
            return
        if not proc.alive:
            if token in proc.output():
                return
            tail = proc.output().strip()[-300:]
            raise LabError(f"{proc.name} in {proc.host} exited before printing {token!r}: {tail}")
        time.sleep(0.02)
    raise LabError(f"{proc.name} in {proc.host}: no {token!r} in its output after {timeout}s")


def is_public_v4(addr: str) -> bool:
    """True for the lab's 'public' space (198.18.0.0/15), as seen by the internet router."""
    return ipaddress.ip_address(addr) in ipaddress.ip_network("198.18.0.0/15")
