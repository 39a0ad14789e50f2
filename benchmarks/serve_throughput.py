"""``moec serve`` throughput and time to first token with 1, 4 and 16 concurrent clients, per route.

    python benchmarks/serve_throughput.py [RUN_DIR] [--clients 1 4 16] [--new 32] [--rounds 8] [--routes ...] [--compile]

The server is ``moec serve`` in its own process on 127.0.0.1 (``--slots 16``, no prefix
cache); the clients are httpx in this one. Without RUN_DIR a token_routed_tiny run of 2 steps
is trained first (the weights do not change the cost of a step). In a burst, each client
sends one streamed greedy request (a 16-byte prompt, ``--new`` tokens) and reads it to the
end; requests/s and generated tokens/s are over the burst's wall time, the time to first
token is each request's, from sending to its first token's event, and the server's CPU time
per generated token (user + system, from /proc: Linux) is a figure that the other loads of a
shared machine disturb less than wall time. Routes: the old
``POST /generate``, and ``POST /v1/completions`` with the same prompt and tokens;
``POST /v1/chat/completions`` sends the prompt as a user message, which the chat template
lengthens (so it is shown, not compared). Each round runs every route and client count in
turn, the routes in reverse order every other round; the table shows medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions"]


def body(route: str, model: str, prompt: str, new: int) -> dict:
    """A streamed greedy request; the OpenAI routes ask for the usage chunk (the token count)."""
    if route == "/generate":
        return {"prompt": prompt, "max_new_tokens": new, "temperature": 0.0, "stream": True}
    given = {"prompt": prompt} if route == "/v1/completions" else {"messages": [{"role": "user", "content": prompt}]}
    return {"model": model, **given, "max_tokens": new, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}


def trained_run() -> Path:
    import moec
    from moec.train.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="moec-serve-bench-")) / "run"
    spec = moec.load_spec("specs/token_routed_tiny.yaml", overrides=["train.steps=2", "train.lr_schedule.warmup_steps=1",
                                                                      "schedule.compile.enabled=false"])
    Trainer(spec, run_dir=run_dir).run()
    return run_dir


def start_server(run_dir: Path, slots: int, compile_decode: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "moec.cli.main", "serve", str(run_dir), "--port", str(port), "--slots", str(slots),
               "--queue", "256", "--prefix-cache-tokens", "0"] + ([] if compile_decode else ["--no-compile"])
    server = subprocess.Popen(command, env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moec serve did not start in 300 s")


async def one(client: httpx.AsyncClient, url: str, route: str, model: str, prompt: str, new: int) -> tuple[float, int]:
    """(seconds to the first token's event, tokens generated) of one streamed request."""
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + route, json=body(route, model, prompt, new)) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "token" in event or event.get("choices"):
                first = first or time.perf_counter() - start
            tokens = event.get("tokens") or event.get("usage", {}).get("completion_tokens") or tokens  # the last event's
    return first or float("nan"), tokens


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def burst(url: str, route: str, model: str, clients: int, new: int, pid: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        cpu, start = cpu_seconds(pid), time.perf_counter()
        done = await asyncio.gather(*(one(client, url, route, model, f"def function_{i:04d}(", new) for i in range(clients)))
        wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    tokens = sum(t for _, t in done)
    return {"requests_per_s": clients / wall, "tokens_per_s": tokens / wall,
            "ttft_ms": 1000 * statistics.median(f for f, _ in done), "cpu_ms_per_token": 1000 * cpu / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--routes", nargs="+", default=ROUTES, choices=ROUTES)
    parser.add_argument("--compile", action="store_true", help="compile the decode buckets (torch.compile)")
    args = parser.parse_args()
    run_dir = args.run_dir or trained_run()
    server, url = start_server(run_dir, args.slots, args.compile)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        for route in args.routes:  # warm-up: every bucket the runs will use
            asyncio.run(burst(url, route, model, max(args.clients), 4, server.pid))
        rows: dict[tuple[str, int], list[dict]] = {}
        for round_ in range(args.rounds):
            for clients in args.clients:
                # the route that goes first in a round measured ~10% faster: odd rounds run the routes in reverse
                for route in args.routes if round_ % 2 == 0 else args.routes[::-1]:
                    rows.setdefault((route, clients), []).append(asyncio.run(burst(url, route, model, clients, args.new,
                                                                                   server.pid)))
        print(f"# moec serve {model}, {args.slots} slots, {args.new} greedy streamed tokens per request, medians of "
              f"{args.rounds} rounds (compile {'on' if args.compile else 'off'})")
        print("| route | clients | requests/s | tokens/s | time to first token (ms) | server CPU ms / token |\n"
              "| --- | --- | --- | --- | --- | --- |")
        for (route, clients), values in rows.items():
            median = {key: statistics.median(v[key] for v in values) for key in values[0]}
            print(f"| `{route}` | {clients} | {median['requests_per_s']:.2f} | {median['tokens_per_s']:.1f} | "
                  f"{median['ttft_ms']:.1f} | {median['cpu_ms_per_token']:.2f} |")
        stats = httpx.get(f"{url}/stats", timeout=10).json()
        print(f"largest batch decoded in one step: {stats['max_batch']}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
