#!/usr/bin/python3
"""An independent WebSocket client for herald's echo example
(examples/echo.lua): python3-websockets, which checks the server's frames
strictly (masking, opcodes, UTF-8, the close handshake).

    /usr/bin/python3 spec/interop/ws_client.py ws://127.0.0.1:PORT/

Sends text, binary, fragmented messages, a 1 MiB message, pings, then
closes normally, checking each echo. Prints "ok" and exits 0, or prints
what failed and exits 1. Gives up after 30 s.
"""
import asyncio
import os
import sys

import websockets


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def show(data):
    text = repr(data)
    return text if len(text) <= 80 else "%s... (%d)" % (text[:60], len(data))


async def echo(ws, message, what):
    await ws.send(message)
    got = await asyncio.wait_for(ws.recv(), 10)
    check(type(got) is type(message), "%s: a %s came back for a %s" % (what, type(got).__name__,
                                                                     type(message).__name__))
    check(got == message, "%s: sent %s, got %s" % (what, show(message), show(got)))


async def run(uri):
    # permessage-deflate is offered (the default): herald must decline it
    async with websockets.connect(uri, max_size=None, ping_interval=None,
                                  open_timeout=10, close_timeout=10) as ws:
        check(ws.response_headers.get("Sec-WebSocket-Extensions") is None,
              "the server accepted an extension")
        check(ws.subprotocol is None, "a subprotocol was chosen: %r" % ws.subprotocol)

        # text
        for message in ["hello", "", "κόσμε € 𝄞 😀", "x" * 125, "y" * 126, "z" * 65536, "nul\0inside"]:
            await echo(ws, message, "text of %d characters" % len(message))
        # binary
        for message in [b"", bytes(range(256)), os.urandom(70000)]:
            await echo(ws, message, "binary of %d bytes" % len(message))
        # fragmented: websockets sends an iterable as one message in fragments
        await ws.send(["frag", "mented ", "κό", "σμε"])
        got = await asyncio.wait_for(ws.recv(), 10)
        check(got == "fragmented κόσμε", "fragmented text came back as %s" % show(got))
        parts = [os.urandom(1000) for _ in range(50)]
        await ws.send(parts)
        got = await asyncio.wait_for(ws.recv(), 10)
        check(got == b"".join(parts), "fragmented binary came back as %s" % show(got))
        # 1 MiB, text and binary
        await echo(ws, os.urandom(1 << 20), "1 MiB binary")
        await echo(ws, "é" * (1 << 19), "1 MiB text")
        # pipelined: 100 messages before reading any echo
        sent = ["message %d" % i for i in range(100)]
        for m in sent:
            await ws.send(m)
        got = [await asyncio.wait_for(ws.recv(), 10) for _ in sent]
        check(got == sent, "100 pipelined messages came back as %s" % show(got))
        # pings: each answered by a pong with its payload (websockets checks it)
        for payload in [b"", b"ping payload", os.urandom(125)]:
            pong = await ws.ping(payload)
            await asyncio.wait_for(pong, 10)
        # and the connection still echoes
        await echo(ws, "after the pings", "text after pings")
    # leaving the block closed it: a close 1000 answered by the server
    check(ws.close_code == 1000, "close code %r, expected 1000" % ws.close_code)
    check(ws.closed, "the connection is not closed")


def main():
    if len(sys.argv) != 2:
        print("usage: ws_client.py ws://HOST:PORT/", file=sys.stderr)
        return 2
    try:
        asyncio.run(asyncio.wait_for(run(sys.argv[1]), 30))
    except Failure as e:
        print("FAIL: %s" % e)
        return 1
    except Exception as e:  # anything websockets raises is a failure too
        print("FAIL: %s: %s" % (type(e).__name__, e))
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
