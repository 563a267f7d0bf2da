"""The 26 games of the Atari 100k benchmark, with the random and human reference scores that normalise them.

Reference scores are the ones every Atari 100k paper divides by (DQN, Mnih et al. 2015; the table used by
rliable, Agarwal et al. 2021): human-normalised score = (score − random) / (human − random).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Game:
    """One Atari 100k game: its ALE name, config file stem and reference scores."""

    name: str  # the ALE name, as in ALE/<name>-v5
    random: float
    human: float

    @property
    def env_id(self) -> str:
        return f"ALE/{self.name}-v5"

    @property
    def stem(self) -> str:
        """The config file name under configs/atari/ (snake case: MsPacman -> ms_pacman)."""
        return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(self.name))

    def normalised(self, score: float) -> float:
        """The human-normalised score: 0 plays like random, 1 like the human reference."""
        return (score - self.random) / (self.human - self.random)


ATARI_100K = {
    g.name: g
    for g in (
        Game("Alien", 227.8, 7127.7),
        Game("Amidar", 5.8, 1719.5),
        Game("Assault", 222.4, 742.0),
        Game("Asterix", 210.0, 8503.3),
        Game("BankHeist", 14.2, 753.1),
        Game("BattleZone", 2360.0, 37187.5),
        Game("Boxing", 0.1, 12.1),
        Game("Breakout", 1.7, 30.5),
        Game("ChopperCommand", 811.0, 7387.8),
        Game("CrazyClimber", 10780.5, 35829.4),
        Game("DemonAttack", 152.1, 1971.0),
        Game("Freeway", 0.0, 29.6),
        Game("Frostbite", 65.2, 4334.7),
        Game("Gopher", 257.6, 2412.5),
        Game("Hero", 1027.0, 30826.4),
        Game("Jamesbond", 29.0, 302.8),
        Game("Kangaroo", 52.0, 3035.0),
        Game("Krull", 1598.0, 2665.5),
        Game("KungFuMaster", 258.5, 22736.3),
        Game("MsPacman", 307.3, 6951.6),
        Game("Pong", -20.7, 14.6),
        Game("PrivateEye", 24.9, 69571.3),
        Game("Qbert", 163.9, 13455.0),
        Game("RoadRunner", 11.5, 7845.0),
        Game("Seaquest", 68.4, 42054.7),
        Game("UpNDown", 533.4, 11693.2),
    )
}
"""The Atari 100k games by ALE name."""


def game_of(env_id: str) -> Game | None:
    """The Atari 100k game an `ALE/<name>-v5` id names, or None for any other id."""
    name = env_id.removeprefix("ALE/").split("-")[0]
    game = ATARI_100K.get(name)
    return game if game is not None and game.env_id == env_id else None
