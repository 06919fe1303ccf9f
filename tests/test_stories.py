"""Stories: the labels agree with the text and the generator's ground truth; determinism; tokenizer; datasets glue."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from nbfeatures.data import StoryCorpus, stories_dataset, token_dataset
from nbfeatures.data.stories import COLOURS, HIERARCHY, MONTHS, NAMES_F, NAMES_M, NEGATIVE, NUMBERS, POSITIVE, TOPICS

CORPUS = StoryCorpus(seed=0)
STORIES = CORPUS.generate(300)
ROWS = CORPUS.encode(STORIES)


def padded(rows):
    ids_BT = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for b, row in enumerate(rows):
        ids_BT[b, : len(row)] = torch.tensor(row)
    return ids_BT


IDS = padded(ROWS)
LABELS = CORPUS.concept_labels(IDS)


def words_where(concept):
    return [CORPUS.vocab[i] for i in IDS[LABELS[concept]].tolist()]


def test_lexical_concepts_are_exactly_their_word_lists():
    assert set(words_where("month")) == set(MONTHS)
    assert set(words_where("colour")) <= set(COLOURS) and len(set(words_where("colour"))) >= 10
    assert set(words_where("number")) <= set(NUMBERS)
    assert set(words_where("name")) <= set(NAMES_F + NAMES_M)
    assert set(words_where("positive")) == set(POSITIVE) and set(words_where("negative")) == set(NEGATIVE)
    # ... and nothing outside the lists is labelled, nothing inside them is missed.
    month_ids = [CORPUS.vocab.index(m) for m in MONTHS]
    assert torch.equal(LABELS["month"], torch.isin(IDS, torch.tensor(month_ids)))


def test_every_story_plants_names_emotions_and_a_repeat():
    for b, story in enumerate(STORIES):
        row = LABELS["name"][b], LABELS["positive"][b], LABELS["negative"][b], LABELS["repeated_name"][b]
        assert all(r.any() for r in row), story.text


def test_repeated_names_were_seen_earlier_in_the_same_story():
    for b, row in enumerate(ROWS):
        seen = set()
        for t, tok in enumerate(row):
            word = CORPUS.vocab[tok]
            if LABELS["name"][b, t]:
                assert bool(LABELS["repeated_name"][b, t]) == (word in seen)
                seen.add(word)
    # The hero is always repeated; across a packed row, names do not carry over a story boundary.
    two = torch.tensor([ROWS[0][:-1] + ROWS[0]])
    labels = CORPUS.concept_labels(two)
    n = len(ROWS[0]) - 1
    assert torch.equal(labels["repeated_name"][0, n:], LABELS["repeated_name"][0, : len(ROWS[0])])


def test_pronouns_agree_with_the_heros_gender():
    for b, story in enumerate(STORIES):
        female, male = LABELS["pronoun_female"][b], LABELS["pronoun_male"][b]
        assert (female.any() if story.gender == "f" else male.any()), story.text
        assert not (male.any() if story.gender == "f" else female.any()), story.text
        assert story.hero in (NAMES_F if story.gender == "f" else NAMES_M)


def test_topics_are_visible_in_the_words():
    truth = torch.tensor([s.topic for s in STORIES])
    assert torch.equal(CORPUS.topic_ids(IDS), truth)
    assert len(CORPUS.topics) >= 8 and set(truth.tolist()) == set(range(len(CORPUS.topics)))
    # Every topic word of a story belongs to that story's topic.
    token_topic = CORPUS.token_topics[IDS]
    assert ((token_topic == truth[:, None]) | (token_topic == -1)).all()
    for topic in TOPICS:
        assert (CORPUS.token_topics == CORPUS.topics.index(topic)).sum() >= 25  # each topic has its own vocabulary


def test_child_labels_name_the_word_in_the_text():
    for parent, children in HIERARCHY.items():
        child_BT = CORPUS.child_labels(IDS, parent)
        assert child_BT.shape == IDS.shape and child_BT.dtype == torch.long
        # The parent label is exactly "some child", and each child index names the word the story wrote.
        assert torch.equal(child_BT >= 0, LABELS[parent]), parent
        for b, story in enumerate(STORIES[:40]):
            words = story.words  # row b is BOS + words + EOS
            for t, c in enumerate(child_BT[b, 1 : len(words) + 1].tolist()):
                if c >= 0:
                    assert words[t].lower() == children[c].lower(), (parent, words[t], children[c])
                else:
                    assert words[t] not in children and words[t].lower() not in children
    assert set(CORPUS.child_labels(IDS, "month")[LABELS["month"]].tolist()) == set(range(12))


def test_hierarchy_parents_are_concepts_with_disjoint_children():
    assert set(HIERARCHY) <= set(CORPUS.concepts) and CORPUS.hierarchy is HIERARCHY
    assert HIERARCHY["name"] == tuple(NAMES_F + NAMES_M) and HIERARCHY["month"] == tuple(MONTHS)
    every = [w for children in HIERARCHY.values() for w in children]
    assert len(every) == len(set(every))  # a word is a child of one parent only
    with pytest.raises(ValueError, match="parent must be one of"):
        CORPUS.child_labels(IDS, "pronoun")
    with pytest.raises(ValueError, match="ids_BT must be in"):
        CORPUS.child_labels(torch.tensor([[len(CORPUS.vocab)]]), "month")


def test_counts_and_months_run_in_order():
    counts = months = 0
    for story in STORIES:
        words = story.words
        for i, w in enumerate(words):
            if w == "counted" and words[i + 1] in NUMBERS:  # "counted three stars , then four , then five ."
                n = [NUMBERS.index(words[j]) for j in (i + 1, i + 5, i + 8)]
                assert n[1] == n[0] + 1 and n[2] == n[0] + 2, story.text
                counts += 1
            if w == "After":  # "After May came June"
                assert MONTHS.index(words[i + 3]) == (MONTHS.index(words[i + 1]) + 1) % 12, story.text
                months += 1
    assert counts > 20 and months > 20


def test_generation_is_deterministic_by_seed_and_index():
    assert StoryCorpus(seed=0).generate(5) == STORIES[:5]
    assert StoryCorpus(seed=0).generate(3, start=10) == STORIES[10:13]
    assert StoryCorpus(seed=1).generate(5) != STORIES[:5]


def test_vocabulary_is_small_and_fully_used():
    assert 300 <= len(CORPUS.vocab) <= 2000
    assert 1 not in set(IDS.flatten().tolist())  # no <unk>: every emitted word is in the vocabulary


def test_tokenizer_round_trips_through_autotokenizer(tmp_path):
    CORPUS.tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
    for story, row in zip(STORIES[:20], ROWS):
        ids = tok(story.text)["input_ids"]
        assert ids == row[:-1]  # BOS + words (EOS is the caller's business)
        assert tok.decode(ids, skip_special_tokens=True) == story.text


def test_stories_dataset_columns_match_the_labels():
    ds = stories_dataset(20, seed=0)
    assert ds[3]["input_ids"] == ROWS[3] and ds[3]["topic"] == STORIES[3].topic
    assert ds[3]["month"] == LABELS["month"][3, : len(ROWS[3])].tolist()
    assert set(CORPUS.concepts) <= set(ds.column_names) and {"text", "topic_name", "token_topic"} <= set(ds.column_names)


@pytest.mark.parametrize("kind", ["json", "csv", "txt", "parquet"])
def test_token_dataset_reads_local_files(tmp_path, kind):
    texts = [s.text for s in STORIES[:6]]
    path = tmp_path / f"data.{kind}"
    if kind == "json":
        path.write_text("\n".join(json.dumps({"story": t}) for t in texts))
    elif kind == "txt":
        path.write_text("\n".join(texts) + "\n\n")
    else:
        import pandas as pd

        frame = pd.DataFrame({"story": texts})
        frame.to_csv(path, index=False) if kind == "csv" else frame.to_parquet(path)
    column = "text" if kind == "txt" else "story"
    ds = token_dataset(path, CORPUS.tokenizer(), text_column=column, max_length=64, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 6
    assert ds[0]["input_ids"] == ROWS[0][:64]


def test_token_dataset_bad_input(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("story\nOnce upon a time\n")
    with pytest.raises(ValueError, match="columns are \\['story'\\]"):
        token_dataset(path, CORPUS.tokenizer(), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        token_dataset(path)
    with pytest.raises(ValueError, match="files not found"):
        token_dataset([path, tmp_path / "missing.csv"], CORPUS.tokenizer())
    assert token_dataset("stories", n=4)["input_ids"][1] == ROWS[1]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        StoryCorpus(seed=-1)
    with pytest.raises(ValueError, match="min_middle"):
        StoryCorpus(min_middle=4, max_middle=2)
