"""A real uvicorn on 127.0.0.1 (an ephemeral port) over a served model, for the server tests."""

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn

from moec.serve.engine import Engine
from moec.serve.generate import Generator
from moec.serve.load import load_served
from moec.serve.server import create_app

BYTE_MODEL = "quick"  # the served id of the tiny trained run (its spec's name)


def loopback_socket() -> socket.socket:
    """A socket on 127.0.0.1, an ephemeral port. Its protocol is named so that asyncio sets TCP_NODELAY on the
    connections (it does only for proto IPPROTO_TCP): else each small answer waits ~40 ms for a delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running_server(source, **engine_options):
    """The URL of a server over ``source`` (a run, a checkpoint or an imported spec file), stopped on exit."""
    model, spec, codec = load_served(source)
    engine = Engine(Generator(model, spec, compile=False), **engine_options)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, codec, spec, model.checkpoint), log_level="warning"))
    sock = loopback_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


def byte_ids(tokens: list[str]) -> list[int]:
    """The ids of the byte codec's token strings in ``logprobs.tokens`` (``bytes:\\xNN`` past ASCII)."""
    return [int(t[len("bytes:\\x"):], 16) if t.startswith("bytes:\\x") else ord(t) for t in tokens]
