"""Print columns of a result CSV as a markdown table, as the docs show it.

The docs' tables of measured figures are this script's (or a benchmark's
own `--table`) output; tests/test_docs_figures.py runs the command named
above each table and checks the doc holds its output unchanged.

    python benchmarks/table.py ffn_memory.csv --columns chunk:chunk_size mode \
        peak_rss_mb:"peak RSS MiB" --where status=ok

`--columns NAME[:HEADER]` picks and orders the CSV's columns (HEADER is the
table's heading, the column's name by default); `--where KEY=VALUE` keeps
the rows where the column KEY equals VALUE, `KEY!=VALUE` those where it
does not (several conditions: all must hold).
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="files in benchmarks/results/ (their rows in turn)")
    parser.add_argument("--columns", nargs="+", required=True, metavar="NAME[:HEADER]")
    parser.add_argument("--where", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    rows = [row for name in args.csv for row in _common.read_csv(name)]
    for condition in args.where:
        key, _, value = condition.partition("=")
        negate = key.endswith("!")
        key = key.rstrip("!")
        rows = [row for row in rows if (row.get(key) == value) != negate]
    columns = [tuple(spec.split(":", 1)) if ":" in spec else (spec, spec)
               for spec in args.columns]
    missing = [name for name, _ in columns if rows and name not in rows[0]]
    if missing:
        parser.error(f"{args.csv} has no column {missing}")
    print(markdown(rows, columns))


if __name__ == "__main__":
    main()
