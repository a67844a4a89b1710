"""Join result files of one benchmark on one GPU kind (a grid measured over several calls)
into one; a later file's row replaces an earlier one with the same key.

    python benchmarks/merge.py benchmarks/results/decode-h100.json part1.json part2.json ...

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
    args = p.parse_args(argv)
    paths = ([args.out] if args.out.exists() else []) + [x for x in args.parts if x != args.out]
    merged = C.merge_results([C.load_results(x) for x in paths])
    C.write_results(args.out, merged["bench"], merged["info"], merged["rows"], merge=False)
    print(f"{args.out}: {len(merged['rows'])} rows from {len(paths)} files")
    return args.out


if __name__ == "__main__":
    main()
