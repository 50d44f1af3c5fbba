"""bench encoders' summary says what happened to a contender without a result (no 'nan')."""

from pipeload.bench.encoders import _summary


def _ok(speed):
    return {"result": {"results": {"64": {"samples_per_s": speed}}, "peak_rss": 2e9}, "max_usage": 1e9,
            "oom_killed": False, "returncode": 0}


def test_summary_names_an_oom_killed_contender():
    killed = {"result": None, "max_usage": 0.5e9, "oom_killed": True, "returncode": -9}
    failed = {"result": None, "max_usage": 0.4e9, "oom_killed": False, "returncode": 1}
    data = {"models": [{"name": "m", "contenders": [
        {"label": "transformers (standard PyTorch)", **_ok(10.0)},
        {"label": "pipeload resident", **_ok(20.0)},
        {"label": "transformers in the 25% cgroup", **killed},
        {"label": "pipeload, 25%", **failed}]}]}
    text = _summary(data, 64)
    assert "nan" not in text.lower()
    lines = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| m ")}
    assert "OOM-killed" in lines["transformers in the 25% cgroup"]
    assert "failed (exit 1)" in lines["pipeload, 25%"]
    assert "2.00x" in lines["pipeload resident"]  # vs transformers
