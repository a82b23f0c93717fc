"""The ``python -m benchmarks ...`` sub-commands; each imports its benchmark lazily."""

from __future__ import annotations

from typing import Annotated

import typer

bench_app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="genq benchmarks against peers measured in the same run."
)


@bench_app.command(
    "queue",
    help="genq against Node BullMQ, BullMQ for Python, SAQ and arq on one private Redis: latency, enqueue and "
    "drain rates, Redis CPU, commands and bytes kept per job.",
)
def queue_command(
    systems: Annotated[
        str, typer.Option(help="Comma-separated, in order: genq, bullmq-node, bullmq-py, saq, arq [all].")
    ] = "genq,bullmq-node,bullmq-py,saq,arq",
    jobs: Annotated[int | None, typer.Option(help="No-op jobs enqueued and drained per system [20000].")] = None,
    samples: Annotated[int | None, typer.Option(help="Latency samples per system [300].")] = None,
    arq_samples: Annotated[int | None, typer.Option(help="arq latency samples (0.5 s poll) [40].")] = None,
    quick: Annotated[bool, typer.Option(help="Small numbers, for a smoke test.")] = False,
) -> None:
    import dataclasses

    from benchmarks import peers_bench
    from benchmarks.peers_env import SYSTEMS
    from broker.logs import configure_logging

    configure_logging()
    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}", param_hint="--systems")
    cfg = peers_bench.Config.quick(chosen) if quick else peers_bench.Config(systems=chosen)
    given = {"jobs": jobs, "samples": samples, "arq_samples": arq_samples}
    peers_bench.main(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))


@bench_app.command("queue-arq", help="genq against arq only, on a shared Redis in a random namespace.")
def queue_arq_command(
    redis_url: Annotated[str, typer.Option(help="Redis to measure on (a random namespace, removed after).")] = (
        "redis://127.0.0.1:6379"
    ),
    samples: Annotated[int | None, typer.Option(help="genq latency samples [200].")] = None,
    jobs: Annotated[int | None, typer.Option(help="genq drain jobs [20000].")] = None,
    arq_samples: Annotated[int | None, typer.Option(help="arq latency samples [40].")] = None,
    arq_jobs: Annotated[int | None, typer.Option(help="arq drain jobs [3000].")] = None,
    consumers: Annotated[int | None, typer.Option(help="genq drain claim loops [4].")] = None,
    quick: Annotated[bool, typer.Option(help="Small numbers, for tests.")] = False,
) -> None:
    import dataclasses

    from benchmarks import queue
    from broker.logs import configure_logging

    configure_logging()
    cfg = queue.Config.quick(redis_url) if quick else queue.Config(redis_url=redis_url)
    given = {"samples": samples, "jobs": jobs, "arq_samples": arq_samples, "arq_jobs": arq_jobs, "consumers": consumers}
    queue.main(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))


@bench_app.command("sse", help="One API process: SSE fan-out, submit rate, and chat TTFT against vLLM's server.")
def sse_command(
    redis_url: Annotated[str, typer.Option(help="Redis to measure on (a random namespace, removed after).")] = (
        "redis://127.0.0.1:6379"
    ),
    followers: Annotated[int | None, typer.Option(help="Concurrent SSE followers, one job each [200].")] = None,
    rate: Annotated[int | None, typer.Option(help="Target tokens/s published in total [50000].")] = None,
    duration_s: Annotated[float | None, typer.Option(help="Seconds of streaming per rate [10].")] = None,
    client_procs: Annotated[int | None, typer.Option(help="Client processes sharing the followers [2].")] = None,
    skip_vllm: Annotated[bool, typer.Option(help="Skip the chat TTFT comparison with vLLM's server.")] = False,
    quick: Annotated[bool, typer.Option(help="Few followers, short, no vLLM: for tests.")] = False,
) -> None:
    import dataclasses

    from benchmarks import sse
    from broker.logs import configure_logging

    configure_logging()
    cfg = sse.Config.quick(redis_url) if quick else sse.Config(redis_url=redis_url, skip_vllm=skip_vllm)
    given = {"followers": followers, "rate": rate, "duration_s": duration_s, "client_procs": client_procs}
    sse.main(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))


@bench_app.command("batchcost", help="Redis CPU and commands per job, streamed against written once (batch lines).")
def batchcost_command(
    jobs: Annotated[int | None, typer.Option(help="Jobs per phase [200].")] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens per job [128].")] = None,
    tokens_per_s: Annotated[float | None, typer.Option(help="Simulated tokens/s per sequence [50].")] = None,
    capacity: Annotated[int | None, typer.Option(help="Engine sequence slots [64].")] = None,
    flush_interval_ms: Annotated[int | None, typer.Option(help="The worker's flush interval [20].")] = None,
    flush_writes_per_s: Annotated[int | None, typer.Option(help="The worker's write budget [2000; 0 = off].")] = None,
    checkpoint_interval_ms: Annotated[int | None, typer.Option(help="Unstreamed checkpoint period [5000].")] = None,
    quick: Annotated[bool, typer.Option(help="Small numbers, for tests.")] = False,
) -> None:
    import dataclasses

    from benchmarks import batchcost
    from broker.logs import configure_logging

    configure_logging(level="WARNING")  # no summary line per job
    cfg = batchcost.Config.quick() if quick else batchcost.Config()
    given = {
        "jobs": jobs,
        "tokens": tokens,
        "tokens_per_s": tokens_per_s,
        "capacity": capacity,
        "flush_interval_ms": flush_interval_ms,
        "flush_writes_per_s": flush_writes_per_s,
        "checkpoint_interval_ms": checkpoint_interval_ms,
    }
    batchcost.main(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))


@bench_app.command("e2e", help="genq (broker → Redis → one worker) against vLLM's AsyncLLM called directly.")
def e2e_command(
    redis_url: Annotated[str, typer.Option(help="Redis for the genq path (a random namespace, removed after).")] = (
        "redis://127.0.0.1:6379"
    ),
    prompts: Annotated[int, typer.Option(help="Prompts sent at once for the throughput figure.")] = 64,
    users: Annotated[str, typer.Option(help="Concurrent users for the per-request rate, comma separated.")] = (
        "1,2,8,32"
    ),
    ttft_samples: Annotated[int, typer.Option(help="Sequential single requests for the TTFT figure.")] = 20,
    max_tokens: Annotated[int, typer.Option(help="New tokens per request (ignore_eos).")] = 128,
    max_num_seqs: Annotated[int, typer.Option(help="Engine sequence slots, the same for both paths.")] = 64,
    model: Annotated[str | None, typer.Option(help="Model path (default: the bundled SmolLM2-135M).")] = None,
    quick: Annotated[bool, typer.Option(help="Small numbers, for tests.")] = False,
) -> None:
    from rich.console import Console

    from benchmarks import e2e
    from broker.logs import configure_logging

    configure_logging()
    levels = [int(u) for u in users.split(",") if u]
    if quick:
        prompts, levels, ttft_samples, max_tokens = 4, [1, 2], 2, 16
    engine_kw = {"max_num_seqs": max_num_seqs, "model": model}
    for line in e2e.run(redis_url, prompts, levels, ttft_samples, max_tokens, engine_kw):
        Console(soft_wrap=True).print(line, highlight=False)


@bench_app.command("redis", help="Redis CPU and commands per job step and per streamed delta (one server, Cluster).")
def redis_command(
    jobs: Annotated[int | None, typer.Option(help="Jobs in the lifecycle phase [2000].")] = None,
    rounds: Annotated[int | None, typer.Option(help="Flushes per streaming phase [200].")] = None,
    tokens_per_delta: Annotated[int | None, typer.Option(help="Tokens in each delta [1].")] = None,
    cluster: Annotated[bool, typer.Option(help="Also measure on a 3-master Redis Cluster.")] = True,
    quick: Annotated[bool, typer.Option(help="Small numbers, no Cluster: for tests.")] = False,
) -> None:
    import dataclasses

    from benchmarks import redis_cost
    from broker.logs import configure_logging

    configure_logging()
    cfg = redis_cost.Config.quick() if quick else redis_cost.Config(cluster=cluster)
    given = {"jobs": jobs, "rounds": rounds, "tokens_per_delta": tokens_per_delta}
    redis_cost.main(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))


@bench_app.command(
    "instructions",
    help="Instructions redis-server runs per job step and per streamed delta (valgrind's callgrind): "
    "repeatable on a noisy machine, to compare two versions of the scripts.",
)
def instructions_command(
    jobs: Annotated[int | None, typer.Option(help="Jobs in the lifecycle phase [2000].")] = None,
    streams: Annotated[int | None, typer.Option(help="Jobs streaming at once [128].")] = None,
    rounds: Annotated[int | None, typer.Option(help="Flushes in the streaming phase [200].")] = None,
    quick: Annotated[bool, typer.Option(help="Small numbers, for tests.")] = False,
) -> None:
    import dataclasses

    from benchmarks import instructions
    from broker.logs import configure_logging

    configure_logging(level="WARNING")
    cfg = instructions.Config.quick() if quick else instructions.Config()
    given = {"jobs": jobs, "streams": streams, "rounds": rounds}
    instructions.main(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}))


@bench_app.command("submit", help="Redis CPU and commands per POST /v1/jobs through one genq api.")
def submit_command(
    submits: Annotated[int | None, typer.Option(help="Timed submits [300].")] = None,
    quick: Annotated[bool, typer.Option(help="Small numbers, for tests.")] = False,
) -> None:
    import dataclasses

    from benchmarks import submit
    from broker.logs import configure_logging

    configure_logging(level="WARNING")
    cfg = submit.Config.quick() if quick else submit.Config()
    submit.main(cfg if submits is None else dataclasses.replace(cfg, submits=submits))


@bench_app.command("slot-guard", help="Redis CPU of the Cluster reshard guard key per script call.")
def slot_guard_command() -> None:
    from rich.console import Console

    from benchmarks import slot_guard
    from broker.logs import configure_logging

    configure_logging()
    for line in slot_guard.run():
        Console(soft_wrap=True).print(line, highlight=False)


@bench_app.command("fleet", help="Drain throughput of 1-8 simulated workers on one Redis and a 3-master Cluster.")
def fleet_command(
    jobs: Annotated[int | None, typer.Option(help="Jobs admitted at once per step [2000].")] = None,
    workers: Annotated[str, typer.Option(help="Worker counts, comma separated.")] = "1,2,4,8",
    cluster: Annotated[bool, typer.Option(help="Also drain on a 3-master Redis Cluster.")] = True,
    quick: Annotated[bool, typer.Option(help="Small numbers, 1 and 2 workers, no Cluster: for tests.")] = False,
) -> None:
    import dataclasses

    from benchmarks import fleet
    from broker.logs import configure_logging

    configure_logging()
    cfg = fleet.Config.quick() if quick else fleet.Config(cluster=cluster)
    if not quick:
        cfg = dataclasses.replace(cfg, workers=tuple(int(w) for w in workers.split(",") if w))
    if jobs is not None:
        cfg = dataclasses.replace(cfg, jobs=jobs)
    fleet.main(cfg)


@bench_app.command("batch", help="A batch through genq (batch API, one worker) against vLLM's own run_batch.")
def batch_command(
    lines: Annotated[int, typer.Option(help="Lines in the batch file.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="New tokens per line (ignore_eos).")] = 128,
    max_num_seqs: Annotated[int, typer.Option(help="Engine sequence slots, the same for both.")] = 64,
    ttft_samples: Annotated[int, typer.Option(help="Interactive requests for TTFT, idle and during the batch.")] = 5,
    model: Annotated[str | None, typer.Option(help="Model path (default: the bundled SmolLM2-135M).")] = None,
    keep: Annotated[str | None, typer.Option(help="Keep the files and the processes' logs in this folder.")] = None,
) -> None:
    from rich.console import Console

    from benchmarks import batch
    from broker.logs import configure_logging

    configure_logging()
    cfg = batch.Config(
        lines=lines, max_tokens=max_tokens, max_num_seqs=max_num_seqs, model=model, ttft_samples=ttft_samples, keep=keep
    )
    for line in batch.run(cfg):
        Console(soft_wrap=True).print(line, highlight=False)


@bench_app.command(
    "serve", help="vLLM's serving benchmark client (vllm bench serve) against genq's OpenAI endpoint and vllm serve."
)
def serve_command(
    prompts: Annotated[int | None, typer.Option(help="Prompts per run [64].")] = None,
    input_len: Annotated[int | None, typer.Option(help="Prompt tokens (random dataset) [128].")] = None,
    output_len: Annotated[int | None, typer.Option(help="New tokens per request (--ignore-eos) [128].")] = None,
    concurrency: Annotated[int | None, typer.Option(help="The client's --max-concurrency [16].")] = None,
    pairs: Annotated[int | None, typer.Option(help="Runs of each server, alternated genq, vllm, ... [3].")] = None,
    warmups: Annotated[int | None, typer.Option(help="The client's warm-up requests before each run [16].")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Engine sequence slots, the same for both [16].")] = None,
    model: Annotated[str | None, typer.Option(help="Model path (default: the bundled SmolLM2-135M).")] = None,
    keep: Annotated[str | None, typer.Option(help="Keep the results and the processes' logs in this folder.")] = None,
    quick: Annotated[bool, typer.Option(help="One pair of tiny runs, for a smoke test.")] = False,
) -> None:
    import dataclasses

    from rich.console import Console

    from benchmarks import serve
    from broker.logs import configure_logging

    configure_logging()
    cfg = serve.Config.quick() if quick else serve.Config()
    given = {
        "prompts": prompts,
        "input_len": input_len,
        "output_len": output_len,
        "concurrency": concurrency,
        "pairs": pairs,
        "warmups": warmups,
        "max_num_seqs": max_num_seqs,
        "model": model,
        "keep": keep,
    }
    for line in serve.run(dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})):
        Console(soft_wrap=True).print(line, highlight=False)
