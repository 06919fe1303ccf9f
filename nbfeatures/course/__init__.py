"""The course: exercise chapters in the style of ARENA, each with a checker per exercise.

    from nbfeatures.course import ch1_sites as ch1
    ch1.check_read_resid(read_resid)      # prints "1.1 read_resid: passed (...)" or raises CheckFailed
                                          # a stub (raise NotImplementedError) prints "1.1 read_resid: not implemented yet"
    CourseProgress(ch1.chapter)           # nbfeatures.widgets: ticks each exercise whose check passed in this kernel

A checker runs the student's function next to the reference on fixed-seed inputs and edge cases. On a mismatch it
raises `CheckFailed` (an AssertionError) whose message names the known mistake the output matches and its fix
("your pattern has no causal mask: ...: set the scores above the diagonal to -inf before the softmax"), then the
case and where the outputs part (both shapes, or the first differing element). Results go to `REGISTRY`.

Layout: `checking.py` is the machinery (CheckFailed, Mistake, compare, call, register, Chapter, quietly); one module
per chapter, `chN_topic.py` (ch1_sites, then ch2_topk, ch3_codebook, ch4_e2e_bae, ch5_inversion), holds that chapter's
references, mistakes and checkers; `course/masters/0N_topic.py` at the repository root is its notebook, which
`make course` (dev/render_course.py) renders into course/student/ and course/solutions/.

How to add a chapter (say chapter 2, TopK SAEs):
 1. nbfeatures/course/ch2_topk.py: a module docstring with the math and the dimension key, then
        from .checking import CheckFailed, Mistake, call, compare, quietly, register
        chapter = register("ch2_topk", "TopK sparse autoencoders")
    Import the library from below (`..sae`, `..zoo`, `..sites` ...); never `nbfeatures.course` itself (a cycle), never
    widgets. Load a shipped model once and quietly (its progress bar must not print inside a check cell):
        @functools.lru_cache(maxsize=1)
        def stories(): with quietly(): return zoo.load_model("stories")
 2. Per exercise a reference `ref_<name>` (best: the library's own answer), a list of Mistakes and a checker:
        TOPK_MISTAKES = [Mistake("your TopK keeps negative pre-activations", "apply ReLU after topk",
                                 lambda x, k: x.topk(k).values), ...]       # same arguments as the reference
        @chapter.exercise("2.1", "topk_activation", goal="keep the k largest pre-activations", difficulty=1, minutes=10)
        def check_topk_activation(topk_activation):
            for case, x, k in [("random [4, 16], k=3", ...), ("k = d_sae", ...), ("ties", ...)]:   # fixed seeds, edge cases
                got = call(topk_activation, x.clone(), k, case=case)        # always call the student through `call`
                compare(got, ref_topk_activation(x, k), case=case, args=(x, k), mistakes=TOPK_MISTAKES)
            return "matches on 3 inputs"                                    # the detail of the one-line success
    `compare` computes `Mistake.wrong(*args)` only when the student's output is wrong, and names the first mistake it
    matches. A diagnostic that is not an output (a hook left registered, a parameter never updated) is a Mistake
    without `wrong`, raised by the checker itself: `raise MISTAKE.failed(f"on {case}: ...")`. The exercise is always a
    function the student writes (for a value: `def answer(): ...`), so that a stub's NotImplementedError is raised
    inside the check, which prints `2.1 topk_activation: not implemented yet`. A chapter's checks take seconds on CPU.
 3. course/masters/02_topk.py, jupytext percent (copy 01_sites.py): a `# Title` and `> subtitle` cell; an import cell
    of at most 6 imports, `from nbfeatures.course import ch2_topk as ch2` among them, ending in
    `CourseProgress(ch2.chapter)`; then per exercise, in the chapter's order:
        # %% [markdown]                  "## 2.1 Title", "> **Goal:** one line", "**Difficulty** ●○○ · **about 10 minutes**"
                                         (the registered difficulty and minutes), then what the student needs to know
        # %% tags=["stub"]              def topk_activation(...): one-line docstring; raise NotImplementedError
        # %% [markdown] tags=["hint"]   the hint (folded in <details>)
        # %% tags=["solution"]          the same function solved (the student render shows it folded in <details>)
        # %% tags=["check"]             ch2.check_topk_activation(topk_activation)      -- that call alone
        # %% (optional)                 the expected picture, drawn by the library or a chapter helper, never by the
                                        student's function: the student render must run top to bottom
    and a last cell asserting what the chapter showed, true in both renders.
 4. `make course` writes course/student/02_topk.ipynb and course/solutions/02_topk.ipynb; commit them with the master.
 5. tests/test_course.py: per checker, the master's solution passes, at least two planted wrong implementations fail
    naming their mistake, a stub prints exactly its one line (copy the ch1 tests). tests/test_course_render.py finds the
    new master by itself: it fails on a stale render, checks headings against the registry, and runs both renders.
"""

from .checking import NOT_IMPLEMENTED, REGISTRY, STATUSES, Chapter, CheckFailed, Exercise, Mistake, call, compare, difference, quietly, register

__all__ = ["CheckFailed", "Mistake", "Chapter", "Exercise", "REGISTRY", "STATUSES", "NOT_IMPLEMENTED", "register", "compare",
           "difference", "call", "quietly"]  # fmt: skip
