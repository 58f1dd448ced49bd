"""Reliability as a figure: the hostile-node and careless-user cases of issues 18 and 27, each
run (as its test) and printed as PASS or FAIL.

Each case is the test that tries the attack or the mistake against fedlora (written so that it
fails on the code before the fix), run in one pytest process; the table says which case each
test is. ``--all`` adds the slow cases that start Flower processes (the README's simulation
command three times, a real SuperLink with three SuperNodes and a killed ServerApp: minutes);
the fast ones (about a minute on 2 cores) are also part of the test suite.

    python scripts/reliability.py          # fast cases
    python scripts/reliability.py --all    # and the Flower processes

Exit status 0 when every case passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (issue, case, test id, slow)
CASES: list[tuple[int, str, str, bool]] = [
    (27, "a lone client scaling to just under its bound each round (engine)",
     "tests/test_robust.py::test_an_escalating_lone_client_cannot_ratchet_its_bound", False),
    (27, "... the same attacker, 50 rounds, ratios 2/20/1000 (the bound's policy)",
     "tests/test_robust.py::test_a_lone_client_aiming_just_under_its_bound_cannot_ratchet_it",
     False),
    (27, "... the same attacker as a Flower node",
     "tests/test_flower_strategy.py::test_an_escalating_lone_node_cannot_ratchet_its_bound",
     False),
    (27, "--overwrite with a user's merged/, tracking.json, plots/fig1.png in the run dir",
     "tests/test_run_dirs.py::test_overwrite_keeps_a_users_files_inside_a_run_directory", False),
    (27, "a bytes-valued fedlora.node-place record (result.json)",
     "tests/test_flower_results.py::test_a_bytes_valued_node_place_does_not_break_result_json",
     False),
    (27, "a round-1 reply replayed in round 2; a reply whose message id matches nothing",
     "tests/test_flower_strategy.py::test_a_reply_is_tied_to_its_message_and_round", False),
    (27, "disk full while saving a plot",
     "tests/test_careless.py::test_a_full_disk_while_plotting_is_a_warning", False),
    (27, "disk full mid-run (metrics append)",
     "tests/test_careless.py::test_a_full_disk_mid_run_is_one_line_and_the_run_resumes", False),
    (27, "privacy.noise_multiplier = 1e308",
     "tests/test_careless.py::test_an_overflowing_noise_multiplier_is_one_line", False),
    (27, "--resume of a finished run whose checkpoint was deleted",
     "tests/test_run_dirs.py::test_resume_of_a_finished_run_without_its_checkpoint_is_refused",
     False),
    (27, "deleting .fedlora.lock during a run",
     "tests/test_run_dirs.py::test_deleting_the_lock_file_does_not_unlock_the_directory", False),
    (27, "one file mode for every output (the adapter was 0600)",
     "tests/test_run_dirs.py::test_every_output_has_the_same_mode", False),
    (27, "ranks above a module's size (capped: now said)",
     "tests/test_careless.py::test_ranks_above_a_modules_size_are_capped_with_a_warning", False),
    (27, "200 rows of empty strings (now said)",
     "tests/test_careless.py::test_rows_of_empty_strings_are_said", False),
    (27, "a killed ServerApp resumes from its checkpoint (in-process grid)",
     "tests/test_flower_results.py::test_a_killed_server_app_resumes_from_its_checkpoint", False),
    (27, "the ServerApp's result folder is locked and tracked",
     "tests/test_flower_results.py::test_the_result_folder_is_locked_and_tracked", False),
    (27, "a Flower home inside the app it packages",
     "tests/test_flower_home.py::test_a_flower_home_inside_the_app_is_refused", False),
    (27, "the README's simulation command 3 times, PATH without the venv",
     "tests/test_flower_home.py::test_the_readme_simulation_command_runs_again_and_again", True),
    (27, "3 SuperNodes, one hostile, the ServerApp SIGKILLed and resumed",
     "tests/test_flower_deployment.py::test_a_hostile_node_and_a_killed_server_app", True),
    (18, "a node reporting 10**12 examples with B x 15",
     "tests/test_flower_strategy.py::test_a_hostile_example_count_cannot_capture_the_global_model",
     False),
    (18, "malformed replies (list meta, negated scale, int64, float16, bool count)",
     "tests/test_flower_strategy.py::test_a_malformed_reply_is_a_dropped_reply_not_a_crash",
     False),
    (18, "a lone 1e6-scaled client",
     "tests/test_robust.py::test_a_lone_1e6_client_is_never_accepted", False),
    (18, "a second run into a directory in use",
     "tests/test_run_dirs.py::test_a_second_run_into_a_directory_in_use_is_refused", True),
    (18, "a byte-flipped checkpoint",
     "tests/test_run_dirs.py::test_a_byte_flipped_checkpoint_is_refused", False),
    (18, "torn last lines of the JSONL files",
     "tests/test_run_dirs.py::test_torn_last_lines_are_repaired_on_resume", False),
    (18, "a user's folder as --output-dir",
     "tests/test_run_dirs.py::test_a_users_folder_is_left_byte_identical", False),
]  # fmt: skip


def _outcomes(junit: Path) -> dict[str, bool]:
    """test id (without parameters) -> whether all its runs passed."""
    out: dict[str, bool] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        name = case.get("name", "").split("[")[0]
        ok = not any(case.find(tag) is not None for tag in ("failure", "error", "skipped"))
        key = f"{path}::{name}"
        out[key] = out.get(key, True) and ok
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="also the slow Flower cases")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.all or not c[3]]
    ids = list(dict.fromkeys(c[2] for c in cases))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
             *ids],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        got = _outcomes(junit) if junit.exists() else {}
    failed = 0
    for issue, what, test, _ in cases:
        ok = got.get(test, False)
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  #{issue}  {what}")
    print(f"\n{len(cases) - failed} of {len(cases)} cases pass"
          + ("" if args.all else " (fast cases; --all adds the Flower processes)"))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
