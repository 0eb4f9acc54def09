"""Reading one evaluation record on a Ray Data worker: the signal at the model's rate and
length (a crop zero-padded, a CODE tracing without its padding), min-max normalised; a record
that cannot be read keeps its row with the reason, so one pass encodes the good records and
names the bad ones.
"""
from __future__ import annotations

import numpy as np


def read_record(dataset: str, path: str, sample_rate: int, seconds: float,
                crop_seconds: float | None = None) -> np.ndarray:
    """One record as float32 (12, sample_rate*seconds) in mV; raises RecordRejected.

    ``crop_seconds``: keep only the first ``crop_seconds`` (at the model's rate) and
    zero-pad them to ``seconds``: the reference's CPSC2018 reading (first 5 s, zeros to
    10 s), so a record of 5-10 s is kept. Crop, then resample, then pad: the padding stays
    exact zeros; the caller normalises the padded record, as the reference does.
    """
    from melp_ray.data.records import RecordRef, fit_signal, load_signal, n_samples_for
    from melp_ray.data.rejections import RecordRejected, UNREADABLE

    keep = seconds if crop_seconds is None else crop_seconds
    if dataset == "ptb-xl":
        ref = RecordRef(record_id="", subject_id="", dataset=dataset, path=path, report="")
        signal = load_signal(ref, None, sample_rate, keep)
    elif dataset == "manifest":   # path: ROOT::RECORD_ID (data/manifest.py)
        from melp_ray.data.manifest import ref_for_eval_path

        signal = load_signal(*ref_for_eval_path(path), sample_rate, keep)
    elif dataset == "code-15":
        signal = _read_code15(path, sample_rate, keep)
    else:
        from melp_ray.data.physionet import PhysioNetFormatError, load_physionet_signal

        try:
            raw, fs = load_physionet_signal(path)
        except (PhysioNetFormatError, OSError) as err:
            raise RecordRejected(UNREADABLE, str(err)) from None
        signal = fit_signal(raw, fs, sample_rate, keep)
    return zero_pad(signal, n_samples_for(sample_rate, seconds))


def zero_pad(signal: np.ndarray, n_samples: int) -> np.ndarray:
    """(12, T) zero-padded at the end to ``n_samples`` (after a crop or a short exam)."""
    padding = n_samples - signal.shape[1]
    return np.pad(signal, ((0, 0), (0, padding))) if padding > 0 else signal


def normalised_or_rejected(read, n_samples: int) -> tuple[np.ndarray, str]:
    """(min-max normalised ``read()``, "") or, for a rejected record, (zeros, the reason):
    a rejected record keeps its row so one pass encodes the good ones and names the bad."""
    from melp_ray.data.rejections import RecordRejected
    from melp_ray.data.records import minmax_normalise

    try:
        return minmax_normalise(read()), ""
    except RecordRejected as err:
        return np.zeros((12, n_samples), dtype=np.float32), str(err)


def _read_code15(path: str, sample_rate: int, keep: float) -> np.ndarray:
    """A CODE tracing without its zero padding, resampled; a 7 s exam stays 7 s (the
    caller zero-pads it to the model's length, as for --crop-seconds)."""
    import math

    from melp_ray.data import code15
    from melp_ray.data.records import fit_signal
    from melp_ray.data.rejections import FLAT_SIGNAL, RecordRejected, UNREADABLE

    try:
        raw = code15.read_tracing(path)
    except (OSError, KeyError, ValueError) as err:
        raise RecordRejected(UNREADABLE, str(err)) from None
    if raw.shape[1] == 0:
        raise RecordRejected(FLAT_SIGNAL, "every sample of every lead is zero")
    # The longest whole number of output samples the real signal covers, at most ``keep``.
    n_out = min(round(keep * sample_rate),
                math.floor(raw.shape[1] * sample_rate / code15.SAMPLE_RATE))
    return fit_signal(raw, code15.SAMPLE_RATE, sample_rate, max(n_out, 1) / sample_rate)


def load_batch(batch: dict[str, np.ndarray], dataset: str, sample_rate: int,
               seconds: float, crop_seconds: float | None = None) -> dict[str, np.ndarray]:
    """Ray Data map_batches: paths -> normalised signals, plus why a record was rejected.

    A rejected record keeps its row (zeros as signal, the reason in ``rejected``) so one
    pass both encodes the good records and names the bad ones; the driver drops it.
    """
    from melp_ray.data.records import n_samples_for

    n = n_samples_for(sample_rate, seconds)
    signals, reasons = [], []
    for path in batch["path"]:
        signal, reason = normalised_or_rejected(
            lambda path=path: read_record(dataset, str(path), sample_rate, seconds, crop_seconds), n)
        signals.append(signal)
        reasons.append(reason)
    out = {k: v for k, v in batch.items() if k != "path"}
    out["ecg"] = np.stack(signals)
    out["rejected"] = np.array(reasons, dtype=object)
    return out
