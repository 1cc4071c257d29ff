"""Typed experiment configuration: dataclasses with defaults, YAML files, strict overrides.

A config is a tree of dataclasses rooted at :class:`ExperimentConfig`. YAML files in
`configs/` set any subset of its fields, and a file may name a ``base:`` file it holds only the
difference from; ``key.sub=value`` overrides from the command line come last. Unknown keys and
values of the wrong type raise :class:`ConfigError` naming the dotted key, before any work
starts. Library code takes these objects; only the entry points know about flags.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreprocessConfig:
    """How a raw CT becomes a cache volume (LUNA16 and any SimpleITK-readable scan)."""

    spacing_mm: float = 1.0
    # DeepLung's window: HU in [-1200, 600] is the range the network sees. It must equal
    # model.backbone.hu_window (load_config refuses a config where they differ).
    hu_window: tuple[float, float] = (-1200.0, 600.0)
    # HU written outside the dilated lung mask (soft tissue), also the crop padding value.
    fill_hu: int = 0
    lung_dilation_mm: float = 10.0
    crop_margin_mm: float = 10.0


@dataclasses.dataclass
class DataConfig:
    """Where the preprocessed cache is and how training crops are cut from it."""

    cache_dir: str = ""
    # LUNA16 subsets held out for validation/test; fold k holds out subset k (10-fold CV).
    fold: int = -1
    crop_size: tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 2
    # Share of crops centred near a nodule (jittered by up to jitter_mm per axis); besides the
    # ABS share, the rest are centred uniformly over the scan. Out-of-scan voxels get the
    # sidecar's fill_hu.
    positive_fraction: float = 0.7
    jitter_mm: float = 12.0
    flip: bool = True
    rotate90: bool = True
    scale_range: tuple[float, float] = (0.8, 1.15)
    # Lesions with a diameter at or above this are dropped from training targets (DeepLesion).
    max_train_diameter_mm: float = 1e9
    # Hard-example regions from Anchor Based Sampling: JSON file ("" = MODEL_DIR's
    # abs_hard_negatives.json once `--phase abs` has written it) and share of crops.
    abs_file: str = ""
    abs_fraction: float = 0.2
    seed: int = 0
    # Parallel crop-drawing calls of the tf.data map (0: AUTOTUNE).
    num_parallel_calls: int = 2
    # Optional file of seriesuids (one a line) restricting the training scans (after the fold).
    train_seriesuids: str = ""
    # Optional file of seriesuids for the validation summaries; default: the held-out fold.
    val_seriesuids: str = ""
    # Ground-truth rows per crop (padded with d = 0); extra nodules in one crop are dropped.
    max_boxes: int = 16
    # Batches prepared ahead of the model (tf.data prefetch; -1: AUTOTUNE).
    prefetch: int = -1
    # Remote caches (s3://, gs://): bytes of training volumes held in memory. When all of them
    # fit, each is downloaded once per run; otherwise the least recently drawn are dropped and
    # downloaded again when drawn. Local caches are memory-mapped (the OS page cache) instead.
    remote_cache_bytes: int = 8 * 2**30


@dataclasses.dataclass
class AnchorConfig:
    """Anchor diameters (mm) per pyramid stride. Defaults: the paper's "anchor1"."""

    # The pyramid levels that carry an RPN head and anchors: any subset of the backbone's
    # strides (model.backbone: 4, 8, 16), one size list each. The backbone still computes every
    # level and the FPRN aggregates all of them. Default: the paper's "Multi-Scale" (Table II
    # rows c-f). Table II rows a/b ("single scale") are, in our reading of Section IV.B's
    # "{4, 6, 8, 12, 16, 24} mm at the feature layer of 4 mm resolution", strides: [4] with
    # sizes: [[4, 6, 8, 12, 16, 24]]: all six anchor1 sizes on the stride-4 map (our choice).
    strides: tuple[int, ...] = (4, 8, 16)
    sizes: tuple[tuple[float, ...], ...] = ((4.0, 6.0), (8.0, 12.0), (16.0, 24.0))
    positive_iou: float = 0.5
    negative_iou: float = 0.02

    def __post_init__(self):
        strides = list(self.strides)
        if not strides:
            raise ConfigError("model.anchors.strides: at least one stride is required")
        if len(set(strides)) != len(strides) or any(int(s) < 1 for s in strides):
            raise ConfigError(f"model.anchors.strides {strides}: distinct positive strides")
        if len(self.sizes) != len(strides):
            raise ConfigError(
                f"model.anchors.sizes: one size list per anchor stride is required "
                f"({len(strides)} strides {strides}, {len(self.sizes)} size lists)"
            )
        if any(len(group) == 0 for group in self.sizes):
            raise ConfigError("model.anchors.sizes: every size list needs at least one size")


@dataclasses.dataclass
class BackboneConfig:
    """The DenseNet-block 3D U-Net of Table I (defaults: the paper's network)."""

    preblock_filters: int = 24
    growth_rate: int = 16
    # Dense layers per dense block (the "x 2" of Table I), encoder and decoder alike.
    layers_per_block: int = 2
    # Bottleneck 1x1x1 conv of a dense layer outputs bottleneck_width * growth_rate channels.
    bottleneck_width: int = 4
    # Output channels of Transition(1..3); its length is the number of encoder downsamplings.
    transition_channels: tuple[int, ...] = (64, 64, 64)
    # Dense bottleneck layers at the coarsest level ("Detector: Bottle Neck x 2").
    detector_layers: int = 2
    # 1x1x1 conv after each decoder concatenation.
    decoder_channels: int = 64
    pyramid_channels: int = 32
    # Synchronized BatchNormalization across replicas (tf.distribute) instead of per-replica.
    sync_batch_norm: bool = False
    # HU window the model's first layer maps to [0, 1]. The cache is clipped to
    # preprocess.hu_window; load_config refuses a config where the two differ.
    hu_window: tuple[float, float] = (-1200.0, 600.0)


@dataclasses.dataclass
class FPRConfig:
    """The aggregated false-positive-reduction branch (Section III.D)."""

    enabled: bool = True
    diameter_alignment: bool = True
    local_magnification: bool = True
    # Crop margin in cells of each level, added around the aligned crop.
    crop_margin_cells: float = 1.0
    roi_output_size: int = 2
    roi_sampling_ratio: int = 2
    # Local Magnification (tf_agg3d/layers/local_magnification.py). Each level's crop is cut as
    # a fixed cube of cells around the proposal centre and put through magnify_stages stages of
    # [2x2x2 transposed conv + magnify_layers_per_stage bottlenecks]; the aligned crop box is
    # RoI-Aligned inside the result (parts of it outside the cube are clipped away).
    #   table1: the paper's Table I, in our reading: a magnify_crop_cells^3 crop (3: the
    #     proposal's cell and a one-cell margin), stride-1 'valid' transposed convs adding one
    #     cell each (3 -> 4 -> 5: "Magnify Output 5 x 5 x 5"), same cell spacing as the level.
    #   patch: our earlier variant: a magnify_patch_cells^3 patch (4), stride-2 transposed
    #     convs doubling it per stage (4 -> 8 -> 16).
    magnify_mode: str = "table1"
    magnify_crop_cells: int = 3
    magnify_patch_cells: int = 4
    magnify_stages: int = 2
    magnify_layers_per_stage: int = 2
    hidden_units: int = 256
    dropout: float = 0.0
    # Use the compiled custom op when it is built (training / local inference only).
    use_custom_op: bool = True

    def __post_init__(self):
        if self.magnify_mode not in ("table1", "patch"):
            raise ConfigError(
                f"model.fpr.magnify_mode: {self.magnify_mode!r} not in ['patch', 'table1']"
            )
        for key in ("magnify_crop_cells", "magnify_patch_cells"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.fpr.{key}: must be >= 1, got {getattr(self, key)}")
        if self.magnify_stages < 0:
            raise ConfigError(f"model.fpr.magnify_stages: must be >= 0, got {self.magnify_stages}")


@dataclasses.dataclass
class ProposalConfig:
    """RPN decoding into proposals for the FPRN (per crop, training and inference)."""

    # Training's threshold: RPN proposals above it feed the FPRN during training and the
    # validation summaries (and it is Detector.propose's default). Whole-scan prediction uses
    # inference.score_threshold instead (predict --threshold), a separate setting.
    score_threshold: float = 0.269
    pre_nms_top_k: int = 512
    nms_iou: float = 0.1
    max_proposals: int = 32
    # Training: proposals matched to ground truth with IoU above this are FPRN positives.
    fpr_positive_iou: float = 0.3
    fpr_negative_iou: float = 0.1


@dataclasses.dataclass
class ModelConfig:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    anchors: AnchorConfig = dataclasses.field(default_factory=AnchorConfig)
    fpr: FPRConfig = dataclasses.field(default_factory=FPRConfig)
    proposals: ProposalConfig = dataclasses.field(default_factory=ProposalConfig)

    @property
    def pyramid_strides(self) -> tuple[int, ...]:
        """The backbone's pyramid strides, finest first: ``2 * 2**k``, k = 1 .. #transitions."""
        return tuple(2 ** (k + 1) for k in range(1, len(self.backbone.transition_channels) + 1))

    def __post_init__(self):
        pyramid = self.pyramid_strides
        extra = [int(s) for s in self.anchors.strides if int(s) not in pyramid]
        if extra:
            raise ConfigError(
                f"model.anchors.strides {list(self.anchors.strides)}: must be a subset of the "
                f"backbone's pyramid strides {list(pyramid)} (model.backbone.transition_channels "
                f"has {len(pyramid)} entries); {extra} not among them"
            )


@dataclasses.dataclass
class LossConfig:
    """RPN classification loss and its parameters (Eq. 3 and the Table II baselines)."""

    # One of: adaptive_focal, focal, ohem.
    rpn_classification: str = "adaptive_focal"
    alpha: float = 0.8
    gamma: float = 5.0
    # T grows linearly with the iteration: T = t_start + t_slope * step.
    t_start: float = 1.0
    t_slope: float = 1e-4
    t_max: float = 10.0
    ohem_negatives_per_positive: int = 3
    ohem_min_negatives: int = 16
    regression_weight: float = 1.0
    fpr_weight: float = 1.0


@dataclasses.dataclass
class TrainConfig:
    """Phases, optimisation, checkpoints and Anchor Based Sampling (tf_agg3d.training)."""

    # rpn (phase 1) | joint (phase 2, default) | alternating (phase 2 option) | abs
    phase: str = "rpn"
    # The recipe: the phases (`train --phase S`) a cross-validation runner executes in order on
    # one model directory. The paper's: phase 1, joint phase 2, one Anchor Based Sampling round
    # (`abs` mines hard negatives; the phase after it trains train.abs_epochs more epochs).
    stages: tuple[str, ...] = ("rpn", "joint", "abs", "joint")
    epochs: int = 50
    # 0: ceil(training scans / data.batch_size), one crop per scan per epoch.
    steps_per_epoch: int = 0
    # > 0: the phase's length in steps, instead of epochs * steps_per_epoch.
    max_steps: int = 0
    learning_rate: float = 1e-3
    # step (x0.1 at 50% and 80% of the steps) | cosine | constant
    lr_schedule: str = "step"
    weight_decay: float = 1e-4
    # sgd (with momentum) | adam | adamw
    optimizer: str = "sgd"
    momentum: float = 0.9
    clip_norm: float = 10.0
    mixed_precision: bool = False
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    log_every_steps: int = 20
    # alternating phase: number of steps per branch before switching.
    alternate_every_steps: int = 100
    init_checkpoint: str = ""
    # Seed of the weight initialisation (the crops use data.seed).
    seed: int = 0
    # auto (MultiWorkerMirrored from TF_CONFIG, else Mirrored over the GPUs / CPU) | mirrored |
    # multi_worker | one_device.
    distribute: str = "auto"
    # Linear warm-up steps of the learning rate (helps the from-scratch 3D backbone).
    warmup_steps: int = 0
    # FPRN training: jittered copies of each ground-truth box added to the RPN proposals so
    # that positives exist from the first step; jitter is this fraction of the diameter.
    fpr_gt_copies: int = 2
    fpr_gt_jitter: float = 0.15
    # Validation summaries (sensitivity / FP counts) every N steps (0: at the end only) on at
    # most this many scans (0: none).
    val_every_steps: int = 0
    val_max_scans: int = 4
    # Anchor Based Sampling: proposals above this score that hit no nodule are hard negatives;
    # at most abs_max_per_scan per scan; the next round trains abs_epochs more epochs.
    abs_score_threshold: float = 0.5
    abs_max_per_scan: int = 20
    abs_window_overlap: int = 16
    abs_epochs: int = 30


@dataclasses.dataclass
class InferenceConfig:
    """Whole-scan prediction (predict, the exported model, the client)."""

    window_size: tuple[int, int, int] = (128, 128, 128)
    overlap: int = 32
    window_batch_size: int = 1
    # RPN probability a finding needs (predict --threshold); training's proposal threshold is
    # model.proposals.score_threshold.
    score_threshold: float = 0.269
    nms_iou: float = 0.1
    # Most findings written per scan (predict --max-marks); what the FROC counts per scan is
    # evaluation.max_marks.
    max_marks: int = 100
    max_proposals_per_scan: int = 300


@dataclasses.dataclass
class EvalConfig:
    """FROC evaluation of a predictions CSV (evaluate)."""

    fp_rates: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    bootstrap: int = 1000
    seed: int = 0
    # Marks per scan the FROC counts (the official LUNA16 rule: 100; evaluate --max-marks),
    # whatever the predictions' producer wrote (inference.max_marks for ours).
    max_marks: int = 100
    tnp_sensitivity: float = 0.95


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "agg3d"
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    evaluation: EvalConfig = dataclasses.field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Conversion from plain data (YAML) with strict type checks
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, prefix=key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False))
        )
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(annotation):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    raise ConfigError(f"{key}: unsupported config type {annotation!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """Plain-data (YAML/JSON-ready) form of a config; tuples become lists."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``a.b.c=value`` (value in YAML syntax) into (["a","b","c"], value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from None
    return key.split("."), value


def load_config(
    path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: ExperimentConfig | None = None,
) -> ExperimentConfig:
    """Loads an :class:`ExperimentConfig` from defaults, a YAML file and key=value overrides.

    Inheritance: a file may name another with a top-level ``base: other.yaml`` (a path relative
    to the naming file's folder, or absolute, or a URL) and then holds only its difference.
    The base is loaded first (its own ``base`` too: chains are allowed, cycles are refused),
    then the file is merged over it: mappings merge key by key, any other value (a list
    included) replaces the base's whole. Each file of a chain is checked for unknown keys and
    wrong types, and an error names that file.

    Order, later wins: the defaults (or `base`), the chain's root file ... the file itself, then
    the overrides.

    Args:
      path: YAML file (local path or any `tf.io.gfile` URL), or None for the defaults.
      overrides: strings such as ``"data.batch_size=4"`` or ``"model.anchors.sizes=[[5,10]]"``.
      base: the config the file and overrides apply to (default: the defaults), e.g. a
        trained model's config.yaml.

    Raises:
      ConfigError: a file that cannot be read or parsed, an unknown key, a wrong type, a
        ``base`` cycle (naming the files), a bad value of ``train.stages``.
    """
    data: dict = to_dict(base) if base is not None else {}
    if path:
        data = _merge(data, _load_file_chain(path, ()))
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        data = _merge(data, nested)
    where = f"{path}: " if path else ""
    try:
        config = from_dict(ExperimentConfig, data)
        check_consistency(config)
        check_stages(config.train.stages)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    return config


# The top-level key naming a file's base config (not a config field).
BASE_KEY = "base"


def _load_yaml_mapping(path: str) -> dict:
    try:
        loaded = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return loaded


def _resolve_base(path: str, ref: str) -> str:
    """`ref` (a ``base:`` value) as a path: relative to the folder of the file `path`."""
    if "://" in ref or os.path.isabs(ref):
        return ref
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), ref))}"
    return os.path.normpath(os.path.join(os.path.dirname(path), ref))


def _chain_key(path: str) -> str:
    return path if "://" in path else os.path.realpath(path)


def _load_file_chain(path: str, chain: tuple[str, ...]) -> dict:
    """The plain data of `path` merged over its ``base`` chain (see :func:`load_config`).

    Args:
      path: the file.
      chain: the files that named this one as their base, outermost first (cycle check).
    """
    if _chain_key(path) in {_chain_key(p) for p in chain}:
        names = " -> ".join((*chain, path))
        raise ConfigError(f"config base cycle: {names} (a file cannot be its own base)")
    loaded = _load_yaml_mapping(path)
    data: dict = {}
    if BASE_KEY in loaded:
        ref = loaded.pop(BASE_KEY)
        if not isinstance(ref, str) or not ref.strip():
            raise ConfigError(f"{path}: {BASE_KEY}: expected a config file name, got {ref!r}")
        data = _load_file_chain(_resolve_base(path, ref.strip()), (*chain, path))
    data = _merge(data, loaded)
    try:
        from_dict(ExperimentConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return data


# Phases a recipe (train.stages) may name; `train --phase` takes the same names.
STAGES = ("rpn", "joint", "alternating", "abs")


def check_stages(stages: tuple[str, ...]) -> None:
    """Refuses a recipe that cannot run: empty, an unknown phase, or ``abs`` first (Anchor
    Based Sampling mines the hard negatives of a trained model).

    Raises:
      ConfigError: naming ``train.stages``.
    """
    if not stages:
        raise ConfigError("train.stages: empty (the recipe needs at least one phase)")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"train.stages: unknown phase(s) {unknown} (known: {', '.join(STAGES)})")
    if stages[0] == "abs":
        raise ConfigError("train.stages: 'abs' cannot come first (it needs a trained model)")


# Settings two sections hold that must agree: (key, key, getter of each, why).
_MUST_AGREE = (
    (
        "preprocess.hu_window",
        "model.backbone.hu_window",
        lambda c: tuple(c.preprocess.hu_window),
        lambda c: tuple(c.model.backbone.hu_window),
        "the model normalises the window its cache was clipped to",
    ),
)


def check_consistency(config: ExperimentConfig) -> None:
    """Refuses a config whose paired settings disagree.

    ``preprocess.hu_window`` (the HU the cache is clipped to) and ``model.backbone.hu_window``
    (the HU the network maps to [0, 1]) describe one window: a model whose window differs from
    its cache's sees a range no voxel has, or never sees part of it.

    Raises:
      ConfigError: naming both keys and their values.
    """
    for key_a, key_b, get_a, get_b, why in _MUST_AGREE:
        a, b = get_a(config), get_b(config)
        if a != b:
            raise ConfigError(
                f"{key_a} {list(a)} and {key_b} {list(b)} must be equal ({why}): set both"
            )


def _read_text(path: str) -> str:
    if "://" in path:
        import tensorflow as tf

        try:
            with tf.io.gfile.GFile(path, "r") as f:
                return f.read()
        except tf.errors.OpError as err:
            raise ConfigError(f"{path}: cannot read config ({err.message})") from None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None


def save_config(config: ExperimentConfig, path: str) -> None:
    """Writes the config as YAML, atomically (temp file + rename)."""
    from tf_agg3d.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
