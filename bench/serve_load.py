"""`gptkit serve` under load: N streaming chat clients for a bounded time, and bad requests.

Starts `python -m gptkit serve` on a free loopback port (or uses a running server, --url),
runs one client for a third of --seconds (the baseline), then N clients for --seconds; a
client starts no request after the time is up and finishes the one in flight. During the
N-client run another task sends, three times each, bad requests (malformed JSON, wrong types,
empty messages, an unknown model, a body over --max-body-bytes, max_tokens 10**9: over the
server's --max-tokens), a request with max_tokens unset (capped), and streams it drops after
the first chunk, and checks every answer; then /health must show no running or waiting
sequence within 10 s. The server is always stopped at the end.

Then the hostile mix (issue 23), each for --hostile-seconds while one small request (a
non-streamed 8-token completion) is sent again and again: idle (the baseline), abandoned
non-streaming requests (n=8, a long max_tokens, the client gone after 1 s), megabyte prompts
(refused as too long for the context, after tokenizing), and one prompt of nearly the whole
context (8k tokens for SmolLM2) prefilled among them. Reported: the small request's p50/p99
latency in each, against the idle p99 (target: at most 2x).

    .venv/bin/python bench/serve_load.py [--clients 8] [--seconds 60] [--max-tokens 32]
        [--model smollm2-135m-instruct] [--max-batch 8] [--url URL] [--json OUT]
        [--hostile-seconds SECONDS/3] [--prefill-chunk N]

Prints per phase: requests, requests/s, completion tokens/s (all clients together), p50/p99
time to first token and latency, tokens per request; the N-client/1-client tokens/s speedup;
the bad requests answered right; the errors with their reasons. Exits 1 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import httpx

PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, for a ten-year-old who asked at dinner.",
    "Here is a story opening: 'The lighthouse keeper found a letter in a bottle on the rocks "
    "one morning, addressed to him, in his own handwriting, dated ten years from now.' Write "
    "the next paragraph, keeping the same calm, mysterious tone, and name the keeper.",
]
CHAT = "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}
JSON = {"Content-Type": "application/json"}


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


async def stream_chat(http: httpx.AsyncClient, args, prompt: str, seed: int):
    """One streaming chat completion read to [DONE]: (ttft, latency, completion tokens);
    ttft is None when no chunk had text. Raises on anything wrong."""
    messages = [{"role": "user", "content": prompt}]
    body = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens}
    body |= {"temperature": 0.7, "seed": seed, "stream": True}
    body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    ttft = usage = finish = None
    async with http.stream("POST", CHAT, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error'].get('message')}")
            if chunk.get("object") != "chat.completion.chunk":
                raise RuntimeError(f"malformed chunk: {line[:200]}")
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - start
                finish = choice["finish_reason"] or finish
        else:
            raise RuntimeError("the stream ended without [DONE]")
    if usage is None or finish not in ("stop", "length"):
        raise RuntimeError(f"no usage chunk, or finish_reason {finish!r}")
    return ttft, time.perf_counter() - start, usage["completion_tokens"]


async def phase(args, clients: int, seconds: float, errors: list, side=None) -> dict:
    """`clients` looping clients for `seconds` (and `side`, a coroutine, alongside)."""
    done: list[tuple[float | None, float, int]] = []
    start = time.perf_counter()

    async def client(k: int, http: httpx.AsyncClient) -> None:
        i = 0
        while time.perf_counter() < start + seconds:
            try:
                prompt = PROMPTS[(k + i) % len(PROMPTS)]
                done.append(await stream_chat(http, args, prompt, seed=1000 * k + i))
            except Exception as e:
                errors.append(f"{clients}-client request: {type(e).__name__}: {e}")
            i += 1

    side = asyncio.create_task(side) if side else None
    async with httpx.AsyncClient(base_url=args.url, timeout=120) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    wall = time.perf_counter() - start
    if side:
        await side
    ttfts = [t for t, _, _ in done if t is not None]
    latencies, tokens = [s for _, s, _ in done], sum(n for _, _, n in done)
    stats = {
        "clients": clients,
        "seconds": wall,
        "requests": len(done),
        "requests_per_s": len(done) / wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_request": tokens / max(1, len(done)),
    }
    for q in (50, 99):
        stats[f"ttft_p{q}"] = percentile(ttfts, q / 100)
        stats[f"latency_p{q}"] = percentile(latencies, q / 100)
    return stats


def error_shape(r: httpx.Response, status: int) -> str | None:
    """None if r is `status` with OpenAI's error body, else what is wrong."""
    if r.status_code != status:
        return f"status {r.status_code} (expected {status}): {r.text[:200]}"
    try:
        if set(error := r.json()["error"]) == ERROR_KEYS and error["message"]:
            return None
    except Exception:
        pass
    return f"not OpenAI's error shape: {r.text[:200]}"


async def bad_requests(args, context: int, seconds: float, tally: dict, errors: list) -> None:
    """Each bad request three times, spread over `seconds`; tally[name] = [tried, right]."""

    def chat(**fields) -> dict:
        hi = [{"role": "user", "content": "Hi"}]
        return {"model": args.model, "messages": hi, "max_tokens": 4, **fields}

    def refused(status: int, body: dict | None = None, raw: bytes | None = None):
        async def send(http) -> str | None:
            return error_shape(await http.post(CHAT, json=body, content=raw, headers=JSON), status)

        return send

    async def unset(http) -> str | None:  # a short answer, so that it ends soon anyway
        ask = [{"role": "user", "content": "Answer with one word: what color is the sky?"}]
        r = await http.post(CHAT, json=chat(messages=ask, max_tokens=None, temperature=0))
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        reason, used = r.json()["choices"][0]["finish_reason"], r.json()["usage"]
        if reason not in ("stop", "length") or used["completion_tokens"] >= context:
            return f"finish_reason {reason!r}, {used['completion_tokens']} tokens"
        return None

    async def dropped(http) -> str | None:
        # It asks for all the room there is: its slot is empty at the end only if it was freed.
        async with (
            httpx.AsyncClient(base_url=args.url, timeout=60) as own,  # its own connection
            own.stream("POST", CHAT, json=chat(stream=True, max_tokens=None)) as r,
        ):
            if r.status_code != 200:
                return f"status {r.status_code}"
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return None  # leaving the block closes the connection mid-stream
        return "the stream ended before its first chunk"

    big = [{"role": "user", "content": "x" * args.max_body_bytes}]
    checks = {
        "malformed JSON -> 400": refused(400, raw=b'{"model": "x", '),
        "temperature 'hot' -> 400": refused(400, chat(temperature="hot")),
        "messages a string -> 400": refused(400, chat(messages="Hi")),
        "messages [] -> 400": refused(400, chat(messages=[])),
        "unknown model -> 404": refused(404, chat(model="no-such-model")),
        f"body > {args.max_body_bytes} bytes -> 413": refused(413, chat(messages=big)),
        "max_tokens 10**9 -> 400": refused(400, chat(max_tokens=10**9)),
        "max_tokens unset -> 200, capped": unset,
        "stream dropped after 1st chunk": dropped,
    }
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=args.url, timeout=120) as http:
        for k in range(3):
            await asyncio.sleep(max(0, start + 1 + seconds * k / 3 - time.perf_counter()))
            for name, check in checks.items():
                try:
                    wrong = await check(http)
                except Exception as e:
                    wrong = f"{type(e).__name__}: {e}"
                tried, right = tally.get(name, (0, 0))
                tally[name] = [tried + 1, right + (wrong is None)]
                if wrong:
                    errors.append(f"{name}: {wrong}")


async def slots_freed(url: str) -> bool:
    """Whether /health shows no running and no waiting sequence within 10 s."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(40):
            health = (await http.get("/health")).json()
            if health["running"] == 0 and health["waiting"] == 0:
                return True
            await asyncio.sleep(0.25)
    print(f"/health 10 s after the run: {health}")
    return False


async def probe_during(args, seconds: float, load, errors: list) -> dict:
    """The small request, one after another for `seconds`, while `load` (a coroutine taking a
    stop event, or None) runs alongside: its latencies' p50 and p99."""
    body = {"model": args.model, "prompt": "Hi", "max_tokens": 8, "temperature": 0}
    stop = asyncio.Event()
    side = asyncio.create_task(load(stop)) if load else None
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=args.url, timeout=300) as http:
        await asyncio.sleep(1.0 if load else 0)  # the load is under way first
        end = time.perf_counter() + seconds
        while not latencies or time.perf_counter() < end:  # at least one
            t = time.perf_counter()
            r = await http.post("/v1/completions", json=body)
            if r.status_code != 200:
                errors.append(f"small request during load: status {r.status_code}")
            latencies.append(time.perf_counter() - t)
    stop.set()
    if side:  # the client hangs up on what is in flight (an 8k prompt can take a while)
        side.cancel()
        with suppress(BaseException):
            await side
    return {
        "probes": len(latencies),
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
    }


async def hostile(args, context: int, errors: list) -> dict:
    """The hostile mix of issue 23, one kind at a time, each against the small request."""

    async def abandoned(stop: asyncio.Event) -> None:
        body = {"model": args.model, "prompt": "Tell me a long story. " * 8, "n": 8}
        body |= {"max_tokens": 4000, "temperature": 1.0}
        while not stop.is_set():
            async with httpx.AsyncClient(base_url=args.url, timeout=60) as own:
                with suppress(TimeoutError):  # the client gives up after 1 s and hangs up
                    await asyncio.wait_for(own.post("/v1/completions", json=body), 1.0)

    async def megabyte(stop: asyncio.Event) -> None:
        text = "hello " * (args.max_body_bytes // 6 - 100)  # just under the body limit
        body = {"model": args.model, "messages": [{"role": "user", "content": text}]}

        async def one_sender() -> None:
            async with httpx.AsyncClient(base_url=args.url, timeout=120) as http:
                while not stop.is_set():
                    r = await http.post(CHAT, json=body)
                    if r.status_code != 400:  # too long for any context: refused after encoding
                        errors.append(f"megabyte prompt: status {r.status_code}")

        await asyncio.gather(one_sender(), one_sender())

    async def long_prompt(stop: asyncio.Event) -> None:
        words = max(16, min(context, 8192) - 300)  # ~1 token a word for most tokenizers
        body = {"model": args.model, "prompt": "hello " * words, "max_tokens": 1}
        async with httpx.AsyncClient(base_url=args.url, timeout=600) as http:
            while not stop.is_set():
                r = await http.post("/v1/completions", json=body)
                if r.status_code not in (200, 400):
                    errors.append(f"long prompt: status {r.status_code}")

    seconds = args.hostile_seconds
    results = {"idle": await probe_during(args, seconds, None, errors)}
    for name, load in (
        ("abandoned non-streaming", abandoned),
        ("megabyte prompts", megabyte),
        ("one 8k-token prompt", long_prompt),
    ):
        results[name] = await probe_during(args, seconds, load, errors)
        await slots_freed(args.url)  # the next kind starts on an idle server
    return results


async def run(args) -> dict:
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=args.url, timeout=30) as http:
        card = (await http.get("/v1/models")).json()["data"][0]
    args.model, context = card["id"], card.get("context_length", 1 << 30)
    results: dict = {"errors": errors}
    if args.seconds > 0:
        base = await phase(args, 1, args.seconds / 3, errors)
        tally: dict[str, list[int]] = {}
        side = bad_requests(args, context, args.seconds, tally, errors)
        load = await phase(args, args.clients, args.seconds, errors, side)
        results |= {"baseline": base, "load": load, "bad": tally}
    if args.hostile_seconds > 0:
        results["hostile"] = await hostile(args, context, errors)
    results["freed"] = await slots_freed(args.url)
    return results


ROWS = {  # label: (key, format)
    "wall seconds": ("seconds", "{:.1f}"),
    "requests completed": ("requests", "{:d}"),
    "requests/s": ("requests_per_s", "{:.2f}"),
    "completion tok/s": ("tokens_per_s", "{:.1f}"),
    "TTFT p50 (s)": ("ttft_p50", "{:.3f}"),
    "TTFT p99 (s)": ("ttft_p99", "{:.3f}"),
    "latency p50 (s)": ("latency_p50", "{:.3f}"),
    "latency p99 (s)": ("latency_p99", "{:.3f}"),
    "tokens/request": ("tokens_per_request", "{:.1f}"),
}


def report(args, results: dict) -> None:
    if "baseline" in results:
        report_load(args, results)
    if "hostile" in results:
        hostile = results["hostile"]
        idle = hostile["idle"]["p99"]
        print("\nsmall request (8-token completion) latency, seconds:")
        print(f"{'during':<26} {'probes':>6} {'p50':>7} {'p99':>7} {'p99/idle':>9}  <= 2x")
        for name, row in hostile.items():
            ratio = row["p99"] / idle
            met = "yes" if ratio <= 2 else "no"
            print(
                f"{name:<26} {row['probes']:>6} {row['p50']:>7.3f} {row['p99']:>7.3f} "
                f"{ratio:>8.2f}x  {met}"
            )
    print(f"slots freed after the run (/health running 0, waiting 0): {results['freed']}")
    print(f"errors: {len(results['errors'])}")
    for reason, count in Counter(results["errors"]).most_common():
        print(f"  {count} x {reason}")


def report_load(args, results: dict) -> None:
    base, load = results["baseline"], results["load"]
    print(f"gptkit serve {args.model} at {args.url}, max_tokens {args.max_tokens}")
    print(f"{'':<22} {'1 client':>10} {f'{args.clients} clients':>11}")
    for label, (key, fmt) in ROWS.items():
        print(f"{label:<22} {fmt.format(base[key]):>10} {fmt.format(load[key]):>11}")
    speedup = load["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else math.nan
    print(f"batching speedup (tokens/s, {args.clients} clients / 1): {speedup:.2f}x\n")
    print(f"{'bad request':<36} {'tried':>5} {'right':>5}")
    for name, (tried, right) in results["bad"].items():
        print(f"{name:<36} {tried:>5} {right:>5}")


@contextmanager
def serving(args):
    """`python -m gptkit serve` on a free loopback port (args.url) while the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gptkit", "serve", "--model", args.model, "--port", str(port)]
    command += ["--host", "127.0.0.1", "--max-batch", str(args.max_batch)]
    command += ["--max-body-bytes", str(args.max_body_bytes)]
    if args.prefill_chunk:
        command += ["--prefill-chunk", str(args.prefill_chunk)]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not health_ok(args.url):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start; its log:\n{log.read()[-3000:]}")
                time.sleep(0.5)
            yield
        finally:  # terminate, then kill
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def health_ok(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--seconds", type=float, default=60, help="the N-client run's length")
    parser.add_argument("--max-tokens", type=int, default=32, help="per request")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    parser.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="the server's limit (1 MiB)"
    )
    parser.add_argument(
        "--hostile-seconds", type=float, help="each hostile phase (default: --seconds / 3; 0: none)"
    )
    parser.add_argument("--prefill-chunk", type=int, help="the server's --prefill-chunk")
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.hostile_seconds is None:
        args.hostile_seconds = args.seconds / 3
    with nullcontext() if args.url else serving(args):
        results = asyncio.run(run(args))
    report(args, results)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {**vars(args), "json": str(args.json)}, **results})
        )
    return 1 if results["errors"] or not results["freed"] else 0


if __name__ == "__main__":
    sys.exit(main())
