"""``tuneloop run``: one process, one engine, one web server, every enabled adapter.

Start order: bind the web port (a taken port fails at once, before a model
is loaded), open the store and start the engine, attach every adapter's
routes to the one aiohttp app, start the app, the adapters and the learning
loop. Stop order on Ctrl-C or SIGTERM: refuse new requests, let in-flight
replies finish within ``grace`` seconds (the engine cancels what is left;
a cancelled reply is still logged with ``finish_reason = "cancelled"``),
stop the adapters and the learning loop, close the store. A training run
this process started (the schedule, an admin's ``retrain``) stops with it
and is marked ``cancelled``; the last line names it. Runs started from the
CLI (``tuneloop retrain``) are not this process's and go on.

An adapter is any object built as ``Adapter(services)`` with::

    attach(app: aiohttp.web.Application) -> None   # add routes, before start
    async start() -> None
    async stop() -> None
    describe() -> str                               # optional: one log line
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import signal
import socket
import sys
from typing import Any, Protocol

from aiohttp import web

from tuneloop.config import Config
from tuneloop.errors import ConfigError

log = logging.getLogger("tuneloop.run")

#: seconds in-flight replies get to finish once a stop is asked for
GRACE_S = 5.0


class Adapter(Protocol):
    def attach(self, app: web.Application) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


#: platform -> (module, class); imported only when enabled
PLATFORMS = {"slack": ("bot.adapters.slack", "SlackAdapter"),
             "discord": ("bot.adapters.discord", "DiscordAdapter")}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one ``ConfigError`` line saying why not."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"server.host: cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"server.port: {host}:{port} is already in use; stop the other "
                              f"process or choose another port (server.port = 0 picks a free one)") from None
        raise ConfigError(f"server.host/port: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def platform_adapters(services) -> list[tuple[str, Any]]:
    """The enabled Slack/Discord adapters, imported lazily; disabled ones are logged."""
    out = []
    for name, (module, cls_name) in PLATFORMS.items():
        section = getattr(services.config, name)
        if not section.enabled:
            log.info("%s: disabled (%s.enabled = false)", name, name)
            continue
        mod = importlib.import_module(module)
        cls = getattr(mod, cls_name, None) or mod.Adapter
        out.append((name, cls(services)))
    return out


def learning_service(services) -> Any:
    """The learning loop, its control handed to admins."""
    from bot.learning import LearningService

    learning = LearningService(services)
    services.admin.control = learning.control
    return learning


async def serve(config: Config, *, grace: float = GRACE_S, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Run until ``stop`` is set (by default: on SIGINT or SIGTERM); return the exit code."""
    from bot.adapters.web import WebAdapter, check_exposure
    from bot.runtime import services as open_services

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, _on_signal, stop, sig)
            signals.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass

    check_exposure(config)  # before binding: no keys, no listening beyond this machine
    sock = bind(config.server.host, config.server.port)
    try:
        log.info("engine: loading %s (backend %s)", config.model.base if config.model.backend == "local"
                 else config.model.api_base, config.model.backend)
        # The learning loop's follower serves the live version: one follower per process.
        async with open_services(config, follow_live=False) as svc:
            engine_stop = svc.engine.stop
            app = web.Application(client_max_size=config.server.max_body_bytes)
            web_adapter = WebAdapter(svc)
            adapters: list[tuple[str, Any]] = [("web", web_adapter)] + platform_adapters(svc)
            for _, adapter in adapters:
                adapter.attach(app)
            learning = learning_service(svc)
            await learning.follow_live()  # before the first request
            # Backstop only: the engine's own grace settles replies first.
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=grace + 2,
                                   access_log=None)
            await runner.setup()
            site = web.SockSite(runner, sock)
            await site.start()
            web_adapter.url = url_of(sock)
            started: list[tuple[str, Any]] = []
            try:
                for name, adapter in adapters:
                    await adapter.start()
                    started.append((name, adapter))
                    describe = getattr(adapter, "describe", None)
                    if describe is not None:
                        log.info("%s", describe())
                    elif name != "web":
                        log.info("%s: running", name)
                if learning is not None:
                    await learning.start()
                    log.info("learning: running (trainer.enabled = %s)", str(config.trainer.enabled).lower())
                log.info("engine: %s ready (%s)", svc.engine.model_version, config.model.backend)
                print(f"tuneloop is running: web chat at {web_adapter.url} "
                      f"(dashboard {web_adapter.url}dashboard); Ctrl-C stops", flush=True)
                if ready is not None:
                    ready.set()
                await stop.wait()
                log.info("stopping: finishing in-flight replies (up to %.0f s)", grace)
            finally:
                web_adapter.draining.set()
                # The web server waits for its handlers while the engine finishes or
                # cancels their replies; adapters stop taking events meanwhile.
                # The learning loop stops at once too: no run may start during the grace.
                results = await asyncio.gather(
                    runner.cleanup(), engine_stop(grace), learning.stop(),
                    *(a.stop() for n, a in started if n != "web"), return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException):
                        log.error("while stopping: %s: %s", type(r).__name__, r)
        if learning.stopped_runs:
            log.info("stopped cleanly; training %s", ", ".join(
                f"{r['run_id']} {r['status']} (pid {r['pid']} stopped; log {r['log']})"
                for r in learning.stopped_runs))
        else:
            log.info("stopped cleanly")
        return 0
    finally:
        sock.close()
        for sig in signals:
            loop.remove_signal_handler(sig)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if stop.is_set():
        log.warning("second %s: exiting now", sig.name)
        sys.exit(130)
    log.info("%s received", sig.name)
    stop.set()
