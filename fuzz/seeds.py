#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (committed; run again to
remake them). Each seed follows its target's input format (see the comment
at the top of fuzz/<target>.c). The TLS ClientHellos are recorded from real
clients at generation time: Python's ssl module (OpenSSL) through memory
BIOs, and `openssl s_client` against a local socket that keeps what it gets.
A ClientHello holds no secret."""

import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
EPOCH = "0000abcd"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def req(line, headers=(), body=b""):
    out = line.encode() + b"\r\n"
    for h in headers:
        out += h.encode() + b"\r\n"
    return out + b"\r\n" + body


# ---- http: 3 bytes (flags, chunk seed, end actions), then the client's bytes

def http_seeds():
    upgrade = req("GET /ws?sub HTTP/1.1", ["Host: x", "Upgrade: websocket", "Connection: Upgrade",
                                          "Sec-WebSocket-Key: " + KEY, "Sec-WebSocket-Version: 13"])
    seeds = {
        "get": (0, 0, 0, req("GET / HTTP/1.1", ["Host: example.com", "User-Agent: seed"])),
        "get-tiny-chunks": (1, 7, 0, req("GET /echo?q=1 HTTP/1.1", ["Host: x", "Accept: */*"])),
        "pipelined": (3, 42, 0, req("GET /a HTTP/1.1", ["Host: x"]) + req("HEAD /echo HTTP/1.1", ["Host: x"])
                      + req("GET /status/204 HTTP/1.1") + req("GET /none HTTP/1.1")
                      + req("GET /twice HTTP/1.1") + req("GET /hdr HTTP/1.1", ["X-Echo: v"])),
        "post-length": (2, 3, 0, req("POST /echo HTTP/1.1", ["Host: x", "Content-Length: 11",
                                                             "Content-Type: text/plain"], b"hello world")),
        "post-chunked-trailer": (3, 9, 0, req("POST /echo HTTP/1.1", ["Host: x", "Transfer-Encoding: chunked"],
                                              b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")),
        "expect-continue": (0, 0, 0, req("POST /echo HTTP/1.1", ["Host: x", "Expect: 100-continue",
                                                                 "Content-Length: 4"], b"body")),
        "http10": (0, 0, 4, req("GET /close HTTP/1.0", ["Connection: keep-alive"]) + req("GET / HTTP/1.0")),
        "close": (0, 0, 0, req("GET /close HTTP/1.1") + req("GET /after HTTP/1.1")),
        "publish-then-sse-resume": (0, 0, 1, req("POST /pub HTTP/1.1", ["X-Topic: a", "X-Event: tick",
                                                                        "Content-Length: 8"], b"one\r\ntwo")
                                    + req("POST /pub HTTP/1.1", ["X-Topic: b", "Content-Length: 1"], b"3")
                                    + req("GET /sse?retry HTTP/1.1", ["Last-Event-ID: %s-2" % EPOCH])),
        "sse-open-sends": (2, 5, 3, req("GET /sse?pub&retry HTTP/1.1", ["Accept: text/event-stream"])),
        "sse-unknown-id": (0, 0, 0, req("GET /sse HTTP/1.1", ["Last-Event-ID: 12345678-9"])),
        "upgrade": (0, 0, 0, upgrade + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
                    + b"\x88\x82\x00\x00\x00\x00\x03\xe8"),
        "upgrade-env-resume": (3, 11, 1, req("GET /ws?env&pub&sub HTTP/1.1", ["Upgrade: websocket",
                                                                          "Connection: Upgrade",
                                                                          "Last-Event-ID: %s-1" % EPOCH])
                               + b"\x81\x82\x00\x00\x00\x00pa"),
        "big-slow-reader": (8, 0, 0, req("GET /big HTTP/1.1") * 6 + req("GET /echo HTTP/1.1")),
        "header-limit": (0x10, 0, 0, req("GET /" + "u" * 900 + " HTTP/1.1", ["X-Long: " + "v" * 300])),
        "body-limit": (0x80, 0, 0, req("POST /echo HTTP/1.1", ["Content-Length: 20"], b"x" * 20)),
        "timeout-mid-request": (1, 1, 0x31, b"GET /slow HTTP/1.1\r\nHost: x\r\n"),
        "drain-keepalive": (0, 0, 2, req("GET / HTTP/1.1") + b"GET /next HTT"),
        "bad-request": (0, 0, 0, b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
        "status-codes": (0, 0, 0, req("GET /status/304 HTTP/1.1") + req("GET /status/99 HTTP/1.1")
                         + req("GET /status/150 HTTP/1.1") + req("GET /status/599 HTTP/1.1")),
        "pub-bad-event": (0, 0, 0, req("POST /pub HTTP/1.1", ["X-Event: a\x7fb", "Content-Length: 0"])),
        "rejected-503": (0, 0, 8, req("GET / HTTP/1.1", ["Host: x"])),
        "many-topics": (0, 0, 0, b"".join(req("POST /pub HTTP/1.1", ["X-Topic: t%d" % i, "Content-Length: 1"], b"x")
                                          for i in range(70))),
    }
    for name, (f0, seed, f2, data) in seeds.items():
        write("http", name, bytes([f0, seed, f2]) + data)


# ---- ws: 3 bytes of settings, then raw client frames or structured records

def frame(op, payload=b"", fin=True, mask=b"\x37\xfa\x21\x3d", rsv=0):
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload)
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return head + mask + masked


def rec_frame(h0, payload, k=1):
    return bytes([k & ~7 | (k & 3), h0, len(payload)]) + payload


def ws_seeds():
    close = lambda code, reason=b"": frame(8, struct.pack(">H", code) + reason)
    raw = {
        "text": (0, 0, frame(1, b"hello") + close(1000)),
        "binary": (0, 0, frame(2, bytes(range(40))) + close(1001, b"bye")),
        "fragmented-utf8": (2, 2, frame(1, "h\u00e9".encode()[:2], fin=False)
                            + frame(0, "h\u00e9".encode()[2:] + "\U0001F600".encode()[:1], fin=False)
                            + frame(9, b"ping in between") + frame(0, "\U0001F600".encode()[1:]) + close(3000)),
        "ping-pong": (4, 3, frame(9, b"p") + frame(10, b"unsolicited") + frame(9) + close(1000, b"ok")),
        "length16": (6, 9, frame(2, b"z" * 300) + close(1000)),
        "publish-self": (0x08, 0, frame(1, b"publish me") + frame(1, b"close now")),
        "app-ping-and-close": (0, 0, frame(1, b"i ping") + frame(1, b"cgoodbye")),
        "too-big": (0x30, 0, frame(1, b"x" * 40)),
        "rate-limited": (0x40, 0, frame(1, b"1") + frame(1, b"2") + frame(1, b"3") + frame(1, b"4")),
        "rate-drop": (0xc0, 0, frame(1, b"1") + frame(1, b"2") + frame(1, b"3") + frame(9) + frame(1, b"4")),
        "invalid-utf8": (0, 0, frame(1, b"\xed\xa0\x80")),
        "unmasked": (0, 0, b"\x81\x05hello"),
        "bad-close-code": (0, 0, close(1005)),
    }
    # f2: bit1 subscribe, bit2 open sends, bit3 resume from 2, bit4 resume all, bit5 first frames with the upgrade
    f2s = {"text": 0x02, "publish-self": 0x06, "fragmented-utf8": 0x20, "ping-pong": 0x41,
           "length16": 0x0a, "binary": 0x12, "app-ping-and-close": 0x80}
    for name, (f0, seed, data) in raw.items():
        write("ws", "raw-" + name, bytes([f0, seed, f2s.get(name, 0), 0]) + data)

    s = lambda *recs: b"".join(recs)
    structured = {
        "text-close": (0x01, 0, 0x02, s(rec_frame(0x81, b"hello"), rec_frame(0x88, b"\x03\xe8bye"))),
        "fragments-cut": (0x03, 5, 0, s(rec_frame(0x01, b"frag", 0x21), rec_frame(0x00, b"ment", 0x41),
                                       rec_frame(0x89, b"ping", 0x02), rec_frame(0x80, b"ed", 0x03))),
        "filler-too-big": (0x01, 0, 0, bytes([0x81, 0x82, 2, 0, ord("a")])),
        "filler-64k": (0x21, 0, 0, bytes([0x81, 0x82, 64, 0, ord("b")]) + rec_frame(0x88, b"\x03\xe8")),
        "non-minimal-length": (0x01, 0, 0, s(rec_frame(0x81, b"short", 0x11))),
        "timer-ping": (0x01, 0, 0x02, s(rec_frame(0x81, b"x"), b"\x04", b"\x04", b"\x04")),
        "publish-and-deliver": (0x09, 0, 0x1a, s(b"\x05\x03abc", b"\x0d\x03def", b"\x15\x02ev",
                                                 rec_frame(0x81, b"pub"))),
        "app-close": (0x01, 0, 0, s(rec_frame(0x81, b"x"), b"\x06\x03\xe8\x03bye", rec_frame(0x88, b"\x03\xe8"),
                                   b"\x04")),
        "app-sends": (0x01, 0, 0, s(b"\x0e\x04ping", b"\x16\x04text", b"\x36\x02\xff\xfe", b"\x1e")),
        "rsv-and-opcodes": (0x01, 0, 0, s(rec_frame(0xc1, b"rsv1"))),
        "raw-record": (0x01, 0, 0, s(b"\x07\x02\x81\x00", rec_frame(0x8a, b""))),
        "unmasked-record": (0x01, 0, 0, s(rec_frame(0x81, b"plain", 0x09))),
    }
    for name, (f0, seed, f2, data) in structured.items():
        write("ws", "rec-" + name, bytes([f0, seed, f2, 0]) + data)
    # a subscriber that does not read: a 60 KiB echo backs up, then publishes
    # to "a" are conflated and one to "b" closes it; or it reads again and
    # catches up
    slow = s(bytes([0xa1, 0x82, 60, 0, ord("x")]), b"\x05\x03abc", b"\x05\x03abd", b"\x15\x02ev")
    write("ws", "rec-slow-conflate-catch-up", bytes([0x29, 0, 0x02, 0x07]) + slow + b"\x0c" + b"\x05\x01z")
    write("ws", "rec-slow-close", bytes([0x21, 0, 0x02, 0x17]) + slow + b"\x0d\x03def")
    write("ws", "rec-ping-flood-not-reading", bytes([0x21, 0, 0, 0x13]) + bytes([0xa1, 0x82, 60, 0, 0]) * 3
          + s(*[rec_frame(0x89, b"p" * 125)] * 20))


# ---- resume: settings, topics, three publish groups, the id

def resume_seeds():
    def seed(f0, subs, hist, opening, ndirect, live, tail):
        return (bytes([f0, subs, len(hist)]) + bytes(hist) + bytes([len(opening) | ndirect << 6])
                + bytes(opening) + bytes([len(live)]) + bytes(live) + tail)
    # publish bytes: topic (b & 7) % 5 (a, b, c, room:1, x), bits 3-4 time, bit 5 sweep, bit 7 event
    hist = [0, 1, 0, 3, 4, 1, 0, 0x80, 2, 0x08, 3, 0x10, 4]
    ids = {
        "ours-3": EPOCH + "-3", "ours-latest": EPOCH + "-13", "ours-0": EPOCH + "-0",
        "ours-future": EPOCH + "-999", "other-epoch": "12345678-3", "leading-zeros": EPOCH + "-0003",
        "upper-hex": EPOCH.upper() + "-3", "hex-prefix": "0x00abcd-3", "signed": "+000abcd-3",
        "space": " 000abcd-3", "overflow": EPOCH + "-18446744073709551616", "max": EPOCH + "-18446744073709551615",
        "short": "0000ab-1", "garbage": "not an id at all", "trailing": EPOCH + "-3 ", "dash-only": EPOCH + "-",
    }
    for name, id_ in ids.items():
        write("resume", "id-" + name, seed(0x03, 0x1f, hist, [0, 1, 0x18], 1, [0, 1, 2], id_.encode()))
    write("resume", "no-id", seed(0x13, 0x03, hist, [0, 1], 2, [0, 1], b""))
    write("resume", "everything", seed(0x23, 0x1f, hist, [0, 4], 0, [4], b""))
    write("resume", "formatted-id", seed(0x37, 0x11, hist, [3], 0, [0], bytes([5])))
    write("resume", "aged-out", seed(0x04, 0x18, [3, 4, 0x1b, 0x1c, 3], [0x0b], 0, [4], (EPOCH + "-2").encode()))
    write("resume", "swept", seed(0x00, 0x0a, [0, 2, 3, 4, 0x3b, 0x22], [0x21], 1, [0x3c], (EPOCH + "-1").encode()))
    write("resume", "resize-unsubscribe", seed(0xc9, 0x07, hist, [0, 0, 0], 3, [0, 1, 1], (EPOCH + "-4").encode()))


# ---- tls: 4 bytes of settings, then ClientHello bytes or plaintext

def client_hello(**opts):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if opts.get("max") == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if opts.get("min") == "1.3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if opts.get("alpn"):
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    if opts.get("ciphers"):
        ctx.set_ciphers(opts["ciphers"])
    i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
    s = ctx.wrap_bio(i, o, server_hostname=opts.get("sni"))
    try:
        s.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return o.read()


def s_client_hello(args):
    """What `openssl s_client` sends first, recorded by a local socket."""
    if not shutil.which("openssl"):
        return None
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = []

    def serve():
        c, _ = srv.accept()
        c.settimeout(5)
        data = b""
        try:
            while len(data) < 5 or len(data) < 5 + struct.unpack(">H", data[3:5])[0]:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        got.append(data)
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    port = srv.getsockname()[1]
    subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port] + args,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    t.join()
    srv.close()
    return got[0] if got else None


def tls_seeds():
    hellos = {
        "hello-tls13-sni": client_hello(sni="localhost"),
        "hello-tls12-only": client_hello(max="1.2", sni="b.example"),
        "hello-tls13-only-alpn": client_hello(min="1.3", alpn=True, sni="b.example"),
        "hello-no-sni": client_hello(),
        "hello-chacha12": client_hello(max="1.2", ciphers="ECDHE-ECDSA-CHACHA20-POLY1305"),
    }
    for name, args in {"s_client-default": ["-servername", "localhost"],
                       "s_client-tls12-alpn": ["-tls1_2", "-alpn", "http/1.1", "-servername", "b.example"],
                       "s_client-tls13-groups": ["-tls1_3", "-groups", "X25519:P-256", "-noservername"]}.items():
        data = s_client_hello(args)
        if data:
            hellos[name] = data
    for name, data in hellos.items():
        write("tls", "raw-" + name, bytes([0x00, 0, 0, 0]) + data)
    write("tls", "raw-hello-split", bytes([0x06, 3, 0, 0]) + hellos["hello-tls13-sni"])
    write("tls", "raw-alert", bytes([0, 0, 0, 0]) + b"\x15\x03\x03\x00\x02\x02\x28")
    write("tls", "raw-http-on-tls", bytes([0, 0, 0, 0]) + req("GET / HTTP/1.1", ["Host: x"]))
    # handshake mode: f0 bit 0; bits 4-5 client; bit 6 SNI b.example; bit 7 ALPN
    plain = {
        "hs-get": (0x01, 0, 0, 0, req("GET / HTTP/1.1", ["Host: x"]) + req("GET /close HTTP/1.1")),
        "hs12-pipelined-chunks": (0x15, 7, 0x01, 0, req("GET /big HTTP/1.1") + req("POST /echo HTTP/1.1",
                                                                                   ["Content-Length: 3"], b"abc")),
        "hs13-sni-alpn-ws": (0xe1, 0, 0x01, 0, req("GET /ws?sub HTTP/1.1", ["Upgrade: websocket"])
                             + frame(1, b"hello") + frame(8, b"\x03\xe8")),
        "hs-keyupdate-sse": (0x03, 1, 0x06, 0, req("GET /sse?retry HTTP/1.1", ["Last-Event-ID: %s-1" % EPOCH])),
        "hs12-chacha-renegotiate": (0x33, 2, 0x0a, 0, req("GET / HTTP/1.1") + req("GET /echo HTTP/1.1")),
        "hs-raw-tail": (0x09, 0, 0, 7, req("GET / HTTP/1.1") + b"\x17\x03\x03\x00\x02\x00\x00"),
        "hs-rejected": (0x01, 0, 0x10, 0, req("GET / HTTP/1.1")),
        "hs-small-then-big-records": (0x01, 0, 0, 0, req("GET /a HTTP/1.1") * 3 + req("GET /big HTTP/1.1")
                                      + req("GET /b HTTP/1.1")),
    }
    for name, (f0, seed, f2, tail, data) in plain.items():
        write("tls", name, bytes([f0, seed, f2, tail]) + data)


def main():
    targets = sys.argv[1:] or ["http", "ws", "resume", "tls"]
    for t in targets:
        shutil.rmtree(os.path.join(CORPUS, t), ignore_errors=True)
        globals()[t + "_seeds"]()
        print("%s: %d seeds" % (t, len(os.listdir(os.path.join(CORPUS, t)))))


if __name__ == "__main__":
    main()
