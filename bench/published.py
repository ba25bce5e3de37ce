"""Every number the docs publish traces to a results file: a check, run by the test suite.

A published result sits in a marked block of README.md or docs/*.md:

    <!-- results: bench/results/convergence.json | python bench/convergence.py --jobs 3 -->
    ...table or prose...
    <!-- /results -->

The block names its results file(s) (comma-separated) and, after ``|``, the command that wrote them. Every
decimal number in the block (code spans and fenced code left out: they hold commands and settings) must be
some number of those files rounded to the decimals quoted: `0.995` matches 0.99479, `7.8` matches 7.83.

A table row is held to more: all its decimals, and its whole-number cells, must come from one record of the
files, so a number cannot match an unrelated value elsewhere (another seed's, another phase's). A record is a
JSON object inside a list (one run's row). A row that names a seed of some record must come from that seed's
record; another row may instead read everything under a key one of its cells names (`| PPO | …` reads the
subtrees of every key `ppo`; names compare lower-case, alphanumerics only, `+` read as `p`: REINFORCE++ is
`reinforce_pp`; structural keys such as `rows` or `summary` name nothing), which is looser: a summary row. A
table a script renders from its files (docs/performance.md's target tables, ``RENDERED``) must equal, row for
row, what that script renders from them now.

    python bench/published.py            # lists each block and any number missing from its files
    python bench/published.py --unmarked # lists the decimal numbers outside any block, line by line

A decimal outside every block is not checked: settings and definitions may stand there (`lr 1e-3` is best
written as a code span), measured results may not.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- results: (?P<files>[^|>]+?)\s*\|\s*(?P<command>.+?)\s*-->(?P<body>.*?)<!-- /results -->",
                   re.DOTALL)
FENCE = re.compile(r"```.*?```", re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
DECIMAL = re.compile(r"(?<![\w.])[-−]?\d+\.\d+(?![\d.]*\w)")
NUMBER_IN_TEXT = re.compile(r"[-−]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Block:
    page: str
    line: int
    files: list[str]
    command: str
    missing: list[str] = field(default_factory=list)
    untied_rows: list[str] = field(default_factory=list)  # table rows whose numbers no single record holds
    checked: int = 0


def published_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def quoted_numbers(body: str) -> list[str]:
    text = CODE_SPAN.sub(" ", FENCE.sub(" ", body))
    return DECIMAL.findall(text)


def numbers_in(value) -> list[float]:
    """Every number in a JSON value, also those written inside strings (a machine line, a label)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str):
        return [float(n) for n in NUMBER_IN_TEXT.findall(value.replace("−", "-"))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in numbers_in(k) + numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return []


def matches(quoted: str, values: list[float]) -> bool:
    number = float(quoted.replace("−", "-"))
    decimals = len(quoted.split(".")[1])
    half_unit = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(v - number) <= half_unit for v in values)


def key_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("+", "p"))


def records(value, named: dict) -> list:
    """The objects inside lists of a JSON value (run rows); fills ``named``: {key name: [its subtrees]}."""
    objects = []
    if isinstance(value, dict):
        for key, item in value.items():
            named.setdefault(key_name(key), []).append(item)
            objects += records(item, named)
    elif isinstance(value, list):
        for item in value:
            objects += ([item] if isinstance(item, dict) else []) + records(item, named)
    return objects


def table_rows(body: str) -> list[str]:
    """The rows of the markdown tables in a block (header separators left out), outside fenced code."""
    return [line for line in FENCE.sub(" ", body).split("\n")
            if line.startswith("|") and not re.fullmatch(r"[|\-: ]+", line.strip())]


# Keys that structure a results file rather than name a run or an algorithm: a cell naming one ties nothing.
STRUCTURAL_KEYS = {"rows", "summary", "runs", "results", "machine", "mean", "min", "max", "median", "q1", "q3"}


def row_is_tied(row: str, objects: list, named: dict) -> bool:
    """Whether one record holds the row's decimals and its whole-number cells (a seed, a step count). A row
    that names a run by a whole number found in some record (its seed) must come from such a record; other
    rows (an algorithm's summary) may read everything under a key one of their cells names."""
    numbers = quoted_numbers(row)
    if not numbers:
        return True
    cells = [cell.strip().strip("*`") for cell in row.strip().strip("|").split("|")]
    whole = [float(cell) for cell in cells if re.fullmatch(r"\d+", cell)]
    if any(all(matches(q, numbers_in(o)) for q in numbers) and all(w in numbers_in(o) for w in whole)
           for o in objects):
        return True
    if any(o.get("seed") in whole for o in objects):
        return False  # a seed's row: only that run's record may hold its numbers
    names = {key_name(cell) for cell in cells} - {""} - STRUCTURAL_KEYS
    return any(all(matches(q, numbers_in(named[n])) for q in numbers) for n in names if n in named)


def rendered_rows(files: list[str], contents: list) -> list[str] | None:
    """The table rows a script renders from these files, where one does (``RENDERED``), else None."""
    for names, render in RENDERED.items():
        if [Path(f).name for f in files] == list(names):
            return table_rows(render(*contents))
    return None


def _perf_targets(memory: dict, speed: dict) -> str:
    sys.path.insert(0, str(REPO / "bench"))
    import run_all  # noqa: PLC0415  (bench/ is not a package; its import pulls in torch)

    return run_all.summary(memory, speed)


RENDERED = {("perf-memory.json", "perf-speed.json"): _perf_targets}


def unmarked_numbers(path: Path) -> list[tuple[int, list[str]]]:
    """(line, decimals) for each line of a page with decimal numbers outside every results block."""
    def blank(found: re.Match) -> str:  # keeps the newlines, so line numbers stay those of the page
        return re.sub(r"[^\n]", " ", found.group(0))

    text = FENCE.sub(blank, BLOCK.sub(blank, path.read_text()))
    lines = enumerate(text.split("\n"), start=1)
    return [(number, found) for number, line in lines if (found := quoted_numbers(line))]


def check_page(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for found in BLOCK.finditer(text):
        files = [f.strip() for f in found["files"].split(",")]
        block = Block(str(path.relative_to(REPO)), text.count("\n", 0, found.start()) + 1, files, found["command"])
        values, contents = [], []
        for name in files:
            results = REPO / name
            if not results.is_file():
                block.missing.append(f"results file {name} does not exist")
                continue
            contents.append(json.loads(results.read_text()))
            values += numbers_in(contents[-1])
        for quoted in quoted_numbers(found["body"]):
            block.checked += 1
            if not matches(quoted, values):
                block.missing.append(quoted)
        if len(contents) == len(files):
            block.untied_rows = untied_rows(found["body"], files, contents)
        blocks.append(block)
    return blocks


def untied_rows(body: str, files: list[str], contents: list) -> list[str]:
    rows = table_rows(body)
    rendered = rendered_rows(files, contents)
    if rendered is not None and rows:  # row for row: a missing, extra or moved row is named too
        if rows == rendered:
            return []
        return [row for row in rows if row not in rendered] or [f"rows differ from the {len(rendered)} rendered"]
    named: dict = {}
    objects = [o for content in contents for o in records(content, named)]
    return [row for row in rows if not row_is_tied(row, objects, named)]


def check_all() -> list[Block]:
    return [block for page in published_pages() for block in check_page(page)]


def list_unmarked() -> None:
    count = 0
    for page in published_pages():
        for line, numbers in unmarked_numbers(page):
            print(f"{page.relative_to(REPO)}:{line}  {' '.join(numbers)}")
            count += 1
    print(f"{count} lines with decimal numbers outside any results block")


def main() -> None:
    if sys.argv[1:] == ["--unmarked"]:
        list_unmarked()
        return
    blocks = check_all()
    bad = 0
    for b in blocks:
        status = "ok" if not b.missing else f"MISSING {', '.join(b.missing)}"
        print(f"{b.page}:{b.line}  {', '.join(b.files)}  {b.checked} numbers  {status}")
        for row in b.untied_rows:
            print(f"    row not from one record: {row[:120]}")
        bad += bool(b.missing or b.untied_rows)
    print(f"{len(blocks)} blocks, {bad} with numbers not in their results files or rows not from one record")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
