"""Reading and writing small run files on local paths, NFS or object stores (s3://, gs://).

Ray Train persists checkpoints itself; these helpers are for our own small files
(metrics.jsonl, summary.json) and go through pyarrow filesystems, as Ray's storage does.
"""
from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def normalise_storage_path(path: str) -> str:
    """Expand ``~`` and make local paths absolute; URIs pass through unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def filesystem_and_path(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), normalise_storage_path(path)


def join(base: str, *parts: str) -> str:
    if not is_uri(base):
        return os.path.join(base, *parts)
    # Keep a URI's query (e.g. s3://b/p?endpoint_override=host:9000) at the end.
    base, sep, query = base.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def to_uri(storage_path: str, fs_path: str) -> str:
    """A path on the filesystem of ``storage_path`` (what Ray reports, scheme stripped),
    as a URI again when ``storage_path`` is one: s3://bucket/x + bucket/x/ckpt -> s3://bucket/x/ckpt."""
    if not is_uri(storage_path) or is_uri(fs_path):
        return fs_path
    scheme = storage_path.split("://", 1)[0]
    _, sep, query = storage_path.partition("?")
    return f"{scheme}://{fs_path}{sep}{query}"


def write_text(path: str, text: str) -> None:
    """Write a whole file atomically where the filesystem allows it (tmp + move)."""
    fs, p = filesystem_and_path(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    tmp = p + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, p)


def read_text(path: str) -> str:
    fs, p = filesystem_and_path(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def exists(path: str) -> bool:
    fs, p = filesystem_and_path(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))
