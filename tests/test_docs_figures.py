"""Figures in the docs are the CSVs that the benchmark scripts write.

Every markdown table in the README and docs/ is preceded by a comment

    <!-- table: python benchmarks/<script>.py ... -->

naming the command that prints it from its CSV in benchmarks/results/
(a benchmark's `--table`, or `benchmarks/table.py` for a plain selection of
columns), or `<!-- table: reference -->` for a table that holds no
measurement (arguments, options). The command's output must follow the
comment unchanged, so a new run that changes a figure, or a figure edited
by hand, fails here until the doc and its CSV agree again. The scripts'
`--table` paths import neither TensorFlow nor Keras: this test is fast.

The same checks keep benchmarks/results/ and docs/ free of orphans: every
CSV and plot there is cited by a doc, and every image a doc shows exists.
"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!-- table: (.+?) -->\n")
# The README's unmarked table lists the library's classes (no measurement);
# its marked ones are checked like every other.
UNCHECKED = {"README.md"}


def docs():
    paths = ["README.md"] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return {path: open(os.path.join(ROOT, path)).read() for path in paths}


def tables(text):
    """(start offset, table text) of every markdown table in `text`."""
    found = []
    for match in re.finditer(r"(?m)^\|.*\|\n\|[-:| ]+\|\n(?:\|.*\|\n?)*", text):
        found.append((match.start(), match.group(0).rstrip("\n")))
    return found


def marked_tables():
    """(doc, command, table in the doc) for every table with a command."""
    cases = []
    for path, text in docs().items():
        for match in MARKER.finditer(text):
            command = match.group(1)
            if command == "reference":
                continue
            cases.append((path, command, text[match.end():]))
    return cases


def run(command):
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].startswith("benchmarks/"), command
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.rstrip("\n")


@pytest.mark.parametrize("doc, command, table", marked_tables(),
                         ids=lambda value: value if isinstance(value, str) and
                         value.startswith("python") else None)
def test_doc_table_is_its_csv(doc, command, table):
    # `table`: the doc's text from the end of the comment on.
    expected = run(command)
    assert expected.startswith("|"), f"`{command}` printed no table"
    shown = table[:len(expected)]
    assert shown == expected, (
        f"{doc}: the table under `{command}` is not what the command prints:\n"
        f"--- doc\n{shown}\n--- command\n{expected}")


def test_every_table_names_its_source():
    unmarked = []
    for path, text in docs().items():
        if path in UNCHECKED:
            continue
        previous_end = None
        for start, table in tables(text):
            before = text[:start].rstrip("\n")
            # A command may print several tables separated by blank lines.
            follows_checked = previous_end is not None and len(before) <= previous_end
            if not (MARKER.match(before.rsplit("\n", 1)[-1] + "\n") or follows_checked):
                unmarked.append(f"{path}: {table.splitlines()[0]}")
                previous_end = None
            else:
                previous_end = start + len(table)
    assert not unmarked, "tables without a <!-- table: ... --> comment:\n" + "\n".join(unmarked)


def test_checked_tables_are_found():
    # The parser above must see the tables it is meant to check: the
    # benchmark tables of these docs at least.
    commands = [command for _, command, _ in marked_tables()]
    for script in ("train_step.py", "learning_curves.py", "main_job.py",
                   "quantization.py", "generate.py"):
        assert any(f"benchmarks/{script}" in command for command in commands), script


def test_results_and_images_are_cited_and_exist():
    text = "\n".join(docs().values())
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*"))):
        name = os.path.basename(path)
        if name.startswith("tmp"):  # smoke runs' output, git-ignored
            continue
        assert name in text, f"benchmarks/results/{name} is cited by no doc"
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.png"))):
        name = os.path.basename(path)
        assert name in text, f"docs/{name} is shown by no doc"
    for doc, body in docs().items():
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body):
            where = os.path.join(ROOT, os.path.dirname(doc), image)
            assert os.path.exists(where), f"{doc} shows {image}, which does not exist"
