"""edpo_bench: the benchmarks (`python -m edpo_bench.prep`, `python -m edpo_bench.train`) and
their PyTorch baselines (`prep_torch`, and `torch_train`, the reference ε-DPO trainer that the
tests also use as the fidelity oracle of `edpo train`)."""
