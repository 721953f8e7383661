"""`optserve serve` starts the service; `optserve demo` runs the reference training loop against one."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app.settings import Settings

# uvicorn pauses reading whenever 64 KiB of request body wait for the app, so a 40 MB gradient costs
# hundreds of pause/resume round trips through the event loop; 4 MiB keeps the per-connection buffer
# bounded at a tenth of the trips (python -m bench: the 1e7-parameter step).
BODY_HIGH_WATER = 4 << 20


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for protocol in (httptools_impl, h11_impl):
        protocol.HIGH_WATER_LIMIT = BODY_HIGH_WATER  # type: ignore[attr-defined]

    from app.main import create_app

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "store": args.store}.items() if v}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if settings.ui:
        shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        print(f"optserve: the dashboard is at http://{shown}:{settings.port}/ui/", flush=True)
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


def demo(argv: Sequence[str]) -> int:
    """Hands every argument to the SDK's reference training loop (`optserve.demo`)."""
    try:
        from optserve.demo import main as demo_main
    except ImportError:
        print("optserve demo needs the SDK: pip install -e 'clients/python[demo]' (make demo does)")
        return 2
    return demo_main(list(argv))


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
    commands.add_parser("demo", help="run the reference training loop (see `optserve demo --help`)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return demo(argv[1:])
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
