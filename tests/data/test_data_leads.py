"""Lead mapping is by name: permuted and oddly spelled lead names map back to LEADS."""
from __future__ import annotations

import numpy as np
import pytest

from melp_ray.data.leads import LEADS, LeadMappingError, canonical_lead_name, lead_indices
from mimic_fixture import write_wfdb
from melp_ray.data.records import RecordRef, load_signal


def test_canonical_order():
    assert LEADS == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


@pytest.mark.parametrize("spelling", ["AVR", "avr", "aVR", " aVr "])
def test_spellings_of_avr(spelling):
    assert canonical_lead_name(spelling) == "aVR"


def test_mimic_order_maps_by_name():
    mimic = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
    indices = lead_indices(mimic)
    assert [mimic[i] for i in indices] == list(LEADS)
    assert indices[4] == 5 and indices[5] == 4      # aVL and aVF swap places


def test_extra_leads_are_ignored():
    names = ["V6", "X", "I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "Y"]
    assert [names[i].upper() for i in lead_indices(names)] == [name.upper() for name in LEADS]


def test_missing_and_duplicate_leads_are_errors():
    with pytest.raises(LeadMappingError, match="missing leads \\['V4'\\]"):
        lead_indices([name for name in LEADS if name != "V4"])
    with pytest.raises(LeadMappingError, match="duplicate leads \\['aVR'\\]"):
        lead_indices(list(LEADS) + ["AVR"])


def test_record_written_in_permuted_order_loads_in_canonical_order(tmp_path):
    """A real WFDB record with shuffled, lower-cased lead names reads back in LEADS order."""
    samples = 1000
    t = np.arange(samples) / 100.0
    # lead k carries a sine of amplitude (k + 1) / 10 mV: each lead is recognisable
    canonical = np.stack([(k + 1) / 10 * np.sin(2 * np.pi * 1.3 * t) for k in range(12)], axis=1)
    permutation = np.random.default_rng(0).permutation(12)
    names = [LEADS[k].lower() for k in permutation]
    write_wfdb(tmp_path / "rec", canonical[:, permutation], names, fs=100)

    ref = RecordRef("r1", "s1", "test", "rec", "sinus rhythm.")
    loaded = load_signal(ref, tmp_path, sample_rate=100, seconds=10)
    assert loaded.shape == (12, samples)
    np.testing.assert_allclose(loaded, canonical.T, atol=0.005)   # one ADC step at gain 200
