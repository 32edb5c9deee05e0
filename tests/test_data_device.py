"""Which GPU a rank uses (and so DALI's device_id, which inherits the current device): local rank modulo the
visible devices, checked on CPU by stubbing the CUDA queries."""
import pytest
import torch

from run.distributed import describe_device, gpu_ordinal, refuse_shared_gpus, setup_device
from run.errors import UsageError


@pytest.mark.parametrize("local_rank, visible, ordinal", [
    (0, 8, 0), (5, 8, 5),  # every GPU of the node visible to every rank
    (0, 1, 0), (1, 1, 0), (7, 1, 0),  # one GPU per process: SLURM --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank
    (9, 8, 1), (3, 2, 1),  # more local ranks than GPUs: shared round robin
])
def test_gpu_ordinal_is_the_local_rank_modulo_the_visible_devices(local_rank, visible, ordinal):
    assert gpu_ordinal(local_rank, visible) == ordinal


def test_no_visible_device_is_an_error():
    with pytest.raises(ValueError, match="no CUDA device visible to local rank 2"):
        gpu_ordinal(2, 0)


@pytest.fixture
def one_visible_gpu(monkeypatch):
    """A launcher that shows each rank one GPU; returns the set_device calls."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Test GPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    return chosen


def test_setup_device_takes_the_only_visible_gpu_on_local_rank_1(one_visible_gpu):
    device = setup_device(local_rank=1)
    assert device == torch.device("cuda", 0) and one_visible_gpu == [device]
    assert describe_device(device) == "cuda:0 Test GPU (CUDA_VISIBLE_DEVICES=5)"


def test_without_cuda_the_device_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_device(local_rank=1) == torch.device("cpu") and describe_device(torch.device("cpu")) == "cpu"


def test_two_ranks_on_one_gpu_are_refused_naming_the_launch_that_fits():
    node, other = ("node-a", "GPU-1"), ("node-b", "GPU-1")  # one UUID on two hosts cannot happen; a host per rank
    refuse_shared_gpus([None, None])  # CPU ranks
    refuse_shared_gpus([node, other, ("node-a", "GPU-2")])  # one GPU per rank
    with pytest.raises(UsageError, match=r"ranks 0 and 2 would share one GPU of node-a \(GPU-1\): NCCL runs one "
                                         r"rank per GPU; launch at most 2 ranks on node-a \(torchrun "
                                         r"--nproc_per_node 2, horovodrun -np 2 -H node-a:2\)"):
        refuse_shared_gpus([node, ("node-a", "GPU-2"), node])


def test_auto_decodes_on_the_gpu_where_torch_sees_cuda(monkeypatch):
    from data.pipelines import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "gpu" and resolve_device("cpu") == "cpu"


class PipelineBuilt(Exception):
    """Raised by the stand-in pipeline function with the arguments it was given."""


def test_a_gpu_loader_builds_its_pipeline_on_the_current_device(tmp_path, monkeypatch):
    """DALI's GPU pipeline decodes on the device_id it is given: the rank's current GPU (run.distributed made it
    current); the CPU pipeline gets none."""
    from data import pipelines
    from data.index import build_index
    from tests.workers.data_images import write_images
    write_images(tmp_path / "images", 4, classes=2)
    index = build_index(tmp_path / "images", out_dir=tmp_path / "index", log=lambda message: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)

    def pipeline_function(index, rank, world_size, decoder, shuffle_seed, **arguments):
        raise PipelineBuilt(decoder["device"], arguments["device_id"])

    for device, expected in (("gpu", ("mixed", 3)), ("cpu", ("cpu", None))):
        with pytest.raises(PipelineBuilt) as built:
            pipelines.InstanceLoader(pipeline_function, ["images"], index, shuffle=True, batch_size=2, rank=0,
                                     world_size=1, device=device, threads=1, seed=0, image_size=16)
        assert built.value.args == expected


def test_a_gpu_pipeline_decodes_with_the_mixed_decoder_and_hands_its_ids_over_on_the_gpu(monkeypatch, tmp_path):
    """The graph read_and_decode builds, with DALI's operators stood in for: the decoder arguments reach the
    image decoder, and with the GPU decoder the ids leave the pipeline on the GPU (a GPU pipeline's CPU output
    may come in pinned memory, which torch's DLPack import refuses)."""
    from types import SimpleNamespace

    from data import pipelines
    from data.index import build_index
    from tests.workers.data_images import write_images
    write_images(tmp_path / "images", 4, classes=2)
    index = build_index(tmp_path / "images", out_dir=tmp_path / "index", log=lambda message: None)

    class Node(SimpleNamespace):
        def gpu(self):
            return Node(on="gpu", of=self)

    decoded = []
    monkeypatch.setattr(pipelines, "fn", SimpleNamespace(
        readers=SimpleNamespace(file=lambda **arguments: (Node(on="cpu", what="files"), Node(on="cpu", what="ids"))),
        decoders=SimpleNamespace(image=lambda encoded, **arguments: decoded.append(arguments) or Node(on="cpu"))))
    for decoder, ids_on in (({"device": "mixed"}, "gpu"), ({"device": "cpu"}, "cpu")):
        _, ids = pipelines.read_and_decode(index, 0, 1, decoder, None)
        assert ids.on == ids_on and decoded[-1]["device"] == decoder["device"]
