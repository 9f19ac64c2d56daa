"""edpo_experiments: the demo, the sample-data generator, the notebook example and the
cached-vs-exact ε-step study (`python -m edpo_experiments.demo`, `.make_samples`,
`.notebook_example`, `.study_k`)."""
