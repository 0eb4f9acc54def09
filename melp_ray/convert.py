"""python -m melp_ray.convert: the official MELP weights -> a melp_ray export folder.

    python -m melp_ray.convert --reference melp.ckpt --text-model heart_bert/ --out melp-official/
    python -m melp_ray.convert --reference MELP_Encoder/ --text-model heart_bert/ --out melp-encoder/

What the files must be and what the folder holds: ``melp_ray.hub.convert``.
Errors exit with code 2 and a one-line message naming the key or file at fault.
"""
from __future__ import annotations

import argparse
import json
import sys

from melp_ray.hub.convert import convert, parse_overrides
from melp_ray.hub.reference_files import ConversionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.convert",
        description="Convert the official MELP weights (Lightning .ckpt or the MELP_Encoder "
                    "folder) into a melp_ray export folder.")
    parser.add_argument("--reference", required=True,
                        help="the reference Lightning checkpoint, or the MELP_Encoder folder")
    parser.add_argument("--out", required=True, help="output folder (an export folder)")
    parser.add_argument("--text-model", required=True,
                        help="local folder with the text tower's BERT config and tokenizer "
                             "(heart_bert's)")
    parser.add_argument("--sample-rate", type=int, default=500,
                        help="Hz the reference was trained on (MIMIC-IV-ECG: 500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="record length (10 s)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="ModelConfig field the tensors cannot tell, e.g. ecg_heads=12 "
                             "(default: width/64), pooler_heads=8, decoder_heads=8")
    args = parser.parse_args(argv)
    try:
        record = convert(args.reference, args.out, args.text_model, args.sample_rate,
                         args.seconds, parse_overrides(args.set))
    except (ConversionError, FileNotFoundError, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("source", "kind", "keys_mapped",
                                             "parts_from_reference", "parts_from_our_init",
                                             "matches_preset")}, indent=2))
    print(f"[melp_ray] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
