"""``python -m benchmarks queue|queue-arq|redis|fleet|sse|e2e|batchcost|batch|serve`` (see :mod:`benchmarks`)."""

from benchmarks.cli import bench_app

if __name__ == "__main__":
    bench_app(prog_name="python -m benchmarks")
