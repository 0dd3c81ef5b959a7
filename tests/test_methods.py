"""The registry of defence methods: names, labels and the paper's numbers, one place each."""
from mesa_utils.defense import DEFENSE_METHODS
from mesa_utils.methods import CONTROLS, METHODS, method_label, paper_result


def test_every_method_is_named_once_and_the_controls_are_methods():
    assert DEFENSE_METHODS == tuple(METHODS)
    assert set(CONTROLS) <= set(METHODS)
    assert len({m.label for m in METHODS.values()}) == len(METHODS)


def test_the_papers_numbers_are_found_by_a_tables_label():
    assert method_label("mesa", 0.9) == "mesa beta=0.9" and method_label("ideal", None) == "ideal"
    assert paper_result("mesa beta=0.9") == "mean 3.4%, worst 5.9%"     # reported apart
    assert paper_result("mesa beta=0.5") == "worst <= 9.1%"             # the staircase's
    assert paper_result("baseline") == "2.4-51.4% over runs"
    assert paper_result("before defence").startswith("ASR 92.3-99.8%")
    assert paper_result("something else") == ""
