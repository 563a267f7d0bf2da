"""Planning agents and the online RL loop."""

from .planner import PLANNERS, CEMPlanner, MPPIPlanner, Planner, build_planner, discounted_return, register_planner
from .planning_agent import PlanningAgent, load_agent
from .policy_planner import PolicyPlanner
from .value import PolicyPrior, ValueFunction

__all__ = [
    "PLANNERS",
    "CEMPlanner",
    "MPPIPlanner",
    "Planner",
    "PlanningAgent",
    "PolicyPlanner",
    "PolicyPrior",
    "ValueFunction",
    "build_planner",
    "discounted_return",
    "load_agent",
    "register_planner",
]
