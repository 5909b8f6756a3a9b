"""methods.py: the registry of decoding methods (tests/test_imports.py checks the import graph it keeps free of circles)."""

import pytest

from pdllm.methods import METHODS, make_method
from pdllm.sampler import GenerationConfig, generate


def test_every_method_is_registered_under_its_own_name():
    assert list(METHODS) == ["vanilla", "prefix", "dual", "prefill", "dllm_cache", "dyllm"]
    for name, cls in METHODS.items():
        assert cls.name == name and isinstance(cls.supports_cfg, bool)
    assert [n for n, cls in METHODS.items() if cls.supports_cfg] == ["vanilla", "prefix", "dual"]
    assert make_method("prefix").dual is False and make_method("dual").dual is True


def test_a_method_object_passes_through_and_knobs_need_a_name():
    method = make_method("dyllm", tau=0.5)
    assert make_method(method) is method
    with pytest.raises(ValueError, match="go with a method name"):
        make_method(method, tau=0.9)


def test_cfg_is_refused_by_a_method_without_support(llada):
    gc = GenerationConfig(gen_length=8, block_length=8, steps=8, cfg_scale=1.0)
    with pytest.raises(ValueError, match="cfg_scale > 0 is not supported by method 'dllm_cache'"):
        generate(llada, [[1, 2, 3]], gc, method="dllm_cache")
    with pytest.raises(ValueError, match="go with a method name"):
        generate(llada, [[1, 2, 3]], gc, method=make_method("dual"), refresh_every=2)
