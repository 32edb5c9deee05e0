"""The ledger of the branches that only a GPU runs, and what holds each: a CPU test through a faithful stand-in
(NCCL's contract, the device a tensor must be on, stubbed CUDA queries, Triton compiled for the target or run
under its interpreter), or a named step of the GPU session (bench/gpu/gpu_session.sh). No test here can execute
such a branch for real, so each one is listed, and a branch the ledger does not list fails this file: a new
`torch.cuda`, `is_cuda`, `device.type == "cuda"` or DALI GPU branch comes with its test or session step.

An entry is "file::function" (the innermost function around the branch, "<module>" outside any) with what
exercises it: "tests/test_x.py::test_name" or "session: STEP". Entries whose branch needs DALI on a GPU, which
the lent GPU machine does not have, name the session's `data` step, which runs them where DALI is installed.
"""
import ast
import re
import subprocess

from tests.conftest import ROOT

# What marks a GPU-only branch: CUDA queries and device tests, DALI's GPU decoder and its GPU outputs.
GPU_BRANCH = re.compile(r"torch\.cuda\b|\bis_cuda\b|\.type\s*[=!]=\s*[\"']cuda[\"']|[\"']mixed[\"']|==\s*[\"']gpu[\"']"
                        r"|\.gpu\(\)")
SESSION = ROOT / "bench" / "gpu" / "gpu_session.sh"

LEDGER = {
    # the process group and the rank's device
    "run/distributed.py::setup_device": [
        "tests/test_data_device.py::test_setup_device_takes_the_only_visible_gpu_on_local_rank_1",
        "session: trainer"],
    "run/distributed.py::describe_device": [
        "tests/test_data_device.py::test_setup_device_takes_the_only_visible_gpu_on_local_rank_1", "session: trainer"],
    "run/distributed.py::gpu_identity": [
        "tests/test_torch_engine.py::test_two_workers_on_one_gpu_stop_with_one_line_each_before_any_work",
        "session: torchrun_trainer"],
    "run/torch_engine.py::device_backend": [
        "tests/test_torch_engine.py::test_every_collective_of_a_run_and_its_evaluation_keeps_host_tensors_off_nccl",
        "session: torchrun_trainer"],
    "run/torch_engine.py::TorchEngine.__init__": [
        "tests/test_torch_engine.py::test_every_collective_of_a_run_and_its_evaluation_keeps_host_tensors_off_nccl",
        "session: torchrun_trainer", "session: collectives"],
    "run/horovod_engine.py::default_horovod_environment": [
        "tests/test_classifier.py::test_default_horovod_environment", "session: horovod_trainer"],
    "run/horovod_engine.py::HorovodEngine.__init__": [
        "tests/test_torch_engine.py::test_a_rank_waiting_for_a_collective_leaves_the_cpu_to_the_others",
        "session: horovod_trainer"],
    # settings judged against the machine
    "settings.py::check_machine_and_paths": [
        "tests/test_reliability.py::test_gpu_only_settings_are_refused_without_cuda", "session: trainer"],
    "settings.py::check_dali_device": [
        "tests/test_flags.py::test_knn_and_linear_take_dali_device_over_the_runs"],
    "settings.py::machine_precision": [
        "tests/test_precision.py::test_bf16_on_a_gpu_without_bf16_tensor_cores_is_one_line_naming_it",
        "tests/test_precision.py::test_auto_is_bf16_on_gpus_with_bf16_tensor_cores_and_fp32_on_older_ones",
        "session: trainer"],
    "model/precision.py::has_bf16_tensor_cores": [
        "tests/test_precision.py::test_auto_is_bf16_on_gpus_with_bf16_tensor_cores_and_fp32_on_older_ones"],
    # the kernels' automatic choices on CUDA
    "kernels/__init__.py::seed_rows_": ["session: smoke", "session: trainer"],
    "kernels/topk_xent.py::shard_ops": ["session: smoke", "session: classifier_step", "session: trainer"],
    "kernels/triton_topk_xent.py::_multiprocessors": [
        "tests/test_kernels_compile.py::test_launches_specialise_as_on_the_gpu", "session: smoke"],
    # DALI's GPU decoding
    "data/decoder.py::mixed_decoder_arguments": [
        "tests/test_data_decoder.py::test_training_on_photos_gets_the_imagenet_example_pools_and_the_largest_sampled_size_as_hints",
        "session: data"],
    "data/pipelines.py::read_and_decode": [
        "tests/test_data_device.py::test_a_gpu_pipeline_decodes_with_the_mixed_decoder_and_hands_its_ids_over_on_the_gpu",
        "session: data"],
    "data/pipelines.py::InstanceLoader.__init__": [
        "tests/test_data_device.py::test_a_gpu_loader_builds_its_pipeline_on_the_current_device", "session: data"],
    "data/pipelines.py::resolve_device": [
        "tests/test_data_device.py::test_auto_decodes_on_the_gpu_where_torch_sees_cuda", "session: data"],
    # the build of Horovod with NCCL
    ".ci/horovod_build_plan.py::probe": ["session: horovod_setup"],
    # the benchmarks' harness
    "bench/harness.py::times_ms": [
        "tests/test_bench_harness.py::test_time_ms_on_cuda_times_with_the_gpus_events", "session: kernels"],
    **{f"bench/harness.py::{function}": [
        "tests/test_bench_harness.py::test_on_cuda_memory_is_torchs_allocator_and_the_reset_waits_for_the_gpu",
        "session: train_step"] for function in ("memory_in_use", "reset_peak_memory", "peak_memory")},
    "bench/harness.py::provenance": [
        "tests/test_bench_harness.py::test_provenance_is_one_line_naming_machine_gpu_date_commit_and_versions",
        "session: classifier_step"],
    # the benchmarks' CUDA modes
    "bench/gpu/triton_smoke.py::main": ["session: smoke"],
    "bench/classifier_step.py::cuda": ["session: classifier_step"],
    "bench/classifier_step.py::run_worker": ["session: classifier_step"],
    "bench/collectives.py::main": ["session: collectives"],
    "bench/train_step.py::main": ["session: train_step"],
    "bench/train_step.py::clean_state": ["session: train_step"],
    "bench/kernel.py::<module>": ["tests/test_kernels_compile.py::test_every_kernel_compiles_for_h100_and_a100_within_their_limits",
                                  "session: kernels"],
    "bench/kernel.py::gpu_check": ["tests/test_kernels_bench.py::test_gpu_mode_without_cuda_says_what_to_do",
                                   "session: kernels"],
    "bench/kernel.py::device_name": ["session: kernels"],
    "bench/kernel.py::peak_extra_mib": ["session: kernels"],
    "bench/kernel.py::rotated_inputs": ["session: kernels"],
    "bench/data.py::main": ["session: data"],
    "bench/data.py::measure_loader": [
        "tests/test_bench_harness.py::test_the_data_bench_rate_is_the_timed_images_over_their_total_time_and_builds_"
        "close_off_the_clock", "session: data"],
    "bench/data.py::gpu_bytes_in_use": ["session: data"],
    "bench/data.py::device_id": ["session: data"],
    "bench/data.py::decoded_images": ["session: data"],
    "bench/data.py::gpu_checks": ["session: data"],
}


def gpu_branches():
    """{"file::function": [line numbers]} of every GPU-only branch of the tracked code outside tests/."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    branches = {}
    for path in tracked.stdout.split():
        if path.startswith("tests/"):
            continue
        source = (ROOT / path).read_text()
        functions = [(node.lineno, node.end_lineno, name) for node, name in named_functions(ast.parse(source))]
        for number, line in enumerate(source.splitlines(), 1):
            if GPU_BRANCH.search(line.split("#")[0]):
                around = [function for function in functions if function[0] <= number <= function[1]]
                name = min(around, key=lambda function: function[1] - function[0])[2] if around else "<module>"
                branches.setdefault(f"{path}::{name}", []).append(number)
    return branches


def named_functions(tree, prefix=""):
    """(node, qualified name) of every function of a module, methods as Class.method."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not isinstance(node, ast.ClassDef):
                yield node, prefix + node.name
            yield from named_functions(node, f"{prefix}{node.name}.")


def session_steps():
    return set(re.findall(r"^\s*run_step (\w+) ", SESSION.read_text(), flags=re.MULTILINE))


def test_every_gpu_only_branch_is_in_the_ledger_and_every_entry_is_a_branch():
    branches = gpu_branches()
    unlisted = {branch: lines for branch, lines in branches.items() if branch not in LEDGER}
    assert not unlisted, f"GPU-only branches without a test or a GPU-session step in tests/test_gpu_branches.py: {unlisted}"
    gone = sorted(set(LEDGER) - set(branches))
    assert not gone, f"ledger entries whose branch is gone (update tests/test_gpu_branches.py): {gone}"


def test_what_the_ledger_names_exists():
    steps = session_steps()
    for branch, holders in LEDGER.items():
        assert holders, branch
        for holder in holders:
            if holder.startswith("session: "):
                assert holder.removeprefix("session: ") in steps, f"{branch}: no step {holder} in {SESSION.name}"
            else:
                path, test = holder.split("::")
                assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.MULTILINE), f"{branch}: no {holder}"


def test_the_scan_finds_each_kind_of_branch(tmp_path):
    """The pattern itself: each kind of GPU-only branch is found, a comment is not."""
    for line in ("if torch.cuda.is_available():", "enabled=images.is_cuda", 'if device.type != "cuda":',
                 'decoder = dict(device="mixed")', 'if device == "gpu":', "ids.gpu()"):
        assert GPU_BRANCH.search(line), line
    assert not GPU_BRANCH.search("x = 1  # torch.cuda".split("#")[0])
