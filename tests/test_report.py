"""`lorambo-report`: statistics against an independent computation, the paper's numbers beside the cells,
plots, and sweeps that lost jobs."""

import copy
import csv
import glob
import io
import json
import math
import os
import shutil

import numpy as np
import pytest
from scipy import stats

from lorambo.report import main as report_main
from tests.helpers import run_here, run_in_process

TINY = ["experiment=smoke", "task.max_train_samples=64", "task.max_eval_samples=32", "train.max_steps=2"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A real run's metrics.json, to clone with chosen accuracies."""
    run_dir = tmp_path_factory.mktemp("template")
    run_in_process([*TINY, "budget=r4"], run_dir)
    return json.load(open(run_dir / "metrics.json"))


def fake_runs(root, template, model, rows):
    """rows: {(allocator, budget): [accuracy per seed]}; writes one run folder per seed."""
    for (allocator, budget), values in rows.items():
        for seed, value in enumerate(values):
            m = copy.deepcopy(template)
            m.update(model=model, task="qnli", allocator=allocator, budget=budget, seed=seed, accuracy=value,
                     optimizer="adamw", reported_metrics=["accuracy"], main_metric="accuracy")
            run_dir = root / f"{model}_{allocator}_{budget}_s{seed}"
            run_dir.mkdir()
            json.dump(m, open(run_dir / "metrics.json", "w"))


def welch_reference(a, b):
    """Welch's t-test written out: t, Welch-Satterthwaite degrees of freedom, two-sided p."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def report_csv(paths, out, capture):
    """The report's CSV rows, read from what it printed (`capture`: pytest's capsys or capfd)."""
    report_main([*map(str, paths), "--format", "csv", "--out", str(out)])
    return list(csv.DictReader(io.StringIO(capture.readouterr().out)))


@pytest.mark.slow
def test_cells_mean_std_paper_and_test_against_uniform(tmp_path, template, capsys):
    uniform = [0.790, 0.800, 0.812, 0.803]
    hessian = [0.842, 0.851, 0.860, 0.855]  # clearly better
    close = [0.797, 0.809, 0.801]          # within seed noise
    fake_runs(tmp_path, template, "roberta", {("uniform", "r4"): uniform, ("hessian_offline", "r4x1.12"): hessian,
                                              ("gradient", "r4"): close})
    rows = {r["row"]: r for r in report_csv([tmp_path], tmp_path, capsys)}
    assert set(rows) == {"lora_r4", "hessian_offline_r4x1.12", "gradient_r4"}
    for row, values in (("lora_r4", uniform), ("hessian_offline_r4x1.12", hessian), ("gradient_r4", close)):
        assert float(rows[row]["mean"]) == pytest.approx(100 * np.mean(values))
        assert float(rows[row]["std"]) == pytest.approx(100 * np.std(values, ddof=1))
        assert int(rows[row]["n"]) == len(values)
    for row, values in (("hessian_offline_r4x1.12", hessian), ("gradient_r4", close)):
        assert float(rows[row]["vs_uniform"]) == pytest.approx(100 * (np.mean(values) - np.mean(uniform)))
        assert float(rows[row]["p_vs_uniform"]) == pytest.approx(welch_reference(values, uniform), rel=1e-6)
    assert float(rows["hessian_offline_r4x1.12"]["p_vs_uniform"]) < 0.05 < float(rows["gradient_r4"]["p_vs_uniform"])
    # paper 000 Table 1, RoBERTa-base QNLI: uniform r=4 89.32, Adaptive/Hessian (at +12%) 89.45; none for gradient
    assert float(rows["lora_r4"]["paper"]) == 89.32
    assert float(rows["hessian_offline_r4x1.12"]["diff_paper"]) == pytest.approx(100 * np.mean(hessian) - 89.45)
    assert rows["gradient_r4"]["paper"] == ""


def test_markdown_latex_and_plots(tmp_path, template, capsys):
    fake_runs(tmp_path, template, "minilm", {("uniform", "r2"): [0.8, 0.82],
                                             ("hessian_offline", "r2x1.12"): [0.81, 0.83]})
    for path in glob.glob(str(tmp_path / "minilm_hessian_offline_*" / "metrics.json")):
        m = json.load(open(path))
        m["ranks"] = {name: 1 + i % 7 for i, name in enumerate(m["ranks"])}  # an uneven allocation to draw
        json.dump(m, open(path, "w"))
    report_main([str(tmp_path), "--out", str(tmp_path)])
    markdown = capsys.readouterr().out
    table = [line for line in markdown.splitlines() if line.startswith("| minilm")]
    assert len(table) == 2 and "81.00 ± 1.41 (n=2)" in table[0]
    assert markdown.startswith("**Untuned**")  # no tuning.json: the header says so
    # MiniLM on QNLI stands in for BERT-base, its rank budgets for 2x theirs: the analogue's number, marked ~
    assert "[~83.98" in table[0] and "[~86.48" in table[1]
    assert open(tmp_path / "report.md").read() in markdown
    report_main([str(tmp_path), "--format", "latex", "--out", str(tmp_path)])
    assert r"\begin{tabular}" in capsys.readouterr().out
    pngs = glob.glob(str(tmp_path / "*.png"))
    assert any("vs_params" in p for p in pngs) and any(os.path.basename(p).startswith("ranks_") for p in pngs)
    for p in pngs:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_for_a_memory_table_draw_optimizer_state_and_only_changing_ranks(tmp_path, template, capsys):
    """Paper 003's rows: full FT, GaLore (fixed rank) and AdaRankGrad (rank changes), LoRA uniform r4."""
    rows = {"full_ft": ("full_ft", "adamw", None, 600.0), "galore_r4": ("full_ft", "galore", 4, 300.0),
            "adarankgrad_r4": ("full_ft", "adarankgrad", 4, 290.0), "lora_r4": ("uniform", "adamw", None, 5.0)}
    for row, (allocator, optimizer, rank, state_mib) in rows.items():
        for seed in range(2):
            m = copy.deepcopy(template)
            m.update(model="minilm", task="qnli", allocator=allocator, optimizer=optimizer, optimizer_rank=rank,
                     budget=None if allocator == "full_ft" else "r4", seed=seed, accuracy=0.8 + 0.01 * seed,
                     optimizer_state_bytes=int(state_mib * 2**20), reported_metrics=["accuracy"],
                     main_metric="accuracy")
            run_dir = tmp_path / f"{row}_s{seed}"
            run_dir.mkdir()
            json.dump(m, open(run_dir / "metrics.json", "w"))
            if optimizer != "adamw":
                changing = optimizer == "adarankgrad"
                with open(run_dir / "rank_history.jsonl", "w") as f:
                    for step in (10, 20, 30):
                        r = 4 - (step // 10 - 1) * changing
                        f.write(json.dumps({"step": step, "ranks": {"a": r, "b": 4}}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    report_main([str(tmp_path), "--out", str(out)])
    capsys.readouterr()
    pngs = sorted(os.path.basename(p) for p in glob.glob(str(out / "*.png")))
    assert "accuracy_vs_optimizer_state_minilm_qnli.png" in pngs
    assert [p for p in pngs if p.startswith("rank_history")] == ["rank_history_minilm_qnli_adarankgrad_r4.png"]
    assert not [p for p in pngs if p.startswith("ranks_")]  # only uniform LoRA has per-layer ranks: one value


@pytest.mark.slow
def test_a_sweep_that_lost_jobs_keeps_the_rest_and_the_report_names_them(tmp_path, monkeypatch, capfd):
    # a preset runs as a sweep by itself (no -m); train.lr=1e30 makes two of the four jobs fail (NaN loss)
    result = run_here(["experiment=budget_sweep", "model=tiny_bert", "task=rt_snippets", "logger=none",
                       *TINY[1:], "allocator=uniform,frobenius_greedy", "budget=r1", "seed=0",
                       "train.lr=1e-3,1e30", "train.warmup_ratio=0", "hydra.sweep.dir=sweep"], tmp_path, monkeypatch,
                      capfd)
    assert result.returncode == 1  # some jobs failed
    assert result.stderr.count("lorambo-run: error: loss became") == 2
    finished = sorted(glob.glob(str(tmp_path / "sweep" / "*" / "metrics.json")))
    assert len(finished) == 2  # the good jobs' results are kept
    lost = os.path.dirname(finished[1])
    lost_allocator = json.load(open(finished[1]))["allocator"]
    shutil.rmtree(lost)  # a job that never ran (e.g. a lost cluster job)
    rows = report_csv([tmp_path / "sweep"], tmp_path, capfd)
    report_main([str(tmp_path / "sweep"), "--no-plots"])
    out = capfd.readouterr().out
    assert len(rows) == 1
    missing = [line for line in out.splitlines() if line.startswith("missing:")]
    assert len(missing) == 3
    assert sum("failed: loss became" in line for line in missing) == 2
    assert sum("not run" in line for line in missing) == 1
    assert os.path.basename(lost).split("_")[0] in " ".join(line.split(" job ")[1][:3] for line in missing)
    # the lost job run again into its own folder (as a user reruns a lost cell): no longer missing
    rerun = run_here(["experiment=budget_sweep", "model=tiny_bert", "task=rt_snippets", "logger=none", *TINY[1:],
                      f"allocator={lost_allocator}", "budget=r1", "seed=0", "train.lr=1e-3", "train.warmup_ratio=0",
                      "hydra.mode=RUN", "hydra.run.dir=rerun"], tmp_path, monkeypatch, capfd)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    report_main([str(tmp_path / "sweep"), str(tmp_path / "rerun"), "--no-plots"])
    out = capfd.readouterr().out
    still = [line for line in out.splitlines() if line.startswith("missing:")]
    assert len(still) == 2 and all("failed: loss became" in line for line in still)


@pytest.mark.slow
def test_no_runs_is_one_line(tmp_path, monkeypatch, capfd):
    result = run_here([str(tmp_path)], tmp_path, monkeypatch, capfd, program="lorambo-report")
    assert result.returncode == 2 and result.stderr.startswith("lorambo-report: error: no finished runs")
    assert "Traceback" not in result.stderr


def test_budgets_as_columns_show_each_budgets_memory(tmp_path, template, capsys):
    fake_runs(tmp_path, template, "gpt2", {("uniform", "12M"): [0.80, 0.81], ("uniform", "24M"): [0.82, 0.83]})
    for run in glob.glob(str(tmp_path / "*_24M_*" / "metrics.json")):  # the larger budget's adapter is larger
        m = json.load(open(run))
        m["adapter_mib"] = 2 * template["adapter_mib"]
        json.dump(m, open(run, "w"))
    report_main([str(tmp_path), "--no-plots"])
    (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| gpt2 | uniform")]
    assert f"| {template['adapter_mib']:.2f} / {2 * template['adapter_mib']:.2f} |" in line


def test_small_p_values_keep_a_significant_digit():
    from lorambo.report.render import format_cell
    cell = {"mean": 73.55, "std": 0.64, "n": 2, "paper": None, "vs_uniform": -12.65}
    assert format_cell({**cell, "p_vs_uniform": 0.004816}).endswith("Δu -12.65 p=0.005*")
    assert format_cell({**cell, "p_vs_uniform": 0.2157}).endswith("Δu -12.65 p=0.22")
    assert format_cell({**cell, "p_vs_uniform": None}).endswith("Δu -12.65")


def test_scale_policy_is_a_column_and_splits_rows(tmp_path, template, capsys):
    """A sweep over lora.scaling keeps each policy's runs apart (uniform's scale is the same under all, so
    uniform is one row); runs from before the policy existed read as per_layer."""
    fake_runs(tmp_path, template, "minilm", {("uniform", "r4"): [0.80, 0.81], ("gradient", "r4"): [0.70, 0.71]})
    for path in glob.glob(str(tmp_path / "minilm_gradient_*" / "metrics.json")):
        m = json.load(open(path))
        m["lora_scaling"] = "per_layer"
        json.dump(m, open(path, "w"))
    (tmp_path / "matched").mkdir()
    fake_runs(tmp_path / "matched", template, "minilm", {("gradient", "r4"): [0.90, 0.91]})
    old = tmp_path / "old"
    old.mkdir()
    fake_runs(old, template, "minilm", {("frobenius_greedy", "r4"): [0.75, 0.76]})
    for path in glob.glob(str(old / "*" / "metrics.json")):
        m = json.load(open(path))
        del m["lora_scaling"]
        json.dump(m, open(path, "w"))
    rows = {r["row"]: r for r in report_csv([tmp_path], tmp_path, capsys)}
    assert rows["gradient_r4"]["scale"] == "matched" and float(rows["gradient_r4"]["mean"]) == pytest.approx(90.5)
    assert rows["gradient_r4 [per_layer]"]["scale"] == "per_layer"
    assert float(rows["gradient_r4 [per_layer]"]["vs_uniform"]) == pytest.approx(-10.0)
    assert rows["frobenius_greedy_r4 [per_layer]"]["scale"] == "per_layer"
    assert rows["lora_r4"]["scale"] == "matched"


def fake_sweep(root, template, task, curves):
    """curves: {allocator: {budget label: (adapter parameters, [accuracy per seed])}}; one run folder per seed."""
    for allocator, points in curves.items():
        for budget, (params, values) in points.items():
            for seed, value in enumerate(values):
                m = copy.deepcopy(template)
                m.update(model="minilm", task=task, allocator=allocator, budget=budget, seed=seed, accuracy=value,
                         adapter_params=params, optimizer="adamw", method="lora", lora_scaling="matched",
                         reported_metrics=["accuracy"], main_metric="accuracy")
                run_dir = root / f"{task}_{allocator}_{budget}_s{seed}"
                run_dir.mkdir()
                json.dump(m, open(run_dir / "metrics.json", "w"))


def test_the_header_says_whether_uniforms_metric_moves_with_the_budget(tmp_path, template, capsys):
    binds = {"r1": [0.700, 0.712, 0.695], "r8": [0.801, 0.812, 0.790]}
    flat = {"r1": [0.800, 0.790, 0.812], "r8": [0.805, 0.795, 0.801]}
    params = {"r1": 41_472, "r8": 331_776}
    fake_sweep(tmp_path, template, "rt_snippets", {"uniform": {b: (params[b], v) for b, v in binds.items()}})
    fake_sweep(tmp_path, template, "wiki_pairs", {"uniform": {b: (params[b], v) for b, v in flat.items()}})
    fake_sweep(tmp_path, template, "qnli", {"uniform": {"r4": (165_888, [0.8, 0.81])},
                                            "gradient": {"r4": (165_888, [0.8, 0.8]), "r8": (331_776, [0.8, 0.82])}})
    fake_sweep(tmp_path, template, "mrpc", {"uniform": {"r4": (165_888, [0.8, 0.81])}})   # one budget: no line
    report_main([str(tmp_path), "--out", str(tmp_path), "--no-plots"])
    header = capsys.readouterr().out.split("| model")[0]
    lines = {line.split("(")[1].split(")")[0]: line for line in header.splitlines()
             if line.startswith(("**Budget", "**Capacity"))}
    assert set(lines) == {"minilm rt_snippets accuracy", "minilm wiki_pairs accuracy", "minilm qnli accuracy"}
    assert lines["minilm rt_snippets accuracy"].startswith("**Budget binds**")
    assert f"p={welch_reference(binds['r8'], binds['r1']):.2g}" in lines["minilm rt_snippets accuracy"]
    assert "70.23 at 41,472" in lines["minilm rt_snippets accuracy"]
    assert lines["minilm wiki_pairs accuracy"].startswith("**Capacity is not binding**")
    assert "cannot be read" in lines["minilm wiki_pairs accuracy"]
    assert lines["minilm qnli accuracy"].startswith("**Budget sensitivity unknown**")


@pytest.mark.slow
def test_savings_table_and_plot_from_a_sweep_with_a_known_answer(tmp_path, template, capsys):
    """data_weighted reaches at x what uniform reaches at 2x (accuracy linear in log parameters, seeds symmetric
    about it): it needs half of uniform's parameters wherever the sweep can tell."""
    budgets = {"r1": 40_000, "r2": 80_000, "r4": 160_000, "r8": 320_000}
    curve = lambda x: 0.70 + 0.02 * math.log(x / 40_000)
    seeds = lambda y: [y - 0.003, y, y + 0.003]
    fake_sweep(tmp_path, template, "rt_snippets", {
        "uniform": {b: (x, seeds(curve(x))) for b, x in budgets.items()},
        "data_weighted": {b: (x, seeds(curve(2 * x))) for b, x in budgets.items()},
        "frobenius_greedy": {b: (x, seeds(curve(x / 4))) for b, x in budgets.items()}})
    report_main([str(tmp_path), "--out", str(tmp_path), "--savings"])
    out = capsys.readouterr().out
    assert "Savings, minilm rt_snippets accuracy:" in out and open(tmp_path / "savings.md").read() in out
    table = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "160,000 (0.50x)" in table["data_weighted"] and "80,000 (0.50x)" in table["data_weighted"]
    assert "≤ 40,000" in table["data_weighted"]                      # uniform's r1 is reached below the sweep
    assert "160,000 (4.00x)" in table["frobenius_greedy"] and "not reached by 320,000" in table["frobenius_greedy"]
    assert os.path.exists(tmp_path / "savings_accuracy_minilm_rt_snippets.png")
    report_main([str(tmp_path), "--out", str(tmp_path), "--savings", "--format", "csv", "--no-plots"])
    rows = [r for r in csv.DictReader(open(tmp_path / "savings.csv")) if r["allocator"] == "data_weighted"]
    assert [float(r["ratio"]) for r in rows[2:]] == pytest.approx([0.5, 0.5])
    assert all(float(r["ratio_low"]) < 0.5 < float(r["ratio_high"]) for r in rows[2:])
    assert list(csv.DictReader(io.StringIO(capsys.readouterr().out)))[0]["row"]  # stdout: still the one report CSV
    report_main([str(tmp_path), "--out", str(tmp_path), "--savings", "--format", "latex", "--no-plots"])
    latex = open(tmp_path / "savings.tex").read()
    assert r"data\_weighted & $\le$ 40,000" in latex and "\\end{tabular}" in latex


def test_the_header_warns_when_a_tables_runs_come_from_different_bases_or_library_versions(tmp_path, template,
                                                                                           capsys):
    assert template["versions"]["torch"]  # a real run records its versions: the alike table below has no warning
    alike, mixed = tmp_path / "alike", tmp_path / "mixed"
    alike.mkdir(), mixed.mkdir()
    fake_runs(alike, template, "small_gpt2_wiki", {("uniform", "r4"): [0.8, 0.81], ("gradient", "r4"): [0.8, 0.8]})
    fake_runs(mixed, template, "small_gpt2_wiki", {("uniform", "r4"): [0.8, 0.81, 0.79], ("gradient", "r4"): [0.8]})
    for run_dir in sorted(mixed.iterdir()):  # uniform s0 on another base, gradient and uniform s2 on another
        m = json.load(open(run_dir / "metrics.json"))  # base and torch, uniform s1 from before the record
        if run_dir.name.endswith("uniform_r4_s0"):
            m["base_sha256"] = "b" * 64
        elif run_dir.name.endswith("uniform_r4_s1"):
            del m["versions"]
        else:
            m["base_sha256"], m["versions"] = "a" * 64, {**m["versions"], "torch": "2.99.0"}
        json.dump(m, open(run_dir / "metrics.json", "w"))
    for folder in (alike, mixed):
        report_main([str(folder), "--out", str(folder), "--no-plots"])
    alike_out, mixed_out = capsys.readouterr().out.split("runs; report and")[:2]
    assert "Mixed" not in alike_out and "predate" not in alike_out
    header = mixed_out.split("| model")[0]
    assert "**Mixed bases** (small_gpt2_wiki)" in header
    assert f"{'a' * 12} (2 runs), {'b' * 12} (1 runs)" in header
    assert template["versions"]["torch"] < "2.99.0"  # versions listed in order
    assert f"**Mixed library versions**: torch {template['versions']['torch']} (1 runs), 2.99.0 (2 runs)" in header
    assert "1 of 4 runs predate the record of library versions" in header
