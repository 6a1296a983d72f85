"""CARP under a process group: W processes on their shares of a batch == one process on all of it.

Two CPU processes on the gloo backend run `carp_loss` on their halves of one global batch and
compare against one process on the concatenated batch. The workers run once per module (spawning
imports torch in each child, a few seconds); every test reads their saved results.

The last tests take the device of a process (distributed.choose_device, device_type) as pure
functions, with torch.cuda's functions replaced: they need no GPU.

Sizes: V = 4 student views, V_t = 2 teacher views, B = 3 images per process (6 in all), K = 24
prototypes, N_B = 6 per block, so N_P = 4 blocks.
"""
import argparse
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
from cli import UserError
import features
from features import extract_features
from knn import KnnMonitor
from loss import carp_loss, global_mean, partition_for_step

WORLD_SIZE = 2
V, V_T, B, K, N_B = 4, 2, 3, 24, 6
SEED, STEP = 0, 7
TIMEOUT_S = 120


def global_logits():
    """The same student (V, W*B, K) and teacher (V_t, W*B, K) logits in every process."""
    generator = torch.Generator().manual_seed(1234)
    student = 3 * torch.randn(V, WORLD_SIZE * B, K, generator=generator)  # (V, W*B, K)
    teacher = 3 * torch.randn(V_T, WORLD_SIZE * B, K, generator=generator)  # (V_t, W*B, K)
    return student, teacher


def _worker(rank, port, out_dir):
    """One rank: CARP loss and gradient on this rank's B images, partitions, global_mean."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        # ---- carp_loss on this rank's slice of the global batch ----
        student, teacher = global_logits()
        rows = slice(rank * B, (rank + 1) * B)
        student_local = student[:, rows].clone().requires_grad_(True)  # (V, B, K)
        teacher_local = teacher[:, rows].clone()  # (V_t, B, K)
        partition = partition_for_step(K, N_B, SEED, STEP)  # (N_P, N_B)
        consistency, uniformity = carp_loss(student_local, teacher_local, partition)
        # DDP averages gradients over ranks: the same as backpropagating loss / W on each rank.
        ((consistency + uniformity) / WORLD_SIZE).backward()

        # ---- partitions drawn independently on every rank, then gathered ----
        partitions = torch.stack([partition_for_step(K, N_B, SEED, step) for step in range(3)])  # (3, N_P, N_B)
        gathered = [torch.empty_like(partitions) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, partitions)

        # ---- global_mean on hand-derivable numbers: rank r holds [2r + 1, 2r + 2] ----
        x = torch.tensor([2.0 * rank + 1, 2.0 * rank + 2], requires_grad=True)
        mean = global_mean(x, n_local=2)
        mean.sum().backward()

        torch.save({
            "consistency": consistency.detach(), "uniformity": uniformity.detach(), "grad": student_local.grad,
            "partition": partition, "gathered_partitions": torch.stack(gathered),
            "global_mean": mean.detach(), "global_mean_grad": x.grad,
        }, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_process(rank, port):
    """In a worker of run_processes: one thread, and the environment torchrun gives process `rank` of
    WORLD_SIZE on this machine, with gloo on the CPU, which every machine has (CARP_DEVICE=cpu)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), CARP_DEVICE="cpu")


def run_processes(worker, out_dir, timeout_s=TIMEOUT_S):
    """worker(rank, port, out_dir) in WORLD_SIZE processes; a worker's exception fails the test with
    its traceback, and a hung collective fails it after timeout_s instead of hanging it."""
    context = mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        # join() re-raises a worker's exception (with its traceback) and returns True when all are done.
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{worker.__name__} still running in {WORLD_SIZE} processes after {timeout_s} s "
                            f"(hung collective?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the workers once; the saved results of rank 0 and rank 1."""
    out_dir = tmp_path_factory.mktemp("distributed")
    run_processes(_worker, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process():
    """carp_loss and its gradient in one process (no process group) on the concatenated batch."""
    student, teacher = global_logits()
    student.requires_grad_(True)
    consistency, uniformity = carp_loss(student, teacher, partition_for_step(K, N_B, SEED, STEP))
    (consistency + uniformity).backward()
    return {"consistency": consistency.detach(), "uniformity": uniformity.detach(), "grad": student.grad}


def test_consistency_averaged_over_ranks_equals_one_process_on_global_batch(ranks, single_process):
    """L_c is a mean over images: the mean of the W ranks' L_c (equal B) is L_c of the global batch."""
    mean_over_ranks = torch.stack([r["consistency"] for r in ranks]).mean()
    torch.testing.assert_close(mean_over_ranks, single_process["consistency"], atol=1e-6, rtol=1e-6)
    # Different images on the two ranks: the per-rank values are not trivially equal.
    assert not torch.allclose(ranks[0]["consistency"], ranks[1]["consistency"])


def test_uniformity_uses_global_marginal_on_every_rank(ranks, single_process):
    """L_H is computed from the block marginal pbar over the global batch: every rank gets the one-process value."""
    for r in ranks:
        torch.testing.assert_close(r["uniformity"], single_process["uniformity"], atol=1e-6, rtol=1e-6)


def test_gradient_of_ddp_step_equals_one_process_gradient_on_global_batch(ranks, single_process):
    """A W-process step takes the one-process gradient of L_c + L_H on the concatenated batch.

    Every rank computes the same L_H from the global marginal pbar; `_AllReduceSum`'s backward sums
    dL_H/dpbar over the ranks and hands it to each rank's own slice, and DDP averages the ranks'
    gradients, i.e. each rank backpropagates (L_c + L_H) / W. So d/dz(rank r) of that equals the
    one-process gradient of L_c + L_H on rank r's rows: L_c's 1/B_local * 1/W = 1/B_global, and
    L_H's W identical copies * 1/W = one copy.
    """
    for rank, r in enumerate(ranks):
        expected = single_process["grad"][:, rank * B:(rank + 1) * B]  # (V, B, K)
        torch.testing.assert_close(r["grad"], expected, atol=1e-6, rtol=1e-5)
    assert single_process["grad"].abs().max() > 1e-4  # the comparison is not between zeros


def test_partition_identical_on_every_rank(ranks):
    """The step's partition is the same on every process with no communication (seeded from (seed, step))."""
    gathered = ranks[0]["gathered_partitions"]  # (W, steps, N_P, N_B)
    assert gathered.shape == (WORLD_SIZE, 3, K // N_B, N_B)
    torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
    torch.testing.assert_close(ranks[1]["gathered_partitions"], gathered, rtol=0, atol=0)
    # ... equal to what this (parent) process draws for the same (seed, step): resume-exact.
    for step in range(3):
        torch.testing.assert_close(gathered[0, step], partition_for_step(K, N_B, SEED, step), rtol=0, atol=0)
    # ... and a different partition at each step.
    assert not torch.equal(gathered[0, 0], gathered[0, 1])


def test_global_mean_divides_sum_over_ranks_by_total_count(ranks):
    """global_mean: (x_0 + x_1) / (n_local * W) = ([1, 2] + [3, 4]) / 4 = [1, 1.5] on every rank; the
    gradient of the sum of all ranks' sum(mean) w.r.t. each local x is W / (n_local * W) = 0.5."""
    for r in ranks:
        torch.testing.assert_close(r["global_mean"], torch.tensor([1.0, 1.5]))
        torch.testing.assert_close(r["global_mean_grad"], torch.tensor([0.5, 0.5]))


# ============ the device of a process ============

@pytest.mark.parametrize("local_rank, n_gpus, expected", [(0, 8, "cuda:0"), (3, 8, "cuda:3"), (3, 1, "cuda:0"),
                                                          (0, 1, "cuda:0")])
def test_each_process_takes_its_own_gpu_or_the_only_one_it_sees(local_rank, n_gpus, expected):
    """GPU number LOCAL_RANK where the process sees the machine's GPUs; the one GPU it sees where a
    launcher gives each process only its own (CUDA_VISIBLE_DEVICES), whatever its local rank."""
    assert distributed.choose_device("cuda", local_rank, n_gpus) == torch.device(expected)
    assert distributed.choose_device("cpu", local_rank, n_gpus) == torch.device("cpu")


def test_more_processes_than_gpus_is_one_line_that_says_what_to_do():
    with pytest.raises(UserError, match=r"^LOCAL_RANK 2 but this process sees 2 GPUs: start at most 2 processes on "
                                        r"this machine \(torchrun --nproc_per_node 2\), or CARP_DEVICE=cpu$"):
        distributed.choose_device("cuda", 2, 2)


def test_carp_device_chooses_the_device_of_every_script(monkeypatch):
    """Unset: CUDA where a GPU is visible; CARP_DEVICE=cpu keeps a GPU machine on the CPU (the tests
    run so: conftest.py); a value that is no device, or cuda without a GPU, is one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CARP_DEVICE")
    assert distributed.device_type() == "cuda"
    monkeypatch.setenv("CARP_DEVICE", "cpu")
    assert distributed.device_type() == "cpu"
    monkeypatch.setenv("CARP_DEVICE", "gpu")
    with pytest.raises(UserError, match=r"^CARP_DEVICE=gpu is not a device: set it to cpu or cuda, or unset it$"):
        distributed.device_type()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CARP_DEVICE")
    assert distributed.device_type() == "cpu"
    monkeypatch.setenv("CARP_DEVICE", "cuda")
    with pytest.raises(UserError, match=r"^CARP_DEVICE=cuda but no GPU is visible"):
        distributed.device_type()


def test_torchrun_on_a_process_that_sees_one_gpu_takes_device_0(monkeypatch):
    """init_distributed under torchrun as LOCAL_RANK 1 of a node where the launcher gave the process
    one GPU: it sets device 0 (not 1: "invalid device ordinal"), joins with NCCL, and lets cuDNN pick
    its fastest algorithms."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(distributed, "set_cudnn", lambda deterministic=False: calls.append(("cudnn", deterministic)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    for name, value in (("CARP_DEVICE", "cuda"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert distributed.init_distributed() == (1, 2, torch.device("cuda", 0))
    assert calls == [("cudnn", False), ("set_device", torch.device("cuda", 0)), ("init", "nccl")]


def test_deterministic_sets_cudnn_and_torch_to_their_deterministic_algorithms(monkeypatch):
    """set_cudnn(True) (pretrain.py --deterministic on CUDA): cuDNN's deterministic algorithms, no
    benchmarking, torch's deterministic algorithms (a warning for an operation that has none) and
    cuBLAS's fixed workspace; set_cudnn(False): cuDNN's fastest algorithms, found by benchmarking,
    and the deterministic settings a user made before are left as they were."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        distributed.set_cudnn(True)
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        distributed.set_cudnn(False)
        assert torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
        torch.backends.cudnn.deterministic = False
        torch.use_deterministic_algorithms(False)
        distributed.set_cudnn(False)
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


# ============ features gathered to the main process ============

def tiny_images(n, seed):
    """n labelled 3 x 2 x 2 images (labels 0, 1, 2, 0, ...): a dataset whose Flatten features are its pixels."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 2, 2, generator=generator), i % 3) for i in range(n)]


def _features_worker(rank, port, out_dir):
    """One rank: extract_features of 5 images (2 shards of 3, one padded) gathered to the main process
    only and to every process, and the k-NN monitor's accuracy."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        network, all_gathers, all_gather = torch.nn.Flatten(), [], features.all_gather
        features.all_gather = lambda tensor: all_gathers.append(tensor.shape) or all_gather(tensor)  # counted
        main_only = extract_features(network, tiny_images(5, 0), batch_size=2, num_workers=0, progress=False,
                                     main_only=True)
        monitor = KnnMonitor(argparse.Namespace(num_workers=0, nb_knn=3), "cpu", tiny_images(7, 1), tiny_images(5, 2))
        knn = monitor.accuracy(network)
        no_all_gather = all_gathers == []  # neither main_only nor the monitor sends features to every process
        everywhere = extract_features(network, tiny_images(5, 0), batch_size=2, num_workers=0, progress=False)
        torch.save({"main_only": main_only, "everywhere": everywhere, "knn": knn, "no_all_gather": no_all_gather},
                   out_dir / f"features{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_features_gathered_to_the_main_process_only_leave_the_others_empty(tmp_path):
    """extract_features(main_only=True) under 2 processes: the main process holds every image's
    features and label in dataset order, as one process extracts them; the other holds none (None,
    None), where the default gathers them to both. The k-NN monitor measures on the main process
    alone (the other's accuracy is None) the accuracy of one process."""
    run_processes(_features_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"features{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    images = tiny_images(5, 0)
    pixels, labels = torch.stack([image.flatten() for image, _ in images]), torch.tensor([l for _, l in images])
    gathered, gathered_labels = ranks[0]["main_only"]
    assert torch.equal(gathered, pixels) and torch.equal(gathered_labels, labels)
    assert ranks[1]["main_only"] == (None, None) and ranks[0]["no_all_gather"] and ranks[1]["no_all_gather"]
    for rank in ranks:
        assert torch.equal(rank["everywhere"][0], pixels) and torch.equal(rank["everywhere"][1], labels)
    one_process = KnnMonitor(argparse.Namespace(num_workers=0, nb_knn=3), "cpu", tiny_images(7, 1),
                             tiny_images(5, 2)).accuracy(torch.nn.Flatten())
    assert ranks[0]["knn"] == one_process and ranks[1]["knn"] is None
