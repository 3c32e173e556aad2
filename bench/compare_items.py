"""Per-item comparison of two `sled eval` item logs (`<out>.items.jsonl`) of the same settings:
how many items' scores changed, by how much, and whether any item's best-scored choice moved.

    .venv/bin/python bench/compare_items.py BEFORE.items.jsonl AFTER.items.jsonl
"""
import argparse
import json


def load(path):
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    return lines[0]["config"], {record["id"]: record["scores"] for record in lines[1:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args()
    config, before = load(args.before)
    other, after = load(args.after)
    if config != other or before.keys() != after.keys():
        raise SystemExit("the two logs hold different settings or items")
    moved = [i for i in before if before[i] != after[i]]
    print(f"{len(before)} items, {len(moved)} with any score changed")
    for label in next(iter(before.values())):
        for convention in before[next(iter(before))][label]:
            changed, largest, relative, best_moved = 0, 0.0, 0.0, 0
            for i in before:
                x, y = before[i][label][convention], after[i][label][convention]
                diffs = [abs(a - b) for a, b in zip(x, y)]
                changed += max(diffs) > 0
                largest = max(largest, max(diffs))
                relative = max(relative, max(d / max(abs(a), 1e-30) for d, a in zip(diffs, x)))
                best_moved += x.index(max(x)) != y.index(max(y))
            print(f"  {label} {convention}: {changed} items changed, largest change {largest:.3g} "
                  f"(relative {relative:.3g}), best-scored choice moved on {best_moved}")


if __name__ == "__main__":
    main()
