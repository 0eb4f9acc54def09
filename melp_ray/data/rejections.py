"""Why a record is rejected: the named reasons every reader reports (never a silent drop), and
the exception that carries one."""
from __future__ import annotations

MISSING_FILE = "missing_file"        # .hea or .dat not on disk
UNREADABLE = "unreadable"            # header parses but the samples cannot be read (truncated/corrupt .dat)
BAD_HEADER = "bad_header"            # .hea cannot be parsed, or has unknown units
NAN_OR_INF = "nan_or_inf"
FLAT_SIGNAL = "flat_signal"          # every lead is flat (e.g. all zero)
MISSING_LEADS = "missing_leads"      # one of the 12 leads is absent or repeated
WRONG_LENGTH = "wrong_length"        # shorter than the wanted duration
BAD_SAMPLE_RATE = "bad_sample_rate"  # rate <= 0 or not a whole number of Hz
EMPTY_REPORT = "empty_report"
SHORT_REPORT = "short_report"        # fewer words than min_report_words
# Only the manifest layout (data/manifest.py) can produce these two.
WRONG_SHAPE = "wrong_shape"          # an array that is not leads x samples / samples x leads
DUPLICATE_RECORD_ID = "duplicate_record_id"   # a second row with an id already listed

REJECTION_REASONS: tuple[str, ...] = (
    MISSING_FILE, UNREADABLE, BAD_HEADER, NAN_OR_INF, FLAT_SIGNAL, MISSING_LEADS,
    WRONG_LENGTH, BAD_SAMPLE_RATE, EMPTY_REPORT, SHORT_REPORT,
)
MANIFEST_REJECTION_REASONS: tuple[str, ...] = REJECTION_REASONS + (WRONG_SHAPE, DUPLICATE_RECORD_ID)


class RecordRejected(Exception):
    """A record that cannot be used; ``reason`` is one of REJECTION_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in MANIFEST_REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
