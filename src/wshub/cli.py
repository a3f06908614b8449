"""The ``wshub`` command: ``serve``, ``bench``, ``client``, ``publish``.

``main(argv)`` returns the exit status instead of exiting, so tests can call it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from . import __version__
from .config import OPTIONS, Config, ConfigError, load_config, read_toml

__all__ = ["build_config", "main"]


def _serve_parser(prog: str = "wshub serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the hub. Every option can also be set as WSHUB_<NAME> in the "
        "environment or in a TOML file given by --config; a flag wins over the environment, "
        "the environment over the file.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of options "
        "(keys are flag names without the dashes, e.g. heartbeat-interval).",
    )
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.attr,
            metavar=option.metavar or None,
            help=f"{option.help} [env {option.env}]",
        )
    return parser


def build_config(argv: list[str], environ: Mapping[str, str]) -> Config:
    """Parse ``wshub serve`` arguments into a validated :class:`Config`."""
    args = vars(_serve_parser().parse_args(argv))
    config_file = args.pop("config", None) or environ.get("WSHUB_CONFIG")
    file_values = read_toml(config_file) if config_file else None
    return load_config(args, environ, file_values, file_name=config_file or "config file")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": "run the server",
        "bench": "load-test a server of this protocol",
        "client": "talk to a server from the terminal",
        "publish": "publish into a room through the backend API",
    }
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: wshub {{{','.join(commands)}}} [options]\n")
        for name, text in commands.items():
            print(f"  {name:8} {text}")
        print("\n`wshub COMMAND --help` describes each command's options.")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"wshub {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        try:
            config = build_config(rest, os.environ)
        except ConfigError as exc:
            print(f"wshub serve: {exc}", file=sys.stderr)
            return 2
        from .logs import setup_logging
        from .server import run

        setup_logging(config.log_level, config.log_format)
        return run(config, rest)
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if command == "client":
        from .client import main as client_main

        return client_main(rest)
    if command == "publish":
        from .publish import main as publish_main

        return publish_main(rest)
    print(f"wshub: unknown command {command!r} (try wshub --help)", file=sys.stderr)
    return 2
