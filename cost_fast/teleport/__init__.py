"""COST's teleport, one module per concept:

config.py            TeleportConfig, AdapterConfig, RescaleConfig: the settings
schedule.py          TeleportSchedule (when a teleport may run) and COST's Clock
semantics.py         the public code's and the paper's semantics: trigger, R, L_g, g' of HTR
lora.py              TeleportAdapter: the LoRA/LoHa adapter in weight space
perturbed.py         task losses at perturbed or substituted parameters (L_g's samples)
adapter_teleport.py  teleport(): train the adapter on L_t and L_g, merge
graphs.py            GraphedStep: the adapter step captured in a CUDA graph and replayed
rescaling.py         RescalingTeleport: the group action of hidden-unit rescalings
contour.py           L* and the level-set error over the teleport data; eval mode
verdict.py           settle(): whether a teleport of any kind stays, or is rolled back
htr.py               HistoryReuse: Adam's history after a teleport
teleporter.py        Teleporter: which teleport runs inside COST, its report, HTR after it
"""

from cost_fast.teleport.adapter_teleport import TeleportResult, teleport
from cost_fast.teleport.config import AdapterConfig, RescaleConfig, TeleportConfig
from cost_fast.teleport.contour import eval_mode, level_set_error, loss_contour
from cost_fast.teleport.graphs import CaptureRefused
from cost_fast.teleport.htr import HistoryReuse, flat_cosine, supports_htr
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.rescaling import RescalingTeleport
from cost_fast.teleport.schedule import Clock, TeleportSchedule
from cost_fast.teleport.semantics import PaperSemantics, PublicSemantics, Semantics, get_semantics
from cost_fast.teleport.teleporter import Teleporter
from cost_fast.teleport.verdict import Verdict, guard_verdict, merge_verdict, settle

__all__ = [
    "AdapterConfig",
    "CaptureRefused",
    "Clock",
    "HistoryReuse",
    "PaperSemantics",
    "PublicSemantics",
    "RescaleConfig",
    "RescalingTeleport",
    "Semantics",
    "TeleportAdapter",
    "TeleportConfig",
    "TeleportResult",
    "TeleportSchedule",
    "Teleporter",
    "Verdict",
    "eval_mode",
    "flat_cosine",
    "get_semantics",
    "guard_verdict",
    "level_set_error",
    "loss_contour",
    "merge_verdict",
    "settle",
    "supports_htr",
    "teleport",
]
