"""A WebSocket client over wss for spec/tls_spec.lua (run by Debian's
/usr/bin/python3, which has python3-websockets).

    wss_echo.py URL SERVER_NAME

Connects to URL (wss://127.0.0.1:PORT/path) with SNI SERVER_NAME and a TLS
context that does not verify the self-signed certificate, sends messages to
an echo route and checks that each comes back whole, as the same kind (text
or binary). Prints "tls <version> <alpn>", then "ok <case>" or "bad <case>:
<why>" per case; exits 0 when every case passed, 1 otherwise. Every wait is
bounded (5 s).
"""
import asyncio
import os
import ssl
import sys

import websockets


def context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def cases():
    big = os.urandom(65536)
    return [
        ("text", "hello over wss, h\u00e9llo", "hello over wss, h\u00e9llo"),
        ("binary", b"\x00\x01\x02\xfe\xff", b"\x00\x01\x02\xfe\xff"),
        ("empty text", "", ""),
        ("64 KiB binary", big, big),
        ("64 KiB text", "0123456789abcdef" * 4096, "0123456789abcdef" * 4096),
        # an iterable is sent as one message in several frames
        ("fragmented text", ["frag", "men", "ted t\u00ebxt"], "fragmented t\u00ebxt"),
        ("fragmented binary", [b"\x00" * 10, big, b"\xff"], b"\x00" * 10 + big + b"\xff"),
        # a small message after the big ones: nothing left over in between
        ("text after", "last", "last"),
    ]


async def main(url, server_name):
    failed = 0
    async with websockets.connect(url, ssl=context(), server_hostname=server_name,
                                  compression=None, max_size=4 * 1024 * 1024,
                                  open_timeout=5, close_timeout=5) as ws:
        tls = ws.transport.get_extra_info("ssl_object")
        print("tls", tls.version(), tls.selected_alpn_protocol(), flush=True)
        for name, message, expected in cases():
            await ws.send(message)
            try:
                got = await asyncio.wait_for(ws.recv(), 5)
            except asyncio.TimeoutError:
                got = None
            if got == expected:
                print("ok", name, flush=True)
            else:
                failed += 1
                what = "nothing" if got is None else "%s of %d" % (type(got).__name__, len(got))
                print("bad %s: got %s, expected %s of %d" % (
                    name, what, type(expected).__name__, len(expected)), flush=True)
        await ws.close()
        print("closed", ws.close_code, flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(1 if asyncio.run(main(sys.argv[1], sys.argv[2])) else 0)
