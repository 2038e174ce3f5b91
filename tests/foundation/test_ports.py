"""Ports for test servers (cli/natsd.free_port) without the race that failed a fresh-clone CI run (#20
item 9): a port picked by binding to 0 and closed again went to another xdist worker's service."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from cli import natsd

PICK = (
    "import json; from cli import natsd; "
    "print(json.dumps([natsd.free_port() for _ in range(150)]), flush=True); input()"
)


def test_parallel_processes_never_get_the_same_port_and_none_from_the_ephemeral_range():
    workers = [
        subprocess.Popen([sys.executable, "-c", PICK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        picked = [json.loads(w.stdout.readline()) for w in workers]  # each still holds its ports
    finally:
        for w in workers:
            w.communicate("\n", timeout=30)
    every = [port for ports in picked for port in ports]
    assert len(every) == len(set(every)) == 600
    ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert max(every) < ephemeral_low


def test_a_port_something_listens_on_is_never_handed_out(monkeypatch):
    with socket.socket() as busy:
        for port in range(*natsd.PORT_RANGE):
            try:
                busy.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        busy.listen()
        monkeypatch.setattr(natsd.random, "randrange", lambda low, high: port)  # start the search at the busy one
        assert natsd.free_port() != port
