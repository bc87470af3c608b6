"""``kdnctl warm``: precompute and store the position-0 KV of a corpus's chunks under content keys.

A corpus is a folder of ``.txt`` files (each file one document) or a JSONL file (one document per line, its text in
``text``, ``extract`` or ``content``). Each document is tokenized without special tokens and cut into chunks of
``chunk_tokens`` tokens (the last one may be shorter); chunks already stored are skipped by ``put_chunks``.
Blending hits these chunks when a prompt's chunks are the same token runs (pass them as token-id lists).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kdn import content_key
from kdn.errors import InvalidRequest

__all__ = ["WarmReport", "iter_documents", "iter_chunks", "warm"]

_TEXT_FIELDS = ("text", "extract", "content")


@dataclass
class WarmReport:
    documents: int = 0
    chunks: int = 0
    stored: int = 0
    """Chunks stored now or already present."""
    failed: int = 0
    tokens: int = 0


def iter_documents(corpus_path: str | Path) -> Iterator[str]:
    """The documents of a folder of ``.txt`` files (sorted, recursive) or of a JSONL file."""
    path = Path(corpus_path)
    if path.is_dir():
        for f in sorted(path.rglob("*.txt")):
            yield f.read_text(errors="replace")
    elif path.is_file():
        with path.open() as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidRequest(f"{path}:{n}: not JSON ({exc})") from exc
                text = row if isinstance(row, str) else next((row[k] for k in _TEXT_FIELDS if k in row), None)
                if not isinstance(text, str):
                    raise InvalidRequest(f"{path}:{n}: no text field (one of {', '.join(_TEXT_FIELDS)})")
                yield text
    else:
        raise InvalidRequest(f"corpus {path} does not exist")


def iter_chunks(tokenizer, corpus_path: str | Path, chunk_tokens: int) -> Iterator[list[int]]:
    """Token-id chunks of every document."""
    if chunk_tokens <= 0:
        raise InvalidRequest("chunk_tokens must be positive")
    for doc in iter_documents(corpus_path):
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        for s in range(0, len(ids), chunk_tokens):
            yield ids[s:s + chunk_tokens]


def warm(corpus_path: str | Path, model, tokenizer, client, chunk_tokens: int, progress: bool = True,
         batch: int = 8) -> WarmReport:
    """Compute each chunk's KV alone at position 0 and store it under its content key (``client.put_chunks``).

    Chunks already stored are looked up first and not recomputed. Shows a tqdm progress bar when ``progress``.
    """
    from connectors.hf.blend import chunk_kv

    if chunk_tokens <= 0:
        raise InvalidRequest("chunk_tokens must be positive")
    report = WarmReport()
    docs = sum(1 for _ in iter_documents(corpus_path))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=docs, unit="doc", desc="warm")
    pending: list[list[int]] = []

    def flush() -> None:
        keys = [content_key(ids, client.config.tenant, client.fingerprint, client.config.codec) for ids in pending]
        present = client.locate(keys, probe=True)
        todo = [(k, chunk_kv(model, ids), 0) for k, ids, where in zip(keys, pending, present) if not where]
        ok = client.put_chunks(todo) if todo else []
        report.stored += sum(ok) + (len(pending) - len(todo))
        report.failed += len(ok) - sum(ok)
        pending.clear()

    for doc in iter_documents(corpus_path):
        report.documents += 1
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        for s in range(0, len(ids), chunk_tokens):
            pending.append(ids[s:s + chunk_tokens])
            report.chunks += 1
            report.tokens += len(pending[-1])
            if len(pending) >= batch:
                flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(chunks=report.chunks, failed=report.failed)
    if pending:
        flush()
    if bar is not None:
        bar.close()
    return report
