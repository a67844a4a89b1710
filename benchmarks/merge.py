"""Join result files of one benchmark on one GPU kind (a grid measured over several calls)
into one; a later file's row replaces an earlier one with the same key, or with
``--fill`` only adds the columns it lacks (e.g. FlexAttention peers measured on a subset of
the points in another call); decode rows then get their derived columns (best dense
baseline, speedups, floor fractions) recomputed from all their timings.

    python benchmarks/merge.py benchmarks/results/decode-h100.json part1.json part2.json ...
    python benchmarks/merge.py --fill benchmarks/results/decode-h100.json flex-part.json

The output may be one of the inputs (its rows come first, so newer parts win).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("parts", type=Path, nargs="+")
    p.add_argument("--fill", action="store_true", help="add missing columns to rows instead of replacing them")
    args = p.parse_args(argv)
    paths = ([args.out] if args.out.exists() else []) + [x for x in args.parts if x != args.out]
    loaded = [C.load_results(x) for x in paths]
    merged = C.merge_results(loaded, fill=args.fill)
    if args.fill and merged["bench"] == "decode":
        from bench_decode import summarise

        for row in merged["rows"]:
            for stale in ("best_dense", "best_dense_ms"):
                row.pop(stale, None)
            backends = {k.split("_")[1]: None for k in row if k.startswith("seerattn_") and k.endswith("_ms")}
            summarise(row, backends)
        merged["info"]["peers"] = sorted({x for part in loaded for x in part["info"].get("peers") or []})
    C.write_results(args.out, merged["bench"], merged["info"], merged["rows"], merge=False)
    print(f"{args.out}: {len(merged['rows'])} rows from {len(paths)} files")
    return args.out


if __name__ == "__main__":
    main()
