"""The configuration schema: one dataclass per section, with defaults, rooted at
:class:`ExperimentConfig`.

A section's ``__post_init__`` refuses values no run could use, naming the dotted key; checks
between sections are in :mod:`tf_agg3d.config.checks`.
"""

from __future__ import annotations

import dataclasses

from tf_agg3d.config.errors import ConfigError


def _require_one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} not in {sorted(choices)}")


def _require_at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value}")


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
        _require_one_of("model.fpr.magnify_mode", self.magnify_mode, ("table1", "patch"))
        for key in ("magnify_crop_cells", "magnify_patch_cells"):
            _require_at_least(f"model.fpr.{key}", getattr(self, key), 1)
        _require_at_least("model.fpr.magnify_stages", self.magnify_stages, 0)


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
    # How the backbone covers a scan (tf_agg3d/models/whole_scan.py):
    #   tiles: one pass over the whole scan, each voxel computed once; the full-resolution stem
    #     runs in tiles with an exact halo, sized by memory_budget_mb (models/tiled_backbone.py).
    #     Needs a DenseUNet3D backbone; any other backbone runs windows.
    #   windows: overlapping window_size windows (overlap, window_batch_size), merged by cores.
    mode: str = "tiles"
    # tiles: memory for the stem's tiles (their activations); the rest of the network takes
    # about 16 (float32) / 8 (bfloat16) bytes per scan voxel on top.
    memory_budget_mb: int = 2048
    # float32 | bfloat16 | auto: bfloat16 where the CPU computes it natively (AVX512-BF16 / AMX
    # with oneDNN on, no GPU), else float32. Exported SavedModels resolve auto to float32.
    precision: str = "auto"
    # Skip the computation of regions whose receptive field is all fill_hu (exact either way).
    skip_fill: bool = True
    # tiles: best RPN anchors per scan that enter the proposal NMS (windows: per window,
    # model.proposals.pre_nms_top_k).
    tiles_pre_nms_top_k: int = 2048

    def __post_init__(self):
        _require_one_of("inference.mode", self.mode, ("tiles", "windows"))
        _require_one_of("inference.precision", self.precision, ("auto", "float32", "bfloat16"))
        _require_at_least("inference.memory_budget_mb", self.memory_budget_mb, 1)
        _require_at_least("inference.tiles_pre_nms_top_k", self.tiles_pre_nms_top_k, 1)


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
