"""Every number in a marked results block of README.md / docs/*.md is in the results file the block names
(bench/published.py), and the check itself fails on a number that is not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import published  # noqa: E402  (bench/ is not a package)


def test_every_published_number_is_in_its_results_file():
    blocks = published.check_all()
    assert blocks, "no marked results block found in README.md or docs/"
    assert sum(b.checked for b in blocks) > 0
    bad = {f"{b.page}:{b.line}": b.missing for b in blocks if b.missing}
    assert not bad, f"numbers not in their results files: {bad}"


def test_rounding_rule():
    values = [0.99479, 7.83, -2.6, 3.346]
    assert published.matches("0.995", values) and published.matches("7.8", values)
    assert published.matches("−2.6", values) and published.matches("3.35", values)
    assert not published.matches("3.4", values[:3])  # 3.346 rounds to 3.3, not 3.4
    assert not published.matches("0.994", values) and not published.matches("2.6", values)


def test_a_number_missing_from_its_file_is_named(tmp_path, monkeypatch):
    results = tmp_path / "bench" / "results" / "r.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"rows": [{"strict": 0.9947, "kl": 3.5347, "label": "seed 4101, 7.8 min"}]}))
    page = tmp_path / "README.md"
    page.write_text("intro 1.5\n<!-- results: bench/results/r.json | python bench/x.py -->\n"
                    "| 0.995 | 3.53 | 7.8 min | `stage.kl.beta=0.04` |\n\n| 0.995 | 3.54 |\n<!-- /results -->\n")
    monkeypatch.setattr(published, "REPO", tmp_path)
    (block,) = published.check_page(page)
    assert block.checked == 5 and block.missing == ["3.54"]  # the code span and the unmarked 1.5 are not checked
    assert block.files == ["bench/results/r.json"] and block.command == "python bench/x.py"


def test_unmarked_lists_decimals_outside_blocks_by_page_line(tmp_path, monkeypatch):
    results = tmp_path / "bench" / "results" / "r.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"kl": 3.5347}))
    page = tmp_path / "README.md"
    page.write_text("intro 1.5 and `lr 0.3`\n"
                    "<!-- results: bench/results/r.json | python bench/x.py -->\n3.53\n<!-- /results -->\n"
                    "```bash\npython x.py --beta 0.04\n```\n"
                    "after 2.25 and 7.8 min\n")
    monkeypatch.setattr(published, "REPO", tmp_path)
    # the block's 3.53, the code span's 0.3 and the fenced 0.04 are not listed; line numbers are the page's
    assert published.unmarked_numbers(page) == [(1, ["1.5"]), (8, ["2.25", "7.8"])]
