"""`afc-operator` with every request it sends to the apiserver counted (bench/operator.py).

    <checkout>/.venv/bin/python -P bench/opcount.py ARGS...     # ARGS as for afc-operator

The test bed's apiserver is shared with other tests, so its own counters
(`apiserver_request_total`) cannot say which requests were the operator's. This counts on the
client side instead, in the operator process, for any checkout's operator (no change to it
needed): the kubernetes client's requests (urllib3: the reconciles' reads and writes) and
kopf's (aiohttp: watches, bookkeeping patches, Events, peering), by verb and resource. A
watch counts once when opened (its events are not requests). Every second the counters are
written to $AFC_BENCH_COUNTS as JSON ({"VERB resource": n}).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from urllib.parse import parse_qs, urlsplit

COUNTS: Counter[str] = Counter()
LOCK = threading.Lock()


def classify(method: str, url: str) -> str:
    """'LIST statefulsets', 'WATCH adaptiveconsumers', 'PATCH adaptiveconsumers/status', ..."""
    parts = urlsplit(str(url))
    segs = [s for s in parts.path.split("/") if s]
    query = parse_qs(parts.query)
    if "namespaces" in segs and len(segs) > segs.index("namespaces") + 2:
        rest = segs[segs.index("namespaces") + 2:]
    elif segs[:1] == ["api"]:
        rest = segs[2:]          # /api/v1/<plural>[/<name>...]
    elif segs[:1] == ["apis"]:
        rest = segs[3:]          # /apis/<group>/<version>/<plural>[/<name>...]
    else:
        rest = []
    resource = (rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")) if rest else (parts.path or "/")
    verb = method.upper()
    if verb == "GET" and query.get("watch", [""])[0] in ("true", "1"):
        verb = "WATCH"
    elif verb == "GET" and len(rest) == 1:
        verb = "LIST"
    return f"{verb} {resource}"


def count(method: str, url: str) -> None:
    with LOCK:
        COUNTS[classify(method, url)] += 1


def install() -> None:
    import aiohttp
    import urllib3

    urlopen = urllib3.PoolManager.urlopen

    def counted_urlopen(self, method, url, *args, **kwargs):  # noqa: ANN001, ANN202
        count(method, url)
        return urlopen(self, method, url, *args, **kwargs)

    urllib3.PoolManager.urlopen = counted_urlopen  # type: ignore[method-assign]

    request = aiohttp.ClientSession._request

    async def counted_request(self, method, str_or_url, *args, **kwargs):  # noqa: ANN001, ANN202
        count(method, str(str_or_url))
        return await request(self, method, str_or_url, *args, **kwargs)

    aiohttp.ClientSession._request = counted_request  # type: ignore[method-assign]

    path = os.environ["AFC_BENCH_COUNTS"]

    def dump() -> None:
        while True:
            with LOCK:
                data = json.dumps(dict(COUNTS))
            with open(path + ".tmp", "w") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
            time.sleep(1)

    threading.Thread(target=dump, name="afc-bench-counts", daemon=True).start()


if __name__ == "__main__":
    install()
    sys.argv[0] = "afc-operator"
    from afc.operator.cli import main
    sys.exit(main())
