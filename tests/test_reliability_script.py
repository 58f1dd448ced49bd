"""`scripts/reliability.py` names existing tests, and reads pytest's report right (the cases
themselves run in the suite as their tests)."""

from __future__ import annotations

from pathlib import Path

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("reliability")


def test_every_case_names_a_test_that_exists():
    cases = _script().CASES
    assert len(cases) >= 20 and {issue for issue, *_ in cases} == {18, 27}
    for _, _, test, _ in cases:
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test


def test_the_junit_report_is_read_per_test(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_a" name="test_x[1]"/>'
        '<testcase classname="tests.test_a" name="test_x[2]"><failure/></testcase>'
        '<testcase classname="tests.test_a" name="test_y"/>'
        '</testsuite></testsuites>'
    )
    assert _script()._outcomes(junit) == {
        "tests/test_a.py::test_x": False,
        "tests/test_a.py::test_y": True,
    }
