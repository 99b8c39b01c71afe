"""fmstream's model: one Factorization Machine trained online, folded into MIPS vectors.

Pure: torch, numpy and the standard library only (no Kafka, no Redis).
"""

from model.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from model.compose import ContextTable, compose_item, compose_user, context_query
from model.errors import (
    CheckpointError,
    ConfigError,
    FeatureError,
    InputError,
    ModelError,
    SchemaError,
    SnapshotError,
)
from model.online import OnlineFM, TrainConfig
from model.schema import FeatureSchema, FieldSpec

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ContextTable",
    "FeatureError",
    "FeatureSchema",
    "FieldSpec",
    "InputError",
    "ModelError",
    "OnlineFM",
    "SchemaError",
    "SnapshotError",
    "TrainConfig",
    "compose_item",
    "compose_user",
    "context_query",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
