"""Planning agents and the online RL loop."""
from .planner import PLANNERS, CEMPlanner, MPPIPlanner, Planner, build_planner, discounted_return, register_planner
from .value import PolicyPrior, ValueFunction

__all__ = ["PLANNERS", "CEMPlanner", "MPPIPlanner", "Planner", "PolicyPrior", "ValueFunction", "build_planner",
           "discounted_return", "register_planner"]
