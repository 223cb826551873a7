"""moelab: build, train, balance, trace, place, parallelise and serve Mixture-of-Experts models."""
from moelab.config import MoEConfig
from moelab.moe import MoELayer, MoEResult, update_loss_free_biases
from moelab.routers import ROUTERS, Routing

__all__ = ["MoEConfig", "MoELayer", "MoEResult", "ROUTERS", "Routing", "update_loss_free_biases"]
__version__ = "0.1.0"
