"""``relaymesh lab``: build, inspect and tear down network-namespace labs.

State of labs started with ``up`` lives in /run/relaymesh-lab/<run>.json (RELAYMESH_LAB_STATE
overrides) so that ``exec``, ``nat-check`` and ``down`` in other shells can find them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from relaymesh.lab import Lab, LabError, TopologyError
from relaymesh.lab.lab import STUN_ADDRS, STUN_PORT, default_state_dir
from relaymesh.lab.natcheck import EXPECTED, NatObservation, classify
from relaymesh.lab.netns import cleanup_all, cleanup_run, pid_alive, run_namespaces
from relaymesh.lab.topologies import load


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


def _states() -> list[dict[str, Any]]:
    d = default_state_dir()
    out: list[dict[str, Any]] = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            st = json.loads(p.read_text())
            st["_path"] = str(p)
            out.append(st)
    return out


def _find_node(host: str, run: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    labs = [s for s in _states() if (run is None or s["run"] == run) and host in s["nodes"]]
    if not labs:
        where = f"lab {run}" if run else "any running lab"
        raise click.ClickException(f"no host {host!r} in {where} (see `relaymesh lab list`)")
    if len(labs) > 1:
        runs = ", ".join(s["run"] for s in labs)
        raise click.ClickException(f"host {host!r} is in several labs ({runs}): pass --run")
    return labs[0], labs[0]["nodes"][host]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@click.group("lab")
def command() -> None:
    """Network labs: hosts in namespaces behind real NATs (needs root)."""


@command.command("up")
@click.argument("topology")
@click.option("--run-id", help="Use this run id (3-8 lowercase letters/digits).")
def up(topology: str, run_id: str | None) -> None:
    """Build TOPOLOGY (a TOML file or a built-in name) and keep it up until Ctrl-C or `down`.

    Built-ins: pair, nat_pair, nat_pair:KIND_A,KIND_B, relay.
    """
    try:
        topo = load(topology)
        lab = Lab(topo, run_id=run_id)
        lab.start()
    except (LabError, TopologyError) as e:
        raise _fail(e) from None
    try:
        click.echo(f"lab {lab.run_id} ({topo.name}) is up")
        click.echo(f"{'name':<12} {'role':<7} {'nat':<12} {'address':<16} {'public':<16} address6")
        for n in lab.nodes.values():
            click.echo(f"{n.name:<12} {n.role:<7} {n.nat or '-':<12} {n.address or '-':<16} "
                       f"{n.public_address or '-':<16} {n.address6 or '-'}")
        click.echo(f"stop with Ctrl-C or `relaymesh lab down {lab.run_id}`", nl=True)
        sys.stdout.flush()
        while True:
            signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        lab.close()
    click.echo(f"lab {lab.run_id} is down")


@command.command("list")
def list_() -> None:
    """Show labs started with `up` that are still recorded."""
    states = _states()
    if not states:
        click.echo("no labs running")
    for s in states:
        alive = "up" if pid_alive(int(s["pid"])) else "stale"
        hosts = ", ".join(k for k, v in s["nodes"].items() if v["role"] == "host")
        click.echo(f"{s['run']}  {s['name']:<12} {alive:<6} pid {s['pid']:<8} hosts: {hosts}")


def _down_one(s: dict[str, Any]) -> None:
    run, pid = s["run"], int(s["pid"])
    if pid_alive(pid) and pid != os.getpid():
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    errors = cleanup_run(run)  # anything the owner could not remove (or a dead owner's leftovers)
    with contextlib.suppress(OSError):
        Path(s["_path"]).unlink()
    for e in errors:
        click.echo(f"warning: {e}", err=True)
    click.echo(f"lab {run} down")


@command.command("down")
@click.argument("run", required=False)
@click.option("--all", "all_", is_flag=True,
              help="Also remove every rm-* namespace of any run, recorded or not.")
def down(run: str | None, all_: bool) -> None:
    """Stop lab RUN (default: every recorded lab); --all also removes every rm-* leftover."""
    states = [s for s in _states() if run is None or s["run"] == run]
    if run is not None and not states:
        if run_namespaces(run):
            cleanup_run(run)
            click.echo(f"lab {run}: removed leftover namespaces")
            return
        raise click.ClickException(f"no lab {run!r} is running")
    for s in states:
        _down_one(s)
    if all_:
        errors = cleanup_all()
        for e in errors:
            click.echo(f"warning: {e}", err=True)
        click.echo("removed every rm-* namespace")
    elif not states:
        click.echo("no labs running")


@command.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--run", help="Run id, when several labs have a host of that name.")
@click.argument("host")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(run: str | None, host: str, cmd: tuple[str, ...]) -> None:
    """Run CMD in HOST's namespace: relaymesh lab exec HOST -- CMD..."""
    _, node = _find_node(host, run)
    try:
        rc = subprocess.call(["ip", "netns", "exec", node["netns"], *cmd], env=_env())
    except FileNotFoundError:
        raise click.ClickException("`ip` not found (install iproute2)") from None
    sys.exit(rc)


@command.command("nat-check")
@click.option("--run", help="Run id, when several labs have a host of that name.")
@click.option("--port", "local_port", default=0, help="Local UDP port to probe from (0: any).")
@click.argument("host")
def nat_check(run: str | None, host: str, local_port: int) -> None:
    """Classify the NAT in front of HOST with two STUN responders on the lab internet."""
    state, node = _find_node(host, run)
    inet = state["nodes"]["inet"]["netns"]
    py = sys.executable
    server = subprocess.Popen(
        ["ip", "netns", "exec", inet, py, "-m", "relaymesh.lab.probe", "stun-server",
         *STUN_ADDRS, "--port", str(STUN_PORT), "--max-seconds", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            err = server.stderr.read().strip().splitlines() if server.stderr else []
            raise click.ClickException(
                f"STUN responder did not start: {err[-1] if err else 'no output'}")
        cp = subprocess.run(
            ["ip", "netns", "exec", node["netns"], py, "-m", "relaymesh.lab.probe", "nat-probe",
             *STUN_ADDRS, "--port", str(STUN_PORT), "--local-port", str(local_port)],
            capture_output=True, text=True, timeout=60, env=_env())
        if cp.returncode != 0:
            lines = cp.stderr.strip().splitlines()
            raise click.ClickException(f"probe failed: {lines[-1] if lines else cp.returncode}")
        obs = NatObservation.from_json(cp.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(5)
    got = classify(obs)
    kinds = [k for k, v in EXPECTED.items() if v.mapping == got.mapping
             and v.filtering == got.filtering]
    click.echo(f"host      {host} ({node['address']}, configured nat: {node['nat'] or 'none'})")
    click.echo(f"local     {obs.local[0]}:{obs.local[1]}")
    for label, m in (("mapped1", obs.mapped1), ("mapped2", obs.mapped2)):
        click.echo(f"{label:<9} {'-' if m is None else f'{m[0]}:{m[1]}'}")
    click.echo(f"behaviour {got}")
    click.echo(f"looks like {', '.join(kinds) if kinds else 'no lab kind'}")


GRID_KINDS = "none,firewall,easy,hard,one2one,udp-blocked"  # relaymesh.lab.grid.NAT_KINDS


@command.command("grid")
@click.option("--kinds", default=GRID_KINDS, show_default=True,
              help="Comma-separated NAT kinds; every unordered pair is run.")
@click.option("--out", "out_dir", default="docs", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where nat-grid.md and nat-grid.html are written.")
def grid(kinds: str, out_dir: Path) -> None:
    """Run relaymesh nodes behind every pair of NAT kinds; write the path each pair reached."""
    import tempfile

    from relaymesh.lab.grid import run_grid, write_reports

    ks = [k.strip() for k in kinds.split(",") if k.strip()]
    with tempfile.TemporaryDirectory(prefix="rm-grid-") as tmp:
        try:
            results = run_grid(ks, root=Path(tmp), log=click.echo)
        except Exception as e:
            raise _fail(e) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = "relaymesh lab grid" + ("" if kinds == GRID_KINDS else f" --kinds {kinds}")
    write_reports(results, out_dir / "nat-grid.md", out_dir / "nat-grid.html", cmd)
    click.echo(f"wrote {out_dir / 'nat-grid.md'} and {out_dir / 'nat-grid.html'}")
    if any(not r.echo_ok for r in results):
        raise click.ClickException("some pairs could not reach each other (see the grid)")
