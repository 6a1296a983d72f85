"""retrieval_eval.py: revisitop AP / mAP / mP@k on hand-computed rankings, and both protocols end to
end on generated data in the real on-disk layouts whose scores are known by construction."""
import json
import os
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
import retrieval_eval as R
from data import IMAGENET_MEAN, IMAGENET_STD, DataError
from backbones import build_backbone

RANDOM = ["--pretrained_weights", "random", "--arch", "resnet18", "--num_workers", "0", "--batch_size_per_gpu", "16"]


def pattern(seed, size=(32, 24)):
    """A visibly distinct image: a 4 x 3 grid of random colours, `size` = (width, height)."""
    grid = np.random.default_rng(seed).integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.NEAREST)


# ============ the authors' settings are the defaults ============

def test_defaults_are_the_settings_the_authors_ran():
    """The authors' eval_scripts.sh runs retrieval at --imsize 512 (our --image_size) --multiscale 1 on full query images,
    and eval_copy_detection.py at 320 x 320, one scale, AP over the top 20: with no flag given,
    those are our settings too."""
    for dataset in R.REVISITED:
        args = R.get_args(["--pretrained_weights", "random", "--dataset", dataset, "--data_path", "d"])
        assert (args.image_size, args.multiscale, args.crop_query_bbox, args.ap_top_k) == (512, True, False, None)
    args = R.get_args(["--pretrained_weights", "random", "--dataset", "copydays", "--data_path", "d"])
    assert (args.image_size, args.multiscale, args.ap_top_k) == (320, False, 20)
    args = R.get_args(["--pretrained_weights", "random", "--data_path", "d", "--multiscale", "false",
                       "--imsize", "224"])  # the flag's old name, kept for one release
    assert (args.image_size, args.multiscale) == (224, False)  # the single-scale setting stays reachable


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "copydays", "--ap_top_k", "-1"], "--ap_top_k -1 must be >= 0"),
    (["--dataset", "roxford5k", "--ap_top_k", "20"], "--ap_top_k 20 belongs to --dataset copydays"),
    (["--multiscale", "maybe"], "expected true or false, got 'maybe'"),
])
def test_bad_flags_are_one_line_errors_naming_the_value(argv, message, capsys):
    """A negative --ap_top_k, --ap_top_k on revisitop (whose AP ranks the whole database) and a
    --multiscale that is not true/false stop with a message naming the value."""
    with pytest.raises(SystemExit):
        R.get_args(["--pretrained_weights", "random", "--data_path", "d"] + argv)
    assert message in capsys.readouterr().err


# ============ revisitop metrics on hand-computed rankings ============

def test_average_precision_is_the_trapezoidal_rule():
    """Positives at positions 0 and 2 of 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 19/24; a positive
    never retrieved (3 positives, 2 found) scales the area by the recall step 1/3."""
    assert R.average_precision([0, 2], 2) == pytest.approx(19 / 24)
    assert R.average_precision([0, 2], 3) == pytest.approx(19 / 36)
    assert R.average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    # positives at 1 and 3: (0 + 1/2)/2 * 1/2 + (1/3 + 2/4)/2 * 1/2 = 1/8 + 5/24 = 1/3
    assert R.average_precision([1, 3], 2) == pytest.approx(1 / 3)


def test_junk_is_removed_from_the_ranking_before_ap():
    """Ranking [J, P, N, P] with J junk: without J the positives sit at 0 and 2 (AP 19/24); counted as
    a negative, J would push them to 1 and 3 (AP 1/3)."""
    ranking = np.array([7, 3, 5, 9])  # junk 7, positives 3 and 9, negative 5
    assert list(R.positive_ranks(ranking, [3, 9], [7])) == [0, 2]
    assert list(R.positive_ranks(ranking, [3, 9], [])) == [1, 3]
    assert list(R.positive_ranks(ranking, [3, 9, 7], [7])) == [0, 1, 3]  # listed as both: stays a positive
    mean_ap, _, skipped = R.protocol_scores([ranking], [np.array([3, 9])], [np.array([7])])
    assert mean_ap == pytest.approx(19 / 24) and skipped == 0


def test_precision_at_k_follows_revisitop():
    """revisitop's mP@k measures at min(k, position of the last positive): 1-based positions [2, 3]
    give 0 at k=1 and 2/3 at k=5 and 10; positions [1, 7, 12] give 1, 1/5 and 2/10."""
    assert R.precision_at(np.array([1, 2]), (1, 5, 10)) == pytest.approx([0, 2 / 3, 2 / 3])
    assert R.precision_at(np.array([0, 6, 11]), (1, 5, 10)) == pytest.approx([1, 1 / 5, 2 / 10])


def test_medium_and_hard_protocols_and_skipped_queries():
    """Medium: easy + hard positive, junk ignored; Hard: hard positive, easy + junk ignored. A query
    with no hard image is skipped in Hard only, one with no positive at all in both; both are counted."""
    gnd = [{"easy": np.array([0]), "hard": np.array([2]), "junk": np.array([1])},
           {"easy": np.array([3]), "hard": np.array([], dtype=np.int64), "junk": np.array([], dtype=np.int64)},
           {"easy": np.array([], dtype=np.int64), "hard": np.array([], dtype=np.int64), "junk": np.array([0])}]
    ranks = np.array([[1, 2, 4, 0, 3], [4, 3, 0, 1, 2], [0, 1, 2, 3, 4]])
    results = R.revisited_metrics(ranks, gnd)
    # query 0, Medium: junk 1 out -> [2, 4, 0, 3]: positives 2 and 0 at 0 and 2 -> AP 19/24, P@1 1, P@5 2/3
    # query 1, Medium: [4, 3, ...]: positive 3 at 1 -> AP (0 + 1/2)/2 = 1/4, P@1 0, P@5 1/2
    assert results["map_medium"] == pytest.approx(100 * (19 / 24 + 1 / 4) / 2)
    assert results["mp@1"] == pytest.approx(100 * (1 + 0) / 2)
    assert results["mp@5"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    # query 0, Hard: easy 0 and junk 1 out -> [2, 4, 3]: positive 2 at 0 -> AP 1
    assert results["map_hard"] == pytest.approx(100.0) and results["mp@10_hard"] == pytest.approx(100.0)
    assert results["skipped_medium"] == 1 and results["skipped_hard"] == 2


def test_every_query_skipped_gives_no_number():
    """With no positive anywhere the means are undefined (None), never 0 or NaN."""
    gnd = [{"easy": np.array([], dtype=np.int64), "hard": np.array([], dtype=np.int64), "junk": np.array([0])}]
    results = R.revisited_metrics(np.array([[0, 1]]), gnd)
    assert results["map_medium"] is None and results["mp@5_hard"] is None and results["skipped_medium"] == 1


# ============ images and features ============

class Recorder(torch.nn.Module):
    """A backbone that records the size of every batch it sees."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.calls, self.inputs = backbone, [], []

    def forward(self, images):
        self.calls.append(tuple(images.shape))
        self.inputs.append(images)
        return self.backbone(images)


def test_thumbnail_keeps_aspect_and_the_query_box_is_cropped_first(tmp_path):
    """A 40x30 image thumbnails to 16x12 at imsize 16 and is never enlarged; the box (4, 2, 36, 26),
    in the original image's pixels, is cut out before thumbnailing."""
    image = pattern(0, (40, 30))
    image.save(tmp_path / "a.png")
    assert data.ImageList([str(tmp_path / "a.png")], 16).load(0).size == (16, 12)
    assert data.ImageList([str(tmp_path / "a.png")], 64).load(0).size == (40, 30)
    cropped = data.ImageList([str(tmp_path / "a.png")], 64, boxes=[(4.2, 1.8, 36, 26)]).load(0)
    assert np.array_equal(np.asarray(cropped), np.asarray(image)[2:26, 4:36])
    assert data.ImageList([str(tmp_path / "a.png")], 16, boxes=[(4, 2, 36, 26)]).load(0).size == (16, 12)


def test_multiscale_features_are_the_average_of_three_scales(tmp_path):
    """--multiscale runs the 32x24 image at scales 1, 1/sqrt(2) and 1/2 (32x24, 22x16, 16x12 pixels:
    floor of the scaled sizes) and returns the mean of the three pooled features. The views are
    bilinear, as DINO's: at exactly half size (align_corners False) every output pixel samples the
    point midway between 2 x 2 input pixels, so the 1/2 view is the image's 2 x 2 block means."""
    pattern(1).save(tmp_path / "a.jpg")
    torch.manual_seed(0)
    backbone = Recorder(build_backbone("resnet18")).eval()
    dataset = data.ImageList([str(tmp_path / "a.jpg")], 32)
    multiscale = R.extract_multiscale_features(backbone, dataset, num_workers=0, scales=R.MULTISCALE, progress=False)
    assert [shape[-2:] for shape in backbone.calls] == [(24, 32), (16, 22), (12, 16)]
    image = dataset[0][0][None]  # (1, 3, 24, 32)
    full, _, half = backbone.inputs
    assert torch.equal(full, image)
    block_means = image.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-2, -1))  # (1, 3, 12, 16)
    assert torch.allclose(half, block_means, atol=1e-6)
    with torch.no_grad():
        expected = sum(backbone.backbone(view) for view in backbone.inputs) / 3
    assert multiscale.shape == (1, 512)
    assert torch.allclose(multiscale, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(multiscale, backbone.backbone(image).detach(), rtol=1e-2)


class HeightFeature(torch.nn.Module):
    """A hand-made backbone whose feature of an image of H rows is (1, H): each scale's feature is
    known without running a network."""

    def forward(self, images):
        return torch.tensor([[1.0, images.shape[-2]]]).expand(len(images), 2)  # (B, 2)


def test_multiscale_feature_is_the_normalised_mean_of_the_raw_features(tmp_path):
    """The scales of a 24-row image have 24, 16 and 12 rows, so the features (1, 24), (1, 16), (1, 12):
    the authors' multi_scale averages the raw features, (1, 52/3), and the L2-normalised mean is
    (3, 52) / sqrt(2713). Normalising each scale first, or a power mean, would change the first
    component."""
    pattern(2).save(tmp_path / "a.jpg")
    dataset = data.ImageList([str(tmp_path / "a.jpg")], 512)
    multiscale = R.extract_multiscale_features(HeightFeature(), dataset, num_workers=0, scales=R.MULTISCALE, progress=False)
    assert multiscale.tolist() == [pytest.approx([1, 52 / 3])]
    assert torch.nn.functional.normalize(multiscale, dim=1).tolist() == [pytest.approx([3 / 2713 ** 0.5,
                                                                                         52 / 2713 ** 0.5])]
    single = R.extract_multiscale_features(HeightFeature(), dataset, num_workers=0, progress=False)
    assert single.tolist() == [[1, 24]]


def test_batches_hold_one_image_size_and_features_keep_dataset_order(tmp_path):
    """Images of three sizes, interleaved, batch size 2: every batch holds one size, no batch is larger
    than 2, and each feature lands in its image's row (same features as one image at a time)."""
    sizes = [(32, 24), (24, 32), (32, 24), (20, 20), (24, 32), (32, 24), (32, 24), (24, 32)]
    paths = []
    for i, size in enumerate(sizes):
        pattern(10 + i, size).save(tmp_path / f"{i}.jpg")
        paths.append(str(tmp_path / f"{i}.jpg"))
    torch.manual_seed(0)
    backbone = Recorder(build_backbone("resnet18")).eval()
    dataset = data.ImageList(paths, 32)
    batched = R.extract_multiscale_features(backbone, dataset, batch_size=2, num_workers=0, progress=False)
    assert sorted(shape[0] for shape in backbone.calls) == [1, 1, 2, 2, 2]  # 4 x (32, 24), 3 x (24, 32), 1 x (20, 20)
    one_by_one = R.extract_multiscale_features(backbone, dataset, batch_size=1, num_workers=0, progress=False)
    assert torch.allclose(batched, one_by_one, rtol=1e-4, atol=1e-5)


# ============ Revisited Oxford / Paris end to end ============

def make_revisited(root, name="roxford5k"):
    """A gnd_<name>.pkl and jpg/ folder in the revisitop layout. Query a has a junk, an easy and a hard
    image, all byte-for-byte copies of it (junk first in the database); query b a junk and a hard
    copy; query c no positive. The 4 negatives (one of another size) are distinct images."""
    folder = root / name / "jpg"
    folder.mkdir(parents=True)
    pattern(100).save(folder / "query_a.jpg", quality=95)
    pattern(101).save(folder / "query_b.jpg", quality=95)
    pattern(102).save(folder / "query_c.jpg", quality=95)
    imlist = ["junk_a", "easy_a", "hard_a", "junk_b", "hard_b", "neg_0", "neg_1", "neg_2", "neg_3"]
    for image in imlist[:5]:
        shutil.copy(folder / f"query_{image[-1]}.jpg", folder / f"{image}.jpg")
    for i in range(4):
        pattern(200 + i, (24, 32) if i == 3 else (32, 24)).save(folder / f"neg_{i}.jpg", quality=95)
    box = [0.0, 0.0, 32.0, 24.0]  # the whole query: cropping to it changes nothing
    gnd = [{"bbx": box, "easy": [1], "hard": [2], "junk": [0]},
           {"bbx": box, "easy": [], "hard": [4], "junk": [3]},
           {"bbx": box, "easy": [], "hard": [], "junk": [5]}]
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": ["query_a", "query_b", "query_c"], "gnd": gnd}, f)
    return root


def test_revisited_end_to_end_matches_the_construction(tmp_path, capsys):
    """Random ResNet-18 on the generated roxford5k with the default settings (512 px, three scales, full
    query images): copies rank first, so mAP Medium and Hard and mP@1/5/10 are 100 once junk is
    ignored; query c (no positive) is skipped in both protocols; the JSON has the documented keys and
    says which settings were used."""
    make_revisited(tmp_path)
    out = tmp_path / "out.json"
    results = R.main(RANDOM + ["--dataset", "roxford5k", "--data_path", str(tmp_path), "--output_json", str(out)])
    assert json.loads(out.read_text()) == results
    for key in ("map_medium", "map_hard", "mp@1", "mp@5", "mp@10", "mp@1_hard", "mp@10_hard"):
        assert results[key] == pytest.approx(100.0), key
    assert results["skipped_medium"] == 1 and results["skipped_hard"] == 1
    assert (results["crop_query_bbox"], results["image_size"], results["multiscale"]) == (0.0, 512, 1.0)
    printed = capsys.readouterr().out
    assert "scales 1, 1/sqrt(2), 1/2; queries: full images (--crop_query_bbox false" in printed


def test_revisited_runs_three_scales_by_default_and_one_with_multiscale_false(tmp_path, monkeypatch):
    """By default every image of the generated roxford5k (11 of 32x24 and 1 of 24x32, never enlarged at
    512) is also run at 1/sqrt(2) and 1/2 (22x16 and 16x12 pixels); --multiscale false runs each image
    once, at its own size."""
    make_revisited(tmp_path)
    torch.manual_seed(0)
    recorder = Recorder(build_backbone("resnet18")).eval()
    monkeypatch.setattr(R, "frozen_backbone", lambda args, device: recorder)
    argv = RANDOM + ["--dataset", "roxford5k", "--data_path", str(tmp_path)]

    def images_per_size():  # (H, W) -> number of images the backbone saw at that size
        seen = Counter()
        for n, _, h, w in recorder.calls:
            seen[(h, w)] += n
        recorder.calls.clear()
        return dict(seen)

    R.main(argv)
    assert images_per_size() == {(24, 32): 11, (16, 22): 11, (12, 16): 11, (32, 24): 1, (22, 16): 1, (16, 12): 1}
    results = R.main(argv + ["--multiscale", "false"])
    assert images_per_size() == {(24, 32): 11, (32, 24): 1}
    assert results["multiscale"] == 0.0 and results["map_medium"] == pytest.approx(100.0)


def test_revisited_junk_ranked_first_would_cost_without_removal(tmp_path):
    """In the generated set the junk copy ranks first (equal similarity, lower database index): the same
    rankings scored with junk counted as negatives give (5/12 + 1/4)/2 = 1/3, not 1."""
    make_revisited(tmp_path)
    database, queries, gnd, _ = data.read_revisited(str(tmp_path), "roxford5k")
    torch.manual_seed(0)
    backbone = build_backbone("resnet18").eval()
    features = lambda paths: torch.nn.functional.normalize(  # noqa: E731
        R.extract_multiscale_features(backbone, data.ImageList(paths, 32), batch_size=16, num_workers=0, progress=False), dim=1)
    ranks = R.rank_database(features(queries), features(database))
    assert list(ranks[0][:3]) == [0, 1, 2] and list(ranks[1][:2]) == [3, 4]
    positives = [np.concatenate([g["easy"], g["hard"]]) for g in gnd]
    no_junk_removal, _, _ = R.protocol_scores(ranks, positives, [np.array([], dtype=np.int64)] * 3)
    assert no_junk_removal == pytest.approx(1 / 3)
    assert R.protocol_scores(ranks, positives, [g["junk"] for g in gnd])[0] == pytest.approx(1.0)


def test_revisited_with_query_box_and_multiscale(tmp_path, capsys):
    """--crop_query_bbox true --multiscale true runs on rparis6k and the output says the queries were
    cropped (the boxes cover the whole query, so the copies still score 100)."""
    make_revisited(tmp_path, "rparis6k")
    results = R.main(RANDOM + ["--dataset", "rparis6k", "--data_path", str(tmp_path), "--image_size", "32",
                               "--crop_query_bbox", "true", "--multiscale", "true"])
    assert results["map_medium"] == pytest.approx(100.0) and results["map_hard"] == pytest.approx(100.0)
    assert results["crop_query_bbox"] == 1.0 and results["multiscale"] == 1.0
    assert "cropped to their box (--crop_query_bbox true" in capsys.readouterr().out


def test_missing_ground_truth_or_image_is_named(tmp_path):
    """A missing gnd file and a missing database image are errors that name the file."""
    with pytest.raises(DataError, match="gnd_roxford5k.pkl does not exist"):
        data.read_revisited(str(tmp_path), "roxford5k")
    make_revisited(tmp_path)
    os.remove(tmp_path / "roxford5k" / "jpg" / "neg_2.jpg")
    with pytest.raises(DataError, match=r"image .*neg_2\.jpg named in .*gnd_roxford5k\.pkl does not exist"):
        data.read_revisited(str(tmp_path), "roxford5k")


def test_ground_truth_pickle_with_code_is_refused(tmp_path):
    """A gnd file that would build anything but lists, dicts, numbers and numpy arrays is not unpickled."""
    (tmp_path / "roxford5k").mkdir()
    class RunsCode:
        def __reduce__(self):
            return os.system, ("true",)

    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [], "bad": RunsCode()}, f)
    with pytest.raises(DataError, match="refused"):
        data.read_revisited(str(tmp_path), "roxford5k")


def test_numpy_arrays_in_the_ground_truth_are_read(tmp_path):
    """Index lists stored as numpy arrays (as some gnd files do) load like plain lists."""
    make_revisited(tmp_path)
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    cfg = pickle.load(open(path, "rb"))
    cfg["gnd"] = [{k: np.asarray(v) for k, v in g.items()} for g in cfg["gnd"]]
    pickle.dump(cfg, open(path, "wb"))
    _, _, gnd, _ = data.read_revisited(str(tmp_path), "roxford5k")
    assert list(gnd[0]["junk"]) == [0] and list(gnd[1]["hard"]) == [4]


def test_data_is_checked_before_the_checkpoint_is_read(tmp_path):
    """A missing ground-truth file is reported even when the checkpoint does not exist either: the data
    is read first, so a wrong --data_path fails in seconds, not after loading a large checkpoint."""
    with pytest.raises(DataError, match=r"ground-truth file .*rparis6k/gnd_rparis6k\.pkl does not exist"):
        R.main(["--pretrained_weights", str(tmp_path / "missing.pth"), "--dataset", "rparis6k",
                "--data_path", str(tmp_path)])


# ============ Copydays ============

def test_copydays_ids_map_to_their_original():
    """The first 4 digits of a 6-digit Copydays id name the original: strong/200101.jpg -> 2001."""
    assert data.copydays_group("/c/strong/200101.jpg") == "2001"
    assert data.copydays_group("/c/jpegqual/3/215600.jpg") == "2156"
    with pytest.raises(DataError, match="6-digit id"):
        data.copydays_group("/c/strong/holiday.jpg")


def test_copydays_ap_of_each_query_by_hand():
    """Originals at angles 0, 90, 45 degrees and a distractor at 10: a query at ~6 degrees whose original
    is the 90-degree one finds it last of 4 (AP (0/3 + 1/4)/2 = 1/8); one whose original is the 0-degree
    one finds it second, after the distractor (AP (0 + 1/2)/2 = 1/4)."""
    angle = lambda degrees: [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]  # noqa: E731
    database = torch.tensor([angle(0), angle(90), angle(45), angle(10)], dtype=torch.float32)
    queries = torch.tensor([angle(6), angle(8)], dtype=torch.float32)
    aps = R.copydays_scores(queries, ["2001", "2000"], database, ["2000", "2001", "2002"])
    assert aps == pytest.approx([100 / 8, 100 / 4])


def test_copydays_ap_is_computed_on_the_top_20():
    """DINO's and the authors' Copydays AP keeps each query's top 20. Database: originals 2000 at 50
    degrees and 2001 at 0.5 degrees, then 23 distractors at 1, 2, ..., 23 degrees. A query at 10 degrees
    of original 2001 finds it 20th (19 distractors are within 9.5 degrees): AP (0/19 + 1/20)/2 = 1/40,
    with or without the cut. A query at 0 degrees of original 2000 finds it 25th, below the cut: AP 0,
    where the whole ranking would give (0/24 + 1/25)/2 = 1/50. With both originals in group 2001, the
    0-degree query finds one 1st and one 25th: the cut leaves (1 + 1)/2 x 1/2 = 1/2, since the AP still
    divides by both originals (the whole ranking adds (1/24 + 2/25)/2 x 1/2)."""
    angle = lambda degrees: [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]  # noqa: E731
    database = torch.tensor([angle(50), angle(0.5)] + [angle(d) for d in range(1, 24)], dtype=torch.float32)
    queries = torch.tensor([angle(10), angle(0)], dtype=torch.float32)
    assert R.COPYDAYS_TOP_K == 20
    assert R.copydays_scores(queries, ["2001", "2000"], database, ["2000", "2001"]) == pytest.approx([100 / 40, 0])
    assert R.copydays_scores(queries, ["2001", "2000"], database, ["2000", "2001"], top_k=0) == pytest.approx(
        [100 / 40, 100 / 50])
    two = R.copydays_scores(queries[1:], ["2001"], database, ["2001", "2001"])
    assert two == pytest.approx([100 / 2])
    whole = R.copydays_scores(queries[1:], ["2001"], database, ["2001", "2001"], top_k=0)
    assert whole == pytest.approx([100 * (1 / 2 + (1 / 24 + 2 / 25) / 4)])


def test_whitening_gives_unit_variance():
    """Points (+-2, 0), (0, +-1) have covariance diag(2, 1/2): whitened, every point has norm sqrt(2)
    (x / sqrt(2) and y / sqrt(1/2)). On 3 points in 5-d the singular directions are clamped and the
    whitened set has covariance diag(1, 1, 0, 0, 0), with finite values."""
    points = torch.tensor([[2.0, 0], [-2, 0], [0, 1], [0, -1]])
    mean, projection = R.fit_whitening(points)
    whitened = (points - mean) @ projection
    assert whitened.norm(dim=1) == pytest.approx([2 ** 0.5] * 4, rel=1e-5)
    tiny = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    mean, projection = R.fit_whitening(tiny)
    whitened = (tiny - mean) @ projection  # (3, 5)
    assert torch.isfinite(projection).all()
    assert torch.allclose(whitened.T @ whitened / 3, torch.diag(torch.tensor([1.0, 1, 0, 0, 0])), atol=1e-4)


def primary(seed, channel, size=(32, 24)):
    """A 4 x 3 grid whose cells have random intensities (128..255) on one colour channel only: its mean
    colour points exactly along that channel, whatever part of it is kept."""
    grid = np.zeros((3, 4, 3), dtype=np.uint8)
    grid[..., channel] = np.random.default_rng(seed).integers(128, 256, size=(3, 4))
    return Image.fromarray(grid).resize(size, Image.Resampling.NEAREST)


def complementary(image):
    """Copydays-style strong colour edit: each channel replaced by the mean of the other two, so a pure
    red image turns cyan (0, r/2, r/2), orthogonal in mean colour to what it was."""
    r, g, b = np.moveaxis(np.asarray(image, dtype=np.uint16), -1, 0)
    return Image.fromarray(np.stack([(g + b) // 2, (r + b) // 2, (r + g) // 2], axis=-1).astype(np.uint8))


def make_copydays(root, n_distractors=4):
    """The INRIA layout, generated. original/ 200000 (A, red cells), 200100 (B, green), 200200 (C, blue).
    strong/ (strong edits: complementary colours, then a 90-degree rotation for 200001 and 200101, a
    crop and a mirror for 200002) 200001 and 200002 of A, 200101 of B. jpegqual/75 (weak: the originals
    re-encoded at JPEG quality 75) and crops/50 (the central half of their surface) under the originals'
    names. Distractors and whitening images: grids of random colours, every channel in 60..255."""
    (root / "original").mkdir(parents=True)
    originals = {name: primary(300 + i, i) for i, name in enumerate(["200000", "200100", "200200"])}
    for name, image in originals.items():
        image.save(root / "original" / f"{name}.jpg", quality=95)
    a, b = (Image.open(root / "original" / f"{name}.jpg").convert("RGB") for name in ("200000", "200100"))
    blocks = {
        "strong": {"200001": complementary(a).transpose(Image.Transpose.ROTATE_90),
                   "200002": complementary(a).crop((2, 2, 30, 22)).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                   "200101": complementary(b).transpose(Image.Transpose.ROTATE_90)},
        "jpegqual/75": {n: Image.open(root / "original" / f"{n}.jpg").convert("RGB") for n in originals},
        "crops/50": {n: Image.open(root / "original" / f"{n}.jpg").convert("RGB").crop((4, 3, 27, 20))
                     for n in originals},
    }
    for block, images in blocks.items():
        (root / block).mkdir(parents=True)
        for name, image in images.items():
            image.save(root / block / f"{name}.jpg", quality=75 if block == "jpegqual/75" else 95)
    for folder, seeds in (("distractors", range(400, 400 + n_distractors)), ("whitening", range(500, 506))):
        (root.parent / folder).mkdir()
        for seed in seeds:
            grid = np.random.default_rng(seed).integers(60, 256, size=(3, 4, 3), dtype=np.uint8)
            image = Image.fromarray(grid).resize((32, 24), Image.Resampling.NEAREST)
            image.save(root.parent / folder / f"{seed}.jpg", quality=95)
    return root


class MeanColour(torch.nn.Module):
    """A hand-made backbone whose feature is the image's mean colour, RGB in [0, 1] (the ImageNet
    normalisation undone): a copy is found exactly when its mean colour points where its original's does."""

    def forward(self, images):
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (images * std + mean).mean(dim=(2, 3))  # (B, 3)


def test_copydays_end_to_end_scores_by_hand(tmp_path, monkeypatch, capsys):
    """Default Copydays settings (320 x 320, one scale, AP over the top 20) with the mean-colour backbone
    and 22 distractors, so a database of 25. Weak copies (JPEG 75, central crop) keep their original's
    colour: found first, mAP 100. A strong copy's colour is orthogonal to its original's (up to JPEG
    noise: cosine < 0.02) and at cosine > 0.7 to every other image's: the original ranks 25th, below
    the cut, so mAP strong is 0; over the whole ranking (--ap_top_k 0) it is (0/24 + 1/25)/2 = 2%."""
    root = make_copydays(tmp_path / "copydays", n_distractors=22)
    monkeypatch.setattr(R, "frozen_backbone", lambda args, device: MeanColour())
    argv = RANDOM + ["--dataset", "copydays", "--data_path", str(root),
                     "--distractors_path", str(tmp_path / "distractors")]
    results = R.main(argv)
    assert "320x320 images, single scale, no whitening, AP over the top 20" in capsys.readouterr().out
    assert (results["n_database"], results["image_size"], results["multiscale"], results["ap_top_k"]) == (25, 320, 0.0, 20)
    for block in ("original", "jpegqual_75", "crops_50"):
        assert results[f"map_{block}"] == pytest.approx(100.0), block
    assert results["map_strong"] == pytest.approx(0.0)
    whole = R.main(argv + ["--ap_top_k", "0"])
    assert whole["map_strong"] == pytest.approx(100 * (1 / 25) / 2) and whole["map_jpegqual_75"] == pytest.approx(100.0)


def test_copydays_end_to_end_with_distractors_and_whitening(tmp_path):
    """Random ResNet-18 on the generated Copydays with 4 distractors and whitening learned on 6 images:
    each original finds itself (mAP 100), the weak blocks (JPEG 75, central crop) score 100 and the
    strong block less, and the database holds 3 + 4."""
    root = make_copydays(tmp_path / "copydays")
    out = tmp_path / "out.json"
    with pytest.warns(UserWarning, match="whitening learned on 6 images"):
        results = R.main(RANDOM + ["--dataset", "copydays", "--data_path", str(root), "--image_size", "32",
                                   "--distractors_path", str(tmp_path / "distractors"),
                                   "--whitening_path", str(tmp_path / "whitening"), "--output_json", str(out)])
    assert json.loads(out.read_text()) == results
    assert results["map_original"] == pytest.approx(100.0)
    assert results["map_jpegqual_75"] == pytest.approx(100.0) and results["map_crops_50"] == pytest.approx(100.0)
    assert results["map_strong"] < results["map_jpegqual_75"]  # the strong edits do move the features
    assert results["n_database"] == 7 and results["whitening"] == 1.0 and results["ap_top_k"] == 20


def test_copydays_on_a_carp_checkpoint(tmp_path):
    """A checkpoint laid out as pretrain.py writes it ({'teacher': {'backbone.*'}, 'args'}) loads, with
    the architecture read from its args (resnet18, not the default): each original finds itself, the
    weak JPEG copies score 100 and the strong edits less, over a database of the 3 originals."""
    make_copydays(tmp_path / "copydays")  # found as <data_path>/copydays
    torch.manual_seed(0)
    state = build_backbone("resnet18").state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()},
                "args": {"arch": "resnet18", "small_image_stem": False}}, tmp_path / "checkpoint.pth")
    results = R.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--num_workers", "0",
                      "--dataset", "copydays", "--data_path", str(tmp_path), "--image_size", "32"])
    assert results["map_original"] == pytest.approx(100.0) and results["map_jpegqual_75"] == pytest.approx(100.0)
    assert results["map_strong"] < 100.0 and results["n_database"] == 3


def test_copydays_query_without_original_is_named(tmp_path):
    """A query whose 4-digit prefix matches no original is an error that names it."""
    root = make_copydays(tmp_path / "copydays")
    shutil.copy(root / "strong" / "200001.jpg", root / "strong" / "209901.jpg")
    with pytest.raises(DataError, match=r"strong/209901\.jpg has no original"):
        R.main(RANDOM + ["--dataset", "copydays", "--data_path", str(root)])


# ============ the metrics and the flags end to end, on images whose mean colour is the feature ============

def colour_at(degrees):
    """A flat colour in the red-green plane at `degrees` from red: its mean-colour feature (MeanColour)
    lies at that angle, so cosine similarities, and the rankings, follow the angles."""
    return tuple(int(round(255 * v)) for v in (np.cos(np.radians(degrees)), np.sin(np.radians(degrees)), 0.0))


def write_revisited(root, name, images, gnd, qimlist):
    """<root>/<name>/gnd_<name>.pkl and jpg/: images {name: PIL image}; the database is every image
    not in qimlist, in the given order."""
    folder = root / name / "jpg"
    folder.mkdir(parents=True)
    for image_name, image in images.items():
        image.save(folder / f"{image_name}.jpg", quality=95)
    imlist = [n for n in images if n not in qimlist]
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def test_revisited_map_and_precision_at_k_by_hand(tmp_path, monkeypatch):
    """Mean-colour backbone, database d0, ..., d11 at 5, 10, ..., 60 degrees; query q0 at 0 degrees
    ranks them d0, d1, ..., d11, query q1 at 60 degrees d11, d10, ..., d0.
    q0: junk d0, easy d1, hard d6. Medium (junk out): positives at positions 1 and 6 of d1, ..., d11:
    AP (1 + 1)/2 x 1/2 + (1/5 + 2/6)/2 x 1/2 = 19/30; P@1 1, P@5 1/5, P@10 at its last positive 2/6.
    Hard (easy and junk out): d6 at position 5 of d2, ..., d11: AP (0/4 + 1/5)/2 = 1/10, P@1 0, P@5 and
    P@10 1/5. q1: easy d10 only: Medium d10 2nd: AP (0/1 + 1/2)/2 = 1/4, P@1 0, P@5 and P@10 1/2; no
    hard image, so skipped in Hard. Means: mAP Medium 100 (19/30 + 1/4)/2 = 44.17, mP@1 50, mP@5 35,
    mP@10 41.67; mAP Hard 10, mP@1 0, mP@5 and mP@10 20."""
    images = {f"d{i}": Image.new("RGB", (32, 24), colour_at(5 * (i + 1))) for i in range(12)}
    images.update(q0=Image.new("RGB", (32, 24), colour_at(0)), q1=Image.new("RGB", (32, 24), colour_at(60)))
    box = [0.0, 0.0, 32.0, 24.0]
    gnd = [{"bbx": box, "easy": [1], "hard": [6], "junk": [0]}, {"bbx": box, "easy": [10], "hard": [], "junk": []}]
    write_revisited(tmp_path, "roxford5k", images, gnd, ["q0", "q1"])
    monkeypatch.setattr(R, "frozen_backbone", lambda args, device: MeanColour())
    results = R.main(RANDOM + ["--dataset", "roxford5k", "--data_path", str(tmp_path)])
    expected = {"map_medium": 100 * (19 / 30 + 1 / 4) / 2, "mp@1": 50.0, "mp@5": 35.0,
                "mp@10": 100 * (1 / 3 + 1 / 2) / 2, "skipped_medium": 0,
                "map_hard": 10.0, "mp@1_hard": 0.0, "mp@5_hard": 20.0, "mp@10_hard": 20.0, "skipped_hard": 1}
    assert {key: results[key] for key in expected} == pytest.approx(expected)


def test_crop_query_bbox_crops_the_query_before_its_feature(tmp_path, monkeypatch):
    """Query: left half red, right half green, its box the left half. Database: red (0 degrees), the
    mix (45), green-ish (80); the query's positive is the red image. Full query (default): mean colour
    at 45 degrees, so it ranks the mix, green-ish (35 degrees away), then red (45): AP (0/2 + 1/3)/2
    = 1/6, P@5 at its last positive 1/3. --crop_query_bbox true: the red half alone finds red first:
    AP 1, P@5 1."""
    query = Image.new("RGB", (32, 24), colour_at(90))
    query.paste(Image.new("RGB", (16, 24), colour_at(0)), (0, 0))
    images = {"red": Image.new("RGB", (32, 24), colour_at(0)), "mix": Image.new("RGB", (32, 24), colour_at(45)),
              "greenish": Image.new("RGB", (32, 24), colour_at(80)), "query": query}
    gnd = [{"bbx": [0.0, 0.0, 16.0, 24.0], "easy": [0], "hard": [], "junk": []}]  # the box: the left half
    write_revisited(tmp_path, "rparis6k", images, gnd, ["query"])
    monkeypatch.setattr(R, "frozen_backbone", lambda args, device: MeanColour())
    argv = RANDOM + ["--dataset", "rparis6k", "--data_path", str(tmp_path)]
    full, cropped = R.main(argv), R.main(argv + ["--crop_query_bbox", "true"])
    assert (full["map_medium"], full["mp@5"]) == (pytest.approx(100 / 6), pytest.approx(100 / 3))
    assert (cropped["map_medium"], cropped["mp@5"]) == (pytest.approx(100.0), pytest.approx(100.0))


def test_image_size_is_the_longer_side_of_the_thumbnails(tmp_path, monkeypatch):
    """--image_size 16 --multiscale false on the generated roxford5k: the 11 images of 32x24 reach
    the backbone as 16x12, the one of 24x32 as 12x16 (aspect kept); --image_size 24 gives 24x18 and
    18x24."""
    make_revisited(tmp_path)
    recorder = Recorder(build_backbone("resnet18")).eval()
    monkeypatch.setattr(R, "frozen_backbone", lambda args, device: recorder)
    for image_size, sizes in ((16, {(12, 16): 11, (16, 12): 1}), (24, {(18, 24): 11, (24, 18): 1})):
        R.main(RANDOM + ["--dataset", "roxford5k", "--data_path", str(tmp_path), "--multiscale", "false",
                         "--image_size", str(image_size)])
        seen = Counter()
        for n, _, h, w in recorder.calls:
            seen[(h, w)] += n
        recorder.calls.clear()
        assert dict(seen) == sizes, image_size


def test_copydays_whitening_flag_changes_the_ranking_by_hand(tmp_path, monkeypatch):
    """Mean-colour backbone, colours as offsets from grey (128, 128, 128). Whitening images: red
    +-100, green +-20, blue +-20 (one channel at a time): centred at grey, standard deviations
    57.7, 11.5, 11.5 along the axes. Originals: A = grey + (60, 20, 0), B = grey + (0, 0, 20); the
    strong query of A is grey + (0, 20, 5). Raw, B is nearer (cosine 0.9945 against 0.981 to A, the
    large red offset of A counts fully): A ranks 2nd, AP (0/1 + 1/2)/2 = 25 %. Whitened
    (--whitening_path), the offsets are divided by the deviations: the query (0, 1.73, 0.43) is at
    cosine 0.54 to A (1.04, 1.73, 0) and 0.24 to B (0, 0, 1.73): A first, AP 100 %. The originals
    find themselves either way."""
    root = tmp_path / "copydays"
    grey = np.array([128, 128, 128])
    colours = {"original/200000.png": (60, 20, 0), "original/200100.png": (0, 0, 20), "strong/200001.png": (0, 20, 5)}
    for i, offset in enumerate([(100, 0, 0), (-100, 0, 0), (0, 20, 0), (0, -20, 0), (0, 0, 20), (0, 0, -20)]):
        colours[f"../whitening/{i}.png"] = offset
    for path, offset in colours.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), tuple(int(v) for v in grey + offset)).save(root / path)
    monkeypatch.setattr(R, "frozen_backbone", lambda args, device: MeanColour())
    argv = RANDOM + ["--dataset", "copydays", "--data_path", str(root), "--image_size", "8"]
    with pytest.warns(UserWarning, match="not found"):  # no jpegqual / crops blocks here
        raw = R.main(argv)
    with pytest.warns(UserWarning, match="not found"):
        whitened = R.main(argv + ["--whitening_path", str(tmp_path / "whitening")])
    assert (raw["map_strong"], raw["map_original"], raw["whitening"]) == (
        pytest.approx(25.0), pytest.approx(100.0), 0.0)
    assert (whitened["map_strong"], whitened["map_original"], whitened["whitening"]) == (
        pytest.approx(100.0), pytest.approx(100.0), 1.0)
