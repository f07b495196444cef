#!/usr/bin/env python3
"""A client that holds ONE TCP connection to a kvstore (Redis protocol) and checks the
invariants of the fault-tolerant pair while the primary is killed under it:

- the connection is never reset (the backup continues the same TCP session);
- INCR on a counter continues without a gap (no acknowledged increment is lost or repeated);
- every acknowledged SET of a unique key is readable afterwards.

Usage: kv-checker.py HOST PORT SECONDS  -> prints one JSON line; exit 0 if all invariants hold.
The longest time without a reply is reported as the client-observed outage.
"""
import json
import socket
import sys
import time


def command(sock, buf, *args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    sock.sendall(out)
    return read_reply(sock, buf)


def read_line(sock, buf):
    while b"\r\n" not in buf[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf[0] += chunk
    line, buf[0] = buf[0].split(b"\r\n", 1)
    return line


def read_reply(sock, buf):
    line = read_line(sock, buf)
    kind, rest = line[:1], line[1:]
    if kind in (b"+", b"-", b":"):
        return (kind, rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return (b"$", None)
        while len(buf[0]) < n + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            buf[0] += chunk
        data, buf[0] = buf[0][:n], buf[0][n + 2:]
        return (b"$", data)
    raise ValueError("unexpected reply %r" % line)


def main():
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sock = socket.create_connection((host, port), timeout=10)
    buf = [b""]
    result = {"ops": 0, "errors": [], "reset": False, "counter_gaps": 0, "lost_sets": 0, "outage_ms": 0.0}
    counter = None
    acked = []
    last_reply = time.monotonic()
    end = last_reply + seconds
    i = 0
    try:
        while time.monotonic() < end:
            kind, value = command(sock, buf, "INCR", "checker:counter")
            if kind != b":":
                result["errors"].append("INCR: %r" % value)
                break
            n = int(value)
            if counter is not None and n != counter + 1:
                result["counter_gaps"] += 1
            counter = n
            kind, value = command(sock, buf, "SET", "checker:key:%d" % i, "value-%d" % i)
            if kind != b"+":
                result["errors"].append("SET: %r" % value)
                break
            acked.append(i)
            now = time.monotonic()
            result["outage_ms"] = max(result["outage_ms"], (now - last_reply) * 1000)
            last_reply = now
            result["ops"] += 2
            i += 1
            time.sleep(0.002)
        for k in acked:
            kind, value = command(sock, buf, "GET", "checker:key:%d" % k)
            if value != b"value-%d" % k:
                result["lost_sets"] += 1
    except (ConnectionError, OSError) as e:
        result["reset"] = True
        result["errors"].append(str(e))
    result["sets"] = len(acked)
    result["counter"] = counter
    print(json.dumps(result))
    ok = not result["reset"] and not result["errors"] and result["counter_gaps"] == 0 and result["lost_sets"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
