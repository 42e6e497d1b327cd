"""Print columns of a result CSV as a markdown table, as the docs show it.

The docs' tables of measured figures are this script's (or a benchmark's
own `--table`) output; tests/test_docs_figures.py runs the command named
above each table and checks the doc holds its output unchanged.

    python benchmarks/table.py ffn_memory.csv --columns chunk:chunk_size mode \
        peak_rss_mb:"peak RSS MiB" --where status=ok

`--columns NAME[:HEADER]` picks and orders the CSV's columns (HEADER is the
table's heading, the column's name by default); `--pivot ROW[:HEADER]
COLUMN VALUE` instead makes one line per value of ROW and one column per
value of COLUMN (both in the CSV's order), holding VALUE; `--where KEY=VALUE` keeps
the rows where the column KEY equals VALUE, `KEY!=VALUE` those where it
does not (several conditions: all must hold); `--first N` keeps the first
N rows left (a long CSV, such as a memory profile's, sorted largest first).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def markdown(rows, columns):
    """`rows` (dicts) as a markdown table of `columns`, (name, header) pairs."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(name, "")) for name, _ in columns) + " |")
    return "\n".join(lines)


def pivot(rows, row_spec, column, value):
    """`rows` as a markdown table: one line per `row_spec` value, one column
    per `column` value, cells from `value` (empty where a pair is absent)."""
    name, _, header = row_spec.partition(":")
    lines = list(dict.fromkeys(row[name] for row in rows))
    columns = list(dict.fromkeys(row[column] for row in rows))
    cells = {(row[name], row[column]): row[value] for row in rows}
    table = [{name: line, **{c: cells.get((line, c), "") for c in columns}}
             for line in lines]
    return markdown(table, [(name, header or name)] + [(c, c) for c in columns])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="files in benchmarks/results/ (their rows in turn)")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--columns", nargs="+", metavar="NAME[:HEADER]")
    choice.add_argument("--pivot", nargs=3, metavar=("ROW[:HEADER]", "COLUMN", "VALUE"))
    parser.add_argument("--where", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--first", type=int, metavar="N")
    args = parser.parse_args(argv)
    if args.first is not None and args.first < 1:
        parser.error(f"--first must be a positive number of rows, got {args.first}")
    rows = [row for name in args.csv for row in _common.read_csv(name)]
    for condition in args.where:
        key, _, value = condition.partition("=")
        negate = key.endswith("!")
        key = key.rstrip("!")
        rows = [row for row in rows if (row.get(key) == value) != negate]
    if args.first:
        rows = rows[:args.first]
    if args.pivot:
        needed = [args.pivot[0].partition(":")[0], *args.pivot[1:]]
    else:
        columns = [tuple(spec.split(":", 1)) if ":" in spec else (spec, spec)
                   for spec in args.columns]
        needed = [name for name, _ in columns]
    missing = [name for name in needed if rows and name not in rows[0]]
    if missing:
        parser.error(f"{args.csv} has no column {missing}")
    if args.pivot:
        print(pivot(rows, *args.pivot))
        return
    print(markdown(rows, columns))


if __name__ == "__main__":
    main()
