"""``kvtier bench serve``: load an OpenAI-compatible server the way ``vllm bench serve`` does.

Requests arrive as a Poisson process at ``--request-rate`` (or all at once), optionally capped at
``--max-concurrency`` in flight; prompts are synthetic (random words, ~1 token each, lengths drawn
around ``--random-input-len``) or replayed from a JSONL trace. Every request streams, so the client
sees TTFT, TPOT, ITL and end-to-end latency; token counts come from the server's ``usage``. The run
is bounded by ``--num-prompts`` and ``--max-duration`` and only targets this machine (loopback).

Trace lines: ``{"prompt": str, "output_len": int, "timestamp": float}`` (``timestamp``: seconds after
the start, optional; when every line has one the trace is replayed on its own clock).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import click

from kvtier.errors import ConfigError

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there one all we their been has when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men "
         "work long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three").split()
MAX_PROMPTS = 100_000


@dataclass(slots=True)
class BenchRequest:
    prompt: str
    output_len: int
    timestamp: float | None = None  # seconds after the start (traces)


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ---- workload -----------------------------------------------------------------------------------

def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[BenchRequest]:
    """Prompts of random words (~1 token each) with lengths uniform in len * [1 - ratio, 1 + ratio]."""
    assert 0.0 <= range_ratio < 1.0 and input_len >= 1 and output_len >= 1
    rng = random.Random(seed)
    draw = lambda length: rng.randint(max(1, int(length * (1 - range_ratio))), int(length * (1 + range_ratio)))
    return [BenchRequest(" ".join(rng.choices(WORDS, k=draw(input_len))), draw(output_len)) for _ in range(n)]


def load_trace(path: Path) -> list[BenchRequest]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(BenchRequest(str(row["prompt"]), int(row.get("output_len", row.get("max_tokens", 0))),
                                    None if row.get("timestamp") is None else float(row["timestamp"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{i} is not a trace line ({e})",
                              'write one {"prompt": str, "output_len": int, "timestamp": float} per line') from e
        if out[-1].output_len < 1:
            raise ConfigError(f"{path}:{i}: output_len must be >= 1")
    if not out:
        raise ConfigError(f"{path} holds no requests", "write one JSON object per line")
    return out


def write_trace(path: Path, requests: list[BenchRequest]) -> None:
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in requests))


def arrival_times(requests: list[BenchRequest], rate: float, seed: int) -> list[float]:
    """Seconds after the start: the trace's own clock, else a Poisson process at ``rate`` (inf: all at 0)."""
    if all(r.timestamp is not None for r in requests):
        return [r.timestamp for r in requests]
    if rate == float("inf"):
        return [0.0] * len(requests)
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in requests:
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---- client -------------------------------------------------------------------------------------

@dataclass(slots=True)
class Target:
    base_url: str
    endpoint: str
    model: str
    api_key: str | None = None
    ignore_eos: bool = True

    @property
    def chat(self) -> bool:
        return "chat" in self.endpoint

    def payload(self, req: BenchRequest) -> dict:
        body = {"model": self.model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        return body

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def send_one(client, target: Target, req: BenchRequest) -> RequestResult:
    """One streamed request, timed from the moment it is sent."""
    import httpx

    start = time.perf_counter()
    res = RequestResult(ok=False)
    try:
        async with client.stream("POST", target.base_url + target.endpoint, json=target.payload(req),
                                 headers=target.headers()) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200].decode(errors='replace')}"
                return res
            await _read_stream(resp, res, start, target.chat)
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.e2e_s = time.perf_counter() - start
    return res


async def _read_stream(resp, res: RequestResult, start: float, chat: bool) -> None:
    """Read SSE chunks until [DONE] (or the end of a stream whose choice finished: some servers send no [DONE])."""
    last, pieces, finished = None, 0, False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            finished = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            res.error = str(chunk["error"].get("message", chunk["error"]))
        usage = chunk.get("usage")
        if usage:
            res.prompt_tokens, res.output_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or [])
        if _chunk_text(chunk, chat):
            now = time.perf_counter()
            if res.ttft_s is None:
                res.ttft_s = now - start
            else:
                res.itl_s.append(now - last)
            last, pieces = now, pieces + 1
    res.ok = finished and res.error is None
    if res.ok and res.output_tokens == 0:
        res.output_tokens = pieces  # no usage from the server: one token per chunk, roughly


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def run_requests(target: Target, requests: list[BenchRequest], arrivals: list[float],
                       max_concurrency: int | None, max_duration: float) -> tuple[list[RequestResult], float, int]:
    """(results of the requests that ended, wall seconds, requests cut off at max_duration)."""
    import httpx

    limits = httpx.Limits(max_connections=max_concurrency or len(requests), max_keepalive_connections=64)
    gate = asyncio.Semaphore(max_concurrency or len(requests))
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_duration, connect=10.0), limits=limits,
                                 trust_env=False) as client:
        start = time.perf_counter()

        async def one(req: BenchRequest, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            async with gate:
                return await send_one(client, target, req)

        tasks = [asyncio.create_task(one(r, t)) for r, t in zip(requests, arrivals, strict=True)]
        done, pending = await asyncio.wait(tasks, timeout=max_duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    return [t.result() for t in tasks if t in done], wall, len(pending)


async def probe(target: Target) -> None:
    """One short request before the run: a wrong URL, model or key fails here, with the server's words."""
    res = await run_requests(target, [BenchRequest("Hello", 2)], [0.0], 1, 120.0)
    results = res[0]
    if not results or not results[0].ok:
        error = results[0].error if results else "no answer in 120 s"
        raise ConfigError(f"the test request to {target.base_url}{target.endpoint} failed: {error}",
                          "check --base-url, --endpoint, --model and --api-key")


def served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(base_url + "/v1/models", headers=headers, timeout=10.0, trust_env=False)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"cannot list the models at {base_url}/v1/models ({e})",
                          "start the server first (kvtier serve) or pass --model") from e


# ---- report -------------------------------------------------------------------------------------

def summarize(results: list[RequestResult], wall_s: float, cut_off: int) -> dict:
    """vllm bench serve's result fields (times in ms)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "cut_off": cut_off, "duration": wall_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / wall_s, "output_throughput": out_tokens / wall_s,
        "total_token_throughput": (in_tokens + out_tokens) / wall_s,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    series = {"ttft": [r.ttft_s for r in ok if r.ttft_s is not None], "tpot": [r.tpot_s for r in ok if r.tpot_s],
              "itl": [x for r in ok for x in r.itl_s], "e2el": [r.e2e_s for r in ok]}
    for name, values in series.items():
        summary.update(_stats_ms(name, values))
    return summary


def _stats_ms(name: str, values: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(values, dtype=float) * 1e3
    if ms.size == 0:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "p90", "p99")}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.percentile(ms, 50)),
            f"p90_{name}_ms": float(np.percentile(ms, 90)), f"p99_{name}_ms": float(np.percentile(ms, 99))}


def print_report(summary: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    head = Table(show_header=False)
    for label, key, fmt in (("successful requests", "completed", "{}"), ("failed requests", "failed", "{}"),
                            ("cut off at --max-duration", "cut_off", "{}"), ("duration (s)", "duration", "{:.2f}"),
                            ("input tokens", "total_input_tokens", "{}"),
                            ("generated tokens", "total_output_tokens", "{}"),
                            ("request throughput (req/s)", "request_throughput", "{:.2f}"),
                            ("output token throughput (tok/s)", "output_throughput", "{:.2f}"),
                            ("total token throughput (tok/s)", "total_token_throughput", "{:.2f}")):
        head.add_row(label, fmt.format(summary[key]))
    lat = Table(title="latency (ms)")
    for col in ("metric", "mean", "p50", "p90", "p99"):
        lat.add_column(col, justify="left" if col == "metric" else "right")
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        cells = [summary.get(f"{k}_{name}_ms") for k in ("mean", "median", "p90", "p99")]
        lat.add_row(label, *("-" if c is None else f"{c:.1f}" for c in cells))
    console = Console()
    console.print(title)
    console.print(head)
    console.print(lat)
    for error in summary["errors"]:
        console.print(f"error: {error}")


# ---- command ------------------------------------------------------------------------------------

def check_loopback(base_url: str) -> str:
    url = urlparse(base_url)
    host = url.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if url.scheme not in ("http", "https") or not loopback:
        raise ConfigError(f"--base-url {base_url} is not a loopback http(s) address",
                          "bench serve only loads servers on this machine, e.g. http://127.0.0.1:8000")
    return base_url.rstrip("/")


@click.command("serve")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True, help="the server (loopback only)")
@click.option("--endpoint", type=click.Choice(["/v1/completions", "/v1/chat/completions"]),
              default="/v1/completions", show_default=True)
@click.option("--model", default=None, help="model name in requests (default: the server's first)")
@click.option("--dataset-name", type=click.Choice(["random", "jsonl"]), default="random", show_default=True)
@click.option("--dataset-path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSONL trace for --dataset-name jsonl")
@click.option("--num-prompts", type=click.IntRange(1, MAX_PROMPTS), default=100, show_default=True)
@click.option("--random-input-len", type=click.IntRange(1), default=128, show_default=True)
@click.option("--random-output-len", type=click.IntRange(1), default=64, show_default=True)
@click.option("--random-range-ratio", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0,
              show_default=True, help="lengths uniform in len * [1 - r, 1 + r]")
@click.option("--request-rate", type=click.FloatRange(0.0, min_open=True), default=float("inf"),
              show_default=True, help="requests/s, Poisson arrivals (inf: all at once)")
@click.option("--max-concurrency", type=click.IntRange(1), default=None, help="requests in flight at most")
@click.option("--max-duration", type=click.FloatRange(1.0, 86400.0), default=600.0, show_default=True,
              help="seconds; requests still running then are cut off")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="ask for exactly the output lengths (vLLM's ignore_eos extension)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key", envvar="KVTIER_API_KEY", default=None)
@click.option("--save-trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the requests and their arrival times as a JSONL trace (replay with --dataset-name jsonl)")
@click.option("--save-result", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the results as JSON")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON instead of tables")
def bench_serve(base_url, endpoint, model, dataset_name, dataset_path, num_prompts, random_input_len,
                random_output_len, random_range_ratio, request_rate, max_concurrency, max_duration, ignore_eos,
                seed, api_key, save_trace, save_result, as_json):
    """Load a running OpenAI-compatible server (kvtier serve, vLLM, ...): throughput, TTFT, TPOT, ITL, E2EL."""
    base_url = check_loopback(base_url)
    if dataset_name == "jsonl":
        if dataset_path is None:
            raise ConfigError("--dataset-name jsonl needs a trace", "pass --dataset-path FILE.jsonl")
        requests = load_trace(dataset_path)[:num_prompts]
    else:
        requests = random_requests(num_prompts, random_input_len, random_output_len, random_range_ratio, seed)
    arrivals = arrival_times(requests, request_rate, seed)
    if save_trace is not None:
        write_trace(save_trace, [BenchRequest(r.prompt, r.output_len, t) for r, t in zip(requests, arrivals,
                                                                                           strict=True)])
    target = Target(base_url, endpoint, model or served_model(base_url, api_key), api_key, ignore_eos)
    asyncio.run(probe(target))
    results, wall, cut_off = asyncio.run(run_requests(target, requests, arrivals, max_concurrency, max_duration))
    summary = summarize(results, wall, cut_off) | {
        "base_url": base_url, "endpoint": endpoint, "model": target.model, "num_prompts": len(requests),
        "request_rate": str(request_rate), "max_concurrency": max_concurrency}
    if save_result is not None:
        save_result.write_text(json.dumps(summary, indent=2))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        rate = "inf" if request_rate == float("inf") else f"{request_rate:g}/s"
        print_report(summary, f"bench serve: {len(requests)} requests to {target.model} at rate {rate}, "
                              f"max concurrency {max_concurrency or '-'}")


@click.group("bench")
def bench():
    """Benchmarks: `kvtier bench serve` loads a running server."""


bench.add_command(bench_serve)
