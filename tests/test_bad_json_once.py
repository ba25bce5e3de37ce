"""A malformed JSON line is reported once, as marl-exp's one-line error naming the line (datasets also logged it
twice, counting records from 0)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_a_malformed_json_line_is_one_error_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the movie was great ."}\n{"text": "unterminated\n{"text": "fine ."}\n')
    proc = subprocess.run([sys.executable, "train.py", "debug=sft", "data=local", f"data.train_file={data}",
                           f"output_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("Failed to load JSON") == 0, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("marl-exp: error:")]
    assert len(errors) == 1 and errors[0].endswith("bad.jsonl line 2 is not valid JSON (Unterminated string starting "
                                                   "at column 10); fix that line"), proc.stderr
