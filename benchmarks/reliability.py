"""Reliability report (issue 12): run the reliability tests and count what they tried.

The tests are the measurement: tests/test_serve_reliability.py (the server as a client, an operator and a fuzzer
meet it), tests/test_reliability_files.py (CLI, files, training, SIGKILL during writes) and tests/test_sampling.py
(the sampler, property-based) run under pytest with FMFORGE_RELIABILITY_REPORT naming a file, and the tests append
one JSON line per observation to it (tests/conftest.py `report`), where it happens:

- every HTTP request the server tests send (an autouse wrapper around httpx.get/post) and every raw-socket case
  (a client that leaves, an answer read off the socket) with the status it got; the tests' own reads of /metrics
  are left out of the counts;
- every schemathesis request with its status, and every hypothesis example of the sampler's property test;
- every refused CLI command whose one `error:` line a test checked;
- every SIGKILL trial right after the kill (seed, delay, whether its temporary directory was left behind), and
  again once its checks passed (`latest` loads, the resume or re-run is exact): a trial lost = killed, not passed.

Classes are the numbered `# ---- N. ... ----` headers of the test modules (issue 12's list). pytest's outcomes come
from its JUnit XML. The section is written only when every test passed; a failing run prints its numbers.

    .venv/bin/python benchmarks/reliability.py                       # ~10 minutes; writes the "reliability" section
    .venv/bin/python benchmarks/reliability.py --fuzz-examples 100   # more schemathesis examples per operation
    .venv/bin/python benchmarks/reliability.py --no-write            # print only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from pathlib import Path

from _common import REPO, RESULTS, describe_machine, git_state, write_section

SECTION = "reliability"
MODULES = ["tests/test_serve_reliability.py", "tests/test_reliability_files.py", "tests/test_sampling.py"]
SUITE_FUZZ_EXAMPLES = 25  # the schemathesis test's own default (FUZZ_EXAMPLES in tests/test_serve_reliability.py)
# Classes whose tests provoke a 5xx on purpose and assert exactly it; a 5xx anywhere else is a failure.
EXPECTED_5XX = {"1b.": "500 for the sequence whose weights are NaN", "1c.": "500, then 503, once the engine loop dies",
                "7. connections": "503 over --max-connections"}


# ---- running the tests ----------------------------------------------------------------------------------------

def run_tests(work: Path, hypothesis_seed: int, fuzz_examples: int) -> tuple[list[dict], dict, float]:
    """pytest on MODULES with the report switched on -> (observations, {test id: outcome and seconds}, wall s)."""
    observations, junit = work / "observations.jsonl", work / "junit.xml"
    env = {**os.environ, "FMFORGE_RELIABILITY_REPORT": str(observations),
           "FMFORGE_FUZZ_EXAMPLES": str(fuzz_examples)}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}",
               f"--hypothesis-seed={hypothesis_seed}", *MODULES]
    print("$ " + " ".join(command[1:]), flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=REPO, env=env)  # its output goes to the terminal; outcomes come from the XML
    wall = time.monotonic() - started
    lines = observations.read_text().splitlines() if observations.exists() else []
    outcomes = read_junit(junit) if junit.exists() else {}  # none: pytest stopped before running tests
    return [json.loads(line) for line in lines], outcomes, wall


def read_junit(path: Path) -> dict[str, dict]:
    """{"tests/x.py::test_y[p]": {"outcome": passed|failed|skipped, "seconds": float}} from pytest's JUnit XML."""
    results = {}
    for case in ElementTree.parse(path).iter("testcase"):
        module = case.get("classname").replace(".", "/") + ".py"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        results[f"{module}::{case.get('name')}"] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
    return results


def classes_of_tests() -> dict[str, str]:
    """{"tests/x.py::test_y": class}: the `# ---- N. title ----` header above each test in its module (the module's
    name where it has none)."""
    classes = {}
    for module in MODULES:
        current = module
        for line in (REPO / module).read_text().splitlines():
            if header := re.match(r"# -+ (.+?) -+$", line):
                current = header.group(1)
            elif test := re.match(r"(?:async )?def (test_\w+)", line):
                classes[f"{module}::{test.group(1)}"] = current
    return classes


# ---- counting ---------------------------------------------------------------------------------------------------

def class_of(test: str, classes: dict[str, str]) -> str:
    return classes.get(test.split("[", 1)[0], "unknown test")


def is_5xx(status) -> bool:
    return isinstance(status, int) and status >= 500


def expects_5xx(name: str) -> bool:
    return any(name.startswith(prefix) for prefix in EXPECTED_5XX)


def summarise(observations: list[dict], outcomes: dict[str, dict], classes: dict[str, str]) -> dict:
    """Everything the section reports, per class and in total."""
    per_class = defaultdict(lambda: {"tests": Counter(), "seconds": 0.0, "statuses": Counter(), "refused": 0})
    for test, result in outcomes.items():
        row = per_class[class_of(test, classes)]
        row["tests"][result["outcome"]] += 1
        row["seconds"] += result["seconds"]
    fuzz, examples, rows_sampled = Counter(), 0, 0
    kills, survived = defaultdict(list), defaultdict(list)
    for seen in observations:
        kind, row = seen["kind"], per_class[class_of(seen["test"], classes)]
        if kind == "request" and not (seen.get("method") == "GET" and seen.get("path") == "/metrics"):
            row["statuses"][seen["status"]] += 1
        elif kind == "refused command":
            row["refused"] += 1
        elif kind == "fuzz":
            fuzz[(seen["mode"], seen["status"])] += 1
        elif kind == "property example":
            examples, rows_sampled = examples + 1, rows_sampled + seen["rows"]
        elif kind == "kill":
            kills[seen["write"]].append(seen)
        elif kind == "kill survived":
            survived[seen["write"]].append(seen)
    order = {name: i for i, name in enumerate(dict.fromkeys(classes.values()))}
    return {"classes": dict(sorted(per_class.items(), key=lambda item: order.get(item[0], len(order)))),
            "fuzz": fuzz, "examples": examples, "rows_sampled": rows_sampled, "kills": kills, "survived": survived,
            "outcomes": Counter(result["outcome"] for result in outcomes.values())}


def counts_text(counter: Counter) -> str:
    """"200 ×23, 400 ×31, client left ×5": HTTP statuses in order, then the other labels."""
    keys = sorted(counter, key=lambda k: (not isinstance(k, int), str(k)))
    return ", ".join(f"{k} ×{counter[k]}" for k in keys) or "-"


# ---- the section ------------------------------------------------------------------------------------------------

def server_statuses(summary: dict) -> Counter:
    """The server tests' answers by class of status: "2xx", "4xx", "5xx" (in a class that provokes it),
    "5xx unexpected", and the raw-socket labels ("client left", "closed")."""
    totals = Counter()
    for name, row in summary["classes"].items():
        for status, n in row["statuses"].items():
            if not isinstance(status, int):
                totals[status] += n
            else:
                totals[f"{status // 100}xx" + (" unexpected" if is_5xx(status) and not expects_5xx(name) else "")] += n
    return totals


def headline(summary: dict) -> list[str]:
    """The numbers issue 12 asks for: cases tried, fuzz requests and their 5xx, kill trials and lost checkpoints."""
    classes, fuzz, kills, survived = summary["classes"], summary["fuzz"], summary["kills"], summary["survived"]
    statuses = server_statuses(summary)
    sockets = ", ".join(f"{label} ×{n}" for label, n in sorted(statuses.items()) if not label[0].isdigit())
    fuzz_5xx = sum(n for (_, status), n in fuzz.items() if is_5xx(status))
    lost = sum(len(kills[write]) - len(survived[write]) for write in kills)
    return [
        "- **Tests**: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(summary["outcomes"].items())) + ".",
        f"- **Cases tried against the server** (classes 1a-8, the tests' reads of /metrics left out): "
        f"{sum(statuses.values())} requests and raw-socket cases: 4xx ×{statuses['4xx']} (refusals of bad input and "
        f"bad HTTP), 2xx ×{statuses['2xx']} (extreme but valid values, and the checks that the server still serves), "
        f"{sockets}, **{statuses['5xx unexpected']} 5xx outside the fault classes**; 5xx ×{statuses['5xx']} inside "
        "them, each the status its test provokes and asserts ("
        + "; ".join(f"{k.rstrip('.')}: {v}" for k, v in EXPECTED_5XX.items()) + ").",
        f"- **Fuzz requests**: {sum(fuzz.values())} schemathesis requests "
        f"({counts_text(Counter(mode for mode, _ in fuzz.elements()))}) with **{fuzz_5xx} 5xx**; "
        f"{summary['examples']} hypothesis examples of the sampler's property test ({summary['rows_sampled']} sampled "
        "rows; the test asserts one valid token per row, finite log-probabilities, the argmax for plain greedy rows).",
        f"- **Files and training** (classes 9-12): {sum(row['refused'] for row in classes.values())} refused "
        "commands, each checked to be one `error:` line, no traceback.",
        f"- **SIGKILL trials**: {sum(len(v) for v in kills.values())}, **{lost} lost checkpoints** (a trial counts "
        "as lost unless `latest` then loads and the resume, or for shards the re-run, is exact).",
    ]


def class_table(summary: dict) -> list[str]:
    """One row per class: tests passed, time, what was sent and what came back."""
    fuzz = summary["fuzz"]
    lines = ["| class (header in the test module) | tests passed | seconds (with fixtures) | requests / cases: "
             "status ×count | 5xx |", "|---|---:|---:|---|---:|"]
    for name, row in summary["classes"].items():
        server = bool(row["statuses"]) or name.startswith("8.")
        five = sum(n for status, n in row["statuses"].items() if is_5xx(status))
        cases = [counts_text(row["statuses"])] if row["statuses"] else []
        if name.startswith("8.") and fuzz:
            cases.append(f"schemathesis {counts_text(Counter(status for _, status in fuzz.elements()))}")
            five += sum(n for (_, status), n in fuzz.items() if is_5xx(status))
        if row["refused"]:
            cases.append(f"{row['refused']} refused commands")
        if name == "tests/test_sampling.py":
            cases.append(f"{summary['examples']} hypothesis examples")
        if name.startswith("SIGKILL"):
            cases.append(f"{sum(len(v) for v in summary['kills'].values())} kill trials (table below)")
        lines.append(f"| {name} | {row['tests']['passed']}/{sum(row['tests'].values())} | {row['seconds']:.0f} | "
                     f"{'; '.join(cases) or '-'} | {five if server else '-'} |")
    return lines + ["", "Status labels besides HTTP codes: `client left` = the test closed the connection before an "
                    "answer (the server counts it 499), `closed` = the server closed an idle connection without one."]


def kill_table(summary: dict) -> list[str]:
    """One row per kind of write: trials, how many hit before the rename, the delays, and what survived."""
    kills, survived = summary["kills"], summary["survived"]
    lines = ["| SIGKILL during | trials | killed before the rename (temporary directory left) | delays after the "
             "write began (ms) | survived: `latest` loads, resume / re-run exact | lost |",
             "|---|---:|---:|---|---:|---:|"]
    for write, trials in kills.items():
        left = Counter(s["left"] for s in survived[write] if "left" in s)
        lines.append(f"| {write} writes | {len(trials)} | {sum(t['left_temporary'] for t in trials)} | "
                     + ", ".join(f"{t['delay_ms']:.1f}" for t in trials) + " | "
                     f"{len(survived[write])}{f' ({counts_text(left)})' if left else ''} | "
                     f"{len(trials) - len(survived[write])} |")
    if "shards" in kills:
        lines += ["", "Shards have no `latest`: a killed `prepare` must leave the old dataset, the new one, or (killed "
                  "while the new files move into a non-empty directory) no manifest, which readers refuse as no "
                  "dataset until a re-run; the re-run then builds exactly the reference dataset."]
    return lines


def render(summary: dict, command: str, wall: float, hypothesis_seed: int, fuzz_examples: int) -> str:
    seeds = sorted({(trial["write"], trial["seed"]) for trials in summary["kills"].values() for trial in trials})
    lines = [
        "## Reliability: hostile input, faults, fuzzing and SIGKILL during writes (issue 12)",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {git_state()}; {wall / 60:.1f} min). "
        f"Machine: {describe_machine()}.",
        f"What ran: `pytest {' '.join(MODULES)}`; every count below is taken where the test sends or checks it "
        "(see the docstring of benchmarks/reliability.py). Seeds: hypothesis "
        f"`--hypothesis-seed={hypothesis_seed}` (the sampler's property test); schemathesis derandomized, "
        f"{fuzz_examples} examples per POST operation and mode; kill delays from `random.Random(seed)`, "
        + ", ".join(f"{write} {seed}" for write, seed in seeds) + ".",
        "",
    ]
    return "\n".join(lines + headline(summary) + [""] + class_table(summary) + [""] + kill_table(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hypothesis-seed", type=int, default=0, help="seed of the sampler's property test")
    parser.add_argument("--fuzz-examples", type=int, default=SUITE_FUZZ_EXAMPLES,
                        help="schemathesis examples per POST operation and mode (GET operations get 3)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python benchmarks/reliability.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as work:
        observations, outcomes, wall = run_tests(Path(work), args.hypothesis_seed, args.fuzz_examples)
    summary = summarise(observations, outcomes, classes_of_tests())
    body = render(summary, command, wall, args.hypothesis_seed, args.fuzz_examples)
    print("\n" + body)
    failed = summary["outcomes"]["failed"]
    if failed or not outcomes:
        print(f"\nnot written: {failed} test(s) failed" if failed else "\nnot written: pytest ran no tests")
        sys.exit(1)
    if not args.no_write:
        write_section(SECTION, body)
        print(f"\nwritten: {RESULTS.name} (section {SECTION})")


if __name__ == "__main__":
    main()
