"""utils.notebook_params: list parameters as papermill delivers them (`-p` gives a string)."""

import pytest

from utils.notebook_params import list_parameter, mapping_parameter


def test_list_parameters_accept_lists_json_strings_one_item_and_none():
    assert list_parameter(["a", "b"]) == ["a", "b"]
    assert list_parameter(("a",)) == ["a"]
    assert list_parameter('["work/artifacts/vit_tiny", "b"]') == ["work/artifacts/vit_tiny", "b"]
    assert list_parameter(" [] ") == []
    assert list_parameter("work/artifacts/vit_tiny") == ["work/artifacts/vit_tiny"]
    assert list_parameter(None) == [] and list_parameter("") == []


def test_a_broken_list_names_the_parameter():
    with pytest.raises(ValueError, match=r"image_oof_dirs: .* not valid JSON .*double quotes"):
        list_parameter("['a', 'b']", "image_oof_dirs")
    with pytest.raises(ValueError, match="image_oof_dirs: expected a list"):
        list_parameter(3, "image_oof_dirs")
    with pytest.raises(ValueError, match="expected a list"):
        list_parameter({"a": 1}, "x")


def test_mapping_parameters_accept_dicts_json_strings_and_none():
    assert mapping_parameter({"vit_tiny": "a.pth"}) == {"vit_tiny": "a.pth"}
    assert mapping_parameter('{"vit_tiny": "w/a.pth"}') == {"vit_tiny": "w/a.pth"}
    assert mapping_parameter(None) is None


def test_a_broken_mapping_names_the_parameter():
    with pytest.raises(ValueError, match=r"weights_path: .* not a JSON object .*double quotes"):
        mapping_parameter("{'vit_tiny': 'a.pth'}", "weights_path")
    with pytest.raises(ValueError, match="weights_path: expected a mapping"):
        mapping_parameter('["a.pth"]', "weights_path")
