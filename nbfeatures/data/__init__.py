"""Synthetic corpora with ground truth (TokFSM, Stories, character counting) and datasets glue; torch-only, no nnsight."""

from .counting import Counting, count_accuracy
from .hf import stories_dataset, token_dataset, tokfsm_dataset
from .stories import Story, StoryCorpus, story_tokenizer, story_windows
from .tokfsm import TokFSM, as_logits_fn, first_transition_accuracy, transition_accuracy

__all__ = [
    "TokFSM",
    "transition_accuracy",
    "first_transition_accuracy",
    "as_logits_fn",
    "StoryCorpus",
    "Story",
    "story_tokenizer",
    "story_windows",
    "stories_dataset",
    "tokfsm_dataset",
    "token_dataset",
    "Counting",
    "count_accuracy",
]
