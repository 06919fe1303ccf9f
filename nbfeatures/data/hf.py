"""Datasets glue: the synthetic corpora as `datasets.Dataset`s, and any text dataset tokenised the same way.

`token_dataset("stories")` and `token_dataset("tokfsm")` give the labelled synthetic views; any other source
(local json/jsonl/csv/txt/parquet files, a folder of them, or a Hugging Face dataset name) goes through
`datasets.load_dataset` and one text column is tokenised into `input_ids`.

Dimension key: T position.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .stories import StoryCorpus
from .tokfsm import TokFSM

# datasets' builder name for each local file extension.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


def tokfsm_dataset(n: int, seed: int = 0, fsm: TokFSM | None = None):
    """Columns `input_ids` (BOS + digits, seq_len long) and `states` (the trajectory they spell)."""
    from datasets import Dataset

    fsm = fsm or TokFSM()
    return Dataset.from_dict({"input_ids": fsm.sample(n, seed).tolist(), "states": fsm.sample_states(n, seed).tolist()})


def stories_dataset(n: int, seed: int = 0, start: int = 0, corpus: StoryCorpus | None = None):
    """One row per story: `text`, `input_ids` (BOS + words + EOS), story ground truth (`topic`, `topic_name`,
    `hero`, `gender`, `friend`), `token_topic` (topic of each token, -1 generic) and one bool list per concept."""
    from datasets import Dataset

    corpus = corpus or StoryCorpus(seed)
    stories = corpus.generate(n, start)
    ids = corpus.encode(stories)
    columns = {
        "text": [s.text for s in stories],
        "input_ids": ids,
        "topic": [s.topic for s in stories],
        "topic_name": [corpus.topics[s.topic] for s in stories],
        "hero": [s.hero for s in stories],
        "gender": [s.gender for s in stories],
        "friend": [s.friend for s in stories],
    }
    lengths = [len(row) for row in ids]
    ids_BT = torch.zeros(len(ids), max(lengths, default=0), dtype=torch.long)  # pad with SPECIAL: a new "story"
    for b, row in enumerate(ids):
        ids_BT[b, : len(row)] = torch.tensor(row)
    columns["token_topic"] = _unpad(corpus.token_topics[ids_BT], lengths)
    labels = corpus.concept_labels(ids_BT)
    for concept in corpus.concepts:
        columns[concept] = _unpad(labels[concept], lengths)
    return Dataset.from_dict(columns)


def token_dataset(
    source: str | Path | list,
    tokenizer=None,
    *,
    n: int = 1000,
    seed: int = 0,
    split: str = "train",
    text_column: str = "text",
    max_length: int = 128,
    **load_kwargs,
):
    """A `datasets.Dataset` with an `input_ids` column, from a synthetic corpus, local files or a hub dataset.

    source: "stories" or "tokfsm" (n rows from `seed`; the labelled views above), a local file, folder or list
    of files (json, jsonl, csv, txt, parquet), or a dataset name for `datasets.load_dataset`.
    tokenizer: a tokenizer object or a name/path for AutoTokenizer (needed for text sources).
    load_kwargs: passed on to `datasets.load_dataset` (e.g. `name=`, `cache_dir=`).
    """
    if source == "stories":
        return stories_dataset(n, seed)
    if source == "tokfsm":
        return tokfsm_dataset(n, seed)
    import datasets

    if tokenizer is None:
        raise ValueError(f"token_dataset({source!r}) needs a tokenizer (an object or a name/path for AutoTokenizer)")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    files = [Path(f) for f in source] if isinstance(source, (list, tuple)) else [Path(source)]
    if all(f.exists() for f in files):
        if len(files) == 1 and files[0].is_dir():
            raw = datasets.load_dataset(str(files[0]), split=split, **load_kwargs)
        else:
            kinds = {_BUILDERS.get(f.suffix.lower()) for f in files}
            if None in kinds or len(kinds) != 1:
                raise ValueError(
                    f"local files must share one type among {sorted(_BUILDERS)}, got {[f.name for f in files]}"
                )
            raw = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split=split, **load_kwargs)
    elif isinstance(source, (list, tuple)):
        raise ValueError(f"files not found: {[str(f) for f in files if not f.exists()]}")
    else:
        raw = datasets.load_dataset(str(source), split=split, **load_kwargs)
    if text_column not in raw.column_names:
        raise ValueError(f"text_column {text_column!r} is not in the dataset; its columns are {raw.column_names}")
    raw = raw.filter(lambda row: bool(row[text_column] and row[text_column].strip()))  # e.g. blank txt lines

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[text_column], truncation=True, max_length=max_length)["input_ids"]}

    keep = [text_column]
    return raw.map(tokenize, batched=True, remove_columns=[c for c in raw.column_names if c not in keep])



def _unpad(x_BT: torch.Tensor, lengths: list[int]) -> list[list]:
    return [row[:n] for row, n in zip(x_BT.tolist(), lengths)]
