"""Preference data in the Pick-a-Pic layout: bad rows are reported (row and column) or skipped with a count, ties are
dropped or kept as soft labels, the preferred image comes first, images are resized, center-cropped and flipped as told."""

import io
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from trl_gfn import DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionPipelineForRL
from trl_gfn.data.preference import PreferenceDataError, PreferencePairs, preprocess_image
from trl_gfn.testing import brightness_preferences, encode_png, tiny_stable_diffusion


def pairs(dataset, **kw):
    return PreferencePairs(dataset, resolution=16, **kw)


def with_row(dataset, row, **changes):
    rows = dataset.to_dict()
    for column, value in changes.items():
        rows[column][row] = value
    return datasets.Dataset.from_dict(rows, features=dataset.features)


def test_missing_columns_are_named():
    ds = brightness_preferences(4).remove_columns(["label_0"])
    with pytest.raises(PreferenceDataError, match=r"train_dataset: missing column\(s\) \['label_0'\]"):
        pairs(ds)
    with pytest.raises(TypeError, match="pick a split"):
        pairs(datasets.DatasetDict({"train": brightness_preferences(4)}))


@pytest.mark.parametrize("column,value,message", [
    ("jpg_1", b"not an image", r"row 2, column 'jpg_1': cannot decode the image"),
    ("jpg_0", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, r"row 2, column 'jpg_0': cannot decode the image"),
    ("label_0", 1.5, r"row 2, column 'label_0': must be in \[0, 1\]"),
    ("label_0", float("nan"), r"row 2, column 'label_0': must be in \[0, 1\]"),
    ("caption", "", r"row 2, column 'caption': expected a non-empty string"),
    ("caption", None, r"row 2, column 'caption': expected a non-empty string"),
])
def test_bad_rows_raise_naming_row_and_column_or_are_skipped_with_a_count(column, value, message):
    ds = with_row(brightness_preferences(6), 2, **{column: value})
    with pytest.raises(PreferenceDataError, match=message):
        pairs(ds)
    with pytest.warns(UserWarning, match=r"skipped 1 invalid row\(s\) of 6"):
        kept = pairs(ds, invalid_rows="skip")
    assert len(kept) == 5 and 2 not in kept.rows and kept.report.invalid_skipped == 1


def test_bad_image_in_a_datasets_image_column_is_reported_not_raised_by_datasets():
    ds = brightness_preferences(4)
    rows = ds.to_dict()
    rows["jpg_0"] = [{"bytes": b, "path": None} for b in rows["jpg_0"]]
    rows["jpg_0"][1] = {"bytes": b"garbage", "path": None}
    features = ds.features.copy()
    features["jpg_0"] = datasets.Image()
    image_ds = datasets.Dataset.from_dict(rows, features=features)
    with pytest.raises(PreferenceDataError, match=r"eval_dataset row 1, column 'jpg_0'"):
        pairs(image_ds, name="eval_dataset")
    good = pairs(image_ds.select([0, 2, 3]))
    assert good.load([0]).winners.shape == (1, 3, 16, 16)


def test_lazy_image_check_reports_the_row_when_its_batch_loads():
    ds = with_row(brightness_preferences(6), 4, jpg_1=b"broken")
    lazy = pairs(ds, verify_images=False)
    assert len(lazy) == 6
    lazy.load([0, 1])
    with pytest.raises(PreferenceDataError, match=r"row 4, column 'jpg_1'"):
        lazy.load([3, 4])


def test_ties_are_dropped_or_kept_as_soft_labels_and_the_winner_comes_first():
    ds = brightness_preferences(6)  # rows 0, 2, 4: jpg_0 brighter and preferred; rows 1, 3, 5: jpg_1
    ds = with_row(with_row(ds, 3, label_0=0.5), 5, label_0=0.3)
    dropped = pairs(ds)
    assert dropped.rows == [0, 1, 2, 4] and dropped.report.ties_dropped == 2 and dropped.report.pairs == 4
    batch = dropped.load(range(4))
    assert (batch.winners.mean(dim=(1, 2, 3)) > batch.losers.mean(dim=(1, 2, 3))).all()  # the brighter image first, whichever column
    assert batch.labels.tolist() == [1.0] * 4 and batch.user_ids == [0, 1, 2, 1]
    soft = pairs(ds, tie_handling="soft")
    assert soft.rows == list(range(6)) and soft.labels[3] == 0.5 and soft.labels[5] == pytest.approx(0.7)
    assert soft.first_preferred[5] is False  # label 0.3: jpg_1 wins with probability 0.7
    with pytest.raises(PreferenceDataError, match="no preference pair left"):
        pairs(ds.select([3, 5]))


def test_annotator_column_alias():
    ds = brightness_preferences(4).rename_column("user_id", "annotator_id")
    assert pairs(ds).load([0, 1]).user_ids == [0, 1]
    assert pairs(brightness_preferences(4).remove_columns(["user_id"])).load([0]).user_ids == [None]


def test_resize_center_crop_and_flip():
    array = np.zeros((12, 20, 3), dtype=np.uint8)  # 12 high, 20 wide: margins of 4 columns are cut after scaling to 16 high
    array[:, :4] = 255
    array[:, 4:12] = 128
    image = Image.open(io.BytesIO(encode_png(array)))
    out = preprocess_image(image, 16, flip=False)
    assert out.shape == (3, 16, 16) and out.min() >= -1 and out.max() <= 1
    # resized to 27 x 16 (width x height), crop starts at column 5: the white band (columns 0-4 at the new scale) is gone
    assert out[:, :, 0].mean() < 0.5 and out[:, :, -1].mean() < -0.9
    flipped = preprocess_image(image, 16, flip=True)
    assert torch.equal(flipped, out.flip(-1))
    ds = brightness_preferences(4)
    flipping = pairs(ds, random_flip=True)
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    a = flipping.load(range(4), g)
    b = flipping.load(range(4), [torch.Generator().manual_seed(i) for i in range(4)])
    assert torch.equal(a.winners, b.winners)
    with pytest.raises(ValueError, match="one generator per pair"):
        flipping.load(range(4))


def test_trainer_applies_the_config_to_both_datasets(tmp_path):
    ds = with_row(brightness_preferences(9), 1, jpg_0=b"x")
    config = DiffusionDPOConfig(num_epochs=1, train_batch_size=4, logdir=str(tmp_path), run_name="r", save_freq=0, lora_rank=4,
                                invalid_rows="skip", tie_handling="soft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DiffusionDPOTrainer(config, DiffusionPipelineForRL(tiny_stable_diffusion()), ds, eval_dataset=ds)
    assert len(trainer.train_pairs) == 8 and trainer.train_pairs.resolution == 16 and trainer.eval_pairs.name == "eval_dataset"
    with pytest.raises(PreferenceDataError, match=r"train_dataset row 1, column 'jpg_0'"):
        DiffusionDPOTrainer(DiffusionDPOConfig(**{**config.to_dict(), "invalid_rows": "error"}), DiffusionPipelineForRL(tiny_stable_diffusion()), ds)


def test_the_up_front_image_check_warns_about_its_cost_on_a_large_dataset(monkeypatch):
    import warnings

    from trl_gfn.data import preference

    monkeypatch.setattr(preference, "VERIFY_IMAGES_WARN_ROWS", 4)
    data = brightness_preferences(8)
    with pytest.warns(UserWarning, match=r"verify_images=True decodes all 16 images"):
        preference.PreferencePairs(data, resolution=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preference.PreferencePairs(data, resolution=16, verify_images=False)
