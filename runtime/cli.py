"""`afc-consumer`: run the adaptive consumer (and, later, tools around it).

    afc-consumer run [--handler pkg.module:func | --http-sink URL] [--topic T ...] [--group G]
                     [--bootstrap HOST:PORT] [--redis-url URL]
    afc-consumer dlq inspect TOPIC [--records N] [--filter header=value]
    afc-consumer dlq replay --from TOPIC [--to TOPIC] [--filter header=value] [--dry-run]

Everything else comes from the environment (`AFC_...`) or `AFC_CONFIG_FILE`; see config.py.
Exit codes: 0 after a clean stop, 2 for configuration errors (a restart would not help).
"""
from __future__ import annotations

import argparse
import faulthandler
import asyncio
import logging
import os
import sys
from typing import Any

from .config import ConfigError, load_settings
from .eventloop import loop_factory
from .handlers import HandlerLoadError
from .logs import setup_logging

log = logging.getLogger("afc.runtime.cli")


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if ns.handler or ns.http_sink:
        o["handler"] = {k: v for k, v in (("handler", ns.handler), ("http_sink_url", ns.http_sink)) if v}
    kafka = {k: v for k, v in (("topics", ns.topic), ("group_id", ns.group), ("bootstrap_servers", ns.bootstrap)) if v}
    if kafka:
        o["kafka"] = kafka
    if ns.redis_url:
        o["idempotency"] = {"redis_url": ns.redis_url}
    return o


def _merge(settings_cls: Any, overrides: dict[str, Any]) -> Any:
    """Arguments override single fields; the rest of each section still comes from env/file."""
    base = load_settings()
    data = base.model_dump()
    for section, fields in overrides.items():
        data[section].update(fields)
    for secret in (("kafka", "sasl_password"), ("idempotency", "redis_url")):
        v = getattr(getattr(base, secret[0]), secret[1])
        if secret[1] not in overrides.get(secret[0], {}) and v is not None:
            data[secret[0]][secret[1]] = v.get_secret_value()
    return settings_cls.model_validate(data)


async def _run(settings: Any) -> int:
    from .consumer import Runtime
    from .server import start_server
    rt = Runtime(settings)
    await rt.start()
    rt.install_signals()
    runner = None
    if settings.server.port:
        runner = await start_server(rt, settings.server.host, settings.server.port)
    try:
        await rt.run()
    finally:
        if runner is not None:
            await runner.cleanup()
    if rt.exit_code:
        # Fatal (fenced, handler threads lost): exit now, with the reason logged. Threads
        # stuck in a handler or in librdkafka must not keep a zombie alive.
        logging.shutdown()
        os._exit(rt.exit_code)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        faulthandler.enable()  # a crash in native code (librdkafka) still says where Python was
    except (ValueError, OSError):   # stderr without a file descriptor (embedded, captured)
        pass
    p = argparse.ArgumentParser(prog="afc-consumer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="consume and handle")
    run.add_argument("--handler", help="pkg.module:func")
    run.add_argument("--http-sink", help="POST each message to this URL")
    run.add_argument("--topic", action="append", help="topic to consume (repeatable)")
    run.add_argument("--group", help="consumer group id")
    run.add_argument("--bootstrap", help="bootstrap servers")
    run.add_argument("--redis-url", help="idempotency store (prefer AFC_IDEMPOTENCY__REDIS_URL from a Secret)")
    dlq = sub.add_parser("dlq", help="inspect or replay a dead-letter or poison topic")
    dsub = dlq.add_subparsers(dest="dlq_cmd", required=True)
    bootstrap = os.environ.get("AFC_KAFKA__BOOTSTRAP_SERVERS", "localhost:9092")
    ins = dsub.add_parser("inspect", help="counts by error class, oldest, newest, sample records (JSON)")
    ins.add_argument("topic")
    ins.add_argument("--records", type=int, default=10, help="how many records to show")
    rep = dsub.add_parser("replay", help="re-inject records to their original topic")
    rep.add_argument("--from", dest="source", required=True, help="the dead-letter (or poison) topic")
    rep.add_argument("--to", help="another destination than each record's original topic")
    rep.add_argument("--dry-run", action="store_true", help="count what would be replayed, send nothing")
    for sp in (ins, rep):
        sp.add_argument("--bootstrap", default=bootstrap, help="bootstrap servers (AFC_KAFKA__BOOTSTRAP_SERVERS)")
        sp.add_argument("--filter", action="append", help="header=value (value* for a prefix); repeatable")
    ns = p.parse_args(argv)
    if ns.cmd is None:
        ns = p.parse_args(["run", *(argv or sys.argv[1:])])
    if ns.cmd == "dlq":
        from . import dlq as dlq_tool
        setup_logging()
        return dlq_tool.main(ns)
    try:
        from .config import RuntimeSettings
        settings = _merge(RuntimeSettings, _overrides(ns))
        setup_logging(settings.log_level)
        settings.require_runnable()
    except (ConfigError, ValueError) as e:
        setup_logging()
        log.error("event=config-error error=\"%s\"", str(e).replace('"', "'"))
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.handler.event_loop)) as runner:
            return runner.run(_run(settings))
    except (HandlerLoadError, ConfigError) as e:
        log.error("event=config-error error=\"%s\"", str(e).replace('"', "'"))
        return 2


if __name__ == "__main__":
    sys.exit(main())
