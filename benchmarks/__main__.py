"""``python -m benchmarks <name>`` (queue, redis, sse, batch, serve, submit, ...: see ``--help``)."""

from benchmarks.cli import bench_app

if __name__ == "__main__":
    bench_app(prog_name="python -m benchmarks")
