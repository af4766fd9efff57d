#!/usr/bin/env python
"""Rebuild the packaged GLUE sample (neuroada_cli/data/sample/glue/) from a full data directory.

    python scripts/make_glue_sample.py --source /path/to/full/data [--out neuroada_cli/data/sample]

The sample is the fallback when no data dir is given; the embedded CPU recipe trains a small
model (MiniLM) on rte and stsb with it, so those two get more rows (see PLAN):

* rte/validation is the WHOLE split (277 rows), so its LoReFT selection/report split on the
  sample is exactly the one on the full data: the recipe's rte score uses the real protocol.
* other validation files are a seeded sample of rows kept in file order, not the first N rows:
  STS-B's dev file is ordered by genre (captions first, news last), a prefix would be one genre.
* train files are a seeded sample kept in file order (enough for a few CPU epochs).
* tasks whose split is absent from the source are skipped (qnli has no train here; mnli, qqp
  none at all); load_split then names the expected path.

Rows are copied unchanged (``idx`` stays the index in the full split). Output is byte-reproducible
(gzip mtime 0, no file name in the header). Only glue/ under --out is written.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

from neuroada_cli.glue.data import load_split, split_path  # noqa: E402
from neuroada_cli.glue.tasks import GLUE_TASKS  # noqa: E402

SEED = 0
SIZE_LIMIT = 250_000  # bytes for the whole glue/ sample
ALL = None            # keep every row
# task -> split -> rows to keep
PLAN: dict[str, dict[str, int | None]] = {
    "rte": {"train": 400, "validation": ALL},
    "stsb": {"train": 800, "validation": 400},
    "cola": {"train": 200, "validation": 200},
    "sst2": {"train": 200, "validation": 200},
    "mrpc": {"train": 150, "validation": 150},
    "qnli": {"train": 200, "validation": 200},
}


def seeded_sample(lines: list[str], count: int | None, seed: int) -> list[str]:
    """``count`` lines chosen with random.Random(seed), in file order; all lines if count is None."""
    if count is None or count >= len(lines):
        return list(lines)
    chosen = sorted(random.Random(seed).sample(range(len(lines)), count))
    return [lines[i] for i in chosen]


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def write_jsonl_gz(lines: list[str], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as handle:
        handle.write(("\n".join(lines) + "\n").encode("utf-8"))
    path.write_bytes(buffer.getvalue())
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--source", required=True, help="full data dir holding glue/<task>/<split>.jsonl")
    parser.add_argument("--out", default=str(REPO_DIR / "neuroada_cli" / "data" / "sample"))
    args = parser.parse_args(argv)
    source, out = Path(args.source), Path(args.out)

    total = 0
    print(f"{'file':32} {'rows':>11} {'bytes':>8}")
    for task, splits in PLAN.items():
        for split, count in splits.items():
            path = split_path(source, task, split)
            if path is None:
                print(f"{task + '/' + split:32} {'absent':>11}")
                continue
            load_split(task, split, source)  # validate the source before sampling it
            lines = read_lines(path)
            kept = seeded_sample(lines, count, SEED)
            for line in kept:  # unchanged rows: must still parse
                json.loads(line)
            size = write_jsonl_gz(kept, out / "glue" / task / f"{split}.jsonl.gz")
            total += size
            print(f"{task + '/' + split:32} {len(kept):>5}/{len(lines):<5} {size:>8}")
    print(f"{'total':32} {'':>11} {total:>8}")
    missing = [task for task in GLUE_TASKS if task not in PLAN]
    print(f"not sampled (absent from the source): {', '.join(missing)}")
    if total > SIZE_LIMIT:
        print(f"error: the sample is {total} bytes, over the {SIZE_LIMIT} byte budget; shrink PLAN", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
