"""The run configuration: one schema (plain data), its quantization options, reading it from YAML, and
where its relative paths and edgeopt's local state live.

Checking a config against the registries and building its variant plan is ``edgeopt.plan``'s:
``edgeopt.plan.load_config(path)`` is what a command calls.
"""

from edgeopt.config.load import (  # noqa: F401
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    ConfigError,
    read_config,
    read_config_text,
    validate_config,
)
from edgeopt.config.paths import FROM_CHECKOUT, PROJECT_ROOT, resolve_path, state_dir  # noqa: F401
from edgeopt.config.quant import AccuracyControlOptions, NNCFOptions, OrtOptions, QuantConfig  # noqa: F401
from edgeopt.config.schema import (  # noqa: F401
    BASES,
    MAX_IMAGE_SIDE,
    MAX_LIST_ITEMS,
    ConstraintsConfig,
    DataConfig,
    DeployConfig,
    DeviceTargetConfig,
    PromotionConfig,
    RegistryConfig,
    RunConfig,
    SelectionConfig,
    SplitConfig,
    TargetConfig,
    TrackingConfig,
    VariantsConfig,
)
from edgeopt.config.training import (  # noqa: F401
    ARCHITECTURE_NAMES,
    AugmentConfig,
    FitConfig,
    KDConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
