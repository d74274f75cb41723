"""A researcher's own data file (`task=local_file`): CSV, TSV, JSON or JSONL, read and checked here.

Read by hand with the standard library rather than `datasets.load_dataset`: its pyarrow errors name neither the
file's line nor the fix, and a user's first file is where a clear line matters most. Labels may be numbers
(0..num_labels-1) or names ("pos"/"neg", "entailment"/...): names map to ids in sorted order, or in the order
of `task.label_names`, and the validation file must use the same names."""

import csv
import json
import re

from lorambo.errors import LoramboError

INTEGER = re.compile(r"^\s*-?\d+\s*$")


def read_rows(path: str) -> list[dict]:
    """Every record of the file as a dict; one line naming the file (and line) for anything unreadable."""
    if not path.endswith((".csv", ".tsv", ".json", ".jsonl")):
        raise LoramboError(f"task.path '{path}' must end in .csv, .tsv, .json or .jsonl")
    from lorambo.data import _check_file

    with open(_check_file(path), "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LoramboError(f"'{path}' is not UTF-8 text (line {line}, byte {e.start} is 0x{data[e.start]:02x}); "
                           f"save it as UTF-8") from None
    if not text.strip():
        raise LoramboError(f"'{path}' is empty; give task.path a file with a header and rows")
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise LoramboError(f"'{path}' line {line} holds a NUL byte: not a text file, or damaged; remove it")
    if path.endswith((".csv", ".tsv")):
        csv.field_size_limit(2**31 - 1)  # a long text is the tokenizer's to cut at task.max_length, not csv's
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.endswith(".tsv") else ",")
        try:
            rows = list(reader)
        except csv.Error as e:
            raise LoramboError(f"'{path}' line {reader.line_num} cannot be read as CSV ({e}); fix it") from None
        if not rows:
            raise LoramboError(f"'{path}' has a header ({', '.join(reader.fieldnames or [])}) but no rows")
        return rows
    if path.endswith(".jsonl") or (path.endswith(".json") and _json_lines(text)):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(_record(line, f"'{path}' line {number}"))
        return rows
    records = _record(text, f"'{path}'", expect=list)
    for i, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise LoramboError(f"'{path}' record {i} is not an object with named fields; write a list of objects "
                               f"(or one object per line, .jsonl)")
    if not records:
        raise LoramboError(f"'{path}' holds an empty list; give task.path a file with records")
    return records


def _json_lines(text: str) -> bool:
    """A .json file written one object per line (as many tools write it)."""
    try:
        json.loads(text)
        return False
    except json.JSONDecodeError as e:
        return e.msg == "Extra data"


def _record(text: str, where: str, expect=dict):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoramboError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); fix or remove it") from None
    if not isinstance(value, expect):
        shape = "an object per line" if expect is dict else "a list of objects"
        raise LoramboError(f"{where} is not {shape}")
    return value


def check_texts(rows: list[dict], fields, path: str) -> None:
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise LoramboError(f"columns {missing} not in {path} (has {list(rows[0])}); set task.text_fields / "
                           f"task.label_field")
    for i, row in enumerate(rows, 1):
        for field in fields:
            if row.get(field) is None or not str(row[field]).strip():
                raise LoramboError(f"'{path}' record {i} has an empty '{field}'; fill it or remove the record")
            if isinstance(row[field], (list, dict, bool)):  # str() would train on "['a', 'b']" or "True"
                fix = "write a label as 0/1 or a name" if isinstance(row[field], bool) else "write it as text"
                raise LoramboError(f"'{path}' record {i} has {type(row[field]).__name__} {json.dumps(row[field])[:40]} "
                                   f"in '{field}', where text or a label belongs; {fix}")


def label_ids(splits: dict[str, list], task_cfg, paths: dict[str, str]) -> tuple[dict[str, list], list | None]:
    """Labels as class ids for every split, and the label names when the file names its classes."""
    if task_cfg.type == "regression":
        return {s: [_number(v, paths[s], i) for i, v in enumerate(labels, 1)] for s, labels in splits.items()}, None
    kinds = {s: {isinstance(v, int) or (isinstance(v, str) and bool(INTEGER.match(v))) for v in labels}
             for s, labels in splits.items()}
    if any(len(k) > 1 for k in kinds.values()) or len(set().union(*kinds.values())) > 1:
        raise LoramboError(f"labels in {' and '.join(paths.values())} mix numbers and names; use one or the other")
    n = task_cfg.num_labels
    if True in kinds["train"]:  # class ids
        ids = {s: [int(v) for v in labels] for s, labels in splits.items()}
        for split, labels in ids.items():
            bad = [(i, v) for i, v in enumerate(labels, 1) if not 0 <= v < n]
            if bad:
                raise LoramboError(f"'{paths[split]}' record {bad[0][0]} has label {bad[0][1]}, outside 0..{n - 1} "
                                   f"({len(bad)} such); set task.num_labels or fix the labels")
        unseen = sorted(set(ids.get("validation", [])) - set(ids["train"]))
        if unseen:  # a class no training record has cannot be learnt: its validation records only lower the score
            raise LoramboError(f"'{paths['validation']}' has label {unseen[0]}, which no record of "
                               f"'{paths['train']}' has; add training records of it, or fix the label")
        return ids, None
    names = list(task_cfg.get("label_names") or sorted({str(v) for v in splits["train"]}))
    if len(names) != n:
        raise LoramboError(f"the labels are {len(names)} names ({', '.join(names)}) but task.num_labels={n}; "
                           f"set task.num_labels={len(names)}")
    index = {name: i for i, name in enumerate(names)}
    for split, labels in splits.items():
        unknown = sorted({str(v) for v in labels} - set(index))
        if unknown:
            raise LoramboError(f"'{paths[split]}' has label '{unknown[0]}', not among the training labels "
                               f"({', '.join(names)}); fix it or list every name in task.label_names")
    return {s: [index[str(v)] for v in labels] for s, labels in splits.items()}, names


def _number(value, path: str, i: int) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LoramboError(f"'{path}' record {i} has label {value!r}, not a number (task.type=regression)") from None


def local_splits(task_cfg):
    """{train, validation} datasets of the text fields and integer (or float) labels, and the label names."""
    import datasets

    paths = {"train": task_cfg.path}
    if task_cfg.get("validation_path"):
        paths["validation"] = task_cfg.validation_path
    fields = [*task_cfg.text_fields, task_cfg.label_field]
    rows = {split: read_rows(path) for split, path in paths.items()}
    for split, records in rows.items():
        check_texts(records, fields, paths[split])
    labels, names = label_ids({s: [r[task_cfg.label_field] for r in records] for s, records in rows.items()},
                              task_cfg, paths)
    if "validation" not in rows:
        held_out = int(len(rows["train"]) * task_cfg.validation_fraction)
        if held_out < 1 or len(rows["train"]) - held_out < 1:
            raise LoramboError(f"'{task_cfg.path}' has {len(rows['train'])} records: too few to hold out "
                               f"task.validation_fraction={task_cfg.validation_fraction} for validation; add "
                               f"records or give task.validation_path")
    out = {split: datasets.Dataset.from_dict({**{f: [str(r[f]) for r in records] for f in task_cfg.text_fields},
                                              task_cfg.label_field: labels[split]})
           for split, records in rows.items()}
    return datasets.DatasetDict(out), names
