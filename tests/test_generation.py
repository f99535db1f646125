"""CPU tests of the image-generation tree (generation/): BigGAN, DiffAugment, the VkD term, FID, data and the
training entry point, on tiny data written to tmp_path."""
import json
import os

import numpy as np
import pytest
import timm
import torch
from conftest import write_idx

from generation import data as gan_data
from generation import main as gan_main
from generation.arguments import parse_arguments
from generation.biggan import Discriminator, Generator
from generation.diffaug import cutout, diff_augment, parse_policy, translation
from generation.distillation import GanVkDLoss
from generation.engine import LeCam
from generation.fid import GeneratorEvaluator
from generation.teachers import FrozenImageNetwork, TimmNetwork
from vkd import norms
from vkd.data.fmnist import read_idx
from vkd.norms import build_normalisation
from vkd.projector import OrthogonalProjector

TEACHER, FID_NETWORK = "test_resnet", "test_efficientnet"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machines running the tests are small and shared
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- whitening

@pytest.mark.parametrize("whitening", ["cholesky", "zca"])
def test_whitening_gives_identity_covariance_on_a_full_rank_batch(whitening):
    torch.manual_seed(0)
    mixing = torch.randn(8, 8)
    features = torch.randn(400, 8) @ mixing + 3.0  # correlated, offset
    whitened = build_normalisation("whiten", whitening, eps=1e-6)(features)
    centred = whitened - whitened.mean(0)
    # Cholesky uses the unbiased covariance, ZCA the biased one.
    covariance = centred.T @ centred / (len(features) - (1 if whitening == "cholesky" else 0))
    assert torch.allclose(whitened.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(covariance, torch.eye(8), atol=1e-3)


@pytest.mark.parametrize("whitening", ["cholesky", "zca"])
def test_whitening_is_finite_when_the_batch_is_narrower_than_the_features(whitening):
    torch.manual_seed(0)
    features = torch.randn(10, 64) * 5
    whitened = build_normalisation("whiten", whitening, eps=1e-4)(features)
    assert whitened.shape == (10, 64) and torch.isfinite(whitened).all()
    # On the span of the batch the covariance is still the identity: 9 unit eigenvalues (rank B - 1).
    centred = whitened - whitened.mean(0)
    eigenvalues = torch.linalg.eigvalsh((centred.T @ centred / (9 if whitening == "cholesky" else 10)).double())
    assert torch.allclose(eigenvalues[-9:], torch.ones(9, dtype=torch.float64), atol=0.02)
    assert eigenvalues[:-9].abs().max() < 1e-6


def test_whitening_needs_a_positive_eps():
    with pytest.raises(ValueError, match="eps > 0"):
        build_normalisation("whiten", "cholesky", eps=0)


def test_cholesky_and_zca_whitening_differ_by_a_rotation():
    torch.manual_seed(1)
    features = torch.randn(200, 6) @ torch.randn(6, 6)
    cholesky = norms.whiten_cholesky(features, eps=1e-8).double()
    zca = norms.whiten(features, eps=1e-8).double() * np.sqrt(199 / 200)  # unbiased vs biased scale
    rotation = torch.linalg.lstsq(cholesky, zca).solution
    assert torch.allclose(rotation.T @ rotation, torch.eye(6, dtype=torch.float64), atol=1e-4)


# ----------------------------------------------------------------------------- networks

@pytest.mark.parametrize("ch", [2, 4])
def test_generator_and_discriminator_shapes(ch):
    torch.manual_seed(0)
    generator, discriminator = Generator(ch, dim_z=16, num_classes=3), Discriminator(ch, num_classes=3, kd_dim=12)
    labels = torch.tensor([0, 1, 2, 1, 0])
    images = generator(torch.randn(5, 16), labels)
    assert images.shape == (5, 3, 32, 32) and images.abs().max() <= 1
    logits, features = discriminator(images, labels)
    assert logits.shape == (5,) and features.shape == (5, 12)
    assert Discriminator(ch, num_classes=3)(images, labels)[1] is None  # no KD head without distillation
    # BigGAN's 32x32 layout: 3 up-sampling blocks of 4 ch channels, 4 D blocks of 4 ch channels.
    assert len(generator.blocks) == 3 and generator.blocks[0].conv1.out_channels == 4 * ch
    assert len(discriminator.blocks) == 4 and discriminator.pooled(images).shape == (5, 4 * ch)


class RowsNetwork(FrozenImageNetwork):
    """A stand-in network that returns its input rows (and rows as logits), to test the statistics."""

    name = "rows"

    def __init__(self, dim: int):
        super().__init__()
        self.feature_dim = dim
        self.freeze()

    def forward(self, rows):
        return rows, rows


def tiny_vkd_setup(teacher_dim=8, kd_dim=6):
    torch.manual_seed(0)
    teacher = TimmNetwork(timm.create_model(TEACHER, num_classes=3), 32, TEACHER)
    discriminator = Discriminator(2, num_classes=3, kd_dim=kd_dim)
    discriminator.projector = OrthogonalProjector(kd_dim, teacher.feature_dim)
    criterion = GanVkDLoss(teacher, build_normalisation("whiten", "cholesky", 1e-4))
    return teacher, discriminator, criterion


def test_the_projector_is_orthogonal_and_shared_by_real_and_fake():
    _, discriminator, criterion = tiny_vkd_setup()
    weight = discriminator.projector.weight
    assert torch.allclose(weight.T @ weight, torch.eye(weight.shape[1]), atol=1e-5)
    images, labels = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(0, 3, (8,))
    gradients = {}
    for side in ("vkd_fake", "vkd_real"):
        discriminator.zero_grad()
        _, features = discriminator(images, labels)
        fake_target, real_target = criterion.targets(images, num_fake=4)
        projected = discriminator.projector(features)
        half = projected[:4] if side == "vkd_fake" else projected[4:]
        torch.nn.functional.smooth_l1_loss(half, fake_target if side == "vkd_fake" else real_target).backward()
        gradients[side] = [p.grad.clone() for p in discriminator.projector.parameters()]
    # One module, one set of parameters: both halves' terms reach the same tensors.
    assert len(gradients["vkd_fake"]) == len(list(discriminator.projector.parameters())) == 1
    assert gradients["vkd_fake"][0].abs().sum() > 0 and gradients["vkd_real"][0].abs().sum() > 0


def test_the_vkd_gradient_reaches_the_discriminator_and_not_the_teacher():
    teacher, discriminator, criterion = tiny_vkd_setup()
    images, labels = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(0, 3, (8,))
    images.requires_grad_(True)
    _, features = discriminator(images, labels)
    terms = criterion(images, discriminator.projector(features), num_fake=4)
    terms["vkd"].backward()
    assert terms["vkd"] > 0
    assert discriminator.kd_head[0].parametrizations.weight.original.grad.abs().sum() > 0
    assert discriminator.blocks[0].conv1.parametrizations.weight.original.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # The teacher runs without a graph: its targets are constants of the loss.
    assert not any(target.requires_grad for target in criterion.targets(images, 4))


# ----------------------------------------------------------------------------- DiffAugment and LeCam

def test_diffaugment_translation_and_cutout():
    torch.manual_seed(0)
    images = torch.zeros(16, 3, 32, 32)
    images[:, :, 8:24, 8:24] = 1.0  # a centred square: every shift of <= 4 px keeps it inside
    shifted = translation(images)
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))
    assert not torch.equal(shifted, images)
    erased = cutout(torch.ones(64, 3, 32, 32))
    zeros = (erased[:, 0] == 0).sum(dim=(1, 2))
    assert zeros.max() == 16 * 16 and zeros.min() >= 8 * 8  # a 16x16 square, clipped at the border at most to 8x8
    assert torch.equal(diff_augment(images, parse_policy("none")), images)
    assert parse_policy("translation,cutout") == ["translation", "cutout"]
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        parse_policy("translation,zoom")


def test_lecam_penalty_follows_the_emas_and_starts_late():
    lecam = LeCam(weight=0.5, decay=0.9, start=2, init=1000.0)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -3.0])
    lecam.update(real, fake, iteration=0)  # before start: the EMAs take the current means
    assert (lecam.ema_real, lecam.ema_fake) == (2.0, -2.0)
    assert lecam.penalty(real, fake, iteration=2) == 0
    lecam.update(torch.tensor([4.0]), torch.tensor([0.0]), iteration=3)
    assert lecam.ema_real == pytest.approx(0.9 * 2 + 0.1 * 4) and lecam.ema_fake == pytest.approx(0.9 * -2 + 0.0)
    # relu(real - ema_fake)^2 = (1 + 1.8)^2, (3 + 1.8)^2; relu(ema_real - fake)^2 = (2.2 + 1)^2, (2.2 + 3)^2
    expected = 0.5 * (np.mean([2.8 ** 2, 4.8 ** 2]) + np.mean([3.2 ** 2, 5.2 ** 2]))
    assert float(lecam.penalty(real, fake, iteration=3)) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- FID

def test_fid_of_two_samples_of_one_gaussian_is_near_zero_and_of_shifted_ones_the_closed_form():
    torch.manual_seed(0)
    dim, count = 4, 20000
    reference = torch.randn(count, dim)
    evaluator = GeneratorEvaluator(RowsNetwork(dim), reference, batch_size=5000, device=torch.device("cpu"))
    same = evaluator.evaluate(lambda n: torch.randn(n, dim), count)
    assert same["fid"] < 0.01 and not same["fid_comparable_with_inception"]
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0])
    shifted = evaluator.evaluate(lambda n: torch.randn(n, dim) + shift, count)
    # Equal covariances: FID = ||mu_1 - mu_2||^2 = 5.25.
    assert shifted["fid"] == pytest.approx(float(shift.square().sum()), abs=0.03)
    assert "not comparable with Inception FIDs" in evaluator.describe(shifted)


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory) -> str:
    """Fashion-MNIST's four IDX files (gzipped) with 60 train and 20 test random 28x28 images of 10 classes."""
    root = tmp_path_factory.mktemp("fashion")
    generator = np.random.RandomState(0)
    for split, count in (("train", 60), ("t10k", 20)):
        write_idx(str(root / f"{split}-images-idx3-ubyte"), generator.randint(0, 256, (count, 28, 28)), compress=True)
        write_idx(str(root / f"{split}-labels-idx1-ubyte"), np.arange(count) % 10, compress=True)
    return str(root)


def test_fashion_idx_files_load_padded_to_32(tiny_fashion):
    data = gan_data.load_image_data("FASHION", tiny_fashion)
    assert data.train_images.shape == (60, 3, 32, 32) and data.test_images.shape == (20, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.num_classes == 10
    assert data.train_images[:, :, :2].sum() == 0 and torch.equal(data.train_images[:, 0], data.train_images[:, 2])
    raw = read_idx(os.path.join(tiny_fashion, "train-images-idx3-ubyte.gz"), 3)
    assert torch.equal(data.train_images[:, 0, 2:30, 2:30], torch.from_numpy(raw.copy()))


def test_training_fractions_are_fixed_draws(tiny_fashion):
    labels = torch.arange(200) % 10
    uniform = gan_data.subset_indices(labels, 0.1)
    assert len(uniform) == 20 and uniform == gan_data.subset_indices(labels, 0.1) == sorted(uniform)
    expected = sorted(np.random.RandomState(0).choice(200, 20, replace=False).tolist())  # KD-DLGAN's draw
    assert uniform == expected
    balanced = gan_data.subset_indices(labels, 0.1, draw="balanced")
    assert np.bincount(labels[balanced].numpy()).tolist() == [2] * 10
    assert gan_data.subset_indices(labels, 1.0) == list(range(200))


def test_real_batches_resume_where_they_stopped():
    images, labels = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).repeat(1, 3, 2, 2), torch.arange(10)
    stream = gan_data.RealBatches(images, labels, batch_size=3, seed=0, hflip=False)
    seen = [next(stream)[1].tolist() for _ in range(5)]  # 3 batches per epoch: crosses into epoch 1
    assert sorted(sum(seen[:3], [])) == sorted(set(sum(seen[:3], [])))  # no repeat inside an epoch
    resumed = gan_data.RealBatches(images, labels, batch_size=3, seed=0, hflip=False)
    replay = gan_data.RealBatches(images, labels, batch_size=3, seed=0, hflip=False)
    [next(replay) for _ in range(2)]
    resumed.load_state_dict(replay.state_dict())
    assert [next(resumed)[1].tolist() for _ in range(3)] == seen[2:]


# ----------------------------------------------------------------------------- entry point

@pytest.fixture(scope="module")
def network_files(tmp_path_factory):
    """Random timm networks in the format --teacher-path / --fid-weights read (10 classes)."""
    root = tmp_path_factory.mktemp("networks")
    paths = {}
    for role, name in (("teacher", TEACHER), ("fid", FID_NETWORK)):
        torch.manual_seed(0)
        paths[role] = str(root / f"{role}.pth")
        torch.save({"model": timm.create_model(name, num_classes=10).state_dict()}, paths[role])
    return paths


def run_flags(tiny_fashion, network_files, output_dir, iterations):
    return ["--dataset", "FASHION", "--data-path", tiny_fashion, "--g-ch", "2", "--d-ch", "2", "--dim-z", "8",
            "--batch-size", "8", "--num-d-steps", "2", "--iterations", str(iterations), "--ema-start", "1",
            "--ema-decay", "0.5", "--teacher", "timm", "--teacher-model", TEACHER,
            "--teacher-path", network_files["teacher"], "--fid-extractor", "timm", "--fid-model", FID_NETWORK,
            "--fid-weights", network_files["fid"], "--eval-samples", "16", "--eval-every", "2", "--save-every", "2",
            "--sample-every", "2", "--print-freq", "1", "--device", "cpu", "--output-dir", str(output_dir),
            "--resume", "auto"]


def run_main(argv, capsys):
    try:
        gan_main.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_short_run_writes_its_files_and_resumes_exactly(tiny_fashion, network_files, tmp_path, capsys):
    code, out, err = run_main(run_flags(tiny_fashion, network_files, tmp_path / "straight", 3), capsys)
    assert code == 0, err
    straight = torch.load(tmp_path / "straight" / "latest.pth", weights_only=True)
    assert straight["iteration"] == 3
    assert "Iteration [3/3]" in out and "eta" in out and "not comparable with Inception FIDs" in out
    for name in ("args.json", "log.txt", "best.pth", "results.json", "samples/iter_000002.png", "samples/iter_000003.png"):
        assert (tmp_path / "straight" / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.txt").read_text().splitlines()]
    assert [record["iteration"] for record in log if "d_adv" in record] == [1, 2, 3]
    assert all(record["vkd"] > 0 for record in log if "d_adv" in record)
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["final"]["fid"] > 0 and results["final"]["fid_comparable_with_inception"] is False

    # The same run stopped after 2 iterations and resumed: the same weights, bit for bit.
    code, _, err = run_main(run_flags(tiny_fashion, network_files, tmp_path / "split", 2), capsys)
    assert code == 0, err
    code, out, err = run_main(run_flags(tiny_fashion, network_files, tmp_path / "split", 3), capsys)
    assert code == 0, err
    assert "Resumed from" in out and "at iteration 2" in out
    resumed = torch.load(tmp_path / "split" / "latest.pth", weights_only=True)
    for network in ("G", "D", "G_ema"):
        for key, value in straight[network].items():
            assert torch.equal(value, resumed[network][key]), (network, key)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.txt").read_text().splitlines()]
    assert [record["iteration"] for record in log if "d_adv" in record] == [1, 2, 3]


@pytest.mark.parametrize("flags, named", [
    (["--teacher", "clip", "--teacher-path", "missing/open_clip_pytorch_model.bin"], ("open_clip", "--teacher-path")),
    (["--fid-extractor", "inception", "--fid-weights", "missing/weights-inception.pth"],
     ("weights-inception-2015-12-05-6726825d.pth", "--fid-weights")),
])
def test_a_missing_clip_or_inception_file_is_one_clear_error(tiny_fashion, tmp_path, capsys, flags, named):
    argv = ["--dataset", "FASHION", "--data-path", tiny_fashion, "--fid-extractor", "none", "--device", "cpu",
            "--iterations", "1", "--output-dir", str(tmp_path)] + flags
    code, out, err = run_main(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err
    assert all(word in lines[0] for word in named), lines[0]
    assert not os.path.exists(tmp_path / "latest.pth")


@pytest.mark.parametrize("copied", [False, True])
def test_the_fid_network_cannot_be_the_teacher(tiny_fashion, network_files, tmp_path, capsys, copied):
    argv = run_flags(tiny_fashion, network_files, tmp_path, 1)
    fid_file = network_files["teacher"]
    if copied:
        fid_file = str(tmp_path / "copy_of_teacher.pth")
        with open(network_files["teacher"], "rb") as source, open(fid_file, "wb") as target:
            target.write(source.read())
    argv[argv.index("--fid-weights") + 1] = fid_file
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "must not be the distillation teacher" in err


def test_missing_cifar_names_the_expected_layout(tmp_path):
    with pytest.raises(gan_data.DatasetError, match="cifar-10-batches-py"):
        gan_data.load_image_data("C10", str(tmp_path))
    with pytest.raises(gan_data.DatasetError, match="needs --data-path"):
        gan_data.load_image_data("C100", None)


def test_every_paper_row_has_a_config_that_resolves():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "generation")
    rows = sorted(name for name in os.listdir(folder) if name.startswith("c10_"))
    assert len(rows) == 9  # 10%, 20%, 100% x (DiffAugment only, VkD + LayerNorm, VkD + whitening); C100 alike
    whiten = parse_arguments(["--config", os.path.join(folder, "c10_10pct_vkd_whiten.yaml")])
    assert (whiten.dataset, whiten.data_fraction, whiten.iterations, whiten.teacher, whiten.normalisation) == \
        ("C10", 0.1, 125000, "clip", "whiten")
    assert (whiten.batch_size, whiten.num_d_steps, whiten.adam_betas, whiten.diffaug) == \
        (50, 4, [0.0, 0.999], "translation,cutout")
    baseline = parse_arguments(["--config", os.path.join(folder, "c100_100pct_da.yaml"), "--seed", "3"])
    assert (baseline.dataset, baseline.iterations, baseline.teacher, baseline.seed) == ("C100", 500000, "none", 3)
    for name in os.listdir(folder):
        parse_arguments(["--config", os.path.join(folder, name)])


def test_the_projector_trains_with_d_and_stays_put_when_g_owns_it(tiny_fashion, network_files, tmp_path, capsys):
    key = "projector.parametrizations.weight.original"
    flags = run_flags(tiny_fashion, network_files, tmp_path / "initial", 1)
    args = parse_arguments(flags)
    _, discriminator, _ = gan_main.build_networks(args, 10, gan_main.build_teacher(args, torch.device("cpu")))
    initial = discriminator.state_dict()[key]
    moved = {}
    for owner in ("D", "G"):
        argv = run_flags(tiny_fashion, network_files, tmp_path / owner, 1) + [
            "--projector-optimizer", owner, "--fid-extractor", "none"]
        code, _, err = run_main(argv, capsys)
        assert code == 0, err
        weight = torch.load(tmp_path / owner / "latest.pth", weights_only=True)["D"][key]
        moved[owner] = (weight - initial).abs().max().item()
    # The authors' G.projector: the loss lives in the D steps, where toggle-grads freezes everything of G.
    assert moved["D"] > 0 and moved["G"] == 0
