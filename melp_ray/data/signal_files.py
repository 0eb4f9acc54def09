"""Reading one record's samples from a file that is not WFDB: NumPy (.npy), HDF5
(``x.h5#dataset`` or ``#dataset/INDEX``) and EDF, mapped by lead name onto the canonical 12
leads in millivolts (the manifest layout's formats, docs/data.md "Your own data"); and the
header units -> millivolt factors that WFDB and EDF records share.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

from melp_ray.data.leads import LEADS, LeadMappingError, lead_indices
from melp_ray.data.rejections import (BAD_HEADER, MISSING_FILE, MISSING_LEADS, UNREADABLE, WRONG_SHAPE,
                                      RecordRejected)


ARRAY_SUFFIXES = (".npy", ".h5", ".hdf5", ".edf")


_LEAD_SEPARATORS = re.compile(r"[;,]")


def parse_fs(cell) -> float:
    """A sampling rate cell or attribute -> Hz; 0.0 when it is missing or not a number (rejected later)."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


# ---------------------------------------------------------------- signal files
def is_array_path(path: str) -> bool:
    """True for the non-WFDB formats this module reads (.npy, HDF5 ``#dataset``, .edf)."""
    return os.path.splitext(path.partition("#")[0])[1].lower() in ARRAY_SUFFIXES


def read_signal_file(path: str, fs: float, leads: str) -> tuple[np.ndarray, float]:
    """One .npy / HDF5 / EDF record -> (float64 (12, T) in mV, canonical order; its rate)."""
    file, _, key = path.partition("#")
    if not os.path.isfile(file):
        raise RecordRejected(MISSING_FILE, f"{file} not found")
    suffix = os.path.splitext(file)[1].lower()
    if suffix == ".edf":
        return _read_edf(file)
    names = _lead_names(leads)
    if suffix == ".npy":
        array = _read_npy(file)
    else:
        array, attrs = _read_hdf5(file, key)
        names = _lead_names(leads or attrs.get("leads", ""))
        fs = fs or parse_fs(attrs.get("fs"))
    return _canonical(array, names), fs


def _lead_names(leads) -> list[str]:
    if isinstance(leads, (bytes, np.bytes_)):
        leads = leads.decode()
    if not isinstance(leads, str):   # an HDF5 attribute array of names
        return [n.decode() if isinstance(n, bytes) else str(n) for n in leads]
    names = [n.strip() for n in _LEAD_SEPARATORS.split(leads) if n.strip()]
    return names or list(LEADS)


def _read_npy(file: str) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)
    except Exception as err:   # truncated, not a .npy, an object array
        raise RecordRejected(UNREADABLE, f"{file}: {type(err).__name__}: {err}") from None


def _read_hdf5(file: str, key: str) -> tuple[np.ndarray, dict]:
    import h5py

    name, index = key, None
    head, _, tail = key.rpartition("/")
    if head and tail.isdigit():
        name, index = head, int(tail)
    try:
        with h5py.File(file, "r") as f:
            data = f[name]
            array = np.asarray(data if index is None else data[index])
            attrs = dict(data.attrs)
    except Exception as err:   # not HDF5, no such dataset, index out of range
        raise RecordRejected(UNREADABLE, f"{file}#{key}: {type(err).__name__}: {err}") from None
    return array, attrs


def _read_edf(file: str) -> tuple[np.ndarray, float]:
    from wfdb.io.convert.edf import read_edf

    try:
        record = read_edf(file)
    except Exception as err:
        raise RecordRejected(UNREADABLE, f"{file}: {type(err).__name__}: {err}") from None
    try:
        columns = lead_indices(record.sig_name or [])
    except LeadMappingError as err:
        raise RecordRejected(MISSING_LEADS, str(err)) from None
    signal = (record.p_signal[:, columns] * millivolt_factors(record.units, columns)).T
    return signal.astype(np.float64), record.fs


def _canonical(array: np.ndarray, names: list[str]) -> np.ndarray:
    """(leads, T) or (T, leads) with ``names`` -> float64 (12, T) in LEADS order."""
    n = len(names)
    if array.ndim != 2 or array.dtype.kind not in "fiu" or (array.shape[0] == n) == (array.shape[1] == n):
        raise RecordRejected(WRONG_SHAPE, f"array {array.shape} {array.dtype} is not {n} leads x samples "
                                          f"or samples x {n} leads (leads: {names})")
    signal = array if array.shape[0] == n else array.T
    try:
        columns = lead_indices(names)
    except LeadMappingError as err:
        raise RecordRejected(MISSING_LEADS, str(err)) from None
    return signal[columns].astype(np.float64)


# physical unit in the header -> factor to millivolts
TO_MILLIVOLT = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}


def millivolt_factors(units, columns: list[int]) -> np.ndarray:
    factors = []
    for column in columns:
        unit = (units[column] if units and column < len(units) and units[column] else "mV")
        factor = TO_MILLIVOLT.get(unit.strip().lower())
        if factor is None:
            raise RecordRejected(BAD_HEADER, f"unknown physical unit {unit!r} for lead {LEADS[len(factors)]}")
        factors.append(factor)
    return np.asarray(factors)
