"""TokFSM: invariants of the machine, its tokenizer, and the two metrics on models whose scores are known."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from nbfeatures.data import TokFSM, first_transition_accuracy, tokfsm_dataset, transition_accuracy

FSM = TokFSM()


def oracle(ids_BT: torch.Tensor) -> torch.Tensor:
    """The perfect model: at every position, uniform mass over the tokens a valid continuation allows."""
    B, T = ids_BT.shape
    logits_BTV = torch.full((B, T, FSM.vocab_size), -1e9)
    for b in range(B):
        for t in range(T):
            # Position t has read t digits after BOS; an even count means a whole state was just completed.
            if t < 2:
                logits_BTV[b, t, :10] = 0.0
            elif t % 2 == 0:
                state = int(ids_BT[b, t - 1]) * 10 + int(ids_BT[b, t])
                first, counts = np.unique(FSM.edges[state] // 10, return_counts=True)
                logits_BTV[b, t, first] = torch.tensor(np.log(counts), dtype=torch.float)  # p(d1) = #edges / 10
            else:
                state, d1 = int(ids_BT[b, t - 2]) * 10 + int(ids_BT[b, t - 1]), int(ids_BT[b, t])
                logits_BTV[b, t, [e % 10 for e in FSM.edges[state] if e // 10 == d1]] = 0.0
    return logits_BTV


def test_edges_are_distinct_per_state_and_seeded():
    assert FSM.edges.shape == (100, 10)
    assert all(len(set(row)) == 10 for row in FSM.edges.tolist())
    assert FSM.adjacency.sum(1).tolist() == [10] * 100
    assert (TokFSM(seed=42).edges == FSM.edges).all()
    assert not (TokFSM(seed=7).edges == FSM.edges).all()


def test_sample_shape_bos_and_valid_trajectories():
    ids_BT = FSM.sample(32, seed=3)
    assert ids_BT.shape == (32, 128) and ids_BT.dtype == torch.long
    assert (ids_BT[:, 0] == FSM.special_id).all() and (ids_BT[:, 1:] < 10).all()
    states = FSM.decode(ids_BT)
    assert states.shape == (32, 63)  # BOS + 127 digits = 63 whole states (+ one leftover digit)
    assert FSM.is_valid(states[:, :-1], states[:, 1:]).all()
    assert torch.equal(ids_BT, FSM.sample(32, seed=3))
    assert not torch.equal(ids_BT, FSM.sample(32, seed=4))


def test_encode_decode_round_trip_and_zero_padding():
    states = torch.tensor([[8, 0, 99, 42]])
    assert FSM.encode(states).tolist() == [[0, 8, 0, 0, 9, 9, 4, 2]]
    assert torch.equal(FSM.decode(FSM.encode(states)), states)
    assert FSM.decode([FSM.special_id, 1, 2, 3]).tolist() == [12]  # leading BOS dropped, odd digit ignored
    assert FSM.decode([1, FSM.special_id]).tolist() == [-1]  # a state holding a non-digit is invalid
    with pytest.raises(ValueError, match="states must be in"):
        FSM.encode([100])


def test_is_valid_matches_edges():
    a = 17
    valid = set(FSM.edges[a].tolist())
    invalid = next(b for b in range(100) if b not in valid)
    assert FSM.is_valid(a, FSM.edges[a][0]) is True
    assert FSM.is_valid(a, invalid) is False
    assert FSM.is_valid(-1, 3) is False and FSM.is_valid(3, 100) is False


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_edges must be in"):
        TokFSM(n_edges=0)
    with pytest.raises(ValueError, match="n_states"):
        TokFSM(n_states=1)


def test_tokenizer_round_trips_through_autotokenizer(tmp_path):
    FSM.tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == FSM.special_id
    ids = tok("0512")["input_ids"]
    assert ids == [FSM.special_id, 0, 5, 1, 2]  # BOS is prepended, one token per digit
    assert tok.decode(ids, skip_special_tokens=True) == "0512"
    row = FSM.sample(1, seed=0)[0]
    assert tok(FSM.text(row), add_special_tokens=False)["input_ids"] == row.tolist()


def test_oracle_scores_perfectly():
    assert first_transition_accuracy(oracle) == 1.0
    assert transition_accuracy(oracle, n=8, new_states=4) == 1.0


def test_random_logits_score_chance_on_first_transition():
    gen = torch.Generator().manual_seed(0)
    # Random logits make the top-10 a random set of 10 states: expected overlap 10/100 (sd ~0.009 over 100 states).
    acc = first_transition_accuracy(lambda ids: torch.randn(*ids.shape, 11, generator=gen))
    assert abs(acc - 0.10) < 0.04


def test_uniform_model_scores_chance_on_transitions():
    # Uniform over 11 tokens: a state is all digits with q = (10/11)^2, then valid with 1/10. The first
    # transition leaves a real state (q * 0.1), later ones need both ends to be real states (q^2 * 0.1).
    q, m = (10 / 11) ** 2, 8
    expected = 0.1 * q * (1 + (m - 1) * q) / m
    acc = transition_accuracy(lambda ids: torch.zeros(*ids.shape, 11), n=400, new_states=m, seed=1)
    assert abs(acc - expected) < 0.015  # 3200 transitions: sd ~0.005


def test_metrics_accept_a_module_and_an_nnsight_like_wrapper():
    class Table(torch.nn.Module):  # a module returning raw logits, wrapped the way nnsight stores it
        def forward(self, ids):
            return oracle(ids)

    class Wrapper:
        _module = Table()

    assert first_transition_accuracy(Table()) == 1.0
    assert first_transition_accuracy(Wrapper()) == 1.0
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        first_transition_accuracy(42)


def test_dataset_view():
    ds = tokfsm_dataset(5, seed=2)
    assert ds.column_names == ["input_ids", "states"]
    assert ds[0]["input_ids"] == FSM.sample(5, seed=2)[0].tolist()
    assert FSM.decode(ds[0]["input_ids"]).tolist() == ds[0]["states"][:63]
