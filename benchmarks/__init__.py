"""genq's benchmarks, each against a peer measured in the same run.

Run from a checkout (they are not part of the installed package), with the
``bench`` extra installed (``pip install -e '.[bench]'``: arq, psutil)::

    python -m benchmarks queue      # vs Node BullMQ, BullMQ for Python, SAQ, arq: one private Redis
    python -m benchmarks queue-arq  # broker vs arq 0.28 only, on a shared Redis
    python -m benchmarks redis      # Redis CPU and commands per job step and per delta
    python -m benchmarks sse        # SSE fan-out of one API process
    python -m benchmarks e2e        # genq vs vLLM's AsyncLLM called directly
    python -m benchmarks batchcost  # Redis CPU per job, streamed vs written once (batch lines)
    python -m benchmarks fleet      # drain throughput of 1-8 simulated workers, one Redis and a Cluster
    python -m benchmarks batch      # a batch through genq vs vLLM's own run_batch (--lines, --max-tokens)
    python -m benchmarks serve      # vLLM's bench serve client: genq's /v1/completions vs vllm serve

``--quick`` on each runs small numbers, for tests.
"""
