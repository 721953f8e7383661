"""`optserve serve` starts the service; `optserve demo` runs the reference training loop against one."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app.settings import Settings


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "store": args.store}.items() if v}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


def demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo

    return run_demo(url=args.url, steps=args.steps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", help="bind address (OPTSERVE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (OPTSERVE_PORT, default 8000)")
    p.add_argument("--store", help="memory://, sqlite:///path.db or redis://host:port/db (OPTSERVE_STORE)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(run=serve)
    d = commands.add_parser("demo", help="run the reference training loop against a server")
    d.add_argument("--url", help="an optserve server; default: start one on a temporary SQLite store")
    d.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    d.set_defaults(run=demo)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
