"""quantize's algorithm table is the one place `--algorithm` comes from: its choices, its
help, which module runs and what enters the cache key."""

from phitune import options
from phitune.quantize.algorithms import ALGORITHMS, get
from phitune.quantize.options import QuantizeOptions


def test_algorithm_option_is_read_from_the_table():
    spec = {f.name: s for f, s in options.specs(QuantizeOptions)}["algorithm"]
    assert spec.choices == tuple(ALGORITHMS)
    assert all(f"{a.name}: {a.summary}" in spec.help for a in ALGORITHMS.values())


def test_each_entry_names_a_module_that_quantizes_a_layer():
    for algorithm in ALGORITHMS.values():
        assert callable(algorithm.quantize_layer), algorithm.name


def test_a_search_version_enters_the_key_under_the_algorithm_name():
    from phitune.quantize.algorithms import awq
    assert get("awq").key_params == {"awq_search": awq.SEARCH_VERSION}
    assert get("rtn").key_params == {}
    from phitune.quantize.algorithms import awq_gptq, gptq
    assert get("gptq").key_params == {"gptq_search": gptq.SEARCH_VERSION}
    assert get("awq_gptq").key_params == {"awq_gptq_search": awq_gptq.SEARCH_VERSION}
