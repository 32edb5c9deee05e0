"""Worker: run the sharded classifier on shared random cases; each rank saves what it computed.

Usage: python classifier_cases.py OUT_DIR BACKEND [BACKEND ...]   (under horovodrun, or alone: the single engine)
Every rank builds the same float64 global problem from fixed seeds, takes its uneven slice of the
batch and its shard of W, and saves loss, gradients, merged top-K, seed_ results and one SGD step.
"""
import sys

import torch

from model.classifier import ShardedInstanceClassifier, distributed_backbone_optimizer
from run.distributed import exit_now, start
from tests.classifier_problems import CASES, SGD_STEP, batch_slice, diagnostics, make_problem, tiny_backbone

world = start(announce=False)
rank, size = world.rank, world.size
out_dir, backends = sys.argv[1], sys.argv[2:]
results = {"rank": rank, "size": size, "engine": world.name}

for backend in backends:
    for name, case in CASES.items():
        features, weight, labels = make_problem(case)
        mine = batch_slice(case["batch"], rank, size)
        classifier = ShardedInstanceClassifier(case["instances"], case["dim"], temperature=case["temperature"],
                                               smooth_k=case["k"], smooth_alpha=case["alpha"], backend=backend).double()
        with torch.no_grad():
            classifier.weight.copy_(weight[classifier.start:classifier.stop])
        local_features = features[mine].clone().requires_grad_(True)
        classified = classifier(local_features, labels[mine])
        classified.loss.backward()
        results[(backend, name)] = {
            "start": classifier.start, "stop": classifier.stop, "loss": classified.loss.detach(),
            "features_grad": local_features.grad, "weight_grad": classifier.weight.grad,
            "hardest": classified.hardest, "diagnostics": diagnostics(classified)}

# seed_: a batch with one duplicated id; rows not in the batch must stay untouched.
case = CASES["smooth"]
features, weight, labels = make_problem(case)
classifier = ShardedInstanceClassifier(case["instances"], case["dim"]).double()
before = classifier.weight.detach().clone()
mine = batch_slice(case["batch"], rank, size)
written = classifier.seed_(features[mine], labels[mine])
results["seed"] = {"start": classifier.start, "before": before, "after": classifier.weight.detach().clone(),
                   "written": written}

# One SGD step of tiny backbone + classifier, backbone through the summing DistributedOptimizer.
torch.manual_seed(0)
backbone = tiny_backbone()
inputs, labels = SGD_STEP["inputs"](), SGD_STEP["labels"]()
classifier = ShardedInstanceClassifier(SGD_STEP["instances"], SGD_STEP["dim"], temperature=0.2, smooth_k=3,
                                       smooth_alpha=0.2, backend=backends[0]).double()
backbone_optimizer = distributed_backbone_optimizer(torch.optim.SGD(backbone.parameters(), lr=SGD_STEP["lr"], momentum=0.9),
                                                    backbone.named_parameters())
classifier_optimizer = torch.optim.SGD(classifier.parameters(), lr=SGD_STEP["lr"], momentum=0.9)
mine = batch_slice(len(labels), rank, size)
loss = classifier(backbone(inputs[mine]), labels[mine]).loss
backbone_optimizer.zero_grad()
classifier_optimizer.zero_grad()
loss.backward()
backbone_optimizer.step()
classifier_optimizer.step()
results["sgd"] = {"backbone": {k: v.detach().clone() for k, v in backbone.state_dict().items()},
                  "start": classifier.start, "weight": classifier.weight.detach().clone()}

torch.save(results, f"{out_dir}/rank{rank}.pt")
exit_now(0)  # as the trainer ends: no interpreter teardown, which can abort a gloo worker now and then
