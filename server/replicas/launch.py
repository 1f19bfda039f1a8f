"""`kvmux serve --replicas N [--ray-address ADDR]`: start (or join) Ray, deploy, serve until SIGINT/SIGTERM.

The same OpenAI API on the same host and port as the single-process server, answered by Serve's
HTTP proxy. On SIGINT/SIGTERM (also while the replicas are still starting) the application is
deleted (each replica drains within `shutdown_grace_s`) and a Ray instance this command started
is stopped; a joined cluster keeps running.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time

from kvmux.server.config import ServerConfig

log = logging.getLogger("kvmux.server")
MISSING_RAY = "kvmux serve: --replicas and --ray-address need Ray Serve: pip install 'kvmux[ray]'"


class Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _stop(*_) -> None:
    raise Stop()


def _on_signals(handler) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def serve_replicas(config: ServerConfig) -> int:
    """Run replicated kvmux in the foreground; the exit status of `kvmux serve`."""
    try:
        import ray
        from ray import serve

        from kvmux.server.replicas.deploy import APP_NAME, build_application
    except ImportError:
        print(MISSING_RAY, file=sys.stderr)
        return 2
    address = config.replicas.ray_address
    _on_signals(_stop)
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init()
        _on_signals(_stop)  # again: ray.init installs handlers of its own
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_application(config), name=APP_NAME, route_prefix="/")
        replicas = config.replicas
        scale = replicas.autoscaling or f"{replicas.num_replicas} replicas"
        log.info("kvmux on Ray Serve (%s) at http://%s:%d", scale, config.host, config.port)
        while True:
            time.sleep(3600)
    except SystemExit as exc:  # ray.init's own SIGTERM handler, while Ray was starting
        if exc.code != signal.SIGTERM:
            raise
    except Stop:
        log.info("shutting down: deleting the application (replicas drain within %.1f s)", config.shutdown_grace_s)
    finally:
        _on_signals(signal.SIG_IGN)
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
            if not address:
                serve.shutdown()
        ray.shutdown()  # also stops a local Ray instance that was still starting
    return 0
