"""Typed schemas for every config group, their ConfigStore registration, and ``validate(cfg)``.

Each YAML file under ``conf/<group>/`` extends the schema registered here as ``<group>/<name>_schema``
(or ``<group>/schema``), so OmegaConf type-checks every value on load and rejects unknown keys.
Cross-field rules live in ``validate`` and run before any model or data is loaded.

    models, trainer_stages, rl_stages, data, logger   the schemas of the groups
    primary          ``Config`` (the whole config), ``STAGE_SCHEMAS``, ``register_configs``
    reward_sources   ``stage.rewards`` parsed once: ``reward_sources(stage)``
    stage_graph      which stage reads which upstream outputs; output dirs; ``config_hash``
    command_line     what a command line says before Hydra composes it (sweep label, reward sources)
    keys             known keys and the closest valid ones for a mistake
    chat_templates   ``data.chat_template`` to its text
    validation       ``validate(cfg)``: the cross-field rules
"""

from marl_exp.config.chat_templates import TEMPLATE_DIR, resolve_template, template_names
from marl_exp.config.command_line import (
    SWEEP_LABEL_ENV,
    check_reward_overrides,
    declare_reward_sources,
    sweep_label,
    swept_stages,
)
from marl_exp.config.data import DATA_FILE_FORMATS, DATA_NAMES, DataColumns, DataConfig, judge_label
from marl_exp.config.keys import (
    KEY_ALIASES,
    check_known_keys,
    closest_keys,
    nest_rl_keys,
    unknown_key_message,
    valid_keys,
)
from marl_exp.config.logger import ARTIFACT_MODES, LOGGER_NAMES, WANDB_MODES, LoggerConfig
from marl_exp.config.models import COMPUTE_DTYPES, QUANT_MODES, AdapterConfig, ModelConfig, QuantConfig, TinyArchConfig
from marl_exp.config.primary import STAGE_SCHEMAS, Config, project_root, register_configs, to_yaml
from marl_exp.config.reward_sources import (
    DEFAULT_REWARD_SOURCE,
    RewardSource,
    RewardSourceConfig,
    load_reward_function,
    needs_upstream_reward,
    reward_adapter_names,
    reward_sources,
)
from marl_exp.config.rl_stages import (
    ADVANTAGE_ESTIMATORS,
    LOSS_TYPES,
    SCALE_REWARDS,
    TOKEN_LOSS_TYPES,
    CriticFreeAdvantagesConfig,
    CriticFreeKLConfig,
    CriticFreeLossConfig,
    CriticFreeOptimConfig,
    CriticFreeStageConfig,
    EvalConfig,
    GroupSamplingConfig,
    GRPOStageConfig,
    OptimConfig,
    PPOAdvantagesConfig,
    PPOKLConfig,
    PPOLossConfig,
    PPOOptimConfig,
    PPOScoresConfig,
    PPOStageConfig,
    ReinforcePPStageConfig,
    RLOOStageConfig,
    RLStageConfig,
    RuntimeConfig,
    SamplingConfig,
)
from marl_exp.config.stage_graph import (
    CRITIC_FREE_STAGES,
    INPUT_KEY,
    OUTPUT_SUBDIR,
    RL_STAGES,
    UPSTREAM,
    config_hash,
    needed_upstream,
)
from marl_exp.config.trainer_stages import (
    UPSTREAM_ONLY_KEYS,
    RewardStageConfig,
    SFTStageConfig,
    TrainerStageConfig,
    UpstreamConfig,
    UpstreamRewardConfig,
    UpstreamSFTConfig,
)
from marl_exp.config.validation import sft_finetune_mode, upstream_quant_mode, validate
from marl_exp.errors import ConfigError
