"""The choices ``research/testbed.py --sweep`` and ``--calibrate`` make from their measurements."""

from testbed_lib.report import calibration_markdown
from testbed_lib.studies import choose, choose_budget


def _budget(value: float, low: float, high: float) -> dict:
    side = {"mean": 0.9, "std": 0.01, "seeds": [0.9, 0.9]}
    return {
        "opd": side,
        "sft": side,
        "difference": {"value": value, "low": low, "high": high, "problems": 10},
    }


def test_choose_budget_takes_the_surest_lead_and_the_longer_on_ties():
    budgets = {
        "25": _budget(0.05, 0.02, 0.08),
        "50": _budget(0.08, 0.01, 0.15),
        "100": _budget(-0.004, -0.009, 0.0),
    }
    # The biggest mean lead (50 steps) is less sure than 25 steps' lead.
    assert choose_budget(budgets) == 25
    budgets["50"] = _budget(0.06, 0.02, 0.10)
    assert choose_budget(budgets) == 50
    # With no lead anywhere the least negative lower end still wins, and the table says the
    # testbed cannot rank an on-policy method above SFT.
    losing = {"25": _budget(-0.01, -0.03, 0.01), "50": _budget(-0.02, -0.02, 0.0)}
    assert choose_budget(losing) == 50
    table = calibration_markdown(
        {
            "budgets": losing,
            "best": 50,
            "separates": False,
            "seeds": 2,
            "batch": 32,
            "num_extra_validation": 10,
            "command": "c",
        }
    )
    assert "cannot rank an on-policy method above SFT" in table
    assert "| 50 |" in table and "**-0.020 [-0.020, +0.000]**" in table
    table = calibration_markdown(
        {
            "budgets": budgets,
            "best": 50,
            "separates": True,
            "seeds": 2,
            "batch": 32,
            "num_extra_validation": 10,
            "command": "c",
        }
    )
    assert "interval lies above zero" in table and "cannot rank" not in table


def test_sweep_chooses_the_best_validation_accuracy_then_the_lower_kl():
    rows = [
        {"name": "sft", "lr": 1e-3, "accuracy": 0.9, "kl": 0.2},
        {"name": "sft", "lr": 3e-4, "accuracy": 0.9, "kl": 0.1},
        {"name": "sft", "lr": 3e-3, "accuracy": 0.8, "kl": 0.05},
        {"name": "dpca", "lr": 1e-4, "accuracy": 0.7, "kl": 0.3},
    ]
    assert choose(rows) == {"sft": 3e-4, "dpca": 1e-4}


def test_sweep_prefers_the_extra_validation_accuracy_where_measured():
    rows = [
        {"name": "sft", "lr": 1e-3, "accuracy": 0.95, "extra_accuracy": 0.91, "kl": 0.1},
        {"name": "sft", "lr": 3e-4, "accuracy": 0.94, "extra_accuracy": 0.93, "kl": 0.1},
    ]
    assert choose(rows) == {"sft": 3e-4}


def test_calibration_reads_sampled_accuracy_as_its_own_table():
    budgets = {"25": _budget(-0.01, -0.03, 0.01), "50": _budget(-0.02, -0.04, 0.0)}
    budgets["25"]["sampled_difference"] = {"value": 0.05, "low": 0.03, "high": 0.07}
    budgets["50"]["sampled_difference"] = {"value": 0.06, "low": 0.01, "high": 0.11}
    for entry in budgets.values():
        entry["sampled_opd"] = {"mean": 0.7, "std": 0.01, "seeds": [0.7, 0.7]}
        entry["sampled_sft"] = {"mean": 0.65, "std": 0.01, "seeds": [0.64, 0.66]}
    # Each accuracy chooses its own budget by its own intervals.
    assert choose_budget(budgets) == 25
    assert choose_budget(budgets, "sampled_difference") == 25
    budgets["50"]["sampled_difference"]["low"] = 0.04
    assert choose_budget(budgets, "sampled_difference") == 50
    table = calibration_markdown(
        {
            "budgets": budgets,
            "best": 25,
            "separates": False,
            "best_sampled": 50,
            "separates_sampled": True,
            "sampled_temperature": 1.0,
            "seeds": 2,
            "batch": 32,
            "num_extra_validation": 10,
            "command": "c",
            "sampled_starts": {"control": 0.37, "teacher": 0.99},
        }
    )
    greedy, sampled = table.split("Sampled accuracy")
    assert "cannot rank an on-policy method above SFT" in greedy
    assert "**+0.060 [+0.040, +0.110]**" in sampled and "interval lies above zero" in sampled
    assert "0.700 ± 0.010 | 0.700 0.700 | 0.650 ± 0.010 | 0.640 0.660" in sampled
    assert "temperature 1" in sampled and "0.370 sampled" in sampled
