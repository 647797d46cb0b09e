"""MoE-tuning (MoE-LLaVA's stage 3): dense FFNs upcycled into mixtures of experts, trained with a
load-balancing loss, saved in a transformers MoE architecture where one fits (docs/MOE.md).

``spec``: the options and the saved description; ``block``: the MoE module; ``upcycle``: the
replacement and loading; ``balance``: aux loss and expert load; ``native``: Mixtral / Qwen2-MoE;
``output``: what a run or a merge writes.
"""

from cardtune.training.moe.balance import RoutingMonitor, coefficient_of_variation, moe_blocks
from cardtune.training.moe.block import MoEBlock, Routing
from cardtune.training.moe.spec import SPEC_FILE, SPEC_KEY, MoEError, MoESection, MoESpec
from cardtune.training.moe.upcycle import (
    MoEParts,
    find_ffns,
    folder_spec,
    load_moe_folder,
    model_spec,
    moe_model_class,
    moe_parts,
    plan_moe,
    same_structure,
    set_spec,
    upcycle,
)

__all__ = [
    "SPEC_FILE",
    "SPEC_KEY",
    "MoEBlock",
    "MoEError",
    "MoEParts",
    "MoESection",
    "MoESpec",
    "Routing",
    "RoutingMonitor",
    "coefficient_of_variation",
    "find_ffns",
    "folder_spec",
    "load_moe_folder",
    "model_spec",
    "moe_blocks",
    "moe_model_class",
    "moe_parts",
    "plan_moe",
    "same_structure",
    "set_spec",
    "upcycle",
]
