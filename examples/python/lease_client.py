"""Lease a proxy over NATS, use it, return it: the consumer side of proxypool's public NATS contract.

    pip install nats-py
    NATS_URL=nats://nats:4222 NATS_USER=consumer NATS_PASSWORD=... python lease_client.py vn

Subjects (proxypool.v1.lease.*) and messages are documented in the README; replies are {"data": ...} or
{"error": {"code", "message", "field"}}. "no_proxy_available" and "service_unavailable" are worth retrying.
"""

import asyncio
import json
import os
import sys

import nats

ACQUIRE = "proxypool.v1.lease.acquire"
RELEASE = "proxypool.v1.lease.release"
RETRYABLE = {"no_proxy_available", "service_unavailable"}


class LeaseError(Exception):
    def __init__(self, error):
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")


async def request(nc, subject, body, timeout=5.0):
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    reply = json.loads(msg.data)
    if "error" in reply:
        raise LeaseError(reply["error"])
    return reply["data"]


async def acquire(nc, area, consumer, attempts=5):
    for attempt in range(attempts):
        try:
            return await request(nc, ACQUIRE, {"area": area, "consumer": consumer})
        except LeaseError as e:
            if e.code not in RETRYABLE or attempt == attempts - 1:
                raise
            await asyncio.sleep(min(2**attempt, 10))


async def main(area):
    options = {"servers": os.environ.get("NATS_URL", "nats://127.0.0.1:4222")}
    if os.environ.get("NATS_USER"):
        options.update(user=os.environ["NATS_USER"], password=os.environ.get("NATS_PASSWORD", ""))
    nc = await nats.connect(**options)
    try:
        lease = await acquire(nc, area, consumer="python-example")
        proxy = f"http://{lease['username']}:{lease['password']}@{lease['ip']}:{lease['port']}"
        print(f"leased {lease['id']} ({lease['ip']}:{lease['port']}), expires {lease.get('expires_at')}")
        # ... use `proxy` for outbound requests here ...
        _ = proxy
        returned = await request(nc, RELEASE, {"proxy_id": lease["id"], "key": lease["key"]})
        print(f"returned: {returned}")
    finally:
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "vn"))
