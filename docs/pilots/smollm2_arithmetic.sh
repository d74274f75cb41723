# Pilot: does SmolLM2-135M-Instruct's arithmetic accuracy move off the floor with LoRA training? (2-core CPU, alone)
set -x
common="model=smollm2 task=arithmetic budget=r4 task.max_test_samples=100 train.batch_size=8 logger=none train.eval_every=0"
time .venv/bin/lorambo-run $common train.max_steps=1 train.lr=1e-10 hydra.run.dir=runs/pilots/smollm2_arithmetic/base
time .venv/bin/lorambo-run $common train.max_steps=150 hydra.run.dir=runs/pilots/smollm2_arithmetic/uniform_r4_150
# the second budget: uniform r1, the same 150 steps and evaluation
time .venv/bin/lorambo-run $common budget=r1 train.max_steps=150 hydra.run.dir=runs/pilots/smollm2_arithmetic/uniform_r1_150
