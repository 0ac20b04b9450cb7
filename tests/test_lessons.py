"""The lessons: every notebook in lessons/ runs top to bottom as a student receives it, and runs again with the
exercise solutions filled in, where every exercise's check must pass.

How an exercise is wired (lessons/README.md, "How lessons are built", says it for authors):
- its stub cell is tagged `exercise:<name>` and defines something that raises NotImplementedError until written;
- a later cell checks it inside `with exercise("<name>"):` (minimoe.testing.exercise): an unfilled stub prints
  "<name>: not done yet", a wrong answer raises, a right one prints "<name>: passed";
- lessons/solutions/<lesson>.py has one `# %% exercise: <name>` section per stub.
The solutions run swaps each stub's source for its section and sets MINIMOE_LESSON_STRICT=1, so that there an
unfilled stub fails as well.

Each lesson's run time is printed (visible with -s), listed in a "lesson run times" section at the end of the
pytest report, and written to lesson_times.json in pytest's base temporary directory.
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import minimoe
from minimoe.testing import STRICT_ENV, ExerciseNotDone, check_close, check_shape, exercise

pytestmark = pytest.mark.lessons

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / "lessons"
SOLUTIONS = LESSONS / "solutions"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))
# a hang guard, not a speed test: a busy machine may be 5x slower than a quiet one
CELL_TIMEOUT = int(os.environ.get("MINIMOE_CELL_TIMEOUT", "600"))
KERNEL_NAME = "minimoe-lessons"
REQUIRED_MARKDOWN = ["## Objectives", "**Prerequisites:**", "**Where the code lives:**", "## Summary", "## Exercises"]
SOLUTION_MARKER = re.compile(r"^# %% exercise: (\S+)\s*$", re.MULTILINE)
QUESTION_MARKER = re.compile(r"\*\*Question (\d+)\.\*\*")  # how a written question is labelled, in lesson and guide
INSTRUCTOR_GUIDE = LESSONS / "instructor" / "README.md"


# --------------------------------------------------------------------------------------------------------------
# reading notebooks, their exercises and their solutions
# --------------------------------------------------------------------------------------------------------------

def read_notebook(path):
    return nbformat.read(path, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def exercise_name(cell):
    """The name in the cell's `exercise:<name>` tag, or None for an ordinary cell."""
    names = [tag.partition(":")[2] for tag in cell.metadata.get("tags", []) if tag.startswith("exercise:")]
    assert len(names) <= 1, f"a cell has more than one exercise tag: {names}"
    return names[0] if names else None


def exercise_names(notebook):
    return [name for name in map(exercise_name, notebook.cells) if name]


def read_solutions(lesson, directory=SOLUTIONS):
    """{exercise name: source} from lessons/solutions/<lesson>.py ({} when the file does not exist)."""
    path = directory / f"{lesson}.py"
    if not path.exists():
        return {}
    text = path.read_text()
    markers = list(SOLUTION_MARKER.finditer(text))
    ends = [m.start() for m in markers[1:]] + [len(text)]
    solutions = {}
    for marker, end in zip(markers, ends):
        name = marker.group(1)
        assert name not in solutions, f"{path.name}: exercise {name!r} is solved twice"
        solutions[name] = text[marker.end():end].strip("\n")
    return solutions


def with_solutions(notebook, solutions):
    """A copy of the notebook with each exercise stub's source replaced by its solution."""
    solved = nbformat.from_dict(json.loads(json.dumps(notebook)))
    for cell in solved.cells:
        name = exercise_name(cell)
        if name:
            cell.source = solutions[name]
    return solved


def printed(notebook):
    """Everything the notebook's code cells wrote to stdout, as one string."""
    return "".join(output.get("text", "") for cell in code_cells(notebook) for output in cell.get("outputs", [])
                   if output.output_type == "stream" and output.name == "stdout")


# --------------------------------------------------------------------------------------------------------------
# running notebooks
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kernel_specs(tmp_path_factory):
    """A kernel spec that runs the Python running these tests (with ipykernel from the same environment), in a
    directory of its own, so that no `python3` kernel installed elsewhere on the machine is picked by mistake."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL_NAME)
    return KernelSpecManager(kernel_dirs=[str(kernels)])


class LessonTimes:
    """Collects each run's seconds, writes them to a JSON file, and lists them at the end of the pytest report."""

    def __init__(self, path):
        self.path, self.seconds = path, {}

    def add(self, lesson, run, seconds):
        self.seconds.setdefault(lesson, {})[run] = round(seconds, 2)
        self.path.write_text(json.dumps(self.seconds, indent=1, sort_keys=True))
        print(f"\n{lesson} ({run}): {seconds:.1f} s")

    def pytest_terminal_summary(self, terminalreporter):
        if not self.seconds:
            return
        terminalreporter.section("lesson run times")
        for lesson in sorted(self.seconds):
            runs = ", ".join(f"{run} {seconds:.1f} s" for run, seconds in sorted(self.seconds[lesson].items()))
            terminalreporter.write_line(f"{lesson}: {runs}")
        terminalreporter.write_line(f"(also in {self.path})")


@pytest.fixture(scope="session")
def lesson_times(request, tmp_path_factory):
    times = LessonTimes(tmp_path_factory.getbasetemp() / "lesson_times.json")
    request.config.pluginmanager.register(times, "minimoe-lesson-times")
    return times


def run_notebook(notebook, kernel_specs, strict):
    """Execute every cell in a fresh kernel, in lessons/, with default lesson settings; return the executed
    notebook and the seconds it took (kernel start included)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MINIMOE_BACKEND", "MINIMOE_LESSON_SCALE", STRICT_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # minimoe, installed or not
    if strict:
        env[STRICT_ENV] = "1"
    kernel = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs)
    client = NotebookClient(notebook, km=kernel, timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(LESSONS)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no start-up chatter in -s output
    start = time.perf_counter()
    client.execute(env=env, cleanup_kc=True)  # cleanup_kc: shut the kernel down afterwards
    return notebook, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------------------

lessons = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])


def test_there_are_lessons():
    assert NOTEBOOKS, f"no lesson notebooks found in {LESSONS}"


def test_kernel_is_this_python(kernel_specs):
    assert kernel_specs.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable


@lessons
def test_lesson_is_clean_and_complete(path):
    notebook = read_notebook(path)
    nbformat.validate(notebook)
    for i, cell in enumerate(code_cells(notebook)):
        assert not cell.outputs and cell.execution_count is None, \
            f"{path.name}: code cell {i} was committed with outputs or an execution count; clear them"
        assert not re.search(r"^\s*[!%]", cell.source, re.MULTILINE), \
            f"{path.name}: code cell {i} runs a shell or magic command (`!pip`, `%pip`, ...); lessons install nothing"

    markdown = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith(f"# {path.stem[:2]} · "), \
        f"{path.name}: the first cell must be the title, '# {path.stem[:2]} · <title>'"
    positions = [markdown.find(heading) for heading in REQUIRED_MARKDOWN]
    missing = [heading for heading, at in zip(REQUIRED_MARKDOWN, positions) if at < 0]
    assert not missing, f"{path.name}: missing {missing}"
    assert positions == sorted(positions), f"{path.name}: the sections must come in the order {REQUIRED_MARKDOWN}"

    code = "\n".join(cell.source for cell in code_cells(notebook))
    config = code_cells(notebook)[0].source
    assert re.search(r"^SCALE = minimoe\.lesson\.setup\(", config, re.MULTILINE), \
        f"{path.name}: the configuration cell (the first code cell) must set `SCALE = minimoe.lesson.setup()`, " \
        "which seeds, pins BLAS to one thread and reads MINIMOE_LESSON_SCALE"
    assert "import minimoe" in code, f"{path.name}: a lesson imports the library it teaches"
    assert "plt." in code, f"{path.name}: a lesson draws at least one plot"
    assert not re.search(r"\b(urllib|urlopen|requests|wget|curl)\b", code), f"{path.name}: lessons download nothing"


@lessons
def test_every_exercise_has_a_check_and_a_solution(path):
    notebook = read_notebook(path)
    names = exercise_names(notebook)
    assert names, f"{path.name}: a lesson has at least one exercise stub (a code cell tagged exercise:<name>)"
    assert len(set(names)) == len(names), f"{path.name}: exercise names repeat: {names}"
    for name in names:
        stub = next(i for i, cell in enumerate(notebook.cells) if exercise_name(cell) == name)
        assert "NotImplementedError" in notebook.cells[stub].source, \
            f"{path.name}: the stub of {name!r} must raise NotImplementedError until the student writes it"
        assert any(f'exercise("{name}")' in cell.source for cell in notebook.cells[stub + 1:]
                   if cell.cell_type == "code"), f"{path.name}: no `with exercise(\"{name}\"):` check after the stub"
    solutions = read_solutions(path.stem)
    assert sorted(solutions) == sorted(names), \
        f"solutions/{path.stem}.py solves {sorted(solutions)}, the notebook's exercises are {sorted(names)}"


@lessons
def test_lesson_runs_as_the_student_gets_it(path, kernel_specs, lesson_times):
    notebook, seconds = run_notebook(read_notebook(path), kernel_specs, strict=False)
    lesson_times.add(path.stem, "as given", seconds)
    output = printed(notebook)
    for name in exercise_names(notebook):
        assert f"{name}: not done yet" in output, f"{path.name}: the unfilled stub of {name!r} did not say so"


@lessons
def test_exercise_solutions_pass_the_lesson_checks(path, kernel_specs, lesson_times):
    notebook = read_notebook(path)
    solved, seconds = run_notebook(with_solutions(notebook, read_solutions(path.stem)), kernel_specs, strict=True)
    lesson_times.add(path.stem, "solved", seconds)
    output = printed(solved)
    for name in exercise_names(notebook):
        assert f"{name}: passed" in output, f"{path.name}: the solution of {name!r} did not pass its check"


def test_a_wrong_solution_fails_its_check_in_the_notebook(kernel_specs):
    """The checks fire inside a notebook: a one_hot of the right shape and backend but the wrong values stops
    the strict run at its check cell."""
    path = LESSONS / "00_backends.ipynb"
    solutions = read_solutions(path.stem)
    solutions["one_hot"] = (
        "def one_hot(ids, num_classes):\n"
        "    xp = minimoe.get_array_module(ids)\n"
        "    return xp.zeros(ids.shape + (num_classes,), dtype=xp.float32)\n")
    with pytest.raises(CellExecutionError, match="one_hot on numpy: mismatch"):
        run_notebook(with_solutions(read_notebook(path), solutions), kernel_specs, strict=True)


def test_check_helpers_raise_on_wrong_input(capsys):
    check_close([1.0, 2.0], [1.0, 2.0 + 1e-12], name="near")
    with pytest.raises(AssertionError, match="wrong: mismatch at index"):
        check_close([1.0, 2.0], [1.0, 2.1], name="wrong")
    with pytest.raises(AssertionError, match="differs from the expected"):
        check_close([1.0, 2.0], [[1.0, 2.0]])
    check_shape(minimoe.zeros(2, 3), (2, 3))
    with pytest.raises(AssertionError, match=r"shape \(2, 3\), expected \(3, 2\)"):
        check_shape(minimoe.zeros(2, 3), (3, 2))
    assert "MISMATCH" in capsys.readouterr().out


def test_exercise_reports_unfilled_stubs_and_raises_on_wrong_answers(monkeypatch, capsys):
    def stub():
        raise NotImplementedError("your code here")

    monkeypatch.delenv(STRICT_ENV, raising=False)
    with exercise("stub"):
        stub()
    with exercise("right"):
        check_close([1.0], [1.0])
    with pytest.raises(AssertionError, match="mismatch"):
        with exercise("wrong"):
            check_close([1.0], [2.0])
    output = capsys.readouterr().out
    assert "stub: not done yet" in output and "right: passed" in output and "wrong: passed" not in output

    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(ExerciseNotDone, match="'stub' is not done"):
        with exercise("stub"):
            stub()


def test_solution_files_parse(tmp_path):
    (tmp_path / "99_demo.py").write_text('"""header"""\n\n# %% exercise: a\nx = 1\n\n\n# %% exercise: b\ny = 2\n')
    assert read_solutions("99_demo", tmp_path) == {"a": "x = 1", "b": "y = 2"}


def test_lesson_files_are_small():
    """Lessons carry no big data: only notebooks without outputs and small files written for them."""
    for path in LESSONS.rglob("*"):
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in path.parts):
            assert path.stat().st_size <= 3 << 19, f"{path} is {path.stat().st_size:,} bytes; keep lesson files ≤ 1.5 MiB"


def test_syllabus_lists_every_lesson():
    syllabus = (LESSONS / "README.md").read_text()
    for path in NOTEBOOKS:
        assert path.name in syllabus, f"lessons/README.md does not list {path.name}"


def guide_sections():
    """The instructor's guide split at its `## NN_name` headings: {lesson stem: that section's text}."""
    parts = re.split(r"^## (\d\d_\w+)\s*$", INSTRUCTOR_GUIDE.read_text(), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


@lessons
def test_every_question_has_an_answer_in_the_instructors_guide(path):
    """Each **Question N.** of a lesson's markdown has an answer under the lesson's heading in lessons/instructor/,
    labelled the same way and not empty; and the guide answers no question the lesson does not ask."""
    markdown = "\n".join(cell.source for cell in read_notebook(path).cells if cell.cell_type == "markdown")
    asked = QUESTION_MARKER.findall(markdown)
    assert asked == [str(n) for n in range(1, len(asked) + 1)], \
        f"{path.name}: questions must be numbered 1, 2, ... in order as **Question N.**; found {asked}"
    assert markdown.count("*Your answer:*") == len(asked), \
        f"{path.name}: every **Question N.** is followed by one empty *Your answer:* line"
    sections = guide_sections()
    assert path.stem in sections, f"{INSTRUCTOR_GUIDE.relative_to(ROOT)} has no section '## {path.stem}'"
    answers = dict(zip(QUESTION_MARKER.findall(sections[path.stem]),
                       QUESTION_MARKER.split(sections[path.stem])[2::2]))
    for number in asked:
        assert len(answers.get(number, "").split()) >= 20, \
            f"{INSTRUCTOR_GUIDE.relative_to(ROOT)}, section {path.stem}: no answer (of 20 words or more) to Question {number}"
    assert sorted(answers) == sorted(asked), \
        f"{INSTRUCTOR_GUIDE.relative_to(ROOT)}, section {path.stem}: answers {sorted(answers)} but the lesson asks {asked}"


def test_lesson_setup_pins_blas_seeds_and_reads_the_knob(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    import minimoe.lesson

    with threadpool_limits(2, user_api="blas"):  # restores the test process's limits afterwards
        monkeypatch.setenv("MINIMOE_LESSON_SCALE", "3")
        assert minimoe.lesson.setup() == 3.0
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
        first = minimoe.randn(4).numpy()
        minimoe.lesson.setup()
        check_close(minimoe.randn(4).numpy(), first, atol=0, rtol=0, name="draws after setup() are seeded")
        monkeypatch.delenv("MINIMOE_LESSON_SCALE")
        assert minimoe.lesson.setup() == 1.0
        for bad in ("ten", "0", "-1"):
            monkeypatch.setenv("MINIMOE_LESSON_SCALE", bad)
            with pytest.raises(ValueError, match="MINIMOE_LESSON_SCALE"):
                minimoe.lesson.setup()


def test_best_times_interleaves_and_keeps_the_fastest(monkeypatch, capsys):
    import minimoe.lesson

    clock = [0.0]  # a fake clock, which each callable advances by its own scripted duration
    monkeypatch.setattr(minimoe.lesson.time, "perf_counter", lambda: clock[0])
    calls, durations = [], {"a": iter([5.0, 1.0, 2.0]), "b": iter([0.5, 3.0, 1.5])}

    def work(name):
        def run():
            calls.append(name)
            clock[0] += next(durations[name])
        return run

    best = minimoe.lesson.best_times({"a": work("a"), "b": work("b")}, repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"], "one warm-up round, then rounds that take turns"
    assert best == {"a": 1.0, "b": 1.5}, f"the warm-up round is not counted, and the minimum is kept: {best}"

    assert minimoe.lesson.timing_claims({"fast": True}) is True
    assert minimoe.lesson.timing_claims({"fast": True, "flat": False}) is False
    printed = capsys.readouterr().out
    assert "DOES NOT HOLD: flat" in printed and "too noisy to time right now" in printed
