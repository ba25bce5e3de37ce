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
    untied = {f"{b.page}:{b.line}": b.untied_rows for b in blocks if b.untied_rows}
    assert not untied, f"table rows whose numbers no single record of their files holds: {untied}"


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


def _block_of(tmp_path, monkeypatch, results: dict, body: str):
    path = tmp_path / "bench" / "results" / "r.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    page = tmp_path / "README.md"
    page.write_text(f"<!-- results: bench/results/r.json | python bench/x.py -->\n{body}<!-- /results -->\n")
    monkeypatch.setattr(published, "REPO", tmp_path)
    (block,) = published.check_page(page)
    return block


def test_a_table_row_must_come_from_one_record(tmp_path, monkeypatch):
    runs = {"rows": [{"seed": 4101, "strict": 0.98, "kl": 5.33}, {"seed": 4102, "strict": 0.95, "kl": 3.59}]}
    body = "| seed | strict | KL |\n|---|---|---|\n| 4101 | 0.98 | 5.33 |\n| 4102 | 0.95 | 5.33 |\n"
    block = _block_of(tmp_path, monkeypatch, runs, body)
    # every number is somewhere in the file, but the second row's KL is the other seed's
    assert block.missing == [] and block.untied_rows == ["| 4102 | 0.95 | 5.33 |"]


def test_a_seeds_row_must_be_that_seeds_record(tmp_path, monkeypatch):
    runs = {"summary": {"ppo": {"strict": {"min": 0.95, "max": 0.98}, "kl": {"min": 3.59, "max": 5.33}}},
            "rows": [{"algorithm": "ppo", "seed": 4101, "strict": 0.98, "kl": 5.33},
                     {"algorithm": "ppo", "seed": 4102, "strict": 0.95, "kl": 3.59}]}
    body = "| ppo | 4101 | 0.98 | 5.33 |\n| ppo | 4102 | 0.98 | 5.33 |\n| ppo | 4102 | 0.98 | 3.59 |\n"
    block = _block_of(tmp_path, monkeypatch, runs, body)
    # seed 4101's numbers under seed 4102's label, and a mix of both seeds: the summary under "ppo" holds
    # both numbers of each, but a row that names a seed must come from that seed's record
    assert block.untied_rows == ["| ppo | 4102 | 0.98 | 5.33 |", "| ppo | 4102 | 0.98 | 3.59 |"]


def test_a_row_may_read_the_keys_its_cells_name(tmp_path, monkeypatch):
    summary = {"summary": {"reinforce_pp": {"kl": {"mean": 3.71}}, "ppo": {"kl": {"mean": 4.0}}},
               "runs": {"reinforce_pp": {"minutes": 2.49}}}
    body = "| REINFORCE++ | 3.71 | 2.49 |\n| PPO | 4.00 |\n| PPO | 3.71 |\n"
    block = _block_of(tmp_path, monkeypatch, summary, body)
    assert block.untied_rows == ["| PPO | 3.71 |"]


def test_a_rendered_table_must_equal_what_its_script_renders(tmp_path, monkeypatch):
    monkeypatch.setattr(published, "RENDERED", {("r.json",): lambda r: f"| a | {r['x']:.2f} |\n| b | {r['y']:.1f} |"})
    block = _block_of(tmp_path, monkeypatch, {"x": 1.234, "y": 5.67}, "| a | 1.23 |\n| b | 5.6 |\n")
    assert block.untied_rows == ["| b | 5.6 |"]  # 5.6 is not how the script writes 5.67
    swapped = _block_of(tmp_path, monkeypatch, {"x": 1.234, "y": 5.67}, "| b | 5.7 |\n| a | 1.23 |\n")
    assert swapped.untied_rows == ["rows differ from the 2 rendered"]  # every row is rendered, not in this order
