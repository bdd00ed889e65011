"""`python -m qerl_rollout.quantize`: write an FP8/NVFP4 compressed-tensors copy of a checkpoint.

    python -m qerl_rollout.quantize --model DIR --scheme {fp8_block,fp8_channel,int8,nvfp4} --out DIR [--overwrite]

Routers, shared-expert gates, lm_head, embeddings and norms stay BF16 (see
`qerl_rollout.quant.plan`); the export itself is `qerl_rollout.quant.export.export_checkpoint`.
Prints the plan's summary table at the end. Bad input exits with status 2 and one error line,
and leaves no output directory behind.
"""

from __future__ import annotations

import argparse
import sys

from qerl_rollout.quant import SCHEMES

SCHEME_CHOICES = SCHEMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qerl_rollout.quantize", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", required=True, help="directory of a BF16/FP16 safetensors checkpoint"
    )
    parser.add_argument("--scheme", required=True, choices=SCHEME_CHOICES)
    parser.add_argument(
        "--out", required=True, help="output directory (must not exist unless --overwrite)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qerl_rollout.quant.export import ExportError, export_checkpoint
    from qerl_rollout.quant.plan import RouterNotFoundError, UnsupportedConversionError

    try:
        plan = export_checkpoint(args.model, args.out, args.scheme, overwrite=args.overwrite)
    except (ExportError, RouterNotFoundError, UnsupportedConversionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.summary())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
