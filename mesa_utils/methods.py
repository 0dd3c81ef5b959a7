"""The defences of 04's comparison in one registry: each method's name (the `method` column of
every table), its legend label and style in figures, and the paper's after-defence result for
it. The registry's order is the order of every table and legend.

"mesa" stands for one sub-model of the staircase per beta; tables label it by its beta
(method_label), and the paper reports beta = 0.9 apart from the other sub-models.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    label: str          # in figure legends
    colour: str         # a matplotlib colour
    marker: str         # a matplotlib marker
    paper: str          # the paper's after-defence ASR, or why it has none
    # retrained at every rate of 07's exposure curve and in 08's contrast (of MESA there, only
    # the highest beta's sub-model): the paper's contrast and the controls
    exposure: bool = False


METHODS = {
    "mesa": Method("MESA", "tab:blue", "o", "worst <= 9.1%", exposure=True),
    "mesa_mixture": Method("MESA mixture", "tab:purple", "D", "worst <= 9.1%", exposure=True),
    "mesa_entropy_mixture": Method("MESA mixture, Algorithm 1 weights", "tab:pink", "P",
                                   "(not in the paper's experiments)"),
    "baseline": Method("baseline", "tab:red", "s", "2.4-51.4% over runs", exposure=True),
    "neural_cleanse": Method("Neural Cleanse", "tab:orange", "^", "(not in the paper)"),
    "neural_cleanse_crop": Method("Neural Cleanse, cropped, random places", "gold", "<",
                                  "(not in the paper)"),
    "ideal": Method("ideal", "tab:green", "*", "mean 2.4%", exposure=True),
    "finetune": Method("control: fine-tune, no trigger", "tab:gray", "X",
                       "(control, not in the paper)", exposure=True),
    "random_patch": Method("control: random 3x3 patches", "tab:brown", "v",
                           "(control, not in the paper)", exposure=True),
    "mesa_free": Method("MESA, size-free (colour and transparency)", "tab:cyan", "h",
                        "(the paper's future work, not in its experiments)"),
}
# 04 compares every method but the size-free MESA, which notebook 09 compares (and 04 where
# defense_methods names it).
DEFAULT_METHODS = tuple(name for name in METHODS if name != "mesa_free")
EXPOSURE_METHODS = tuple(name for name, method in METHODS.items() if method.exposure)
# MESA's variant that every "MESA against the baseline" sentence uses (04's conclusions, 08's
# contrast, the report), fixed before any of those ran: the uniform mixture over the
# staircase, the paper's practical choice.
CONTRAST_MESA = "mesa_mixture"
# Retraining without knowing the trigger: what a method removes beyond them is its own.
CONTROLS = ("finetune", "random_patch")
# The paper's numbers for a sub-model of a given beta where it reports one apart (Fig. 4),
# and for the backdoored models before any defence.
PAPER_MESA_BY_BETA = {0.9: "mean 3.4%, worst 5.9%"}
PAPER_BEFORE_DEFENCE = "ASR 92.3-99.8% (mean 98.7%)"


def method_label(method: str, beta) -> str:
    """A table's name for a run: "mesa beta=<beta>" for a staircase sub-model, else the
    method's name."""
    return f"mesa beta={beta:g}" if method == "mesa" else method


def paper_result(label: str) -> str:
    """The paper's number for a method_label (or "before defence"), "" for an unknown one."""
    if label == "before defence":
        return PAPER_BEFORE_DEFENCE
    if label.startswith("mesa beta="):
        return PAPER_MESA_BY_BETA.get(float(label.split("=")[1]), METHODS["mesa"].paper)
    return METHODS[label].paper if label in METHODS else ""
