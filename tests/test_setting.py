"""A decode setting is one frozen type: greedy's and sampling's read from a stream config and
written back through it, unchanged by a round trip, never patched in place."""

import dataclasses

import pytest

from mlx_specstream.setting import PLAIN, DecodeSetting
from mlx_specstream.streams import StreamConfig


def test_a_setting_is_frozen_and_replaced_not_patched():
    s = DecodeSetting(((0,), (1,)), 5, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lookup = 0
    t = s.replace(lookup=0)
    assert (s.lookup, t.lookup, t.tree) == (5, 0, s.tree)
    assert PLAIN.drafts_nothing and not DecodeSetting((), 3).drafts_nothing
    assert not DecodeSetting("auto").drafts_nothing and DecodeSetting("auto").paths == ()


@pytest.mark.parametrize(
    "setting",
    [
        DecodeSetting(((0,), (0, 0), (1,)), 3, 0.1, {"backend": "cpu"}),  # greedy
        DecodeSetting("auto:context", 8),  # greedy, sized every step
        DecodeSetting(((0,),), 2, 0.0, {"backend": "cpu"}, 0.7),  # sampling's
    ],
)
def test_a_setting_round_trips_through_the_stream_config(setting):
    cfg = StreamConfig(num_streams=3, tree=[[0]], lookup=1)
    written = StreamConfig.from_dict(cfg.with_setting(setting).to_dict())
    if setting.temp is None:
        assert written.setting == setting and written.sampled_setting is None
    else:
        assert written.sampled_setting == setting and written.setting == cfg.setting  # greedy's kept


def test_a_sampled_setting_cannot_be_sized_per_step():
    with pytest.raises(ValueError, match="sampled.tree must be rank paths"):
        StreamConfig.from_dict({"num_streams": 3, "sampled": {"tree": "auto", "lookup": 2, "temp": 0.7}})
