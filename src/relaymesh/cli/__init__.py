"""The ``relaymesh`` command. One module per subcommand; each registers itself on ``main``.

Errors raised as :class:`click.ClickException` (or ``UsageError``) print one line and exit non-zero;
anything else is caught in :func:`main` so a user never sees a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

# Subcommand modules; each defines ``command`` (a click.Command or Group) to attach.
SUBCOMMANDS = [
    "relaymesh.cli.wg",
    "relaymesh.cli.lab",
    "relaymesh.cli.control",
    "relaymesh.cli.daemon",
    "relaymesh.cli.up",
    "relaymesh.cli.down",
    "relaymesh.cli.status",
    "relaymesh.cli.ip",
    "relaymesh.cli.ping",
    "relaymesh.cli.set",
    "relaymesh.cli.get",
    "relaymesh.cli.netcheck",
    "relaymesh.cli.derp",
    "relaymesh.cli.debug",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="relaymesh")
def cli() -> None:
    """relaymesh: a mesh VPN on WireGuard with peer relays."""


def _register() -> None:
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # not written yet
            raise
        cli.add_command(mod.command)


_register()


def main() -> None:
    try:
        cli.main(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # last line of defence: one clear line, never a traceback
        click.echo(f"relaymesh: error: {e}", err=True)
        sys.exit(1)
