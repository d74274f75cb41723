# Pilot: EfficientNet-Lite0 (ImageNet weights) adapted to Fashion-MNIST at 64 px: does uniform's accuracy move
# from rank 1 to rank 8? (2-core CPU, alone, seed 0; 8,000 training images = 125 steps of 64, 2,000 validation)
set -x
common="model=efficientnet_lite0 task=fashion_mnist logger=none train.batch_size=64 train.lr=3e-3 task.max_train_samples=8000 task.max_eval_samples=2000"
for r in r1 r8; do
  time .venv/bin/lorambo-run $common budget=$r hydra.run.dir=runs/pilots/efficientnet_fmnist/uniform_${r}
done
