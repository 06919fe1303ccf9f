"""Stories: a synthetic corpus of short children's stories with planted, labelled concepts.

    story = opening + topic sentences + trouble (negative emotion) + friend + resolution (positive emotion) + ending
    label[c][t] = token t belongs to concept c      (lexical, except `repeated_name`: a name seen earlier in the story)

Every story has one topic whose own words (dragon: cave, knight, scaly ...) fill its slots, so the topic is
visible in the words and a language model must carry it through the context. Planted token-level concepts:
months, colours, numbers, names, positive and negative emotion words, pronouns agreeing with the hero's
gender, names repeated later in a story, topic words. Words are chosen so that every concept is a pure
function of the token (no "May" as a verb, no "Rose" as a name), hence `concept_labels` works on any ids.
`HIERARCHY` puts the words of six concepts under them as children (month -> January ...); `child_labels`
says which child each token is, the ground truth of feature absorption.
Two kinds of structure reward context: counts and months run in order ("three , then four"), and the
emotion after an event matches its valence.

Dimension key: B batch, T position, V vocab, C concepts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ._checks import as_ids, as_int

SPECIAL, UNK = "<|endoftext|>", "<unk>"  # SPECIAL is BOS, EOS and PAD

MONTHS = "January February March April May June July August September October November December".split()
COLOURS = "red blue green yellow purple pink orange white black brown grey silver".split()
NUMBERS = "two three four five six seven eight nine ten eleven twelve".split()  # "one" is left out: "one day"
NAMES_F = "Anna Mia Emma Sara Lucy Zoe Nina Ella Amy Kate Maya Lena Sophie Clara Julia Alice Hannah Eva Olivia Chloe".split()
NAMES_M = "Tom Ben Max Sam Leo Jack Tim Finn Noah Oscar Hugo Adam Luke Owen Ryan Eli Omar Theo Kai Milo".split()
POSITIVE = "happy glad proud excited calm cheerful thankful hopeful delighted joyful".split()
NEGATIVE = "sad scared angry lonely upset worried grumpy afraid nervous jealous".split()
# Words every topic may use; any other word in a topic table belongs to that topic alone.
FUNCTION_WORDS = set("""a an the in into on at by for from of with about across among away down out up over to and
then so very all every its it this there lots back again home far big small little tall long new old warm safe stories
was were had saw came went got gave found lost fell broke began grew rode pushed sang watched climbed""".split())
PRONOUNS = {"f": {"pro": "she", "obj": "her", "pos": "her", "kid": "girl"}, "m": {"pro": "he", "obj": "him", "pos": "his", "kid": "boy"}}

# Each topic: `love` (what the hero loved), `place`, `thing` (singular/plural), `adj`, `act` (past-tense verb
# phrase), `bad` / `good` (whole sentences). Slots: {pro} {obj} {pos} {name}; words shared by two topics
# are rejected when the vocabulary is built, so a topic word always identifies its topic.
TOPICS = {
    "dragon": dict(
        love="dragons|stories about dragons|big scaly dragons",
        place="in a dark cave|on a high mountain|among the rocky peaks",
        thing="dragon/dragons|cave/caves|wing/wings|scale/scales|jewel/jewels|knight/knights|egg/eggs",
        adj="scaly|mighty|fierce|ancient",
        act="flew on a dragon|found a dragon egg|climbed into the dragon cave|polished the dragon scales"
        "|heard a dragon roar far away|counted the jewels in the cave",
        bad="One night , a knight came to fight the dragon .|The dragon egg rolled down the mountain ."
        "|The dragon hurt its wing on a rock .",
        good="The dragon let {obj} ride on its back .|The egg cracked and a small dragon came out ."
        "|The knight and the dragon became friends .",
    ),
    "fire": dict(
        love="fire trucks|brave firefighters|the fire station",
        place="at the fire station|near the burning house|by the fire truck",
        thing="truck/trucks|hose/hoses|ladder/ladders|flame/flames|siren/sirens|helmet/helmets|firefighter/firefighters",
        adj="hot|smoky|burning|blazing",
        act="sprayed water with the hose|climbed the fire ladder|put on a fire helmet|rang the loud siren"
        "|rode in the fire truck",
        bad="Smoke came out of a house down the street .|The flames grew higher and higher ."
        "|The ladder was too short to reach the window .",
        good="The firefighters put out the fire .|Everyone was safe from the flames ."
        "|The hose sprayed water and the smoke went away .",
    ),
    "baby": dict(
        love="{pos} baby brother|{pos} baby sister|babies",
        place="in the nursery|next to the crib|by the baby cradle",
        thing="bottle/bottles|rattle/rattles|diaper/diapers|crib/cribs|blanket/blankets|stroller/strollers|bib/bibs",
        adj="tiny|sleepy|giggly|chubby",
        act="rocked the baby to sleep|gave the baby a warm bottle|sang a lullaby to the baby"
        "|pushed the baby in the stroller|shook a rattle for the baby",
        bad="The baby started to cry and cry .|The baby dropped the bottle on the floor ."
        "|The baby could not fall asleep .",
        good="The baby smiled and giggled .|The baby fell asleep in the crib .|The baby said a first word .",
    ),
    "flower": dict(
        love="flowers|the garden|pretty flowers",
        place="in the garden|in a sunny meadow|by the flower bed",
        thing="flower/flowers|rose/roses|tulip/tulips|daisy/daisies|petal/petals|seed/seeds|bee/bees",
        adj="blooming|fragrant|sunny|fresh",
        act="watered the roses|picked a bunch of tulips|smelled the fragrant flowers|planted a small seed"
        "|watched the bees buzz around the petals",
        bad="A storm broke the stems of the roses .|The flowers began to wilt in the heat ."
        "|Bugs ate the leaves of the tulips .",
        good="The seed grew into a tall sunflower .|The garden bloomed with flowers ."
        "|New petals opened in the sunshine .",
    ),
    "princess": dict(
        love="princesses|the royal palace|stories about princesses",
        place="in the royal palace|in the castle tower|at the grand ball",
        thing="crown/crowns|gown/gowns|castle/castles|tiara/tiaras|throne/thrones|prince/princes|princess/princesses",
        adj="royal|grand|elegant|magical",
        act="danced at the royal ball|tried on a sparkly crown|met the kind queen|bowed to the king"
        "|wore a long gown",
        bad="The princess lost a glass slipper .|A wicked witch locked the princess in the tower ."
        "|The crown fell and broke into pieces .",
        good="The prince found the glass slipper .|The queen gave {obj} a sparkly tiara .|The princess was free again .",
    ),
    "ocean": dict(
        love="the ocean|the sea|swimming in the sea",
        place="on the sandy beach|under the waves|on a small boat",
        thing="wave/waves|shell/shells|whale/whales|dolphin/dolphins|crab/crabs|boat/boats|pearl/pearls",
        adj="salty|sandy|deep|wet",
        act="swam with the dolphins|collected shells on the beach|sailed a boat across the sea"
        "|dug in the wet sand|watched a whale splash",
        bad="A big wave knocked over the boat .|A crab pinched {pos} toe .|The tide washed the shells away .",
        good="A dolphin pushed the boat to the shore .|{pro} found a pearl inside a shell .|The whale sang a deep song .",
    ),
    "school": dict(
        love="going to school|reading books|{pos} teacher",
        place="in the classroom|on the playground|in the school library",
        thing="book/books|pencil/pencils|desk/desks|teacher/teachers|lesson/lessons|crayon/crayons|backpack/backpacks",
        adj="clever|smart|quiet|busy",
        act="read a book in the library|wrote a story with a pencil|drew a picture with crayons"
        "|raised {pos} hand in class|learned to spell hard words",
        bad="{pro} forgot {pos} homework at home .|A bully took {pos} backpack .|{pro} got a math question wrong .",
        good="The teacher gave {obj} a sticker .|{pro} got every answer right on the test .|The class clapped for {obj} .",
    ),
    "space": dict(
        love="the stars|rockets|outer space",
        place="on the moon|in a rocket ship|far out in space",
        thing="rocket/rockets|star/stars|planet/planets|astronaut/astronauts|alien/aliens|comet/comets|moon/moons",
        adj="shining|cosmic|distant|starry",
        act="steered a rocket to the moon|looked at the stars through a telescope|waved to an alien"
        "|floated in {pos} space suit|landed on a distant planet",
        bad="The rocket ran out of fuel .|A comet crashed into the ship .|{pro} got lost among the planets .",
        good="The astronauts fixed the rocket .|An alien showed {obj} the way home .|The rocket landed safely on earth .",
    ),
    "farm": dict(
        love="farm animals|the farm|the animals on the farm",
        place="on the farm|in the big barn|in the muddy field",
        thing="cow/cows|pig/pigs|hen/hens|horse/horses|sheep/sheep|tractor/tractors|barn/barns",
        adj="muddy|hungry|fluffy|woolly",
        act="milked the cow|fed the hungry pigs|rode a horse across the field|counted the hens in the yard"
        "|drove the tractor",
        bad="The pigs escaped from the pen .|A fox chased the hens .|The tractor got stuck in the mud .",
        good="The cow gave lots of milk .|The farmer thanked {obj} for the help .|All the animals were safe in the barn .",
    ),
    "snow": dict(
        love="snowy days|winter|the snow",
        place="on the snowy hill|in the frozen forest|by the icy pond",
        thing="snowman/snowmen|snowflake/snowflakes|sled/sleds|mitten/mittens|scarf/scarves|icicle/icicles|snowball/snowballs",
        adj="frosty|icy|snowy|frozen",
        act="built a snowman|rode a sled down the hill|caught snowflakes on {pos} tongue|skated on the frozen pond"
        "|threw snowballs",
        bad="The snowman began to melt .|{pro} fell off the sled into the snow .|{pos} mittens got lost in the snow .",
        good="{pro} drank cocoa by the warm stove .|The sled went fast and {pro} laughed .|The snowman got a new scarf .",
    ),
}

# Generic skeleton; {thing}/{things}/{place}/{act}/{adj}/{love}/{bad}/{good} come from the story's topic.
OPENINGS = [
    "Once upon a time , there was a little {kid} named {name} . {pro} loved {love} .",
    "{name} was a little {kid} who loved {love} .",
    "There was once a {kid} called {name} who lived {place} .",
]
MIDDLES = [
    "One morning , {pro} {act} .",
    "Every day , {name} {act} .",
    "In {month} , {pro} {act} .",
    "{pro} saw a {colour} {thing} {place} .",
    "{pos} favourite colour was {colour} .",
    "{pro} counted {n0} {things} , then {n1} , then {n2} .",
    "After {month} came {next_month} , and {name} {act} .",
    "The {thing} was {adj} and {colour} .",
    "{pro} had {n0} {adj} {things} .",
]
TROUBLES = ["{bad} {name} felt {neg} .", "{bad} {pro} was very {neg} .", "{bad} This made {name} {neg} ."]
HELPS = ["{pos} friend {friend} came to help .", "{friend} and {name} {act} together ."]
RESOLUTIONS = ["{good} {pro} felt {pos_emo} .", "{good} This made {name} very {pos_emo} ."]
ENDINGS = ["From that day on , {name} was always {pos_emo} . The end .", "{name} and {friend} were {pos_emo} . The end ."]
FILLS = {"colour": COLOURS, "neg": NEGATIVE, "pos_emo": POSITIVE}
CONCEPTS = ("month", "colour", "number", "name", "positive", "negative", "pronoun_female", "pronoun_male",
            "repeated_name", "topic_word")  # fmt: skip
# Parent concept -> its child words (each parent is a lexical concept above; child i is word i of the tuple).
# Feature absorption (Chanin et al. 2024) is measured on these: a parent latent that stops firing on one child.
HIERARCHY: dict[str, tuple[str, ...]] = {
    "month": tuple(MONTHS), "colour": tuple(COLOURS), "number": tuple(NUMBERS), "name": tuple(NAMES_F + NAMES_M),
    "positive": tuple(POSITIVE), "negative": tuple(NEGATIVE),
}  # fmt: skip


def _options(topic: str, key: str) -> list[str]:
    return TOPICS[topic][key].split("|")


@dataclass(frozen=True)
class Story:
    """One generated story: its text (words joined by single spaces) and the ground truth behind it."""

    text: str
    topic: int  # index into StoryCorpus.topics
    hero: str
    gender: str  # "f" or "m"; every pronoun in the story refers to the hero
    friend: str

    @property
    def words(self) -> list[str]:
        return self.text.split(" ")


def _capitalise(word: str) -> str:
    return word[:1].upper() + word[1:]


def _decapitalise(word: str) -> str:
    return word[:1].lower() + word[1:]


@dataclass(frozen=True)
class StoryCorpus:
    """Deterministic story generator: story i of corpus `seed` is the same whatever n you ask for."""

    seed: int = 0  # stories of different seeds are independent draws from the same grammar
    min_middle: int = 2  # topic sentences between the opening and the trouble
    max_middle: int = 5

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        as_int("min_middle", self.min_middle, 1), as_int("max_middle", self.max_middle, 1)
        if not 1 <= self.min_middle <= self.max_middle <= len(MIDDLES):
            raise ValueError(f"need 1 <= min_middle <= max_middle <= {len(MIDDLES)}, got {self.min_middle}, {self.max_middle}")

    topics = tuple(TOPICS)
    concepts = CONCEPTS
    hierarchy = HIERARCHY

    def story(self, i: int) -> Story:
        i = as_int("i", i, 0)
        rng = random.Random(self.seed * 1_000_003 + i)
        topic = rng.choice(self.topics)
        gender = rng.choice("fm")
        hero = rng.choice(NAMES_F if gender == "f" else NAMES_M)
        friend = rng.choice([n for n in NAMES_F + NAMES_M if n != hero])
        slots = PRONOUNS[gender] | {"name": hero, "friend": friend}
        middle = rng.sample(MIDDLES, rng.randint(self.min_middle, self.max_middle))
        parts = [rng.choice(OPENINGS), *middle, rng.choice(TROUBLES), *rng.sample(HELPS, rng.randint(1, 2)),
                 rng.choice(RESOLUTIONS), rng.choice(ENDINGS)]  # fmt: skip
        words = []
        for template in parts:
            words += self._render(template, topic, slots, rng)
        for j, w in enumerate(words):  # sentence starts are capitalised after rendering
            if j == 0 or words[j - 1] == ".":
                words[j] = _capitalise(w)
        return Story(" ".join(words), self.topics.index(topic), hero, gender, friend)

    def _render(self, template: str, topic: str, slots: dict, rng: random.Random) -> list[str]:
        n0, m0 = rng.randint(0, len(NUMBERS) - 3), rng.randrange(12)  # counts and months run in order
        local = {"n0": NUMBERS[n0], "n1": NUMBERS[n0 + 1], "n2": NUMBERS[n0 + 2],
                 "month": MONTHS[m0], "next_month": MONTHS[(m0 + 1) % 12]}  # fmt: skip
        thing, things = rng.choice(_options(topic, "thing")).split("/")
        local |= {"thing": thing, "things": things}
        out = []
        for word in template.split(" "):
            key = word[1:-1] if word.startswith("{") else None
            if key is None:
                out.append(word)
            elif key in slots:
                out.append(slots[key])
            elif key in local:
                out.append(local[key])
            elif key in FILLS:
                out.append(rng.choice(FILLS[key]))
            else:  # a topic phrase, which may hold slots itself
                out += self._render(rng.choice(_options(topic, key)), topic, slots, rng)
        return out

    def generate(self, n: int, start: int = 0) -> list[Story]:
        """Stories start .. start + n - 1."""
        n, start = as_int("n", n, 1), as_int("start", start, 0)
        return [self.story(i) for i in range(start, start + n)]

    # ------------------------------------------------------------ tokens and labels

    @property
    def vocab(self) -> tuple[str, ...]:
        return vocabulary()[0]

    def tokenizer(self):
        return story_tokenizer()

    def encode(self, stories: list[Story]) -> list[list[int]]:
        """Token ids with BOS and EOS (the same special token) around each story."""
        if isinstance(stories, Story) or any(not isinstance(s, Story) for s in stories):
            raise TypeError("stories must be a list of Story objects (from generate or story); "
                            f"got {type(stories).__name__} {stories!r:.60}")
        index = {w: i for i, w in enumerate(self.vocab)}
        unk = index[UNK]
        return [[0, *(index.get(w, unk) for w in s.words), 0] for s in stories]

    def concept_labels(self, ids_BT: Tensor) -> dict[str, Tensor]:
        """For token ids [B, T] (any source), a bool [B, T] mask per concept in `concepts`."""
        ids_BT = as_ids("ids_BT", ids_BT, len(self.vocab))
        if ids_BT.dim() != 2:
            raise ValueError(f"ids_BT must be [B, T] token ids, got shape {list(ids_BT.shape)}")
        table_CV = _concept_table()
        labels = {c: table_CV[k][ids_BT] for k, c in enumerate(CONCEPTS) if c != "repeated_name"}
        # A name is repeated when the same token occurred earlier in the same story (stories split at SPECIAL).
        story_BT = (ids_BT == 0).long().cumsum(-1)
        seen_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
        before_TT = torch.ones(ids_BT.shape[-1], ids_BT.shape[-1], dtype=torch.bool).tril(-1)
        for i in range(0, len(ids_BT), 256):  # chunks bound the [B, T, T] comparison's memory
            ids, story = ids_BT[i : i + 256], story_BT[i : i + 256]
            same_BTT = (ids[:, :, None] == ids[:, None, :]) & (story[:, :, None] == story[:, None, :])
            seen_BT[i : i + 256] = (same_BTT & before_TT).any(-1)
        labels["repeated_name"] = labels["name"] & seen_BT
        return {c: labels[c] for c in CONCEPTS}

    def child_labels(self, ids_BT: Tensor, parent: str) -> Tensor:
        """Long, the shape of ids_BT: which child of `parent` each token is (an index into HIERARCHY[parent]), else -1."""
        if parent not in HIERARCHY:
            raise ValueError(f"parent must be one of {tuple(HIERARCHY)}, got {parent!r}")
        ids_BT = as_ids("ids_BT", ids_BT, len(self.vocab))
        return _child_table(parent)[ids_BT]

    @property
    def token_topics(self) -> Tensor:
        """Long [V]: the topic index of each topic word, -1 for words shared by all topics."""
        return vocabulary()[1].clone()

    def topic_ids(self, ids_BT: Tensor) -> Tensor:
        """Long [B]: the topic with the most topic words in each row (ties to the lowest index), -1 if none."""
        ids_BT = as_ids("ids_BT", ids_BT, len(self.vocab))
        if ids_BT.dim() < 1:
            raise ValueError("ids_BT must be [B, T] (or [T]) token ids, got a single number")
        topic_BT = self.token_topics[ids_BT]
        counts_BK = torch.stack([(topic_BT == k).sum(-1) for k in range(len(self.topics))], -1)
        return torch.where(counts_BK.sum(-1) > 0, counts_BK.argmax(-1), -1)

    def topic_prompt(self, topic: int, seed: int = 0) -> str:
        """An opening sentence that names the topic, e.g. 'Mia was a little girl who loved the sea .'"""
        topic = as_int("topic", topic, 0)
        if topic >= len(self.topics):
            raise ValueError(f"topic must be an index in [0, {len(self.topics)}) into {self.topics}, got {topic}")
        rng = random.Random(seed)
        gender = rng.choice("fm")
        slots = PRONOUNS[gender] | {"name": rng.choice(NAMES_F if gender == "f" else NAMES_M), "friend": ""}
        return " ".join(self._render(OPENINGS[1], self.topics[topic], slots, rng))


@lru_cache(maxsize=1)
def vocabulary() -> tuple[tuple[str, ...], Tensor]:
    """Every word the grammar can emit (ids 0 and 1 are SPECIAL and UNK) and each word's topic (-1: generic)."""
    proper = set(NAMES_F + NAMES_M + MONTHS)
    norm = lambda w: w if w in proper else _decapitalise(w)  # noqa: E731 - "The" and "the" are one word here
    literal = lambda text: {w for w in text.replace("/", " ").replace("|", " ").split() if not w.startswith("{")}  # noqa: E731
    fills = {v for p in PRONOUNS.values() for v in p.values()} | proper | set(COLOURS + NUMBERS + POSITIVE + NEGATIVE)
    generic = literal(" ".join(OPENINGS + MIDDLES + TROUBLES + HELPS + RESOLUTIONS + ENDINGS)) | fills
    shared = {norm(w) for w in generic} | FUNCTION_WORDS
    emitted, owner = set(generic), {}
    for topic, table in TOPICS.items():
        words = literal(" ".join(table.values()))
        emitted |= words
        for w in {norm(w) for w in words} - shared:
            if w in owner:
                raise AssertionError(f"word {w!r} is in topics {owner[w]!r} and {topic!r}; topic words must be unique")
            owner[w] = topic
    emitted |= {_capitalise(w) for w in _sentence_starters()}
    words = [SPECIAL, UNK] + sorted(emitted)
    topics = list(TOPICS)
    topic_V = torch.tensor([topics.index(owner[norm(w)]) if norm(w) in owner else -1 for w in words])
    return tuple(words), topic_V


def _sentence_starters() -> set[str]:
    """Words that can open a sentence (they also appear capitalised): walk every template's sentence starts."""
    topic_keys = {k for table in TOPICS.values() for k in table}

    def first_words(slot: str) -> set[str]:
        if slot in ("pro", "obj", "pos", "kid"):
            return {p[slot] for p in PRONOUNS.values()}
        if slot in FILLS:
            return set(FILLS[slot])
        if slot in topic_keys:
            return set().union(*(starts(o) for t in TOPICS for o in _options(t, slot)))
        return set()  # names and months are capitalised already

    def starts(template: str) -> set[str]:
        toks, out = template.split(" "), set()
        for i, w in enumerate(toks):
            # {bad} and {good} are whole sentences, so the word after one starts a sentence too.
            if i == 0 or toks[i - 1] in (".", "{bad}", "{good}"):
                out |= first_words(w[1:-1]) if w.startswith("{") else {w}
        return out

    return set().union(*(starts(t) for t in OPENINGS + MIDDLES + TROUBLES + HELPS + RESOLUTIONS + ENDINGS))


@lru_cache(maxsize=1)
def _concept_table() -> Tensor:
    """Bool [C, V]: which token ids belong to each lexical concept (repeated_name is filled in from context)."""
    words, topic_V = vocabulary()
    sets = {"month": MONTHS, "colour": COLOURS, "number": NUMBERS,
            "name": NAMES_F + NAMES_M, "positive": POSITIVE, "negative": NEGATIVE,
            "pronoun_female": ["she", "her"], "pronoun_male": ["he", "him", "his"],
            "repeated_name": []}  # fmt: skip
    table = torch.zeros(len(CONCEPTS), len(words), dtype=torch.bool)
    for k, c in enumerate(CONCEPTS):
        members = set(sets.get(c, ()))
        table[k] = topic_V >= 0 if c == "topic_word" else torch.tensor([_decapitalise(w) in members or w in members for w in words])
    return table


@lru_cache(maxsize=None)
def _child_table(parent: str) -> Tensor:
    """Long [V]: each token id's child index under `parent` ("She" counts as "she", like _concept_table), else -1."""
    words, index = vocabulary()[0], {w: i for i, w in enumerate(HIERARCHY[parent])}
    return torch.tensor([index.get(w, index.get(_decapitalise(w), -1)) for w in words])


@lru_cache(maxsize=1)
def story_tokenizer():
    """Word-level PreTrainedTokenizerFast over `vocabulary()`; BOS is prepended, decode joins words by spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()[0]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.add_special_tokens([SPECIAL, UNK])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "time," -> "time" ","  (\w+|[^\w\s]+)
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A $B",
                                                       special_tokens=[(SPECIAL, 0)])  # fmt: skip
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
                                   unk_token=UNK, model_max_length=256)  # fmt: skip


def story_windows(seed: int, n_stories: int, n_ctx: int = 128) -> Tensor:
    """Stories of StoryCorpus(seed) packed into one stream (BOS between them) and cut into [N, n_ctx] windows."""
    n_stories, n_ctx = as_int("n_stories", n_stories, 1), as_int("n_ctx", n_ctx, 1)
    corpus = StoryCorpus(seed=seed)
    stream = torch.tensor([t for ids in corpus.encode(corpus.generate(n_stories)) for t in ids[:-1]])
    if len(stream) < n_ctx:
        raise ValueError(f"{n_stories} stories make {len(stream)} tokens, fewer than one window of n_ctx={n_ctx}; "
                         "ask for more stories or a shorter n_ctx")
    return stream[: len(stream) // n_ctx * n_ctx].view(-1, n_ctx)
