"""/healthz, /readyz and /metrics over HTTP (aiohttp, on the runtime's loop)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .consumer import Runtime


def make_app(rt: "Runtime") -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        ok, why = rt.health()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, why = rt.readiness()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def metrics(_: web.Request) -> web.Response:
        rt.metrics.inflight.set(rt.outstanding)
        body = generate_latest(rt.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    return app


async def start_server(rt: "Runtime", host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(rt), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
