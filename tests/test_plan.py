"""``stream-classifier plan``: the arithmetic a capacity decision rests on, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_classifier.cli import main
from stream_classifier.tools import plan

ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "benchmarks" / "results" / "2026-12-03-h200"
H100 = ROOT / "benchmarks" / "results" / "2026-11-26-h100"
ISSUE_GPUS = {"T4", "V100", "A10G", "L4", "A100", "H100", "H200"}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    texts = ["世界那么大，我想去看看", "Hi, I was billed $49 but my plan is $29 a month."]
    return write_lines(tmp_path / "events.jsonl", [json.dumps({"text": t}) for t in texts])


# -- the formula ---------------------------------------------------------------------------


def test_flops_of_a_pair_on_the_large_shape() -> None:
    """F(L) = L (2 W + 4 n d L), W = 24 (4 d^2 + 2 d i): the count bench and the docs use."""
    large = plan.STRUCTBERT_LARGE
    assert large.matrix_weights == 24 * (4 * 1024**2 + 2 * 1024 * 4096) == 301_989_888
    assert large.pair_flops(100) == 100 * (2 * 301_989_888 + 4 * 24 * 1024 * 100)


def test_the_fp16_weights_are_what_bench_measured() -> None:
    """All parameters in fp16: bench's weights_gb of the large model, 0.651051014 GB."""
    report = json.loads((H200 / "bench_large_h200.json").read_text(encoding="utf-8"))
    measured = report["results"][1]["extra"]["weights_gb"]
    assert plan.STRUCTBERT_LARGE.parameters * 2 / 1e9 == pytest.approx(measured, abs=1e-9)


def test_memory_is_weights_plus_one_pass_and_checked_against_the_gpu() -> None:
    large = plan.STRUCTBERT_LARGE
    expected = (large.parameters * 2 + 65_536 * (1024 + 2 * 4096) * 2) / 1e9
    assert plan.memory_needed_gb(large) == pytest.approx(expected)
    huge = plan.ModelShape("huge", layers=24, hidden=8192, intermediate=32768, heads=64, vocab=1)
    rows = plan.plan_rows([plan.gpu_named("T4"), plan.gpu_named("H200")], huge, 1e12, 10.0)
    assert [row.fits for row in rows] == [False, True]


@pytest.mark.parametrize(
    ("rate", "per_replica", "replicas"),
    [(1400.0, 2000.0, 1), (1401.0, 2000.0, 2), (5000.0, 1929.7, 4), (0.5, 2000.0, 1)],
)
def test_replicas_keep_each_under_70_percent(
    rate: float, per_replica: float, replicas: int
) -> None:
    assert plan.replicas_for(rate, per_replica) == replicas


# -- the GPU table and the backend ---------------------------------------------------------


def test_the_table_has_every_gpu_of_the_issue_with_its_dense_peak() -> None:
    table = {gpu.name: gpu for gpu in plan.GPUS}
    assert set(table) == ISSUE_GPUS
    peaks = {name: gpu.tflops for name, gpu in table.items()}
    assert peaks == {
        "T4": 65,
        "V100": 125,
        "A10G": 70,
        "L4": 121,
        "A100": 312,
        "H100": 989,
        "H200": 989,
    }
    for gpu in plan.GPUS:
        assert "data sheet" in gpu.source or gpu.source.startswith("assumption"), gpu.name


def test_the_backend_follows_compute_capability_as_the_engine_does() -> None:
    from stream_classifier.engine import packed

    assert plan.FLASH_MIN_CAPABILITY == packed.FLASH_MIN_CAPABILITY
    assert plan.EFFICIENT_MIN_CAPABILITY == packed.EFFICIENT_MIN_CAPABILITY
    backends = {gpu.name: plan.backend_for(gpu) for gpu in plan.GPUS}
    assert backends["T4"] == backends["V100"] == "packed-efficient-graphs"
    assert {backends[name] for name in ISSUE_GPUS - {"T4", "V100"}} == {"packed-flash-graphs"}


def test_gpu_names_match_in_any_case_and_an_unknown_one_names_the_table() -> None:
    assert plan.gpu_named(" h100 ").name == "H100"
    with pytest.raises(plan.PlanError, match="unknown GPU 'B200': the table has T4, V100"):
        plan.gpu_named("B200")


# -- calibration and its checks ------------------------------------------------------------


def test_the_calibration_is_the_h200_measurement_on_file() -> None:
    report = json.loads((H200 / "backends_ab_large_h200.json").read_text(encoding="utf-8"))
    rows = {row["engine_backend"]: row for row in report["rows"]}
    for backend, measured in plan.CALIBRATION.items():
        row = rows[backend]
        assert measured.msgs_per_s == row["e2e_msgs_per_s"]
        flops = row["mfu_e2e"] * report["peak_tflops"] * 1e12 / row["e2e_msgs_per_s"]
        assert measured.flops_per_event == pytest.approx(flops, rel=1e-12)
    ratio = plan.efficiency("packed-efficient-graphs") / plan.efficiency("packed-flash-graphs")
    assert round(ratio, 3) == 0.996


def test_the_checks_are_the_runs_on_file_and_within_10_percent() -> None:
    runs = {
        "bench_large_h200.json": json.loads((H200 / "bench_large_h200.json").read_text("utf-8")),
        "bench_large_held_h100.json": json.loads(
            (H100 / "bench_large_held_h100.json").read_text("utf-8")
        ),
    }
    for measured, check in zip(plan.CHECKS, plan.checks(), strict=True):
        results = runs[Path(measured.source).name]["results"]
        row = next(
            r
            for r in results
            if r["method"] == "stream-classifier (packed-flash-graphs, float16)"
            and r["flops"] / r["messages"] == measured.flops_per_event
        )
        assert row["msgs_per_s"] == measured.msgs_per_s == check.measured
        assert abs(check.error) < 0.10, check


def test_the_reference_workload_reproduces_the_calibration_workload() -> None:
    """Estimated tokens of bench's events equal what bench counted, so the H200 row is the
    measured 1,930 msgs/s and the H100 10-label check is predicted from our own count."""
    from stream_classifier.tools import bench

    large = plan.STRUCTBERT_LARGE
    assert large.pair_flops(91) == bench.SHAPES["large"].flops(91)
    counter = plan.estimated_counter()
    for labels, measured in ((4, plan.CALIBRATION["packed-flash-graphs"]), (10, plan.CHECKS[2])):
        sample, names, template = plan.reference_sample(labels)
        workload = plan.measure_workload(sample, names, template, 0, counter, large)
        assert workload.tokens_per_event == pytest.approx(measured.tokens_per_event, rel=1e-12)
        assert workload.flops_per_event(large) == pytest.approx(measured.flops_per_event)
    four = plan.reference_sample(4)
    workload = plan.measure_workload(four[0], four[1], four[2], 0, counter, large)
    h200 = plan.make_plan(workload, large, 5000.0, [plan.gpu_named("H200")]).rows[0]
    assert h200.msgs_per_s == pytest.approx(1929.6955300720374)
    assert (h200.basis, h200.replicas) == ("measured", 4)


# -- tokens --------------------------------------------------------------------------------


def test_the_token_estimate_splits_where_bert_does() -> None:
    assert plan.estimate_tokens("世界那么大，我想去看看") == 11
    assert plan.estimate_tokens("Hi, I was billed $49 but my plan is $29 a month.") == 16
    assert plan.pair_length(600, 10, 512) == 512
    assert plan.pair_length(60, 10, 512) == 73


def test_a_model_directory_counts_with_the_engines_own_tokenizer(tiny_model: Path) -> None:
    """Pair lengths from --model are the lengths the engine's prepare builds, truncation
    included, and the FLOPs use that checkpoint's shape."""
    from stream_classifier.engine.nli import PairTokenizer, load_tokenizer, pair_set

    texts = ("世界那么大，我想去看看", "hello world " * 400)
    labels, template = ["旅游", "科技 news"], "这是{}。"
    shape = plan.read_model_shape(tiny_model)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.vocab) == (2, 32, 37, 516)
    counter = plan.model_counter(tiny_model)
    workload = plan.measure_workload(plan.Sample("t", texts), labels, template, 0, counter, shape)
    engine_side = PairTokenizer(load_tokenizer(tiny_model), 512)
    expected = [
        tuple(int(n) for n in pair_set(engine_side.prepare(text, labels, template, False)).lengths)
        for text in texts
    ]
    assert list(workload.pairs) == expected
    assert workload.longest_pair == 512
    assert "tiny-structbert" in workload.tokenizer


def test_a_transformers_classifier_is_refused_as_uncalibrated(tmp_path: Path) -> None:
    config = {"model_type": "bert", "architectures": ["BertForSequenceClassification"]}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(plan.PlanError, match="hf_nli engine"):
        plan.read_model_shape(tmp_path)


# -- the sample ----------------------------------------------------------------------------


def test_plain_lines_and_json_lines_are_read_as_the_service_reads_them(tmp_path: Path) -> None:
    plain = plan.read_sample(write_lines(tmp_path / "a.txt", ["one text", "", "two"]), None)
    assert plain.texts == ("one text", "two")
    lines = [json.dumps({"body": {"text": "x"}}), "", json.dumps({"other": 1}), "not json"]
    nested = plan.read_sample(write_lines(tmp_path / "b.jsonl", lines), "body.text")
    assert nested.texts == ("x",)
    assert nested.skipped == 2
    assert nested.first_problem == "line 3: no text at field 'body.text'"


# -- the command ---------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_prints_a_row_per_gpu_marking_predictions(
    sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, str(sample), "--labels", "4", "--rate", "5000")
    assert code == 0
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line[:2] == "| "}
    assert set(rows) - {"GPU", "---"} == ISSUE_GPUS
    assert "| measured |" in rows["H200"]
    assert "| prediction |" in rows["T4"] and "packed-efficient-graphs" in rows["T4"]
    assert "checks, runs the calibration did not use" in out
    assert rows["H200"].count(" * |") == 1  # short texts: faster than anything measured
    assert "* above the fastest rate measured end to end (1,966 msgs/s)" in out


def test_json_output_parses_and_agrees_with_the_arithmetic(
    sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys, str(sample), "--labels", "a,b", "--rate", "800", "--gpu", "l4", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert [row["gpu"] for row in report["rows"]] == ["L4"]
    row = report["rows"][0]
    flops = report["workload"]["flops_per_event"]
    expected = 121e12 * report["efficiency"]["packed-flash-graphs"] / flops
    assert row["msgs_per_s"] == pytest.approx(expected)
    assert row["replicas"] == plan.replicas_for(800, expected)
    assert report["workload"]["events"] == 2 and report["workload"]["labels"] == 2
    assert all(abs(check["error"]) < 0.10 for check in report["checks"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "B200"], "plan: unknown GPU 'B200': the table has T4, V100, A10G, L4, A100"),
        (["--rate", "0"], "plan: --rate must be above 0"),
        (["--template", "no slot"], "plan: --template must contain '{}' exactly once"),
        (["--reference-workload"], "plan: give a sample file or --reference-workload"),
    ],
)
def test_bad_arguments_fail_with_exit_2_and_say_why(
    sample: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, str(sample), "--labels", "4", "--rate", "100", *args)
    assert (code, out) == (2, "")
    assert err.startswith(message), err


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: stream-classifier plan" in text and "`" not in text
