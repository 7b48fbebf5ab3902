#!/usr/bin/env python3
"""What one TCP connection costs this machine's kernel, both ends in one process.

Opens N loopback connections one after another (connect, accept, one small exchange each
way, both FINs, both closes) and reports the process's system and user time per
connection, then the same exchanges on one kept connection: the difference is what opening
and closing a connection costs, before any epoll registration, socket option or wake-up of
another process. Used in benches/RESULTS.md ("Where a new tunnel's CPU goes").

    python3 scripts/tcp-cost.py [N] [ROUNDS]
"""
import resource
import socket
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3


def times():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_stime, r.ru_utime


def per_conn(t0, t1):
    return tuple(round((b - a) / N * 1e6, 1) for a, b in zip(t0, t1))


def fresh_connections(listener, addr):
    t0 = times()
    for _ in range(N):
        c = socket.create_connection(addr)
        s, _ = listener.accept()
        c.sendall(b"x")
        s.recv(16)
        s.sendall(b"y")
        c.recv(16)
        c.shutdown(socket.SHUT_WR)
        s.recv(16)
        s.shutdown(socket.SHUT_WR)
        c.recv(16)
        c.close()
        s.close()
    return per_conn(t0, times())


def kept_connection(listener, addr):
    c = socket.create_connection(addr)
    s, _ = listener.accept()
    t0 = times()
    for _ in range(N):
        # As many sends and receives as a fresh connection's exchange and FINs.
        for _ in range(2):
            c.sendall(b"x")
            s.recv(16)
            s.sendall(b"y")
            c.recv(16)
    result = per_conn(t0, times())
    c.close()
    s.close()
    return result


def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    addr = listener.getsockname()
    print(f"{N} connections per round; µs per connection as (system, user)")
    for _ in range(ROUNDS):
        print(f"  fresh connection {fresh_connections(listener, addr)}   "
              f"kept connection {kept_connection(listener, addr)}")


if __name__ == "__main__":
    main()
