# Pilot: MPNet (all-mpnet-base-v2) under a new classification head on the two Table 1 tasks: does uniform's
# accuracy move from rank 1 to rank 8 in 125 steps of 16? (2-core CPU, alone, seed 0, 1,000 validation examples)
set -x
common="model=mpnet logger=none task.max_train_samples=2000 task.max_eval_samples=1000"
for task in rt_snippets wiki_pairs; do for r in r1 r8; do
  time .venv/bin/lorambo-run $common task=$task budget=$r hydra.run.dir=runs/pilots/mpnet_table1/${task}_uniform_${r}
done; done
