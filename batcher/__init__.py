"""genq batcher: OpenAI batch files and their orchestration on arq (``genq batcher``).

- :mod:`batcher.settings` — what the API and the batcher share (file store, limits, window);
- :mod:`batcher.storage` — file content on a local folder or an object store (fsspec);
- :mod:`batcher.lines` — the batch JSONL format: parsing, validation, output lines;
- :mod:`batcher.driver` — drives one batch: validate, feed, collect, checkpoint, finalize;
- :mod:`batcher.worker` — the arq functions and worker settings.

Redis is reached only through :class:`broker.Broker` (arq opens its own pool from the URL).
"""
