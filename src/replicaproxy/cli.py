"""The ``replicaproxy`` command line.

Every mistake in flags or config ends in one line naming the flag or key and
exit code 2; nothing the user typed produces a traceback.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import click
import uvloop

from replicaproxy import __version__
from replicaproxy.config import Config, ConfigError, Overrides, build_config, load_config
from replicaproxy.logutil import (
    DroppingQueueHandler,
    LineFormatter,
    LogQueue,
    LogWriter,
    LoopWriter,
    one_line,
)
from replicaproxy.options import Once

EXIT_USAGE = 2

log = logging.getLogger("replicaproxy")


def _error(message: str) -> None:
    """Print ``replicaproxy: error: MESSAGE`` as one line, whatever text the user typed.

    Paths and stray arguments are echoed as given; a control character in them (a
    newline, an escape sequence) is shown escaped so it can neither split the line nor
    reach the terminal.
    """
    click.echo(f"replicaproxy: error: {one_line(message)}", err=True)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    _error(message)
    sys.exit(code)


def _setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr from a thread of its own: the event loop never waits on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    lines: LineFormatter | None = None  # (the text format's, for the access log's lines)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        lines = LineFormatter()
        handler.setFormatter(lines)
    # No format here shows a record's source line, thread or process: not finding them
    # out makes each record cheaper (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    records = LogQueue()
    writer = LogWriter(records, handler)
    root = logging.getLogger()
    queue_handler = DroppingQueueHandler(records)
    queue_handler.lines = lines
    root.handlers[:] = [queue_handler]
    root.setLevel(getattr(logging, level.upper()))
    writer.start()
    atexit.register(writer.stop)  # what is still queued at exit gets written
    global _log_writer, _queue_handler
    _log_writer = writer
    _queue_handler = queue_handler


_log_writer: LogWriter | None = None
_queue_handler: DroppingQueueHandler | None = None


def _exit(code: int) -> NoReturn:
    """Exit with ``code`` once the log is written, or at once if stderr is stuck.

    (A normal exit would then hang: logging's own shutdown flushes stderr.)
    """
    if _log_writer is not None and not _log_writer.stop():
        os._exit(code)
    sys.exit(code)


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    return uvloop.run(_writing_log_from_loop(coro))


async def _writing_log_from_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` with the loop's own log lines written by the loop (LoopWriter)."""
    handler = _queue_handler
    writer = None
    if _log_writer is not None and handler is not None:
        stream = _log_writer.handler
        if isinstance(stream, logging.StreamHandler) and not stream.filters:
            try:
                stream.flush()
                fd = stream.stream.fileno()
            except (OSError, ValueError, AttributeError):
                fd = -1  # (not a file: a test's, say): the writer thread's, then
            formatter = stream.formatter or logging.Formatter()
            if fd >= 0:
                writer = LoopWriter.open(fd, asyncio.get_running_loop(), formatter)
    if writer is None or handler is None:
        return await coro
    handler.loop_writer = writer
    try:
        return await coro
    finally:
        handler.loop_writer = None
        rest = writer.close()
        if rest:
            handler.enqueue(rest.removesuffix("\n"))  # (the thread writes it, with its bound)


LOG_LEVEL = click.option(
    "--log-level",
    cls=Once,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Least severe log level printed (to stderr).",
)
LOG_FORMAT = click.option(
    "--log-format",
    cls=Once,
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines for people (text) or for machines (json, one object per line).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="replicaproxy")
def cli() -> None:
    """A TCP proxy that keeps hot replicas of a stateful server in step.

    Every client byte goes to the primary and to each replica; the client gets
    the primary's reply. Start with `replicaproxy demo`, then `replicaproxy run --help`.
    """


@cli.command()
@click.option("--config", "config_path", cls=Once, metavar="FILE", help="TOML config file.")
@click.option("--listen", cls=Once, metavar="HOST:PORT", help="Address to accept clients on.")
@click.option(
    "--primary", cls=Once, metavar="HOST:PORT", help="The primary backend (replaces the file's)."
)
@click.option(
    "--replica", "replicas", metavar="HOST:PORT", multiple=True, help="Add a replica (repeatable)."
)
@click.option(
    "--shadow", "shadows", metavar="HOST:PORT", multiple=True, help="Add a shadow (repeatable)."
)
@click.option(
    "--mode",
    cls=Once,
    type=click.Choice(["async", "sync"]),
    help="async (the default): the client gets the primary's reply at once, and a "
    "replica's input lags by at most replica_flush (20 ms, a key of the config file) plus "
    "the write; sync: a reply reaches the client once every in-sync replica produced it.",
)
@click.option(
    "--protocol",
    cls=Once,
    type=click.Choice(["bytes", "resp", "http", "postgres", "memcached"]),
    help="Compare replies byte for byte (bytes, the default) or as messages of a protocol "
    "(resp: Redis and its forks; http: HTTP/1.1; postgres; memcached's text protocol), "
    "by its rules.",
)
@click.option(
    "--admin", cls=Once, metavar="HOST:PORT", help="Admin HTTP address (off unless given)."
)
@click.option(
    "--state-file",
    cls=Once,
    metavar="PATH",
    help="Where the replica view is kept (short for --view-store file:PATH).",
)
@click.option(
    "--view-store",
    cls=Once,
    metavar="URL",
    help="file:PATH, or etcd://HOST:PORT[,HOST:PORT...]/PREFIX to share the view with "
    "other proxies.",
)
@click.option(
    "--tls-cert",
    cls=Once,
    metavar="FILE",
    help="Clients speak TLS: the proxy's certificate (PEM, chain after it); replaces "
    "proxy.tls_cert.",
)
@click.option(
    "--tls-key",
    cls=Once,
    metavar="FILE",
    help="The key of --tls-cert (when it is not in that file); replaces proxy.tls_key.",
)
@click.option(
    "--reset-state",
    is_flag=True,
    help="Ignore the state file's view: the config's primary, every replica in sync.",
)
@LOG_LEVEL
@LOG_FORMAT
def run(
    config_path: str | None,
    listen: str | None,
    primary: str | None,
    replicas: tuple[str, ...],
    shadows: tuple[str, ...],
    mode: str | None,
    protocol: str | None,
    admin: str | None,
    state_file: str | None,
    view_store: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    reset_state: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Run the proxy. Flags override the config file.

    A backend given by flag is named by its HOST:PORT. Example:

      replicaproxy run --listen 127.0.0.1:50000 --primary 127.0.0.1:50001
      --replica 127.0.0.1:50002
    """
    overrides = Overrides(
        listen=listen,
        primary=primary,
        replicas=replicas,
        shadows=shadows,
        mode=mode,
        admin=admin,
        state_file=state_file,
        protocol=protocol,
        view_store=view_store,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    try:
        config = build_config(config_path, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    _setup_logging(log_level, log_format)
    # SIGHUP and POST /reload re-read the file, with the same flags on top.
    source = (lambda: build_config(config_path, overrides)) if config_path else None
    _exit(_run_async(_serve(config, reset_state=reset_state, config_source=source)))


async def _serve(
    config: Config,
    *,
    reset_state: bool = False,
    config_source: Callable[[], Config] | None = None,
) -> int:
    from replicaproxy.server import Server, StartError
    from replicaproxy.store import StateError

    server = Server(config, reset_state=reset_state, config_source=config_source)
    try:
        await server.serve(on_start=freeze_startup_objects)
    except StateError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except StartError as exc:
        _error(str(exc))
        return 1
    return 0


def freeze_startup_objects() -> None:
    """Put what start-up made (modules, config, the admin app) out of the garbage
    collector's reach.

    A full collection stops the event loop while it visits every object that may hold
    others: a proxy that had just started with its admin API held 48,500, and a full
    collection of them took 50-57 ms, for every session at once. What start-up made lives
    until the proxy stops, so it is collected once here and then left out
    (``gc.freeze``): a full collection under load visits only what sessions made.
    """
    gc.collect()
    gc.freeze()


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
def check(file: str) -> None:
    """Validate a config FILE: exit 0 if it is good, else print what is wrong and exit 2."""
    try:
        config = load_config(file)
    except ConfigError as exc:
        _fail(str(exc))
    names = ", ".join(f"{b.name} ({b.role}{', TLS' if b.tls else ''})" for b in config.backends)
    tls = " (TLS)" if config.proxy.tls_cert else ""
    click.echo(
        f"{file}: ok: listen {config.proxy.listen}{tls}, {config.proxy.mode} mode, "
        f"protocol {config.proxy.protocol}, {names}"
    )


@cli.command()
@click.argument("replica_host")
@click.argument("replica_port", type=click.IntRange(1, 65535))
@click.argument("listen_port", type=click.IntRange(0, 65535))
@click.argument("primary_port", type=click.IntRange(1, 65535))
@LOG_LEVEL
def compat(
    replica_host: str, replica_port: int, listen_port: int, primary_port: int, log_level: str
) -> None:
    """The classroom argument order: the primary is on localhost.

    Listens on LISTEN_PORT (all interfaces), sends every byte to
    127.0.0.1:PRIMARY_PORT and REPLICA_HOST:REPLICA_PORT, answers with the primary's bytes.
    """
    host = f"[{replica_host}]" if ":" in replica_host else replica_host
    overrides = Overrides(
        listen=f"0.0.0.0:{listen_port}",
        primary=f"127.0.0.1:{primary_port}",
        replicas=(f"{host}:{replica_port}",),
    )
    try:
        config = build_config(None, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    _setup_logging(log_level)
    _exit(_run_async(_serve(config)))


@cli.command("example-server")
@click.option(
    "--host", cls=Once, default="127.0.0.1", show_default=True, help="Address to listen on."
)
@click.option(
    "--port",
    cls=Once,
    type=click.IntRange(0, 65535),
    required=True,
    help="Port to listen on (0: any).",
)
def example_server(host: str, port: int) -> None:
    """The demo protocol's server: prints each value it receives, answers HOLA."""
    from replicaproxy.demo.server import serve_example

    _setup_logging("info")
    try:
        _run_async(_as_int(serve_example(host, port, out=_print_flush)))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        pass


@cli.command("example-client")
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option(
    "--connect-deadline",
    cls=Once,
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to keep retrying the connect (every 100 ms).",
)
def example_client(host: str, port: int, connect_deadline: float) -> None:
    """The demo protocol's client: sends the values, prints the reply."""
    from replicaproxy.demo.client import run_example_client
    from replicaproxy.demo.protocol import ProtocolError

    try:
        _run_async(
            _as_int(
                run_example_client(host, port, out=_print_flush, connect_deadline=connect_deadline)
            )
        )
    except (OSError, EOFError, asyncio.IncompleteReadError, ProtocolError) as exc:
        _fail(str(exc) or type(exc).__name__, 1)


@cli.command()
@click.option(
    "--cluster",
    is_flag=True,
    help="Two proxies sharing one view in etcd (needs the etcd program): a failover "
    "seen by both, then one proxy cut off from etcd.",
)
@LOG_LEVEL
def demo(cluster: bool, log_level: str) -> None:
    """Run the whole thing on loopback: two example servers, the proxy, the client."""
    _setup_logging(log_level if log_level != "info" else "warning")
    if cluster:
        from replicaproxy.demo.cluster import run_cluster_demo

        _exit(_run_async(run_cluster_demo()))
    from replicaproxy.demo.run import run_demo

    _exit(_run_async(run_demo()))


def _attach_ctl() -> None:
    from replicaproxy.ctl import ctl

    cli.add_command(ctl)


_attach_ctl()


def _print_flush(line: str) -> None:
    print(line, flush=True)


async def _as_int(coro: Coroutine[Any, Any, object]) -> int:
    await coro
    return 0


def main() -> None:
    """Entry point of the console script."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(exc.format_message() + hint)
    except click.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)


if __name__ == "__main__":
    main()
