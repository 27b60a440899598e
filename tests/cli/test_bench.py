"""`sagellm-backend bench`: figures, JSON shape, contract verdicts, baseline, usage errors."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import pytest

from sagellm_backend import cli
from sagellm_backend.cli import bench
from sagellm_backend.cli._table import Progress, render_table
from sagellm_backend.engine.mock import MockEngine, MockEngineConfig, MockTokenizer

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _no_nan(value: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {value}")


def run_bench(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any], str, str]:
    path = tmp_path / "bench.json"
    code = cli.main(["bench", *argv, "--json", str(path)])
    out, err = capsys.readouterr()
    report = json.loads(path.read_text(), parse_constant=_no_nan) if path.exists() else {}
    return code, report, out, err


def mock_args(*extra: str, ttft: str = "1", latency: str = "1") -> list[str]:
    return ["--engine", "mock", "--mock-ttft-ms", ttft, "--mock-latency-ms", latency, *extra]


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- mock engine


def test_json_figures_are_consistent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--requests", "6", "--concurrency", "3", "--input-len", "20", "--output-len", "5"]
    code, r, out, err = run_bench(mock_args(*args, "--no-progress"), tmp_path, capsys)
    assert code == 0, err
    assert r["schema"] == bench.JSON_SCHEMA
    res = r["results"]
    assert res["requests"] == res["completed"] == 6 and res["failed"] == 0
    assert res["error_rate"] == 0.0
    assert res["output_tokens"] == 6 * 5
    assert res["input_tokens"] == 6 * 20 == r["workload"]["prompt_tokens"]["total"]
    assert res["finish_reasons"] == {"length": 6}
    duration = res["duration_s"]
    assert duration > 0
    thr = res["throughput"]
    assert thr["output_tok_s"] == pytest.approx(30 / duration)
    assert thr["total_tok_s"] == pytest.approx((30 + 120) / duration)
    assert thr["req_s"] == pytest.approx(6 / duration)
    lat = res["latency_ms"]
    for key, count in (("ttft", 6), ("tbt", 6), ("tpot", 6), ("itl", 6 * 4), ("e2e", 6)):
        d = lat[key]
        assert d["count"] == count, key
        assert d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"], key
        assert isinstance(d["mean"], float)
    per = res["per_request"]
    assert [p["index"] for p in per] == list(range(6))
    assert all(p["output_tokens"] == 5 and p["prompt_tokens"] == 20 for p in per)
    assert sorted(p["ttft_ms"] for p in per)[len(per) // 2 - 1] <= lat["ttft"]["p50"]
    kv = res["kv"]
    assert kv["kv_used_tokens_peak"] > 0 and kv["kv_used_bytes_peak"] > 0
    assert kv["prefix_query_tokens"] == 6 * 20
    assert kv["pool"]["num_seqs"] == 0
    assert isinstance(res["memory"]["peak_mem_mb"], int)
    cfg = r["config"]
    assert (cfg["requests"], cfg["concurrency"], cfg["input_len"], cfg["output_len"]) == (
        6,
        3,
        20,
        5,
    )
    assert cfg["engine"] == "mock" and cfg["baseline"] == "none"
    assert r["baselines"] == {} and r["ratios"] == {}
    contract = r["contract"]
    assert [c["id"] for c in contract["checks"]] == [c.id for c in bench.CONTRACT]
    assert isinstance(contract["year1"]["passed"], bool)
    year2 = next(c for c in contract["checks"] if c["stage"] == "year2")
    assert year2["applicable"] is False and year2["passed"] is None
    assert contract["year2"]["passed"] is None
    assert r["passed"] == contract["year1"]["passed"]
    ttft = next(c for c in contract["checks"] if c["id"] == "year1.ttft")
    assert ttft["measured"] == lat["ttft"]["p50"]
    assert ttft["passed"] == (lat["ttft"]["p50"] <= 100.0)
    assert r["machine"]["cpus"] >= 1
    for heading in ("THROUGHPUT", "LATENCY (ms)", "MEMORY AND KV CACHE", "sageLLM contract"):
        assert heading in out
    assert f"wrote {tmp_path / 'bench.json'}" in out


def test_concurrency_bounds_requests_in_flight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--requests", "6", "--concurrency", "2", "--input-len", "8", "--output-len", "4"]
    code, r, _, _ = run_bench(mock_args(*args, "--no-progress", latency="5"), tmp_path, capsys)
    assert code == 0
    spans = [(p["queued_at"], p["completed_at"]) for p in r["results"]["per_request"]]
    for start, _ in spans:
        in_flight = sum(1 for s, e in spans if s <= start < e)
        assert in_flight <= 2
    # Not serialised either: some requests overlapped.
    assert any(s2 < e1 for (s1, e1) in spans for (s2, _) in spans if s2 > s1)


@pytest.mark.parametrize(("prefix", "input_len"), [(64, 32), (256, 32)])
def test_shared_prefix_hit_rate_is_measured_exactly(
    prefix: int, input_len: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--requests", "4", "--input-len", str(input_len), "--output-len", "3"]
    code, r, out, _ = run_bench(
        mock_args(*args, "--shared-prefix", str(prefix), "--no-progress"), tmp_path, capsys
    )
    assert code == 0
    total = prefix + input_len
    assert r["workload"]["prompt_tokens"]["min"] == r["workload"]["prompt_tokens"]["max"] == total
    # The warm-up request computed the prefix alone: each request reuses its full blocks.
    expected = (prefix // 16 * 16) / total
    kv = r["results"]["kv"]
    assert kv["prefix_hit_rate"] == pytest.approx(expected)
    assert kv["prefix_hit_tokens"] == 4 * (prefix // 16 * 16)
    assert kv["request_prefix_hit_rate_mean"] == pytest.approx(expected)
    year2 = next(c for c in r["contract"]["checks"] if c["stage"] == "year2")
    assert year2["applicable"] is True
    assert year2["passed"] is (expected >= 0.7)
    assert r["contract"]["year2"]["passed"] is (expected >= 0.7)
    assert "prefix hit rate" in out


def test_no_prefix_caching_gives_no_hits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--requests", "3", "--input-len", "8", "--output-len", "2", "--shared-prefix", "64"]
    code, r, _, _ = run_bench(
        mock_args(*args, "--no-prefix-caching", "--no-progress"), tmp_path, capsys
    )
    assert code == 0
    assert r["results"]["kv"]["prefix_hit_rate"] == 0.0
    assert r["contract"]["year2"]["passed"] is False
    assert r["config"]["prefix_caching"] is False


def test_no_stream_gives_the_same_token_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--requests", "4", "--input-len", "8", "--output-len", "3", "--no-stream"]
    code, r, _, _ = run_bench(mock_args(*args, "--no-progress"), tmp_path, capsys)
    assert code == 0
    assert r["results"]["output_tokens"] == 12 and r["config"]["stream"] is False


def test_strict_exits_1_when_the_contract_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--requests", "2", "--input-len", "8", "--output-len", "2", "--no-progress"]
    slow = mock_args(*args, ttft="150")
    code, r, _, _ = run_bench(slow, tmp_path, capsys)
    assert code == 0
    ttft = next(c for c in r["contract"]["checks"] if c["id"] == "year1.ttft")
    assert ttft["passed"] is False and ttft["measured"] > 100
    assert r["passed"] is False
    code, _, out, err = run_bench([*slow, "--strict"], tmp_path, capsys)
    assert code == 1
    assert "contract failed: year1.ttft" in err
    assert "FAIL" in out


def test_contract_stat_selects_the_statistic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--requests", "3", "--input-len", "8", "--output-len", "3", "--no-progress"]
    code, r, _, _ = run_bench(mock_args(*args, "--contract-stat", "p99"), tmp_path, capsys)
    assert code == 0
    tpot = next(c for c in r["contract"]["checks"] if c["id"] == "year1.tpot")
    assert tpot["statistic"] == "p99"
    assert tpot["measured"] == r["results"]["latency_ms"]["tpot"]["p99"]


def test_every_request_failing_exits_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_engine(settings: Any) -> MockEngine:
        return MockEngine(MockEngineConfig(settings.engine_id, 0.0, 0.0, 1.0))

    monkeypatch.setattr(bench, "create_engine", failing_engine)
    args = ["--requests", "3", "--input-len", "8", "--output-len", "2", "--warmup", "0"]
    code, r, _, err = run_bench(mock_args(*args, "--no-progress"), tmp_path, capsys)
    assert code == 1
    assert "every request failed" in err and "injected failure" in err
    res = r["results"]
    assert res["completed"] == 0 and res["failed"] == 3 and res["error_rate"] == 1.0
    assert res["finish_reasons"] == {"error": 3}
    checks = {c["id"]: c for c in r["contract"]["checks"]}
    assert checks["year1.error_rate"]["passed"] is False
    assert checks["year1.ttft"]["passed"] is False  # not measured -> fails
    assert r["passed"] is False


def test_prompts_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = ["plain line one", "two lines\nin one prompt", "third prompt"]
    path = tmp_path / "prompts.txt"
    path.write_text(
        f"{prompts[0]}\n\n{json.dumps(prompts[1])}\n{json.dumps({'prompt': prompts[2]})}\n",
        encoding="utf-8",
    )
    args = ["--prompts-file", str(path), "--requests", "5", "--output-len", "2", "--no-progress"]
    code, r, _, _ = run_bench(mock_args(*args), tmp_path, capsys)
    assert code == 0
    tok = MockTokenizer()
    expected = [len(tok.encode(prompts[i % 3])) for i in range(5)]
    assert [p["prompt_tokens"] for p in r["results"]["per_request"]] == expected
    assert r["workload"]["source"] == f"file:{path}"
    assert r["config"]["input_len"] is None
    # Without --requests: one request per prompt.
    code, r, _, _ = run_bench(
        mock_args("--prompts-file", str(path), "--output-len", "2", "--no-progress"),
        tmp_path,
        capsys,
    )
    assert code == 0 and r["results"]["requests"] == 3


def test_json_to_stdout_moves_the_tables_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--requests", "2", "--input-len", "8", "--output-len", "2", "--no-progress"]
    code = cli.main(["bench", *mock_args(*args), "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0
    report = json.loads(out, parse_constant=_no_nan)
    assert report["results"]["completed"] == 2
    assert "LATENCY (ms)" in err and "LATENCY" not in out


def test_progress_lines_when_not_a_tty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--requests", "4", "--input-len", "8", "--output-len", "4"]
    code, _, _, err = run_bench(mock_args(*args, latency="5"), tmp_path, capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("bench tokens:")]
    assert lines, err
    assert "\r" not in err
    assert lines[-1].startswith("bench tokens: 16/16 100%") and "4/4 requests" in lines[-1]
    code, _, _, err = run_bench(mock_args(*args, "--no-progress"), tmp_path, capsys)
    assert "bench tokens" not in err


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--engine", "mock", "--requests", "0"], ["--requests", ">= 1"]),
        (["--engine", "mock", "--concurrency", "0"], ["--concurrency", ">= 1"]),
        (["--engine", "mock", "--output-len", "0"], ["--output-len"]),
        (["--engine", "mock", "--input-len", "-3"], ["--input-len"]),
        (["--engine", "mock", "--shared-prefix", "-1"], ["--shared-prefix", ">= 0"]),
        (["--engine", "bogus"], ["--engine", "'cpu'", "'cuda'", "'mock'"]),
        (["--engine", "mock", "--baseline", "hf"], ["--baseline hf", "--engine cpu or cuda"]),
        (["--engine", "mock", "--baseline", "vllm"], ["--baseline", "'hf'"]),
        (["--engine", "mock", "--prompts-file", "/no/such/file.txt"], ["no such file"]),
        (["--engine", "cpu"], ["--model is required"]),
        (["--engine", "mock", "--contract-stat", "p42"], ["--contract-stat", "'p50'"]),
    ],
)
def test_bad_arguments_are_usage_errors(
    args: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(["bench", *args], capsys)
    assert "usage: sagellm-backend bench" in err
    for text in expected:
        assert text in err, (text, err)


def test_prompts_file_and_input_len_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.txt"
    path.write_text("hello\n", encoding="utf-8")
    err = usage_error(
        ["bench", "--engine", "mock", "--prompts-file", str(path), "--input-len", "4"], capsys
    )
    assert "--input-len or --prompts-file, not both" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert "holds no prompt" in usage_error(
        ["bench", "--engine", "mock", "--prompts-file", str(empty)], capsys
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n', encoding="utf-8")
    assert "line 1" in usage_error(
        ["bench", "--engine", "mock", "--prompts-file", str(bad)], capsys
    )


def test_json_into_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "missing" / "out.json"
    err = usage_error(["bench", "--engine", "mock", "--json", str(target)], capsys)
    assert "does not exist" in err


# ----------------------------------------------------------------------------- helpers


def test_progress_on_a_tty_is_one_updating_line() -> None:
    stream = io.StringIO()
    progress = Progress(10, "bench", stream=stream, tty=True, min_interval_s=0.0)
    for done in range(1, 11):
        progress.update(done, f"{done} tokens")
    progress.close("done")
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 11
    assert "[" in text and "10/10 100%" in text.splitlines()[-1].split("\r")[-1]


def test_progress_in_line_mode_prints_at_each_quarter() -> None:
    stream = io.StringIO()
    progress = Progress(100, "work", stream=stream, tty=False, every_s=1e9)
    for done in range(0, 101, 5):
        progress.update(done)
    progress.close()
    lines = stream.getvalue().splitlines()
    # A line at each quarter, and the final one from close().
    expected = ["25/100", "50/100", "75/100", "100/100", "100/100"]
    assert [line.split()[1] for line in lines] == expected
    with pytest.raises(ValueError, match="total"):
        Progress(0, "x", stream=stream)


def test_render_table_aligns_and_expands_multi_line_cells() -> None:
    table = render_table(["NAME", "N"], [["a", "1"], ["long name", "1,234"], ["x\ny", "-"]])
    lines = table.splitlines()
    assert lines[0] == "NAME           N"
    assert lines[2] == "a              1"
    assert lines[3] == "long name  1,234"
    assert lines[4] == "x              -"
    assert lines[5] == "y"
    assert all(line == line.rstrip() for line in lines)
    with pytest.raises(ValueError, match="cells"):
        render_table(["A", "B"], [["only one"]])


def test_evaluate_contract_edges() -> None:
    none_dist = {k: None for k in ("mean", "p50", "p90", "p99", "min", "max")}
    results: dict[str, Any] = {
        "latency_ms": {k: dict(none_dist, count=0) for k in ("ttft", "tbt", "tpot", "itl", "e2e")},
        "throughput": {"output_tok_s": 80.0},
        "error_rate": 0.0,
        "kv": {"prefix_hit_rate": 0.9},
    }
    results["latency_ms"]["ttft"]["p50"] = 50.0
    verdict = bench.evaluate_contract(results, stat="p50", shared_prefix=16, output_len=1)
    checks = {c["id"]: c for c in verdict["checks"]}
    assert checks["year1.ttft"]["passed"] is True
    assert checks["year1.tbt"]["applicable"] is False and checks["year1.tbt"]["passed"] is None
    assert checks["year1.throughput"]["passed"] is True
    assert checks["year2.prefix_hit_rate"]["passed"] is True
    assert verdict["passed"] is True
    results["throughput"]["output_tok_s"] = 49.9
    assert (
        bench.evaluate_contract(results, stat="p50", shared_prefix=0, output_len=1)["passed"]
        is False
    )


# ----------------------------------------------------------------------------- HF engine


@pytest.mark.hf
@pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")
def test_baseline_hf_on_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--engine",
        "cpu",
        "--model",
        "tiny-llama",
        "--requests",
        "2",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--baseline",
        "hf",
        "--no-progress",
    ]
    code, r, out, err = run_bench(args, tmp_path, capsys)
    assert code == 0, err
    res = r["results"]
    assert res["completed"] == 2 and res["output_tokens"] == 8
    assert res["input_tokens"] == 32
    assert r["engine"]["info"]["engine_type"] == "CPUEngine"
    assert r["engine"]["info"]["runner"] == "paged"
    assert set(r["baselines"]) == {"sequential", "static"}
    engine_tps = res["throughput"]["output_tok_s"]
    for mode, base in r["baselines"].items():
        assert base["output_tokens"] == 8 and base["seconds"] > 0
        assert base["output_tok_s"] == pytest.approx(8 / base["seconds"])
        assert r["ratios"][f"engine_vs_{mode}"] == pytest.approx(engine_tps / base["output_tok_s"])
        assert base["compared"] == 2
    # Greedy decoding: the engine produces the tokens plain generate produces.
    assert r["baselines"]["sequential"]["same_tokens"] == 2
    assert r["baselines"]["static"]["batch_size"] == 2
    assert "ENGINE SPEEDUP" in out and "engine / generate sequential" in out
    assert res["memory"]["peak_mem_mb"] > 0
    assert r["machine"]["torch"] is not None
