"""``moec serve`` throughput with 1, 4 and 16 concurrent clients: a real uvicorn on 127.0.0.1 and
httpx clients in one process, generated tokens per second of wall time.

    python benchmarks/serve_throughput.py [RUN_DIR] [--clients 1 4 16] [--new 32] [--rounds 3] [--compile]

Without RUN_DIR a token_routed_tiny run of 2 steps is trained first (the weights do not change
the cost of a step). Each client sends one greedy request (a 16-byte prompt, ``--new`` tokens)
and waits for it; the engine decodes every active request in one batched step (``--slots``,
default 16). Each round runs every client count once, in turn; the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

import moec
from moec.serve.codec import codec_for
from moec.serve.engine import Engine
from moec.serve.generate import Generator
from moec.serve.server import create_app
from moec.train.trainer import Trainer


def trained_run() -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="moec-serve-bench-")) / "run"
    spec = moec.load_spec("specs/token_routed_tiny.yaml", overrides=["train.steps=2", "train.lr_schedule.warmup_steps=1",
                                                                      "schedule.compile.enabled=false"])
    Trainer(spec, run_dir=run_dir).run()
    return run_dir


def start_server(run_dir: Path, slots: int, compile_decode: bool):
    model, spec = moec.load_trained(run_dir)
    engine = Engine(Generator(model, spec, compile=compile_decode), slots=slots, queue_limit=256, prefix_cache_tokens=0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, codec_for(spec), spec, model.checkpoint), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, engine, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def burst(url: str, clients: int, new: int) -> float:
    """Tokens per second while ``clients`` requests run at once."""
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> int:
            body = {"prompt": f"def function_{i:04d}(", "max_new_tokens": new, "temperature": 0.0}
            reply = await client.post(f"{url}/generate", json=body)
            reply.raise_for_status()
            return len(reply.json()["tokens"])
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(clients))))
        return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="compile the decode buckets (torch.compile)")
    args = parser.parse_args()
    server, engine, url = start_server(args.run_dir or trained_run(), args.slots, args.compile)
    try:
        asyncio.run(burst(url, max(args.clients), 4))  # warm-up: every bucket the runs will use
        rates: dict[int, list[float]] = {n: [] for n in args.clients}
        for _ in range(args.rounds):
            for clients in args.clients:
                rates[clients].append(asyncio.run(burst(url, clients, args.new)))
        print(f"# moec serve, token_routed_tiny-sized model, {args.slots} slots, {args.new} greedy tokens per request, "
              f"medians of {args.rounds} rounds (compile {'on' if args.compile else 'off'})")
        single = statistics.median(rates[args.clients[0]])
        for clients, values in rates.items():
            rate = statistics.median(values)
            print(f"  {clients:3d} clients  {rate:8.1f} tokens/s  ({rate / single:.2f}x {args.clients[0]} client)")
        print(f"  largest batch decoded in one step: {engine.stats()['max_batch']}")
    finally:
        server.should_exit = True
        engine.stop()


if __name__ == "__main__":
    main()
