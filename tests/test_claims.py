"""The claims table: each check says yes or no on data built to pass or fail it."""

import numpy as np
import pandas as pd
import pytest

from resnet_ode import claims
from resnet_ode.cli import main


def linear_data(jumpy: bool, ode_slope: float) -> pd.DataFrame:
    layers = np.arange(100)
    values = np.sin(layers / 100 * np.pi)
    if jumpy:
        values = np.random.default_rng(0).normal(size=100)
    weights = pd.DataFrame(
        dict(panel="weights", step=5, layer=layers, value=values, depth=np.nan)
    )
    depths = np.array([4, 8, 16, 32, 64])
    ode = pd.DataFrame(
        dict(
            panel="ode",
            step=np.nan,
            layer=np.nan,
            depth=depths,
            value=depths.astype(float) ** ode_slope,
        )
    )
    return pd.concat([weights, ode], ignore_index=True)


def sweep_data(gaps: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for scheme, scheme_gaps in gaps.items():
        for depth, gap in zip([2, 4, 8, 16], scheme_gaps, strict=True):
            for grad, error in (("backprop", 0.1), ("adjoint", 0.1 + gap)):
                rows.append(
                    dict(
                        scheme=scheme,
                        grad=grad,
                        depth=depth,
                        seed=1,
                        plotted_error=error,
                    )
                )
    return pd.DataFrame(rows)


def test_linear_case_needs_smooth_weights_and_first_order_distance():
    assert claims.linear_case(linear_data(jumpy=False, ode_slope=-1.0))[1]
    assert not claims.linear_case(linear_data(jumpy=True, ode_slope=-1.0))[1]
    assert not claims.linear_case(linear_data(jumpy=False, ode_slope=-0.3))[1]


def test_reconstruction_slope_must_be_near_minus_one():
    depths = np.array([2, 4, 8, 16, 32])
    first_order = pd.DataFrame(dict(depth=depths, error=1.0 / depths))
    second_order = pd.DataFrame(dict(depth=depths, error=1.0 / depths**2))
    assert claims.reconstruction(first_order)[1]
    assert not claims.reconstruction(second_order)[1]


def test_adjoint_gap_must_close_and_heun_must_close_it_first():
    heun_first = sweep_data(
        {"euler": [0.5, 0.3, 0.1, 0.0], "heun": [0.3, 0.0, 0.0, 0.0]}
    )
    assert claims.adjoint_approaches_backprop(heun_first)[1]
    assert claims.heun_needs_fewer_layers(heun_first)[1]

    euler_first = sweep_data(
        {"euler": [0.3, 0.0, 0.0, 0.0], "heun": [0.5, 0.3, 0.1, 0.0]}
    )
    assert not claims.heun_needs_fewer_layers(euler_first)[1]

    no_gap = sweep_data({"euler": [0.0] * 4, "heun": [0.0] * 4})
    measured, holds = claims.heun_needs_fewer_layers(no_gap)
    assert not holds and "not distinguishable" in measured

    widening = sweep_data({"euler": [0.1, 0.2, 0.3, 0.4], "heun": [0.1, 0.2, 0.3, 0.4]})
    assert not claims.adjoint_approaches_backprop(widening)[1]


def test_gradient_error_must_fall_and_heun_must_be_lower():
    rows = []
    for depth in (4, 8, 16):
        rows.append(dict(scheme="euler", depth=depth, rel_error=1.0 / depth))
        rows.append(dict(scheme="heun", depth=depth, rel_error=0.1 / depth**2))
    assert claims.gradient_error(pd.DataFrame(rows))[1]
    swapped = pd.DataFrame(rows).replace({"scheme": {"euler": "heun", "heun": "euler"}})
    assert not claims.gradient_error(swapped)[1]


@pytest.mark.parametrize(("adjoint_per_layer", "holds"), [(0.001, True), (0.5, False)])
def test_memory_backprop_linear_adjoint_flat(adjoint_per_layer, holds):
    depths = np.array([1, 2, 4, 8, 16, 32])
    rows = [
        dict(grad="backprop", depth=d, peak_mib=4 + 1.0 * d, state_mib=1.0)
        for d in depths
    ]
    rows += [
        dict(grad="adjoint", depth=d, peak_mib=6 + adjoint_per_layer * d, state_mib=1.0)
        for d in depths
    ]
    assert claims.memory(pd.DataFrame(rows))[1] is holds


def test_missing_data_is_not_run_and_unknown_files_are_refused(tmp_path):
    data = pd.DataFrame(dict(accuracy_before=[0.5], accuracy_after=[0.6], gain=[0.1]))
    data.to_csv(tmp_path / "finetuning.csv", index=False)
    out = tmp_path / "claims"

    assert (
        main(
            ["claims", "--results", str(tmp_path / "finetuning.csv"), "--out", str(out)]
        )
        == 0
    )
    table = pd.read_csv(tmp_path / "claims.csv")
    assert table.set_index("claim").loc[9, "holds"] == "yes"
    assert (table.set_index("claim").drop(index=9)["holds"] == "not run").all()
    assert "| 9 |" in (tmp_path / "claims.md").read_text()

    (tmp_path / "other.csv").write_text("a\n1\n")
    with pytest.raises(ValueError, match="serves no claim"):
        main(["claims", "--results", str(tmp_path / "other.csv"), "--out", str(out)])


def test_a_claim_missing_a_compared_part_is_not_testable():
    euler_only = sweep_data({"euler": [0.5, 0.3, 0.1, 0.0]})
    table = claims.evaluate_claims({"depth_sweep": euler_only})
    verdicts = table.set_index("claim")["holds"]
    assert verdicts[5] == verdicts[6] == "not testable"
    assert "scheme ['heun']" in table.set_index("claim").loc[6, "measured"]
