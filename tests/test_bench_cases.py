"""The benchmark's cases: a comparison column whose package or class is missing is left blank
with the reason, instead of crashing the run (python -m optkern bench is the README's main job)."""

import dataclasses

from optkern.benchmark import cases, runner


def test_missing_peer_package_is_reported_not_imported():
    case = dataclasses.replace(
        cases.CASES["lion"], oracle_modules=("optkern_no_such_package_for_tests",)
    )
    assert case.peer_missing() == "optkern_no_such_package_for_tests is not installed"


def test_a_row_without_its_peer_is_blank_with_the_reason():
    case = dataclasses.replace(
        cases.CASES["lion"], oracle_modules=("optkern_no_such_package_for_tests",)
    )
    rows = runner.run_main([case], [1000], 1, True, runner.Progress(1, enabled=False))
    (row,) = rows
    assert "torch" not in row and "speedup_vs_torch" not in row
    assert row["torch_missing"] == "optkern_no_such_package_for_tests is not installed"
    assert row["optkern"]["seconds"] > 0
    table = runner.main_table(rows)
    assert "optkern_no_such_package_for_tests is not installed" in table


def test_every_registry_rule_has_a_case():
    import optkern as ok

    for r in ok.registry.rules():
        assert r.name in cases.CASES or any(
            r.cls in (c.label, c.torch_name) for c in cases.CASES.values()
        ), r.cls
