"""The far end of the benchmark's idle tunnels: an upstream proxy that answers every CONNECT with 200 and then holds
the connection open, doing nothing. A process of its own, so that its sockets do not count against the benchmark's
open-file limit. Usage: hold_upstream.py PORT. Prints `ready` once listening."""
import asyncio
import sys


async def hold(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await reader.read(1)
    except Exception:  # noqa: BLE001 - a closed client is the normal end
        pass
    writer.close()


async def main():
    server = await asyncio.start_server(hold, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
