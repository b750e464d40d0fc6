"""Simulated preference data on the bundled digits model: pairs sampled from the model, labelled by simulated annotators.

Pick-a-Pic cannot be downloaded here, so this module builds data that behaves like it. Pairs are two samples of the
bundled digits model under its generic prompt ("a handwritten digit"), each drawn from its own seed. Annotators judge
them with a **utility** computed by the bundled digit classifier and **Bradley–Terry noise**:

- the majority's utility is U(x) = p(y ∈ {0, 6, 8, 9} | x): they like round digits; a minority group holds the opposite
  utility 1 − U(x) (their labels are flipped with respect to the majority's);
- an annotator with utility V prefers the first image with probability σ(κ·(V(x₀) − V(x₁))) (κ = ``bt_scale``), and calls
  the pair a tie (label 0.5) when |V(x₀) − V(x₁)| < ``tie_threshold`` (two round or two non-round digits, mostly);
- exactly ``round(minority_fraction · n)`` of the non-tie pairs (and as many in proportion of the ties) are labelled by
  minority annotators; the minority pairs of a smaller fraction are among those of a larger one (same seed), so data at
  0 / 20 / 30 % differ only in the labels of those pairs.

Each row keeps the majority utilities (``utility_0``, ``utility_1``) and the classifier's digits, so that the labels for
another minority fraction are recomputed without sampling again (:func:`relabel`), and win rates are judged by the
majority's true (noise-free) utility. Everything is determined by the seed: image i of pair p is drawn with the seed
``image_seed(seed, p, i)``, the annotators' draws with generators seeded by ``seed`` (:func:`image_seed`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

#: digits the majority of the simulated annotators prefers
ROUND_DIGITS = (0, 6, 8, 9)
CAPTION = "a handwritten digit"
#: sampler settings of the bundled data (the bundled model's documented defaults)
SAMPLE_STEPS, SAMPLE_GUIDANCE = 20, 3.0
SPLITS = {"train": (0, 2000), "validation": (2000, 200)}
DATA_SEED = 0


@dataclass
class AnnotatorPool:
    """The simulated annotators: how many, which share of the labels the minority gives, their Bradley–Terry noise and ties."""

    num_annotators: int = 20
    minority_fraction: float = 0.1
    bt_scale: float = 10.0
    tie_threshold: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.minority_fraction < 0.5:
            raise ValueError(f"minority_fraction must be in [0, 0.5) (a minority), got {self.minority_fraction}")
        if self.num_annotators < 2:
            raise ValueError(f"num_annotators must be >= 2, got {self.num_annotators}")
        if self.bt_scale <= 0 or self.tie_threshold < 0:
            raise ValueError(f"bt_scale must be > 0 and tie_threshold >= 0, got {self.bt_scale}, {self.tie_threshold}")

    @property
    def num_minority_annotators(self) -> int:
        return 0 if self.minority_fraction == 0 else max(1, round(self.minority_fraction * self.num_annotators))


def round_utility(classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The majority's utility p(y ∈ {0, 6, 8, 9} | x) of images in [0, 1], (B, 3, H, W), from the digit classifier (float64)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            probs = torch.softmax(classifier.logits(images[start:start + batch_size].float()).double(), dim=-1)
            out.append(probs[:, list(ROUND_DIGITS)].sum(dim=-1))
    return torch.cat(out).cpu()


def label_pairs(utility_0: Sequence[float], utility_1: Sequence[float], pool: AnnotatorPool, seed: int = DATA_SEED) -> dict[str, list]:
    """Labels of pairs with majority utilities ``utility_0/1``: ``label_0``, ``user_id`` and ``minority`` (who labelled it).

    Deterministic in ``seed``: the order in which pairs become minority pairs and the Bradley–Terry draws do not depend
    on ``minority_fraction``.
    """
    u0, u1 = np.asarray(utility_0, dtype=np.float64), np.asarray(utility_1, dtype=np.float64)
    n = len(u0)
    diff = u0 - u1
    ties = np.abs(diff) < pool.tie_threshold
    rng_order, rng_bt, rng_user = (np.random.default_rng([seed, k]) for k in (1, 2, 3))
    order = rng_order.permutation(n)
    minority = np.zeros(n, dtype=bool)
    for group in (np.flatnonzero(~ties[order]), np.flatnonzero(ties[order])):
        chosen = order[group[: round(pool.minority_fraction * len(group))]]
        minority[chosen] = True
    draws = rng_bt.random(n)
    signed = np.where(minority, -diff, diff)
    first_preferred = draws < 1.0 / (1.0 + np.exp(-pool.bt_scale * signed))
    label = np.where(ties, 0.5, np.where(first_preferred, 1.0, 0.0))
    n_min = pool.num_minority_annotators
    n_maj = pool.num_annotators - n_min
    picks = rng_user.random(n)
    user = np.where(minority, n_maj + np.floor(picks * max(n_min, 1)), np.floor(picks * n_maj)).astype(int)
    return {"label_0": label.tolist(), "user_id": user.tolist(), "minority": minority.tolist()}


def _png(image: torch.Tensor) -> bytes:
    """8-bit grey PNG of an image in [0, 1] (the model's three channels differ by a few levels of 255; grey halves the files)."""
    from PIL import Image

    grey = (image.clamp(0, 1).mean(dim=0).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _decoded(png: bytes) -> torch.Tensor:
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def generate_digits_preferences(first_pair: int, num_pairs: int, pool: AnnotatorPool | None = None, seed: int = DATA_SEED,
                                num_steps: int = SAMPLE_STEPS, guidance_scale: float = SAMPLE_GUIDANCE, batch_size: int = 128,
                                pipeline=None, classifier=None, progress: bool = False):
    """Pairs ``first_pair .. first_pair + num_pairs - 1`` as a ``datasets.Dataset`` in the Pick-a-Pic layout.

    Columns: ``caption``, ``jpg_0``, ``jpg_1`` (``datasets.Image``, 8-bit grey PNG), ``label_0``, ``user_id``, and for analysis
    ``pair_id``, ``minority``, ``utility_0``, ``utility_1`` (majority utility of the stored PNGs), ``digit_0``,
    ``digit_1`` (classifier's argmax), ``label_seed`` (the seed of the annotators' draws, for :func:`relabel`). ``pipeline`` / ``classifier`` default to the bundled model and classifier.
    """
    import datasets

    pool = pool or AnnotatorPool()
    if pipeline is None:
        pipeline = load_pipeline()
    if classifier is None:
        classifier = load_classifier()
    schedule = pipeline.make_schedule("ddpm", num_steps, 1.0)
    ids = list(range(first_pair, first_pair + num_pairs))
    jobs = [(p, side) for p in ids for side in (0, 1)]
    pngs: dict[tuple[int, int], bytes] = {}
    for start in range(0, len(jobs), batch_size):
        part = jobs[start:start + batch_size]
        generators = [torch.Generator().manual_seed(image_seed(seed, p, side)) for p, side in part]
        with torch.no_grad():
            traj = pipeline.sample([CAPTION] * len(part), schedule, guidance_scale=guidance_scale, generators=generators)
        for job, image in zip(part, traj.images.float().cpu()):
            pngs[job] = _png(image)
        if progress:
            print(f"sampled {min(start + batch_size, len(jobs))}/{len(jobs)} images", flush=True)
    images = torch.stack([_decoded(pngs[job]) for job in jobs])
    utility = round_utility(classifier, images).numpy()
    with torch.no_grad():
        digits = classifier.logits(images).argmax(-1).numpy()
    u0, u1, d0, d1 = utility[0::2], utility[1::2], digits[0::2], digits[1::2]
    label_seed = seed + first_pair
    labels = label_pairs(u0, u1, pool, seed=label_seed)
    rows = {"caption": [CAPTION] * num_pairs, "jpg_0": [{"bytes": pngs[(p, 0)], "path": None} for p in ids],
            "jpg_1": [{"bytes": pngs[(p, 1)], "path": None} for p in ids], "label_0": labels["label_0"], "user_id": labels["user_id"],
            "pair_id": ids, "minority": labels["minority"], "utility_0": u0.tolist(), "utility_1": u1.tolist(),
            "digit_0": d0.tolist(), "digit_1": d1.tolist(), "label_seed": [label_seed] * num_pairs}
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(), "jpg_1": datasets.Image(),
                                  "label_0": datasets.Value("float64"), "user_id": datasets.Value("int64"), "pair_id": datasets.Value("int64"),
                                  "minority": datasets.Value("bool"), "utility_0": datasets.Value("float64"), "utility_1": datasets.Value("float64"),
                                  "digit_0": datasets.Value("int64"), "digit_1": datasets.Value("int64"), "label_seed": datasets.Value("int64")})
    return datasets.Dataset.from_dict(rows, features=features)


def relabel(dataset, pool: AnnotatorPool, seed: int | None = None):
    """``dataset`` (from :func:`generate_digits_preferences`) with ``label_0``, ``user_id`` and ``minority`` drawn again for ``pool``
    from its stored utilities (same images). ``seed`` defaults to the one its labels were drawn with (column ``label_seed``)."""
    seed = int(dataset[0]["label_seed"]) if seed is None else seed
    labels = label_pairs(list(dataset["utility_0"]), list(dataset["utility_1"]), pool, seed=seed)
    out = dataset.remove_columns(["label_0", "user_id", "minority"])
    out = out.add_column("label_0", labels["label_0"]).add_column("user_id", labels["user_id"]).add_column("minority", labels["minority"])
    return out


def image_seed(seed: int, pair: int, side: int) -> int:
    """The seed of image ``side`` (0 or 1) of pair ``pair``: a function of the three integers only."""
    return int(np.random.SeedSequence([seed, pair, side]).generate_state(1, dtype=np.uint64)[0] >> 1)


def load_pipeline():
    """The bundled digits model as a :class:`~trl_gfn.pipelines.DiffusionPipelineForRL` (no LoRA)."""
    from ..assets import BUNDLED_DIGITS_MODEL
    from ..pipelines import DiffusionPipelineForRL

    return DiffusionPipelineForRL.from_pretrained(BUNDLED_DIGITS_MODEL, use_lora=False, local_files_only=True)


def load_classifier():
    """The bundled digit classifier (frozen, eval mode)."""
    from ..assets import BUNDLED_DIGIT_CLASSIFIER
    from ..rewards.digits import DigitClassifier

    model = DigitClassifier.from_pretrained(BUNDLED_DIGIT_CLASSIFIER)
    model.eval().requires_grad_(False)
    return model


def load_digits_preferences(split: str = "train", minority_fraction: float | None = None, path: str | os.PathLike | None = None):
    """The bundled preference data (``trl_gfn.assets.BUNDLED_DIGITS_PREFERENCES``): ``split`` ``"train"`` (2,000 pairs) or
    ``"validation"`` (200). ``minority_fraction`` relabels it for another share of minority labels (same images)."""
    import datasets

    from ..assets import BUNDLED_DIGITS_PREFERENCES

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    file = os.path.join(os.fspath(path or BUNDLED_DIGITS_PREFERENCES), f"{split}.parquet")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no bundled preference data at {file}; build it with scripts/make_digits_preferences.py")
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    dataset = datasets.Dataset(InMemoryTable(pq.read_table(file)))  # features from the file's metadata; no cache files written
    if minority_fraction is not None:
        dataset = relabel(dataset, AnnotatorPool(minority_fraction=minority_fraction))
    return dataset


def describe(dataset) -> dict[str, Any]:
    """Counts of a labelled dataset: pairs, ties, minority labels among non-ties, pairs whose label disagrees with the majority's utility."""
    label = np.asarray(dataset["label_0"])
    u0, u1 = np.asarray(dataset["utility_0"]), np.asarray(dataset["utility_1"])
    minority = np.asarray(dataset["minority"], dtype=bool)
    non_tie = (label != 0.5)
    against = non_tie & ((label == 1.0) != (u0 > u1))
    return {"pairs": int(len(label)), "ties": int((~non_tie).sum()), "minority_non_tie": int((minority & non_tie).sum()),
            "minority_share_of_non_ties": float((minority & non_tie).sum() / max(1, non_tie.sum())),
            "labels_against_majority_utility": int(against.sum()), "round_share": float(((u0 > 0.5).sum() + (u1 > 0.5).sum()) / (2 * len(label)))}


__all__ = ["AnnotatorPool", "CAPTION", "ROUND_DIGITS", "SPLITS", "describe", "generate_digits_preferences", "image_seed", "label_pairs", "load_classifier",
           "load_digits_preferences", "load_pipeline", "relabel", "round_utility"]
