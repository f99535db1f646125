"""The experiment drivers (``python -m experiments.demo``, ``.demo_gen``, ``.ablation``, ``.fmnist``; ``make
demo``, ``make demo-gen``, ``make ablation``, ``make fmnist``) and what they share: one job runner, one
statistics module and the paper's published numbers. Each writes its report to ``results/<experiment>/``."""
