"""The `engrain` command line. Heavy imports (torch) happen only inside the commands that need them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from train_worker.locks import LockFileError
from train_worker.settings import HomeError, Settings


def _configure_logging(level: str) -> None:
    # stderr only: in stdio mode stdout carries the MCP protocol.
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from server.app import create_server

    settings.layout.ensure()  # a home that cannot be used is refused here, with its reason

    if not args.http:
        create_server(settings).run()
        return 0
    from server.http_app import mcp_and_dashboard, serve

    port = args.port or settings.mcp_port
    app = mcp_and_dashboard(settings, args.address, port, tuple(args.allowed_host or ()))
    return serve(app, args.address, port, settings.log_level)


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from server.http_app import DASHBOARD_PORT, dashboard_only, serve

    port = args.port or DASHBOARD_PORT
    return serve(
        dashboard_only(settings, args.address, port, tuple(args.allowed_host or ())), args.address, port, "warning"
    )


def _terminal(fn: Callable[[], int]) -> int:
    from store.errors import StoreError

    try:
        return fn()
    except (StoreError, ValueError) as exc:
        print(f"engrain: {exc}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from server import terminal

    return _terminal(lambda: terminal.status(settings, args.watch, args.interval))


def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    from server import terminal

    return _terminal(lambda: terminal.runs(settings, args.kernel, args.limit, args.watch, args.interval))


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from server import terminal

    return _terminal(lambda: terminal.show(settings, args.run_id, args.watch, args.interval))


def cmd_estop(args: argparse.Namespace, settings: Settings) -> int:
    from server import actions

    layout = settings.layout
    if args.state == "on":
        actions.estop_on(layout, via="cli")
        print(f"e-stop on ({layout.estop}): no new run starts, manual or automatic")
    elif args.state == "off":
        actions.estop_off(layout, via="cli")
        print("e-stop off: training may start again")
    else:
        print(f"e-stop {'on' if layout.estop.exists() else 'off'} ({layout.estop})")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from train_worker.worker import Worker, restore_host_after_crash

    if args.restore_host:
        return 0 if restore_host_after_crash(settings) else 1
    worker = Worker(settings)
    code = worker.run()
    if worker.stopping():
        # Asked to stop, and everything it owes is on disk (written atomically, fsynced): skip the
        # interpreter's teardown of torch, which takes seconds on a busy machine, so the stop lands at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from train_worker.watch import Watcher

    return Watcher(settings).run()


def cmd_host(args: argparse.Namespace, settings: Settings) -> int:
    from host.serve import serve

    return serve(settings)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Host and watcher in the foreground; Ctrl-C stops both."""
    import signal
    import subprocess

    children = [subprocess.Popen([sys.executable, "-m", "server.cli", name]) for name in ("host", "watch")]
    log = logging.getLogger("engrain")
    log.warning("engrain up: model host and training watcher running; Ctrl-C stops both")

    def stop(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [child.wait() for child in children]
    return 0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 1


def cmd_systemd(args: argparse.Namespace, settings: Settings) -> int:
    from server.systemd_units import install

    return install(settings, user=not args.system, dry_run=args.dry_run, target=args.dir, enable=args.enable)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from server.demo import main

    return main(args.home, args.keep_running)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engrain", description="Teach a local language model continuously.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    serve.add_argument("--http", action="store_true", help="serve streamable HTTP at /mcp with bearer-token auth")
    serve.add_argument("--address", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default ENGRAIN_MCP_PORT, 8764)")
    serve.add_argument(
        "--allowed-host",
        action="append",
        help="another Host header to accept besides the loopback names (repeatable), e.g. engrain.lan:8764",
    )
    serve.set_defaults(func=cmd_serve)

    dashboard = sub.add_parser(
        "dashboard", help="serve the web dashboard alone (serve --http also serves it, at /dashboard/)"
    )
    dashboard.add_argument("--address", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=None, help="port (default 8766)")
    dashboard.add_argument("--allowed-host", action="append", help="extra Host header to accept (repeatable)")
    dashboard.set_defaults(func=cmd_dashboard)

    for name, what in (
        ("status", "every kernel: status, versions, counts, runs, auto-training outlook"),
        ("runs", "recent training runs"),
        ("show", "one run: progress, curves, gates"),
    ):
        view = sub.add_parser(name, help=what)
        if name == "show":
            view.add_argument("run_id", help="a run id, e.g. r-20261123T201500-a1b2c3")
        if name == "runs":
            view.add_argument("--kernel", help="only this kernel's runs")
            view.add_argument("--limit", type=int, default=20, help="how many (default 20)")
        view.add_argument("--watch", action="store_true", help="keep it up to date (Ctrl-C stops)")
        view.add_argument("--interval", type=float, default=1.0, help="seconds between updates with --watch")
        view.set_defaults(func={"status": cmd_status, "runs": cmd_runs, "show": cmd_show}[name])

    estop = sub.add_parser("estop", help="stop every new run (on), allow them again (off), or say which")
    estop.add_argument("state", nargs="?", choices=["on", "off", "status"], default="status")
    estop.set_defaults(func=cmd_estop)

    worker = sub.add_parser("worker", help="train every waiting request, then exit (what systemd runs)")
    worker.add_argument(
        "--restore-host", action="store_true", help="only bring the model host back after a killed worker"
    )
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("watch", help="start a worker whenever a request waits (systemd's path unit, without systemd)")
    sub.choices["watch"].set_defaults(func=cmd_watch)
    sub.add_parser("host", help="run the model host (OpenAI-compatible HTTP on loopback)")
    sub.choices["host"].set_defaults(func=cmd_host)
    sub.add_parser("up", help="run the model host and the watcher in the foreground; Ctrl-C stops both")
    sub.choices["up"].set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="teach the embedded model new facts end to end and show before/after")
    demo.add_argument("--home", type=Path, default=Path(".engrain-demo"), help="demo home (default ./.engrain-demo)")
    demo.add_argument("--keep-running", action="store_true", help="leave the host and watcher running afterwards")
    demo.set_defaults(func=cmd_demo)

    systemd = sub.add_parser("systemd", help="systemd units")
    systemd_sub = systemd.add_subparsers(dest="systemd_command", required=True)
    install = systemd_sub.add_parser("install", help="render the units with this install's paths and install them")
    scope = install.add_mutually_exclusive_group()
    scope.add_argument("--user", action="store_true", default=True, help="user units (default)")
    scope.add_argument("--system", action="store_true", help="system units in /etc/systemd/system")
    install.add_argument("--dry-run", action="store_true", help="print the rendered units, write nothing")
    install.add_argument("--dir", type=Path, default=None, help="write the units here instead")
    install.add_argument("--enable", action="store_true", help="also daemon-reload and enable --now them")
    install.set_defaults(func=cmd_systemd)
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
    # Every file engrain creates is private, whatever umask the caller had (systemd, a shell, an MCP client).
    os.umask(0o077)
    try:
        return int(args.func(args, settings))
    except (HomeError, LockFileError) as exc:
        print(f"engrain: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
