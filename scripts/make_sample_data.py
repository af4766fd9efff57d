#!/usr/bin/env python
"""Rebuild the packaged sample data (neuroada_cli/data/sample/llm_adapters/) from a full data dir.

    python scripts/make_sample_data.py --source ../shared/data [--out neuroada_cli/data/sample]

What it writes (see neuroada_cli/data/sample/SOURCES.md for provenance and licences):
* llm_adapters/commonsense_15k/train.json.gz and math_10k/train.json.gz: TRAIN_ROWS rows each,
  a random.Random(SEED) sample of row indices, kept in file order;
* llm_adapters/<task>/test.json.gz: the first TEST_ROWS rows of each eval set; hellaswag comes from
  the approximate reconstruction and is written as hellaswag/test_approx.json.gz, as in the source.

Output is byte-reproducible (gzip mtime 0, no file name in the header, stable JSON).
Only the llm_adapters/ part is touched; other folders under --out (glue/) are left alone.
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

from neuroada_cli.data.llm_adapters import find_file, load_rows  # noqa: E402  (validation only)

SEED = 0
TRAIN_ROWS = 1000
TEST_ROWS = 100
TRAIN_SETS = ("commonsense_15k", "math_10k")
EVAL_SETS = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
    "MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps",
)
# The exact LLM-Adapters hellaswag file is not available; the data dir holds an approximate one.
STEM_OVERRIDES = {"hellaswag": "test_approx"}


def write_json_gz(rows: list[dict], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as handle:
        handle.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())
    return path.stat().st_size


def read_raw(path: Path) -> list[dict]:
    """Rows exactly as stored (load_rows normalises values, e.g. numeric answers to text)."""
    load_rows(path)  # fail early on a malformed source
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def seeded_sample(rows: list[dict], count: int, seed: int) -> list[dict]:
    chosen = sorted(random.Random(seed).sample(range(len(rows)), min(count, len(rows))))
    return [rows[index] for index in chosen]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--source", type=Path, required=True, help="data dir holding llm_adapters/")
    parser.add_argument("--out", type=Path, default=REPO_DIR / "neuroada_cli" / "data" / "sample")
    args = parser.parse_args()
    source, out = args.source / "llm_adapters", args.out / "llm_adapters"

    total = 0
    print(f"{'file':<45} {'rows':>6} {'bytes':>8}")
    jobs = [(name, "train", lambda rows: seeded_sample(rows, TRAIN_ROWS, SEED)) for name in TRAIN_SETS]
    jobs += [(name, STEM_OVERRIDES.get(name, "test"), lambda rows: rows[:TEST_ROWS]) for name in EVAL_SETS]
    for name, stem, pick in jobs:
        found = find_file(source / name, stem)
        if found is None:
            print(f"missing: {source / name / stem}.json[.gz]", file=sys.stderr)
            return 1
        rows = pick(read_raw(found))
        target = out / name / f"{stem}.json.gz"
        size = write_json_gz(rows, target)
        total += size
        print(f"{str(target.relative_to(args.out)):<45} {len(rows):>6} {size:>8}")
    print(f"{'total':<45} {'':>6} {total:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
