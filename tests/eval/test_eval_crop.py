"""--crop-seconds: the reference's CPSC2018 reading (first 5 s, zero-padded to 10 s, then
min-max normalised), on Challenge-layout records made from real PTB-XL waveforms."""
from __future__ import annotations

import numpy as np
import pytest

from melp_ray.data.physionet import load_physionet_signal
from melp_ray.eval.records import load_batch
from melp_ray.eval_plan.plan import EvalError, build_plan


def _batch(*paths) -> dict[str, np.ndarray]:
    return {"record_id": np.array([f"r{i}" for i in range(len(paths))]),
            "path": np.array([str(p) for p in paths], dtype=object)}


def _reference_reading(raw: np.ndarray, fs: int) -> np.ndarray:
    """The reference's steps at the native rate: [:, :5 s], pad 5 s of zeros, min-max."""
    x = raw[:, :5 * fs]
    x = np.pad(x, ((0, 0), (0, 5 * fs)), "constant", constant_values=0)
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


def test_crop_and_pad_equal_the_reference_steps_at_the_native_rate(challenge_root):
    path = challenge_root / "g1" / "A0001.hea"
    raw, fs = load_physionet_signal(path)
    out = load_batch(_batch(path), "cpsc2018", sample_rate=int(fs), seconds=10,
                     crop_seconds=5)
    assert out["rejected"].tolist() == [""]
    np.testing.assert_allclose(out["ecg"][0], _reference_reading(raw, int(fs)), atol=1e-5)
    # Not the plain 10 s reading: the second half is the normalised zero, one constant.
    plain = load_batch(_batch(path), "cpsc2018", sample_rate=int(fs), seconds=10)["ecg"][0]
    assert not np.allclose(plain, out["ecg"][0])
    assert np.ptp(out["ecg"][0][:, 5 * int(fs):]) == 0


def test_a_five_second_record_is_kept_with_the_crop_and_rejected_without(challenge_root):
    short = challenge_root / "g1" / "SHORT.hea"   # 5 s: shorter than the model's 10 s
    plain = load_batch(_batch(short), "cpsc2018", sample_rate=100, seconds=10)
    assert plain["rejected"][0].startswith("wrong_length")
    cropped = load_batch(_batch(short), "cpsc2018", sample_rate=100, seconds=10,
                         crop_seconds=5)
    assert cropped["rejected"].tolist() == [""] and cropped["ecg"].shape == (1, 12, 1000)
    too_short = load_batch(_batch(short), "cpsc2018", sample_rate=100, seconds=10,
                           crop_seconds=6)
    assert too_short["rejected"][0].startswith("wrong_length")


def test_crop_comes_before_resampling_and_the_padding_stays_zero(challenge_root):
    """At 50 Hz: the first 5 s resampled, then 250 zeros, then normalised jointly."""
    path = challenge_root / "g1" / "A0002.hea"
    out = load_batch(_batch(path), "cpsc2018", sample_rate=50, seconds=10,
                     crop_seconds=5)["ecg"][0]
    assert out.shape == (12, 500)
    signal_part = load_batch(_batch(path), "cpsc2018", sample_rate=50, seconds=5)["ecg"][0]
    # Same 5 s up to the affine map of the joint min-max (zeros widen the range).
    a, b = np.polyfit(signal_part.ravel(), out[:, :250].ravel(), 1)
    np.testing.assert_allclose(out[:, :250], a * signal_part + b, atol=1e-5)
    assert np.ptp(out[:, 250:]) == 0


def test_plan_checks_and_records_the_crop(plan_args, challenge_root):
    plan = build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-10",
                                "--crop-seconds", "5", dataset="cpsc2018", root=challenge_root))
    assert plan.crop_seconds == 5 and plan.settings["crop_seconds"] == 5
    with pytest.raises(EvalError, match=r"--crop-seconds must be in \(0, --seconds=10"):
        build_plan(plan_args("--mode", "zeroshot", "--crop-seconds", "12",
                             dataset="cpsc2018", root=challenge_root))
