"""Reading and writing small run files on local paths, NFS or object stores (s3://, gs://).

Ray Train persists checkpoints itself; these helpers are for our own small files
(metrics.jsonl, summary.json) and go through pyarrow filesystems, as Ray's storage does.
"""
from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def normalise_storage_path(path: str | os.PathLike) -> str:
    """Expand ``~`` and make local paths absolute; URIs pass through unchanged."""
    path = os.fspath(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def filesystem_and_path(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    path = os.fspath(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), normalise_storage_path(path)


def filesystem_and_paths(paths: list[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """For readers that take one filesystem and many files (Ray Data, pyarrow): (None, paths)
    for local paths, else one filesystem for all the URIs and each file's path on it.
    The URIs must share scheme and query, as the files of one prepared folder do."""
    uris = [is_uri(p) for p in paths]
    if not any(uris):
        return None, list(paths)
    if not all(uris):
        raise ValueError(f"cannot read local paths and URIs together: {paths[uris.index(False)]}, {paths[0]}")
    fs, first_path = filesystem_and_path(paths[0])
    first_base, _, query = paths[0].partition("?")
    if not first_base.endswith(first_path):   # a scheme whose paths are not the URI's tail
        raise ValueError(f"cannot map {paths[0]} to a path on its filesystem ({first_path})")
    prefix = first_base.removesuffix(first_path)          # "s3://", "gs://", "file://"
    fs_paths = []
    for path in paths:   # not from_uri per file: for S3 that can cost a request each (bucket region)
        base, _, other_query = path.partition("?")
        if not base.startswith(prefix) or other_query != query:
            raise ValueError(f"{path} is not on the filesystem of {paths[0]} (same scheme and query needed)")
        fs_paths.append(base[len(prefix):])
    return fs, fs_paths


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


def temp_path(path: str) -> str:
    """Where a file is written before its rename: unique per process, so two writers (two
    attempts at the same chunk) never share one; ``*.tmp-*`` finds what a kill left."""
    return f"{path}.tmp-{os.getpid()}"


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file so that readers never see half of it: a temp file beside it
    (``*.tmp-<pid>``: two writers never share one), then a rename. Local files are
    fsync-ed first, so a crash leaves either the old file or the new one."""
    fs, p = filesystem_and_path(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    tmp = temp_path(p)
    if isinstance(fs, pafs.LocalFileSystem):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str) -> str:
    fs, p = filesystem_and_path(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def exists(path: str) -> bool:
    fs, p = filesystem_and_path(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    fs, p = filesystem_and_path(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def make_dirs(path: str) -> None:
    """Create a folder and its parents (on object stores: a marker, or nothing)."""
    fs, p = filesystem_and_path(path)
    fs.create_dir(p, recursive=True)


def list_files(folder: str) -> list[str]:
    """Every file under ``folder`` (recursively, sorted), named like ``folder`` is: local
    paths stay paths, files under a URI come back as URIs (with its query)."""
    fs, root = filesystem_and_path(folder)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    relative = sorted(info.path[len(root):].lstrip("/") for info in infos if info.type == pafs.FileType.File)
    return [join(folder, rel) for rel in relative]


def delete_file(path: str) -> None:
    fs, p = filesystem_and_path(path)
    fs.delete_file(p)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def copy_folder(src: str, dst: str) -> None:
    """Copy a folder between local paths and URIs (either side may be either)."""
    src_fs, src_path = filesystem_and_path(src)
    dst_fs, dst_path = filesystem_and_path(dst)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
