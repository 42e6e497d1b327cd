"""Figures in the docs are the CSVs that the benchmark scripts write.

Each benchmark prints its CSV as the docs' markdown table (`--table`); the
docs must contain that table as it is, so a new run that changes a figure
fails here until the docs are updated with it.
"""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark(name):
    spec = importlib.util.spec_from_file_location(
        f"benchmark_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, make_table, doc", [
    ("quantization", lambda m: m.tables(m._common.read_csv("quantization.csv")),
     "docs/generation.md"),
    ("generate", lambda m: m.table(m._common.read_csv("generate.csv")),
     "docs/generation.md"),
])
def test_doc_tables_are_the_benchmark_csvs(script, make_table, doc):
    table = make_table(benchmark(script))
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    assert table in text, f"{doc} lacks the table of benchmarks/{script}.py --table:\n{table}"
