"""`garage quantize SRC --type T --out NAME|PATH` and `garage convert SRC --type F16|BF16|F32`."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from garagelm.errors import GarageError

# (written out here so that building the parser does not import torch; a test checks they match)
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "FP8")
FLOAT_TYPES = ("F32", "F16", "BF16")


def add_arguments(verb: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="store name, .gguf path or Hugging Face folder")
    types = QUANT_TYPES if verb == "quantize" else FLOAT_TYPES
    p.add_argument("--type", required=True, type=str.upper, choices=types, help=" | ".join(types))
    p.add_argument(
        "--out", default=None, help="a store name (name:tag) or a .gguf path (default: beside the source)"
    )
    if verb == "quantize":
        p.add_argument(
            "--allow-requantize", action="store_true", help="quantize a source that has fewer bits already"
        )
        p.add_argument("--calibration", default=None, metavar="TEXT",
                       help="a text file: weight the rounding by how much each input column is used on it (imatrix)")  # fmt: skip
    p.add_argument("--quiet", action="store_true")


def main(args: argparse.Namespace) -> int:
    from garagelm.cli.resolve import looks_like_path, resolve_model
    from garagelm.quant.convert import bits_per_weight, convert_gguf

    src = resolve_model(args.source, pull_missing=False)
    if args.type == "FP8":
        return _fp8(src, args)
    out = args.out or str(src.with_name(f"{src.name if src.is_dir() else src.stem}-{args.type}.gguf"))
    to_store = not looks_like_path(out)
    if to_store:
        from garagelm.store.local import parse_name

        parse_name(out)  # a bad name fails before the work
        tmp_dir = Path(tempfile.mkdtemp(prefix="garage-quantize-"))
        dst = tmp_dir / f"{Path(src).stem}-{args.type}.gguf"
    else:
        dst = Path(out)
    importance = None
    if getattr(args, "calibration", None):
        from garagelm.quant.imatrix import collect

        text = Path(args.calibration)
        if not text.is_file():
            raise GarageError(f"--calibration {text}: no such file")
        importance = collect(src, text.read_text(encoding="utf-8", errors="replace"), quiet=args.quiet)
    try:
        report = convert_gguf(
            src, dst, args.type, getattr(args, "allow_requantize", False), args.quiet, importance
        )
        if to_store:
            from garagelm.store.importer import import_file

            dst = import_file(dst, out, quiet=True).path
    finally:
        if to_store:  # the temporary folder goes, whether the work finished or not
            shutil.rmtree(tmp_dir, ignore_errors=True)
    for line in report.kept:
        print(f"note: {line}", file=sys.stderr)
    mib = 2**20
    print(f"{out}: {dst} ({report.bytes_out / mib:.1f} MiB from {report.bytes_in / mib:.1f} MiB, "
          f"{bits_per_weight(dst):.2f} bits a weight)")  # fmt: skip
    return 0


def _fp8(src: Path, args: argparse.Namespace) -> int:
    from garagelm.quant.fp8 import write_fp8_folder

    if not src.is_dir():
        raise GarageError(
            f"{src}: FP8 output is a Hugging Face folder, made from one (config.json + safetensors)"
        )
    dst = Path(args.out or f"{src.as_posix().rstrip('/')}-fp8")
    stats = write_fp8_folder(src, dst, args.quiet)
    mib = 2**20
    print(f"{dst}: {stats['fp8']} weights in FP8 (128x128 block scales), {stats['kept']} kept; "
          f"{stats['bytes_out'] / mib:.1f} MiB from {stats['bytes_in'] / mib:.1f} MiB")  # fmt: skip
    return 0
