"""The COST paper's experiments (CityScapes, NYUv2, CelebA): loaders of their on-disk layouts,
SegNet and SegNet-MTAN, the dense tasks, synthetic data of their shapes, and each experiment's
recipe (``cost_fast.experiments.paper``), which ``cost-fast train`` runs."""
