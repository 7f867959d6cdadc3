"""The `dicom-node` command: serve, check-config, explain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.config import Config, ConfigError, load_config


def _load_or_report(path: str | None) -> Config | None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); nothing was started", file=sys.stderr)
        return None
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config


def _serve(args: argparse.Namespace) -> int:
    from node.deliver.queue import QueueVersionError
    from node.ops.service import Service

    config = _load_or_report(args.config)
    if config is None:
        return 2
    try:
        return Service(config, args.config).run()
    except QueueVersionError as exc:  # a spool written by a newer dicom-node: touch nothing
        print(f"{exc}; nothing was started", file=sys.stderr)
        return 2


def _check_config(args: argparse.Namespace) -> int:
    from node.ops.explain import config_summary

    config = _load_or_report(args.path)
    if config is None:
        return 2
    print(config_summary(config))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from node.ops.explain import explain_file
    from node.route import Arrival

    config = _load_or_report(args.config)
    if config is None:
        return 2
    arrival = None
    if args.calling_aet is not None or args.called_aet is not None:
        arrival = Arrival(args.calling_aet or "", args.called_aet or config.node.ae_title)
    for path in args.files:
        print(explain_file(config, Path(path), arrival))
    return 0


def _drain(args: argparse.Namespace) -> int:
    """Signal the node that serves this config's spool: SIGUSR1 drains, SIGUSR2 (--undo)
    stops draining. It answers at once (its /healthz); the signal is all there is to it."""
    import os
    import signal

    from node.ops.service import PID_FILE

    config = _load_or_report(args.config)
    if config is None:
        return 2
    pid_file = config.node.spool / PID_FILE
    try:
        pid = int(pid_file.read_text().split()[0])
        # a stale pid file must not signal whatever process has that number now (SIGUSR1
        # ends most programs): it must be a node serving
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"serve" not in command:
            raise OSError(f"process {pid} is not a dicom-node serve")
        os.kill(pid, signal.SIGUSR2 if args.undo else signal.SIGUSR1)
    except (OSError, ValueError, IndexError) as exc:
        print(f"no running node found for {config.node.spool} ({pid_file}: {exc})",
              file=sys.stderr)  # fmt: skip
        return 1
    what = "stops draining" if args.undo else "drains: /healthz answers 503 draining"
    print(f"node {config.node.name} (pid {pid}) {what}")
    return 0


def _queue(args: argparse.Namespace) -> int:
    from node.deliver.queue import QUEUE_FILE, DeliveryQueue

    config = _load_or_report(args.config)
    if config is None:
        return 2
    path = config.node.spool / QUEUE_FILE
    if args.action == "retry":
        if args.destination not in config.destinations:
            known = ", ".join(config.destinations)
            print(f"unknown destination {args.destination!r} (known: {known})", file=sys.stderr)
            return 2
        queue = DeliveryQueue(path)  # safe beside a running node: SQLite serialises writers
        count = queue.retry_dead(args.destination)
        queue.close()
        print(f"{count} dead-lettered instance(s) queued again for {args.destination}")
        return 0
    if not path.exists():
        print(f"no queue yet at {path} (the node has not run with this spool)")
        return 0
    queue = DeliveryQueue(path, readonly=True)
    rows = queue.stats(list(config.destinations))
    queue.close()
    print(f"{'destination':<20} {'pending':>8} {'oldest':>10} {'retries':>8} {'dead':>6}"
          f" {'awaiting-commitment':>19}  last error")  # fmt: skip
    for s in rows:
        age = "-" if s.oldest_age is None else _age(s.oldest_age)
        print(f"{s.destination:<20} {s.pending:>8} {age:>10} {s.retries:>8} {s.dead:>6}"
              f" {s.awaiting:>19}  {s.last_error or ''}")  # fmt: skip
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dicom-node", description="DICOM node: receive, route, recompress, archive/forward"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the Storage SCP until SIGTERM/SIGINT")
    p.add_argument("-c", "--config", help="config file (default: config/node.yaml, "
                   "else the embedded default)")  # fmt: skip
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one object per line, for log shippers")  # fmt: skip
    p.set_defaults(func=_serve)

    p = sub.add_parser("check-config", help="validate a config file and summarise it")
    p.add_argument("path", nargs="?", default=None)
    p.set_defaults(func=_check_config)

    p = sub.add_parser("explain", help="dry run: what the node would do with these files")
    p.add_argument("-c", "--config")
    p.add_argument("--calling-aet", help="pretend the files came from this AE title")
    p.add_argument("--called-aet", help="pretend they were sent to this AE title")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_explain)

    p = sub.add_parser("drain", help="take the running node out of a balancer's rotation "
                       "(/healthz 503 draining) while it finishes its work")  # fmt: skip
    p.add_argument("-c", "--config")
    p.add_argument("--undo", action="store_true", help="back in rotation")
    p.set_defaults(func=_drain)

    p = sub.add_parser("queue", help="delivery queues per destination; 'retry DEST' re-queues "
                       "its dead letters (works while the node runs)")  # fmt: skip
    p.add_argument("-c", "--config")
    p.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    p.add_argument("destination", nargs="?")
    p.set_defaults(func=_queue)

    args = parser.parse_args(argv)
    if getattr(args, "action", None) == "retry" and not args.destination:
        parser.error("queue retry needs a destination name")
    from node.ops.observe import configure_logging

    configure_logging(args.verbose, getattr(args, "log_format", "text"))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
