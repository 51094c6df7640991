"""A TLS client that says it is done right after its request, for
spec/tls_spec.lua (run by Debian's /usr/bin/python3).

    half_close.py PORT VERSION      (VERSION: 1.2 or 1.3)

Over memory BIOs: handshakes with 127.0.0.1:PORT (SNI a.test, no
verification), sends one GET /ping and at once its close_notify, keeping
the TCP connection open, then reads until the server closes. Prints the
version negotiated on the first line, then what came back, with
"<close_notify>" where the server's close_notify arrived and "<eof>" where
the TCP connection ended. Every read is bounded (3 s).
"""
import socket
import ssl
import sys


def main(port, version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    wanted = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = ctx.maximum_version = wanted
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
    sock = socket.create_connection(("127.0.0.1", port), timeout=3)

    def flush():
        data = outgoing.read()
        if data:
            sock.sendall(data)

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            flush()
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the server closed during the handshake")
            incoming.write(data)
    flush()
    print(tls.version(), flush=True)

    tls.write(b"GET /ping HTTP/1.1\r\nHost: a.test\r\n\r\n")
    try:
        tls.unwrap()  # our close_notify; the server's has not come yet
    except ssl.SSLWantReadError:
        pass
    flush()

    got = []
    while True:
        data = sock.recv(65536)
        if not data:
            got.append("<eof>")
            break
        incoming.write(data)
        while True:
            try:
                plain = tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                got.append("<close_notify>")
                break
            if not plain:
                break
            got.append(plain.decode("latin-1"))
    sock.close()
    print("".join(got), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
