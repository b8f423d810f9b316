"""Planted-bug mutation testing of funcreg (run by hand, not part of CI).

Each mutant is one small edit of the package (a list of ``(old, new)`` text replacements,
each of which must occur exactly once). For every mutant the script copies the repository's
``funcreg/``, ``tests/``, ``examples/`` and ``pyproject.toml`` to a temporary folder, applies
the edit there, runs the mutant's test files with ``pytest -x`` and records whether a test
failed (*killed*) or all passed (*survived*); the working tree is never touched. The
unmutated copy is run first on the union of the test files: a failing baseline stops the run.

Usage, from the repository root::

    python tools/mutations.py                 # every mutant, a Markdown table on stdout
    python tools/mutations.py --only T1 T4    # some mutants
    python tools/mutations.py --list          # the mutants and their test files
    python tools/mutations.py --jobs 2 --out mutations.md
    python tools/mutations.py --only T1 T2 --all-failures   # every test a mutant fails

The mutants: ``T*`` are the planted bugs of the mutation run that motivated these tests
(each must be killed), ``P*``/``X*``/``O*``/``S*`` a hand-picked sample of operator and
constant mutations in ``prox.py``, ``penalties.py``, ``optim.py`` and ``selection.py``.
Mutants marked ``equivalent`` change no observable result (their reason says why); they
are run too, and their survival is expected.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PENALTY_TESTS = ("tests/test_penalties.py", "tests/test_penalty_edges.py")
SWEEP_TESTS = ("tests/test_sweep.py", "tests/test_resume_markers.py")
CV_TESTS = ("tests/test_selection.py", "tests/test_cv.py")
OPTIM_TESTS = ("tests/test_optim.py", "tests/test_train.py", "tests/test_metric_prox.py")


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    what: str
    equivalent: str = ""  # why the mutant cannot be told apart (empty: it must be killed)


def m(id_: str, file: str, old: str, new: str, tests: tuple[str, ...], what: str,
      equivalent: str = "") -> Mutant:  # fmt: skip
    return Mutant(id_, file, ((old, new),), tests, what, equivalent)


MUTANTS: list[Mutant] = [
    # -- the planted bugs of the table (issue: tests that tell right from wrong) -----------
    m(
        "T1",
        "funcreg/_engine.py",
        "ch.state = _merge(keep, new_s, ch.state, ch.batched)",
        "ch.state = new_s",
        SWEEP_TESTS,
        "optimizer state not frozen when a model diverges",
    ),
    m(
        "T2",
        "funcreg/_data.py",
        "perm = batch_order(self.n, self.bs, self.seed, epoch)",
        "perm = batch_order(self.n, self.bs, self.seed, epoch + 1)",
        SWEEP_TESTS,
        "batch_order uses the next epoch's order",
    ),
    m(
        "T3",
        "funcreg/_data.py",
        "(int(seed) * 1_000_003 + int(epoch)) % 2**63",
        "(int(seed) * 1_000_003) % 2**63",
        SWEEP_TESTS,
        "batch_order ignores the epoch",
    ),
    m(
        "T4",
        "funcreg/_setup.py",
        "prev = None if ckpt is None else load_checkpoint(ckpt, identity, n_steps, model)",
        "prev = None",
        SWEEP_TESTS,
        "fr.sweep ignores an existing checkpoint and recomputes",
    ),
    m(
        "T5a",
        "funcreg/selection.py",
        "self.scores.std(0, correction=1)",
        "self.scores.std(0, correction=0)",
        CV_TESTS,
        "CV standard error with ddof=0",
    ),
    m(
        "T5b",
        "funcreg/selection.py",
        "/ math.sqrt(self.n_folds)",
        "/ self.n_folds",
        CV_TESTS,
        "CV standard error divided by F instead of sqrt(F)",
    ),
    Mutant(
        "T6",
        "funcreg/_engine.py",
        (
            ("ch.params = _merge(keep, new_p, ch.params, ch.batched)", "ch.params = new_p"),
            ("ch.state = _merge(keep, new_s, ch.state, ch.batched)", "ch.state = new_s"),
        ),
        SWEEP_TESTS,
        "divergence guard freezes neither params nor state",
    ),
    m(
        "T7a",
        "funcreg/prox.py",
        "torch.where(ax <= a * lam, middle, x)",
        "middle",
        PENALTY_TESTS,
        "SCAD prox outer branch (|x| > a·lam, t < a - 1) wrong",
    ),
    m(
        "T7b",
        "funcreg/prox.py",
        "h3 = 0.5 * (y3 - ax).square() + (0.5 * (a + 1) * t * lam_t) * lam_t",
        "h3 = 0.5 * (y3 - ax).square() + (0.5 * (a - 1) * t * lam_t) * lam_t",
        PENALTY_TESTS,
        "SCAD prox beyond the convexity bound: wrong value of the outer piece",
    ),
    m(
        "T8",
        "funcreg/prox.py",
        "return torch.where(ax <= gamma * lam, soft_threshold(x, t * lam) / (1 - t / gamma), x)",
        "return soft_threshold(x, t * lam) / (1 - t / gamma)",
        PENALTY_TESTS,
        "MCP prox: the flat region (|x| > gamma·lam) firm-thresholded too",
    ),
    m(
        "T9",
        "funcreg/prox.py",
        "return torch.sign(x) * torch.clamp(x.abs() - t, min=0)",
        "return torch.sign(x) * torch.clamp(x.abs() - 0.5 * t, min=0)",
        ("tests/test_solvers.py",),
        "L1 prox threshold halved, against the solver tests (the Gram fast path must see it)",
    ),
    m(
        "T9g",
        "funcreg/prox.py",
        "return torch.sign(x) * torch.clamp(x.abs() - t, min=0)",
        "return torch.sign(x) * torch.clamp(x.abs() - 0.5 * t, min=0)",
        ("tests/test_solvers.py::test_lasso_grid_matches_sklearn[gram]",),
        "L1 prox threshold halved, against the Gram-path Lasso test alone (its lean loop)",
    ),
    # -- prox.py ---------------------------------------------------------------------------
    m(
        "P1",
        "funcreg/prox.py",
        "return x / (1 + t)",
        "return x / (1 + 2 * t)",
        PENALTY_TESTS,
        "ridge shrink factor",
    ),
    m(
        "P2",
        "funcreg/prox.py",
        "/ (1 + t * (1 - l1_ratio))",
        "/ (1 + t * l1_ratio)",
        PENALTY_TESTS,
        "elastic-net prox: ridge part scaled by the L1 ratio",
    ),
    m(
        "P3",
        "funcreg/prox.py",
        "scale = torch.clamp(1 - safe_ratio(t, norm), min=0)",
        "scale = 1 - safe_ratio(t, norm)",
        PENALTY_TESTS,
        "group shrink without the clamp at 0",
    ),
    m(
        "P4",
        "funcreg/prox.py",
        "s = torch.clamp(s - t, min=0)",
        "s = torch.clamp(s - 0.5 * t, min=0)",
        PENALTY_TESTS,
        "singular value threshold halved",
    ),
    m(
        "P5",
        "funcreg/prox.py",
        "over = norm > max_value",
        "over = norm >= max_value",
        PENALTY_TESTS + ("tests/test_keras.py",),
        "max-norm projection at the boundary",
        equivalent="at norm == max_value the factor max_value/norm is 1: the same output",
    ),
    m(
        "P6",
        "funcreg/prox.py",
        "hard = torch.where(ax > (t * gamma) ** 0.5 * lam, x, torch.zeros_like(x))",
        "hard = torch.where(ax > (t * gamma) * lam, x, torch.zeros_like(x))",
        PENALTY_TESTS,
        "MCP hard threshold sqrt(t·gamma)·lam without the root",
    ),
    m(
        "P7",
        "funcreg/prox.py",
        "middle = x - sign * (t * (a * lam - ax) / gap)",
        "middle = x - sign * (t * (a * lam + ax) / gap)",
        PENALTY_TESTS,
        "SCAD prox middle piece",
    ),
    m(
        "P8",
        "funcreg/prox.py",
        "piecewise = torch.where(ax <= (1 + t) * lam, small,",
        "piecewise = torch.where(ax <= t * lam, small,",
        PENALTY_TESTS,
        "SCAD prox: the soft-threshold piece ends at t·lam",
    ),
    m(
        "P9",
        "funcreg/prox.py",
        "positive = norm > 0",
        "positive = norm >= 0",
        PENALTY_TESTS,
        "safe_ratio divides by a zero norm",
    ),
    m(
        "P10",
        "funcreg/prox.py",
        "return torch.clamp(x, min=0)",
        "return torch.clamp(x, min=-1e-3)",
        PENALTY_TESTS,
        "non-negativity projection lets small negatives through",
    ),
    m(
        "P11",
        "funcreg/prox.py",
        "y1 = torch.minimum(torch.clamp(ax - t * lam, min=0), lam_t)",
        "y1 = torch.clamp(ax - t * lam, min=0)",
        PENALTY_TESTS,
        "SCAD prox beyond the bound: inner candidate not capped at lam",
        equivalent="an uncapped y1 exceeds lam only where |x| > (1 + t)·lam, and there, for "
        "t >= a - 1, the capped and the uncapped candidate both lose to y3 = x (h1 > h3)",
    ),
    # -- penalties.py ----------------------------------------------------------------------
    m(
        "X1",
        "funcreg/penalties.py",
        "return _scaled(d.abs(), c).sum()",
        "return _scaled(d, c).sum()",
        PENALTY_TESTS,
        "L1 value without the absolute value",
    ),
    m(
        "X2",
        "funcreg/penalties.py",
        "return 0.5 * _scaled(d.square(), c).sum()",
        "return _scaled(d.square(), c).sum()",
        PENALTY_TESTS,
        "L2 value without its 1/2",
    ),
    m(
        "X3",
        "funcreg/penalties.py",
        "return _scaled(r * d.abs() + 0.5 * (1 - r) * d.square(), c).sum()",
        "return _scaled(r * d.abs() + (1 - r) * d.square(), c).sum()",
        PENALTY_TESTS,
        "elastic-net value: ridge part without its 1/2",
    ),
    m(
        "X4",
        "funcreg/penalties.py",
        "root = math.sqrt(_group_size(d, self._dims(d)))",
        "root = _group_size(d, self._dims(d))",
        PENALTY_TESTS,
        "group lasso weight |g| instead of sqrt(|g|)",
    ),
    m(
        "X5",
        "funcreg/penalties.py",
        "_scaled_step(t * r, c)), t * (1 - r), c)",
        "_scaled_step(t * r, c)), t, c)",
        PENALTY_TESTS,
        "sparse group lasso prox: group step not scaled by 1 - r",
    ),
    m(
        "X6",
        "funcreg/penalties.py",
        "return torch.where(a <= self.gamma * lam, inside, (0.5 * self.gamma * lam) * lam)",
        "return torch.where(a <= self.gamma * lam, inside, (self.gamma * lam) * lam)",
        PENALTY_TESTS,
        "MCP value in its flat region",
    ),
    m(
        "X7",
        "funcreg/penalties.py",
        "big = (0.5 * (a + 1) * lam) * lam",
        "big = (0.5 * (a - 1) * lam) * lam",
        PENALTY_TESTS,
        "SCAD value in its outer region",
    ),
    m(
        "X8",
        "funcreg/penalties.py",
        "v = (x - lam) / (2 * (a - 1))",
        "v = (x - lam) / (a - 1)",
        PENALTY_TESTS,
        "SCAD value in its middle region",
    ),
    m(
        "X9",
        "funcreg/penalties.py",
        "pairs = max(size * (size - 1) / 2, 1.0)",
        "pairs = max(size * (size - 1), 1.0)",
        PENALTY_TESTS,
        "orthogonal penalty normalised by the ordered pairs",
    ),
    m(
        "X10",
        "funcreg/penalties.py",
        "if not lr < self.gamma:",
        "if not lr <= self.gamma:",
        PENALTY_TESTS,
        "MCP training guard lets lr == gamma through",
    ),
    m(
        "X11",
        "funcreg/penalties.py",
        "if not self.a > 1 + lr:",
        "if not self.a >= 1 + lr:",
        PENALTY_TESTS,
        "SCAD training guard lets a == 1 + lr through",
    ),
    m(
        "X12",
        "funcreg/penalties.py",
        "return _l1_threshold(grad, self._c(grad, name), self.l1_ratio)",
        "return _l1_threshold(grad, self._c(grad, name), 1.0)",
        ("tests/test_penalty_knowledge.py", "tests/test_path.py"),
        "elastic net strength_max ignores the L1 ratio",
    ),
    m(
        "X13",
        "funcreg/penalties.py",
        "return ref + self._prox(w - ref, t, c)",
        "return self._prox(w - ref, t, c)",
        PENALTY_TESTS,
        "toward= prox not shifted back",
    ),
    # -- optim.py --------------------------------------------------------------------------
    m(
        "O1",
        "funcreg/optim.py",
        "bc2 = 1 - _as_dtype(beta2, dtype) ** t",
        "bc2 = 1 - _as_dtype(beta1, dtype) ** t",
        OPTIM_TESTS,
        "Adam's second bias correction with beta1",
    ),
    m(
        "O2",
        "funcreg/optim.py",
        "p = p * (1 - lr_ * wd)",
        "p = p * (1 - wd)",
        OPTIM_TESTS,
        "AdamW decay not scaled by the learning rate",
    ),
    m(
        "O3",
        "funcreg/optim.py",
        "mu * state.momentum_buffer[key] + (1 - tau) * g)",
        "mu * state.momentum_buffer[key] + g)",
        OPTIM_TESTS,
        "SGD momentum ignores dampening",
    ),
    m(
        "O4",
        "funcreg/optim.py",
        "g = g + mu * buf if nesterov else buf",
        "g = buf",
        OPTIM_TESTS,
        "SGD without Nesterov's look-ahead",
    ),
    m(
        "O5",
        "funcreg/optim.py",
        "denom = torch.sqrt(v) / bc2_sqrt + eps_",
        "denom = torch.sqrt(v / bc2_sqrt) + eps_",
        OPTIM_TESTS,
        "Adam's denominator: the correction inside the root",
    ),
    m(
        "O6",
        "funcreg/optim.py",
        "return {k: lr / d for k, d in optimizer.metric(state, hyper).items()}",
        "return lr",
        OPTIM_TESTS,
        "prox steps ignore Adam's metric",
    ),
    m(
        "O7",
        "funcreg/optim.py",
        "first = state.step == 0",
        "first = state.step < 0",
        OPTIM_TESTS,
        "SGD momentum buffer not initialised to the first gradient",
    ),
    # -- selection.py ----------------------------------------------------------------------
    m(
        "S1",
        "funcreg/selection.py",
        "return self.scores.mean(0)",
        "return self.scores.median(0).values",
        CV_TESTS,
        "CV mean replaced by the median",
    ),
    m(
        "S2",
        "funcreg/selection.py",
        "rows.append(fn(p, test[j], *data))",
        "rows.append(fn(p, 1 - test[j], *data))",
        CV_TESTS,
        "held-out scores on the training samples",
    ),
]


def _copy_tree(dst: Path) -> None:
    for name in ("funcreg", "tests", "examples"):
        src = ROOT / name
        if src.exists():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _apply(dst: Path, mutant: Mutant) -> None:
    path = dst / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"mutant {mutant.id}: {old!r} occurs {n} times in {mutant.file}")
        text = text.replace(old, new)
    path.write_text(text)


def _pytest(
    dst: Path, tests: tuple[str, ...], timeout: float, stop: bool = True
) -> tuple[str, str, float]:
    """Run ``tests`` in the copy: ``(outcome, failing tests or '', seconds)`` (with
    ``stop=False`` every test runs, and the failures are counted)."""
    env = {**os.environ, "PYTHONPATH": str(dst), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    cmd = [sys.executable, "-m", "pytest", *(["-x"] if stop else []), "-q", "-p",
           "no:cacheprovider", "-rf", *tests]  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=dst, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", "", time.perf_counter() - t0
    took = time.perf_counter() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    if proc.returncode == 0:
        return "passed", "", took
    if proc.returncode == 1 and failed:
        if not stop:  # every failing test, without the folder
            return "failed", ", ".join(f.removeprefix("tests/") for f in failed), took
        return "failed", failed[0], took
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return f"error (rc {proc.returncode})", " | ".join(tail), took


def run_one(mutant: Mutant, timeout: float, stop: bool = True) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as tmp:
        dst = Path(tmp)
        _copy_tree(dst)
        _apply(dst, mutant)
        outcome, first, took = _pytest(dst, mutant.tests, timeout, stop)
    if outcome == "passed":
        status = "survived (equivalent)" if mutant.equivalent else "SURVIVED"
    elif outcome in ("failed", "timeout"):
        status = "killed" if outcome == "failed" else "killed (timeout)"
    else:
        status = outcome  # a mutant that breaks the import is killed, but say so
    return {"mutant": mutant, "status": status, "first": first, "seconds": took}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument(
        "--all-failures", action="store_true",
        help="run every test of a mutant (no -x) and count the failing ones",
    )  # fmt: skip
    args = ap.parse_args(argv)
    chosen = [mu for mu in MUTANTS if not args.only or mu.id in args.only]
    if args.list:
        for mu in chosen:
            print(f"{mu.id:5} {mu.file:22} {mu.what}  [{' '.join(mu.tests)}]")
        return 0
    if not args.no_baseline:
        tests = tuple(sorted({t for mu in chosen for t in mu.tests}))
        with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
            _copy_tree(Path(tmp))
            outcome, first, took = _pytest(Path(tmp), tests, args.timeout)
        print(f"baseline (unmutated, {len(tests)} test files): {outcome} in {took:.0f} s",
              file=sys.stderr)  # fmt: skip
        if outcome != "passed":
            print(f"the unmutated package fails: {first}", file=sys.stderr)
            return 2
    rows = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, mu, args.timeout, not args.all_failures) for mu in chosen]
        for fut in futures:
            r = fut.result()
            mu = r["mutant"]
            assert isinstance(mu, Mutant)
            print(f"{mu.id:5} {r['status']:22} {r['seconds']:6.1f} s  {r['first']}",
                  file=sys.stderr, flush=True)  # fmt: skip
            rows.append(r)
    killed = sum(1 for r in rows if str(r["status"]).startswith("killed"))
    equivalent = sum(1 for r in rows if r["status"] == "survived (equivalent)")
    survived = [r for r in rows if r["status"] == "SURVIVED"]
    other = len(rows) - killed - equivalent - len(survived)
    lines = [
        "| mutant | file | planted bug | result | first failing test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mu = r["mutant"]
        assert isinstance(mu, Mutant)
        note = f" (equivalent: {mu.equivalent})" if mu.equivalent else ""
        first = str(r["first"]).replace("|", "/")
        lines.append(
            f"| {mu.id} | `{mu.file.removeprefix('funcreg/')}` | "
            f"{(mu.what + note).replace('|', chr(92) + '|')} | "
            f"{r['status']} | {first and f'`{first}`'} |"
        )
    scored = len(rows) - equivalent
    lines.append("")
    lines.append(
        f"Score: {killed} killed of {scored} non-equivalent mutants"
        f" ({100 * killed / max(scored, 1):.0f}%); {equivalent} equivalent,"
        f" {len(survived)} survived, {other} other."
    )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
