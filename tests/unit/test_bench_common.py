"""The benchmarks' shared reporting: comparisons are medians of per-round ratios with their
range, never a best of N or a ratio of pooled figures, and tables come out as markdown."""

import pytest

from bench import common


def test_ratio_summary_is_the_median_of_the_rounds_with_their_range():
    summary = common.ratio_summary([2.43, 2.98, 2.29, 1.86])
    assert summary == {"median": 2.36, "range": [1.86, 2.98], "by_round": [2.43, 2.98, 2.29, 1.86]}


def test_ratio_summary_of_no_rounds_has_no_figure():
    assert common.ratio_summary([]) == {"median": None, "range": [None, None], "by_round": []}
    assert common.fmt_ratio(common.ratio_summary([])) == "n/a"


def test_per_round_ratios_pair_each_round_with_its_own_baseline():
    # The fastest run of one side against the slowest of the other would give 4.0 or 0.5:
    # only runs of the same round are divided.
    ours = [{"rps": 100.0}, {"rps": 200.0}, {"rps": 50.0}]
    theirs = [{"rps": 50.0}, {"rps": 100.0}, {"rps": 40.0}]
    summary = common.per_round_ratios(ours, theirs, lambda run: run["rps"])
    assert summary == {"median": 2.0, "range": [1.25, 2.0], "by_round": [2.0, 2.0, 1.25]}


def test_per_round_ratios_differ_from_the_ratio_of_medians():
    ours = [{"p99": 47.0}, {"p99": 36.0}, {"p99": 66.0}, {"p99": 82.0}]
    theirs = [{"p99": 100.0}, {"p99": 100.0}, {"p99": 100.0}, {"p99": 100.0}]
    summary = common.per_round_ratios(ours, theirs, lambda run: run["p99"])
    assert summary["median"] == pytest.approx(0.565)
    assert summary["range"] == [0.36, 0.82]


def test_per_round_ratios_leave_out_rounds_without_a_value():
    ours = [{"rps": 10.0}, {"rps": None}, {"rps": 30.0}]
    theirs = [{"rps": 5.0}, {"rps": 5.0}, {"rps": 0.0}]
    assert common.per_round_ratios(ours, theirs, lambda run: run["rps"])["by_round"] == [2.0]


def test_per_round_ratios_refuse_rounds_that_do_not_pair_up():
    with pytest.raises(ValueError, match="rounds must pair up"):
        common.per_round_ratios([{"x": 1.0}], [{"x": 1.0}, {"x": 2.0}], lambda run: run["x"])


def test_fmt_ratio_shows_the_median_and_the_range():
    summary = common.ratio_summary([5.03, 3.36, 6.13])
    assert common.fmt_ratio(summary) == "5.03x (3.36 to 6.13)"
    assert common.fmt_ratio(summary, ".1f") == "5.0x (3.4 to 6.1)"


def test_markdown_table_aligns_the_first_column_left_and_the_others_right():
    lines = common.markdown_table(["variant", "requests/s", "ratio"], [["ours", "1,098", "2.36x (1.86 to 2.98)"],
                                                                    ["mlflow", 461, "1.00x (1.00 to 1.00)"]])
    assert lines == [
        "| variant | requests/s | ratio |",
        "|---|---:|---:|",
        "| ours | 1,098 | 2.36x (1.86 to 2.98) |",
        "| mlflow | 461 | 1.00x (1.00 to 1.00) |",
    ]


def test_markdown_table_takes_an_alignment_per_column():
    assert common.markdown_table(["target", "result", ""], [["p99", "0.56x", "MISSED"]], align="lrl")[1] == (
        "|---|---:|---|")


def test_markdown_table_refuses_a_row_of_the_wrong_width():
    with pytest.raises(ValueError, match="one entry per column"):
        common.markdown_table(["a", "b"], [["only one"]])


def test_rounds_rotate_the_order_after_waiting_for_a_quiet_machine(monkeypatch):
    waits = []

    def quiet(threshold: float, patience: float) -> float:
        waits.append((threshold, patience))
        return 0.0

    monkeypatch.setattr(common, "wait_until_quiet", quiet)
    orders = list(common.rounds(4, ["a", "b", "c"], 0.1, 5))
    assert orders == [(0, ["a", "b", "c"]), (1, ["b", "c", "a"]), (2, ["c", "a", "b"]), (3, ["a", "b", "c"])]
    assert waits == [(0.1, 5)] * 4


def test_shared_flags_carry_each_benchmarks_defaults(tmp_path):
    parser = common.arguments("Benchmark: x.\n\nMore.", rounds=5, seconds=8, quiet_patience=120, cpus=True)
    args = parser.parse_args(["--out-dir", str(tmp_path), "--server-cpus", "0"])
    assert (args.rounds, args.seconds, args.quiet_threshold, args.quiet_patience) == (5, 8, 0.15, 120)
    assert args.out_dir == tmp_path
    assert common.chosen_cpus(args)[0] == "0"
    assert parser.description == "Benchmark: x."


def test_write_results_writes_json_and_markdown_whole(tmp_path, capsys):
    common.write_results("demo", {"figures": {"ratio": 2.0}}, "# Demo\n", tmp_path)
    assert (tmp_path / "demo.json").read_text() == '{\n  "figures": {\n    "ratio": 2.0\n  }\n}\n'
    assert (tmp_path / "demo.md").read_text() == "# Demo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]
    assert "# Demo" in capsys.readouterr().out


def _training_run(images_per_sec: float) -> dict:
    return {"images_per_sec": images_per_sec, "eval_accuracy": 0.8, "other_cpu_share": 0.1}


def test_trainer_bench_compares_round_by_round_never_the_best_runs():
    from bench import trainer_bench

    # Round 2 was slow for everything (a busy neighbour). The best runs would give
    # 1800 / 1100 = 1.64x; round by round the trainer is 1.8x, 1.5x and 1.7x the quickstart.
    samples = {
        "quickstart": [_training_run(1000), _training_run(600), _training_run(1100)],
        "trainer": [_training_run(1800), _training_run(900), _training_run(1870)],
        "untracked": [_training_run(1836), _training_run(918), _training_run(1889)],
        "bound": [_training_run(1900), _training_run(1000), _training_run(2000)],
        "bound_training": [_training_run(2100), _training_run(1100), _training_run(2200)],
    }
    recipe = {"images_per_sec": 3000.0, "epoch_seconds": [20.0, 21.0], "eval_accuracy": 0.85}
    report = trainer_bench.summarise(samples, recipe, {}, {})
    figures = report["figures"]
    assert figures["ratios"]["trainer_to_quickstart"] == {"median": 1.7, "range": [1.5, 1.8],
                                                          "by_round": [1.8, 1.5, 1.7]}
    assert figures["speedup"] == 1.7
    assert figures["images_per_sec"]["trainer"] == {"median": 1800, "range": [900, 1870]}
    assert figures["logging_overhead"] == {"median": 0.02, "range": [0.01, 0.02]}
    assert report["targets_met"] == {"efficiency": True, "logging_overhead": True}


@pytest.mark.parametrize("name", ["alias_switch", "cold_start", "direct_path", "load", "serving", "tracking"])
def test_each_results_table_is_what_its_benchmark_makes_of_its_samples(name):
    """A table in bench/results is never edited by hand: rendering its JSON gives it back."""
    import importlib
    import json

    module = importlib.import_module(f"bench.{name}_bench")
    report = json.loads((common.RESULTS_DIR / f"{name}.json").read_text())
    assert module.markdown(report) == (common.RESULTS_DIR / f"{name}.md").read_text()


def test_stored_comparisons_are_what_the_samples_give():
    """The figures in the compared benchmarks' JSON are recomputed from their own samples."""
    import json

    from bench import direct_path_bench, serving_bench, tracking_bench

    def stored(name: str) -> dict:
        return json.loads((common.RESULTS_DIR / f"{name}.json").read_text())

    direct = stored("direct_path")
    assert direct_path_bench.figures(direct["samples"]) == direct["figures"]
    serving = stored("serving")
    again = serving_bench.summarise(serving["samples"], serving["figures"]["floor"], serving["machine"])
    assert (again["figures"], again["targets_met"]) == (serving["figures"], serving["targets_met"])
    tracking = stored("tracking")
    counts = {v: tracking["figures"][v]["rows_stored"] for v in tracking_bench.VARIANTS}
    figures = tracking_bench.figures_of(tracking["samples"], counts)
    assert figures.items() <= tracking["figures"].items()
