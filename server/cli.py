"""The `engrain` command line. Heavy imports (torch) happen only inside the commands that need them."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from train_worker.settings import Settings


def _configure_logging(level: str) -> None:
    # stderr only: in stdio mode stdout carries the MCP protocol.
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from server.app import create_server

    if not args.http:
        create_server(settings).run()
        return 0
    from mcp.server.transport_security import TransportSecuritySettings

    from server.http_auth import StaticTokenVerifier, auth_settings, load_or_create_token

    token, path = load_or_create_token(settings)
    base_url = f"http://{args.address}:{args.port}"
    where = f"in {path}" if path else "from ENGRAIN_TOKEN"
    logging.getLogger("engrain").warning("MCP over HTTP at %s/mcp; bearer token %s", base_url, where)
    mcp = create_server(settings, token_verifier=StaticTokenVerifier(token), auth=auth_settings(base_url))
    security = None
    if args.allowed_host:
        security = TransportSecuritySettings(allowed_hosts=args.allowed_host)
    mcp.run("streamable-http", host=args.address, port=args.port, transport_security=security)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engrain", description="Teach a local language model continuously.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    serve.add_argument("--http", action="store_true", help="serve streamable HTTP at /mcp with bearer-token auth")
    serve.add_argument("--address", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8764, help="HTTP port (default 8764)")
    serve.add_argument(
        "--allowed-host", action="append", help="extra Host header to accept (repeatable), e.g. engrain.lan:8764"
    )
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's message names the bad setting
        print(f"engrain: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    return int(args.func(args, settings))


if __name__ == "__main__":
    sys.exit(main())
