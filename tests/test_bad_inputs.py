"""Every bad input a user can give `lorambo-run` (or `lorambo-report`) ends in one line naming the fix, a
non-zero exit, no traceback, and no result that lies (issue 14). Each case runs `lorambo.cli.main` in this
process with the argv a user types (what the `lorambo-run` script calls; a subprocess per case would cost the
suite minutes); a few run the real script as a subprocess too."""

import fcntl
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import run_cli, run_main

SMOKE = ["experiment=smoke", "train.max_steps=2", "task.max_eval_samples=16"]


lorambo_run = run_main


def assert_one_error_line(code, err, message):
    assert code != 0 and "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("lorambo-run: error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]


VALUES = {
    "budget.p_max=lots": (["budget=6M", "budget.p_max=lots"], "budget.p_max='lots': input should be a valid integer"),
    "lora.dropout=1.5": (["lora.dropout=1.5"], "lora.dropout=1.5: input should be less than 1"),
    "train.lr=-1": (["train.lr=-1"], "train.lr=-1: input should be greater than 0"),
    "train.lr=abc": (["train.lr=abc"], "train.lr='abc': input should be a valid number"),
    "train.batch_size=0": (["train.batch_size=0"], "train.batch_size=0: input should be greater than or equal to 1"),
    "train.grad_accum=0": (["train.grad_accum=0"], "train.grad_accum=0: input should be greater than or equal to 1"),
    "train.max_steps=-5": (["train.max_steps=-5"], "train.max_steps=-5: input should be greater than or equal to 1"),
    "train.max_steps=0": (["train.max_steps=0"], "train.max_steps=0: input should be greater than or equal to 1"),
    "train.threads=0": (["train.threads=0"], "train.threads=0: input should be greater than or equal to 1"),
    "train.dropout_masks=fast": (["train.dropout_masks=fast"],
                                 "train.dropout_masks='fast': input should be 'packed' or 'torch'"),
    "train.compile_backend=nope": (["train.compile=true", "train.compile_backend=nope"],
                                   "train.compile_backend=nope is not a torch.compile backend; choose one of:"),
    "seed=-1": (["seed=-1"], "seed=-1: input should be greater than or equal to 0"),
    "seed=abc": (["seed=abc"], "seed='abc': input should be a valid integer"),
    "method.grow_every=0": (["allocator=hessian_online", "method.grow_every=0"],
                            "method.grow_every=0: input should be greater than or equal to 1"),
    "task.num_labels=0": (["task.num_labels=0"], "task.num_labels=0: input should be greater than or equal to 1"),
    "task.num_labels=1": (["task.num_labels=1"], "a classification task needs task.num_labels >= 2"),
    "lora.alpha=0": (["lora.alpha=0"], "lora.alpha=0: input should be greater than 0"),
    "lora.alpha=-4": (["lora.alpha=-4"], "lora.alpha=-4: input should be greater than 0"),
    "task.max_train_samples=0": (["task.max_train_samples=0"],
                                 "task.max_train_samples=0: input should be greater than or equal to 1"),
    "task.max_length=2": (["task.max_length=2"], "task.max_length=2 leaves no room for text"),
    "+train.lrr": (["+train.lrr=1e-3"], "unknown key train.lrr; did you mean train.lr?"),
    # values that passed the schema and ended in a traceback further on
    "seed=2**64": (["seed=99999999999999999999"], "seed=99999999999999999999: input should be less than 4294967296"),
    "task.main_metric=foo": (["task.main_metric=foo"],
                             "task.main_metric=foo is not one of the task's metrics (accuracy); choose one of them"),
    "task.metrics=[foo]": (["task.metrics=[foo]"],
                           "task.metrics: unknown metric 'foo' for a classification task; choose from: accuracy"),
    "task.text_fields=[]": (["task.text_fields=[]"], "task.text_fields=[] names no text; give the field(s)"),
    "task.max_length=1e9": (["task.max_length=1e9"], "task.max_length=1000000000.0: input should be a valid integer"),
    "task.max_length past the positions": (["task.max_length=100000"],
                                           "task.max_length=100000 is longer than the model's 514 positions"),
    "model.pretrained no folder": (["model.pretrained=/nonexistent/model"],
                                   "model.pretrained='/nonexistent/model' is no folder here"),
    "+allocator.grow_evry": (["allocator=hessian_online", "+allocator.grow_evry=3"],
                             "allocator hessian_online has no option 'grow_evry' (did you mean 'method.grow_every'?)"),
}


@pytest.mark.parametrize("case", sorted(VALUES))
@pytest.mark.slow
def test_a_bad_value_or_key_is_one_line_and_no_result(case, tmp_path, monkeypatch, capfd):
    args, message = VALUES[case]
    keys = {a.lstrip("+").split("=")[0] for a in args}
    base = [a for a in SMOKE if a.split("=")[0] not in keys]
    code, _, err = lorambo_run([*base, *args, "hydra.run.dir=run"], tmp_path, monkeypatch, capfd)
    assert_one_error_line(code, err, message)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert (tmp_path / "run" / "error.txt").read_text().strip() in err


# errors inside Hydra's composition and resolution, and options the method, allocator or optimizer do not take:
# refused before anything is built (fast), whatever raised them
COMPOSITION = {
    "unknown key without +": (["train.lrr=1"], "unknown key train.lrr; did you mean train.lr? (to add a new key: "),
    "p_max on a rank budget": (["budget.p_max=[1,2]"], "unknown key budget.p_max; budget has: kind, rank, scale"),
    "override that does not parse": (['model.target_modules=(["'], "could not read the override 'model.target_modu"),
    "target_modules not a regex": (["model.target_modules='(q'"], "model.target_modules='(q': not a regular express"),
    "+task misspelt": (["+task.label_nmes=[a,b]"], "unknown key task.label_nmes; did you mean task.label_names?"),
    "+task unknown": (["+task.foo=1"], "unknown key task.foo; the task keys are: "),
    "+model misspelt": (["+model.targt_modules=x"], "unknown key model.targt_modules"),
    "an interpolation to nothing": (["train.lr=${oops}"], "train.lr: Interpolation key 'oops' not found"),
    "a list where a list cannot merge": (["task.metrics={a:1}"], "Error merging override task.metrics={a:1}"),
    "hydra's own key, wrong type": (["hydra.job.chdir=[1]"], "hydra.job.chdir=[1]: Value '[1]' is not a valid bool"),
    "optimizer option misspelt": (["+optimizer.betass=[0.9,0.9]"], "optimizer adamw has no option 'betass' (did you "
                                                                    "mean 'betas'?)"),
    "optimizer option wrong type": (["optimizer=galore", "method=full_ft", "optimizer.rank=[1,2]"],
                                    "optimizer.rank=[1, 2]: input should be"),
    "allocator option wrong type": (["allocator=gora", "allocator.min_rank=abc"],
                                    "allocator.min_rank='abc': input should be a valid integer"),
    "a file as the run folder": (["hydra.run.dir=cli.log"], "hydra.run.dir='cli.log' is a file; give the run a folder"),
    "method option wrong type": (["method=adalora", "method.delta_t=[1]"], "method.delta_t=[1]: input should be"),
}


@pytest.mark.parametrize("case", sorted(COMPOSITION))
def test_a_composition_error_is_one_line(case, tmp_path, monkeypatch, capfd):
    args, message = COMPOSITION[case]
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "cli.log").write_text("a file\n")
    run_dir = [] if any(a.startswith("hydra.run.dir=") for a in args) else ["hydra.run.dir=run"]
    code, out, err = lorambo_run([*SMOKE, *args, *run_dir], tmp_path, monkeypatch, capfd)
    assert_one_error_line(code, err, message)
    assert "HYDRA_FULL_ERROR" not in err + out and os.environ.get("HYDRA_FULL_ERROR") is None
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_hydra_full_error_still_gives_the_traceback(tmp_path, monkeypatch, capfd):
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the user asked for the whole story
    with pytest.raises(ConfigCompositionException):
        lorambo_run([*SMOKE, "train.lrr=1"], tmp_path, monkeypatch, capfd)


def test_every_config_key_with_a_wrong_type_is_one_line():
    """Every leaf key of the composed default config, and of each method's, allocator's and optimizer's options,
    given a value of the wrong type (a mapping where a list belongs, a list anywhere else) is refused in one line
    before anything is built, so that a key added later cannot bring back Hydra's or Python's own error. Each
    choice is composed once and each override applied as Hydra applies it (the composition path through
    lorambo.cli.main is test_a_composition_error_is_one_line's: a full composition per key would cost a minute)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lorambo.cli import error_line, group_options
    from lorambo.config import CONF_DIR
    from lorambo.errors import LoramboError
    from lorambo.schema import check_config

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    choices = [[], *([f"method={m}"] for m in group_options("method")),
               *([f"allocator={a}"] for a in group_options("allocator")),
               *(["method=full_ft", f"optimizer={o}"] for o in group_options("optimizer"))]
    parser, seen, wrong = OverridesParser.create(), set(), []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for choice in choices:
            composed = compose("config", overrides=choice)
            check_config(composed)  # the choice itself is valid
            for key, value in leaves(OmegaConf.to_container(composed)):
                if key in seen:
                    continue
                seen.add(key)
                override = f"{key}={'{a:1}' if isinstance(value, list) else '[1,2]'}"
                cfg = composed.copy()
                try:
                    ConfigLoaderImpl._apply_overrides_to_config(parser.parse_overrides([override]), cfg)
                    check_config(cfg)
                    wrong.append((choice, override, "accepted"))
                except Exception as e:  # noqa: BLE001  (which exceptions reach the user is what is tested)
                    from hydra.errors import HydraException
                    from omegaconf.errors import OmegaConfBaseException

                    line = error_line(e) if isinstance(e, (HydraException, OmegaConfBaseException,
                                                           LoramboError)) else None
                    if not line or "\n" in line:
                        wrong.append((choice, override, f"{type(e).__name__}: {e}"))
    assert len(seen) > 100 and "allocator.min_rank" in seen and "optimizer.update_proj_gap" in seen
    assert not wrong, wrong[:5]


@pytest.mark.slow
def test_a_bad_value_through_the_real_script(tmp_path):
    result = run_cli([*SMOKE, "train.lr=-1"], tmp_path, timeout=120)
    assert_one_error_line(result.returncode, result.stderr, "train.lr=-1: input should be greater than 0")


# --- a researcher's own file

def write(path, content: bytes | str):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


ROWS = "".join(f"movie {i} was {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(40))
LOCAL_FILES = {
    "empty file": ("train.csv", "", "is empty"),
    "header only": ("train.csv", "text,label\n", "has a header (text, label) but no rows"),
    "not UTF-8": ("train.csv", b"text,label\ncaf\xe9 noir,1\n" + ROWS.encode(), "is not UTF-8 text (line 2, byte 14 is 0xe9)"),
    "broken JSONL line": ("train.jsonl", '{"text": "a fine film", "label": 1}\n{"text": "cut', "line 2 is not valid JSON"),
    "empty text": ("train.csv", "text,label\nfine,1\n ,0\n" + ROWS, "record 2 has an empty 'text'"),
    "one row": ("train.csv", "text,label\nfine,1\n", "has 1 records: too few to hold out"),
    "label out of range": ("train.csv", "text,label\n" + ROWS + "a terrible film,5\n",
                           "record 41 has label 5, outside 0..1"),
    "mixed label types": ("train.csv", "text,label\n" + ROWS + "a terrible film,neg\n", "mix numbers and names"),
    "a field past csv's limit": ("train.csv", "text,label\n" + ROWS + "a " * 100_000 + ",1\n",
                                 None),  # a long text is the tokenizer's to cut: it trains
    "NUL byte": ("train.csv", "text,label\n" + ROWS + "bad\0text,1\n", "line 42 holds a NUL byte"),
    "a list where text belongs": ("train.jsonl", "".join(json.dumps({"text": ["a", "b"] if i == 3 else f"film {i}",
                                                                     "label": i % 2}) + "\n" for i in range(40)),
                                  "record 4 has list [\"a\", \"b\"] in 'text', where text or a label belongs"),
    "an object where text belongs": ("train.jsonl", "".join(json.dumps({"text": {"a": 1} if i == 3 else f"film {i}",
                                                                        "label": i % 2}) + "\n" for i in range(40)),
                                     "record 4 has dict {\"a\": 1} in 'text'"),
    "boolean labels": ("train.jsonl", "".join(json.dumps({"text": f"film {i}", "label": bool(i % 2)}) + "\n"
                                              for i in range(40)), "record 1 has bool false in 'label'"),
    "more names than classes": ("train.csv", "text,label\n" + ROWS.replace(",0\n", ",neg\n").replace(",1\n", ",pos\n")
                                + "so so,meh\n", "the labels are 3 names (meh, neg, pos) but task.num_labels=2"),
}


@pytest.mark.parametrize("case", sorted(LOCAL_FILES))
def test_a_bad_local_file_is_one_line(case, tmp_path, monkeypatch, capfd):
    name, content, message = LOCAL_FILES[case]
    path = write(tmp_path / name, content)
    code, _, err = lorambo_run([*SMOKE, "task=local_file", f"task.path={path}", "hydra.run.dir=run"], tmp_path,
                               monkeypatch, capfd)
    if message is None:  # a file at an edge that is fine
        assert code == 0 and (tmp_path / "run" / "metrics.json").exists(), err[-2000:]
        return
    assert_one_error_line(code, err, message)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_folder_given_as_the_file_is_one_line(tmp_path, monkeypatch, capfd):
    (tmp_path / "data.csv").mkdir()
    code, _, err = lorambo_run([*SMOKE, "task=local_file", f"task.path={tmp_path / 'data.csv'}", "hydra.run.dir=run"],
                               tmp_path, monkeypatch, capfd)
    assert_one_error_line(code, err, "is a folder; give task.path the data file in it")


def test_a_validation_class_the_training_file_never_had_is_named(tmp_path, monkeypatch, capfd):
    train = write(tmp_path / "train.csv", "text,label\n" + ROWS)  # classes 0 and 1 of 3
    valid = write(tmp_path / "valid.csv", "text,label\nfine,1\nodd,2\nmeh,0\n")
    code, _, err = lorambo_run([*SMOKE, "task=local_file", f"task.path={train}", f"task.validation_path={valid}",
                                "task.num_labels=3", "hydra.run.dir=run"], tmp_path, monkeypatch, capfd)
    assert_one_error_line(code, err, f"'{valid}' has label 2, which no record of '{train}' has")


@pytest.mark.slow
def test_a_regression_file_in_the_configs_own_form_trains(tmp_path, monkeypatch, capfd):
    """The task config's comment says how: task.type=regression task.num_labels=1 task.metrics=[pearson]; the
    main metric follows the metrics (it stayed `accuracy` and was refused)."""
    path = write(tmp_path / "scores.csv", "text,label\n" + "".join(f"movie {i},{i / 40:.3f}\n" for i in range(40)))
    code, _, err = lorambo_run([*SMOKE, "task=local_file", f"task.path={path}", "task.type=regression",
                                "task.num_labels=1", "task.metrics=[pearson]", "hydra.run.dir=run"], tmp_path,
                               monkeypatch, capfd)
    assert code == 0, err[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["main_metric"] == "pearson" and -1 <= metrics["pearson"] <= 1


def test_labels_outside_the_range_in_the_validation_file_are_named(tmp_path, monkeypatch, capfd):
    train = write(tmp_path / "train.csv", "text,label\n" + ROWS)
    valid = write(tmp_path / "valid.csv", "text,label\nfine,1\nodd,2\n")
    code, _, err = lorambo_run([*SMOKE, "task=local_file", f"task.path={train}", f"task.validation_path={valid}",
                                "hydra.run.dir=run"], tmp_path, monkeypatch, capfd)
    assert_one_error_line(code, err, f"'{valid}' record 2 has label 2, outside 0..1")


def test_a_validation_label_name_unknown_to_training_is_named(tmp_path, monkeypatch, capfd):
    train = write(tmp_path / "train.jsonl", "".join(json.dumps({"text": f"film {i}", "label": ["neg", "pos"][i % 2]})
                                                    + "\n" for i in range(40)))
    valid = write(tmp_path / "valid.jsonl", '{"text": "fine", "label": "pos"}\n{"text": "hm", "label": "meh"}\n')
    code, _, err = lorambo_run([*SMOKE, "task=local_file", f"task.path={train}", f"task.validation_path={valid}",
                                "hydra.run.dir=run"], tmp_path, monkeypatch, capfd)
    assert_one_error_line(code, err, "has label 'meh', not among the training labels (neg, pos)")


@pytest.mark.slow
def test_string_labels_train_and_reload_with_their_names(tmp_path):
    """An NLI-style file with named classes: mapped to ids in task.label_names' order, recorded in the run folder
    and in the adapter's config.json, and the saved adapter reproduces the run's accuracy."""
    from peft import PeftModel

    from tests.helpers import compose_cfg, run_in_process
    from tests.helpers import evaluate_independently, load_base

    names = ["entailment", "neutral", "contradiction"]
    rows = [{"premise": f"a man plays {i}", "hypothesis": f"someone plays {i % 7}", "label": names[i % 3]}
            for i in range(120)]
    path = write(tmp_path / "nli.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    overrides = [*SMOKE, "train.max_steps=4", "task=local_file", f"task.path={path}", "task.num_labels=3",
                 "task.text_fields=[premise,hypothesis]", f"+task.label_names=[{','.join(names)}]"]
    metrics = run_in_process(overrides, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == {str(i): n for i, n in enumerate(names)}
    config = json.loads((tmp_path / "run" / "adapter" / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    cfg = compose_cfg(overrides)
    reloaded = PeftModel.from_pretrained(load_base(cfg, tmp_path / "run"), str(tmp_path / "run" / "adapter"))
    assert reloaded.config.id2label == {i: n for i, n in enumerate(names)}
    assert evaluate_independently(cfg, reloaded)["accuracy"] == pytest.approx(metrics["accuracy"], rel=1e-6)


# --- damaged files and run folders

@pytest.fixture
def checkpointed(tmp_path):
    from tests.helpers import run_in_process

    run_dir = tmp_path / "run"
    run_in_process([*SMOKE, "train.max_steps=4", "train.checkpoint_every=3", "train.keep_checkpoint=true"], run_dir)
    (run_dir / "metrics.json").unlink()  # as if killed after its checkpoint
    return run_dir


@pytest.mark.parametrize("target,message", [("checkpoint.pt", "is damaged and cannot be read"),
                                            ("checkpoint_config.json", "is missing or damaged")])
@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line(target, message, checkpointed, monkeypatch, capfd):
    data = (checkpointed / target).read_bytes()
    (checkpointed / target).write_bytes(data[: len(data) // 2])
    code, _, err = lorambo_run([f"resume={checkpointed}"], checkpointed.parent, monkeypatch, capfd)
    assert_one_error_line(code, err, message)
    assert not (checkpointed / "metrics.json").exists()


@pytest.mark.slow
def test_resume_with_other_overrides_is_refused(checkpointed, monkeypatch, capfd):
    code, _, err = lorambo_run([f"resume={checkpointed}", "train.lr=1"], checkpointed.parent, monkeypatch, capfd)
    assert_one_error_line(code, err, "resume= continues a run with its own config, so train.lr=1 would be ignored")


def test_a_second_writer_into_a_busy_run_folder_is_refused(tmp_path, monkeypatch, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run writing there
        code, _, err = lorambo_run([*SMOKE, "hydra.run.dir=run"], tmp_path, monkeypatch, capfd)
    assert_one_error_line(code, err, "another lorambo-run is writing into")
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".hydra") in (
        [".lock"], [".lock", "cli.log"])  # nothing of the other run touched, no error.txt written into it


@pytest.mark.slow
def test_a_rerun_into_a_folder_clears_the_previous_outcome(tmp_path, monkeypatch, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"accuracy": 0.99}')  # an old success
    code, _, err = lorambo_run([*SMOKE, "train.lr=-1", "hydra.run.dir=run"], tmp_path, monkeypatch, capfd)
    assert code != 0 and not (run_dir / "metrics.json").exists() and (run_dir / "error.txt").exists()
    code, _, err = lorambo_run([*SMOKE, "hydra.run.dir=run"], tmp_path, monkeypatch, capfd)
    assert code == 0, err[-2000:]
    assert (run_dir / "metrics.json").exists() and not (run_dir / "error.txt").exists()
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics_log.jsonl").read_text().splitlines()]
    assert logged == sorted(logged)  # one run's log, not two interleaved


@pytest.mark.slow
def test_the_report_lists_a_damaged_metrics_file_and_reports_the_rest(tmp_path, capsys):
    from lorambo.report import main as report_main
    from tests.helpers import run_in_process

    for seed in (0, 1):
        run_in_process([*SMOKE, f"seed={seed}"], tmp_path / f"s{seed}")
    damaged = tmp_path / "s1" / "metrics.json"
    damaged.write_text(damaged.read_text()[:40])
    report_main([str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert f"damaged: {damaged}" in out and "1 runs" in out


def test_a_fresh_clone_has_the_runs_folder():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.isfile(os.path.join(root, "runs", "README.md"))


@pytest.mark.slow
def test_checkpoints_hold_only_tensors_and_plain_data(checkpointed):
    """The planted-pickle case is tests/test_resume.py's; here: what lorambo writes loads with weights_only."""
    state = torch.load(checkpointed / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and "method" in state and "progress" in state


@pytest.fixture
def allocated(tmp_path, monkeypatch, capfd):
    """A lorambo-allocate folder for the smoke model (allocation.json, adapter_config.json)."""
    code, _, err = run_main(["experiment=smoke", "allocator=hessian_offline", "hydra.run.dir=alloc"], tmp_path,
                            monkeypatch, capfd, program="lorambo-allocate")
    assert code == 0, err[-2000:]
    return tmp_path / "alloc"


def reshaped(allocation: dict, case: str) -> dict:
    name = sorted(allocation["ranks"])[0]
    if case == "a shallower model's":  # the other model had fewer layers: some of these have no rank
        return {**allocation, "ranks": {k: v for k, v in allocation["ranks"].items() if k != name}}
    if case == "a wider model's":  # the same names, other widths (a larger model of the same family)
        return {**allocation, "shapes": {**allocation["shapes"], name: [d * 2 for d in allocation["shapes"][name]]}}
    return {**allocation, "ranks": {"model.layers.0.self_attn.q_proj": 4}}  # another architecture


@pytest.mark.parametrize("case,message", [("a shallower model's", "do not cover 1 of this model's"),
                                          ("a wider model's", "were made for layers of other shapes"),
                                          ("another architecture's", "name layers this model does not have")])
def test_an_allocation_of_another_model_is_refused(case, message, allocated, monkeypatch, capfd):
    allocation = json.loads((allocated / "allocation.json").read_text())
    (allocated / "allocation.json").write_text(json.dumps(reshaped(allocation, case)))
    code, _, err = lorambo_run([*SMOKE, f"allocator.from_run={allocated}", "hydra.run.dir=run"], allocated.parent,
                               monkeypatch, capfd)
    assert_one_error_line(code, err, message)
    assert not (allocated.parent / "run" / "metrics.json").exists()


def test_the_allocation_of_the_same_model_is_reused(allocated, monkeypatch, capfd):
    code, _, err = lorambo_run([*SMOKE, f"allocator.from_run={allocated}", "hydra.run.dir=run"], allocated.parent,
                               monkeypatch, capfd)
    assert code == 0, err[-2000:]
    ranks = json.loads((allocated / "allocation.json").read_text())["ranks"]
    assert json.loads((allocated.parent / "run" / "metrics.json").read_text())["ranks"] == ranks

