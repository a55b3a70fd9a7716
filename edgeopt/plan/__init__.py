"""What a run will do: its config checked against the registries (``check``), the variant plan every
step is wired from (``variants``), and the pre-flight of every input before any step starts
(``preflight``).

    cfg = load_config("configs/default.yaml"); plan = variant_plan(cfg)
"""

from edgeopt.plan.check import load_config, parse_config  # noqa: F401
from edgeopt.plan.variants import BuildSpec, Plan, ShrinkSpec, variant_plan  # noqa: F401
