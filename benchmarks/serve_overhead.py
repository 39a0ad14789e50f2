"""The server's own cost per streamed token, route against route, with no model: what the routes add to a decode step.

    python benchmarks/serve_overhead.py [--tokens 20000] [--rounds 5]

A request's output queue is filled with ``--tokens`` byte tokens, then drained through each
route's streaming code as the server runs it: ``/generate``'s events, and
``/v1/completions``' choice events and OpenAI chunks (one choice, no stop strings, no
log-probabilities; with ``logprobs: 1`` as a third row). Medians of interleaved rounds, in
microseconds per token, on one core of the machine it runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from moec.serve import openai_format as fmt
from moec.serve.choices import Job, events, merged
from moec.serve.codec import BytesCodec
from moec.serve.request import DONE, Request, Sampled
from moec.serve.sampling import Sampling
from moec.serve.server import _events


async def filled(tokens: int, logprobs: bool) -> Request:
    request = Request([1], tokens, Sampling(), 0, asyncio.get_running_loop())
    for i in range(tokens):
        token = 97 + i % 20
        request.output.put_nowait(Sampled(token, -1.5, ((token, -1.5),)) if logprobs else Sampled(token))
    request.output.put_nowait(DONE)
    return request


async def generate_route(tokens: int) -> float:
    request = await filled(tokens, False)
    start = time.perf_counter()
    async for _ in _events(request, BytesCodec().decoder()):
        pass
    return time.perf_counter() - start


async def completions_route(tokens: int, logprobs: bool = False) -> float:
    request = await filled(tokens, logprobs)
    job = Job(0, [1], tokens, Sampling(), 0, logprobs=1 if logprobs else None)
    answer = fmt.Answer.new("text_completion", "model", 1, logprobs)
    start = time.perf_counter()
    async for _ in fmt.stream(answer, merged([events(job, request, BytesCodec())]), True, lambda: None):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    routes = {"/generate (stream)": lambda: generate_route(args.tokens),
              "/v1/completions (stream)": lambda: completions_route(args.tokens),
              "/v1/completions (stream, logprobs 1)": lambda: completions_route(args.tokens, True)}
    times: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(args.rounds):
        for name, run in routes.items():
            times[name].append(asyncio.run(run()) / args.tokens * 1e6)
    print(f"# server-side Python per streamed token, {args.tokens} tokens, medians of {args.rounds} rounds")
    for name, values in times.items():
        print(f"  {name:40s} {statistics.median(values):6.2f} us/token")


if __name__ == "__main__":
    main()
