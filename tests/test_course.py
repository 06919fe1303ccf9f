"""The course's checkers: the reference passes, planted wrong implementations fail naming their mistake, a stub prints
one line; the machinery's messages (shapes, first difference, named mistakes); the progress registry and its panel.

The reference implementations are the solution cells of course/masters/01_sites.py, executed here, so the tests
check the checkers against the very code the solutions notebook runs.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import nbfeatures as nbf
from nbfeatures import course
from nbfeatures.course import NOT_IMPLEMENTED, CheckFailed, Mistake, compare, register
from nbfeatures.course import ch1_sites as ch1
from nbfeatures.widgets import CourseProgress

from nbfeatures.course.checking import student_hooks
from course_support import fails, master_solutions, named, passes_and_stub_says_so, stub


@pytest.fixture(scope="module")
def sol():
    """The master's solution functions: read_resid, attention_pattern, head_pattern, steered_logits, topic_logprob_shift."""
    return master_solutions("01_sites")


def block(model, layer):
    return nbf.unwrap(model).transformer.h[layer]


def hooked_run(model, layer, hook, ids, pre=False):
    """Run the torch module with `hook` on block `layer` (removed afterwards); the planted implementations share it."""
    b = block(model, layer)
    handle = b.register_forward_pre_hook(hook) if pre else b.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return nbf.unwrap(model)(ids)
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- the machinery


def test_check_failed_is_an_assertion_error_and_compare_passes_close_values():
    assert issubclass(CheckFailed, AssertionError)
    compare(torch.ones(2, 3) + 1e-7, torch.ones(2, 3), case="ones")
    compare(torch.ones(2, 3).numpy(), torch.ones(2, 3), case="a numpy array is fine")


def test_compare_states_both_shapes_and_the_first_differing_element():
    with pytest.raises(CheckFailed) as info:
        compare(torch.zeros(3, 2), torch.zeros(2, 3), case="a transpose")
    assert "your output has shape [3, 2], the reference [2, 3]" in str(info.value) and "another order" in str(info.value)
    want = torch.arange(12.0).reshape(3, 4)
    got = want.clone()
    got[1, 2], got[2, 0] = -1.0, 99.0
    with pytest.raises(CheckFailed) as info:
        compare(got, want, case="two changed")
    msg = str(info.value)
    assert "on two changed" in msg and "first difference at [1, 2]: yours -1, the reference 6" in msg and "2 of 12" in msg
    assert info.value.mistake is None


def test_compare_names_the_mistake_the_output_matches_and_only_that_one():
    relu = Mistake("your TopK keeps negative pre-activations", "apply ReLU after topk", lambda x: x)
    double = Mistake("you doubled it", "don't", lambda x: 2 * x)
    x = torch.tensor([-1.0, 2.0])
    with pytest.raises(CheckFailed) as info:
        compare(x, x.relu(), case="x", args=(x,), mistakes=[double, relu])
    assert info.value.mistake is relu and str(info.value).startswith("your TopK keeps negative pre-activations: apply ReLU after topk")
    same = Mistake("a mistake that gives the right answer here", "-", lambda x: x.relu())
    with pytest.raises(CheckFailed) as info:
        compare(3 * x, x.relu(), case="x", args=(x,), mistakes=[same, double])
    assert info.value.mistake is None  # neither matches 3x; one equal to the reference is never named


def test_compare_reports_a_wrong_type_in_the_students_terms():
    with pytest.raises(CheckFailed, match="a tuple of 2 tensors"):
        compare((torch.ones(2), torch.ones(2)), torch.ones(2), case="c")
    with pytest.raises(CheckFailed, match="expected a torch.Tensor of shape \\[2\\]"):
        compare({"a": 1}, torch.ones(2), case="c")


@pytest.fixture
def toy():
    """A throwaway chapter with one exercise (`double`), removed from the registry afterwards."""
    chapter = register("test_toy", "Toy")

    @chapter.exercise("0.1", "double", goal="double a tensor", difficulty=1, minutes=1)
    def check_double(double):
        x = torch.arange(4.0)
        compare(course.call(double, x, case="arange(4)"), 2 * x, case="arange(4)", args=(x,),
                mistakes=[Mistake("you squared it", "multiply by 2", lambda x: x * x)])  # fmt: skip
        return "on 1 input"

    yield chapter, check_double
    course.REGISTRY.pop("test_toy")


def test_a_stub_prints_one_line_and_records_not_implemented(toy, capsys):
    chapter, check = toy
    assert check(stub) is None
    assert capsys.readouterr().out == NOT_IMPLEMENTED.format(label="0.1 double") + "\n" == "0.1 double: not implemented yet\n"
    assert chapter() == [("0.1 double: double a tensor", "not implemented")]


def test_pass_fail_and_the_students_own_errors(toy, capsys):
    chapter, check = toy
    check(lambda x: x + x)
    assert capsys.readouterr().out == "0.1 double: passed (on 1 input)\n" and chapter.passed() == {"0.1 double": True}
    err = fails(check, lambda x: x * x)
    assert str(err).startswith("0.1 double: you squared it: multiply by 2") and err.exercise is chapter.exercises["0.1"]
    assert chapter()[0][1] == "failed"
    err = fails(check, lambda x: x.reshape(3, 7))  # the student's own error: reported as theirs, with its cause
    assert str(err).startswith("0.1 double: your double raised RuntimeError on arange(4):") and isinstance(err.__cause__, RuntimeError)
    err = fails(check, 2.0)
    assert "pass the function itself" in str(err)


def test_a_not_implemented_error_from_inside_a_library_is_an_error_not_a_stub(toy, capsys):
    _, check = toy

    def from_library(x):
        return torch.nn.Module()(x)  # a module without forward: torch raises NotImplementedError from its own code

    err = fails(check, from_library)
    assert "raised NotImplementedError" in str(err)
    assert "not implemented yet" not in capsys.readouterr().out


def test_the_registry_keeps_results_when_a_chapter_module_is_imported_again(sol, capsys):
    ch1.check_attention_pattern(sol["attention_pattern"])
    assert ch1.chapter.exercises["1.2"].status == "passed"
    again = importlib.reload(ch1)  # what re-running an import cell after editing the chapter would do
    assert again.chapter is course.REGISTRY["ch1_sites"] and again.chapter.exercises["1.2"].status == "passed"
    assert [label for label, _ in again.chapter()][:2] == ["1.1 read_resid: read the residual stream after a block with a raw torch hook",
                                                           "1.2 attention_pattern: compute attention probabilities from queries and keys"]  # fmt: skip


# ----------------------------------------------------------------------------- chapter 1: every checker


@pytest.mark.parametrize("name", ["read_resid", "attention_pattern", "head_pattern", "steered_logits", "topic_logprob_shift"])
def test_ch1_reference_passes_and_stub_prints_the_one_line(sol, name, capsys):
    passes_and_stub_says_so(getattr(ch1, f"check_{name}"), sol[name], capsys)


def test_ch1_read_resid_names_its_mistakes():
    def block_input(model, ids, layer):
        seen = {}
        hooked_run(model, layer, lambda m, inputs: seen.update(x=inputs[0]), ids, pre=True)  # a hook returning None
        return seen["x"]

    def first_element(model, ids, layer):  # transformers < 5 habit: output[0] of a tensor is the first sequence
        seen = {}
        hooked_run(model, layer, lambda m, i, o: seen.update(x=o[0]), ids)
        return seen["x"]

    def last_hidden_state(model, ids, layer):
        out = nbf.unwrap(model)(ids, output_hidden_states=True).hidden_states
        return out[layer + 1] if layer + 1 < len(out) - 1 else out[-1]  # hidden_states[-1] is after ln_f

    def leaky(model, ids, layer):
        seen = {}
        block(model, layer).register_forward_hook(lambda m, i, o: seen.update(x=o))
        nbf.unwrap(model)(ids)
        return seen["x"]

    named(ch1.check_read_resid, block_input, "block's input")
    named(ch1.check_read_resid, first_element, "output[0]")
    named(ch1.check_read_resid, last_hidden_state, "final LayerNorm")
    named(ch1.check_read_resid, leaky, "still registered")
    assert student_hooks(ch1.stories()) == {}  # the leaked hook was removed (transformers keeps hooks of its own)
    named(ch1.check_read_resid, lambda model, ids, layer: ch1.ref_read_resid(model, ids, layer)[:, -1], "last position")


def test_ch1_attention_pattern_names_its_mistakes(sol):
    good = sol["attention_pattern"]

    def scores(q, k):
        return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5

    def future(q):
        return torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).triu(1)

    named(ch1.check_attention_pattern, lambda q, k: scores(q, k).softmax(-1), "no causal mask")
    named(ch1.check_attention_pattern, lambda q, k: scores(q, k).masked_fill(future(q), 0.0).softmax(-1), "filled the masked scores with 0")
    named(ch1.check_attention_pattern, lambda q, k: good(q, k).transpose(-1, -2), "transposed")
    named(ch1.check_attention_pattern, lambda q, k: good(q * q.shape[-1] ** 0.5, k), "not scaled")
    named(ch1.check_attention_pattern, lambda q, k: scores(q, k).masked_fill(future(q), float("-inf")).softmax(-2), "over the queries")
    named(ch1.check_attention_pattern, lambda q, k: scores(q, k).softmax(-1) * ~future(q), "after the softmax")

    def naive(q, k):
        e = scores(q, k).masked_fill(future(q), float("-inf")).exp()
        return e / e.sum(-1, keepdim=True)

    err = named(ch1.check_attention_pattern, naive, "overflows")
    assert "large scores" in str(err)  # passes the ordinary cases, caught on the edge case
    err = fails(ch1.check_attention_pattern, lambda q, k: good(q, k)[0])
    assert err.mistake is None and "your output has shape [4, 6, 6], the reference [2, 4, 6, 6]" in str(err)


def test_ch1_head_pattern_names_its_mistakes():
    def pattern(model, ids, layer, head, *, order=(0, 1), split="HE", every_head=False):
        site = f"transformer.h.{layer}.attn.c_attn"
        qkv = nbf.read_acts(model, ids, site)[site].chunk(3, dim=-1)
        if split == "HE":
            q, k = (qkv[i].unflatten(-1, (4, -1)).transpose(1, 2) for i in order)
        else:
            q, k = (qkv[i].unflatten(-1, (-1, 4)).permute(0, 3, 1, 2) for i in order)
        out = ch1.ref_attention_pattern(q, k)
        return out if every_head else out[:, head]

    ch1.check_head_pattern(pattern)
    named(ch1.check_head_pattern, lambda *a: pattern(*a, order=(1, 0)), "swapped queries and keys")
    named(ch1.check_head_pattern, lambda *a: pattern(*a, order=(0, 2)), "values as keys")
    named(ch1.check_head_pattern, lambda *a: pattern(*a, split="EH"), "split the heads")
    named(ch1.check_head_pattern, lambda *a: pattern(*a, every_head=True), "every head")


def test_ch1_steered_logits_names_its_mistakes():
    def steer(where=slice(-1, None), unit=False, use_coef=True, in_place_copy=False, pre=False, leak=False):
        def fn(model, ids, layer, direction, coef):
            d = direction / direction.norm() if unit else direction
            c = coef if use_coef else 1.0

            def hook(module, *args):
                h = args[0][0] if pre else args[-1]
                h = h.clone()
                h[:, where] += c * d
                if in_place_copy:  # rebinds a local name: the model never sees it
                    return None
                return (h, *args[0][1:]) if pre else h

            if leak:
                block(model, layer).register_forward_hook(hook)
                return nbf.unwrap(model)(ids).logits
            return hooked_run(model, layer, hook, ids, pre=pre).logits

        return fn

    ch1.check_steered_logits(steer())
    named(ch1.check_steered_logits, steer(where=slice(None)), "every position")
    named(ch1.check_steered_logits, steer(where=slice(0, 1)), "first position")
    named(ch1.check_steered_logits, steer(unit=True), "normalised the direction")
    named(ch1.check_steered_logits, steer(use_coef=False), "left out coef")
    named(ch1.check_steered_logits, steer(in_place_copy=True), "never reached the model")
    named(ch1.check_steered_logits, steer(pre=True), "block's input")
    named(ch1.check_steered_logits, steer(leak=True), "still registered")
    assert student_hooks(ch1.stories()) == {}


def test_ch1_topic_logprob_shift_names_its_mistakes(sol):
    steered = sol["steered_logits"]

    def shift(how):
        def fn(model, ids, layer, direction, coef, words):
            s, c = steered(model, ids, layer, direction, coef)[:, -1], steered(model, ids, layer, direction, 0.0)[:, -1]
            if how == "logits":
                return s[:, words].logsumexp(-1) - c[:, words].logsumexp(-1)
            s, c = s.log_softmax(-1)[:, words], c.log_softmax(-1)[:, words]
            if how == "sum":
                return s.sum(-1) - c.sum(-1)
            right = s.logsumexp(-1) - c.logsumexp(-1)
            return {"reversed": -right, "mean over prompts": right.mean()}[how]

        return fn

    named(ch1.check_topic_logprob_shift, shift("sum"), "summed the words' log-probabilities")
    named(ch1.check_topic_logprob_shift, shift("logits"), "raw logits")
    named(ch1.check_topic_logprob_shift, shift("reversed"), "sign is reversed")
    named(ch1.check_topic_logprob_shift, shift("mean over prompts"), "averaged over the prompts")

    def every_position(model, ids, layer, direction, coef, words):
        return torch.zeros(ids.shape)

    err = fails(ch1.check_topic_logprob_shift, every_position)
    assert err.mistake is ch1.EVERY_POSITION and "shape [1, 11], expected [1]" in str(err)


def test_ch1_expected_picture_from_the_reference_and_from_a_student_function(sol):
    ref = ch1.topic_shift_figure(coefs=(0, 8))
    mine = ch1.topic_shift_figure(sol["topic_logprob_shift"], coefs=(0, 8))
    for a, b in zip(ref.data, mine.data):
        assert a.name == b.name and a.y[0] == 0 and a.y[1] == pytest.approx(b.y[1], abs=1e-4)
    y = {t.name: t.y[1] for t in ref.data}
    assert y["dragon words"] > 4 and y["ocean words"] < -4  # steering along 'dragon' moves the topic, as the notebook says


# ----------------------------------------------------------------------------- the progress panel, headless


def test_course_progress_draws_plain_rows():
    rows = [("1.1 a", True), ("1.2 b", "failed"), ("1.3 c", None), ("1.4 d", "not implemented")]
    panel = CourseProgress(lambda: rows, title="Toy")
    assert panel.rows == [("1.1 a", "passed"), ("1.2 b", "failed"), ("1.3 c", "not tried"), ("1.4 d", "not implemented")]
    assert panel.passed == ["1.1 a"] and "<b>Toy</b>: 1 of 4 passed" == panel.summary.value
    assert [panel.table.value.count(mark) for mark in "✓✗○…"] == [1, 1, 1, 1]
    rows[2] = ("1.3 c", "passed")
    panel.refresh_button.click()
    assert panel.passed == ["1.1 a", "1.3 c"] and "2 of 4" in panel.summary.value
    with pytest.raises(ValueError, match="one of"):
        CourseProgress(lambda: [("x", "done")])
    with pytest.raises(TypeError, match="callable"):
        CourseProgress([("x", True)])


def test_course_progress_follows_a_chapter_and_survives_a_rerun(toy, capsys):
    chapter, check = toy
    panel = CourseProgress(chapter)
    assert panel.title == "Toy" and panel.rows == [("0.1 double: double a tensor", "not tried")]
    check(stub)
    assert panel.rows[0][1] == "not implemented" and "…" in panel.table.value  # redrawn by the chapter, no refresh call
    check(lambda x: 2 * x)
    assert panel.passed == ["0.1 double: double a tensor"] and "1 of 1 passed" in panel.summary.value
    again = CourseProgress(chapter)  # the panel's cell run again: the ticks come from the registry
    assert again.rows == panel.rows
    panel.close()
    fails(check, lambda x: x * x)
    assert again.rows[0][1] == "failed" and panel.rows[0][1] == "passed"  # a closed panel is no longer redrawn
    assert len(chapter._listeners) == 1
