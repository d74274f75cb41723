"""Tasks: hub datasets (GLUE, WikiText-103, ImageNet), offline assets, and user-supplied local files.

Every text task becomes a `datasets.DatasetDict` with the task's text fields and label, then goes through
one tokenization path; every image task becomes a dataset of {pixel_values, labels}.
"""

import csv
import gzip
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from lorambo.errors import LoramboError


@dataclass
class TaskData:
    train: torch.utils.data.Dataset
    evals: dict  # eval split name -> dataset
    collate_fn: object
    label_names: list | None = None  # a local file's class names, in id order
    lengths: list | None = None  # each training example's length: batches of similar lengths (less padding)
    evaluate: object = None  # the task's own evaluation (instruct: generation), with observe_base(model)


def load_task(task_cfg, model_cfg, tokenizer, seed: int = 0) -> TaskData:
    """The task's splits; with `task.dev_fraction`, a dev split carved from the training split (a fixed
    permutation, seed 0, the same for every run and row) is the only evaluation split and the rest trains, so
    that a learning-rate search never sees the validation split."""
    if task_cfg.type == "instruct":  # its own splits and evaluation (lorambo/instruct.py)
        from lorambo.instruct import load_instruct_task

        return load_instruct_task(task_cfg, model_cfg, tokenizer)
    data = _load_splits(task_cfg, model_cfg, tokenizer, seed)
    fraction = task_cfg.get("dev_fraction")
    if not fraction:
        return data
    order = np.random.default_rng(0).permutation(len(data.train))
    n_dev = max(1, round(fraction * len(order)))
    if n_dev >= len(order):
        raise LoramboError(f"task.dev_fraction={fraction} leaves nothing to train on; lower it")
    part = lambda idx: (data.train.select(sorted(idx)) if hasattr(data.train, "select")
                        else torch.utils.data.Subset(data.train, sorted(idx)))
    return TaskData(part(order[n_dev:].tolist()), {"dev": part(order[:n_dev].tolist())}, data.collate_fn,
                    data.label_names)


def _load_splits(task_cfg, model_cfg, tokenizer, seed: int = 0) -> TaskData:
    """`seed`: the run's, for what varies with it in the data itself (image augmentation)."""
    if task_cfg.type == "image_classification":
        return _image_task(task_cfg, model_cfg, seed)
    if task_cfg.source == "local_file":
        from lorambo.local_file import local_splits

        raw, names = local_splits(task_cfg)
        raw = _held_out(task_cfg, raw)
    else:
        raw, names = _text_splits(task_cfg), None
    if task_cfg.type == "lm":
        return _lm_task(task_cfg, raw, tokenizer)
    check_max_length(task_cfg, tokenizer)
    data = _classification_task(task_cfg, raw, tokenizer)
    data.label_names = names
    return data


def check_max_length(task_cfg, tokenizer) -> None:
    """A max_length that leaves no room for text after the special tokens was ignored by the tokenizer."""
    special = tokenizer.num_special_tokens_to_add(pair=len(task_cfg.text_fields) > 1)
    if task_cfg.max_length <= special + len(task_cfg.text_fields):
        raise LoramboError(f"task.max_length={task_cfg.max_length} leaves no room for text after the tokenizer's "
                           f"{special} special tokens; raise it (the task's default is in its yaml)")


def _check_file(path) -> str:
    if not path or not os.path.exists(str(path)):
        raise LoramboError(f"data file not found: '{path}'; check task.path (or run `make setup` for offline assets)")
    if os.path.isdir(str(path)):
        raise LoramboError(f"'{path}' is a folder; give task.path the data file in it")
    return str(path)


def _subsample(ds, n):
    return ds.select(range(min(n, len(ds)))) if n else ds


def _text_splits(task_cfg):
    """Train split + eval splits as a DatasetDict of raw text, whatever the source."""
    import datasets

    source = task_cfg.source
    if source == "hub":
        try:
            raw = datasets.load_dataset(task_cfg.dataset.path, task_cfg.dataset.get("name"))
        except Exception as e:  # the hub or a local folder: a user can fix either by the path
            raise LoramboError(f"cannot load dataset '{task_cfg.dataset.path}' ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); set task.dataset.path to a local copy")
    elif source == "rt_snippets":
        raw = datasets.DatasetDict({"train": _rt_snippets(_check_file(task_cfg.path))})
    elif source == "wiki_pairs":
        raw = _wiki_pairs(_check_file(task_cfg.path), task_cfg.validation_fraction)
    elif source == "wiki_summaries":
        with open(_check_file(task_cfg.path), encoding="utf-8") as f:
            articles = json.load(f)
        texts = [a["extract"] for _, a in sorted(articles.items()) if a.get("extract")]
        if task_cfg.get("part"):  # disjoint halves of the articles: one to pretrain a base on, one to adapt on
            order = np.random.default_rng(0).permutation(len(texts))
            half = order[: len(texts) // 2] if task_cfg.part == "pretrain" else order[len(texts) // 2:]
            texts = [texts[i] for i in sorted(half)]
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    else:
        raise LoramboError(f"unknown task.source '{source}'")
    return _held_out(task_cfg, raw)


def _held_out(task_cfg, raw):
    """A fixed split (seed 0), independent of the run's seed, so every run sees the same validation set."""
    import datasets

    if "validation" not in raw and task_cfg.get("validation_fraction"):
        split = raw["train"].train_test_split(test_size=task_cfg.validation_fraction, seed=0)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def _rt_snippets(path):
    """Rotten Tomatoes snippets (id, mean rating -4..+4, text): positive if the rating is above 0;
    the 37 snippets rated exactly 0 are dropped."""
    import datasets

    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            rating = float(row["sentiment"])
            if rating != 0:
                texts.append(row["text"].strip())
                labels.append(int(rating > 0))
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def _wiki_pairs(path, validation_fraction: float):
    """A QNLI-like pair task from the Wikipedia summaries: (title, sentence), label 1 when the sentence is from
    that article's summary, 0 when from another article's. Sentences after the first (which usually repeats
    the title); one positive and one negative per article; split by article, all with a fixed seed (0)."""
    import datasets

    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    sentences = {}
    for _, a in sorted(articles.items()):
        parts = [s for s in re.split(r"(?<=[.!?])\s+", (a.get("extract") or "").strip()) if len(s.split()) >= 4]
        if len(parts) >= 2:
            sentences[a["title"]] = parts[1:]
    titles = sorted(sentences)
    rng = np.random.default_rng(0)
    rng.shuffle(titles)
    n_val = int(len(titles) * validation_fraction)
    splits = {"validation": titles[:n_val], "train": titles[n_val:]}
    out = {}
    for split, names in splits.items():
        rows = {"title": [], "sentence": [], "label": []}
        for i, title in enumerate(names):
            other = names[(i + 1 + int(rng.integers(len(names) - 1))) % len(names)]  # any article but this one
            for label, source in ((1, title), (0, other)):
                rows["title"].append(title)
                rows["sentence"].append(sentences[source][int(rng.integers(len(sentences[source])))])
                rows["label"].append(label)
        out[split] = datasets.Dataset.from_dict(rows)
    return datasets.DatasetDict(out)


def map_fingerprint(ds, encode, task_cfg, tokenizer) -> str:
    """The fingerprint of `ds.map(encode)` (the name of its cache file for a hub dataset), from cheap parts: the
    input's fingerprint, the task's config, the tokenizer's serialised form and `encode`'s code. Left to itself,
    datasets pickles `encode` with dill, the tokenizer in its closure included: about 1 s a call, half of a tiny
    run."""
    import inspect

    from datasets.fingerprint import Hasher
    from omegaconf import OmegaConf

    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's whole vocabulary and rules
    tokenizer_id = backend.to_str() if backend is not None else (f"{type(tokenizer).__name__} {tokenizer.name_or_path} "
                                                                  f"{len(tokenizer)} {sorted(tokenizer.init_kwargs)}")
    return Hasher.hash([ds._fingerprint, OmegaConf.to_yaml(task_cfg, resolve=True), tokenizer_id,
                        inspect.getsource(encode)])


def _eval_split_names(task_cfg) -> dict:
    """Report name -> split name; e.g. MNLI's {matched: validation_matched, mismatched: validation_mismatched}."""
    return dict(task_cfg.get("eval_splits") or {"validation": "validation"})


def _classification_task(task_cfg, raw, tokenizer) -> TaskData:
    from transformers import DataCollatorWithPadding

    regression = task_cfg.type == "regression"

    def encode(batch):
        enc = tokenizer(*[batch[f] for f in task_cfg.text_fields], truncation=True, max_length=task_cfg.max_length)
        enc["labels"] = [float(x) for x in batch[task_cfg.label_field]] if regression else batch[task_cfg.label_field]
        return enc

    def prepare(split, limit):
        ds = _subsample(raw[split].shuffle(seed=0) if limit else raw[split], limit)
        ds = ds.map(encode, batched=True, remove_columns=ds.column_names,
                    new_fingerprint=map_fingerprint(ds, encode, task_cfg, tokenizer))
        return ds.with_format("torch")

    train = prepare(task_cfg.get("train_split", "train"), task_cfg.get("max_train_samples"))
    evals = {name: prepare(split, task_cfg.get("max_eval_samples")) for name, split in _eval_split_names(task_cfg).items()}
    return TaskData(train, evals, DataCollatorWithPadding(tokenizer))


MAP_BATCH = 1000  # documents per tokenisation batch of a causal LM task
PREFIX_DOCS = 32  # the first prefix of a limited split tokenised, in documents


def _lm_task(task_cfg, raw, tokenizer) -> TaskData:
    """Causal LM: tokenize, concatenate, cut into blocks of max_length; labels are the inputs (the model shifts).
    Each text row ends with the end token (`task.document_end: eos`, rows that are documents) or with nothing
    (null: rows that are lines of one text, WikiText's; empty lines then add no token), as run_clm.py does."""
    from transformers import default_data_collator

    block = task_cfg.max_length
    end = [tokenizer.eos_token_id or tokenizer.sep_token_id] if task_cfg.get("document_end", "eos") else []

    def encode(batch):
        ids = tokenizer(batch[task_cfg.text_fields[0]], add_special_tokens=False)["input_ids"]
        flat = np.fromiter((t for seq in ids for t in (seq + end)), dtype=np.int64)
        blocks = flat[:len(flat) // block * block].reshape(-1, block)  # an array: datasets writes it without
        return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks}  # inspecting lists

    def prepare(split, limit):
        # blocks never cross a map batch (each batch's remainder is dropped), so the first `limit` blocks need only
        # the first documents: a growing prefix of the first batch (its first blocks are the whole batch's), then
        # whole batches, four times as many each time, until enough
        from datasets import concatenate_datasets

        ds, parts, done, docs = raw[split], [], 0, MAP_BATCH
        prefix = PREFIX_DOCS
        while limit and prefix < min(MAP_BATCH, len(ds)):
            part = ds.select(range(prefix))
            part = part.map(encode, batched=True, batch_size=MAP_BATCH, remove_columns=ds.column_names,
                            new_fingerprint=map_fingerprint(part, encode, task_cfg, tokenizer))
            if len(part) >= limit:
                return _subsample(part, limit).with_format("torch")
            prefix *= 4
        while True:
            end = min(docs, len(ds)) if limit else len(ds)
            part = ds.select(range(done, end))
            parts.append(part.map(encode, batched=True, batch_size=MAP_BATCH, remove_columns=ds.column_names,
                                  new_fingerprint=map_fingerprint(part, encode, task_cfg, tokenizer)))
            done, docs = end, docs * 4
            if not limit or sum(len(p) for p in parts) >= limit or done == len(ds):
                return _subsample(concatenate_datasets(parts), limit).with_format("torch")

    train = prepare(task_cfg.get("train_split", "train"), task_cfg.get("max_train_samples"))
    evals = {name: prepare(split, task_cfg.get("max_eval_samples")) for name, split in _eval_split_names(task_cfg).items()}
    return TaskData(train, evals, default_data_collator)


class ImageDataset(torch.utils.data.Dataset):
    """Images (a uint8 N x H x W [x C] array, or a datasets.Dataset's `image` column of PIL images) ->
    {pixel_values, labels}. With `seed` (training with augmentation), each image's random crop and flip come
    from its own generator seeded by (seed, epoch, index), not from a worker's RNG: any number of loader
    workers gives the same batches (`set_epoch` is called by `start_epoch` before the workers start)."""

    def __init__(self, images, labels, transform, seed: int | None = None):
        self.images, self.labels, self.transform, self.seed, self.epoch = images, labels, transform, seed, 0

    def __len__(self):
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i):
        image = self.images[i]
        if self.seed is None:
            return {"pixel_values": self.transform(image), "labels": int(self.labels[i])}
        with torch.random.fork_rng(devices=[]):  # torchvision's v2 transforms draw from torch's global RNG
            torch.manual_seed(hash((self.seed, self.epoch, int(i))) % 2**63)
            return {"pixel_values": self.transform(image), "labels": int(self.labels[i])}


class ColorMode:
    """A PIL image in the model's colour mode before anything else: ImageNet holds CMYK and greyscale JPEGs,
    which would reach a 3-channel Normalize with 4 or 1 channels. Arrays (Fashion-MNIST) pass through."""

    def __init__(self, channels: int):
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, image):
        from PIL import Image

        return image.convert(self.mode) if isinstance(image, Image.Image) and image.mode != self.mode else image


def _image_transform(model_cfg, task_cfg, train: bool):
    from torchvision.transforms import v2

    size = model_cfg.image_size
    steps = [ColorMode(model_cfg.in_chans), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if model_cfg.in_chans == 3:
        steps.append(v2.RGB())
    else:
        steps.append(v2.Grayscale(model_cfg.in_chans))
    if train and task_cfg.get("augment", False):
        steps += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    steps.append(v2.Normalize(list(model_cfg.mean), list(model_cfg.std)))
    return v2.Compose(steps)


def _read_idx(path) -> np.ndarray:
    """MNIST idx format (gzip). Written here because the Debian package's layout is not torchvision's."""
    with gzip.open(_check_file(path), "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _image_task(task_cfg, model_cfg, seed: int = 0) -> TaskData:
    limits = {"train": task_cfg.get("max_train_samples"), "validation": task_cfg.get("max_eval_samples")}
    transforms = {s: _image_transform(model_cfg, task_cfg, s == "train") for s in limits}
    if task_cfg.source == "fashion_mnist":
        splits = {}
        for split, prefix in {"train": "train", "validation": "t10k"}.items():
            images = _read_idx(f"{task_cfg.path}/{prefix}-images-idx3-ubyte.gz")
            labels = _read_idx(f"{task_cfg.path}/{prefix}-labels-idx1-ubyte.gz")
            if task_cfg.get("classes"):  # a subset of the classes, relabelled 0..k-1 in the order given
                keep = np.isin(labels, list(task_cfg.classes))
                relabel = {c: i for i, c in enumerate(task_cfg.classes)}
                images, labels = images[keep], np.array([relabel[int(c)] for c in labels[keep]], dtype=np.int64)
            if limits[split]:  # a fixed subset (seed 0), the same for every run
                idx = np.random.default_rng(0).permutation(len(labels))[: limits[split]]
                images, labels = images[idx], labels[idx]
            splits[split] = ImageDataset(images, labels, transforms[split], augment_seed(task_cfg, split, seed))
        return TaskData(splits["train"], {"validation": splits["validation"]}, None)

    # ImageNet and friends: a local ImageFolder (task.data_dir) or a hub dataset with image/label columns,
    # decoded lazily by datasets' on-the-fly transform.
    import datasets

    data_dir = task_cfg.get("data_dir")
    if data_dir and not os.path.isdir(data_dir):
        raise LoramboError(f"task.data_dir '{data_dir}' is not a folder; point it at an ImageFolder (train/, validation/)")
    try:
        if data_dir:
            ds = datasets.load_dataset("imagefolder", data_dir=data_dir)
        else:
            ds = datasets.load_dataset(task_cfg.dataset.path, task_cfg.dataset.get("name"))
    except Exception as e:
        raise LoramboError(f"cannot load images ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           f"set task.data_dir to a local ImageFolder")

    def prepare(split):
        part = _subsample(ds[split].shuffle(seed=0) if limits[split] else ds[split], limits[split])
        # decoded one image at a time, in the loader's workers
        return ImageDataset(LazyColumn(part, "image"), part["label"], transforms[split],
                            augment_seed(task_cfg, split, seed))

    return TaskData(prepare("train"), {"validation": prepare("validation")}, None)


class LazyColumn:
    """One column of a datasets.Dataset, read (and decoded) a row at a time."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[int(i)][self.column]


def augment_seed(task_cfg, split: str, seed: int) -> int | None:
    """The seed of the training images' augmentations (None: no randomness to seed)."""
    return seed if split == "train" and task_cfg.get("augment", False) else None


def default_workers(processes: int = 1) -> int:
    """Loader workers per training process: on a GPU, the cores left to each process (at most 8: JPEG decoding
    and augmentation keep up with a GPU step at that); on a CPU none, since workers would take the cores that
    the training itself uses (and tests stay in one process)."""
    if not torch.cuda.is_available():
        return 0
    from lorambo.devices import machine_cores

    return max(1, min(8, machine_cores() // max(1, processes) - 1))


def data_loaders(cfg, data, processes: int = 1):
    """The shuffled training loader (seeded) and one loader per evaluation split; `train.num_workers` loading
    processes each (the order and augmentations do not depend on it), memory pinned for a GPU's copies."""
    from torch.utils.data import DataLoader

    workers = cfg.train.get("num_workers")
    loading = {"num_workers": default_workers(processes) if workers is None else workers,
               "pin_memory": torch.cuda.is_available(), "collate_fn": data.collate_fn}
    if data.lengths:  # transformers' length-grouped order, drawn anew each epoch from seed + epoch
        train_loader = DataLoader(data.train, batch_size=cfg.train.batch_size, drop_last=True,
                                  sampler=length_grouped_sampler(cfg.train.batch_size, data.lengths, cfg.seed),
                                  **loading)
    else:
        train_loader = DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                  generator=torch.Generator().manual_seed(cfg.seed), **loading)
    eval_loaders = {name: DataLoader(ds, batch_size=cfg.train.eval_batch_size, **loading)
                    for name, ds in data.evals.items()}
    return train_loader, eval_loaders


def start_epoch(loader, epoch: int) -> None:
    """The loader's shuffle, and a dataset's own per-epoch randomness (image augmentation), set to `epoch`
    before its workers start (accelerate tells the dataset only when its sampler has no epoch of its own)."""
    loader.set_epoch(epoch)
    dataset = loader.dataset
    while dataset is not None:  # through a Subset (a dev split carved out) to the images
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        dataset = getattr(dataset, "dataset", None)


def length_grouped_sampler(batch_size: int, lengths: list, seed: int):
    """transformers' LengthGroupedSampler (random mega-batches, sorted by length inside) with an epoch: the
    loop's set_epoch(e) draws epoch e's order from seed + e, so a resumed run sees the same order again."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class Sampler(LengthGroupedSampler):
        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            self.generator = torch.Generator().manual_seed(seed + getattr(self, "epoch", 0))
            return super().__iter__()

    return Sampler(batch_size, lengths=lengths)
