"""`serving_profile.py`'s `haproxy+direct` layout finds the replica's own HTTP port: the listening
port of the replica process that answers `/info`."""

from __future__ import annotations

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.peer_rotate import parent_pid
from benchmarks.serving_profile import listening_ports, replica_port


class InfoHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/info" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    mute = socket.socket()  # listens, never answers HTTP (like Ray's other ports)
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    mute.settimeout(0.1)
    http = ThreadingHTTPServer(("127.0.0.1", 0), InfoHandler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield mute.getsockname()[1], http.server_address[1]
    http.shutdown()
    http.server_close()
    mute.close()


def test_listening_ports_of_this_process(servers):
    mute, http = servers
    ports = listening_ports(os.getpid())
    assert mute in ports and http in ports


def test_replica_port_is_the_one_answering_info(servers):
    _, http = servers
    assert replica_port(os.getpid()) == http


def test_parent_pid():
    assert parent_pid(os.getpid()) == os.getppid()
