"""Datasets glue: the synthetic corpora as `datasets.Dataset`s, and any text dataset tokenised the same way.

`token_dataset("stories")` and `token_dataset("tokfsm")` give the labelled synthetic views; any other source
(local json/jsonl/csv/txt/parquet files, a folder of them, or a Hugging Face dataset name) goes through
`datasets.load_dataset` and one text column is tokenised into `input_ids`.

Dimension key: T position.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._hub import cache_only, datasets_offline
from ._checks import as_int
from .stories import StoryCorpus
from .tokfsm import TokFSM

# datasets' builder name for each local file extension.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


def tokfsm_dataset(n: int, seed: int = 0, fsm: TokFSM | None = None):
    """Columns `input_ids` (BOS + digits, seq_len long) and `states` (the trajectory they spell)."""
    from datasets import Dataset

    n, seed = as_int("n", n, 1), as_int("seed", seed, 0)
    fsm = fsm or TokFSM()
    if not isinstance(fsm, TokFSM):
        raise TypeError(f"fsm must be a TokFSM (or None for the paper's), got {type(fsm).__name__}")
    return Dataset.from_dict({"input_ids": fsm.sample(n, seed).tolist(), "states": fsm.sample_states(n, seed).tolist()})


def stories_dataset(n: int, seed: int = 0, start: int = 0, corpus: StoryCorpus | None = None):
    """One row per story: `text`, `input_ids` (BOS + words + EOS), story ground truth (`topic`, `topic_name`,
    `hero`, `gender`, `friend`), `token_topic` (topic of each token, -1 generic) and one bool list per concept."""
    from datasets import Dataset

    n, seed, start = as_int("n", n, 1), as_int("seed", seed, 0), as_int("start", start, 0)
    corpus = corpus or StoryCorpus(seed)
    if not isinstance(corpus, StoryCorpus):
        raise TypeError(f"corpus must be a StoryCorpus (or None for StoryCorpus(seed)), got {type(corpus).__name__}")
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

    if not isinstance(source, (str, Path, list, tuple)) or isinstance(source, (list, tuple)) and not source:
        raise TypeError(f"source must be 'stories', 'tokfsm', a file or folder path, a non-empty list of files, or a "
                        f"dataset name; got {type(source).__name__} {source!r:.60}")
    max_length = as_int("max_length", max_length, 1)
    if not isinstance(text_column, str):
        raise TypeError(f"text_column must be a column name (str), got {type(text_column).__name__}")
    if tokenizer is None:
        raise ValueError(f"token_dataset({source!r}) needs a tokenizer (an object or a name/path for AutoTokenizer)")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = _tokenizer(str(tokenizer))
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a tokenizer object (callable on a list of texts) or a name/path, got {type(tokenizer).__name__}")
    files = [Path(f) for f in source] if isinstance(source, (list, tuple)) else [Path(source)]
    if all(f.exists() for f in files):
        if len(files) == 1 and files[0].is_dir():
            raw = _load(datasets, str(files[0]), files, split=split, **load_kwargs)
        else:
            kinds = {_BUILDERS.get(f.suffix.lower()) for f in files}
            if None in kinds or len(kinds) != 1:
                raise ValueError(
                    f"local files must share one type among {sorted(_BUILDERS)}, got {[f.name for f in files]}"
                )
            empty = [f.name for f in files if f.is_file() and f.stat().st_size == 0]
            if empty:
                raise ValueError(f"local files must hold text; these are empty: {empty}")
            raw = _load(datasets, kinds.pop(), files, data_files=[str(f) for f in files], split=split, **load_kwargs)
    elif isinstance(source, (list, tuple)) or files[0].suffix.lower() in _BUILDERS:
        raise ValueError(f"files not found: {[str(f) for f in files if not f.exists()]}")
    elif cache_only():  # no hub to ask: read the cache, and fail at once rather than after tens of seconds of retries
        try:
            with datasets_offline():
                raw = datasets.load_dataset(str(source), split=split, **load_kwargs)
        except (ConnectionError, FileNotFoundError, OSError) as err:
            raise ValueError(f"dataset {str(source)!r} is not a local file or folder and not in the local datasets cache, and "
                             f"the hub cannot be asked (HF_HUB_OFFLINE is set, or no network): {err}") from None  # fmt: skip
    else:
        raw = datasets.load_dataset(str(source), split=split, **load_kwargs)
    if text_column not in raw.column_names:
        raise ValueError(f"text_column {text_column!r} is not in the dataset; its columns are {raw.column_names}")
    kind = getattr(raw.features[text_column], "dtype", None)
    if kind not in ("string", "large_string"):
        texts = [c for c, f in raw.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        raise ValueError(f"text_column {text_column!r} holds {kind or type(raw.features[text_column]).__name__} values, "
                         f"not text; the text columns are {texts}")
    raw = raw.filter(lambda row: bool(row[text_column] and row[text_column].strip()))  # e.g. blank txt lines
    if len(raw) == 0:
        raise ValueError(f"no text to tokenise: every row of {text_column!r} in {source!s:.80} is empty or blank")

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[text_column], truncation=True, max_length=max_length)["input_ids"]}

    keep = [text_column]
    return raw.map(tokenize, batched=True, remove_columns=[c for c in raw.column_names if c not in keep])



def _load(datasets, path: str, files: list[Path], **kwargs):
    """datasets.load_dataset on local files; a file it cannot parse gets an error naming the files."""
    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as e:  # datasets wraps parse errors in DatasetGenerationError; the cause says what was wrong
        cause = e.__cause__ or e
        raise ValueError(f"could not read {[f.name for f in files]} as {path if path in _BUILDERS.values() else 'a folder of data files'} "
                         f"({type(cause).__name__}: {str(cause)[:200]}); each file must be well-formed "
                         f"{'/'.join(sorted(_BUILDERS))}") from e


def _unpad(x_BT: torch.Tensor, lengths: list[int]) -> list[list]:
    return [row[:n] for row, n in zip(x_BT.tolist(), lengths)]


def _tokenizer(name: str):
    """AutoTokenizer for a folder or hub id; with no hub to ask, from the cache only, failing at once."""
    from transformers import AutoTokenizer

    if Path(name).expanduser().exists() or not cache_only():
        return AutoTokenizer.from_pretrained(name)
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError as err:
        raise ValueError(f"tokenizer {name!r} is not a local folder and not in the local hub cache, and the hub cannot be "
                         f"asked (HF_HUB_OFFLINE is set, or no network); pass a tokenizer object or a folder: {err}") from None
