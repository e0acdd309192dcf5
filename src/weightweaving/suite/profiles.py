"""The suite's recipes: everything that decides a checkpoint or a result, as plain frozen data.

``full`` is the README's main command, ``quick`` a smaller profile (the full one: 9 min 53 s on 2
cores from nothing, seed 3), ``micro`` exists only for the tests (seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .data import TASK_NAMES, Sizes
from .model import ViTConfig

# The paper's Table 2 methods, then DARE (the paper's Table 1), CART, WUDI and SVC (over Task
# Arithmetic, and over TSV). Methods not registered in this build are skipped with a logged note.
PAPER_METHODS: tuple[str, ...] = ("ties", "breadcrumbs", "magmax", "pcb", "tsv", "iso_c")
METHODS: tuple[str, ...] = (
    "task_arithmetic",
    *PAPER_METHODS,
    "dare",
    "cart",
    "wudi",
    "svc",
    "svc_tsv",
)
# Suite labels that are not registry names: label -> (method, its hyperparameters).
METHOD_SPECS: dict[str, tuple[str, dict[str, Any]]] = {"svc_tsv": ("svc", {"base": "tsv"})}
POOLS: tuple[str, ...] = ("mean", "random", "magmax")
# Data-free strategies evaluated beside the paper's mean pool in every setup (registered pools). Two
# streamed pools (each costs one weave and one evaluation per problem): the others registered
# (trimmed_mean, median, agreement, fitted_lambda, calibrated) did no better on seeds 0-2 (below).
STRATEGIES: tuple[str, ...] = ("nearest_mean", "norm_filtered")
# The strategy the suite recommends as the data-free default (results' ``recommended`` variant),
# and how it was chosen (printed in the report next to this run's own numbers).
# Full profile (continual protocol of main at 07:00 UTC, 2026-12-02), the 12 cells (continual
# and domain x the six paper methods), cells at or above the mean pool / share of the gap to the best
# λ closed:
#   seed 0: nearest_mean 11/12, 59%; norm_filtered 10/12, 40%; trimmed_mean 11/12, 21%; median 9/12, 29%
#   seed 1: nearest_mean  6/12, 41%; norm_filtered 10/12, 46%; trimmed_mean  8/12, 19%; median 9/12, 28%
#   seed 2 (continual only, 6 cells): nearest_mean 4/6, 31%; norm_filtered 2/6, 19%; trimmed_mean 4/6, 12%
# Norm matching (the member or rescaled pool of norm ‖Δ̄‖ or mean ‖Δ_t‖), task-vector coherence
# scaling and the per-task coefficient (fitted_lambda) did worse on seeds 0-1. No strategy met the
# issue's bar (>= 10/12 and >= 50%) on every seed; nearest_mean closed the most gap on each.
# Seed 3 (unseen) was not run. On a trial continual protocol whose fine-tunes train against the whole
# head (merges above zero-shot), nearest_mean fell below the mean pool for PCB, TSV and ISO-C (seed 0).
RECOMMENDED: str = "nearest_mean"
RECOMMENDED_BASIS: str = (
    "chosen on seeds 0-2 of the full profile as the strategy closing the most gap to the best λ on each "
    "(seed 0: 11/12 cells at or above the mean pool, 59%; seed 1: 6/12, 41%; seed 2, continual: 4/6, 31%); "
    "the issue's bar was not met on every seed, and no unseen seed was run"
)
# The head rows a class-incremental fine-tune trains against: "group" its own classes only (MagMax's
# code), "seen" every class met so far, "all" the benchmark's whole frozen head (its rows are fixed
# before any fine-tuning, like CLIP's zero-shot head of the whole dataset; no data of other classes).
CL_HEADS: tuple[str, ...] = ("group", "seen", "all")
# Why the continual protocol is what it is (measured with the full profile's encoder and fine-tuning
# recipe, 60 steps per task at split 5, seed 0 unless said; scratch runs, not the suite's report):
# fashion+digits with each task trained against its own head rows only (MagMax's code; the protocol
# before v2): fine-tuning a task LOWERS its own classes' class-incremental accuracy (-8.2 points on
# average over the 5 tasks; the encoder was pre-trained on these very domains, so a task has no
# imaging conditions to learn, only contrasts inside its group that say nothing about the other
# classes); every merge stays within 2 points of zero-shot (63.2) at λ = 0.1-0.3. Rows of every
# class seen so far: own gain +15.7 but forgetting (last model 37.0), best merge 64.3. The whole
# head: own gain +31, best merge +7.6 on seed 0 but +0.1 on seed 1 and +0.6 to +2.6 at 10/20 tasks.
# The same images over clutter (contrast 0.5; zero-shot 30.7) with the whole head: own gain +47 to +49,
# Weight Weaving (MagMax) +13.3 (seed 0) and +6.3 (seed 1), tuned λ 0.6-1.0 for TIES, MagMax, TSV.
CONTINUAL_BASIS: str = (
    "chosen on seeds 0-1 (split 5) of continual-only scratch runs: fashion+digits over clutter "
    "(contrast 0.5), each task fine-tuned against the benchmark's whole frozen head"
)
# The seeds whose results were looked at while choosing the recipes; any other seed is unseen.
# Fine-tuning lr was chosen on seed 0; the shipped encoder (36 or 72 epochs) on seeds 0-2.
TUNED_ON_SEEDS: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class EncoderRecipe:
    """How a shipped pre-trained encoder was made: ``scripts/pretrain_encoder.py`` re-makes it.

    ``train.pretrain`` over the unlabelled pools of ``data.build_tasks(seed, sizes, tasks)``.
    """

    file: str  # under weightweaving/suite/assets/, float16 safetensors
    vit: ViTConfig
    sizes: Sizes
    tasks: tuple[str, ...]
    epochs: int
    lr: float
    batch: int
    contrastive: float
    seed: int


# The encoder the full and quick profiles start from, as the paper's runs start from CLIP: 72 epochs
# of the suite's own pre-training (about 40 minutes of one CPU core, too long for the 10-minute run).
# Task Arithmetic's share of the multi-task fine-tuning gain (tuned λ; seeds 0, 1, 2): 3 epochs
# (pre-trained in the run, lr 3e-5) 16%, 14%, 28%; 36 epochs (lr 6e-5) 48%, 37%, 15%; 72 epochs
# (lr 1e-4) 55%, 33%, 28%, with larger fine-tuning gains (12-15 points against 10-13).
SHIPPED_ENCODER = EncoderRecipe(
    file="encoder-e72-seed0.safetensors",
    vit=ViTConfig(),
    sizes=Sizes(train=2000, test=300, pretrain=3000),
    tasks=tuple(TASK_NAMES),
    epochs=72,
    lr=2e-3,
    batch=128,
    contrastive=1.0,
    seed=0,
)


@dataclass(frozen=True)
class Recipe:
    """Sizes, schedules and protocol choices of one profile."""

    name: str
    vit: ViTConfig = field(default_factory=ViTConfig)
    sizes: Sizes = field(default_factory=lambda: Sizes(train=2000, test=300, pretrain=3000))
    tasks: tuple[str, ...] = tuple(TASK_NAMES)
    # a shipped encoder to start from; None: pre-train one in the run with the settings below
    encoder: EncoderRecipe | None = SHIPPED_ENCODER
    # pre-training: unlabelled images of every domain; target = (domain, rotation by k * 90 degrees)
    pretrain_epochs: int = 3
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 128
    pretrain_contrastive: float = 1.0  # weight of an added SimCLR term (0: rotation/domain only)
    # heads: class prototypes of the pre-trained features from a few labelled images per class
    head_shots: int = 16
    # CLIP's logit scale. A sharp softmax lets fine-tuning fit each task with smaller weight moves,
    # which stay closer to the regime where task vectors add: at 20 (lr 1e-4) Task Arithmetic kept
    # 1% of the fine-tuning gain in multi-task, at 100 (lr 3e-5) 16% (seed 0, 3-epoch encoder).
    logit_scale: float = 100.0
    # fine-tuning: AdamW, cosine decay, frozen head. With the shipped encoder (seed 0): lr 6e-5
    # gained 10.7 points over the heads, Task Arithmetic keeping 52% of it; 1e-4 gains 12.4, TA 53%.
    ft_steps: int = 150
    ft_lr: float = 1e-4
    ft_batch: int = 64
    ft_weight_decay: float = 0.0
    # continual learning (protocol v2, chosen on seeds 0-1 of a continual-only run, see CONTINUAL_BASIS):
    # class-incremental benchmarks (each the union of some domains' classes), each
    # cut into every split of ``cl_splits``, fine-tuned in sequence (and one by one from θ_pre where
    # ``cl_individual``: those only feed the task-aware 'individual' baseline and the diagnostics)
    cl_benchmarks: tuple[str, ...] = ("fashion+digits/clutter",)  # names in data.CL_BENCHMARKS
    cl_splits: tuple[int, ...] = (5, 10, 20)  # the paper's splits
    # fine-tuning steps of a whole sequence, shared equally by its tasks (each task's data shrinks
    # as the split grows: the same passes over it, as the paper's fixed epochs per task)
    cl_sequence_steps: int = 300
    cl_lr: float | None = None  # None: ft_lr
    cl_batch: int | None = None  # None: ft_batch
    # the head rows a class-incremental fine-tune trains against (see CL_HEADS)
    cl_head: str = "all"
    cl_individual: bool = True
    # evaluation
    methods: tuple[str, ...] = METHODS
    pool_setups: tuple[str, ...] = ("multitask", "continual", "domain")  # where Table 3's pools run
    strategies: tuple[str, ...] = STRATEGIES  # data-free pools evaluated in every setup ...
    # ... for these methods (the ones the strategies' recommendation is made on; time budget)
    strategy_methods: tuple[str, ...] = ("task_arithmetic", *PAPER_METHODS)
    # "grid": every point of the paper's λ grid; "coarse_to_fine": every other point, then the two
    # neighbours of the best (about 40% fewer evaluations; on the previous full run, seed 0, it found
    # the full grid's tuned λ in 33 of 36 (setup, method) cells, the 3 others within 0.08 points)
    lam_search: str = "coarse_to_fine"
    grid_stride: int = 1  # take every k-th point of the paper's λ grid (quick profiles)
    interference_lams: tuple[float, ...] = (0.3, 1.0)
    # the methods that use data (reported apart; suite/withdata.py): AdaMerging/CART++ schedule, a
    # tenth of the authors' 500 Adam steps at ten times their lr 1e-3 (chosen on seeds 0-2, full profile)
    with_data: bool = True
    with_data_steps: int = 50
    with_data_lr: float = 1e-2

    def pretraining(self, seed: int) -> EncoderRecipe:
        """The encoder a run pre-trains for itself when the recipe ships none."""
        return EncoderRecipe(
            file=f"{self.name}-seed{seed}.safetensors",
            vit=self.vit,
            sizes=self.sizes,
            tasks=self.tasks,
            epochs=self.pretrain_epochs,
            lr=self.pretrain_lr,
            batch=self.pretrain_batch,
            contrastive=self.pretrain_contrastive,
            seed=seed,
        )


PROFILES: dict[str, Recipe] = {
    "full": Recipe(name="full"),
    "quick": Recipe(
        name="quick",
        sizes=Sizes(train=1000, test=150, pretrain=800),
        tasks=("fashion", "digits", "shapes", "stripe_angle", "dot_count", "blob_position"),
        ft_steps=50,
        cl_splits=(5,),
        cl_sequence_steps=150,
        grid_stride=2,
        pool_setups=("multitask",),
    ),
    "micro": Recipe(
        name="micro",
        encoder=None,  # pre-trains its own (tiny) encoder: the tests exercise that path
        vit=ViTConfig(width=32, layers=1, heads=2, mlp_ratio=2, embed_dim=16),
        sizes=Sizes(train=60, test=40, pretrain=60),
        tasks=("fashion", "digits", "shapes", "dot_count"),
        pretrain_epochs=1,
        head_shots=2,
        ft_steps=3,
        ft_batch=16,
        cl_splits=(5,),
        cl_sequence_steps=10,
        methods=("task_arithmetic", "ties", "svc"),
        strategies=("calibrated",),
        grid_stride=5,
        pool_setups=("multitask", "continual", "domain"),
        interference_lams=(1.0,),
        with_data_steps=2,
        with_data_lr=1e-2,
    ),
}
