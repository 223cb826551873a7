"""moelab: build, train, balance, trace, place, parallelise and serve Mixture-of-Experts models."""
from moelab.config import MoEConfig
from moelab.moe import MoELayer, MoEResult, step_routers
from moelab.routers import ROUTERS, Routing

__all__ = ["ROUTERS", "MoEConfig", "MoELayer", "MoEResult", "Routing", "step_routers"]
__version__ = "0.1.0"
