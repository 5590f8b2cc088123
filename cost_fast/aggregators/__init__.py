"""Multi-task aggregators: task weights from the Gram matrix M = G Gᵀ, update d = Gᵀ w.

``cost_fast.get_aggregator(name, **hparams)`` builds one by name (``cost_fast.methods``);
``cost_fast.list_aggregators()`` lists them.
"""

from cost_fast.aggregators.aligned import AlignedMTL
from cost_fast.aggregators.base import Aggregator, GradientAggregator, WeightsFunction
from cost_fast.aggregators.cagrad import CAGrad
from cost_fast.aggregators.config import ConFIG
from cost_fast.aggregators.conicgrad import ConicGrad
from cost_fast.aggregators.dual_cone import DualProj, UPGrad
from cost_fast.aggregators.elementwise import GradDrop, MoCo
from cost_fast.aggregators.excess import ExcessMTL
from cost_fast.aggregators.gradvac import GradVac
from cost_fast.aggregators.imtl import IMTLG
from cost_fast.aggregators.linear import Constant, Mean, Random, Sum
from cost_fast.aggregators.mgda import MGDA
from cost_fast.aggregators.nash import FairGrad, NashMTL
from cost_fast.aggregators.pcd import PCD
from cost_fast.aggregators.pcgrad import PCGrad
from cost_fast.aggregators.robust import Krum, TrimmedMean
from cost_fast.aggregators.stochastic import CRMOGM, MoDo, SDMGrad

__all__ = [
    "CRMOGM",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "Constant",
    "ConicGrad",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradientAggregator",
    "GradVac",
    "IMTLG",
    "Krum",
    "Mean",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "Random",
    "SDMGrad",
    "Sum",
    "TrimmedMean",
    "UPGrad",
    "WeightsFunction",
]
