"""genq's benchmarks, each against a peer measured in the same run.

Run from a checkout (they are not part of the installed package), with the
``bench`` extra installed (``pip install -e '.[bench]'``: arq, psutil)::

    python -m benchmarks queue    # broker vs arq 0.28, same Redis, same run
    python -m benchmarks sse      # SSE fan-out of one API process
    python -m benchmarks e2e      # genq vs vLLM's AsyncLLM called directly
    python -m benchmarks batch    # a batch through genq vs vLLM's own run_batch (--lines, --max-tokens)

``--quick`` on each runs small numbers, for tests.
"""
