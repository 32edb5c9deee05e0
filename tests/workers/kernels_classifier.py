"""Worker: the sharded classifier on the shared float32 cases with each kernel backend; every rank
saves what it computed (compared across backends by tests/test_kernels_classifier.py), then counts what
one more Triton step launches, and last runs a few unnamed collectives (a control for the test that
Horovod's response cache does not evict under the classifier's own, named, collectives).

Usage: python kernels_classifier.py OUT_DIR BACKEND [BACKEND ...]   (under horovodrun)
"""
import sys

import horovod.torch as hvd
import torch

from model.classifier import ShardedInstanceClassifier
from run.distributed import start
from run.step_counter import StepCounter
from tests.classifier_problems import CASES, batch_slice, diagnostics, make_problem

start("horovod", announce=False)
out_dir, backends = sys.argv[1], sys.argv[2:]
results = {}
for backend in backends:
    for name, case in CASES.items():
        features, weight, labels = make_problem(case)
        classifier = ShardedInstanceClassifier(case["instances"], case["dim"], temperature=case["temperature"],
                                               smooth_k=case["k"], smooth_alpha=case["alpha"], backend=backend)
        with torch.no_grad():
            classifier.weight.copy_(weight[classifier.start:classifier.stop])  # float64 -> float32
        local_features = features[batch_slice(case["batch"], hvd.rank(), hvd.size())].float().requires_grad_(True)
        classified = classifier(local_features, labels[batch_slice(case["batch"], hvd.rank(), hvd.size())])
        classified.loss.backward()
        results[(backend, name)] = {"loss": classified.loss.detach(), "features_grad": local_features.grad,
                                    "weight_grad": classifier.weight.grad, "hardest": classified.hardest,
                                    "diagnostics": diagnostics(classified)}

# One more step of the last Triton classifier, with fresh gradients as after optimizer.zero_grad().
classifier.weight.grad = local_features.grad = None
with StepCounter() as counted:
    classifier(local_features, labels[batch_slice(case["batch"], hvd.rank(), hvd.size())]).loss.backward()
results["counted"] = {"launches": counted.launches, "collectives": counted.collectives, "syncs": counted.syncs}

print("unnamed control", file=sys.stderr, flush=True)
for _ in range(12):  # twice the test's cache capacity
    hvd.allgather(torch.zeros(1))
torch.save(results, f"{out_dir}/rank{hvd.rank()}.pt")
