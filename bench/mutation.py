"""Mutation check of the scheduling policies and the split planner's DP: do their tests fail
when the code is wrong?

Each mutant is one small plausible bug made in the source (a comparison's boundary or sense,
`+` for `-`, a dropped `sorted(...)` or operand, a constant off by one, `and` for `or`, an
index off by one, ...). For every mutant, the module's own fast tests run (`pytest -x`, with
a timeout); a mutant whose tests still pass *survived*. Survivors are either killed with a new
test or listed in EQUIVALENT with the reason they cannot change behaviour.

The mutants are made in a temporary copy of the repository (`git archive HEAD`, or the working
tree with --worktree), never in the checkout itself, so an interrupted run leaves nothing
behind; the copy's packages come first on sys.path, ahead of the editable install.

    .venv/bin/python bench/mutation.py                      # all three modules (about an hour)
    .venv/bin/python bench/mutation.py --module preemption  # one module
    .venv/bin/python bench/mutation.py --list               # the mutants, without running them
    .venv/bin/python bench/mutation.py --match 'works[j]'   # mutants whose id contains this

Results go to bench/results/mutation.json, rewritten after every mutant (a run cut short keeps
what it measured). See docs/testing.md.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "mutation.json"
#: Installed subpackages and the folders they come from (setuptools' package-dir mapping).
SUBPACKAGES = ("predictors", "scheduler", "split_client", "patches")
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
#: No shrinking of failing examples, no example database (tests/conftest.py).
PYTEST += ["--hypothesis-profile", "mutation"]


@dataclass(frozen=True)
class Target:
    """A module to mutate, the functions to mutate in it (None: all), and its tests in stages:
    a later stage runs only when the mutant survived the earlier ones (fast tests first)."""

    name: str
    path: str
    functions: tuple[str, ...] | None
    stages: tuple[tuple[str, ...], ...]


TARGETS = (
    Target(
        "preemption",
        "scheduler/preemption.py",
        None,
        (
            ("tests/scheduler/test_preemption.py", "-k", "choose_mode or config"),
            ("tests/scheduler/test_preemption_advisor.py",),
            ("tests/scheduler/test_preemption.py",),
        ),
    ),
    Target(
        "policies",
        "scheduler/policies.py",
        None,
        (
            ("tests/scheduler/test_policies.py",),
            ("tests/scheduler/test_scheduler_fairness.py",),
        ),
    ),
    Target(
        "planner-dp",
        "split_client/planner.py",
        # The DP and what it rests on: discretisation, the table, backtracking, the fallback.
        (
            "_to_units",
            "default_budget_bins",
            "_resolve_step",
            "_entering_times",
            "_discretise",
            "_dp_table",
            "_dp_solve",
            "_fastest",
            "plan_dp",
        ),
        (
            (
                "tests/split_client/test_planner.py",
                "-k",
                "own_work or non_prefix or exactly_met or coarse or zero or max_budget or "
                "default_budget or one_layer or equal_costs or no_sla or hump or unreachable",
            ),
            (
                "tests/split_client/test_planner.py",
                "-k",
                "seeded or enumeration or whole_steps or never_violates",
            ),
            ("tests/split_client/test_planner.py",),
        ),
    ),
)

#: Mutants that cannot change behaviour (by id, see Mutant.id), each with the reason.
_OWED = "scheduler/policies.py::_owed_rule: "
EQUIVALENT: dict[str, str] = {
    "scheduler/preemption.py::PreemptionAdvisor.decide: constant: `False` -> `True`": (
        "choose_mode with no swappable blocks answers nothing-to-swap before it reads the room"
    ),
    "scheduler/policies.py::backlogged_jain: drop sorted: "
    "`sorted(set(backlogged))` -> `list(set(backlogged))`": (
        "Jain's index is symmetric in its values; the order changes only the float rounding of "
        "its sums (sorting keeps that reproducible across hash seeds)"
    ),
    "scheduler/policies.py::choose_turnaround_victim: constant: `0.0` -> `1.0`#1": (
        "own (the candidate tenant's counter) is read only when counters is non-empty"
    ),
    _OWED + "constant: `0.0` -> `1.0`": (
        "least is read only when counters is non-empty: without counters every request is owed"
    ),
    _OWED + "constant: `0.0` -> `1.0`#3": (
        "min's default: used only for an empty queue, which has no request to ask about"
    ),
    _OWED + "constant: `0.0` -> `1.0`#4": (
        "projected() runs only with counters: without them `behind` is empty and every "
        "request is owed before it is called"
    ),
    _OWED + "constant: `0.0` -> `1.0`#1": (
        "without counters the request's counter is never read: owed is True and cost is 0.0"
    ),
    _OWED + "boolean: `and` -> `or`#1": (
        "cost is read only when counter > least; when counter <= least owed is already True"
    ),
    _OWED + "constant: `0.0` -> `1.0`#2": (
        "as above: a cost of a request at the least counter is never read"
    ),
    _OWED + "comparison: `>` -> `>=`": (
        "least is the smallest counter of the ranked requests, so counter >= least always; at "
        "counter == least owed is True whatever the cost"
    ),
    "split_client/planner.py::_to_units: drop operand: `bins + 1` -> `1`#1": (
        "the step is inf only with an infinite budget, and then bins is 0 (_resolve_step)"
    ),
    "split_client/planner.py::_to_units: constant: `1` -> `2`#2": (
        "any entering cost >= bins + 1 units never fits: _dp_table clamps shifts to width = "
        "bins + 1 and the first layer needs units <= bins; bins + 2 is the same"
    ),
    "split_client/planner.py::_resolve_step: constant: `0` -> `1`": (
        "an infinite budget: every finite cost is 0 units and every infinite one bins + 1, so "
        "1 bin instead of 0 admits the same placements"
    ),
    "split_client/planner.py::_resolve_step: constant: `1.0` -> `2.0`": (
        "a budget of 0: count = floor(0 / step) = 0 and every excess > 0 rounds to >= 1 unit "
        "for any positive step"
    ),
    "split_client/planner.py::_entering_times: constant: `2` -> `3`": (
        "a third 'from' row holds only the compute (as staying put does, so the floor is the "
        "same) and the DP never reads it"
    ),
    "split_client/planner.py::_dp_table: constant: `1` -> `2`": (
        "one more budget column (bins + 1 units) that the answer, read at column bins, never "
        "depends on"
    ),
    "split_client/planner.py::_dp_table: constant: `2` -> `3`#1": (
        "a third row of cur that stays inf: never the argmin, never read as a predecessor"
    ),
    "split_client/planner.py::_dp_table: constant: `2` -> `3`#2": "as above, for nxt",
    "split_client/planner.py::_dp_table: constant: `2` -> `3`": (
        "a third row of came_from_server that is never written or read"
    ),
    "split_client/planner.py::_dp_table: constant: `0` -> `-1`#4": (
        "layer 0's entering cost is the same from either row (both hold the start)"
    ),
    "split_client/planner.py::_dp_table: constant: `0` -> `1`#4": "as above",
    "split_client/planner.py::_dp_table: drop clamp: "
    "`min(shift[0][x2], width)` -> `shift[0][x2]`": (
        "_to_units already caps every entering cost at bins + 1 = width"
    ),
    "split_client/planner.py::_dp_table: drop clamp: "
    "`min(shift[1][x2], width)` -> `shift[1][x2]`": ("as above"),
    "split_client/planner.py::_to_units: constant: `1` -> `2`#1": (
        "as above: costs capped at bins + 2 instead of bins + 1 are all beyond the budget, "
        "clamped to the same width in _dp_table, and never on a backtracked path"
    ),
}


@dataclass(frozen=True)
class Mutant:
    """One textual change: replace source[start:end] (character offsets) by `replacement`."""

    path: str
    function: str
    line: int
    start: int
    end: int
    original: str
    replacement: str
    kind: str
    occurrence: int = 0

    @property
    def id(self) -> str:
        """Stable across edits elsewhere in the file: module, function, what changes, and which
        of identical changes in that function (0 = the first)."""
        suffix = f"#{self.occurrence}" if self.occurrence else ""
        original, replacement = (" ".join(t.split()) for t in (self.original, self.replacement))
        return f"{self.path}::{self.function}: {self.kind}: `{original}` -> `{replacement}`{suffix}"

    def apply(self, source: str) -> str:
        return source[: self.start] + self.replacement + source[self.end :]

    def diff(self, source: str) -> str:
        lines = difflib.unified_diff(
            source.splitlines(keepends=True),
            self.apply(source).splitlines(keepends=True),
            f"a/{self.path}",
            f"b/{self.path}",
            n=1,
        )
        return "".join(lines)


# --------------------------------------------------------------------------- making mutants

_COMPARE_SWAPS: dict[type[ast.cmpop], tuple[str, ...]] = {
    ast.Lt: ("<=", ">="),
    ast.LtE: ("<", ">"),
    ast.Gt: (">=", "<="),
    ast.GtE: (">", "<"),
    ast.Eq: ("!=",),
    ast.NotEq: ("==",),
    ast.Is: ("is not",),
    ast.IsNot: ("is",),
    ast.In: ("not in",),
    ast.NotIn: ("in",),
}
_COMPARE_TOKENS: dict[type[ast.cmpop], str] = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
}
_BINOP_SWAPS: dict[type[ast.operator], tuple[str, str]] = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "/"),
    ast.Div: ("/", "*"),
    ast.FloorDiv: ("//", "/"),
    ast.Mod: ("%", "//"),
    ast.Pow: ("**", "*"),
}
_CALL_SWAPS = {"min": "max", "max": "min", "any": "all", "all": "any"}


class _Offsets:
    """(line, column) of the ast to character offsets in the source."""

    def __init__(self, source: str) -> None:
        self.starts = [0]
        for line in source.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))
        self.source = source

    def at(self, line: int, col: int) -> int:
        # ast columns are UTF-8 byte offsets.
        text = self.source[self.starts[line - 1] : self.starts[line]]
        return self.starts[line - 1] + len(text.encode()[:col].decode())

    def span(self, node: ast.AST) -> tuple[int, int]:
        start = self.at(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = self.at(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        return start, end


def _find_token(source: str, start: int, end: int, token: str) -> int | None:
    """Offset of `token` between two operands (skipping brackets and comments of the gap)."""
    gap = source[start:end]
    depth = 0
    i = 0
    while i < len(gap):
        c = gap[i]
        if c == "#":
            newline = gap.find("\n", i)
            i = len(gap) if newline < 0 else newline
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth <= 0 and gap.startswith(token, i):
            after = gap[i + len(token) : i + len(token) + 1]
            word = token[-1].isalpha()
            if not (word and (after.isalnum() or after == "_")) and not (
                not word and after in "=<>*/"
            ):
                return start + i
        i += 1
    return None


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """Top-level functions and methods, by qualified name."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{item.name}", item


def _skipped(node: ast.AST, func: ast.AST) -> set[int]:
    """ids of nodes not worth mutating: annotations, docstrings, decorators."""
    skip: set[int] = set()
    for sub in ast.walk(func):
        annotations: list[ast.AST | None] = []
        if isinstance(sub, ast.arg):
            annotations.append(sub.annotation)
        if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
            annotations.append(sub.returns)
            annotations.extend(sub.decorator_list)
            if sub.body and isinstance(sub.body[0], ast.Expr):
                annotations.append(sub.body[0])
        if isinstance(sub, ast.AnnAssign):
            annotations.append(sub.annotation)
        for a in annotations:
            if a is not None:
                skip.update(id(n) for n in ast.walk(a))
    return skip


def _grouped(source: str, offsets: _Offsets, node: ast.AST) -> str:
    """The source of `node`, in parentheses unless it is an atom: it replaces an expression
    (a call, a `not`) that bound tighter than it may."""
    text = source[slice(*offsets.span(node))]
    atoms = (ast.Name, ast.Constant, ast.Attribute, ast.Call, ast.Subscript)
    return text if isinstance(node, atoms) else f"({text})"


def mutants_of(path: str, source: str, functions: Sequence[str] | None) -> list[Mutant]:
    """Every mutant of the chosen functions of a module (all functions when None)."""
    tree = ast.parse(source)
    offsets = _Offsets(source)
    found: list[Mutant] = []
    for name, func in _functions(tree):
        if functions is not None and name not in functions:
            continue
        skip = _skipped(func, func)
        seen: Counter[str] = Counter()

        def add(
            start: int,
            end: int,
            replacement: str,
            kind: str,
            line: int,
            name: str = name,
            seen: Counter[str] = seen,
        ) -> None:
            original = source[start:end]
            if original == replacement:
                return
            probe = Mutant(path, name, line, start, end, original, replacement, kind)
            try:  # a mutant must still parse
                ast.parse(probe.apply(source))
            except SyntaxError:
                return
            key = probe.id
            found.append(
                Mutant(path, name, line, start, end, original, replacement, kind, seen[key])
            )
            seen[key] += 1

        for node in ast.walk(func):
            if id(node) in skip or node is func:
                continue
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.Compare):
                left = node.left
                for op, right in zip(node.ops, node.comparators, strict=True):
                    token = _COMPARE_TOKENS[type(op)]
                    at = _find_token(source, offsets.span(left)[1], offsets.span(right)[0], token)
                    if at is not None:
                        for new in _COMPARE_SWAPS[type(op)]:
                            add(at, at + len(token), new, "comparison", line)
                    left = right
            elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
                token, new = _BINOP_SWAPS[type(node.op)]
                gap_start, gap_end = offsets.span(node.left)[1], offsets.span(node.right)[0]
                at = _find_token(source, gap_start, gap_end, token)
                if at is not None:
                    add(at, at + len(token), new, "operator", line)
                if isinstance(node.op, ast.Add | ast.Sub):
                    start, end = offsets.span(node)
                    left_text = source[slice(*offsets.span(node.left))]
                    right_text = source[slice(*offsets.span(node.right))]
                    add(start, end, left_text, "drop operand", line)
                    if isinstance(node.op, ast.Add):
                        add(start, end, right_text, "drop operand", line)
            elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAPS:
                token, new = _BINOP_SWAPS[type(node.op)]
                gap_start, gap_end = offsets.span(node.target)[1], offsets.span(node.value)[0]
                at = _find_token(source, gap_start, gap_end, token + "=")
                if at is not None:
                    add(at, at + len(token) + 1, new + "=", "operator", line)
            elif isinstance(node, ast.BoolOp):
                token, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
                for a, b in zip(node.values, node.values[1:], strict=False):
                    at = _find_token(source, offsets.span(a)[1], offsets.span(b)[0], token)
                    if at is not None:
                        add(at, at + len(token), new, "boolean", line)
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                start, end = offsets.span(node)
                add(start, end, _grouped(source, offsets, node.operand), "drop not", line)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                fname = node.func.id
                if fname == "sorted" and node.args:
                    start, end = offsets.span(node)
                    inner = source[slice(*offsets.span(node.args[0]))]
                    add(start, end, f"list({inner})", "drop sorted", line)
                if fname in _CALL_SWAPS:
                    start, end = offsets.span(node.func)
                    add(start, end, _CALL_SWAPS[fname], "call", line)
                if fname in ("min", "max") and len(node.args) == 2 and not node.keywords:
                    start, end = offsets.span(node)
                    for arg in node.args:  # drop a clamp
                        add(start, end, _grouped(source, offsets, arg), "drop clamp", line)
            elif isinstance(node, ast.Constant) and not isinstance(node.value, str | bytes):
                start, end = offsets.span(node)
                value = node.value
                if isinstance(value, bool):
                    add(start, end, str(not value), "constant", line)
                elif isinstance(value, int):
                    add(start, end, str(value + 1), "constant", line)
                    add(start, end, str(value - 1), "constant", line)
                elif isinstance(value, float):
                    add(start, end, repr(value + 1.0), "constant", line)
            elif isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
                index = node.slice
                start, end = offsets.span(index)
                text = source[start:end]
                if isinstance(index, ast.Name):
                    add(start, end, f"{text} - 1", "index", line)
                    add(start, end, f"{text} + 1", "index", line)
                elif (
                    isinstance(index, ast.BinOp)
                    and isinstance(index.op, ast.Add | ast.Sub)
                    and isinstance(index.left, ast.Name)
                    and isinstance(index.right, ast.Constant)
                ):
                    add(start, end, index.left.id, "index", line)
    found.sort(key=lambda m: (m.start, m.end, m.replacement))
    return found


# --------------------------------------------------------------------------- running them


@dataclass
class Outcome:
    id: str
    line: int
    status: str  # killed | survived | equivalent | timeout
    stage: int | None
    seconds: float
    diff: str = ""
    reason: str = ""
    reused: bool = False
    """Killed in an earlier run of the same module source (--resume): not run again."""


@dataclass
class ModuleReport:
    path: str
    functions: list[str] | None
    tests: list[list[str]]
    mutants: int = 0
    sha256: str = ""
    baseline_s: list[float] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts = Counter(o.status for o in self.outcomes)
        killed = counts["killed"] + counts["timeout"]
        return {
            "path": self.path,
            "functions": self.functions,
            "tests": self.tests,
            "sha256": self.sha256,
            "mutants": self.mutants,
            "run": len(self.outcomes),
            "reused": sum(o.reused for o in self.outcomes),
            "killed": killed,
            "killed_by_timeout": counts["timeout"],
            "survived": counts["survived"],
            "equivalent": counts["equivalent"],
            "baseline_s": [round(s, 1) for s in self.baseline_s],
            "survivors": [
                {"id": o.id, "line": o.line, "diff": o.diff}
                for o in self.outcomes
                if o.status == "survived"
            ],
            "equivalents": [
                {"id": o.id, "line": o.line, "reason": o.reason, "diff": o.diff}
                for o in self.outcomes
                if o.status == "equivalent"
            ],
            "killed_by_stage": dict(
                Counter(str(o.stage) for o in self.outcomes if o.stage is not None)
            ),
            "killed_mutants": [
                {"id": o.id, "stage": o.stage, "status": o.status}
                for o in self.outcomes
                if o.status in ("killed", "timeout")
            ],
        }


def make_copy(destination: Path, worktree: bool) -> str:
    """The repository's files in `destination` (HEAD, or the working tree's tracked and
    untracked-but-not-ignored files) and a package tree laid out as the install; returns what
    was copied (the commit, and `+worktree` when the working tree was)."""
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    if worktree:
        files = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        for name in filter(None, (f.decode() for f in files)):
            source = REPO / name
            if source.is_file():
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination / name)
    else:
        archive = destination / ".head.tar"
        with archive.open("wb") as out:
            subprocess.run(["git", "archive", "HEAD"], cwd=REPO, stdout=out, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(destination, filter="data")
        archive.unlink()
    # The copy's adaptivellm/ becomes the installed package: its subpackages linked in. (The
    # tests run from the copy, whose folder Python puts first on sys.path.)
    for sub in SUBPACKAGES:
        (destination / "adaptivellm" / sub).symlink_to(Path("..") / sub)
    return commit + ("+worktree" if worktree else "")


def test_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from_copy(copy: Path, target: Target) -> None:
    module = "adaptivellm." + target.path.removesuffix(".py").replace("/", ".")
    code = f"import {module} as m; print(m.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=copy,
        env=test_env(copy),
        capture_output=True,
        text=True,
        check=True,
    )
    where = Path(done.stdout.strip()).resolve()
    if not where.is_relative_to(copy.resolve()):
        raise SystemExit(f"{module} imports from {where}, not from the copy {copy}")


def run_tests(copy: Path, args: Sequence[str], timeout: float) -> tuple[bool | None, float]:
    """(passed, seconds): None when the tests ran out of time."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, *PYTEST, *args],
            cwd=copy,
            env=test_env(copy),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - started
    if done.returncode in (4, 5):  # a usage error, or no tests ran: never a kill
        raise SystemExit(f"pytest {' '.join(args)} exited {done.returncode}")
    # 1: tests failed; 2: an error while collecting them (the mutant broke the import); 3: an
    # internal error. (Ctrl-C reaches this process too, and stops the run.)
    return done.returncode == 0, time.monotonic() - started


def previous_kills(path: Path) -> dict[tuple[str, str], dict[str, tuple[str, int | None]]]:
    """(module path, source sha256) -> {mutant id: (status, stage)} of a previous report's
    killed mutants."""
    data = json.loads(path.read_text())
    kills: dict[tuple[str, str], dict[str, tuple[str, int | None]]] = {}
    for module in data["modules"].values():
        key = (module["path"], module.get("sha256", ""))
        for k in module.get("killed_mutants", []):
            kills.setdefault(key, {})[k["id"]] = (k["status"], k["stage"])
    return kills


def run_mutant(
    copy: Path, target: Target, mutant: Mutant, source: str, report: ModuleReport, factor: float
) -> Outcome:
    """Apply one mutant in `copy`, run the target's test stages until one fails, restore."""
    outcome = Outcome(mutant.id, mutant.line, "survived", None, 0.0)
    file = copy / target.path
    try:
        file.write_text(mutant.apply(source))
        for number, stage in enumerate(target.stages):
            passed, seconds = run_tests(copy, stage, factor * report.baseline_s[number] + 30)
            outcome.seconds += seconds
            if not passed:
                outcome.status = "killed" if passed is False else "timeout"
                outcome.stage = number
                break
    finally:
        file.write_text(source)  # always restored, even on Ctrl-C
    if outcome.status == "survived":
        outcome.diff = mutant.diff(source)
        if mutant.id in EQUIVALENT:
            outcome.status, outcome.reason = "equivalent", EQUIVALENT[mutant.id]
    return outcome


def write_report(out: Path, header: dict[str, Any], reports: dict[str, ModuleReport]) -> None:
    data = {**header, "modules": {name: r.summary() for name, r in reports.items()}}
    data["totals"] = {
        key: sum(m[key] for m in data["modules"].values())
        for key in ("mutants", "run", "killed", "survived", "equivalent")
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)


def merge_reports(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """One report from several (runs of different modules, e.g. in parallel): each module
    from the last report that has it, and its survivors listed in EQUIVALENT (now) moved to
    the equivalent ones."""
    runs: list[dict[str, Any]] = []
    modules: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        keys = ("command", "source", "started", "finished")
        runs.append({"modules": sorted(data["modules"]), **{k: data.get(k) for k in keys}})
        modules.update(data["modules"])
    for module in modules.values():
        equivalent = [s for s in module["survivors"] if s["id"] in EQUIVALENT]
        module["survivors"] = [s for s in module["survivors"] if s["id"] not in EQUIVALENT]
        for s in equivalent:
            module["equivalents"].append({**s, "reason": EQUIVALENT[s["id"]]})
        module["survived"] = len(module["survivors"])
        module["equivalent"] = len(module["equivalents"])
    merged = {
        "command": "; ".join(str(r["command"]) for r in runs),
        "merged_from": runs,
        "statuses": json.loads(paths[-1].read_text()).get("statuses"),
        "modules": modules,
        "totals": {
            key: sum(m[key] for m in modules.values())
            for key in ("mutants", "run", "killed", "survived", "equivalent")
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=[t.name for t in TARGETS])
    parser.add_argument("--match", help="only mutants whose id contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--worktree", action="store_true", help="mutate the working tree's code")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--resume",
        type=Path,
        action="append",
        help="a previous report (may be given several times): its killed mutants of an "
        "unchanged module source are not run again (new tests cannot revive them); survivors "
        "and new mutants are",
    )
    parser.add_argument(
        "--timeout-factor", type=float, default=4.0, help="per mutant: this x baseline + 30 s"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="write one report to --out from these reports (of different modules) and stop",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="mutants tested at once, each in its own copy (a busy machine gives each its share)",
    )
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="do not first check that the unmutated tests pass (timeouts then use 300 s)",
    )
    args = parser.parse_args(argv)
    # `kill` (SIGTERM) stops a run like Ctrl-C: the temporary copy is removed on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.merge:
        totals = merge_reports(args.merge, args.out)["totals"]
        print(f"{args.out}: {totals}")
        return 0
    targets = [t for t in TARGETS if not args.module or t.name in args.module]

    with tempfile.TemporaryDirectory(prefix="adaptivellm-mutation-") as tmp:
        copy = Path(tmp)
        source_of = make_copy(copy, args.worktree)
        plan: dict[str, list[Mutant]] = {}
        sources: dict[str, str] = {}
        for target in targets:
            sources[target.name] = (copy / target.path).read_text()
            mutants = mutants_of(target.path, sources[target.name], target.functions)
            if args.match:
                mutants = [m for m in mutants if args.match in m.id]
            plan[target.name] = mutants
        if args.list:
            for target in targets:
                for m in plan[target.name]:
                    print(f"{m.path}:{m.line}: {m.id}")
            print(sum(len(m) for m in plan.values()), "mutants")
            return 0

        previous: dict[tuple[str, str], dict[str, tuple[str, int | None]]] = {}
        for path in args.resume or ():
            for key, kills in previous_kills(path).items():
                previous.setdefault(key, {}).update(kills)
        command = "bench/mutation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = {
            "command": f".venv/bin/python {command.strip()}",
            "source": source_of,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "finished": None,
            "statuses": {
                "killed": "a test failed (or ran out of time: killed_by_timeout)",
                "survived": "every test passed: a test is missing, or the mutant is equivalent",
                "equivalent": "passed, and listed in bench/mutation.py's EQUIVALENT with why",
            },
        }
        reports = {
            t.name: ModuleReport(
                t.path,
                list(t.functions) if t.functions else None,
                [list(s) for s in t.stages],
                len(plan[t.name]),
                hashlib.sha256(sources[t.name].encode()).hexdigest(),
            )
            for t in targets
        }
        for target in targets:
            check_imports_from_copy(copy, target)
            for stage in target.stages:
                if args.skip_baseline:
                    reports[target.name].baseline_s.append(300.0 / args.timeout_factor)
                    continue
                passed, seconds = run_tests(copy, stage, timeout=3600)
                if not passed:
                    raise SystemExit(f"the unmutated tests fail: pytest {' '.join(stage)}")
                reports[target.name].baseline_s.append(seconds)
        write_report(args.out, header, reports)

        copies: queue.Queue[Path] = queue.Queue()
        copies.put(copy)
        for number in range(1, max(1, args.jobs)):
            extra = copy.parent / f"{copy.name}-{number}"
            shutil.copytree(copy, extra, symlinks=True)
            copies.put(extra)

        def test_one(target: Target, mutant: Mutant) -> Outcome:
            report, source = reports[target.name], sources[target.name]
            where = copies.get()
            try:
                return run_mutant(where, target, mutant, source, report, args.timeout_factor)
            finally:
                copies.put(where)

        total = sum(len(m) for m in plan.values())
        pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
        try:
            with tqdm(total=total, unit="mutant") as bar:
                pending = {}
                for target in targets:
                    report = reports[target.name]
                    reusable = previous.get((target.path, report.sha256), {})
                    for mutant in plan[target.name]:
                        if mutant.id in reusable:
                            status, killed_at = reusable[mutant.id]
                            report.outcomes.append(
                                Outcome(mutant.id, mutant.line, status, killed_at, 0.0, reused=True)
                            )
                            bar.update()
                            continue
                        pending[pool.submit(test_one, target, mutant)] = (target, mutant)
                for future in as_completed(pending):
                    target, mutant = pending[future]
                    outcome = future.result()
                    if outcome.status == "survived":
                        tqdm.write(f"SURVIVED {target.path}:{mutant.line}: {mutant.id}")
                    reports[target.name].outcomes.append(outcome)
                    write_report(args.out, header, reports)
                    bar.set_description(f"{target.name}:{mutant.line}")
                    bar.update()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            for number in range(1, max(1, args.jobs)):
                shutil.rmtree(copy.parent / f"{copy.name}-{number}", ignore_errors=True)
        header["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_report(args.out, header, reports)
    for name, report in reports.items():
        s = report.summary()
        print(f"{name}: {s['killed']} killed, {s['survived']} survived, "
              f"{s['equivalent']} equivalent of {s['mutants']}")  # fmt: skip
    return 0 if all(not r.summary()["survived"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
