"""File content: a local folder (default) or an object store, through fsspec.

Writes are atomic: on a local folder a file is written under a temporary name and
renamed; on an object store an object appears only when its upload completes. Blocking
fsspec calls run in a thread.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

CHUNK = 1 << 20


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"file is larger than {limit} bytes")
        self.limit = limit


class FileStore:
    def __init__(self, root: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _write(self, name: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> int:
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        if self.local:
            self.fs.makedirs(parent, exist_ok=True)
        target = f"{final}.tmp-{secrets.token_hex(4)}" if self.local else final
        size = 0
        try:
            with self.fs.open(target, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(max_bytes)
                    f.write(chunk)
        except BaseException:
            if self.local:
                self.fs.rm_file(target)
            raise
        if self.local:
            self.fs.mv(target, final)  # a rename: readers see the old file or the whole new one
        return size

    async def put(self, name: str, src: IO[bytes], max_bytes: int | None = None) -> int:
        """Copy a readable binary file in; returns its size. Raises TooLarge past ``max_bytes``."""
        return await asyncio.to_thread(self._write, name, iter(functools.partial(src.read, CHUNK), b""), max_bytes)

    async def write(self, name: str, data: bytes) -> int:
        return await asyncio.to_thread(self._write, name, [data])

    def _concat(self, name: str, parts: list[str], head: bytes) -> int:
        def chunks() -> Iterable[bytes]:
            if head:
                yield head
            for part in parts:
                with self.fs.open(self.path(part), "rb") as f:
                    yield from iter(functools.partial(f.read, CHUNK), b"")

        return self._write(name, chunks())

    async def concat(self, name: str, parts: list[str], head: bytes = b"") -> int:
        """Write ``head`` then the stored files ``parts``, in order, as one file ``name``."""
        return await asyncio.to_thread(self._concat, name, parts, head)

    async def read(self, name: str) -> bytes:
        return await asyncio.to_thread(self.fs.cat_file, self.path(name))

    async def stream(self, name: str) -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(self.fs.open, self.path(name), "rb")
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk
        finally:
            await asyncio.to_thread(f.close)

    async def delete(self, name: str) -> None:
        def rm() -> None:
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)

        await asyncio.to_thread(rm)


@functools.cache
def store(root: str) -> FileStore:
    """One store per root in a process."""
    return FileStore(root)
