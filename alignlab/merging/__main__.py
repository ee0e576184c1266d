"""Command line: ``python -m alignlab.merging recipe.yaml OUT_DIR``."""

from __future__ import annotations

import argparse
import logging
import sys

from alignlab.merging.checkpoint import merge_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alignlab.merging",
        description="Merge safetensors checkpoints tensor by tensor following a YAML recipe (see docs/merging.md).",
    )
    parser.add_argument("recipe", help="YAML recipe (merge_method, base_model, models, parameters, dtype)")
    parser.add_argument("out_dir", help="output directory (created atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-prefetch", action="store_true", help="merge one tensor at a time (no worker threads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = merge_checkpoints(args.recipe, args.out_dir, overwrite=args.overwrite,
                                progress=not args.no_progress, prefetch=not args.no_prefetch)
    except (ValueError, TypeError, OSError, ImportError) as e:  # OSError: a path that cannot be written, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
