"""The ``wshub`` command: ``serve``, ``bench``, ``client``, ``publish``, ``token``.

``main(argv)`` returns the exit status instead of exiting, so tests can call it.
"""

from __future__ import annotations

import signal
import sys

# SIGHUP never ends the server (decisions.md 19), not even while it starts: the
# imports before serve() installs its reload handler take half a second on a
# loaded machine, and SIGHUP's default action is to exit. Ignored from here, the
# first line of both `wshub serve` and `python -m wshub serve` that is ours;
# other commands keep the default (a closed terminal still ends `wshub client`).
# The imports below come after it on purpose.
if sys.argv[1:2] == ["serve"]:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import argparse
import os
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
        "token": "mint an HS256 connect token for trying --auth out",
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
        # Called as a function (not as the command): before the slow imports below.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            config = build_config(rest, os.environ)
        except ConfigError as exc:
            print(f"wshub serve: {exc}", file=sys.stderr)
            return 2
        if config.auth != "off":
            from .auth import TokenVerifier

            try:  # the key file read and checked before anything listens
                TokenVerifier.from_config(config)
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

    if command == "token":
        return _token_main(rest, os.environ)
    print(f"wshub: unknown command {command!r} (try wshub --help)", file=sys.stderr)
    return 2


def _token_main(argv: list[str], environ: Mapping[str, str]) -> int:
    """``wshub token``: print an HS256 token, for trying ``--auth`` out (not for production:
    a real backend mints its own, docs/auth.md)."""
    parser = argparse.ArgumentParser(
        prog="wshub token",
        description="Print an HS256 connect token signed with the server's --auth-secret.",
    )
    parser.add_argument(
        "--secret",
        default=environ.get("WSHUB_AUTH_SECRET", ""),
        help="the server's --auth-secret [default: env WSHUB_AUTH_SECRET]",
    )
    parser.add_argument("--sub", required=True, help="the user id (1-128 characters)")
    parser.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires [3600]")
    parser.add_argument(
        "--rooms",
        help="comma-separated rooms it opens, * patterns allowed; an empty item is the "
        "default room (--rooms ,lobby) [default: every room]",
    )
    parser.add_argument("--aud", default="", help="audience claim (the server's --auth-audience)")
    parser.add_argument("--iss", default="", help="issuer claim (the server's --auth-issuer)")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("--secret is required (or WSHUB_AUTH_SECRET)")
    if not 0 < len(args.sub) <= 128:
        parser.error("--sub must be 1 to 128 characters")
    if not 1 <= args.ttl < 1e9:  # also refuses nan
        parser.error("--ttl must be a positive number of seconds (1 or more)")
    import time

    from .auth import mint_token

    rooms = None if args.rooms is None else [room.strip() for room in args.rooms.split(",")]
    print(
        mint_token(
            args.secret,
            args.sub,
            time.time(),
            args.ttl,
            rooms=rooms,
            audience=args.aud,
            issuer=args.iss,
        )
    )
    return 0
