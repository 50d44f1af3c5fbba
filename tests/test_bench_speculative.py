"""`pipeload bench speculative` end to end on the built-in pair: every contender's tokens equal
the plain run's (the bench exits 1 otherwise), and the table has the bound and a row per
prompt kind and contender."""

import json

from pipeload.api import builtin_model_path
from pipeload.cli import main


def test_bench_speculative_runs_every_prompt_kind(tmp_path, capsys):
    rc = main(["bench", "speculative", "--target", str(builtin_model_path()), "--draft",
               str(builtin_model_path("draft")), "--prompts", "code,edit", "--contenders", "plain,draft,lookup",
               "--repeats", "1", "-n", "8", "--ctx", "256", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| code ") or line.startswith("| edit ")]
    assert len(rows) == 6 and all(line.rstrip().endswith("| yes |") for line in rows), out
    saved = json.loads((tmp_path / "speculative.json").read_text())
    assert saved["disk_bw"] > 0 and saved["memory_bw"] > 0
    assert set(saved["runs"]) == {"code none", "edit none"}
    assert (tmp_path / "speculative.png").stat().st_size > 0
