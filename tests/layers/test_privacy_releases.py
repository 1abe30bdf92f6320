"""The privacy set-up reads what each protocol declares it releases, and refuses what DP cannot book.

Issue 19, findings 3-7: a protocol declares its private metadata, its weighted sums, its peer-to-peer messages,
what bypasses the layers and what couples records; ``refuse_unsafe_releases`` refuses the unsafe combinations
before round 1, with one error that names the settings. The attacks themselves are in ``tests/adversary``.
"""

from __future__ import annotations

from typing import Any

import pytest

from securefl.layers.base import LayerSetupError
from securefl.layers.privacy import refuse_unsafe_releases, unsafe_release_reasons
from securefl.runtime.federation import build_world
from tests.conftest import tiny_config

SAME_MODELS = [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]
HETEROFL = {"hidden_sizes": [8, 16], "proportions": "a1-b1-c1"}


def _protocol(protocol: str, **changes: Any) -> Any:
    return build_world(tiny_config(protocol=protocol, participants=SAME_MODELS, **changes), "run")[-1]


CASES = [
    # (protocol, its section, the units it is refused under, the setting the refusal names)
    ("fedavg", {}, {"record", "participant", "distributed"}, "fedavg.weighting: uniform"),
    ("fml", {"weighting": "samples"}, {"record", "participant", "distributed"}, "fml.weighting: uniform"),
    ("fedgen", {"mode": "reference"}, {"record", "participant", "distributed"}, "fedgen.head_aggregation: mean"),
    ("fedgen", {"head_aggregation": "weighted_mean"}, {"record", "participant", "distributed"},
     "fedgen.head_aggregation: mean"),
    ("heterofl", {**HETEROFL, "norm": "bn", "label_split": "all"}, {"record", "participant", "distributed"},
     "heterofl.norm: gn"),
    ("heterofl", {**HETEROFL, "norm": "gn"}, {"record", "participant", "distributed"}, "heterofl.label_split: all"),
    ("fedh2l", {"exchange": "direct"}, {"distributed"}, "fedh2l.exchange: relay_sum"),
]
UNITS = {"record": ("record", "local"), "participant": ("participant", "local"),
         "distributed": ("participant", "distributed")}


@pytest.mark.parametrize(("protocol", "section", "refused", "remedy"), CASES)
def test_each_unsafe_release_is_refused_under_the_dp_units_it_breaks(protocol: str, section: dict, refused: set,
                                                                     remedy: str) -> None:
    proto = _protocol(protocol, **{protocol: section})
    assert unsafe_release_reasons(proto, unit="none", noise="local") == []  # without DP nothing is promised
    for name, (unit, noise) in UNITS.items():
        if name in refused:
            with pytest.raises(LayerSetupError, match=f"privacy.unit = '{unit}'") as exc:
                refuse_unsafe_releases(proto, unit=unit, noise=noise)
            assert remedy in str(exc.value) and "\n" not in str(exc.value)
        else:
            refuse_unsafe_releases(proto, unit=unit, noise=noise)


@pytest.mark.parametrize(("protocol", "section"), [
    ("fedavg", {"weighting": "uniform"}), ("fml", {}), ("fedgen", {}), ("fedh2l", {"exchange": "relay_sum"}),
    ("heterofl", {**HETEROFL, "norm": "gn", "label_split": "all"}), ("fedmd", {})])
def test_the_safe_settings_pass_under_every_dp_unit(protocol: str, section: dict) -> None:
    proto = _protocol(protocol, **{protocol: section})
    for unit, noise in UNITS.values():
        assert unsafe_release_reasons(proto, unit=unit, noise=noise) == [], (protocol, unit, noise)


def test_heterofl_record_coupling_matters_only_at_record_level_and_only_with_the_mask() -> None:
    # Without the mask the classes present still travel as metadata (refused under both units), but no record's
    # loss depends on another's.
    unmasked = _protocol("heterofl", heterofl={**HETEROFL, "norm": "gn", "mask": False})
    assert unmasked.record_coupling() is None and unmasked.uplink_metadata()["label_split"].private
    masked = _protocol("heterofl", heterofl={**HETEROFL, "norm": "gn"})
    assert "heterofl.label_split" in masked.record_coupling()
    assert not any("clipping" in r for r in unsafe_release_reasons(masked, unit="participant", noise="local"))
    assert any("clipping" in r for r in unsafe_release_reasons(masked, unit="record", noise="local"))


def test_fedh2l_direct_exchange_is_refused_by_secure_aggregation_pointing_to_relay_sum() -> None:
    direct, relay = _protocol("fedh2l"), _protocol("fedh2l", fedh2l={"exchange": "relay_sum"})
    assert "fedh2l.exchange: relay_sum" in direct.secure_aggregation_refusal()
    assert relay.secure_aggregation_refusal() is None and relay.peer_to_peer() is None
