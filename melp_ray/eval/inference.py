"""Batch inference for evaluation: a Ray Data actor pool that runs a frozen model.

``EmbeddingExtractor`` is a callable class for ``Dataset.map_batches``: each actor builds
the model once (``build_model`` is any picklable zero-argument callable, e.g. a function
that loads a checkpoint into ``MELP``) and maps numpy batches to embedding columns. Which
model methods run on which input column is configurable, so the same class extracts
``encode_ecg`` embeddings, ``ecg_features`` probe features or ``encode_reports`` text
embeddings, and tests can use a plain torch module with ``forward``.

Ray Data does not promise output order; keep an id column (passed through by default) and
align on it (``collect_columns(..., sort_by="record_id")``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from melp_ray.utils.console import configure_libraries

# output column -> (model method, input column[, keyword arguments of the method])
DEFAULT_OUTPUTS: dict[str, tuple] = {
    "ecg_emb": ("encode_ecg", "ecg"),
    "ecg_feat": ("ecg_features", "ecg"),
}


def _model_input(column: np.ndarray, name: str, device: torch.device):
    """Numeric column -> float tensor on ``device``; string column -> list[str] (texts)."""
    if column.dtype.kind in "fiub":
        return torch.as_tensor(np.ascontiguousarray(column), dtype=torch.float32, device=device)
    if column.dtype.kind in "OUS" and all(isinstance(v, str) for v in column):
        return [str(v) for v in column]
    raise TypeError(f"column {name!r} must be numeric (B, ...) or strings, got {column.dtype}; "
                    "decode binary ECG columns before inference")


class EmbeddingExtractor:
    """``map_batches`` callable class: numpy batch dict -> the same batch plus embeddings."""

    def __init__(self, build_model: Callable[[], torch.nn.Module],
                 outputs: Mapping[str, tuple] | None = None,
                 keep_columns: Sequence[str] | None = None, device: str | None = None):
        configure_libraries()   # an actor of its own: library output as the driver asked
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_model().to(self.device).eval()
        self.outputs = dict(outputs or DEFAULT_OUTPUTS)
        missing = [spec[0] for spec in self.outputs.values()
                   if not callable(getattr(self.model, spec[0], None))]
        if missing:
            raise AttributeError(f"{type(self.model).__name__} has no method(s) {missing}")
        self.keep_columns = None if keep_columns is None else list(keep_columns)

    def _passthrough(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {spec[1] for spec in self.outputs.values()}
        if self.keep_columns is None:  # everything but the (large) model inputs
            return {k: v for k, v in batch.items() if k not in inputs}
        return {k: batch[k] for k in self.keep_columns}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._passthrough(batch)
        with torch.inference_mode():
            for column, (method, source, *kwargs) in self.outputs.items():
                result = getattr(self.model, method)(
                    _model_input(batch[source], source, self.device), **(kwargs[0] if kwargs else {}))
                out[column] = _as_column(result)
        return out


def _as_column(result) -> np.ndarray:
    """A tensor (embeddings) -> float numpy; a list of strings (generated text) -> object."""
    if isinstance(result, list):
        return np.array(result, dtype=object)
    return result.float().cpu().numpy()


def _gpus_in_cluster() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def extract_embeddings(dataset, build_model: Callable[[], torch.nn.Module],
                       outputs: Mapping[str, tuple] | None = None,
                       batch_size: int = 64, concurrency: int | None = None,
                       keep_columns: Sequence[str] | None = None):
    """Lazily add embedding columns to a Ray ``Dataset`` with an actor pool.

    One GPU per actor when the cluster has GPUs (pool size = number of GPUs unless
    ``concurrency`` is given), otherwise CPU actors (pool size 1 unless given).
    """
    from ray.data import ActorPoolStrategy

    gpus = _gpus_in_cluster()
    return dataset.map_batches(
        EmbeddingExtractor,
        fn_constructor_args=(build_model,),
        fn_constructor_kwargs={"outputs": outputs, "keep_columns": keep_columns},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=concurrency or max(gpus, 1)),
        num_gpus=1 if gpus else 0,
    )


def collect_columns(dataset, columns: Sequence[str], sort_by: str | None = None
                    ) -> dict[str, np.ndarray]:
    """Materialise ``columns`` (plus ``sort_by``) as stacked numpy arrays, optionally sorted."""
    wanted = list(dict.fromkeys([*columns, *([sort_by] if sort_by else [])]))
    return stack_columns(dataset.select_columns(wanted).iter_batches(batch_format="numpy"),
                         wanted, sort_by)


def embed_in_this_process(dataset, build_model: Callable[[], torch.nn.Module],
                          outputs: Mapping[str, tuple], columns: Sequence[str],
                          batch_size: int = 64, sort_by: str | None = None
                          ) -> dict[str, np.ndarray]:
    """``collect_columns(extract_embeddings(...))`` without the actor pool: Ray Data still
    reads and decodes the records, the model runs here (``--actors 0``). For small sets,
    debugging, and a process that already holds torch: no actor process to start, import
    torch/transformers in, and build the model in."""
    extractor = EmbeddingExtractor(build_model, outputs=outputs)
    batches = (extractor(b) for b in dataset.iter_batches(batch_size=batch_size,
                                                          batch_format="numpy"))
    wanted = list(dict.fromkeys([*columns, *([sort_by] if sort_by else [])]))
    return stack_columns(({c: b[c] for c in wanted} for b in batches), wanted, sort_by)


def stack_columns(batches: Iterable[Mapping[str, np.ndarray]], columns: Sequence[str],
                  sort_by: str | None = None) -> dict[str, np.ndarray]:
    """Numpy batches -> one array per column, rows in ``sort_by`` order if given."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in batches:
        for c in columns:
            parts[c].append(batch[c])
    data = {c: np.concatenate(v) if v else np.empty(0) for c, v in parts.items()}
    if sort_by:
        order = np.argsort(data[sort_by], kind="stable")
        data = {c: v[order] for c, v in data.items()}
    return data
